//! vCPU threads: each runs KVM_RUN in a loop and can be stopped promptly.
//!
//! Stopping sets `run = false`, then sends every vCPU thread a signal whose
//! handler sets that thread's `kvm_run.immediate_exit`: a thread inside
//! KVM_RUN returns with EINTR, one about to enter returns at once, one in
//! user space sees the flag. `stop` returns only when every thread has left
//! KVM_RUN (`in_run == 0`). No polling: threads park on a condition variable.
//!
//! The VM has an in-kernel irqchip, so a vCPU that halts (the idle vCPUs
//! do, with interrupts off) sleeps inside KVM_RUN: it counts as running
//! until the kick takes it out with EINTR, as it does a busy vCPU.
//!
//! A vCPU's whole state ([`VcpuState`]: registers, FPU/SSE/AVX via XSAVE,
//! XCRs, MSRs, local APIC, pending events, debug registers, MP state) is
//! read and written on its own thread while every vCPU is parked.
//!
//! Fencing: a lease holder's vCPUs must not run guest code past the lease's
//! local deadline ([`Fence`]), even when the process was frozen (SIGSTOP,
//! a hung host) across it. Each vCPU thread arms a timer of its own at the
//! deadline whose signal is the kick (pending, if the process is frozen,
//! when it thaws: KVM_RUN returns before entering the guest), and checks
//! the deadline before every entry into KVM_RUN.
//!
//! ```text
//!  parked ──cont──> in KVM_RUN ──exit──> handle (doorbell, error)
//!    ^                  │                     │
//!    └──── stop (signal + immediate_exit) ────┘
//! ```

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use block::sync::{lock, wait, wait_timeout};

use kvm_bindings::{kvm_run, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use crate::VmmError;

/// The signal that kicks a vCPU out of KVM_RUN.
pub const KICK_SIGNAL: Signal = Signal::SIGUSR2;

thread_local! {
    /// This thread's kvm_run mapping, for the kick handler (null on other
    /// threads). A const-initialised `Cell` of a pointer: no lazy
    /// initialisation and no destructor, so the handler may read it.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Publishes a vCPU thread's kvm_run mapping to the kick handler for as long
/// as it lives; its drop clears it, also when the thread unwinds.
struct KickTarget;

impl KickTarget {
    fn set(run: *mut kvm_run) -> KickTarget {
        KVM_RUN.with(|r| r.set(run));
        KickTarget
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    }
}

extern "C" fn on_kick(_: nix::libc::c_int) {
    let p = KVM_RUN.with(|r| r.get());
    if !p.is_null() {
        // SAFETY: a non-null `p` is this thread's own kvm_run mapping: only
        // `KickTarget::set` stores it, on the vCPU thread that owns the
        // VcpuFd, and the `KickTarget` is dropped (pointer cleared) before
        // that VcpuFd and so before the mapping goes (see `spawn`: declared
        // after it, dropped first, also on unwind). The signal runs on the
        // same thread, so the mapping cannot go while it writes; the write is
        // one volatile byte store, async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
    }
}

/// Install the kick handler once per process.
pub fn install_kick_handler() -> Result<(), nix::Error> {
    static DONE: OnceLock<Result<(), nix::Error>> = OnceLock::new();
    *DONE.get_or_init(|| {
        // No SA_RESTART: KVM_RUN must come back with EINTR.
        let act = SigAction::new(SigHandler::Handler(on_kick), SaFlags::empty(), SigSet::empty());
        // SAFETY: sigaction is unsafe because the handler runs at any point
        // of any thread. `on_kick` only reads a const-initialised
        // thread-local (no allocation, no lock, no lazy init) and does one
        // volatile byte store through it: async-signal-safe. KICK_SIGNAL is
        // baton's own (nothing else in the process handles SIGUSR2), and the
        // OnceLock installs it once.
        unsafe { sigaction(KICK_SIGNAL, &act) }.map(|_| ())
    })
}

/// The instant after which no vCPU may enter KVM_RUN, on CLOCK_MONOTONIC
/// (which keeps counting while the process is stopped): the guest's lease's
/// local deadline. Open (no deadline) without a lease; closed (0) while a
/// leased guest holds no lease.
#[derive(Debug)]
pub struct Fence(AtomicU64);

impl Default for Fence {
    fn default() -> Self {
        Fence(AtomicU64::new(Fence::OPEN))
    }
}

impl Fence {
    const OPEN: u64 = u64::MAX;
    const CLOSED: u64 = 0;

    /// No deadline: the guest has no lease.
    pub fn open(&self) {
        self.0.store(Self::OPEN, Ordering::SeqCst);
    }

    /// No vCPU may enter KVM_RUN (a leased guest that holds no lease).
    pub fn close(&self) {
        self.0.store(Self::CLOSED, Ordering::SeqCst);
    }

    /// vCPUs may run until `deadline`.
    pub fn until(&self, deadline: std::time::Instant) {
        self.0.store(instant_ns(deadline).max(1), Ordering::SeqCst);
    }

    fn deadline_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Whether a vCPU may enter KVM_RUN now.
    pub fn allows_run(&self) -> bool {
        let d = self.deadline_ns();
        d == Self::OPEN || monotonic_ns() < d
    }
}

/// CLOCK_MONOTONIC in nanoseconds (`Instant`'s clock on Linux).
fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => (t.tv_sec() as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec() as u64),
        // Cannot fail for CLOCK_MONOTONIC; were it to, every deadline has passed.
        Err(_) => u64::MAX - 1,
    }
}

/// An `Instant` on CLOCK_MONOTONIC, in nanoseconds.
fn instant_ns(at: std::time::Instant) -> u64 {
    let (now, now_ns) = (std::time::Instant::now(), monotonic_ns());
    match at.checked_duration_since(now) {
        Some(ahead) => now_ns.saturating_add(ahead.as_nanos() as u64),
        None => now_ns.saturating_sub(now.duration_since(at).as_nanos() as u64),
    }
}

/// This vCPU thread's fence timer: a POSIX timer on CLOCK_MONOTONIC whose
/// expiry sends [`KICK_SIGNAL`] to this thread, armed at the fence's deadline.
struct FenceTimer {
    timer: Option<nix::sys::timer::Timer>,
    armed: u64,
}

impl FenceTimer {
    fn new(id: u64) -> FenceTimer {
        use nix::sys::signal::{SigEvent, SigevNotify};
        let ev = SigEvent::new(SigevNotify::SigevThreadId {
            signal: KICK_SIGNAL,
            thread_id: nix::unistd::gettid().as_raw(),
            si_value: 0,
        });
        let timer = match nix::sys::timer::Timer::new(nix::time::ClockId::CLOCK_MONOTONIC, ev) {
            Ok(t) => Some(t),
            Err(e) => {
                // Entries are still checked; only a vCPU already inside
                // KVM_RUN at the deadline waits for the VMM's own stop.
                tracing::error!(vcpu = id, error = %e, "cannot create the vCPU's fence timer");
                None
            }
        };
        FenceTimer { timer, armed: Fence::OPEN }
    }

    /// Arm at `deadline` (disarm when open), if it changed.
    fn arm(&mut self, deadline: u64) {
        use nix::sys::time::TimeSpec;
        use nix::sys::timer::{Expiration, TimerSetTimeFlags};
        if deadline == self.armed {
            return;
        }
        self.armed = deadline;
        let Some(t) = self.timer.as_mut() else { return };
        let at = match deadline {
            Fence::OPEN => TimeSpec::new(0, 0),
            // Already passed (closed): the entry check stops the vCPU.
            d => TimeSpec::new((d / 1_000_000_000) as i64, (d % 1_000_000_000).max(1) as i64),
        };
        if let Err(e) = t.set(Expiration::OneShot(at), TimerSetTimeFlags::TFD_TIMER_ABSTIME) {
            tracing::error!(error = %e, "cannot arm the vCPU's fence timer");
        }
    }
}

/// What a vCPU thread reports back.
pub trait ExitHandler: Send + Sync + 'static {
    /// A write to an I/O port.
    fn io_out(&self, port: u16, data: &[u8]);
    /// The guest cannot go on (triple fault, failed entry, internal error).
    fn fatal(&self, vcpu: u64, why: String);
    /// The vCPU reached the fence's deadline and parked (its guest's lease
    /// was not renewed in time): it enters KVM_RUN again only after a stop
    /// and a `cont` that proved the lease.
    fn fenced(&self, vcpu: u64);
}

/// The MSRs migration carries, in the stream's order ([`crate::stream::VCPU_FIELDS`]
/// names them): the ones a KVM guest's kernel sets up (SYSENTER/SYSCALL entry,
/// the TSC, PAT, the KVM paravirtual MSRs), each only where this host's KVM
/// lists it (`KVM_GET_MSR_INDEX_LIST`). `IA32_TSC_DEADLINE` comes last: it is
/// restored after the local APIC, whose timer mode decides whether KVM takes it.
/// (`KVM_WALL_CLOCK` is not state: writing it makes KVM write the wall clock
/// into guest RAM at its address; `EFER` and `APIC_BASE` travel in sregs.)
pub const MIGRATED_MSRS: &[(u32, &str)] = &[
    (0x10, "IA32_TSC"),
    (0x3b, "IA32_TSC_ADJUST"),
    (0x174, "IA32_SYSENTER_CS"),
    (0x175, "IA32_SYSENTER_ESP"),
    (0x176, "IA32_SYSENTER_EIP"),
    (0x1a0, "IA32_MISC_ENABLE"),
    (0x277, "IA32_PAT"),
    (0xc000_0081, "STAR"),
    (0xc000_0082, "LSTAR"),
    (0xc000_0083, "CSTAR"),
    (0xc000_0084, "SFMASK"),
    (0xc000_0102, "KERNEL_GS_BASE"),
    (0xc000_0103, "TSC_AUX"),
    (0x4b56_4d01, "KVM_SYSTEM_TIME_NEW"),
    (0x4b56_4d03, "KVM_STEAL_TIME"),
    (0x4b56_4d04, "KVM_PV_EOI_EN"),
    (0x4b56_4d05, "KVM_POLL_CONTROL"),
    // The interrupt vector before the enable that needs it.
    (0x4b56_4d06, "KVM_ASYNC_PF_INT"),
    (0x4b56_4d02, "KVM_ASYNC_PF_EN"),
    (MSR_IA32_TSC_DEADLINE, "IA32_TSC_DEADLINE"),
];

/// Restored after the local APIC (see [`MIGRATED_MSRS`]).
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Local APIC register offsets (in `kvm_lapic_state.regs`).
pub const APIC_TPR: usize = 0x80;
pub const APIC_LVTT: usize = 0x320;
pub const APIC_LVT0: usize = 0x350;
pub const APIC_LVT1: usize = 0x360;

/// A 32-bit local APIC register of a `kvm_lapic_state`.
pub fn lapic_reg(l: &kvm_bindings::kvm_lapic_state, off: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = l.regs.get(off + i).map_or(0, |&c| c as u8);
    }
    u32::from_le_bytes(b)
}

/// Set a 32-bit local APIC register of a `kvm_lapic_state` (an offset past its end is ignored).
pub fn set_lapic_reg(l: &mut kvm_bindings::kvm_lapic_state, off: usize, v: u32) {
    for (i, x) in v.to_le_bytes().into_iter().enumerate() {
        if let Some(c) = l.regs.get_mut(off + i) {
            *c = x as std::os::raw::c_char;
        }
    }
}

/// The bytes of the XSAVE region KVM_GET_XSAVE fills (the legacy `kvm_xsave`).
pub const XSAVE_LEN: usize = 4096;

/// Test knob: VMs made while it is set take the FPU and SSE state through
/// KVM_GET/SET_FPU, as on a KVM without XSAVE (the fallback path, which a
/// host with XSAVE would otherwise never run). On an XSAVE host only its
/// read side is faithful: there KVM_SET_FPU leaves XSTATE_BV alone.
#[doc(hidden)]
pub static FORCE_FPU_STATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What this host's KVM offers the vCPU state calls; the same for every vCPU of a VM.
#[derive(Debug, Clone, Default)]
pub struct VcpuCaps {
    /// KVM_GET/SET_XSAVE (else the FPU and SSE state goes through KVM_GET/SET_FPU).
    pub xsave: bool,
    /// KVM_GET/SET_XCRS.
    pub xcrs: bool,
    /// The [`MIGRATED_MSRS`] this host's KVM lists, in that order.
    pub msrs: Vec<u32>,
}

/// A vCPU's architectural state: what migration carries. CPUID is not in
/// it: it is the VM's configuration, set when the vCPU is made, before any
/// of this (a destination is built with the same configuration).
#[derive(Clone, PartialEq)]
pub struct VcpuState {
    pub regs: kvm_bindings::kvm_regs,
    pub sregs: kvm_bindings::kvm_sregs,
    /// The XSAVE region (KVM_GET_XSAVE); where KVM lacks XSAVE, the FPU and
    /// SSE state in its legacy FXSAVE layout with XSTATE_BV = x87|SSE.
    pub xsave: Box<[u32; XSAVE_LEN / 4]>,
    pub xcrs: kvm_bindings::kvm_xcrs,
    /// Entries of [`MIGRATED_MSRS`] only, in that order.
    pub msrs: Vec<kvm_bindings::kvm_msr_entry>,
    pub lapic: kvm_bindings::kvm_lapic_state,
    pub events: kvm_bindings::kvm_vcpu_events,
    pub debugregs: kvm_bindings::kvm_debugregs,
    pub mp_state: kvm_bindings::kvm_mp_state,
}

impl Default for VcpuState {
    fn default() -> Self {
        VcpuState {
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Box::new([0; XSAVE_LEN / 4]),
            xcrs: Default::default(),
            msrs: Vec::new(),
            lapic: kvm_bindings::kvm_lapic_state { regs: [0; 1024] },
            events: Default::default(),
            debugregs: Default::default(),
            mp_state: Default::default(),
        }
    }
}

impl VcpuState {
    /// XMM register `n` (0..16) from the XSAVE region's legacy area (0 for another `n`).
    pub fn xmm(&self, n: usize) -> u128 {
        if n >= 16 {
            return 0;
        }
        let w = |i: usize| u128::from(self.xsave.get(40 + 4 * n + i).copied().unwrap_or(0));
        w(0) | w(1) << 32 | w(2) << 64 | w(3) << 96
    }

    /// Set XMM register `n` (0..16; another `n` is ignored) in the XSAVE region, and mark the SSE
    /// component as holding state (XSTATE_BV bit 1).
    pub fn set_xmm(&mut self, n: usize, v: u128) {
        if n >= 16 {
            return;
        }
        for i in 0..4 {
            if let Some(w) = self.xsave.get_mut(40 + 4 * n + i) {
                *w = (v >> (32 * i)) as u32;
            }
        }
        self.xsave[XSTATE_BV_WORD] |= 0b10;
    }

    /// The value of MSR `index`, if the state carries it.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|e| e.index == index).map(|e| e.data)
    }

    /// Set MSR `index` (one of [`MIGRATED_MSRS`]), adding it if absent.
    pub fn set_msr(&mut self, index: u32, data: u64) {
        match self.msrs.iter_mut().find(|e| e.index == index) {
            Some(e) => e.data = data,
            None => self.msrs.push(kvm_bindings::kvm_msr_entry { index, data, ..Default::default() }),
        }
    }
}

/// The XSAVE header's XSTATE_BV, as a word of the region (byte 512).
const XSTATE_BV_WORD: usize = 512 / 4;

/// The FXSAVE image of a `kvm_fpu` (the first 512 bytes of an XSAVE region),
/// with XSTATE_BV = x87|SSE so an XSAVE-capable KVM takes it.
pub fn xsave_from_fpu(f: &kvm_bindings::kvm_fpu) -> Box<[u32; XSAVE_LEN / 4]> {
    let mut b = vec![0u8; XSAVE_LEN];
    b[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    b[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    b[4] = f.ftwx;
    b[6..8].copy_from_slice(&f.last_opcode.to_le_bytes());
    b[8..16].copy_from_slice(&f.last_ip.to_le_bytes());
    b[16..24].copy_from_slice(&f.last_dp.to_le_bytes());
    b[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
    // MXCSR_MASK: the bits of MXCSR a processor with SSE2 implements.
    b[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    for (i, r) in f.fpr.iter().enumerate() {
        b[32 + 16 * i..48 + 16 * i].copy_from_slice(r);
    }
    for (i, r) in f.xmm.iter().enumerate() {
        b[160 + 16 * i..176 + 16 * i].copy_from_slice(r);
    }
    b[512] = 0b11;
    let mut out = Box::new([0u32; XSAVE_LEN / 4]);
    for (w, c) in out.iter_mut().zip(b.chunks_exact(4)) {
        *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    out
}

/// The `kvm_fpu` of an XSAVE region's legacy area (the inverse of [`xsave_from_fpu`]).
pub fn fpu_from_xsave(x: &[u32; XSAVE_LEN / 4]) -> kvm_bindings::kvm_fpu {
    let b: Vec<u8> = x.iter().flat_map(|w| w.to_le_bytes()).collect();
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |o: usize| u64::from(u32_at(o)) | u64::from(u32_at(o + 4)) << 32;
    let mut f = kvm_bindings::kvm_fpu {
        fcw: u16_at(0),
        fsw: u16_at(2),
        ftwx: b[4],
        last_opcode: u16_at(6),
        last_ip: u64_at(8),
        last_dp: u64_at(16),
        mxcsr: u32_at(24),
        ..Default::default()
    };
    for (i, r) in f.fpr.iter_mut().enumerate() {
        r.copy_from_slice(&b[32 + 16 * i..48 + 16 * i]);
    }
    for (i, r) in f.xmm.iter_mut().enumerate() {
        r.copy_from_slice(&b[160 + 16 * i..176 + 16 * i]);
    }
    f
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("rsp", &self.regs.rsp)
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

fn failed(id: u64, op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::VcpuState { vcpu: id, op, source }
}

/// Read a stopped vCPU's whole state, on its own thread. MP state first (it
/// settles a pending INIT or SIPI), then the events, the registers, the FPU
/// and SSE state, the XCRs, the MSRs, the local APIC, the debug registers.
fn save_state(id: u64, vcpu: &VcpuFd, caps: &VcpuCaps) -> Result<VcpuState, VmmError> {
    let mp_state = vcpu.get_mp_state().map_err(failed(id, "KVM_GET_MP_STATE"))?;
    let events = vcpu.get_vcpu_events().map_err(failed(id, "KVM_GET_VCPU_EVENTS"))?;
    let regs = vcpu.get_regs().map_err(failed(id, "KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(failed(id, "KVM_GET_SREGS"))?;
    let xsave = if caps.xsave {
        Box::new(vcpu.get_xsave().map_err(failed(id, "KVM_GET_XSAVE"))?.region)
    } else {
        xsave_from_fpu(&vcpu.get_fpu().map_err(failed(id, "KVM_GET_FPU"))?)
    };
    let xcrs = if caps.xcrs { vcpu.get_xcrs().map_err(failed(id, "KVM_GET_XCRS"))? } else { Default::default() };
    let entries: Vec<kvm_bindings::kvm_msr_entry> =
        caps.msrs.iter().map(|&index| kvm_bindings::kvm_msr_entry { index, ..Default::default() }).collect();
    let msrs = if entries.is_empty() {
        Vec::new()
    } else {
        let mut m = Msrs::from_entries(&entries).map_err(|_| VmmError::Msrs {
            vcpu: id,
            op: "KVM_GET_MSRS",
            index: 0,
            why: "too many MSRs",
        })?;
        let n = vcpu.get_msrs(&mut m).map_err(failed(id, "KVM_GET_MSRS"))?;
        if n != entries.len() {
            let index = entries.get(n).map_or(0, |e| e.index);
            return Err(VmmError::Msrs { vcpu: id, op: "KVM_GET_MSRS", index, why: "KVM did not read it" });
        }
        m.as_slice().to_vec()
    };
    let lapic = vcpu.get_lapic().map_err(failed(id, "KVM_GET_LAPIC"))?;
    let debugregs = vcpu.get_debug_regs().map_err(failed(id, "KVM_GET_DEBUGREGS"))?;
    Ok(VcpuState { regs, sregs, xsave, xcrs, msrs, lapic, events, debugregs, mp_state })
}

/// Set MSRs; every one must be taken.
fn set_msrs(id: u64, vcpu: &VcpuFd, entries: &[kvm_bindings::kvm_msr_entry]) -> Result<(), VmmError> {
    if entries.is_empty() {
        return Ok(());
    }
    let m = Msrs::from_entries(entries).map_err(|_| VmmError::Msrs {
        vcpu: id,
        op: "KVM_SET_MSRS",
        index: 0,
        why: "too many MSRs",
    })?;
    let n = vcpu.set_msrs(&m).map_err(failed(id, "KVM_SET_MSRS"))?;
    if n != entries.len() {
        let index = entries.get(n).map_or(0, |e| e.index);
        return Err(VmmError::Msrs { vcpu: id, op: "KVM_SET_MSRS", index, why: "KVM refused its value" });
    }
    Ok(())
}

/// Load a whole state into a stopped vCPU, on its own thread, in the order
/// KVM needs (QEMU's kvm_arch_put_registers, cloud-hypervisor's
/// set_state): CPUID was set when the vCPU was made; then MP state, general
/// and segment registers (sregs bring EFER and APIC_BASE, so the APIC's mode
/// is known before its registers), FPU/SSE state (XSAVE, or the FPU where
/// KVM lacks it), XCRs, MSRs, the local APIC, the TSC deadline (which needs
/// the APIC's timer mode), the pending events, the debug registers.
fn restore_state(id: u64, vcpu: &VcpuFd, caps: &VcpuCaps, st: &VcpuState) -> Result<(), VmmError> {
    // Every MSR of the state must be one this host's KVM carries: none is dropped (I9).
    if let Some(e) = st.msrs.iter().find(|e| !caps.msrs.contains(&e.index)) {
        return Err(VmmError::Msrs {
            vcpu: id,
            op: "KVM_SET_MSRS",
            index: e.index,
            why: "this host's KVM does not carry it",
        });
    }
    vcpu.set_mp_state(st.mp_state).map_err(failed(id, "KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&st.regs).map_err(failed(id, "KVM_SET_REGS"))?;
    vcpu.set_sregs(&st.sregs).map_err(failed(id, "KVM_SET_SREGS"))?;
    if caps.xsave {
        let x = kvm_bindings::kvm_xsave { region: *st.xsave, ..Default::default() };
        // SAFETY: KVM_SET_XSAVE reads the XSAVE size KVM needs from `x`; that
        // size is at most the legacy 4096 bytes of `kvm_xsave`, which `x` has
        // whole: `Vm::new` checks KVM_CAP_XSAVE2 (the size KVM would need)
        // before making any vCPU, and this VMM never asks for the dynamic
        // XSTATE features (arch_prctl ARCH_REQ_XCOMP_GUEST_PERM) that would
        // make it larger.
        unsafe { vcpu.set_xsave(&x) }.map_err(failed(id, "KVM_SET_XSAVE"))?;
    } else {
        vcpu.set_fpu(&fpu_from_xsave(&st.xsave)).map_err(failed(id, "KVM_SET_FPU"))?;
    }
    if caps.xcrs {
        vcpu.set_xcrs(&st.xcrs).map_err(failed(id, "KVM_SET_XCRS"))?;
    }
    let (late, early): (Vec<_>, Vec<_>) = st.msrs.iter().copied().partition(|e| e.index == MSR_IA32_TSC_DEADLINE);
    set_msrs(id, vcpu, &early)?;
    vcpu.set_lapic(&st.lapic).map_err(failed(id, "KVM_SET_LAPIC"))?;
    set_msrs(id, vcpu, &late)?;
    vcpu.set_vcpu_events(&st.events).map_err(failed(id, "KVM_SET_VCPU_EVENTS"))?;
    vcpu.set_debug_regs(&st.debugregs).map_err(failed(id, "KVM_SET_DEBUGREGS"))?;
    Ok(())
}

/// A request to a parked vCPU thread (KVM's vCPU ioctls run on its own thread).
#[derive(Debug)]
enum StateOp {
    Save,
    Restore(Box<VcpuState>),
}

#[derive(Debug, Default)]
struct Ctl {
    /// vCPUs may run.
    run: bool,
    /// Threads must end.
    exit: bool,
    /// Threads currently between "start running" and "stopped" (I2: zero while paused).
    in_run: usize,
    /// Pending state requests, by vCPU id.
    requests: Vec<(u64, StateOp)>,
    /// Answers to them.
    answers: Vec<(u64, Result<Box<VcpuState>, VmmError>)>,
}

/// Shared control of every vCPU thread.
#[derive(Debug, Default)]
pub struct Vcpus {
    /// The lease's deadline for guest code (see [`Fence`]).
    pub fence: Arc<Fence>,
    ctl: Mutex<Ctl>,
    cond: Condvar,
    stop_flag: AtomicBool,
    threads: Mutex<Vec<(nix::sys::pthread::Pthread, std::thread::JoinHandle<()>)>>,
}

impl Vcpus {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ctl> {
        lock(&self.ctl)
    }

    /// Start a thread for `vcpu` (parked until `resume`).
    pub fn spawn(
        self: &Arc<Self>,
        id: u64,
        vcpu: VcpuFd,
        caps: Arc<VcpuCaps>,
        handler: Arc<dyn ExitHandler>,
    ) -> std::io::Result<()> {
        let me = self.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::Builder::new().name(format!("vcpu{id}")).spawn(move || {
            let _ = tx.send(nix::sys::pthread::pthread_self());
            // A local of this body, declared before the kick target: dropped after it.
            let mut vcpu = vcpu;
            let _kick = KickTarget::set(vcpu.get_kvm_run());
            me.thread_loop(id, &mut vcpu, &caps, &*handler);
        })?;
        let tid = rx.recv().map_err(std::io::Error::other)?;
        lock(&self.threads).push((tid, h));
        Ok(())
    }

    fn thread_loop(&self, id: u64, vcpu: &mut VcpuFd, caps: &VcpuCaps, handler: &dyn ExitHandler) {
        let mut timer = FenceTimer::new(id);
        loop {
            {
                let mut c = self.lock();
                while !c.run && !c.exit {
                    if let Some(i) = c.requests.iter().position(|(who, _)| *who == id) {
                        let (_, op) = c.requests.swap_remove(i);
                        let answer = Self::state_op(id, vcpu, caps, op);
                        c.answers.push((id, answer));
                        self.cond.notify_all();
                        continue;
                    }
                    c = wait(&self.cond, c);
                }
                if c.exit {
                    return;
                }
                c.in_run += 1;
            }
            let mut halted = false;
            // A kick that arrived while parked must not end this session at once.
            vcpu.set_kvm_immediate_exit(0);
            while !self.stop_flag.load(Ordering::SeqCst) && !halted {
                // The fence: armed before the check, so a deadline that
                // passes between the two still kicks the entry below.
                timer.arm(self.fence.deadline_ns());
                if !self.fence.allows_run() {
                    handler.fenced(id);
                    halted = true;
                    break;
                }
                match vcpu.run() {
                    Ok(VcpuExit::IoOut(port, data)) => handler.io_out(port, data),
                    Ok(VcpuExit::IoIn(_, data)) => data.fill(0xff),
                    Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
                    Ok(VcpuExit::MmioWrite(..)) => {}
                    // With the in-kernel local APIC a HLT sleeps inside KVM_RUN
                    // (until an interrupt or the kick); a HLT exit would come only
                    // without it: with no interrupts to wait for, idle until stopped.
                    Ok(VcpuExit::Hlt) => halted = true,
                    Ok(VcpuExit::Intr) => {}
                    Ok(other) => {
                        handler.fatal(id, format!("{other:?}"));
                        halted = true;
                    }
                    // A kick: KVM leaves immediate_exit set, so clear it or every
                    // later KVM_RUN returns at once; then the loop re-checks the flag.
                    Err(e) if e.errno() == nix::libc::EINTR || e.errno() == nix::libc::EAGAIN => {
                        vcpu.set_kvm_immediate_exit(0)
                    }
                    Err(e) => {
                        handler.fatal(id, format!("KVM_RUN failed: {e}"));
                        halted = true;
                    }
                }
            }
            vcpu.set_kvm_immediate_exit(0);
            let mut c = self.lock();
            c.in_run -= 1;
            if halted {
                // Idle until the next stop (then cont) or exit.
                self.cond.notify_all();
                while c.run && !c.exit {
                    c = wait(&self.cond, c);
                }
            }
            self.cond.notify_all();
        }
    }

    fn state_op(id: u64, vcpu: &VcpuFd, caps: &VcpuCaps, op: StateOp) -> Result<Box<VcpuState>, VmmError> {
        match op {
            StateOp::Save => save_state(id, vcpu, caps).map(Box::new),
            StateOp::Restore(st) => {
                restore_state(id, vcpu, caps, &st)?;
                Ok(st)
            }
        }
    }

    /// Run a state request on vCPU `id`'s own thread; the vCPUs must be paused.
    fn request(&self, id: u64, op: StateOp) -> Result<Box<VcpuState>, VmmError> {
        let mut c = self.lock();
        if c.run || c.in_run > 0 {
            return Err(VmmError::VcpusRunning);
        }
        let threads = lock(&self.threads).len() as u64;
        if id >= threads {
            return Err(VmmError::NoVcpu(id));
        }
        c.requests.push((id, op));
        self.cond.notify_all();
        loop {
            if let Some(i) = c.answers.iter().position(|(who, _)| *who == id) {
                return c.answers.swap_remove(i).1;
            }
            c = wait(&self.cond, c);
        }
    }

    /// The state of vCPU `id` (stopped).
    pub fn save(&self, id: u64) -> Result<VcpuState, VmmError> {
        self.request(id, StateOp::Save).map(|b| *b)
    }

    /// Load a state into vCPU `id` (stopped).
    pub fn restore(&self, id: u64, st: VcpuState) -> Result<(), VmmError> {
        self.request(id, StateOp::Restore(Box::new(st))).map(|_| ())
    }

    fn kick_all(&self) {
        for (tid, _) in lock(&self.threads).iter() {
            let _ = nix::sys::pthread::pthread_kill(*tid, KICK_SIGNAL);
        }
    }

    /// Let every vCPU run.
    pub fn resume(&self) {
        let mut c = self.lock();
        self.stop_flag.store(false, Ordering::SeqCst);
        c.run = true;
        self.cond.notify_all();
    }

    /// Stop every vCPU; returns once none is in KVM_RUN.
    pub fn pause(&self) {
        let mut c = self.lock();
        c.run = false;
        self.stop_flag.store(true, Ordering::SeqCst);
        self.cond.notify_all();
        while c.in_run > 0 {
            drop(c);
            self.kick_all();
            c = self.lock();
            if c.in_run == 0 {
                break;
            }
            c = wait_timeout(&self.cond, c, std::time::Duration::from_millis(5));
        }
    }

    /// Whether any vCPU is between start and stop.
    pub fn any_in_run(&self) -> bool {
        self.lock().in_run > 0
    }

    /// End every thread (the VM is going away).
    pub fn shutdown(&self) {
        self.pause();
        {
            let mut c = self.lock();
            c.exit = true;
            self.cond.notify_all();
        }
        let threads = std::mem::take(&mut *lock(&self.threads));
        for (_, h) in threads {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fpu_state_round_trips_through_an_xsave_region() {
        let mut f = kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            fsw: 0x1234,
            ftwx: 0xa5,
            last_opcode: 0x7ff,
            last_ip: 0x1122_3344_5566_7788,
            last_dp: 0x99aa_bbcc_ddee_ff00,
            mxcsr: 0x1fa0,
            ..Default::default()
        };
        for (i, r) in f.fpr.iter_mut().enumerate() {
            *r = [i as u8 + 1; 16];
        }
        for (i, r) in f.xmm.iter_mut().enumerate() {
            *r = [0x40 + i as u8; 16];
        }
        let x = xsave_from_fpu(&f);
        assert_eq!(x[XSTATE_BV_WORD], 0b11, "x87 and SSE hold state");
        assert_eq!(x[6], 0x1fa0, "MXCSR at byte 24");
        let st = VcpuState { xsave: x.clone(), ..Default::default() };
        assert_eq!(st.xmm(3), u128::from_le_bytes([0x43; 16]));
        let back = fpu_from_xsave(&x);
        assert_eq!(back.fpr, f.fpr);
        assert_eq!(back.xmm, f.xmm);
        assert_eq!(
            (back.fcw, back.fsw, back.ftwx, back.last_opcode, back.last_ip, back.last_dp, back.mxcsr),
            (f.fcw, f.fsw, f.ftwx, f.last_opcode, f.last_ip, f.last_dp, f.mxcsr)
        );
    }

    #[test]
    fn lapic_registers_and_xmm_values_read_back() {
        let mut st = VcpuState::default();
        set_lapic_reg(&mut st.lapic, APIC_LVTT, 0x4_00ef);
        assert_eq!(lapic_reg(&st.lapic, APIC_LVTT), 0x4_00ef);
        set_lapic_reg(&mut st.lapic, 1022, u32::MAX); // past the end: the part inside is set
        assert_eq!(lapic_reg(&st.lapic, 1022), 0xffff);
        st.set_xmm(5, u128::MAX - 7);
        assert_eq!(st.xmm(5), u128::MAX - 7);
        st.set_xmm(16, 1);
        assert_eq!(st.xmm(16), 0, "no xmm16 in the legacy area");
        st.set_msr(0x10, 5);
        st.set_msr(0x10, 6);
        assert_eq!((st.msr(0x10), st.msrs.len()), (Some(6), 1));
    }
}
