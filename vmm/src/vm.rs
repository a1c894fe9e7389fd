//! The VM: KVM setup, guest memory, vCPU threads, the block device, the
//! guest workload, and the run states (QEMU's names).
//!
//! ```text
//!  prelaunch ──cont──> running ──stop──> paused ──cont──> running
//!  inmigrate ──(incoming done)──> paused/running
//!  running ──(migration)──> finish-migrate ──> postmigrate
//! ```
//! I2: vCPUs run only while every node the VM uses is active; `cont` checks.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block::sync::lock;
use block::BlockBackend;
use kvm_bindings::CpuId;
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress};

use crate::device::{BlockDevice, ErrorSink};
use crate::layout::*;
use crate::memory::{self, Mem};
use crate::vcpu::{lapic_reg, set_lapic_reg, ExitHandler, VcpuCaps, Vcpus, APIC_LVT0, APIC_LVT1, MIGRATED_MSRS};
use crate::VmmError;

/// QEMU's RunState names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Prelaunch,
    Running,
    Paused,
    InMigrate,
    FinishMigrate,
    PostMigrate,
    InternalError,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::InMigrate => "inmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::PostMigrate => "postmigrate",
            RunState::InternalError => "internal-error",
        }
    }
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub memory: u64,
    pub vcpus: u32,
    /// Random seed of the workload.
    pub seed: u32,
    /// RAM pages the guest dirties per batch.
    pub dirty_pages: u32,
    /// Writes in flight per batch (1..=8).
    pub batch: u32,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self { memory: 64 << 20, vcpus: 1, seed: 0x1234_5678, dirty_pages: 4, batch: 4 }
    }
}

/// The guest's published counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestStats {
    pub writes: u32,
    pub checks: u32,
    pub mismatches: u32,
    pub io_errors: u32,
    pub batches: u32,
    pub last_bad_block: u32,
    /// Batches whose check of the guest's own SSE registers failed (also in `mismatches`).
    pub cpu_mismatches: u32,
}

/// The result of a full verification pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyResult {
    pub checked: u32,
    pub bad: u32,
    /// The request's nonce, which the guest echoed after its pass.
    pub request: u32,
}

/// Everything a stopped guest is made of, but its disk (which the block
/// layer hands over): what a migration carries, and what `restore` loads
/// into a VM built with the same configuration.
#[derive(Debug, Clone)]
pub struct VmState {
    pub memory: u64,
    /// Guest RAM, page by page from address 0.
    pub ram: Vec<u8>,
    pub vcpus: Vec<crate::vcpu::VcpuState>,
    /// The block device's consumed counter.
    pub device: u32,
    /// The KVM clock (kvmclock's nanoseconds; KVM_GET_CLOCK, one per VM).
    pub clock: u64,
}

/// Sink for VM events (STOP, RESUME, BLOCK_IO_ERROR).
pub type VmEvents = Arc<dyn Fn(&str, Value) + Send + Sync>;

struct Exits {
    device: Arc<BlockDevice>,
    fatal: Mutex<Option<String>>,
}

impl ExitHandler for Exits {
    fn io_out(&self, port: u16, _data: &[u8]) {
        if u64::from(port) == DOORBELL_PORT {
            self.device.doorbell();
        }
    }
    fn fatal(&self, vcpu: u64, why: String) {
        tracing::error!(vcpu, "guest stopped: {why}");
        lock(&self.fatal).get_or_insert(format!("vcpu {vcpu}: {why}"));
    }
    fn fenced(&self, vcpu: u64) {
        tracing::warn!(vcpu, "the lease's deadline passed: the vCPU stopped entering the guest");
    }
}

pub struct Vm {
    _kvm: Kvm,
    vm: VmFd,
    mem: Arc<Mem>,
    vcpus: Arc<Vcpus>,
    device: Arc<BlockDevice>,
    exits: Arc<Exits>,
    state: Mutex<RunState>,
    /// Serialises stop/cont/verify.
    control: tokio::sync::Mutex<()>,
    events: VmEvents,
    config: VmConfig,
    /// Source of verification nonces: unique per process and per request, so
    /// an answer found in RAM that came from another host (or an earlier
    /// request) never matches.
    verify_nonce: Mutex<u64>,
    /// Times the vCPUs were resumed, and when they last stopped: a mirror
    /// that ended after the last stop, with no resume since, saw the guest's
    /// last write (a migration checks this when libvirt cancelled the mirrors).
    runs: std::sync::atomic::AtomicU64,
    last_stop: Mutex<Option<Instant>>,
    /// How long the last stop waited for the device's requests in flight.
    last_drain: Mutex<Duration>,
    /// The guest's lease (`--lease`): vCPUs run only while it is held.
    tenure: std::sync::OnceLock<Arc<crate::tenure::Tenure>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("state", &self.state()).finish_non_exhaustive()
    }
}

/// Where extra vCPUs idle: `hlt; jmp .-1`.
const IDLE_CODE: u64 = CODE - 16;

/// The CPUID of vCPU `id`: everything this host's KVM supports (XSAVE and
/// its leaf 0xD included), with the vCPU's APIC id in leaf 1 (EBX[31:24])
/// and its x2APIC id in leaves 0xB and 0x1F (EDX).
fn vcpu_cpuid(supported: &CpuId, id: u64) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | ((id as u32 & 0xff) << 24),
            0xb | 0x1f => e.edx = id as u32,
            _ => {}
        }
    }
    c
}

/// Make vCPU `id`, in the order KVM needs: CPUID first, then registers (32-bit
/// protected mode, SSE on), the local APIC's LINT0/LINT1 wiring (ExtINT and
/// NMI, as a PC's BIOS leaves them), and for an AP the MP state: KVM makes
/// APs wait for a SIPI, and the idle vCPUs run (to their HLT) instead.
fn setup_vcpu(vm: &VmFd, cpuid: &CpuId, id: u64, rip: u64) -> Result<kvm_ioctls::VcpuFd, VmmError> {
    let vcpu = vm.create_vcpu(id).map_err(|source| VmmError::Kvm { op: "KVM_CREATE_VCPU", source })?;
    vcpu.set_cpuid2(&vcpu_cpuid(cpuid, id)).map_err(|source| VmmError::VcpuState {
        vcpu: id,
        op: "KVM_SET_CPUID2",
        source,
    })?;
    let mut sregs = vcpu.get_sregs().map_err(|source| VmmError::VcpuState { vcpu: id, op: "KVM_GET_SREGS", source })?;
    // 32-bit protected mode, flat 4 GiB segments, no paging.
    let code = kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_bindings::kvm_segment { selector: 0x10, type_: 0x3, ..code };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 |= 0x1; // PE
    sregs.cr0 &= !0x8000_0000; // no paging

    // SSE for the workload's register check: no x87 emulation (EM), WAIT
    // honours TS (MP), FXSAVE/SSE and SIMD exceptions enabled (OSFXSR, OSXMMEXCPT).
    sregs.cr0 = (sregs.cr0 & !(CR0_EM | CR0_TS)) | CR0_MP;
    sregs.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT;
    vcpu.set_sregs(&sregs).map_err(|source| VmmError::VcpuState { vcpu: id, op: "KVM_SET_SREGS", source })?;
    let regs = kvm_bindings::kvm_regs { rip, rsp: STACK_TOP, rflags: 0x2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(|source| VmmError::VcpuState { vcpu: id, op: "KVM_SET_REGS", source })?;
    let mut lapic = vcpu.get_lapic().map_err(|source| VmmError::VcpuState { vcpu: id, op: "KVM_GET_LAPIC", source })?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let v = lapic_reg(&lapic, reg);
        set_lapic_reg(&mut lapic, reg, (v & !0x700) | (mode << 8));
    }
    vcpu.set_lapic(&lapic).map_err(|source| VmmError::VcpuState { vcpu: id, op: "KVM_SET_LAPIC", source })?;
    if id > 0 {
        let runnable = kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE };
        vcpu.set_mp_state(runnable).map_err(|source| VmmError::VcpuState {
            vcpu: id,
            op: "KVM_SET_MP_STATE",
            source,
        })?;
    }
    Ok(vcpu)
}

const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// LVT delivery modes (bits 10:8).
const APIC_MODE_NMI: u32 = 0b100;
const APIC_MODE_EXTINT: u32 = 0b111;

/// What this host's KVM offers for a vCPU's state (see [`VcpuCaps`]).
fn vcpu_caps(kvm: &Kvm) -> Result<VcpuCaps, VmmError> {
    let xsave = kvm.check_extension(Cap::Xsave) && !crate::vcpu::FORCE_FPU_STATE.load(Ordering::SeqCst);
    if xsave {
        // KVM_CAP_XSAVE2 is the XSAVE size KVM_GET/SET_XSAVE would need; more
        // than `kvm_xsave` holds (dynamic features such as AMX, which this
        // VMM never asks for) and the legacy calls would truncate or overrun.
        let size = kvm.check_extension_int(Cap::Xsave2);
        if size > crate::vcpu::XSAVE_LEN as i32 {
            return Err(VmmError::XsaveSize(size as usize));
        }
    }
    let listed = kvm.get_msr_index_list().map_err(|source| VmmError::Kvm { op: "KVM_GET_MSR_INDEX_LIST", source })?;
    let listed = listed.as_slice();
    let msrs = MIGRATED_MSRS.iter().map(|&(i, _)| i).filter(|i| listed.contains(i)).collect();
    Ok(VcpuCaps { xsave, xcrs: kvm.check_extension(Cap::Xcrs), msrs })
}

impl Vm {
    /// Build the VM (vCPUs parked in `prelaunch`, or `inmigrate` if `incoming`).
    pub fn new(
        config: VmConfig,
        disk: BlockBackend,
        rt: tokio::runtime::Handle,
        events: VmEvents,
        incoming: bool,
    ) -> Result<Arc<Vm>, VmmError> {
        if !std::path::Path::new("/dev/kvm").exists() {
            return Err(VmmError::NoKvm);
        }
        if config.vcpus == 0 || config.vcpus > 8 {
            return Err(VmmError::VcpuRange { max: 8 });
        }
        if config.memory < 8 << 20 || config.memory % memory::PAGE_SIZE != 0 {
            return Err(VmmError::MemorySize);
        }
        if !(1..=MAX_BATCH as u32).contains(&config.batch) {
            return Err(VmmError::BatchRange { max: MAX_BATCH });
        }
        if WORKLOAD.is_empty() {
            return Err(VmmError::NoWorkload);
        }
        crate::vcpu::install_kick_handler().map_err(|source| VmmError::KickHandler { source })?;
        let kvm = Kvm::new().map_err(|source| VmmError::Kvm { op: "open /dev/kvm", source })?;
        let vm = kvm.create_vm().map_err(|source| VmmError::Kvm { op: "KVM_CREATE_VM", source })?;
        vm.set_tss_address(0xfffb_d000).map_err(|source| VmmError::Kvm { op: "KVM_SET_TSS_ADDR", source })?;
        // The in-kernel PIC, IOAPIC and a local APIC per vCPU: before any vCPU is made.
        // KVM sets up the default IRQ routing here and waits for an SRCU grace
        // period (kvm_set_irq_routing): milliseconds as a rule, but seconds (10 s
        // and more seen) on a loaded nested host, and `Vm::new` waits with it.
        vm.create_irq_chip().map_err(|source| VmmError::Kvm { op: "KVM_CREATE_IRQCHIP", source })?;
        let caps = Arc::new(vcpu_caps(&kvm)?);
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmmError::Kvm { op: "KVM_GET_SUPPORTED_CPUID", source })?;
        let mem = memory::create(&vm, config.memory)?;
        let ev = events.clone();
        let on_error: ErrorSink = Arc::new(move |node: &str, op: &str, msg: &str| {
            ev(
                "BLOCK_IO_ERROR",
                json!({"device": "disk0", "node-name": node, "operation": op, "action": "report", "nospace": msg.contains("space"), "reason": msg}),
            );
        });
        let device = BlockDevice::new(mem.clone(), disk, rt, on_error);
        if device.blocks() == 0 {
            return Err(VmmError::DiskTooSmall);
        }
        let w = |addr: u64, v: u32| {
            mem.write_obj(v, GuestAddress(addr)).map_err(|source| memory::error("write", addr, 4, source))
        };
        mem.write_slice(WORKLOAD, GuestAddress(CODE))
            .map_err(|source| memory::error("write", CODE, WORKLOAD.len(), source))?;
        let idle = [0xf4, 0xeb, 0xfd];
        mem.write_slice(&idle, GuestAddress(IDLE_CODE))
            .map_err(|source| memory::error("write", IDLE_CODE, idle.len(), source))?;
        w(CFG_NBLOCKS, device.blocks())?;
        w(CFG_SEED, config.seed)?;
        w(CFG_DIRTY_PAGES, config.dirty_pages)?;
        w(CFG_BATCH, config.batch)?;
        w(CFG_MAGIC, MAGIC as u32)?;
        let exits = Arc::new(Exits { device: device.clone(), fatal: Mutex::new(None) });
        let vcpus = Arc::new(Vcpus::default());
        for id in 0..u64::from(config.vcpus) {
            let started = setup_vcpu(&vm, &cpuid, id, if id == 0 { CODE } else { IDLE_CODE }).and_then(|vcpu| {
                vcpus
                    .spawn(id, vcpu, caps.clone(), exits.clone())
                    .map_err(|source| VmmError::VcpuThread { vcpu: id, source })
            });
            if let Err(e) = started {
                // No vCPU thread outlives a VM that was never made (nor its memory).
                vcpus.shutdown();
                return Err(e);
            }
        }
        let state = if incoming { RunState::InMigrate } else { RunState::Prelaunch };
        Ok(Arc::new(Vm {
            _kvm: kvm,
            vm,
            mem,
            vcpus,
            device,
            exits,
            state: Mutex::new(state),
            control: tokio::sync::Mutex::new(()),
            events,
            config,
            verify_nonce: Mutex::new(initial_nonce()),
            runs: std::sync::atomic::AtomicU64::new(0),
            last_stop: Mutex::new(Some(Instant::now())),
            last_drain: Mutex::new(Duration::ZERO),
            tenure: std::sync::OnceLock::new(),
        }))
    }

    /// Keep the guest's lease with `t`: from now on its vCPUs run only
    /// while `t` holds the lease (once, before the guest first runs).
    pub fn set_tenure(self: &Arc<Self>, t: Arc<crate::tenure::Tenure>) {
        if self.tenure.set(t.clone()).is_ok() {
            t.attach(self, self.vcpus.fence.clone(), self.events.clone());
        }
    }

    /// The guest's lease, if it has one.
    pub fn tenure(&self) -> Option<&Arc<crate::tenure::Tenure>> {
        self.tenure.get()
    }

    pub fn state(&self) -> RunState {
        if self.fatal_error().is_some() {
            return RunState::InternalError;
        }
        *lock(&self.state)
    }

    pub fn set_state(&self, s: RunState) {
        *lock(&self.state) = s;
    }

    pub fn is_running(&self) -> bool {
        self.state() == RunState::Running
    }

    pub fn device(&self) -> &Arc<BlockDevice> {
        &self.device
    }

    pub fn memory(&self) -> &Arc<Mem> {
        &self.mem
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The guest stopped on its own (triple fault and the like).
    pub fn fatal_error(&self) -> Option<String> {
        lock(&self.exits.fatal).clone()
    }

    /// I2: every node under the disk must be active before vCPUs run.
    fn check_active(&self) -> Result<(), VmmError> {
        let mut n = Some(self.device.backend().node());
        while let Some(node) = n {
            if !node.is_active() {
                return Err(VmmError::InactiveDisk(node.name().to_string()));
            }
            n = node.child().cloned();
        }
        Ok(())
    }

    /// `cont`: run the vCPUs.
    pub async fn cont(&self) -> Result<(), VmmError> {
        let _c = self.control.lock().await;
        match self.state() {
            RunState::Running => return Ok(()),
            RunState::InMigrate => return Err(VmmError::WaitingForMigration),
            // I8: the guest now runs on the destination; running it here too is never allowed.
            RunState::PostMigrate => {
                // With a lease, say who holds it now.
                if let Some(t) = self.tenure.get() {
                    if let crate::tenure::Phase::Transferred { to, generation } = t.phase() {
                        let key = t.key().to_string();
                        let e = crate::tenure::TenureError::Transferred { key, to, generation };
                        return Err(VmmError::Lease(e));
                    }
                }
                return Err(VmmError::MigratedAway);
            }
            // The switchover owns the guest: its disks are being handed over.
            RunState::FinishMigrate => return Err(VmmError::InSwitchover),
            RunState::InternalError => return Err(VmmError::GuestFailed(self.fatal_error().unwrap_or_default())),
            _ => {}
        }
        // The lease first: a guest that runs elsewhere now is the reason
        // that matters (held now, renewed or acquired if free, or no run).
        if let Some(t) = self.tenure.get() {
            t.prove().await.map_err(VmmError::Lease)?;
        }
        self.check_active()?;
        // A guest that arrived by migration held no permission while it waited
        // (the disk was the mirror's target): take the exclusive writer now.
        let be = self.device.backend();
        if be.perms() != block::PermSet::GUEST_WRITER {
            be.set_perms(block::PermSet::GUEST_WRITER, true).map_err(VmmError::TakeDisk)?;
        }
        self.set_state(RunState::Running);
        self.runs.fetch_add(1, Ordering::SeqCst);
        *lock(&self.last_stop) = None;
        self.vcpus.resume();
        (self.events)("RESUME", json!({}));
        Ok(())
    }

    /// When the vCPUs stopped, if they are stopped now.
    pub fn stopped_since(&self) -> Option<Instant> {
        if self.is_running() {
            return None;
        }
        *lock(&self.last_stop)
    }

    /// `stop`: returns once every vCPU has left KVM_RUN and the device is drained.
    pub async fn stop(&self) -> Result<Duration, VmmError> {
        let _c = self.control.lock().await;
        if let Some(t) = self.tenure.get() {
            t.stopped();
        }
        self.stop_locked(RunState::Paused).await
    }

    /// The lease's deadline passed: stop a running guest (its vCPUs already
    /// stopped entering KVM_RUN at the deadline).
    pub(crate) async fn stop_fenced(&self) -> Result<Duration, VmmError> {
        let _c = self.control.lock().await;
        if !self.is_running() {
            return Ok(Duration::ZERO);
        }
        self.stop_locked(RunState::Paused).await
    }

    /// Run a guest its lease fenced, now that the lease can be proven again
    /// (only from `paused`: an operator's or a migration's state stands).
    pub(crate) async fn resume_leased(&self) -> Result<(), VmmError> {
        if self.state() != RunState::Paused {
            return Err(VmmError::NotRunning);
        }
        self.cont().await
    }

    /// Stop into a given state (a migration stops into finish-migrate).
    pub async fn stop_into(&self, to: RunState) -> Result<Duration, VmmError> {
        let _c = self.control.lock().await;
        self.stop_locked(to).await
    }

    /// Stop into a given state, with the control lock held.
    pub async fn stop_locked(&self, to: RunState) -> Result<Duration, VmmError> {
        self.stop_bounded_locked(to, None).await
    }

    /// Stop into `to`, waiting at most `drain` for the device's requests in
    /// flight. The run state says `to` as soon as the vCPUs are out of
    /// KVM_RUN (never `running` while they are stopped); a drain that times
    /// out is an error and leaves the vCPUs stopped.
    pub async fn stop_bounded(&self, to: RunState, drain: Duration) -> Result<Duration, VmmError> {
        let _c = self.control.lock().await;
        self.stop_bounded_locked(to, Some(drain)).await
    }

    async fn stop_bounded_locked(&self, to: RunState, drain: Option<Duration>) -> Result<Duration, VmmError> {
        let t = Instant::now();
        let was_running = self.is_running();
        // The run state says the guest is stopping from the moment it is
        // asked to: pause() can wait for a vCPU stuck in a blocked write, and
        // a `query-status` meanwhile must not say `running`.
        self.set_state(to);
        // pause() waits on a condition variable: keep it off the async workers.
        let vcpus = self.vcpus.clone();
        let _ = tokio::task::spawn_blocking(move || vcpus.pause()).await;
        if was_running {
            (self.events)("STOP", json!({}));
        }
        let drained = Instant::now();
        match drain {
            None => self.device.drain().await,
            Some(limit) => {
                if tokio::time::timeout(limit, self.device.drain()).await.is_err() {
                    return Err(VmmError::DrainTimeout(limit));
                }
            }
        }
        *lock(&self.last_drain) = drained.elapsed();
        // The guest's last write is complete only now.
        lock(&self.last_stop).get_or_insert_with(Instant::now);
        Ok(t.elapsed())
    }

    /// How long the last stop waited for the device's requests in flight
    /// (the rest of its time went to stopping the vCPUs).
    pub fn last_drain(&self) -> Duration {
        *lock(&self.last_drain)
    }

    /// The guest's counters.
    pub fn stats(&self) -> GuestStats {
        let r = |a: u64| self.mem.read_obj::<u32>(GuestAddress(a)).unwrap_or(0);
        GuestStats {
            writes: r(ST_WRITES),
            checks: r(ST_CHECKS),
            mismatches: r(ST_MISMATCHES),
            io_errors: r(ST_IOERRORS),
            batches: r(ST_BATCHES),
            last_bad_block: r(ST_LAST_BAD),
            cpu_mismatches: r(ST_CPU_MISMATCHES),
        }
    }

    /// Ask the guest for a full pass over every block it wrote; wait for its answer.
    pub async fn verify(&self, timeout: Duration) -> Result<VerifyResult, VmmError> {
        if !self.is_running() {
            return Err(VmmError::NotRunning);
        }
        let done_before = self.mem.read_obj::<u32>(GuestAddress(VERIFY_DONE)).unwrap_or(0);
        let req_before = self.mem.read_obj::<u32>(GuestAddress(VERIFY_REQ)).unwrap_or(0);
        let seq = {
            let mut s = lock(&self.verify_nonce);
            loop {
                *s = next_nonce(*s);
                let n = (*s >> 32) as u32;
                if n != 0 && n != done_before && n != req_before {
                    break n;
                }
            }
        };
        self.mem
            .write_obj(seq, GuestAddress(VERIFY_REQ))
            .map_err(|source| memory::error("write", VERIFY_REQ, 4, source))?;
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.mem.read_obj::<u32>(GuestAddress(VERIFY_DONE)).unwrap_or(0);
            if done == seq {
                let r = |a: u64| self.mem.read_obj::<u32>(GuestAddress(a)).unwrap_or(0);
                return Ok(VerifyResult { checked: r(VERIFY_CHECKED), bad: r(VERIFY_BAD), request: seq });
            }
            if let Some(f) = self.fatal_error() {
                return Err(VmmError::GuestFailed(f));
            }
            if Instant::now() > deadline {
                return Err(VmmError::VerifyTimeout(timeout));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Capture a stopped guest (RAM, vCPUs, device). Not while running: the
    /// caller stops it first, which also drains the device.
    pub async fn save(&self) -> Result<VmState, VmmError> {
        self.save_state(true).await
    }

    /// As [`Vm::save`]; without `with_ram` the state's `ram` is empty (a
    /// migration streams RAM from guest memory: copying 64 MiB and more
    /// while the guest is stopped would only lengthen the downtime).
    pub async fn save_state(&self, with_ram: bool) -> Result<VmState, VmmError> {
        let _c = self.control.lock().await;
        if self.is_running() || self.vcpus.any_in_run() {
            return Err(VmmError::StillRunning);
        }
        let mut ram = Vec::new();
        if with_ram {
            ram = vec![0u8; self.config.memory as usize];
            self.mem
                .read_slice(&mut ram, GuestAddress(0))
                .map_err(|source| memory::error("read", 0, ram.len(), source))?;
        }
        let mut vcpus = Vec::new();
        for id in 0..u64::from(self.config.vcpus) {
            vcpus.push(self.vcpus.save(id)?);
        }
        let clock = self.vm.get_clock().map_err(|source| VmmError::Kvm { op: "KVM_GET_CLOCK", source })?.clock;
        Ok(VmState { memory: self.config.memory, ram, vcpus, device: self.device.save(), clock })
    }

    /// Load a saved guest into this VM (prelaunch or inmigrate; same
    /// configuration). A state that does not fit is refused whole (I9).
    pub async fn restore(&self, st: &VmState) -> Result<(), VmmError> {
        let _c = self.control.lock().await;
        if !matches!(
            self.state(),
            RunState::Prelaunch | RunState::InMigrate | RunState::Paused | RunState::FinishMigrate
        ) {
            return Err(VmmError::CannotLoad(self.state()));
        }
        if st.memory != self.config.memory || st.ram.len() as u64 != st.memory {
            return Err(VmmError::RamSize { saved: st.ram.len() as u64, have: self.config.memory });
        }
        if st.vcpus.len() != self.config.vcpus as usize {
            return Err(VmmError::VcpuCount { saved: st.vcpus.len(), have: self.config.vcpus });
        }
        self.mem
            .write_slice(&st.ram, GuestAddress(0))
            .map_err(|source| memory::error("write", 0, st.ram.len(), source))?;
        for (id, v) in st.vcpus.iter().enumerate() {
            self.vcpus.restore(id as u64, v.clone())?;
        }
        self.set_clock(st.clock)?;
        self.device.restore(st.device);
        Ok(())
    }

    /// Load the vCPUs' state, the KVM clock and the device counter (an
    /// incoming migration; RAM arrived separately).
    pub async fn load_cpu_state(
        &self,
        vcpus: &[crate::vcpu::VcpuState],
        device: u32,
        clock: u64,
    ) -> Result<(), VmmError> {
        let _c = self.control.lock().await;
        if vcpus.len() != self.config.vcpus as usize {
            return Err(VmmError::VcpuCount { saved: vcpus.len(), have: self.config.vcpus });
        }
        for (id, v) in vcpus.iter().enumerate() {
            self.vcpus.restore(id as u64, v.clone())?;
        }
        self.set_clock(clock)?;
        self.device.restore(device);
        Ok(())
    }

    /// The KVM clock, once per VM, after the vCPUs (their kvmclock MSRs) are loaded.
    fn set_clock(&self, clock: u64) -> Result<(), VmmError> {
        let data = kvm_bindings::kvm_clock_data { clock, ..Default::default() };
        self.vm.set_clock(&data).map_err(|source| VmmError::Kvm { op: "KVM_SET_CLOCK", source })
    }

    /// One dirty-log pass (guest and VMM writes since the last pass).
    pub fn take_dirty_log(&self) -> Result<Vec<u64>, VmmError> {
        memory::take_dirty_log(&self.vm, &self.mem)
    }

    pub fn vcpus_in_run(&self) -> bool {
        self.vcpus.any_in_run()
    }

    /// Stop and end the vCPU threads; let go of the lease.
    pub async fn shutdown(&self) {
        let _c = self.control.lock().await;
        let _ = self.stop_locked(RunState::Paused).await;
        self.vcpus.shutdown();
        if let Some(t) = self.tenure.get() {
            t.release().await;
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.vcpus.shutdown();
    }
}

/// A per-process random start for verification nonces.
fn initial_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.write_u32(std::process::id());
    h.finish()
}

/// The next nonce (a 64-bit LCG; its high half is the nonce).
fn next_nonce(x: u64) -> u64 {
    x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407)
}

#[allow(unused)]
fn _assert_send_sync() {
    fn f<T: Send + Sync>() {}
    f::<Vm>();
    let _ = Ordering::SeqCst;
}
