//! The migration stream: a header, then typed, length-prefixed sections
//! from the source; short replies from the destination on the same
//! connection (its return path). Format 2 is the two-phase handover; format 3
//! encodes the vCPU state field by field. Integers are big-endian but for the
//! vCPU state, which is little-endian (x86's own order).
//!
//! ```text
//!  source -> destination
//!  "BATONMIG" format:u32
//!  section: tag:u8 len:u64 payload[len]
//!    1 HELLO   memory:u64 vcpus:u32 disk_size:u64   (first, exactly once)
//!    2 RAM     first_page:u64 count:u32 pages[count * 4096]
//!    3 VCPU    id:u32 state[VCPU_STATE_LEN]      (field by field, see vcpu_bytes)
//!    4 DEVICE  consumed:u32
//!    255 END   running:u8                       (the guest ran when the source stopped it)
//!    7 COMMIT  (empty)                          (after PREPARED: the decision)
//!    8 ABORT   reason (utf-8)                   (any time before COMMIT)
//!    9 KEEPALIVE (empty)                        (while the source waits at pre-switchover)
//!
//!  destination -> source (the return path)
//!  reply: tag:u8 len:u32 payload[len]
//!    1 WELCOME   JSON {"targets": [{"node", "export", "size"}]}  (answer to HELLO:
//!                the destination's disks that are incoming mirror targets)
//!    2 REFUSED   reason (utf-8)                  (the attempt is over; why)
//!    3 PREPARED  (empty)                         (everything arrived and is loaded)
//! ```
//!
//! I9: anything unknown, truncated or inconsistent fails the incoming side
//! with an error that says what and where; nothing is skipped.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::vcpu::VcpuState;

pub const MAGIC: &[u8; 8] = b"BATONMIG";
/// The stream format this build speaks. Two builds that speak the same
/// format migrate freely in both directions.
/// Format 3 encodes a vCPU's registers field by field (format 2 sent this
/// build's in-memory struct layouts).
pub const VERSION: u32 = 3;
pub const PAGE: usize = 4096;

pub const HELLO: u8 = 1;
pub const RAM: u8 = 2;
pub const VCPU: u8 = 3;
pub const DEVICE: u8 = 4;
pub const END: u8 = 255;
pub const COMMIT: u8 = 7;
pub const ABORT: u8 = 8;
pub const KEEPALIVE: u8 = 9;

pub const REPLY_WELCOME: u8 = 1;
pub const REPLY_REFUSED: u8 = 2;
pub const REPLY_PREPARED: u8 = 3;
/// Largest reply accepted.
pub const MAX_REPLY: u32 = 64 << 10;

/// Largest section accepted (a RAM run of 16 MiB plus its header).
pub const MAX_SECTION: u64 = (16 << 20) + 12;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("i/o on the migration stream")]
    Io(#[from] std::io::Error),
    #[error("not a baton migration stream (bad magic)")]
    BadMagic,
    #[error("migration stream version {0} is not supported (this build speaks {VERSION})")]
    Version(u32),
    #[error("unknown section type {0}")]
    UnknownSection(u8),
    #[error("{} section of {len} bytes: {why}", tag_name(*.tag))]
    BadSection { tag: u8, len: u64, why: String },
    #[error("bad reply from the destination: {0}")]
    BadReply(String),
}

/// One decoded section.
#[derive(Debug)]
pub enum Section {
    Hello(Hello),
    Ram {
        first_page: u64,
        data: Vec<u8>,
    },
    Vcpu {
        id: u32,
        state: Box<VcpuState>,
    },
    Device {
        consumed: u32,
    },
    /// The end marker; `running`: the guest was running before the
    /// switchover (the destination runs it after COMMIT only then, as QEMU).
    End {
        running: bool,
    },
    Commit,
    Abort(String),
    KeepAlive,
}

/// A section tag's name, for messages.
pub fn tag_name(tag: u8) -> String {
    match tag {
        HELLO => "HELLO".into(),
        RAM => "RAM".into(),
        VCPU => "VCPU".into(),
        DEVICE => "DEVICE".into(),
        END => "END".into(),
        COMMIT => "COMMIT".into(),
        ABORT => "ABORT".into(),
        KEEPALIVE => "KEEPALIVE".into(),
        other => format!("type {other}"),
    }
}

impl Section {
    /// The section's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Section::Hello(_) => "HELLO",
            Section::Ram { .. } => "RAM",
            Section::Vcpu { .. } => "VCPU",
            Section::Device { .. } => "DEVICE",
            Section::End { .. } => "END",
            Section::Commit => "COMMIT",
            Section::Abort(_) => "ABORT",
            Section::KeepAlive => "KEEPALIVE",
        }
    }
}

/// What the source says of the guest before any RAM moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub memory: u64,
    pub vcpus: u32,
    pub disk_size: u64,
}

/// A reply on the return path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// HELLO accepted; the destination's incoming mirror targets.
    Welcome(Vec<Target>),
    Refused(String),
    Prepared,
}

/// A destination disk exported writable for the source's mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The destination's node (for messages).
    pub node: String,
    /// The NBD export name the source's `nbd` node must connect to.
    pub export: String,
    pub size: u64,
}

/// The bytes of a vCPU's state in a VCPU section (after its id).
pub const VCPU_STATE_LEN: usize = 18 * 8 + 8 * SEGMENT_LEN + 2 * DTABLE_LEN + 7 * 8 + 4 * 8;
/// base:u64 limit:u32 selector:u16, then type, present, dpl, db, s, l, g, avl, unusable (u8 each).
const SEGMENT_LEN: usize = 8 + 4 + 2 + 9;
/// base:u64 limit:u16.
const DTABLE_LEN: usize = 8 + 2;

/// Appends fields little-endian.
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn segment(&mut self, s: &kvm_bindings::kvm_segment) {
        self.u64(s.base);
        self.u32(s.limit);
        self.u16(s.selector);
        for b in [s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable] {
            self.u8(b);
        }
    }
    fn dtable(&mut self, d: &kvm_bindings::kvm_dtable) {
        self.u64(d.base);
        self.u16(d.limit);
    }
}

/// Takes fields little-endian from a slice whose length was checked first
/// (a short slice still gives zeros, never a panic).
struct Dec<'a>(&'a [u8]);

impl Dec<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        if let Some((head, rest)) = self.0.split_first_chunk::<N>() {
            a = *head;
            self.0 = rest;
        }
        a
    }
    fn u8(&mut self) -> u8 {
        u8::from_le_bytes(self.take())
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn segment(&mut self) -> kvm_bindings::kvm_segment {
        kvm_bindings::kvm_segment {
            base: self.u64(),
            limit: self.u32(),
            selector: self.u16(),
            type_: self.u8(),
            present: self.u8(),
            dpl: self.u8(),
            db: self.u8(),
            s: self.u8(),
            l: self.u8(),
            g: self.u8(),
            avl: self.u8(),
            unusable: self.u8(),
            padding: 0,
        }
    }
    fn dtable(&mut self) -> kvm_bindings::kvm_dtable {
        kvm_bindings::kvm_dtable { base: self.u64(), limit: self.u16(), padding: [0; 3] }
    }
}

/// A vCPU's state, field by field, little-endian, in a fixed order (format
/// 3): kvm_regs (rax..r15, rip, rflags), then kvm_sregs (cs, ds, es, fs, gs,
/// ss, tr, ldt, gdt, idt, cr0, cr2, cr3, cr4, cr8, efer, apic_base, the
/// interrupt bitmap). Padding is not sent.
fn vcpu_bytes(st: &VcpuState) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(VCPU_STATE_LEN));
    let r = &st.regs;
    for v in [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15,
        r.rip, r.rflags,
    ] {
        e.u64(v);
    }
    let s = &st.sregs;
    for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
        e.segment(seg);
    }
    e.dtable(&s.gdt);
    e.dtable(&s.idt);
    for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
        e.u64(v);
    }
    for w in s.interrupt_bitmap {
        e.u64(w);
    }
    e.0
}

/// Decode [`vcpu_bytes`]; `Err` says why the bytes are not a vCPU state.
fn vcpu_from(b: &[u8]) -> Result<VcpuState, String> {
    if b.len() != VCPU_STATE_LEN {
        return Err(format!("vCPU state of {} bytes (format {VERSION} has {VCPU_STATE_LEN})", b.len()));
    }
    let mut d = Dec(b);
    let regs = kvm_bindings::kvm_regs {
        rax: d.u64(),
        rbx: d.u64(),
        rcx: d.u64(),
        rdx: d.u64(),
        rsi: d.u64(),
        rdi: d.u64(),
        rsp: d.u64(),
        rbp: d.u64(),
        r8: d.u64(),
        r9: d.u64(),
        r10: d.u64(),
        r11: d.u64(),
        r12: d.u64(),
        r13: d.u64(),
        r14: d.u64(),
        r15: d.u64(),
        rip: d.u64(),
        rflags: d.u64(),
    };
    let sregs = kvm_bindings::kvm_sregs {
        cs: d.segment(),
        ds: d.segment(),
        es: d.segment(),
        fs: d.segment(),
        gs: d.segment(),
        ss: d.segment(),
        tr: d.segment(),
        ldt: d.segment(),
        gdt: d.dtable(),
        idt: d.dtable(),
        cr0: d.u64(),
        cr2: d.u64(),
        cr3: d.u64(),
        cr4: d.u64(),
        cr8: d.u64(),
        efer: d.u64(),
        apic_base: d.u64(),
        interrupt_bitmap: [d.u64(), d.u64(), d.u64(), d.u64()],
    };
    Ok(VcpuState { regs, sregs })
}

pub async fn write_header<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    w.write_all(MAGIC).await?;
    w.write_u32(VERSION).await
}

async fn section<W: AsyncWrite + Unpin>(w: &mut W, tag: u8, parts: &[&[u8]]) -> std::io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    w.write_u8(tag).await?;
    w.write_u64(len as u64).await?;
    for p in parts {
        w.write_all(p).await?;
    }
    Ok(())
}

pub async fn write_hello<W: AsyncWrite + Unpin>(w: &mut W, h: &Hello) -> std::io::Result<()> {
    section(w, HELLO, &[&h.memory.to_be_bytes(), &h.vcpus.to_be_bytes(), &h.disk_size.to_be_bytes()]).await?;
    w.flush().await
}

pub async fn write_keepalive<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    section(w, KEEPALIVE, &[]).await?;
    w.flush().await
}

pub async fn write_commit<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    section(w, COMMIT, &[]).await?;
    w.flush().await
}

pub async fn write_abort<W: AsyncWrite + Unpin>(w: &mut W, reason: &str) -> std::io::Result<()> {
    let r = reason.as_bytes();
    section(w, ABORT, &[&r[..r.len().min(MAX_REPLY as usize)]]).await?;
    w.flush().await
}

pub async fn write_ram<W: AsyncWrite + Unpin>(w: &mut W, first_page: u64, pages: &[u8]) -> std::io::Result<()> {
    section(w, RAM, &[&first_page.to_be_bytes(), &((pages.len() / PAGE) as u32).to_be_bytes(), pages]).await
}

pub async fn write_vcpu<W: AsyncWrite + Unpin>(w: &mut W, id: u32, st: &VcpuState) -> std::io::Result<()> {
    section(w, VCPU, &[&id.to_be_bytes(), &vcpu_bytes(st)]).await
}

pub async fn write_device<W: AsyncWrite + Unpin>(w: &mut W, consumed: u32) -> std::io::Result<()> {
    section(w, DEVICE, &[&consumed.to_be_bytes()]).await
}

pub async fn write_end<W: AsyncWrite + Unpin>(w: &mut W, running: bool) -> std::io::Result<()> {
    section(w, END, &[&[u8::from(running)]]).await?;
    w.flush().await
}

pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<(), StreamError> {
    let mut m = [0u8; 8];
    r.read_exact(&mut m).await?;
    if &m != MAGIC {
        return Err(StreamError::BadMagic);
    }
    let v = r.read_u32().await?;
    if v != VERSION {
        return Err(StreamError::Version(v));
    }
    Ok(())
}

/// Read and check the next section.
pub async fn read_section<R: AsyncRead + Unpin>(r: &mut R) -> Result<Section, StreamError> {
    let tag = r.read_u8().await?;
    let len = r.read_u64().await?;
    let bad = |why: &str| StreamError::BadSection { tag, len, why: why.to_string() };
    if !matches!(tag, HELLO | RAM | VCPU | DEVICE | END | COMMIT | ABORT | KEEPALIVE) {
        return Err(StreamError::UnknownSection(tag));
    }
    if len > MAX_SECTION {
        return Err(bad("too large"));
    }
    let mut p = vec![0u8; len as usize];
    r.read_exact(&mut p).await?;
    let u32_at = |at: usize| p.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |at: usize| {
        p.get(at..at + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_be_bytes(a)
        })
    };
    match tag {
        HELLO if len == 20 => Ok(Section::Hello(Hello {
            memory: u64_at(0).ok_or_else(|| bad("short"))?,
            vcpus: u32_at(8).ok_or_else(|| bad("short"))?,
            disk_size: u64_at(12).ok_or_else(|| bad("short"))?,
        })),
        RAM => {
            let first_page = u64_at(0).ok_or_else(|| bad("short header"))?;
            let count = u32_at(8).ok_or_else(|| bad("short header"))? as usize;
            if len as usize != 12 + count * PAGE {
                return Err(bad("page count does not match the length"));
            }
            Ok(Section::Ram { first_page, data: p[12..].to_vec() })
        }
        VCPU => {
            let id = u32_at(0).ok_or_else(|| bad("short"))?;
            let state = vcpu_from(&p[4..]).map_err(|why| bad(&why))?;
            Ok(Section::Vcpu { id, state: Box::new(state) })
        }
        DEVICE if len == 4 => Ok(Section::Device { consumed: u32_at(0).ok_or_else(|| bad("short"))? }),
        END if len == 1 && p[0] <= 1 => Ok(Section::End { running: p[0] == 1 }),
        COMMIT if len == 0 => Ok(Section::Commit),
        KEEPALIVE if len == 0 => Ok(Section::KeepAlive),
        ABORT if len <= u64::from(MAX_REPLY) => Ok(Section::Abort(String::from_utf8_lossy(&p).into_owned())),
        _ => Err(bad("wrong length")),
    }
}

pub async fn write_reply<W: AsyncWrite + Unpin>(w: &mut W, reply: &Reply) -> std::io::Result<()> {
    let (tag, payload) = match reply {
        Reply::Welcome(targets) => {
            let t: Vec<serde_json::Value> = targets
                .iter()
                .map(|t| serde_json::json!({"node": t.node, "export": t.export, "size": t.size}))
                .collect();
            (REPLY_WELCOME, serde_json::json!({"targets": t}).to_string().into_bytes())
        }
        Reply::Refused(why) => {
            let mut b = why.as_bytes().to_vec();
            b.truncate(MAX_REPLY as usize);
            (REPLY_REFUSED, b)
        }
        Reply::Prepared => (REPLY_PREPARED, Vec::new()),
    };
    // One write: a reply leaves whole or not at all as far as this side can tell.
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(tag);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    w.write_all(&frame).await?;
    w.flush().await
}

fn parse_targets(p: &[u8]) -> Result<Vec<Target>, StreamError> {
    let bad = |why: &str| StreamError::BadReply(format!("WELCOME: {why}"));
    let v: serde_json::Value = serde_json::from_slice(p).map_err(|e| bad(&e.to_string()))?;
    let obj = v.as_object().filter(|o| o.len() == 1).ok_or_else(|| bad("not an object with exactly 'targets'"))?;
    let list = obj.get("targets").and_then(|t| t.as_array()).ok_or_else(|| bad("'targets' is not an array"))?;
    let mut out = Vec::with_capacity(list.len());
    for t in list {
        let o = t.as_object().filter(|o| o.len() == 3).ok_or_else(|| bad("a target is not {node, export, size}"))?;
        let s = |k: &str| {
            o.get(k)
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .ok_or_else(|| bad(&format!("target '{k}' missing or not a string")))
        };
        let size =
            o.get("size").and_then(|v| v.as_u64()).ok_or_else(|| bad("target 'size' missing or not a number"))?;
        out.push(Target { node: s("node")?, export: s("export")?, size });
    }
    Ok(out)
}

/// Read one reply from the return path.
pub async fn read_reply<R: AsyncRead + Unpin>(r: &mut R) -> Result<Reply, StreamError> {
    let tag = r.read_u8().await?;
    let len = r.read_u32().await?;
    if len > MAX_REPLY {
        return Err(StreamError::BadReply(format!("reply {tag} of {len} bytes is too large")));
    }
    let mut p = vec![0u8; len as usize];
    r.read_exact(&mut p).await?;
    match tag {
        REPLY_WELCOME => Ok(Reply::Welcome(parse_targets(&p)?)),
        REPLY_REFUSED => Ok(Reply::Refused(String::from_utf8_lossy(&p).into_owned())),
        REPLY_PREPARED if len == 0 => Ok(Reply::Prepared),
        other => Err(StreamError::BadReply(format!("unknown reply {other} of {len} bytes"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().build().unwrap()
    }

    async fn parse_all(bytes: &[u8]) -> Result<Vec<Section>, StreamError> {
        let mut r = bytes;
        read_header(&mut r).await?;
        let mut out = Vec::new();
        loop {
            let s = read_section(&mut r).await?;
            let end = matches!(s, Section::End { .. });
            out.push(s);
            if end {
                return Ok(out);
            }
        }
    }

    #[test]
    fn a_well_formed_stream_round_trips_and_every_truncation_fails() {
        rt().block_on(async {
            let mut w = Vec::new();
            write_header(&mut w).await.unwrap();
            write_hello(&mut w, &Hello { memory: 64 << 20, vcpus: 1, disk_size: 1 << 20 }).await.unwrap();
            write_ram(&mut w, 3, &[7u8; 2 * PAGE]).await.unwrap();
            write_device(&mut w, 42).await.unwrap();
            write_end(&mut w, true).await.unwrap();
            let s = parse_all(&w).await.unwrap();
            assert!(matches!(s[1], Section::Ram { first_page: 3, ref data } if data.len() == 2 * PAGE));
            assert!(matches!(s[2], Section::Device { consumed: 42 }));
            for cut in [0, 5, 12, 20, w.len() / 2, w.len() - 1] {
                assert!(parse_all(&w[..cut]).await.is_err(), "truncated at {cut}");
            }
            let mut bad = w.clone();
            bad[12] = 99; // the first section's tag
            assert!(matches!(parse_all(&bad).await, Err(StreamError::UnknownSection(99))));
        });
    }

    #[test]
    fn replies_round_trip_and_bad_ones_are_named() {
        rt().block_on(async {
            let targets = vec![Target { node: "disk".into(), export: "e".into(), size: 4096 }];
            for reply in
                [Reply::Welcome(targets.clone()), Reply::Refused("no".into()), Reply::Prepared, Reply::Welcome(vec![])]
            {
                let mut w = Vec::new();
                write_reply(&mut w, &reply).await.unwrap();
                assert_eq!(read_reply(&mut &w[..]).await.unwrap(), reply);
                for cut in 0..w.len() {
                    assert!(read_reply(&mut &w[..cut]).await.is_err());
                }
            }
            let mut w = vec![REPLY_WELCOME];
            let body = br#"{"targets": [{"node": "d", "export": "e"}]}"#;
            w.extend_from_slice(&(body.len() as u32).to_be_bytes());
            w.extend_from_slice(body);
            assert!(matches!(read_reply(&mut &w[..]).await, Err(StreamError::BadReply(m)) if m.contains("target")));
            let w = [9u8, 0, 0, 0, 0];
            assert!(
                matches!(read_reply(&mut &w[..]).await, Err(StreamError::BadReply(m)) if m.contains("unknown reply 9"))
            );
        });
    }

    /// A vCPU state where every field differs from its neighbours: a field
    /// swapped, dropped or shifted in the encoding shows up.
    fn odd_vcpu_state() -> VcpuState {
        let seg = |n: u64| kvm_bindings::kvm_segment {
            base: 0x1000_0000_0000 + n,
            limit: 0xffff_0000 + n as u32,
            selector: 0x8 * n as u16,
            type_: 0xb,
            present: 1,
            dpl: 3,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 1,
            unusable: 0,
            padding: 0,
        };
        let regs = kvm_bindings::kvm_regs {
            rax: 1,
            rbx: 2,
            rcx: 3,
            rdx: 4,
            rsi: 5,
            rdi: 6,
            rsp: 0x7fff_0000,
            rbp: 8,
            r8: 9,
            r9: 10,
            r10: 11,
            r11: 12,
            r12: 13,
            r13: 14,
            r14: 15,
            r15: u64::MAX,
            rip: 0x10_0000,
            rflags: 0x202,
        };
        let sregs = kvm_bindings::kvm_sregs {
            cs: seg(1),
            ds: seg(2),
            es: seg(3),
            fs: seg(4),
            gs: seg(5),
            ss: seg(6),
            tr: seg(7),
            ldt: seg(8),
            gdt: kvm_bindings::kvm_dtable { base: 0xfee0_0000, limit: 0x27, padding: [0; 3] },
            idt: kvm_bindings::kvm_dtable { base: 0xfed0_0000, limit: 0xfff, padding: [0; 3] },
            cr0: 0x8005_0033,
            cr2: 0xdead_beef,
            cr3: 0x1234_5000,
            cr4: 0x6f0,
            cr8: 0xf,
            efer: 0xd01,
            apic_base: 0xfee0_0900,
            interrupt_bitmap: [1 << 32, 0, 1 << 63, 0x5555],
        };
        VcpuState { regs, sregs }
    }

    #[test]
    fn a_vcpu_state_round_trips_field_by_field() {
        rt().block_on(async {
            let st = odd_vcpu_state();
            let mut w = Vec::new();
            write_header(&mut w).await.unwrap();
            write_vcpu(&mut w, 2, &st).await.unwrap();
            write_end(&mut w, false).await.unwrap();
            assert_eq!(w.len(), 12 + 9 + 4 + VCPU_STATE_LEN + 9 + 1);
            // The layout is the format's, not this build's: spot-check it.
            let state_bytes = &w[12 + 9 + 4..][..VCPU_STATE_LEN];
            assert_eq!(state_bytes[16 * 8..17 * 8], st.regs.rip.to_le_bytes());
            assert_eq!(state_bytes[18 * 8..19 * 8], st.sregs.cs.base.to_le_bytes());
            assert_eq!(state_bytes[VCPU_STATE_LEN - 8..], st.sregs.interrupt_bitmap[3].to_le_bytes());
            let s = parse_all(&w).await.unwrap();
            let Section::Vcpu { id: 2, state } = &s[0] else { panic!("{:?}", s[0]) };
            assert_eq!(state.regs, st.regs);
            assert_eq!(state.sregs, st.sregs);
            // Every truncation, and a section one byte too long, fails by name.
            for cut in 12..w.len() - 10 {
                assert!(parse_all(&w[..cut]).await.is_err(), "truncated at {cut}");
            }
            for delta in [-1i64, 1] {
                let mut bad = Vec::new();
                write_header(&mut bad).await.unwrap();
                let body = (4 + VCPU_STATE_LEN as i64 + delta) as usize;
                bad.push(VCPU);
                bad.extend_from_slice(&(body as u64).to_be_bytes());
                bad.resize(bad.len() + body, 0);
                let e = parse_all(&bad).await.unwrap_err();
                assert!(
                    matches!(&e, StreamError::BadSection { tag: VCPU, why, .. } if why.contains("vCPU state of")),
                    "{e}"
                );
            }
        });
    }

    proptest::proptest! {
        #[test]
        fn hostile_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let mut v = MAGIC.to_vec();
            v.extend_from_slice(&VERSION.to_be_bytes());
            v.extend_from_slice(&bytes);
            let _ = rt().block_on(parse_all(&v));
            let _ = rt().block_on(parse_all(&bytes));
            let _ = rt().block_on(read_reply(&mut &bytes[..]));
        }
    }
}
