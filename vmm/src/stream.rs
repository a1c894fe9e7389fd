//! The migration stream: a header, then typed, length-prefixed, checksummed
//! sections from the source; short replies, framed the same way, from the
//! destination on the same connection (its return path). Format 2 is the
//! two-phase handover; format 3 encodes the vCPU state field by field;
//! format 4 checksums every section and reply (CRC32C), names this build's
//! layouts in HELLO (a hash of [`layout_description`]) and sends an all-zero
//! RAM page as a one-byte marker; its VCPU section (version 2) carries the
//! whole vCPU (registers, XSAVE, XCRs, MSRs, local APIC, events, debug
//! registers, MP state) and KVMCLOCK the VM's KVM clock. Integers are
//! big-endian but for the vCPU state, which is little-endian (x86's own order).
//!
//! ```text
//!  source -> destination
//!  "BATONMIG" format:u32
//!  section: tag:u8 version:u8 len:u64 hcrc:u32 payload[len] pcrc:u32
//!           hcrc = CRC32C(tag version len)
//!           pcrc = CRC32C(tag version len hcrc payload)
//!    1 HELLO   memory:u64 vcpus:u32 disk_size:u64 layout:u64 flags:u8   (first, exactly once;
//!              flags bit 0: storage copy, the destination exports its disks itself;
//!              bit 1: the guest has a lease, and then follow
//!              key_len:u8 key owner_len:u8 owner generation:u64: its key, the
//!              source's name in the lease store, and the generation it holds)
//!    2 RAM     first_page:u64 count:u32 count * (0 | 1 page[4096])
//!              (0: the page is all zeroes, no payload follows; 1: its bytes follow)
//!    3 VCPU    id:u32 state[VCPU_STATE_LEN]      (once per vCPU; field by field, see
//!              vcpu_bytes and VCPU_FIELDS; v2: regs+sregs[436] xsave[4096] xcrs[200]
//!              msrs[9 * MIGRATED_MSRS.len(): present:u8 value:u64 per slot]
//!              lapic[1024] events[37] debugregs[56] mp_state[4]; fixed lengths)
//!    4 DEVICE  consumed:u32
//!    6 KVMCLOCK clock:u64                       (KVM_GET_CLOCK's ns; exactly once)
//!    255 END   running:u8                       (the guest ran when the source stopped it)
//!    7 COMMIT  [generation:u64]                 (after PREPARED: the decision; with a lease,
//!              the generation the lease moved to the destination at)
//!    8 ABORT   reason (utf-8)                   (any time before COMMIT)
//!    9 KEEPALIVE (empty)                        (while the source waits at pre-switchover)
//!   10 BITMAPS node_len:u8 node[node_len] bitmap_len:u8 bitmap[bitmap_len]
//!              granularity:u32 flags:u8 size:u64 first:u64 count:u32 kind:u8 (kind 1: bytes[count])
//!              (a dirty bitmap's bits, or part of them: bytes first..first+count of
//!              its bits, LSB first; kind 0: those bytes are zero and none follow;
//!              flags: 1 enabled, 2 persistent, the rest zero; only with
//!              capability dirty-bitmaps, after the nodes went inactive, before END)
//!   11 SYNC    (empty)                          (end of pre-copy: answer once all before it is applied)
//!
//!  destination -> source (the return path)
//!  reply: tag:u8 len:u32 hcrc:u32 payload[len] pcrc:u32   (CRCs as for sections)
//!    1 WELCOME   JSON {"targets": [{"node", "export", "size"[, "unix" | "port"]}]
//!                      [, "lease": {"key", "owner"}]}   (with a lease: the destination's name)
//!                (answer to HELLO: the destination's disks that are incoming mirror
//!                targets; with storage copy, each on the NBD server it opened for
//!                this attempt: a unix socket's path, or a TCP port on the host the
//!                source reached it at)
//!    2 REFUSED   reason (utf-8)                  (the attempt is over; why)
//!    3 PREPARED  (empty)                         (everything arrived and is loaded)
//!    5 SYNCED    (empty)                         (answer to SYNC: everything before it is in RAM)
//!    4 COMMITTED (empty)                         (COMMIT taken: the guest is the
//!                destination's; for the source's record and its downtime)
//! ```
//!
//! The header CRC is checked before the payload is read, so a damaged
//! length is caught before the reader waits for bytes that never come.
//! Every section's version is this build's (see [`SECTIONS`]); HELLO's
//! layout hash lets the destination refuse a build with other layouts
//! before any RAM moves.
//!
//! I9: anything unknown, truncated, damaged or inconsistent fails the
//! incoming side with an error that says what and where; nothing is skipped.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::vcpu::{VcpuState, MIGRATED_MSRS};

pub const MAGIC: &[u8; 8] = b"BATONMIG";
/// The stream format this build speaks. Two builds that speak the same
/// format (and the same [`layout_hash`]) migrate freely in both directions.
/// Format 3 encodes a vCPU's registers field by field (format 2 sent this
/// build's in-memory struct layouts); format 4 checksums every section and
/// reply, carries the layout hash in HELLO and sends zero pages as markers.
pub const VERSION: u32 = 4;
pub const PAGE: usize = 4096;

pub const HELLO: u8 = 1;
pub const RAM: u8 = 2;
pub const VCPU: u8 = 3;
pub const DEVICE: u8 = 4;
pub const KVMCLOCK: u8 = 6;
pub const END: u8 = 255;
pub const COMMIT: u8 = 7;
/// HELLO flags.
pub const HELLO_STORAGE: u8 = 1;
pub const HELLO_LEASE: u8 = 2;
pub const ABORT: u8 = 8;
pub const KEEPALIVE: u8 = 9;
pub const BITMAPS: u8 = 10;
pub const SYNC: u8 = 11;

pub const REPLY_WELCOME: u8 = 1;
pub const REPLY_REFUSED: u8 = 2;
pub const REPLY_PREPARED: u8 = 3;
pub const REPLY_COMMITTED: u8 = 4;
pub const REPLY_SYNCED: u8 = 5;
/// Largest reply accepted.
pub const MAX_REPLY: u32 = 64 << 10;

/// Largest RAM run in one section, in pages (16 MiB).
pub const MAX_RUN: usize = (16 << 20) / PAGE;
/// Largest section payload accepted (a RAM run of 16 MiB with its markers and header).
pub const MAX_SECTION: u64 = (MAX_RUN * (PAGE + 1) + 12) as u64;
/// A section's framing: tag, version, length, header CRC.
pub const SECTION_HEADER_LEN: usize = 1 + 1 + 8 + 4;
/// A reply's framing: tag, length, header CRC.
pub const REPLY_HEADER_LEN: usize = 1 + 4 + 4;
/// A RAM page's marker: all zeroes, no bytes follow.
pub const PAGE_ZERO: u8 = 0;
/// A RAM page's marker: its 4096 bytes follow.
pub const PAGE_DATA: u8 = 1;

/// One section's or reply's wire layout, as the layout hash sees it.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub tag: u8,
    pub name: &'static str,
    /// The section's version (sent in its header); replies have none.
    pub version: u8,
    /// The payload's fields, in order.
    pub fields: &'static str,
}

/// Every section this build reads and writes: the one place their layouts
/// are described. Change a section's encoding, change its line here (and
/// the layout hash changes with it).
pub const SECTIONS: &[Layout] = &[
    Layout {
        tag: HELLO,
        name: "HELLO",
        version: 3,
        fields: "memory:u64be vcpus:u32be disk_size:u64be layout:u64be flags:u8(bit 0: storage copy, bit 1: \
                 lease) [lease: key_len:u8 key owner_len:u8 owner generation:u64be]",
    },
    Layout {
        tag: RAM,
        name: "RAM",
        version: 1,
        fields: "first_page:u64be count:u32be count*(marker:u8 0=zero|1=data page[PAGE])",
    },
    Layout { tag: VCPU, name: "VCPU", version: 2, fields: "id:u32be state[VCPU_STATE_LEN]" },
    Layout { tag: KVMCLOCK, name: "KVMCLOCK", version: 1, fields: "clock:u64be" },
    Layout { tag: DEVICE, name: "DEVICE", version: 1, fields: "consumed:u32be" },
    Layout { tag: END, name: "END", version: 1, fields: "running:u8(0|1)" },
    Layout { tag: COMMIT, name: "COMMIT", version: 2, fields: "[generation:u64be]" },
    Layout { tag: ABORT, name: "ABORT", version: 1, fields: "reason:utf8[<=MAX_REPLY]" },
    Layout { tag: KEEPALIVE, name: "KEEPALIVE", version: 1, fields: "" },
    Layout { tag: BITMAPS, name: "BITMAPS", version: 1, fields: BITMAP_FIELDS },
    Layout { tag: SYNC, name: "SYNC", version: 1, fields: "" },
];

/// A BITMAPS section's fields (see the module doc).
pub const BITMAP_FIELDS: &str = "node_len:u8 node:utf8[node_len] bitmap_len:u8 bitmap:utf8[bitmap_len] \
     granularity:u32be flags:u8(1=enabled 2=persistent) size:u64be first:u64be count:u32be[<=MAX_BITMAP_CHUNK] \
     kind:u8(0=zeroes|1=data bytes[count], bit i of the bitmap = bit i%8 of byte i/8)";
/// Most bytes of bits in one BITMAPS section (8 Mi bits): a bigger bitmap
/// goes in several, in order.
pub const MAX_BITMAP_CHUNK: u32 = 1 << 20;
// The largest BITMAPS section (two names of 255 bytes, their lengths, the fixed fields) fits.
const _: () = assert!(MAX_BITMAP_CHUNK as u64 + 2 * 256 + 26 <= MAX_SECTION);
/// BITMAPS flags: the bitmap records writes (QEMU's `recording`).
pub const BITMAP_ENABLED: u8 = 1;
/// BITMAPS flags: the bitmap is persistent.
pub const BITMAP_PERSISTENT: u8 = 2;
/// A BITMAPS chunk's kind: its bytes are all zero, none follow.
pub const CHUNK_ZEROES: u8 = 0;
/// A BITMAPS chunk's kind: its bytes follow.
pub const CHUNK_DATA: u8 = 1;

/// Every reply on the return path.
pub const REPLIES: &[Layout] = &[
    Layout {
        tag: REPLY_WELCOME,
        name: "WELCOME",
        version: 0,
        fields: "json{targets:[{node:str,export:str,size:u64[,unix:str|port:u16]}]}",
    },
    Layout { tag: REPLY_REFUSED, name: "REFUSED", version: 0, fields: "reason:utf8[<=MAX_REPLY]" },
    Layout { tag: REPLY_PREPARED, name: "PREPARED", version: 0, fields: "" },
    Layout { tag: REPLY_COMMITTED, name: "COMMITTED", version: 0, fields: "" },
    Layout { tag: REPLY_SYNCED, name: "SYNCED", version: 0, fields: "" },
];

/// The vCPU state's fields, in the order [`vcpu_bytes`] writes them.
pub const VCPU_FIELDS: &str =
    "le; regs: rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags :u64; \
     sregs: cs ds es fs gs ss tr ldt :segment(base:u64 limit:u32 selector:u16 \
     type present dpl db s l g avl unusable :u8); gdt idt :dtable(base:u64 limit:u16); \
     cr0 cr2 cr3 cr4 cr8 efer apic_base :u64; interrupt_bitmap:4*u64; \
     xsave:1024*u32 (KVM_GET_XSAVE's region; without XSAVE, KVM_GET_FPU in FXSAVE layout, XSTATE_BV=3); \
     xcrs: nr_xcrs:u32(<=16) flags:u32 16*(xcr:u32 value:u64); \
     msrs: MSRS*(present:u8(0|1) value:u64); lapic:1024*u8; \
     events: exception(injected nr has_error_code pending :u8 error_code:u32) \
     interrupt(injected nr soft shadow :u8) nmi(injected pending masked :u8) sipi_vector:u32 flags:u32 \
     smi(smm pending smm_inside_nmi latched_init :u8) triple_fault_pending:u8 exception_has_payload:u8 \
     exception_payload:u64; debugregs: db0 db1 db2 db3 dr6 dr7 flags :u64; mp_state:u32";

/// The vCPU state's parts and their fixed lengths, in order.
pub const VCPU_PARTS: &[(&str, usize)] = &[
    ("regs+sregs", CORE_LEN),
    ("xsave", crate::vcpu::XSAVE_LEN),
    ("xcrs", XCRS_LEN),
    ("msrs", MSRS_LEN),
    ("lapic", LAPIC_LEN),
    ("events", EVENTS_LEN),
    ("debugregs", DEBUGREGS_LEN),
    ("mp_state", 4),
];

/// The MSR slots of the vCPU state, as the layout hash sees them.
fn msr_description() -> String {
    let names: Vec<String> = MIGRATED_MSRS.iter().map(|(i, n)| format!("{i:#x}={n}")).collect();
    names.join(" ")
}

/// The canonical description of this build's stream layouts: the framing,
/// every section's tag, version and fields, the vCPU state, the replies.
pub fn layout_description() -> String {
    let mut s = format!(
        "baton migration format {VERSION}; section tag:u8 version:u8 len:u64be hcrc:u32be payload pcrc:u32be; \
         reply tag:u8 len:u32be hcrc:u32be payload pcrc:u32be; crc32c; PAGE={PAGE}; MAX_RUN={MAX_RUN}; \
         MAX_SECTION={MAX_SECTION}; MAX_REPLY={MAX_REPLY}; VCPU_STATE_LEN={VCPU_STATE_LEN} \
         SEGMENT_LEN={SEGMENT_LEN} DTABLE_LEN={DTABLE_LEN} ({VCPU_FIELDS}); VCPU_PARTS={VCPU_PARTS:?}; \
         MSRS=[{}]",
        msr_description()
    );
    for (kind, table) in [("section", SECTIONS), ("reply", REPLIES)] {
        for l in table {
            s.push_str(&format!("; {kind} {} {} v{}: {}", l.tag, l.name, l.version, l.fields));
        }
    }
    s
}

/// This build's layout identity: 64-bit FNV-1a of [`layout_description`].
pub fn layout_hash() -> u64 {
    layout_description()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn layout_of(tag: u8) -> Option<&'static Layout> {
    SECTIONS.iter().find(|l| l.tag == tag)
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("i/o on the migration stream")]
    Io(#[from] std::io::Error),
    #[error("not a baton migration stream (bad magic)")]
    BadMagic,
    #[error("migration stream version {0} is not supported (this build speaks {VERSION})")]
    Version(u32),
    #[error("section header: checksum mismatch (its tag, version or length is damaged)")]
    HeaderChecksum,
    #[error("unknown section tag {0}")]
    UnknownSection(u8),
    #[error("{} section: version {version} is not supported (this build reads version {ours})", tag_name(*.tag))]
    SectionVersion { tag: u8, version: u8, ours: u8 },
    #[error("{} section of {len} bytes: payload checksum mismatch", tag_name(*.tag))]
    PayloadChecksum { tag: u8, len: u64 },
    #[error("{} section of {len} bytes: {why}", tag_name(*.tag))]
    BadSection { tag: u8, len: u64, why: String },
    #[error(
        "the stream layouts differ: the source's layout hash is {theirs:#018x}, this build's {ours:#018x} \
         (same format {VERSION}, other section layouts)"
    )]
    LayoutMismatch { theirs: u64, ours: u64 },
    #[error("bad reply from the destination: {0}")]
    BadReply(String),
}

/// One decoded section.
#[derive(Debug)]
pub enum Section {
    Hello(Hello),
    /// Pages from `first_page` on.
    Ram(RamRun),
    Vcpu {
        id: u32,
        state: Box<VcpuState>,
    },
    Device {
        consumed: u32,
    },
    /// The VM's KVM clock.
    KvmClock {
        clock: u64,
    },
    /// The end marker; `running`: the guest was running before the
    /// switchover (the destination runs it after COMMIT only then, as QEMU).
    End {
        running: bool,
    },
    /// The decision; with a lease, the generation it moved to the destination at.
    Commit {
        generation: Option<u64>,
    },
    Abort(String),
    KeepAlive,
    /// Part (or all) of a dirty bitmap's bits.
    Bitmap(BitmapChunk),
    /// Answer SYNCED once everything before it is applied.
    Sync,
}

/// What a BITMAPS section says of its bitmap: the same in every section
/// that carries part of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapMeta {
    /// The node's alias (its name when no mapping is set); 1..=255 bytes.
    pub node: String,
    /// The bitmap's alias (its name when no mapping is set); 1..=255 bytes.
    pub bitmap: String,
    /// Bytes of disk per bit.
    pub granularity: u32,
    pub enabled: bool,
    pub persistent: bool,
    /// Bytes of disk the bitmap covers: it has `size.div_ceil(granularity)` bits.
    pub size: u64,
}

impl BitmapMeta {
    /// Bytes of bits of the whole bitmap.
    pub fn byte_len(&self) -> u64 {
        self.size.div_ceil(u64::from(self.granularity.max(1))).div_ceil(8)
    }
}

/// One BITMAPS section: bytes `first..first + bits.len()` of a bitmap's bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapChunk {
    pub meta: BitmapMeta,
    pub first: u64,
    pub bits: Vec<u8>,
}

/// A section tag's name, for messages.
pub fn tag_name(tag: u8) -> String {
    match layout_of(tag) {
        Some(l) => l.name.into(),
        None => format!("type {tag}"),
    }
}

impl Section {
    /// The section's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Section::Hello(_) => "HELLO",
            Section::Ram(_) => "RAM",
            Section::Vcpu { .. } => "VCPU",
            Section::Device { .. } => "DEVICE",
            Section::KvmClock { .. } => "KVMCLOCK",
            Section::End { .. } => "END",
            Section::Commit { .. } => "COMMIT",
            Section::Abort(_) => "ABORT",
            Section::KeepAlive => "KEEPALIVE",
            Section::Bitmap(_) => "BITMAPS",
            Section::Sync => "SYNC",
        }
    }
}

/// A RAM section's pages as they came: a zero page (sent as a marker) is
/// only a flag, never 4 KiB of zeroes to allocate, fill and scan again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamRun {
    pub first_page: u64,
    /// Per page of the run: true if it is all zeroes.
    pub zero: Vec<bool>,
    /// The other pages' bytes, in order.
    pub data: Vec<u8>,
}

impl RamRun {
    /// Each page in order: None for a zero page, else its bytes.
    pub fn pages(&self) -> impl Iterator<Item = Option<&[u8]>> {
        let mut data = self.data.chunks_exact(PAGE);
        self.zero.iter().map(move |&z| if z { None } else { data.next() })
    }

    /// Every page's bytes, zero pages as zeroes.
    pub fn expand(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.zero.len() * PAGE);
        for p in self.pages() {
            match p {
                Some(p) => out.extend_from_slice(p),
                None => out.resize(out.len() + PAGE, 0),
            }
        }
        out
    }
}

/// The guest's lease as HELLO carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloLease {
    pub key: String,
    /// The source's name in the lease store.
    pub owner: String,
    /// The generation the source holds.
    pub generation: u64,
}

/// What the source says of the guest before any RAM moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub memory: u64,
    pub vcpus: u32,
    pub disk_size: u64,
    /// The sender's [`layout_hash`].
    pub layout: u64,
    /// Storage copy (`x-baton-storage: copy`): the destination exports its
    /// disks for this attempt and says where in WELCOME.
    pub storage: bool,
    /// The guest's lease, if it has one.
    pub lease: Option<HelloLease>,
}

impl Hello {
    /// Refuse a sender whose layouts are not this build's.
    pub fn check_layout(&self) -> Result<(), StreamError> {
        let ours = layout_hash();
        if self.layout != ours {
            return Err(StreamError::LayoutMismatch { theirs: self.layout, ours });
        }
        Ok(())
    }
}

/// A reply on the return path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// HELLO accepted; the destination's incoming mirror targets.
    Welcome(Welcome),
    Refused(String),
    Prepared,
    /// COMMIT taken.
    Committed,
    /// Everything before SYNC is applied.
    Synced,
}

/// WELCOME: the destination's disks, and its name in the lease store.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Welcome {
    pub targets: Vec<Target>,
    /// With a lease: (key, the destination's owner name).
    pub lease: Option<(String, String)>,
}

/// A destination disk exported writable for the source's mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The destination's node (for messages).
    pub node: String,
    /// The NBD export name the source's `nbd` node must connect to.
    pub export: String,
    pub size: u64,
    /// Where the export is served, when the destination opened a server
    /// for this attempt (storage copy); None: the management's server.
    pub at: Option<TargetAt>,
}

/// Where a destination serves an export it made for a storage copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetAt {
    /// A unix socket's path (on the destination's host, which the
    /// source shares when it reached the migration socket by path).
    Unix(String),
    /// A TCP port on the host the source reached the migration at.
    Port(u16),
}

/// The bytes of a vCPU's state in a VCPU section (after its id): the sum of [`VCPU_PARTS`].
pub const VCPU_STATE_LEN: usize =
    CORE_LEN + crate::vcpu::XSAVE_LEN + XCRS_LEN + MSRS_LEN + LAPIC_LEN + EVENTS_LEN + DEBUGREGS_LEN + 4;
/// kvm_regs and kvm_sregs (format 3's whole vCPU state).
const CORE_LEN: usize = 18 * 8 + 8 * SEGMENT_LEN + 2 * DTABLE_LEN + 7 * 8 + 4 * 8;
/// nr_xcrs, flags, 16 slots of (xcr:u32 value:u64).
const XCRS_LEN: usize = 4 + 4 + 16 * 12;
/// One slot per MIGRATED_MSRS entry: present:u8 value:u64.
const MSRS_LEN: usize = MIGRATED_MSRS.len() * 9;
const LAPIC_LEN: usize = 1024;
/// exception 8, interrupt 4, nmi 3, sipi_vector 4, flags 4, smi 4, triple_fault 1, payload 1 + 8.
const EVENTS_LEN: usize = 8 + 4 + 3 + 4 + 4 + 4 + 1 + 1 + 8;
/// db0..db3, dr6, dr7, flags.
const DEBUGREGS_LEN: usize = 7 * 8;
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
/// interrupt bitmap); then (VCPU v2) the XSAVE region, the XCRs, one slot
/// per [`MIGRATED_MSRS`] entry, the local APIC's page, the pending events,
/// the debug registers, the MP state ([`VCPU_FIELDS`]). Padding and
/// reserved fields are not sent; an MSR that is not one of
/// [`MIGRATED_MSRS`] cannot be.
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
    for w in st.xsave.iter() {
        e.u32(*w);
    }
    e.u32(st.xcrs.nr_xcrs);
    e.u32(st.xcrs.flags);
    for x in &st.xcrs.xcrs {
        e.u32(x.xcr);
        e.u64(x.value);
    }
    for (index, _) in MIGRATED_MSRS {
        match st.msr(*index) {
            Some(v) => {
                e.u8(1);
                e.u64(v);
            }
            None => {
                e.u8(0);
                e.u64(0);
            }
        }
    }
    for c in st.lapic.regs {
        e.u8(c as u8);
    }
    let ev = &st.events;
    for b in [ev.exception.injected, ev.exception.nr, ev.exception.has_error_code, ev.exception.pending] {
        e.u8(b);
    }
    e.u32(ev.exception.error_code);
    for b in [ev.interrupt.injected, ev.interrupt.nr, ev.interrupt.soft, ev.interrupt.shadow] {
        e.u8(b);
    }
    for b in [ev.nmi.injected, ev.nmi.pending, ev.nmi.masked] {
        e.u8(b);
    }
    e.u32(ev.sipi_vector);
    e.u32(ev.flags);
    for b in [ev.smi.smm, ev.smi.pending, ev.smi.smm_inside_nmi, ev.smi.latched_init] {
        e.u8(b);
    }
    e.u8(ev.triple_fault.pending);
    e.u8(ev.exception_has_payload);
    e.u64(ev.exception_payload);
    let d = &st.debugregs;
    for v in [d.db[0], d.db[1], d.db[2], d.db[3], d.dr6, d.dr7, d.flags] {
        e.u64(v);
    }
    e.u32(st.mp_state.mp_state);
    e.0
}

/// Decode [`vcpu_bytes`]; `Err` says why the bytes are not a vCPU state.
fn vcpu_from(b: &[u8]) -> Result<VcpuState, String> {
    if b.len() != VCPU_STATE_LEN {
        let parts: Vec<String> = VCPU_PARTS.iter().map(|(n, l)| format!("{n} {l}")).collect();
        return Err(format!(
            "vCPU state of {} bytes (format {VERSION} has {VCPU_STATE_LEN}: {})",
            b.len(),
            parts.join(", ")
        ));
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
    let mut xsave = Box::new([0u32; crate::vcpu::XSAVE_LEN / 4]);
    for w in xsave.iter_mut() {
        *w = d.u32();
    }
    let mut xcrs = kvm_bindings::kvm_xcrs { nr_xcrs: d.u32(), flags: d.u32(), ..Default::default() };
    for x in xcrs.xcrs.iter_mut() {
        x.xcr = d.u32();
        x.value = d.u64();
    }
    if xcrs.nr_xcrs as usize > xcrs.xcrs.len() {
        return Err(format!("{} XCRs, more than {}", xcrs.nr_xcrs, xcrs.xcrs.len()));
    }
    let mut msrs = Vec::new();
    for (index, name) in MIGRATED_MSRS {
        let (present, data) = (d.u8(), d.u64());
        match present {
            0 if data == 0 => {}
            0 => return Err(format!("MSR {name} is absent but has a value")),
            1 => msrs.push(kvm_bindings::kvm_msr_entry { index: *index, data, ..Default::default() }),
            p => return Err(format!("MSR {name}: presence {p} is neither 0 nor 1")),
        }
    }
    let mut lapic = kvm_bindings::kvm_lapic_state { regs: [0; 1024] };
    for c in lapic.regs.iter_mut() {
        *c = d.u8() as std::os::raw::c_char;
    }
    let mut events = kvm_bindings::kvm_vcpu_events::default();
    let ex = &mut events.exception;
    (ex.injected, ex.nr, ex.has_error_code, ex.pending, ex.error_code) = (d.u8(), d.u8(), d.u8(), d.u8(), d.u32());
    let int = &mut events.interrupt;
    (int.injected, int.nr, int.soft, int.shadow) = (d.u8(), d.u8(), d.u8(), d.u8());
    let nmi = &mut events.nmi;
    (nmi.injected, nmi.pending, nmi.masked) = (d.u8(), d.u8(), d.u8());
    (events.sipi_vector, events.flags) = (d.u32(), d.u32());
    let smi = &mut events.smi;
    (smi.smm, smi.pending, smi.smm_inside_nmi, smi.latched_init) = (d.u8(), d.u8(), d.u8(), d.u8());
    events.triple_fault.pending = d.u8();
    (events.exception_has_payload, events.exception_payload) = (d.u8(), d.u64());
    let debugregs = kvm_bindings::kvm_debugregs {
        db: [d.u64(), d.u64(), d.u64(), d.u64()],
        dr6: d.u64(),
        dr7: d.u64(),
        flags: d.u64(),
        ..Default::default()
    };
    let mp_state = kvm_bindings::kvm_mp_state { mp_state: d.u32() };
    Ok(VcpuState { regs, sregs, xsave, xcrs, msrs, lapic, events, debugregs, mp_state })
}

pub async fn write_header<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    w.write_all(MAGIC).await?;
    w.write_u32(VERSION).await
}

/// A whole section as it goes on the wire, with this build's version of
/// `tag` (1 for a tag this build does not know): header, header CRC,
/// payload, payload CRC. For tools and tests that build streams by hand too.
pub fn section_bytes(tag: u8, payload: &[u8]) -> Vec<u8> {
    section_bytes_versioned(tag, layout_of(tag).map_or(1, |l| l.version), payload)
}

/// [`section_bytes`] with the version given.
pub fn section_bytes_versioned(tag: u8, version: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(SECTION_HEADER_LEN + payload.len() + 4);
    b.push(tag);
    b.push(version);
    b.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    let hcrc = crc32c::crc32c(&b);
    b.extend_from_slice(&hcrc.to_be_bytes());
    b.extend_from_slice(payload);
    let pcrc = crc32c::crc32c(&b);
    b.extend_from_slice(&pcrc.to_be_bytes());
    b
}

/// A whole reply as it goes on the wire.
pub fn reply_bytes(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(REPLY_HEADER_LEN + payload.len() + 4);
    b.push(tag);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    let hcrc = crc32c::crc32c(&b);
    b.extend_from_slice(&hcrc.to_be_bytes());
    b.extend_from_slice(payload);
    let pcrc = crc32c::crc32c(&b);
    b.extend_from_slice(&pcrc.to_be_bytes());
    b
}

/// Whether [`write_ram`] sends an all-zero page as a one-byte marker.
pub const ZERO_PAGE_MARKERS: bool = true;

/// A RAM section's payload; with `zero_markers`, every all-zero page
/// becomes a marker (else every page goes with its bytes).
pub fn ram_payload(first_page: u64, pages: &[u8], zero_markers: bool) -> Vec<u8> {
    let count = pages.len() / PAGE;
    let mut b = Vec::with_capacity(12 + count * (PAGE + 1));
    b.extend_from_slice(&first_page.to_be_bytes());
    b.extend_from_slice(&(count as u32).to_be_bytes());
    for page in pages.chunks_exact(PAGE) {
        if zero_markers && crate::memory::is_zero(page) {
            b.push(PAGE_ZERO);
        } else {
            b.push(PAGE_DATA);
            b.extend_from_slice(page);
        }
    }
    b
}

async fn section<W: AsyncWrite + Unpin>(w: &mut W, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    w.write_all(&section_bytes(tag, payload)).await
}

pub async fn write_hello<W: AsyncWrite + Unpin>(w: &mut W, h: &Hello) -> std::io::Result<()> {
    let mut p = Vec::with_capacity(29);
    p.extend_from_slice(&h.memory.to_be_bytes());
    p.extend_from_slice(&h.vcpus.to_be_bytes());
    p.extend_from_slice(&h.disk_size.to_be_bytes());
    p.extend_from_slice(&h.layout.to_be_bytes());
    p.push(u8::from(h.storage) | if h.lease.is_some() { HELLO_LEASE } else { 0 });
    if let Some(l) = &h.lease {
        for text in [&l.key, &l.owner] {
            let b = text.as_bytes();
            let n = u8::try_from(b.len()).map_err(|_| std::io::Error::other("a lease key or owner over 255 bytes"))?;
            p.push(n);
            p.extend_from_slice(b);
        }
        p.extend_from_slice(&l.generation.to_be_bytes());
    }
    section(w, HELLO, &p).await?;
    w.flush().await
}

pub async fn write_keepalive<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    section(w, KEEPALIVE, &[]).await?;
    w.flush().await
}

pub async fn write_sync<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    section(w, SYNC, &[]).await?;
    w.flush().await
}

pub async fn write_commit<W: AsyncWrite + Unpin>(w: &mut W, generation: Option<u64>) -> std::io::Result<()> {
    let p = generation.map(u64::to_be_bytes);
    section(w, COMMIT, p.as_ref().map_or(&[][..], |b| &b[..])).await?;
    w.flush().await
}

pub async fn write_abort<W: AsyncWrite + Unpin>(w: &mut W, reason: &str) -> std::io::Result<()> {
    let r = reason.as_bytes();
    section(w, ABORT, &r[..r.len().min(MAX_REPLY as usize)]).await?;
    w.flush().await
}

/// Pages from `first_page` on (whole pages, at most [`MAX_RUN`]); the
/// all-zero ones go as markers if [`ZERO_PAGE_MARKERS`]. Returns how many went as markers.
pub async fn write_ram<W: AsyncWrite + Unpin>(w: &mut W, first_page: u64, pages: &[u8]) -> std::io::Result<u64> {
    write_ram_with(w, first_page, pages, ZERO_PAGE_MARKERS).await
}

/// [`write_ram`], saying whether all-zero pages go as markers.
pub async fn write_ram_with<W: AsyncWrite + Unpin>(
    w: &mut W,
    first_page: u64,
    pages: &[u8],
    zero_markers: bool,
) -> std::io::Result<u64> {
    if pages.len() % PAGE != 0 || pages.len() / PAGE > MAX_RUN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("a RAM section of {} bytes is not at most {MAX_RUN} whole pages", pages.len()),
        ));
    }
    let payload = ram_payload(first_page, pages, zero_markers);
    // Every page took a kind byte; the data pages their bytes too.
    let count = pages.len() / PAGE;
    let zero = (count * (PAGE + 1) + 12 - payload.len()) / PAGE;
    section(w, RAM, &payload).await?;
    Ok(zero as u64)
}

/// Write a run the sender built itself (zero pages flagged, never read or
/// copied); returns how many went as markers.
pub async fn write_ram_run<W: AsyncWrite + Unpin>(w: &mut W, run: &RamRun) -> std::io::Result<u64> {
    let count = run.zero.len();
    let data_pages = run.zero.iter().filter(|&&z| !z).count();
    if count > MAX_RUN || run.data.len() != data_pages * PAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("a RAM run of {count} pages with {} bytes of data pages", run.data.len()),
        ));
    }
    let mut b = Vec::with_capacity(12 + count + run.data.len());
    b.extend_from_slice(&run.first_page.to_be_bytes());
    b.extend_from_slice(&(count as u32).to_be_bytes());
    for p in run.pages() {
        match p {
            None => b.push(PAGE_ZERO),
            Some(p) => {
                b.push(PAGE_DATA);
                b.extend_from_slice(p);
            }
        }
    }
    section(w, RAM, &b).await?;
    Ok((count - data_pages) as u64)
}

pub async fn write_vcpu<W: AsyncWrite + Unpin>(w: &mut W, id: u32, st: &VcpuState) -> std::io::Result<()> {
    let mut p = id.to_be_bytes().to_vec();
    p.extend_from_slice(&vcpu_bytes(st));
    section(w, VCPU, &p).await
}

pub async fn write_device<W: AsyncWrite + Unpin>(w: &mut W, consumed: u32) -> std::io::Result<()> {
    section(w, DEVICE, &consumed.to_be_bytes()).await
}

/// A BITMAPS section's payload: bytes `first..first + bits.len()` of the
/// bitmap `meta` describes (all-zero bytes go as a zero chunk).
pub fn bitmap_payload(meta: &BitmapMeta, first: u64, bits: &[u8]) -> Vec<u8> {
    let zero = bits.iter().all(|&b| b == 0);
    let mut b = Vec::with_capacity(2 + meta.node.len() + meta.bitmap.len() + 26 + if zero { 0 } else { bits.len() });
    for name in [&meta.node, &meta.bitmap] {
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
    }
    b.extend_from_slice(&meta.granularity.to_be_bytes());
    let flags = if meta.enabled { BITMAP_ENABLED } else { 0 } | if meta.persistent { BITMAP_PERSISTENT } else { 0 };
    b.push(flags);
    b.extend_from_slice(&meta.size.to_be_bytes());
    b.extend_from_slice(&first.to_be_bytes());
    b.extend_from_slice(&(bits.len() as u32).to_be_bytes());
    if zero {
        b.push(CHUNK_ZEROES);
    } else {
        b.push(CHUNK_DATA);
        b.extend_from_slice(bits);
    }
    b
}

/// A whole bitmap: its bits (`meta.byte_len()` bytes) in sections of at
/// most [`MAX_BITMAP_CHUNK`] bytes, in order; one section for a bitmap of
/// no bits. Names of 1..=255 bytes and the bits' length are checked here.
pub async fn write_bitmap<W: AsyncWrite + Unpin>(w: &mut W, meta: &BitmapMeta, bits: &[u8]) -> std::io::Result<()> {
    write_bitmap_in(w, meta, bits, MAX_BITMAP_CHUNK as usize).await
}

/// [`write_bitmap`] in chunks of at most `chunk` bytes.
pub async fn write_bitmap_in<W: AsyncWrite + Unpin>(
    w: &mut W,
    meta: &BitmapMeta,
    bits: &[u8],
    chunk: usize,
) -> std::io::Result<()> {
    let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
    for name in [&meta.node, &meta.bitmap] {
        if name.is_empty() || name.len() > usize::from(u8::MAX) {
            return Err(invalid(format!("a BITMAPS name of {} bytes (1 to 255)", name.len())));
        }
    }
    if bits.len() as u64 != meta.byte_len() {
        return Err(invalid(format!(
            "bitmap '{}': {} bytes of bits, {} expected",
            meta.bitmap,
            bits.len(),
            meta.byte_len()
        )));
    }
    let chunk = chunk.clamp(1, MAX_BITMAP_CHUNK as usize);
    if bits.is_empty() {
        return section(w, BITMAPS, &bitmap_payload(meta, 0, &[])).await;
    }
    for (i, part) in bits.chunks(chunk).enumerate() {
        section(w, BITMAPS, &bitmap_payload(meta, (i * chunk) as u64, part)).await?;
    }
    Ok(())
}

/// Decode a BITMAPS payload; `Err` says what is wrong with it.
fn bitmap_from(p: &[u8]) -> Result<BitmapChunk, String> {
    let mut at = 0usize;
    let mut names = Vec::with_capacity(2);
    for what in ["node", "bitmap"] {
        let n = usize::from(*p.get(at).ok_or_else(|| format!("short before the {what} name"))?);
        let raw = p.get(at + 1..at + 1 + n).ok_or_else(|| format!("the {what} name of {n} bytes runs past the end"))?;
        if n == 0 {
            return Err(format!("an empty {what} name"));
        }
        let name = std::str::from_utf8(raw).map_err(|_| format!("the {what} name is not UTF-8"))?;
        names.push(name.to_string());
        at += 1 + n;
    }
    let fixed = p.get(at..at + 4 + 1 + 8 + 8 + 4 + 1).ok_or("short after the names")?;
    let granularity = be_u32(fixed).ok_or("short")?;
    let flags = fixed[4];
    let size = be_u64(&fixed[5..]).ok_or("short")?;
    let first = be_u64(&fixed[13..]).ok_or("short")?;
    let count = be_u32(&fixed[21..]).ok_or("short")?;
    let kind = fixed[25];
    at += fixed.len();
    let (bitmap, node) = (names.pop().unwrap_or_default(), names.pop().unwrap_or_default());
    let whose = format!("bitmap '{bitmap}' of node '{node}'");
    block::bitmap::check_granularity(u64::from(granularity)).map_err(|e| format!("{whose}: {e}"))?;
    if flags & !(BITMAP_ENABLED | BITMAP_PERSISTENT) != 0 {
        return Err(format!("{whose}: unknown flags {flags:#04x}"));
    }
    if count > MAX_BITMAP_CHUNK {
        return Err(format!("{whose}: {count} bytes of bits, more than {MAX_BITMAP_CHUNK}"));
    }
    let meta = BitmapMeta {
        node,
        bitmap,
        granularity,
        enabled: flags & BITMAP_ENABLED != 0,
        persistent: flags & BITMAP_PERSISTENT != 0,
        size,
    };
    if first.checked_add(u64::from(count)).is_none_or(|end| end > meta.byte_len()) {
        return Err(format!("{whose}: bytes {first}+{count} are outside its {} bytes of bits", meta.byte_len()));
    }
    let rest = p.get(at..).unwrap_or_default();
    let bits = match kind {
        CHUNK_ZEROES if rest.is_empty() => vec![0; count as usize],
        CHUNK_DATA if rest.len() == count as usize => rest.to_vec(),
        CHUNK_ZEROES | CHUNK_DATA => {
            return Err(format!("{whose}: {} bytes follow a chunk of {count} (kind {kind})", rest.len()))
        }
        other => return Err(format!("{whose}: unknown chunk kind {other}")),
    };
    Ok(BitmapChunk { meta, first, bits })
}

pub async fn write_kvmclock<W: AsyncWrite + Unpin>(w: &mut W, clock: u64) -> std::io::Result<()> {
    section(w, KVMCLOCK, &clock.to_be_bytes()).await
}

pub async fn write_end<W: AsyncWrite + Unpin>(w: &mut W, running: bool) -> std::io::Result<()> {
    section(w, END, &[u8::from(running)]).await?;
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

/// Fill `buf`; the stream ending first is an `UnexpectedEof` that `what`
/// (given the bytes that did arrive) describes.
async fn read_full<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    what: impl Fn(usize) -> String,
) -> Result<(), StreamError> {
    let mut got = 0;
    while let Some(rest) = buf.get_mut(got..).filter(|b| !b.is_empty()) {
        let n = r.read(rest).await?;
        if n == 0 {
            return Err(StreamError::Io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, what(got))));
        }
        got += n;
    }
    Ok(())
}

fn be_u32(b: &[u8]) -> Option<u32> {
    b.first_chunk::<4>().map(|a| u32::from_be_bytes(*a))
}

fn be_u64(b: &[u8]) -> Option<u64> {
    b.first_chunk::<8>().map(|a| u64::from_be_bytes(*a))
}

/// Read and check the next section: its header CRC before anything else
/// (and before the payload is waited for), then its tag, version and
/// length, then the payload's CRC, then its fields.
pub async fn read_section<R: AsyncRead + Unpin>(r: &mut R) -> Result<Section, StreamError> {
    let mut h = [0u8; SECTION_HEADER_LEN];
    read_full(r, &mut h, |got| {
        if got == 0 {
            "the stream ended before the next section".into()
        } else {
            format!("section header: truncated after {got} of its {SECTION_HEADER_LEN} bytes")
        }
    })
    .await?;
    let (fields, hcrc) = h.split_at(SECTION_HEADER_LEN - 4);
    if Some(crc32c::crc32c(fields)) != be_u32(hcrc) {
        return Err(StreamError::HeaderChecksum);
    }
    let (tag, version) = (h[0], h[1]);
    let len = be_u64(&h[2..]).unwrap_or(u64::MAX);
    let Some(layout) = layout_of(tag) else {
        return Err(StreamError::UnknownSection(tag));
    };
    if version != layout.version {
        return Err(StreamError::SectionVersion { tag, version, ours: layout.version });
    }
    let bad = |why: &str| StreamError::BadSection { tag, len, why: why.to_string() };
    if len > MAX_SECTION {
        return Err(bad("too large"));
    }
    let mut body = vec![0u8; len as usize + 4];
    read_full(r, &mut body, |got| {
        format!("{} section of {len} bytes: truncated after {got} of its {} bytes with checksum", layout.name, len + 4)
    })
    .await?;
    let (p, pcrc) = body.split_at(len as usize);
    if Some(crc32c::crc32c_append(crc32c::crc32c(&h), p)) != be_u32(pcrc) {
        return Err(StreamError::PayloadChecksum { tag, len });
    }
    let u32_at = |at: usize| p.get(at..).and_then(be_u32);
    let u64_at = |at: usize| p.get(at..).and_then(be_u64);
    match tag {
        HELLO if len >= 29 => {
            let flags = p.get(28).copied().unwrap_or(0);
            if flags & !(HELLO_STORAGE | HELLO_LEASE) != 0 {
                return Err(bad("flags other than bit 0 (storage copy) and bit 1 (lease)"));
            }
            let lease = match flags & HELLO_LEASE {
                0 if len == 29 => None,
                0 => return Err(bad("bytes after the flags without a lease")),
                _ => Some(hello_lease(&p[29..]).map_err(|why| bad(&why))?),
            };
            Ok(Section::Hello(Hello {
                memory: u64_at(0).ok_or_else(|| bad("short"))?,
                vcpus: u32_at(8).ok_or_else(|| bad("short"))?,
                disk_size: u64_at(12).ok_or_else(|| bad("short"))?,
                layout: u64_at(20).ok_or_else(|| bad("short"))?,
                storage: flags & HELLO_STORAGE != 0,
                lease,
            }))
        }
        RAM => {
            let first_page = u64_at(0).ok_or_else(|| bad("short header"))?;
            let count = u32_at(8).ok_or_else(|| bad("short header"))? as usize;
            if count > MAX_RUN {
                return Err(bad(&format!("{count} pages, more than {MAX_RUN}")));
            }
            if p.len() < 12 + count {
                return Err(bad(&format!("{count} pages cannot fit in it")));
            }
            // Every page took a marker byte (checked above); the rest are data pages.
            let mut data = Vec::with_capacity((p.len() - 12 - count) / PAGE * PAGE);
            let mut zero = Vec::with_capacity(count);
            let mut at = 12;
            for i in 0..count {
                match p.get(at) {
                    Some(&PAGE_ZERO) => {
                        zero.push(true);
                        at += 1;
                    }
                    Some(&PAGE_DATA) => {
                        let page = p
                            .get(at + 1..at + 1 + PAGE)
                            .ok_or_else(|| bad(&format!("page {i} of {count} runs past the section's end")))?;
                        data.extend_from_slice(page);
                        zero.push(false);
                        at += 1 + PAGE;
                    }
                    Some(m) => return Err(bad(&format!("page {i} of {count} has an unknown marker {m}"))),
                    None => return Err(bad(&format!("{i} of its {count} pages, the length does not match"))),
                }
            }
            if at != p.len() {
                return Err(bad("the page count does not match the length"));
            }
            Ok(Section::Ram(RamRun { first_page, zero, data }))
        }
        VCPU => {
            let id = u32_at(0).ok_or_else(|| bad("short"))?;
            let state = vcpu_from(p.get(4..).unwrap_or_default()).map_err(|why| bad(&why))?;
            Ok(Section::Vcpu { id, state: Box::new(state) })
        }
        DEVICE if len == 4 => Ok(Section::Device { consumed: u32_at(0).ok_or_else(|| bad("short"))? }),
        KVMCLOCK if len == 8 => Ok(Section::KvmClock { clock: u64_at(0).ok_or_else(|| bad("short"))? }),
        END if len == 1 => match p.first() {
            Some(&b @ (0 | 1)) => Ok(Section::End { running: b == 1 }),
            _ => Err(bad("running is neither 0 nor 1")),
        },
        COMMIT if len == 0 => Ok(Section::Commit { generation: None }),
        COMMIT if len == 8 => Ok(Section::Commit { generation: u64_at(0) }),
        KEEPALIVE if len == 0 => Ok(Section::KeepAlive),
        SYNC if len == 0 => Ok(Section::Sync),
        ABORT if len <= u64::from(MAX_REPLY) => Ok(Section::Abort(String::from_utf8_lossy(p).into_owned())),
        BITMAPS => bitmap_from(p).map(Section::Bitmap).map_err(|why| bad(&why)),
        _ => Err(bad("wrong length")),
    }
}

/// HELLO's lease fields: key_len:u8 key owner_len:u8 owner generation:u64.
fn hello_lease(p: &[u8]) -> Result<HelloLease, String> {
    let mut at = 0;
    let mut text = |what: &str| -> Result<String, String> {
        let n = *p.get(at).ok_or(format!("the lease's {what} is missing"))? as usize;
        let b = p.get(at + 1..at + 1 + n).ok_or(format!("the lease's {what} is truncated"))?;
        at += 1 + n;
        String::from_utf8(b.to_vec()).map_err(|_| format!("the lease's {what} is not UTF-8"))
    };
    let (key, owner) = (text("key")?, text("owner")?);
    let rest = p.get(at..).unwrap_or_default();
    if rest.len() != 8 {
        return Err(format!("the lease's generation takes 8 bytes, {} follow", rest.len()));
    }
    Ok(HelloLease { key, owner, generation: be_u64(rest).unwrap_or(0) })
}

pub async fn write_reply<W: AsyncWrite + Unpin>(w: &mut W, reply: &Reply) -> std::io::Result<()> {
    let (tag, payload) = match reply {
        Reply::Welcome(Welcome { targets, lease }) => {
            let t: Vec<serde_json::Value> = targets
                .iter()
                .map(|t| {
                    let mut o = serde_json::json!({"node": t.node, "export": t.export, "size": t.size});
                    match &t.at {
                        Some(TargetAt::Unix(path)) => o["unix"] = path.as_str().into(),
                        Some(TargetAt::Port(port)) => o["port"] = (*port).into(),
                        None => {}
                    }
                    o
                })
                .collect();
            let mut o = serde_json::json!({"targets": t});
            if let Some((key, owner)) = lease {
                o["lease"] = serde_json::json!({"key": key, "owner": owner});
            }
            (REPLY_WELCOME, o.to_string().into_bytes())
        }
        Reply::Refused(why) => {
            let mut b = why.as_bytes().to_vec();
            b.truncate(MAX_REPLY as usize);
            (REPLY_REFUSED, b)
        }
        Reply::Prepared => (REPLY_PREPARED, Vec::new()),
        Reply::Committed => (REPLY_COMMITTED, Vec::new()),
        Reply::Synced => (REPLY_SYNCED, Vec::new()),
    };
    // One write: a reply leaves whole or not at all as far as this side can tell.
    w.write_all(&reply_bytes(tag, &payload)).await?;
    w.flush().await
}

fn parse_welcome(p: &[u8]) -> Result<Welcome, StreamError> {
    let bad = |why: &str| StreamError::BadReply(format!("WELCOME: {why}"));
    let v: serde_json::Value = serde_json::from_slice(p).map_err(|e| bad(&e.to_string()))?;
    let obj = v
        .as_object()
        .filter(|o| o.len() == 1 + usize::from(o.contains_key("lease")))
        .ok_or_else(|| bad("not an object with 'targets' and at most 'lease'"))?;
    let lease = match obj.get("lease") {
        None => None,
        Some(l) => {
            let o = l.as_object().filter(|o| o.len() == 2).ok_or_else(|| bad("'lease' is not {key, owner}"))?;
            let s = |k: &str| o.get(k).and_then(|v| v.as_str()).map(str::to_string);
            match (s("key"), s("owner")) {
                (Some(k), Some(w)) => Some((k, w)),
                _ => return Err(bad("'lease' is not {key, owner} strings")),
            }
        }
    };
    Ok(Welcome { targets: parse_targets(obj)?, lease })
}

fn parse_targets(obj: &serde_json::Map<String, serde_json::Value>) -> Result<Vec<Target>, StreamError> {
    let bad = |why: &str| StreamError::BadReply(format!("WELCOME: {why}"));
    let list = obj.get("targets").and_then(|t| t.as_array()).ok_or_else(|| bad("'targets' is not an array"))?;
    let mut out = Vec::with_capacity(list.len());
    for t in list {
        let o = t
            .as_object()
            .filter(|o| {
                let extra = o.keys().filter(|k| !["node", "export", "size"].contains(&k.as_str())).count();
                o.len() - extra == 3 && extra <= 1
            })
            .ok_or_else(|| bad("a target is not {node, export, size} with at most one of unix or port"))?;
        let s = |k: &str| {
            o.get(k)
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .ok_or_else(|| bad(&format!("target '{k}' missing or not a string")))
        };
        let size =
            o.get("size").and_then(|v| v.as_u64()).ok_or_else(|| bad("target 'size' missing or not a number"))?;
        let at = match (o.get("unix"), o.get("port")) {
            (None, None) => None,
            (Some(_), None) => Some(TargetAt::Unix(s("unix")?)),
            (None, Some(p)) => Some(TargetAt::Port(
                p.as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|&p| p != 0)
                    .ok_or_else(|| bad("target 'port' is not a TCP port"))?,
            )),
            (Some(_), Some(_)) => return Err(bad("a target has both unix and port")),
        };
        if o.len() != 3 + usize::from(at.is_some()) {
            return Err(bad("a target has a member other than node, export, size, unix or port"));
        }
        out.push(Target { node: s("node")?, export: s("export")?, size, at });
    }
    Ok(out)
}

/// A reply tag's name, for messages.
fn reply_name(tag: u8) -> String {
    match REPLIES.iter().find(|l| l.tag == tag) {
        Some(l) => l.name.into(),
        None => format!("reply {tag}"),
    }
}

/// Read one reply from the return path: its header CRC first, then its
/// length bound, then its payload CRC.
pub async fn read_reply<R: AsyncRead + Unpin>(r: &mut R) -> Result<Reply, StreamError> {
    let mut h = [0u8; REPLY_HEADER_LEN];
    read_full(r, &mut h, |got| {
        if got == 0 {
            "the return path ended before the next reply".into()
        } else {
            format!("reply header: truncated after {got} of its {REPLY_HEADER_LEN} bytes")
        }
    })
    .await?;
    let (fields, hcrc) = h.split_at(REPLY_HEADER_LEN - 4);
    if Some(crc32c::crc32c(fields)) != be_u32(hcrc) {
        return Err(StreamError::BadReply("reply header: checksum mismatch".into()));
    }
    let tag = h[0];
    let len = be_u32(&h[1..]).unwrap_or(u32::MAX);
    let name = reply_name(tag);
    if len > MAX_REPLY {
        return Err(StreamError::BadReply(format!("{name} of {len} bytes is too large")));
    }
    let mut body = vec![0u8; len as usize + 4];
    read_full(r, &mut body, |got| {
        format!("{name} of {len} bytes: truncated after {got} of its {} bytes with checksum", len + 4)
    })
    .await?;
    let (p, pcrc) = body.split_at(len as usize);
    if Some(crc32c::crc32c_append(crc32c::crc32c(&h), p)) != be_u32(pcrc) {
        return Err(StreamError::BadReply(format!("{name} of {len} bytes: payload checksum mismatch")));
    }
    match tag {
        REPLY_WELCOME => Ok(Reply::Welcome(parse_welcome(p)?)),
        REPLY_REFUSED => Ok(Reply::Refused(String::from_utf8_lossy(p).into_owned())),
        REPLY_PREPARED if len == 0 => Ok(Reply::Prepared),
        REPLY_COMMITTED if len == 0 => Ok(Reply::Committed),
        REPLY_SYNCED if len == 0 => Ok(Reply::Synced),
        other => Err(StreamError::BadReply(format!("unknown reply {other} of {len} bytes"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap()
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
            let lease = HelloLease { key: "vm1".into(), owner: "host-a-42".into(), generation: 7 };
            let hello = Hello {
                memory: 64 << 20,
                vcpus: 1,
                disk_size: 1 << 20,
                layout: layout_hash(),
                storage: true,
                lease: Some(lease),
            };
            write_hello(&mut w, &hello).await.unwrap();
            write_ram(&mut w, 3, &[7u8; 2 * PAGE]).await.unwrap();
            write_device(&mut w, 42).await.unwrap();
            write_kvmclock(&mut w, 7_000_000_123).await.unwrap();
            write_end(&mut w, true).await.unwrap();
            let s = parse_all(&w).await.unwrap();
            assert!(matches!(&s[0], Section::Hello(h) if *h == hello));
            assert!(matches!(&s[1], Section::Ram(r) if r.first_page == 3 && r.expand() == [7u8; 2 * PAGE]));
            assert!(matches!(s[2], Section::Device { consumed: 42 }));
            assert!(matches!(s[3], Section::KvmClock { clock: 7_000_000_123 }));
            for cut in [0, 5, 12, 20, w.len() / 2, w.len() - 1] {
                assert!(parse_all(&w[..cut]).await.is_err(), "truncated at {cut}");
            }
            let mut bad = w[..12].to_vec();
            bad.extend_from_slice(&section_bytes(99, &[]));
            let e = parse_all(&bad).await.unwrap_err();
            assert!(matches!(e, StreamError::UnknownSection(99)), "{e}");
            assert_eq!(e.to_string(), "unknown section tag 99");
            // COMMIT with a lease carries the generation it moved to.
            let mut c = Vec::new();
            write_commit(&mut c, Some(8)).await.unwrap();
            assert!(matches!(read_section(&mut &c[..]).await.unwrap(), Section::Commit { generation: Some(8) }));
        });
    }

    #[test]
    fn replies_round_trip_and_bad_ones_are_named() {
        rt().block_on(async {
            let targets = vec![
                Target { node: "disk".into(), export: "e".into(), size: 4096, at: None },
                Target {
                    node: "d2".into(),
                    export: "f".into(),
                    size: 512,
                    at: Some(TargetAt::Unix("/run/x.sock".into())),
                },
                Target { node: "d3".into(), export: "g".into(), size: 1, at: Some(TargetAt::Port(10809)) },
            ];
            let leased = Welcome { targets: targets.clone(), lease: Some(("vm1".into(), "host-b-7".into())) };
            for reply in [
                Reply::Welcome(Welcome { targets: targets.clone(), lease: None }),
                Reply::Refused("no".into()),
                Reply::Prepared,
                Reply::Welcome(Welcome::default()),
                Reply::Welcome(leased),
            ] {
                let mut w = Vec::new();
                write_reply(&mut w, &reply).await.unwrap();
                assert_eq!(read_reply(&mut &w[..]).await.unwrap(), reply);
                for cut in 0..w.len() {
                    assert!(read_reply(&mut &w[..cut]).await.is_err());
                }
            }
            for bad in [
                &br#"{"targets": [{"node": "d", "export": "e"}]}"#[..],
                br#"{"targets": [{"node": "d", "export": "e", "size": 1, "port": 0}]}"#,
                br#"{"targets": [{"node": "d", "export": "e", "size": 1, "port": 65536}]}"#,
                br#"{"targets": [{"node": "d", "export": "e", "size": 1, "unix": 5}]}"#,
                br#"{"targets": [{"node": "d", "export": "e", "size": 1, "unix": "/a", "port": 1}]}"#,
                br#"{"targets": [{"node": "d", "export": "e", "size": 1, "host": "h"}]}"#,
            ] {
                let w = reply_bytes(REPLY_WELCOME, bad);
                let r = read_reply(&mut &w[..]).await;
                assert!(matches!(&r, Err(StreamError::BadReply(m)) if m.contains("target")), "{r:?}");
            }
            let w = reply_bytes(9, &[]);
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
        let mut xsave = Box::new([0u32; crate::vcpu::XSAVE_LEN / 4]);
        for (i, w) in xsave.iter_mut().enumerate() {
            *w = 0x5000_0000 + i as u32;
        }
        let mut xcrs = kvm_bindings::kvm_xcrs { nr_xcrs: 1, flags: 0x11, ..Default::default() };
        for (i, x) in xcrs.xcrs.iter_mut().enumerate() {
            (x.xcr, x.value) = (i as u32 + 0x20, 0x7 + ((i as u64) << 40));
        }
        // Every other MSR present, each with its own value (absent slots carry no value).
        let msrs = MIGRATED_MSRS
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(i, (index, _))| kvm_bindings::kvm_msr_entry {
                index: *index,
                data: 0xabcd_0000_0000 + i as u64,
                ..Default::default()
            })
            .collect();
        let mut lapic = kvm_bindings::kvm_lapic_state { regs: [0; 1024] };
        for (i, c) in lapic.regs.iter_mut().enumerate() {
            *c = (i * 7 % 251) as std::os::raw::c_char;
        }
        let mut events = kvm_bindings::kvm_vcpu_events::default();
        let ex = &mut events.exception;
        (ex.injected, ex.nr, ex.has_error_code, ex.pending, ex.error_code) = (1, 13, 1, 0, 0xdead);
        let int = &mut events.interrupt;
        (int.injected, int.nr, int.soft, int.shadow) = (1, 0x30, 0, 2);
        let nmi = &mut events.nmi;
        (nmi.injected, nmi.pending, nmi.masked) = (0, 1, 1);
        (events.sipi_vector, events.flags) = (0x9a, 0x0d);
        let smi = &mut events.smi;
        (smi.smm, smi.pending, smi.smm_inside_nmi, smi.latched_init) = (1, 0, 1, 1);
        events.triple_fault.pending = 1;
        (events.exception_has_payload, events.exception_payload) = (1, 0xffff_8000_0000_1234);
        let debugregs = kvm_bindings::kvm_debugregs {
            db: [0x1000, 0x2000, 0x3000, 0x4000],
            dr6: 0xffff_0ff0,
            dr7: 0x455,
            ..Default::default()
        };
        let mp_state = kvm_bindings::kvm_mp_state { mp_state: 3 };
        VcpuState { regs, sregs, xsave, xcrs, msrs, lapic, events, debugregs, mp_state }
    }

    #[test]
    fn a_vcpu_state_round_trips_field_by_field() {
        rt().block_on(async {
            let st = odd_vcpu_state();
            let mut w = Vec::new();
            write_header(&mut w).await.unwrap();
            write_vcpu(&mut w, 2, &st).await.unwrap();
            write_end(&mut w, false).await.unwrap();
            let frame = SECTION_HEADER_LEN + 4;
            assert_eq!(w.len(), 12 + frame + 4 + VCPU_STATE_LEN + frame + 1);
            // The layout is the format's, not this build's: spot-check it.
            let state_bytes = &w[12 + SECTION_HEADER_LEN + 4..][..VCPU_STATE_LEN];
            assert_eq!(state_bytes[16 * 8..17 * 8], st.regs.rip.to_le_bytes());
            assert_eq!(state_bytes[18 * 8..19 * 8], st.sregs.cs.base.to_le_bytes());
            assert_eq!(state_bytes[CORE_LEN - 8..CORE_LEN], st.sregs.interrupt_bitmap[3].to_le_bytes());
            let xsave = &state_bytes[CORE_LEN..];
            assert_eq!(xsave[4..8], st.xsave[1].to_le_bytes());
            let msrs = &xsave[crate::vcpu::XSAVE_LEN + XCRS_LEN..];
            assert_eq!(msrs[..9], [1, 0, 0, 0, 0, 0xcd, 0xab, 0, 0], "slot 0: IA32_TSC, present");
            assert_eq!(msrs[9..18], [0; 9], "slot 1: absent");
            let lapic = &msrs[MSRS_LEN..];
            assert_eq!(lapic[7], 49);
            assert_eq!(state_bytes[VCPU_STATE_LEN - 4..], 3u32.to_le_bytes(), "mp_state last");
            assert_eq!(VCPU_PARTS.iter().map(|p| p.1).sum::<usize>(), VCPU_STATE_LEN);
            let s = parse_all(&w).await.unwrap();
            let Section::Vcpu { id: 2, state } = &s[0] else { panic!("{:?}", s[0]) };
            assert_eq!(state.regs, st.regs);
            assert_eq!(state.sregs, st.sregs);
            assert_eq!(state.xsave, st.xsave);
            assert_eq!(state.xcrs, st.xcrs);
            assert_eq!(state.msrs, st.msrs);
            assert_eq!(state.lapic, st.lapic);
            assert_eq!(state.events, st.events);
            assert_eq!(state.debugregs, st.debugregs);
            assert_eq!(state.mp_state, st.mp_state);
            assert!(**state == st);
            // Every truncation, and a section one byte too long, fails by name.
            for cut in 12..w.len() - 10 {
                assert!(parse_all(&w[..cut]).await.is_err(), "truncated at {cut}");
            }
            for delta in [-1i64, 1] {
                let mut bad = Vec::new();
                write_header(&mut bad).await.unwrap();
                let body = (4 + VCPU_STATE_LEN as i64 + delta) as usize;
                bad.extend_from_slice(&section_bytes(VCPU, &vec![0; body]));
                let e = parse_all(&bad).await.unwrap_err();
                assert!(
                    matches!(&e, StreamError::BadSection { tag: VCPU, why, .. } if why.contains("vCPU state of")),
                    "{e}"
                );
                assert!(e.to_string().starts_with("VCPU section of "), "{e}");
                assert!(e.to_string().contains("xsave 4096"), "{e}");
            }
            // Right length, impossible contents: refused by name, never loaded.
            let good = {
                let mut p = 2u32.to_be_bytes().to_vec();
                p.extend_from_slice(&vcpu_bytes(&st));
                p
            };
            let at = 4 + CORE_LEN + crate::vcpu::XSAVE_LEN;
            let mut p = good.clone();
            p[at..at + 4].copy_from_slice(&17u32.to_le_bytes());
            let e = first_section(&stream_of(&section_bytes(VCPU, &p))).await.unwrap_err();
            assert!(e.to_string().ends_with("17 XCRs, more than 16"), "{e}");
            let mut p = good.clone();
            p[at + XCRS_LEN] = 2;
            let e = first_section(&stream_of(&section_bytes(VCPU, &p))).await.unwrap_err();
            assert!(e.to_string().ends_with("MSR IA32_TSC: presence 2 is neither 0 nor 1"), "{e}");
            let mut p = good;
            p[at + XCRS_LEN + 9 + 1] = 1;
            let e = first_section(&stream_of(&section_bytes(VCPU, &p))).await.unwrap_err();
            assert!(e.to_string().ends_with("MSR IA32_TSC_ADJUST is absent but has a value"), "{e}");
        });
    }

    /// One of every section, each with its name, as the wire has them.
    async fn one_of_each() -> Vec<(&'static str, Vec<u8>)> {
        let mut out = Vec::new();
        let mut w = Vec::new();
        let hello = Hello {
            memory: 16 << 20,
            vcpus: 2,
            disk_size: 1 << 20,
            layout: layout_hash(),
            storage: false,
            lease: None,
        };
        write_hello(&mut w, &hello).await.unwrap();
        out.push(("HELLO", std::mem::take(&mut w)));
        let mut page = vec![0u8; PAGE];
        page[100] = 0x5a;
        write_ram(&mut w, 5, &page).await.unwrap();
        out.push(("RAM", std::mem::take(&mut w)));
        write_ram_with(&mut w, 6, &[0u8; 3 * PAGE], true).await.unwrap();
        assert_eq!(w.len(), SECTION_HEADER_LEN + 12 + 3 + 4, "zero pages go as markers");
        out.push(("RAM", std::mem::take(&mut w)));
        write_vcpu(&mut w, 1, &odd_vcpu_state()).await.unwrap();
        out.push(("VCPU", std::mem::take(&mut w)));
        write_device(&mut w, 9).await.unwrap();
        out.push(("DEVICE", std::mem::take(&mut w)));
        write_kvmclock(&mut w, 0x1234_5678_9abc).await.unwrap();
        out.push(("KVMCLOCK", std::mem::take(&mut w)));
        write_commit(&mut w, None).await.unwrap();
        out.push(("COMMIT", std::mem::take(&mut w)));
        write_abort(&mut w, "no space").await.unwrap();
        out.push(("ABORT", std::mem::take(&mut w)));
        write_keepalive(&mut w).await.unwrap();
        out.push(("KEEPALIVE", std::mem::take(&mut w)));
        let (meta, bits) = odd_bitmap();
        write_bitmap(&mut w, &meta, &bits).await.unwrap();
        out.push(("BITMAPS", std::mem::take(&mut w)));
        write_bitmap(&mut w, &meta, &vec![0; bits.len()]).await.unwrap();
        assert_eq!(w.len(), SECTION_HEADER_LEN + 2 + 4 + 4 + 26 + 4, "zero bits go as a zero chunk");
        out.push(("BITMAPS", std::mem::take(&mut w)));
        write_sync(&mut w).await.unwrap();
        out.push(("SYNC", std::mem::take(&mut w)));
        write_end(&mut w, true).await.unwrap();
        out.push(("END", std::mem::take(&mut w)));
        out
    }

    /// A bitmap of 1 MiB + 1 byte at 4 KiB: 257 bits, 33 bytes, some set.
    fn odd_bitmap() -> (BitmapMeta, Vec<u8>) {
        let meta = BitmapMeta {
            node: "disk".into(),
            bitmap: "inc0".into(),
            granularity: 4096,
            enabled: true,
            persistent: false,
            size: (1 << 20) + 1,
        };
        let mut bits = vec![0u8; 33];
        bits[0] = 0x81;
        bits[17] = 0x3c;
        bits[32] = 1;
        (meta, bits)
    }

    /// Parse BITMAPS sections back into (meta, whole bits).
    async fn bitmaps_of(w: &[u8]) -> Vec<(BitmapMeta, Vec<u8>)> {
        let mut r = w;
        let mut out: Vec<(BitmapMeta, Vec<u8>)> = Vec::new();
        while !r.is_empty() {
            let Section::Bitmap(c) = read_section(&mut r).await.unwrap() else { panic!("not BITMAPS") };
            match out.last_mut() {
                Some((m, b)) if *m == c.meta && b.len() as u64 == c.first => b.extend_from_slice(&c.bits),
                _ => {
                    assert_eq!(c.first, 0);
                    out.push((c.meta, c.bits));
                }
            }
        }
        out
    }

    #[test]
    fn a_bitmap_round_trips_whole_or_split_and_zero_chunks_are_markers() {
        rt().block_on(async {
            let (meta, bits) = odd_bitmap();
            for chunk in [1, 5, 16, 33, 1000] {
                let mut w = Vec::new();
                write_bitmap_in(&mut w, &meta, &bits, chunk).await.unwrap();
                assert_eq!(bitmaps_of(&w).await, vec![(meta.clone(), bits.clone())], "chunk {chunk}");
            }
            // Split in 11-byte chunks: the middle one (bytes 11..22) holds bits, the others not all.
            let mut w = Vec::new();
            write_bitmap_in(&mut w, &meta, &bits, 11).await.unwrap();
            let frame = SECTION_HEADER_LEN + 4 + 2 + 4 + 4 + 26;
            assert_eq!(w.len(), 3 * frame + 3 * 11);
            // Disabled, persistent, no bits at all.
            let empty = BitmapMeta { enabled: false, persistent: true, size: 0, ..meta.clone() };
            let mut w = Vec::new();
            write_bitmap(&mut w, &empty, &[]).await.unwrap();
            assert_eq!(bitmaps_of(&w).await, vec![(empty, vec![])]);
            // The writer refuses what the reader would.
            let mut w = Vec::new();
            assert!(write_bitmap(&mut w, &meta, &bits[1..]).await.is_err());
            let long = BitmapMeta { bitmap: "x".repeat(256), ..meta.clone() };
            assert!(write_bitmap(&mut w, &long, &bits).await.is_err());
            let unnamed = BitmapMeta { node: String::new(), ..meta.clone() };
            assert!(write_bitmap(&mut w, &unnamed, &bits).await.is_err());
            assert!(w.is_empty());
        });
    }

    #[test]
    fn bad_bitmap_sections_are_refused_naming_the_bitmap() {
        rt().block_on(async {
            let (meta, bits) = odd_bitmap();
            let good = bitmap_payload(&meta, 0, &bits);
            // Offsets in `good`: names at 0..10, granularity 10, flags 14, size 15, first 23, count 31, kind 35.
            let err = |p: &[u8]| {
                let bytes = stream_of(&section_bytes(BITMAPS, p));
                async move { first_section(&bytes).await.unwrap_err() }
            };
            let text = |e: StreamError| e.to_string();
            let with = |at: usize, v: &[u8]| {
                let mut p = good.clone();
                p[at..at + v.len()].copy_from_slice(v);
                p
            };
            let e = text(err(&with(10, &1000u32.to_be_bytes())).await);
            assert!(e.starts_with("BITMAPS section of 69 bytes: bitmap 'inc0' of node 'disk': granularity"), "{e}");
            let e = text(err(&with(14, &[4])).await);
            assert!(e.ends_with("bitmap 'inc0' of node 'disk': unknown flags 0x04"), "{e}");
            let e = text(err(&with(23, &1u64.to_be_bytes())).await);
            assert!(e.ends_with("bytes 1+33 are outside its 33 bytes of bits"), "{e}");
            let e = text(err(&with(23, &u64::MAX.to_be_bytes())).await);
            assert!(e.contains("are outside its"), "{e}");
            let e = text(err(&with(31, &(MAX_BITMAP_CHUNK + 1).to_be_bytes())).await);
            assert!(
                e.ends_with(&format!("{} bytes of bits, more than {MAX_BITMAP_CHUNK}", MAX_BITMAP_CHUNK + 1)),
                "{e}"
            );
            let e = text(err(&with(35, &[2])).await);
            assert!(e.ends_with("unknown chunk kind 2"), "{e}");
            let e = text(err(&good[..good.len() - 1]).await);
            assert!(e.ends_with("32 bytes follow a chunk of 33 (kind 1)"), "{e}");
            let mut long = good.clone();
            long.push(0);
            assert!(text(err(&long).await).ends_with("34 bytes follow a chunk of 33 (kind 1)"));
            let zero = bitmap_payload(&meta, 0, &[0; 33]);
            let mut p = zero.clone();
            p.push(0);
            assert!(text(err(&p).await).ends_with("1 bytes follow a chunk of 33 (kind 0)"));
            // The names: empty, not UTF-8, running past the end; a payload cut short of its fields.
            let e = text(err(&with(0, &[0])).await);
            assert!(e.ends_with("an empty node name"), "{e}");
            let e = text(err(&with(6, &[0xff])).await);
            assert!(e.ends_with("the bitmap name is not UTF-8"), "{e}");
            let e = text(err(&[9, b'a']).await);
            assert!(e.ends_with("the node name of 9 bytes runs past the end"), "{e}");
            let e = text(err(&good[..20]).await);
            assert!(e.ends_with("short after the names"), "{e}");
            let e = text(err(&[]).await);
            assert!(e.ends_with("short before the node name"), "{e}");
        });
    }

    fn stream_of(section: &[u8]) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&VERSION.to_be_bytes());
        v.extend_from_slice(section);
        v
    }

    async fn first_section(bytes: &[u8]) -> Result<Section, StreamError> {
        let mut r = bytes;
        read_header(&mut r).await?;
        read_section(&mut r).await
    }

    #[test]
    fn a_flipped_bit_in_any_section_is_caught_and_named() {
        rt().block_on(async {
            for (name, sec) in one_of_each().await {
                let s = first_section(&stream_of(&sec)).await.unwrap();
                assert_eq!(s.name(), name);
                let bits = sec.len() * 8;
                // Every bit of small sections; a stride through a page of data.
                let stride = if bits > 1024 { 7 } else { 1 };
                for bit in (0..bits).step_by(stride) {
                    let mut bad = sec.clone();
                    bad[bit / 8] ^= 1 << (bit % 8);
                    let e = first_section(&stream_of(&bad)).await.unwrap_err();
                    let text = e.to_string();
                    if bit / 8 < SECTION_HEADER_LEN {
                        assert!(matches!(e, StreamError::HeaderChecksum), "{name} bit {bit}: {text}");
                        assert!(text.starts_with("section header: checksum mismatch"), "{text}");
                    } else {
                        assert!(matches!(e, StreamError::PayloadChecksum { .. }), "{name} bit {bit}: {text}");
                        assert!(text.starts_with(&format!("{name} section of ")), "{text}");
                        assert!(text.ends_with("payload checksum mismatch"), "{text}");
                    }
                }
            }
        });
    }

    /// A damaged length is refused from the header alone: the reader does
    /// not wait for the bytes that length promises.
    #[test]
    fn a_damaged_length_fails_before_the_payload_is_awaited() {
        rt().block_on(async {
            let mut sec = section_bytes(DEVICE, &7u32.to_be_bytes());
            sec[3] ^= 0x10; // the length's high bytes: 1 TiB promised
            let (mut a, mut b) = tokio::io::duplex(1 << 16);
            a.write_all(&sec[..SECTION_HEADER_LEN]).await.unwrap();
            // `a` stays open: a reader that trusted the length would wait forever.
            let r = tokio::time::timeout(std::time::Duration::from_secs(5), read_section(&mut b)).await;
            assert!(matches!(r, Ok(Err(StreamError::HeaderChecksum))), "{r:?}");
            drop(a);
        });
    }

    #[test]
    fn every_truncated_section_fails_and_names_the_section() {
        rt().block_on(async {
            for (name, sec) in one_of_each().await {
                for cut in 0..sec.len() {
                    let e = first_section(&stream_of(&sec[..cut])).await.unwrap_err();
                    let StreamError::Io(io) = &e else { panic!("{name} cut at {cut}: {e}") };
                    assert_eq!(io.kind(), std::io::ErrorKind::UnexpectedEof);
                    let text = io.to_string();
                    let want = match cut {
                        0 => "the stream ended before the next section".to_string(),
                        c if c < SECTION_HEADER_LEN => "section header: truncated".to_string(),
                        _ => format!("{name} section of "),
                    };
                    assert!(text.starts_with(&want), "{name} cut at {cut}: {text}");
                }
            }
        });
    }

    #[test]
    fn bad_tags_versions_and_lengths_are_named() {
        rt().block_on(async {
            let e = first_section(&stream_of(&section_bytes(42, &[1, 2, 3]))).await.unwrap_err();
            assert_eq!(e.to_string(), "unknown section tag 42");
            let e = first_section(&stream_of(&section_bytes_versioned(RAM, 2, &[]))).await.unwrap_err();
            assert_eq!(e.to_string(), "RAM section: version 2 is not supported (this build reads version 1)");
            // A well-checksummed header promising too much.
            let mut h = vec![DEVICE, 1];
            h.extend_from_slice(&(MAX_SECTION + 1).to_be_bytes());
            let crc = crc32c::crc32c(&h);
            h.extend_from_slice(&crc.to_be_bytes());
            let e = first_section(&stream_of(&h)).await.unwrap_err();
            assert_eq!(e.to_string(), format!("DEVICE section of {} bytes: too large", MAX_SECTION + 1));
            let e = first_section(&stream_of(&section_bytes(DEVICE, &[0; 5]))).await.unwrap_err();
            assert_eq!(e.to_string(), "DEVICE section of 5 bytes: wrong length");
            let e = first_section(&stream_of(&section_bytes(KVMCLOCK, &[0; 4]))).await.unwrap_err();
            assert_eq!(e.to_string(), "KVMCLOCK section of 4 bytes: wrong length");
            let e = first_section(&stream_of(&section_bytes_versioned(VCPU, 1, &[]))).await.unwrap_err();
            assert_eq!(e.to_string(), "VCPU section: version 1 is not supported (this build reads version 2)");
            let e = first_section(&stream_of(&section_bytes(END, &[2]))).await.unwrap_err();
            assert!(e.to_string().starts_with("END section of 1 bytes: running"), "{e}");
            // RAM: a page count the bytes do not bear out, an unknown marker, too many pages.
            let mut p = ram_payload(0, &[0u8; 2 * PAGE], true);
            p.pop();
            let e = first_section(&stream_of(&section_bytes(RAM, &p))).await.unwrap_err();
            assert_eq!(e.to_string(), "RAM section of 13 bytes: 2 pages cannot fit in it");
            let mut two = vec![1u8; PAGE];
            two.resize(2 * PAGE, 0);
            let mut p = ram_payload(0, &two, true);
            p.pop();
            let e = first_section(&stream_of(&section_bytes(RAM, &p))).await.unwrap_err();
            assert!(e.to_string().ends_with(": 1 of its 2 pages, the length does not match"), "{e}");
            let mut p = ram_payload(0, &[0u8; PAGE], true);
            p.push(0);
            let e = first_section(&stream_of(&section_bytes(RAM, &p))).await.unwrap_err();
            assert!(e.to_string().ends_with("the page count does not match the length"), "{e}");
            let mut p = ram_payload(0, &[0u8; PAGE], true);
            p[12] = 7;
            let e = first_section(&stream_of(&section_bytes(RAM, &p))).await.unwrap_err();
            assert!(e.to_string().ends_with("page 0 of 1 has an unknown marker 7"), "{e}");
            let mut p = ram_payload(0, &[], true);
            p[8..12].copy_from_slice(&(MAX_RUN as u32 + 1).to_be_bytes());
            let e = first_section(&stream_of(&section_bytes(RAM, &p))).await.unwrap_err();
            assert!(e.to_string().contains("more than 4096"), "{e}");
            let mut p = ram_payload(0, &[1u8; PAGE], true);
            p.truncate(12 + 1 + 100);
            let e = first_section(&stream_of(&section_bytes(RAM, &p))).await.unwrap_err();
            assert!(e.to_string().ends_with("page 0 of 1 runs past the section's end"), "{e}");
            // Another stream format.
            let mut v = MAGIC.to_vec();
            v.extend_from_slice(&3u32.to_be_bytes());
            let e = first_section(&v).await.unwrap_err();
            assert_eq!(e.to_string(), "migration stream version 3 is not supported (this build speaks 4)");
        });
    }

    #[test]
    fn zero_and_data_pages_round_trip() {
        rt().block_on(async {
            // zero, data, zero, zero, data (a page zero but for its last byte).
            let mut pages = vec![0u8; 5 * PAGE];
            pages[PAGE..2 * PAGE].fill(0xa5);
            pages[5 * PAGE - 1] = 1;
            let mut w = Vec::new();
            write_header(&mut w).await.unwrap();
            write_ram_with(&mut w, 10, &pages, true).await.unwrap();
            write_ram_with(&mut w, 15, &[0u8; 64 * PAGE], true).await.unwrap();
            write_end(&mut w, false).await.unwrap();
            let frame = SECTION_HEADER_LEN + 4;
            assert_eq!(w.len(), 12 + (frame + 12 + 5 + 2 * PAGE) + (frame + 12 + 64) + (frame + 1));
            let s = parse_all(&w).await.unwrap();
            assert!(matches!(&s[0], Section::Ram(r) if r.first_page == 10 && r.expand() == pages
                && r.zero == [true, false, true, true, false] && r.data.len() == 2 * PAGE));
            assert!(
                matches!(&s[1], Section::Ram(r) if r.first_page == 15 && r.zero == [true; 64] && r.data.is_empty())
            );
            assert!(matches!(s[2], Section::End { running: false }));
            // Without markers every page goes whole, and reads back the same.
            let mut w = Vec::new();
            write_header(&mut w).await.unwrap();
            write_ram_with(&mut w, 10, &pages, false).await.unwrap();
            assert_eq!(w.len(), 12 + frame + 12 + 5 * (PAGE + 1));
            let s = first_section(&w).await.unwrap();
            assert!(matches!(&s, Section::Ram(r) if r.first_page == 10 && r.expand() == pages && r.zero == [false; 5]));
            // Not whole pages, or too many: refused on the writing side.
            assert!(write_ram(&mut Vec::new(), 0, &[0u8; 100]).await.is_err());
            assert!(write_ram(&mut Vec::new(), 0, &vec![0u8; (MAX_RUN + 1) * PAGE]).await.is_err());
        });
    }

    #[test]
    fn a_hello_from_other_layouts_is_refused_naming_both() {
        rt().block_on(async {
            let ours = layout_hash();
            let theirs = ours ^ 0x8000;
            let mut w = Vec::new();
            write_header(&mut w).await.unwrap();
            let hello = Hello { memory: 1, vcpus: 1, disk_size: 1, layout: theirs, storage: false, lease: None };
            write_hello(&mut w, &hello).await.unwrap();
            let Section::Hello(h) = first_section(&w).await.unwrap() else { panic!("not HELLO") };
            assert_eq!(h.layout, theirs);
            let e = h.check_layout().unwrap_err();
            let text = e.to_string();
            assert!(text.starts_with("the stream layouts differ"), "{text}");
            assert!(text.contains(&format!("{theirs:#018x}")) && text.contains(&format!("{ours:#018x}")), "{text}");
            assert!(Hello { layout: ours, ..h }.check_layout().is_ok());
        });
    }

    #[test]
    fn the_layout_description_covers_every_section_and_the_vcpu_state() {
        let d = layout_description();
        for l in SECTIONS.iter().chain(REPLIES) {
            assert!(d.contains(&format!(" {} {} v{}: {}", l.tag, l.name, l.version, l.fields)), "{}", l.name);
        }
        assert!(d.contains(&format!("VCPU_STATE_LEN={VCPU_STATE_LEN}")) && d.contains(VCPU_FIELDS));
        for (index, name) in MIGRATED_MSRS {
            assert!(d.contains(&format!("{index:#x}={name}")), "{name}");
        }
        assert!(d.contains("(\"xsave\", 4096)"), "{d}");
        assert!(d.contains(&format!("format {VERSION}")));
        // One tag, one layout.
        for (i, l) in SECTIONS.iter().enumerate() {
            assert!(SECTIONS[i + 1..].iter().all(|m| m.tag != l.tag), "{}", l.name);
        }
        assert_eq!(layout_hash(), layout_hash());
        assert_ne!(layout_hash(), 0);
    }

    #[test]
    fn a_flipped_bit_in_any_reply_is_caught_and_named() {
        rt().block_on(async {
            let targets = vec![Target { node: "disk".into(), export: "e".into(), size: 4096, at: None }];
            for (name, reply) in [
                ("WELCOME", Reply::Welcome(Welcome { targets, lease: None })),
                ("REFUSED", Reply::Refused("no".into())),
                ("PREPARED", Reply::Prepared),
                ("COMMITTED", Reply::Committed),
                ("SYNCED", Reply::Synced),
            ] {
                let mut w = Vec::new();
                write_reply(&mut w, &reply).await.unwrap();
                for bit in 0..w.len() * 8 {
                    let mut bad = w.clone();
                    bad[bit / 8] ^= 1 << (bit % 8);
                    let e = read_reply(&mut &bad[..]).await.unwrap_err();
                    let StreamError::BadReply(text) = &e else { panic!("{name} bit {bit}: {e}") };
                    if bit / 8 < REPLY_HEADER_LEN {
                        assert_eq!(text, "reply header: checksum mismatch");
                    } else {
                        assert!(text.starts_with(name) && text.ends_with("payload checksum mismatch"), "{text}");
                    }
                }
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

        /// Well-framed sections and replies (good CRCs) with hostile contents.
        #[test]
        fn hostile_contents_never_panic(
            tag in proptest::prelude::any::<u8>(),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..(2 * PAGE + 64)),
        ) {
            let mut v = MAGIC.to_vec();
            v.extend_from_slice(&VERSION.to_be_bytes());
            v.extend_from_slice(&section_bytes(tag, &body));
            let _ = rt().block_on(parse_all(&v));
            let _ = rt().block_on(read_reply(&mut &reply_bytes(tag, &body)[..]));
        }

        /// Any bitmap, split anywhere, reads back as it was written.
        #[test]
        fn any_bitmap_round_trips(
            node in "[a-z][a-z0-9_.-]{0,40}",
            bitmap in "\\PC{1,60}",
            shift in 9u32..=31,
            flags in 0u8..4,
            size in 0u64..(1 << 24),
            chunk in 1usize..64,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let granularity = 1u32 << shift;
            let meta = BitmapMeta {
                node,
                bitmap,
                granularity,
                enabled: flags & 1 != 0,
                persistent: flags & 2 != 0,
                size: size.saturating_mul(u64::from(granularity) / 512),
            };
            let bits_len = meta.size.div_ceil(u64::from(granularity));
            let mut bits = vec![0u8; bits_len.div_ceil(8) as usize];
            let mut x = seed | 1;
            for bit in 0..bits_len.min(4096) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x % 5 == 0 {
                    bits[(bit / 8) as usize] |= 1 << (bit % 8);
                }
            }
            proptest::prop_assume!(meta.bitmap.len() <= 255);
            let got = rt().block_on(async {
                let mut w = Vec::new();
                write_bitmap_in(&mut w, &meta, &bits, chunk).await.unwrap();
                bitmaps_of(&w).await
            });
            proptest::prop_assert_eq!(got, vec![(meta, bits)]);
        }

        /// Any vCPU state the encoding can hold comes back field for field.
        #[test]
        fn any_vcpu_state_round_trips(
            words in proptest::collection::vec(proptest::prelude::any::<u64>(), 64),
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 1024),
            present in proptest::collection::vec(proptest::prelude::any::<bool>(), MIGRATED_MSRS.len()),
            nr_xcrs in 0u32..=16,
        ) {
            let mut st = odd_vcpu_state();
            let w = |i: usize| words[i % words.len()];
            st.regs.rax = w(0);
            st.regs.rip = w(1);
            st.sregs.cr3 = w(2);
            st.sregs.fs.base = w(3);
            st.sregs.gdt.limit = w(4) as u16;
            for (i, x) in st.xsave.iter_mut().enumerate() {
                *x = (w(i) >> (i % 32)) as u32;
            }
            st.xcrs.nr_xcrs = nr_xcrs;
            st.xcrs.xcrs[0].value = w(5);
            st.msrs = MIGRATED_MSRS
                .iter()
                .zip(&present)
                .enumerate()
                .filter(|(_, (_, p))| **p)
                .map(|(i, ((index, _), _))| kvm_bindings::kvm_msr_entry { index: *index, data: w(i), ..Default::default() })
                .collect();
            for (c, b) in st.lapic.regs.iter_mut().zip(&bytes) {
                *c = *b as std::os::raw::c_char;
            }
            st.events.exception.error_code = w(6) as u32;
            st.events.nmi.pending = bytes[0];
            st.events.exception_payload = w(7);
            st.events.flags = w(8) as u32;
            st.debugregs.db = [w(9), w(10), w(11), w(12)];
            st.debugregs.dr7 = w(13);
            st.mp_state.mp_state = w(14) as u32;
            let mut out = Vec::new();
            rt().block_on(async {
                write_header(&mut out).await.unwrap();
                write_vcpu(&mut out, 5, &st).await.unwrap();
            });
            let Section::Vcpu { id, state } = rt().block_on(first_section(&out)).unwrap() else { panic!("not VCPU") };
            proptest::prop_assert_eq!(id, 5);
            proptest::prop_assert!(*state == st, "{:?} != {:?}", state, st);
        }
    }
}
