//! File I/O through io_uring, completions delivered to tokio through an eventfd.
//!
//! Why it looks like this:
//!
//! * **Owned buffers.** The kernel reads or writes a buffer some time after the SQE is
//!   pushed, and a Rust future can be dropped at any `.await`. So every operation takes its
//!   [`IoBuf`] by value and gives it back with the result; there is no borrowed-slice API.
//! * **The slab owns what the kernel uses.** Between pushing an SQE and reaping its CQE, the
//!   buffer and an `Arc<OwnedFd>` clone live in a slot of a slab keyed by `user_data`, not in
//!   the future. A dropped future only marks its slot *abandoned*; the buffer is dropped (and
//!   the fd released, so its number cannot be reused under the kernel) when the CQE arrives.
//!   The slab is a `Vec` of slots plus a free list: it grows only when more operations are in
//!   flight than ever before, so steady-state I/O allocates nothing.
//! * **eventfd → tokio.** The ring signals an eventfd on every completion; a reaper task owns
//!   that eventfd through [`AsyncFd`], drains the completion queue, stores each result in its
//!   slot and wakes the waiting future. The reaper holds only a `Weak<Uring>` and exits once
//!   the ring is dropped; if its runtime shuts down first, the next submission spawns a new
//!   reaper on the caller's runtime, so one ring can serve several runtimes in turn.
//!
//! One `std::sync::Mutex` guards the ring and the slab; it is never held across an `.await`.
//! Each operation costs one `io_uring_enter` (no batching: tokio gives no "about to park" hook
//! that would make a deferred flush both cheap and prompt). The submitter also drains the CQ
//! right after `io_uring_enter`, because page-cache hits complete inside it; the future then
//! resolves on its first poll instead of waiting for the reaper.
//!
//! Life of one operation (one slot):
//!
//! ```text
//!            read_at/write_at/...: push SQE, submit
//!   Free ───────────────────────────────────────────▶ Submitted{waker}
//!    ▲                                                  │          │
//!    │ future takes the result                reaper:   │          │ future dropped
//!    │ (buf handed back to caller)            CQE       ▼          ▼
//!    ├──────────────────────────────────── Completed{res}      Abandoned
//!    │                                                  │          │
//!    │ future dropped after completion: buf dropped     │          │ reaper: CQE,
//!    ├──────────────────────────────────────────────────┘          │ buf + fd dropped
//!    └─────────────────────────────────────────────────────────────┘
//! ```
//!
//! If the `Uring` is dropped with operations still in flight (only abandoned ones can be:
//! a live future borrows the `Uring`), `Drop` waits for their completions before the ring and
//! the buffers go away; if even that fails, it leaks the buffers rather than free memory the
//! kernel may still write.

use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, types, IoUring, Probe};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::io::unix::AsyncFd;

use crate::buf::IoBuf;
use crate::sync;

/// `RWF_DSYNC` from `<linux/fs.h>`: per-write O_DSYNC, i.e. FUA semantics.
const RWF_DSYNC: i32 = 0x2;

/// Largest transfer Linux performs in one read/write (`MAX_RW_COUNT`); longer requests come
/// back short, which the API allows anyway.
const MAX_RW: usize = 0x7fff_f000;

/// An io_uring instance with its completion reaper. See the module docs.
pub struct Uring {
    state: Mutex<State>,
    /// Shared with the reaper's `AsyncFd`; written on drop to wake the reaper so it exits.
    efd: Arc<EventFd>,
    /// A reaper task is running (or being spawned). Cleared when the task is dropped, e.g.
    /// because the runtime it was spawned on shut down; the next submission then spawns a
    /// new one on the caller's runtime, so a ring may outlive the runtime that created it.
    reaper_alive: AtomicBool,
    /// Handed to each reaper, which must not keep the ring alive.
    me: Weak<Uring>,
    entries: u32,
}

struct State {
    ring: IoUring,
    slab: Slab,
    /// Submit calls that fail with EAGAIN before reaching the kernel (tests only): drives
    /// the submission-queue-full path deterministically.
    #[cfg(test)]
    inject_submit_eagain: usize,
}

/// In-flight operations keyed by `user_data` (= slot index).
struct Slab {
    slots: Vec<Slot>,
    /// Indices of `Free` slots. Its capacity follows `slots`, so pushing never allocates
    /// once the slab has stopped growing.
    free: Vec<usize>,
    /// Slots in `Submitted` or `Abandoned`: SQE pushed, CQE not yet reaped.
    in_flight: usize,
    /// Times a submission found the SQ full (statistics, Debug).
    sq_full: u64,
}

enum Phase {
    Free,
    /// Pushed to the SQ; the future waits. `waker` is the last task that polled it.
    Submitted {
        waker: Option<Waker>,
    },
    /// CQE reaped; the future has not collected `res` yet.
    Completed {
        res: i32,
    },
    /// Pushed to the SQ, but the future was dropped; the reaper frees the slot on its CQE.
    Abandoned,
}

struct Slot {
    phase: Phase,
    /// Invariant: while `phase` is `Submitted` or `Abandoned` (the kernel may still access
    /// it), this holds the buffer whose memory the slot's SQE points at; it is taken out or
    /// dropped only after the slot's CQE has been reaped.
    buf: Option<IoBuf>,
    /// Invariant: while `phase` is `Submitted` or `Abandoned`, a clone of the fd the SQE
    /// names, so that the fd number cannot be closed and reused before the CQE is reaped.
    fd: Option<Arc<OwnedFd>>,
}

impl Slab {
    fn with_capacity(n: usize) -> Self {
        Self { slots: Vec::with_capacity(n), free: Vec::with_capacity(n), in_flight: 0, sq_full: 0 }
    }

    /// A slot in `Submitted` holding `buf` and `fd`. Grows the slab only if none is free.
    fn insert(&mut self, buf: Option<IoBuf>, fd: Arc<OwnedFd>) -> usize {
        let phase = Phase::Submitted { waker: None };
        if let Some(idx) = self.free.pop() {
            if let Some(slot) = self.slots.get_mut(idx) {
                *slot = Slot { phase, buf, fd: Some(fd) };
                return idx;
            }
        }
        self.slots.push(Slot { phase, buf, fd: Some(fd) });
        let cap = self.slots.capacity();
        if self.free.capacity() < cap {
            self.free.reserve(cap - self.free.len());
        }
        self.slots.len() - 1
    }

    /// Return slot `idx` to the free list, handing back its buffer. Only for slots whose
    /// SQE is not (or no longer) in the kernel's hands.
    fn release(&mut self, idx: usize) -> Option<IoBuf> {
        let slot = self.slots.get_mut(idx)?;
        slot.phase = Phase::Free;
        slot.fd = None;
        let buf = slot.buf.take();
        self.free.push(idx);
        buf
    }

    /// Record the CQE of slot `idx`.
    fn complete(&mut self, idx: usize, res: i32, wakers: &mut Vec<Waker>) {
        let Some(slot) = self.slots.get_mut(idx) else {
            tracing::error!(idx, res, "io_uring completion for an unknown slot");
            return;
        };
        match std::mem::replace(&mut slot.phase, Phase::Completed { res }) {
            Phase::Submitted { waker } => {
                self.in_flight -= 1;
                wakers.extend(waker);
            }
            Phase::Abandoned => {
                self.in_flight -= 1;
                // The kernel is done with the buffer and the fd: drop them now.
                drop(self.release(idx));
            }
            other @ (Phase::Free | Phase::Completed { .. }) => {
                slot.phase = other;
                tracing::error!(idx, res, "io_uring completion for a slot not in flight");
            }
        }
    }
}

impl State {
    /// `io_uring_enter` to submit queued SQEs (and flush overflowed CQEs).
    fn submit(&mut self) -> io::Result<usize> {
        #[cfg(test)]
        if self.inject_submit_eagain > 0 {
            self.inject_submit_eagain -= 1;
            return Err(io::Error::from_raw_os_error(nix::errno::Errno::EAGAIN as i32));
        }
        self.ring.submit()
    }

    /// Reap every CQE available now, collecting the wakers to call.
    fn drain(&mut self, wakers: &mut Vec<Waker>) {
        let mut cq = self.ring.completion();
        loop {
            for cqe in &mut cq {
                let idx = usize::try_from(cqe.user_data()).unwrap_or(usize::MAX);
                self.slab.complete(idx, cqe.result(), wakers);
            }
            // Publish our head and look for completions posted while we were draining.
            cq.sync();
            if cq.is_empty() {
                break;
            }
        }
    }

    /// Drain the CQ, then push along anything the kernel still holds back: SQEs whose
    /// submit failed transiently, CQEs parked in the overflow list. Bounded, because new
    /// completions arrive through the eventfd anyway.
    fn reap(&mut self, wakers: &mut Vec<Waker>) {
        self.drain(wakers);
        for _ in 0..4 {
            let (queued, overflow) = {
                let sq = self.ring.submission();
                (!sq.is_empty(), sq.cq_overflow())
            };
            if !queued && !overflow {
                break;
            }
            if let Err(e) = self.submit() {
                tracing::debug!(error = %e, "io_uring submit from reaper failed; will retry");
                break;
            }
            self.drain(wakers);
        }
    }
}

/// EBUSY (CQ overflow backlog) and EAGAIN (no memory for requests) clear up once
/// completions are reaped.
fn transient(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(e.raw_os_error(), Some(c) if c == Errno::EBUSY as i32 || c == Errno::EAGAIN as i32)
}

fn wake_all(wakers: &mut Vec<Waker>) {
    for w in wakers.drain(..) {
        w.wake();
    }
}

thread_local! {
    /// Per-thread buffer for wakers collected under the lock and woken after it, so that
    /// submitting (which also reaps) does not allocate. Taken, not borrowed: a waker that
    /// re-enters just finds an empty Vec.
    static WAKER_SCRATCH: std::cell::Cell<Vec<Waker>> = const { std::cell::Cell::new(Vec::new()) };
}

fn take_scratch() -> Vec<Waker> {
    WAKER_SCRATCH.try_with(std::cell::Cell::take).unwrap_or_default()
}

/// Wake everything in `wakers` and keep its capacity for the next submission on this thread.
fn wake_and_keep(mut wakers: Vec<Waker>) {
    wake_all(&mut wakers);
    // Fails only during thread teardown; then the Vec is simply dropped.
    let _ = WAKER_SCRATCH.try_with(|c| c.set(wakers));
}

fn result_len(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(usize::try_from(res).unwrap_or(0))
    }
}

impl Uring {
    /// A ring with `entries` submission entries, its completions signalled through an eventfd
    /// that a tokio task (spawned on the current runtime) polls; fails if io_uring is refused
    /// (ENOSYS/EPERM, e.g. seccomp) so the caller can fall back to a thread pool.
    pub fn new(entries: u32) -> io::Result<Arc<Self>> {
        // Fail before creating anything if there is no runtime for the reaper.
        runtime()?;
        let ring = IoUring::new(entries)?;

        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        let needed = [opcode::Read::CODE, opcode::Write::CODE, opcode::Fsync::CODE, opcode::Fallocate::CODE];
        if !needed.iter().all(|&op| probe.is_supported(op)) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring lacks read/write/fsync/fallocate"));
        }

        let efd = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?);
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let n = usize::try_from(entries).unwrap_or(0);
        let uring = Arc::new_cyclic(|me| Self {
            state: Mutex::new(State {
                ring,
                slab: Slab::with_capacity(n),
                #[cfg(test)]
                inject_submit_eagain: 0,
            }),
            efd,
            reaper_alive: AtomicBool::new(true),
            me: me.clone(),
            entries,
        });
        uring.spawn_reaper()?;
        Ok(uring)
    }

    /// Read into buf[buf_off..] at file `offset`; returns the buffer and bytes read (may be short).
    pub async fn read_at(
        &self,
        fd: &Arc<OwnedFd>,
        offset: u64,
        mut buf: IoBuf,
        buf_off: usize,
    ) -> (IoBuf, io::Result<usize>) {
        let Some(len) = buf.len().checked_sub(buf_off) else {
            return (buf, Err(io::Error::from(io::ErrorKind::InvalidInput)));
        };
        let len = u32::try_from(len.min(MAX_RW)).unwrap_or(0);
        let ptr = buf.as_mut_ptr().wrapping_add(buf_off);
        let entry = opcode::Read::new(types::Fd(fd.as_raw_fd()), ptr, len).offset(offset).build();
        let (buf, res) = self.run(entry, Some(buf), fd).await;
        (buf.unwrap_or_else(|| IoBuf::zeroed(0)), res.and_then(result_len))
    }

    /// Write buf[buf_off..] at `offset`; `dsync` sets RWF_DSYNC (FUA). Returns bytes written (may be short).
    pub async fn write_at(
        &self,
        fd: &Arc<OwnedFd>,
        offset: u64,
        buf: IoBuf,
        buf_off: usize,
        dsync: bool,
    ) -> (IoBuf, io::Result<usize>) {
        let Some(len) = buf.len().checked_sub(buf_off) else {
            return (buf, Err(io::Error::from(io::ErrorKind::InvalidInput)));
        };
        let len = u32::try_from(len.min(MAX_RW)).unwrap_or(0);
        let ptr = buf.as_ptr().wrapping_add(buf_off);
        let entry = opcode::Write::new(types::Fd(fd.as_raw_fd()), ptr, len)
            .offset(offset)
            .rw_flags(if dsync { RWF_DSYNC } else { 0 })
            .build();
        let (buf, res) = self.run(entry, Some(buf), fd).await;
        (buf.unwrap_or_else(|| IoBuf::zeroed(0)), res.and_then(result_len))
    }

    /// `fsync(2)`, or `fdatasync(2)` when `datasync`.
    pub async fn fsync(&self, fd: &Arc<OwnedFd>, datasync: bool) -> io::Result<()> {
        let flags = if datasync { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
        let entry = opcode::Fsync::new(types::Fd(fd.as_raw_fd())).flags(flags).build();
        self.run(entry, None, fd).await.1.and_then(result_len).map(drop)
    }

    /// `fallocate(2)` with `mode` (`FALLOC_FL_*` bits).
    pub async fn fallocate(&self, fd: &Arc<OwnedFd>, offset: u64, len: u64, mode: i32) -> io::Result<()> {
        let entry = opcode::Fallocate::new(types::Fd(fd.as_raw_fd()), len).offset(offset).mode(mode).build();
        self.run(entry, None, fd).await.1.and_then(result_len).map(drop)
    }

    /// Operations submitted and not yet completed (for tests and drain assertions).
    pub fn in_flight(&self) -> usize {
        self.lock().slab.in_flight
    }

    /// Register the eventfd with the current runtime's reactor and spawn a reaper on it.
    fn spawn_reaper(&self) -> io::Result<()> {
        let handle = runtime()?;
        let _guard = handle.enter();
        // tokio panics here if the runtime was built without I/O (`enable_io`).
        // SAFETY: `register` needs the fd to stay open and be the same for the AsyncFd's
        // whole life. The AsyncFd owns an `Arc<EventFd>` clone, so the eventfd cannot be
        // closed before the AsyncFd is dropped, and `EventFd::as_raw_fd` always returns
        // the one fd it owns.
        let efd = unsafe { AsyncFd::register(Arc::clone(&self.efd)) }?;
        handle.spawn(reaper(ReaperAlive(self.me.clone()), efd));
        Ok(())
    }

    /// Make sure some reaper will deliver this submission's completion.
    fn ensure_reaper(&self) -> io::Result<()> {
        if self.reaper_alive.load(Ordering::Acquire)
            || self.reaper_alive.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_err()
        {
            return Ok(());
        }
        tracing::debug!("io_uring reaper gone (runtime shut down?); spawning a new one");
        let res = self.spawn_reaper();
        if res.is_err() {
            self.reaper_alive.store(false, Ordering::Release);
        }
        res
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something did, the slab is still
        // consistent at every unlock point, so carry on rather than propagate the poison.
        sync::lock(&self.state)
    }

    /// Push `entry` (whose pointers, if any, point into `buf` and name `fd`) and wait for its
    /// completion. Returns the buffer and the raw CQE result.
    async fn run(
        &self,
        entry: squeue::Entry,
        buf: Option<IoBuf>,
        fd: &Arc<OwnedFd>,
    ) -> (Option<IoBuf>, io::Result<i32>) {
        match self.start(entry, buf, fd).await {
            Ok(op) => {
                let (buf, res) = op.await;
                (buf, Ok(res))
            }
            Err((buf, e)) => (buf, Err(e)),
        }
    }

    /// Get the SQE into the submission queue, submitting (and, if the kernel pushes back,
    /// reaping and yielding) while the queue is full. Until the push succeeds the buffer stays
    /// with the caller, so dropping this future at the yield is harmless.
    async fn start(
        &self,
        entry: squeue::Entry,
        mut buf: Option<IoBuf>,
        fd: &Arc<OwnedFd>,
    ) -> Result<Op<'_>, (Option<IoBuf>, io::Error)> {
        if let Err(e) = self.ensure_reaper() {
            return Err((buf, e));
        }
        let mut wakers = take_scratch();
        loop {
            {
                let mut st = self.lock();
                if st.ring.submission().is_full() {
                    // Queue full: hand the queued SQEs to the kernel to make room.
                    st.slab.sq_full += 1;
                    match st.submit() {
                        Ok(_) => {}
                        Err(e) if transient(&e) => st.reap(&mut wakers),
                        Err(e) => return Err((buf, e)),
                    }
                }
                if !st.ring.submission().is_full() {
                    let idx = st.slab.insert(buf.take(), Arc::clone(fd));
                    let entry = entry.clone().user_data(idx as u64);
                    // SAFETY: any pointer in `entry` points into the heap allocation of the
                    // IoBuf now stored in `slots[idx].buf` (moving an IoBuf does not move its
                    // memory), within its length (checked by read_at/write_at), and the fd it
                    // names is kept open by `slots[idx].fd`. The slot invariant (upheld by
                    // `Op::drop`, which only marks the slot Abandoned, by `Slab::complete`,
                    // which releases it only on the CQE, and by `Uring::drop`, which waits for
                    // or leaks in-flight slots) keeps both alive until the kernel is done.
                    let pushed = unsafe { st.ring.submission().push(&entry) };
                    if pushed.is_err() {
                        // Not reachable: checked not full under the same lock.
                        let buf = st.slab.release(idx);
                        return Err((buf, io::Error::other("io_uring submission queue full")));
                    }
                    st.slab.in_flight += 1;
                    if let Err(e) = st.submit() {
                        // The SQE stays queued; `Op::poll` and the reaper submit it later.
                        tracing::debug!(error = %e, "io_uring submit failed; will retry");
                    }
                    // Cached reads and many writes complete inside io_uring_enter: reap now
                    // so the first poll finds the result without a trip through the reaper.
                    st.drain(&mut wakers);
                    drop(st);
                    wake_and_keep(wakers);
                    return Ok(Op { uring: self, idx, done: false });
                }
            }
            wake_all(&mut wakers);
            tokio::task::yield_now().await;
        }
    }
}

/// The waiting half of an operation whose SQE is in the ring. Resolves to the buffer and
/// the CQE result; dropping it early abandons the slot (the reaper frees it).
struct Op<'a> {
    uring: &'a Uring,
    idx: usize,
    /// The slot has been released by `poll`.
    done: bool,
}

impl Future for Op<'_> {
    type Output = (Option<IoBuf>, i32);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let idx = self.idx;
        let mut st = self.uring.lock();
        let pending_sqes = !st.ring.submission().is_empty();
        let Some(slot) = st.slab.slots.get_mut(idx) else {
            drop(st);
            self.done = true;
            return Poll::Ready((None, -(nix::errno::Errno::EIO as i32)));
        };
        match &mut slot.phase {
            Phase::Completed { res } => {
                let res = *res;
                let buf = st.slab.release(idx);
                drop(st);
                self.done = true;
                Poll::Ready((buf, res))
            }
            Phase::Submitted { waker } => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                if pending_sqes {
                    // An earlier submit failed (EBUSY/EAGAIN): retry, and poll again soon
                    // if the kernel still pushes back.
                    let mut wakers = Vec::new();
                    match st.submit() {
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "io_uring submit retry failed");
                            st.reap(&mut wakers);
                            cx.waker().wake_by_ref();
                        }
                    }
                    drop(st);
                    wake_all(&mut wakers);
                }
                Poll::Pending
            }
            Phase::Free | Phase::Abandoned => {
                tracing::error!(idx, "io_uring operation polled in a foreign slot");
                drop(st);
                self.done = true;
                Poll::Ready((None, -(nix::errno::Errno::EIO as i32)))
            }
        }
    }
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = self.uring.lock();
        let Some(slot) = st.slab.slots.get_mut(self.idx) else {
            return;
        };
        match slot.phase {
            // Completed but never collected: the kernel is done, free it now.
            Phase::Completed { .. } => drop(st.slab.release(self.idx)),
            // Still in the kernel's hands: the reaper frees it on the CQE.
            Phase::Submitted { .. } => slot.phase = Phase::Abandoned,
            Phase::Free | Phase::Abandoned => {}
        }
    }
}

/// Waits on the eventfd, drains completions, wakes futures. Exits when the `Uring` is gone.
/// `alive` is an argument, not a local, so that it is dropped with the future even if the
/// runtime shuts down before the task's first poll.
async fn reaper(alive: ReaperAlive, efd: AsyncFd<Arc<EventFd>>) {
    let uring = &alive.0;
    let mut wakers: Vec<Waker> = Vec::new();
    loop {
        let mut guard = match efd.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "io_uring eventfd poll failed; reaper exits");
                return;
            }
        };
        // Reset the counter *before* draining: a completion posted after the drain's last
        // look at the CQ bumps the counter again and brings us back here.
        match guard.try_io(|fd| fd.get_ref().read().map_err(io::Error::from)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "io_uring eventfd read failed; reaper exits");
                return;
            }
            // Spurious readiness; try_io has cleared it.
            Err(_would_block) => continue,
        }
        let Some(uring) = uring.upgrade() else { return };
        uring.lock().reap(&mut wakers);
        // Dropping the last strong reference here runs `Uring::drop` on this task; fine.
        drop(uring);
        wake_all(&mut wakers);
    }
}

/// Clears `Uring::reaper_alive` when the reaper task ends or is dropped with its runtime.
struct ReaperAlive(Weak<Uring>);

impl Drop for ReaperAlive {
    fn drop(&mut self) {
        if let Some(uring) = self.0.upgrade() {
            uring.reaper_alive.store(false, Ordering::Release);
        }
    }
}

fn runtime() -> io::Result<tokio::runtime::Handle> {
    tokio::runtime::Handle::try_current()
        .map_err(|e| io::Error::other(format!("io_uring reaper needs a tokio runtime: {e}")))
}

impl Drop for Uring {
    fn drop(&mut self) {
        let st = sync::get_mut(&mut self.state);
        // Only abandoned operations can be in flight (a live `Op` borrows `self`). Their
        // buffers must outlive the kernel's use: wait for the completions.
        let mut wakers = Vec::new();
        while st.slab.in_flight > 0 {
            st.drain(&mut wakers);
            if st.slab.in_flight == 0 {
                break;
            }
            match st.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted || transient(&e) => {}
                Err(e) => {
                    tracing::error!(
                        error = %e,
                        in_flight = st.slab.in_flight,
                        "io_uring: cannot wait for in-flight operations; leaking their buffers"
                    );
                    // Deliberate leak: the kernel may still write into these buffers, and
                    // the fds must not be reused, so neither may ever be freed.
                    std::mem::forget(std::mem::take(&mut st.slab.slots));
                    break;
                }
            }
        }
        wake_all(&mut wakers);
        // Wake the reaper so it finds the Weak dead and exits.
        if let Err(e) = self.efd.write(1) {
            tracing::debug!(error = %e, "io_uring: waking reaper on drop failed");
        }
    }
}

impl fmt::Debug for Uring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Uring");
        d.field("entries", &self.entries);
        match self.state.try_lock() {
            Ok(st) => d
                .field("in_flight", &st.slab.in_flight)
                .field("slots", &st.slab.slots.len())
                .field("sq_full", &st.slab.sq_full),
            Err(_) => d.field("state", &"<locked>"),
        };
        d.finish_non_exhaustive()
    }
}

#[cfg(test)]
impl Uring {
    /// (slots ever allocated, slots free)
    fn slab_stats(&self) -> (usize, usize) {
        let st = self.lock();
        (st.slab.slots.len(), st.slab.free.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::FallocateFlags;
    use std::fs::{File, OpenOptions};
    use std::io::Write as _;
    use std::time::Duration;

    fn pattern(seed: u8, len: usize) -> IoBuf {
        let v: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        IoBuf::from_slice(&v)
    }

    fn rw_file(dir: &tempfile::TempDir, name: &str, len: u64) -> Arc<OwnedFd> {
        let f =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.path().join(name)).unwrap();
        f.set_len(len).unwrap();
        Arc::new(OwnedFd::from(f))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_then_read_back_patterns() {
        let dir = tempfile::tempdir().unwrap();
        let fd = rw_file(&dir, "img", 0);
        let ring = Uring::new(32).unwrap();
        for i in 0..16u8 {
            let (_, r) = ring.write_at(&fd, u64::from(i) * 8192, pattern(i, 8192), 0, false).await;
            assert_eq!(r.unwrap(), 8192);
        }
        for i in (0..16u8).rev() {
            let (buf, r) = ring.read_at(&fd, u64::from(i) * 8192, IoBuf::zeroed(8192), 0).await;
            assert_eq!(r.unwrap(), 8192);
            assert_eq!(&buf[..], &pattern(i, 8192)[..], "block {i}");
        }
        // buf_off: read into the tail of a buffer, write from the tail of another.
        let (_, r) = ring.write_at(&fd, 0, pattern(99, 4096 + 512), 4096, false).await;
        assert_eq!(r.unwrap(), 512);
        let (buf, r) = ring.read_at(&fd, 0, IoBuf::zeroed(1024), 512).await;
        assert_eq!(r.unwrap(), 512);
        assert!(buf[..512].iter().all(|&b| b == 0));
        assert_eq!(&buf[512..], &pattern(99, 4096 + 512)[4096..]);
        let (_, r) = ring.read_at(&fd, 0, IoBuf::zeroed(10), 11).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(ring.in_flight(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dsync_write_and_fsync_persist_data() {
        let dir = tempfile::tempdir().unwrap();
        let fd = rw_file(&dir, "img", 0);
        let ring = Uring::new(8).unwrap();
        let (_, r) = ring.write_at(&fd, 4096, pattern(7, 4096), 0, true).await;
        assert_eq!(r.unwrap(), 4096);
        ring.fsync(&fd, true).await.unwrap();
        ring.fsync(&fd, false).await.unwrap();
        let on_disk = std::fs::read(dir.path().join("img")).unwrap();
        assert_eq!(on_disk.len(), 8192);
        assert_eq!(&on_disk[4096..], &pattern(7, 4096)[..]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_read_at_eof_returns_fewer_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let fd = rw_file(&dir, "img", 0);
        let ring = Uring::new(8).unwrap();
        let (_, r) = ring.write_at(&fd, 0, pattern(3, 6000), 0, false).await;
        assert_eq!(r.unwrap(), 6000);
        let (buf, r) = ring.read_at(&fd, 4096, IoBuf::zeroed(8192), 0).await;
        assert_eq!(r.unwrap(), 6000 - 4096);
        assert_eq!(&buf[..6000 - 4096], &pattern(3, 6000)[4096..]);
        let (_, r) = ring.read_at(&fd, 6000, IoBuf::zeroed(4096), 0).await;
        assert_eq!(r.unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fallocate_punch_hole_reads_back_zeroes_and_keeps_size() {
        let dir = tempfile::tempdir().unwrap();
        let fd = rw_file(&dir, "img", 0);
        let ring = Uring::new(8).unwrap();
        let (_, r) = ring.write_at(&fd, 0, pattern(5, 65536), 0, false).await;
        assert_eq!(r.unwrap(), 65536);
        let mode = (FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE).bits();
        ring.fallocate(&fd, 8192, 16384, mode).await.unwrap();
        let (buf, r) = ring.read_at(&fd, 0, IoBuf::zeroed(65536), 0).await;
        assert_eq!(r.unwrap(), 65536);
        let want = pattern(5, 65536);
        assert_eq!(&buf[..8192], &want[..8192]);
        assert!(buf[8192..24576].iter().all(|&b| b == 0));
        assert_eq!(&buf[24576..], &want[24576..]);
        assert_eq!(std::fs::metadata(dir.path().join("img")).unwrap().len(), 65536);
        // Plain fallocate past EOF grows the file.
        ring.fallocate(&fd, 65536, 4096, 0).await.unwrap();
        assert_eq!(std::fs::metadata(dir.path().join("img")).unwrap().len(), 65536 + 4096);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn errors_come_back_as_errno() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Uring::new(8).unwrap();
        let dirfd = Arc::new(OwnedFd::from(File::open(dir.path()).unwrap()));
        let (buf, r) = ring.read_at(&dirfd, 0, IoBuf::zeroed(4096), 0).await;
        assert_eq!(r.unwrap_err().raw_os_error(), Some(nix::errno::Errno::EISDIR as i32));
        assert_eq!(buf.len(), 4096, "buffer handed back on error");

        let path = dir.path().join("ro");
        File::create(&path).unwrap().write_all(b"x").unwrap();
        let ro = Arc::new(OwnedFd::from(File::open(&path).unwrap()));
        let (_, r) = ring.write_at(&ro, 0, pattern(1, 4096), 0, false).await;
        assert_eq!(r.unwrap_err().raw_os_error(), Some(nix::errno::Errno::EBADF as i32));
        let r = ring.fallocate(&ro, 0, 4096, 0).await;
        assert_eq!(r.unwrap_err().raw_os_error(), Some(nix::errno::Errno::EBADF as i32));
        assert_eq!(ring.in_flight(), 0);
    }

    /// 64 tasks each doing a write then a read on a 2-entry ring (SQ 2, CQ 4): CQEs overflow
    /// into the kernel's backlog. With `hold_submits`, every submit fails with EAGAIN until
    /// the SQ is full and the other 62 tasks are spinning on the full path; then the kernel
    /// "recovers" and everything must still complete.
    async fn many_ops_on_tiny_ring(hold_submits: bool) -> Arc<Uring> {
        let dir = tempfile::tempdir().unwrap();
        let fd = rw_file(&dir, "img", 64 * 4096);
        let ring = Uring::new(2).unwrap();
        if hold_submits {
            ring.lock().inject_submit_eagain = usize::MAX;
        }
        let mut tasks = Vec::new();
        for i in 0..64u8 {
            let (ring, fd) = (Arc::clone(&ring), Arc::clone(&fd));
            tasks.push(tokio::spawn(async move {
                let off = u64::from(i) * 4096;
                let (_, r) = ring.write_at(&fd, off, pattern(i, 4096), 0, false).await;
                assert_eq!(r.unwrap(), 4096);
                let (buf, r) = ring.read_at(&fd, off, IoBuf::zeroed(4096), 0).await;
                assert_eq!(r.unwrap(), 4096);
                assert_eq!(&buf[..], &pattern(i, 4096)[..]);
            }));
        }
        if hold_submits {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                {
                    let mut st = ring.lock();
                    if st.slab.in_flight == 2 && st.slab.sq_full >= 62 {
                        assert!(st.ring.submission().is_full());
                        st.inject_submit_eagain = 0;
                        break;
                    }
                }
                assert!(tokio::time::Instant::now() < deadline, "SQ never filled: {ring:?}");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(20), t).await.unwrap().unwrap();
        }
        assert_eq!(ring.in_flight(), 0);
        let (total, free) = ring.slab_stats();
        assert_eq!(total, free, "every slot back on the free list");
        ring
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queue_full_two_entry_ring_completes_64_concurrent_ops() {
        let ring = many_ops_on_tiny_ring(false).await;
        assert!(ring.slab_stats().0 <= 64);
        many_ops_on_tiny_ring(true).await;
    }

    /// A pipe: reads on its empty read end stay in flight until the test writes.
    fn pipe() -> (Arc<OwnedFd>, File) {
        let (r, w) = nix::unistd::pipe().unwrap();
        (Arc::new(r), File::from(w))
    }

    async fn feed_until_idle(ring: &Uring, w: &mut File) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while ring.in_flight() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "stuck: {ring:?}");
            w.write_all(&[0x5a; 512]).unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_futures_leak_no_slot() {
        let (r, mut w) = pipe();
        let ring = Uring::new(16).unwrap();
        for _round in 0..3 {
            // 32 reads dropped mid-flight: each slot goes Submitted -> Abandoned.
            let mut tasks = Vec::new();
            for _ in 0..32 {
                let (ring, r) = (Arc::clone(&ring), Arc::clone(&r));
                tasks.push(tokio::spawn(async move {
                    let read = ring.read_at(&r, 0, IoBuf::zeroed(4096), 0);
                    tokio::time::timeout(Duration::ZERO, read).await.is_err()
                }));
            }
            for t in tasks {
                assert!(t.await.unwrap(), "read finished on an empty pipe");
            }
            assert_eq!(ring.in_flight(), 32);
            let (total, free) = ring.slab_stats();
            assert_eq!((total, free), (32, 0), "abandoned slots stay owned until their CQE");
            // The CQEs arrive: the reaper frees every slot (and drops the buffers).
            feed_until_idle(&ring, &mut w).await;
            assert_eq!(ring.slab_stats(), (32, 32), "the slab is reused, not regrown");
        }

        // Completed but never collected: dropping the future frees the slot.
        let mut cx = Context::from_waker(Waker::noop());
        let mut read = Box::pin(ring.read_at(&r, 0, IoBuf::zeroed(4096), 0));
        // Empty the pipe first (one byte guarantees the read cannot block).
        w.write_all(&[0]).unwrap();
        let mut drained = [0u8; 1 << 16];
        assert!(nix::unistd::read(&*r, &mut drained).unwrap() > 0);
        assert!(read.as_mut().poll(&mut cx).is_pending());
        feed_until_idle(&ring, &mut w).await;
        assert_eq!(ring.slab_stats(), (32, 31));
        drop(read);
        assert_eq!(ring.slab_stats(), (32, 32));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_file_reads_complete_without_the_reaper() {
        let dir = tempfile::tempdir().unwrap();
        let fd = rw_file(&dir, "img", 1 << 20);
        let ring = Uring::new(16).unwrap();
        // Polled once by hand, a page-cache read is already Ready: the submitter reaped it.
        let mut cx = Context::from_waker(Waker::noop());
        let mut read = Box::pin(ring.read_at(&fd, 0, IoBuf::zeroed(4096), 0));
        match read.as_mut().poll(&mut cx) {
            Poll::Ready((_, r)) => assert_eq!(r.unwrap(), 4096),
            Poll::Pending => panic!("cached read went through the reaper"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_uring_waits_for_abandoned_ops_and_stops_reaper() {
        let (r, mut w) = pipe();
        let ring = Uring::new(8).unwrap();
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..16 {
            let mut read = Box::pin(ring.read_at(&r, 0, IoBuf::zeroed(4096), 0));
            assert!(read.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(ring.in_flight(), 16);
        let efd = Arc::clone(&ring.efd);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            for _ in 0..16 {
                w.write_all(&[1; 4096]).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let t0 = std::time::Instant::now();
        drop(ring); // must block until the kernel is done with all 16 buffers
        assert!(t0.elapsed() >= Duration::from_millis(100), "drop did not wait");
        writer.join().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&efd) > 1 {
            assert!(tokio::time::Instant::now() < deadline, "reaper did not exit");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[test]
    fn ring_outlives_its_runtime_and_respawns_the_reaper() {
        let rt = || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let ring = rt().block_on(async { Uring::new(8).unwrap() }); // runtime dropped here
        assert!(!ring.reaper_alive.load(Ordering::Acquire));
        let (r, mut w) = pipe();
        rt().block_on(async {
            // Completes only through a reaper: the pipe is empty when the read is submitted.
            let writer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                w.write_all(b"hello").unwrap();
            });
            let read = ring.read_at(&r, 0, IoBuf::zeroed(4096), 0);
            let (buf, n) = tokio::time::timeout(Duration::from_secs(5), read).await.unwrap();
            assert_eq!(&buf[..n.unwrap()], b"hello");
            writer.join().unwrap();
        });
    }

    #[test]
    fn new_without_runtime_is_an_error_not_a_panic() {
        assert!(Uring::new(8).is_err());
    }

    /// 4 KiB random reads at QD32 on a 256 MiB cached file for 2 s, io_uring vs a
    /// spawn_blocking pread pool. `cargo test --release -- --ignored --nocapture iops`
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "measurement"]
    async fn iops_4k_random_read_qd32() {
        const SIZE: u64 = 256 << 20;
        const QD: usize = 32;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        {
            let mut f = File::create(&path).unwrap();
            let chunk = vec![0xa5u8; 1 << 20];
            for _ in 0..SIZE >> 20 {
                f.write_all(&chunk).unwrap();
            }
        }
        std::fs::read(&path).unwrap(); // warm the page cache
        let fd = Arc::new(OwnedFd::from(File::open(&path).unwrap()));
        let ring = Uring::new(64).unwrap();

        let run = |use_uring: bool| {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let tasks: Vec<_> = (0..QD)
                .map(|w| {
                    let (ring, fd, stop) = (Arc::clone(&ring), Arc::clone(&fd), Arc::clone(&stop));
                    tokio::spawn(async move {
                        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (w as u64 + 1);
                        let mut buf = IoBuf::zeroed(4096);
                        let mut n = 0u64;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let off = (x % (SIZE / 4096)) * 4096;
                            if use_uring {
                                let (b, r) = ring.read_at(&fd, off, buf, 0).await;
                                assert_eq!(r.unwrap(), 4096);
                                buf = b;
                            } else {
                                let fd2 = Arc::clone(&fd);
                                let (b, r) = tokio::task::spawn_blocking(move || {
                                    let mut b = buf;
                                    let r = nix::sys::uio::pread(&*fd2, &mut b[..], off as i64);
                                    (b, r)
                                })
                                .await
                                .unwrap();
                                assert_eq!(r.unwrap(), 4096);
                                buf = b;
                            }
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            (stop, tasks)
        };
        for (name, use_uring) in [("io_uring", true), ("spawn_blocking pread", false)] {
            let (stop, tasks) = run(use_uring);
            let t0 = std::time::Instant::now();
            tokio::time::sleep(Duration::from_secs(2)).await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let mut total = 0;
            for t in tasks {
                total += t.await.unwrap();
            }
            let secs = t0.elapsed().as_secs_f64();
            println!("{name}: 4 KiB random read QD{QD}: {:.0} IOPS", total as f64 / secs);
        }
    }
}
