//! vCPU threads: each runs KVM_RUN in a loop and can be stopped promptly.
//!
//! Stopping sets `run = false`, then sends every vCPU thread a signal whose
//! handler sets that thread's `kvm_run.immediate_exit`: a thread inside
//! KVM_RUN returns with EINTR, one about to enter returns at once, one in
//! user space sees the flag. `stop` returns only when every thread has left
//! KVM_RUN (`in_run == 0`). No polling: threads park on a condition variable.
//!
//! ```text
//!  parked ──cont──> in KVM_RUN ──exit──> handle (doorbell, hlt, error)
//!    ^                  │                     │
//!    └──── stop (signal + immediate_exit) ────┘
//! ```

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use block::sync::{lock, wait, wait_timeout};

use kvm_bindings::kvm_run;
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

/// What a vCPU thread reports back.
pub trait ExitHandler: Send + Sync + 'static {
    /// A write to an I/O port.
    fn io_out(&self, port: u16, data: &[u8]);
    /// The guest cannot go on (triple fault, failed entry, internal error).
    fn fatal(&self, vcpu: u64, why: String);
}

/// A vCPU's architectural state: what migration carries.
#[derive(Clone, Copy)]
pub struct VcpuState {
    pub regs: kvm_bindings::kvm_regs,
    pub sregs: kvm_bindings::kvm_sregs,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState").field("rip", &self.regs.rip).field("rsp", &self.regs.rsp).finish_non_exhaustive()
    }
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
    pub fn spawn(self: &Arc<Self>, id: u64, vcpu: VcpuFd, handler: Arc<dyn ExitHandler>) -> std::io::Result<()> {
        let me = self.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::Builder::new().name(format!("vcpu{id}")).spawn(move || {
            let _ = tx.send(nix::sys::pthread::pthread_self());
            // A local of this body, declared before the kick target: dropped after it.
            let mut vcpu = vcpu;
            let _kick = KickTarget::set(vcpu.get_kvm_run());
            me.thread_loop(id, &mut vcpu, &*handler);
        })?;
        let tid = rx.recv().map_err(std::io::Error::other)?;
        lock(&self.threads).push((tid, h));
        Ok(())
    }

    fn thread_loop(&self, id: u64, vcpu: &mut VcpuFd, handler: &dyn ExitHandler) {
        loop {
            {
                let mut c = self.lock();
                while !c.run && !c.exit {
                    if let Some(i) = c.requests.iter().position(|(who, _)| *who == id) {
                        let (_, op) = c.requests.swap_remove(i);
                        let answer = Self::state_op(id, vcpu, op);
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
                match vcpu.run() {
                    Ok(VcpuExit::IoOut(port, data)) => handler.io_out(port, data),
                    Ok(VcpuExit::IoIn(_, data)) => data.fill(0xff),
                    Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
                    Ok(VcpuExit::MmioWrite(..)) => {}
                    // Without interrupts a halted vCPU has nothing to do until stopped.
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

    fn state_op(id: u64, vcpu: &VcpuFd, op: StateOp) -> Result<Box<VcpuState>, VmmError> {
        let failed = |op: &'static str| move |source| VmmError::VcpuState { vcpu: id, op, source };
        match op {
            StateOp::Save => {
                let regs = vcpu.get_regs().map_err(failed("KVM_GET_REGS"))?;
                let sregs = vcpu.get_sregs().map_err(failed("KVM_GET_SREGS"))?;
                Ok(Box::new(VcpuState { regs, sregs }))
            }
            StateOp::Restore(st) => {
                vcpu.set_sregs(&st.sregs).map_err(failed("KVM_SET_SREGS"))?;
                vcpu.set_regs(&st.regs).map_err(failed("KVM_SET_REGS"))?;
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
