//! The migration stream: a header, then typed, length-prefixed sections
//! from the source; short replies from the destination on the same
//! connection (its return path). Format 2 is the two-phase handover.
//!
//! ```text
//!  source -> destination
//!  "BATONMIG" format:u32
//!  section: tag:u8 len:u64 payload[len]
//!    1 HELLO   memory:u64 vcpus:u32 disk_size:u64   (first, exactly once)
//!    2 RAM     first_page:u64 count:u32 pages[count * 4096]
//!    3 VCPU    id:u32 kvm_regs kvm_sregs        (this build's layouts)
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
pub const VERSION: u32 = 2;
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

const REGS: usize = std::mem::size_of::<kvm_bindings::kvm_regs>();
const SREGS: usize = std::mem::size_of::<kvm_bindings::kvm_sregs>();

fn vcpu_bytes(st: &VcpuState) -> Vec<u8> {
    let mut v = Vec::with_capacity(REGS + SREGS);
    // SAFETY: kvm_regs and kvm_sregs are plain C structs of integers with no
    // padding-dependent invariants; reading their bytes is sound.
    unsafe {
        v.extend_from_slice(std::slice::from_raw_parts(std::ptr::addr_of!(st.regs).cast::<u8>(), REGS));
        v.extend_from_slice(std::slice::from_raw_parts(std::ptr::addr_of!(st.sregs).cast::<u8>(), SREGS));
    }
    v
}

fn vcpu_from(b: &[u8]) -> Option<VcpuState> {
    if b.len() != REGS + SREGS {
        return None;
    }
    // SAFETY: the lengths match the structs exactly, the reads are unaligned
    // reads of plain integer structs, and every bit pattern is a valid value.
    unsafe {
        let regs = std::ptr::read_unaligned(b.as_ptr().cast::<kvm_bindings::kvm_regs>());
        let sregs = std::ptr::read_unaligned(b[REGS..].as_ptr().cast::<kvm_bindings::kvm_sregs>());
        Some(VcpuState { regs, sregs })
    }
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
            let state = vcpu_from(&p[4..]).ok_or_else(|| bad("vCPU state of another layout"))?;
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
