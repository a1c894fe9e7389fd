//! The source side of the handover: HELLO, the carriers bound, RAM
//! pre-copy, pre-switchover, the switchover up to PREPARED, the commit
//! point, COMMIT. Every wait is bounded and every wait before the commit
//! point gives way to `migrate_cancel`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use block::Graph;
use jobs::JobManager;
use tokio::io::{AsyncRead, AsyncWrite, BufWriter, WriteHalf};
use tokio::sync::mpsc;
use vm_memory::{Bytes, GuestAddress};

use super::bitmaps;
use super::carriers::{self, Carrier};
use super::params::Parameters;
use super::points::point;
use super::state::{Handover, Migration, Status};
use super::storage::{self, Route};
use super::MigrationError;
use crate::stream::{self, Hello, Reply, StreamError, PAGE};
use crate::switchover::{self, Bounds};
use crate::vm::{RunState, Vm};

/// Pages per RAM section (a cancel takes effect between two).
const RUN: usize = 64;
/// How long a failing attempt tries to tell the destination (ABORT).
const ABORT_BOUND: Duration = Duration::from_secs(1);
/// How long a committed source waits for the destination to acknowledge
/// COMMIT (only for the record: the guest is the destination's either way).
const ACK_BOUND: Duration = Duration::from_secs(2);
/// A remote node's flush, in a task of its own (see `flush_all`).
type FlushTask = tokio::task::JoinHandle<Result<(), String>>;
/// How long a pass waits for the flush of a mirror target the management
/// made (see `flush_all`).
const LENIENT_FLUSH: Duration = Duration::from_secs(1);
/// `max-bandwidth` is enforced over windows of this length (QEMU's 100 ms).
const RATE_WINDOW: Duration = Duration::from_millis(100);

/// Counts the bytes written through it: QEMU's `transferred`.
struct Counted<W> {
    inner: W,
    bytes: u64,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Counted<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let me = &mut *self;
        let r = Pin::new(&mut me.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            me.bytes += *n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `max-bandwidth` over pre-copy: at most rate/10 bytes a 100 ms window.
struct RateLimit {
    per_window: u64,
    window: Instant,
    used: u64,
}

impl RateLimit {
    fn new(bytes_per_second: u64) -> Self {
        RateLimit { per_window: bytes_per_second / 10, window: Instant::now(), used: 0 }
    }

    /// Account `n` bytes; wait out the window once it is spent (0: no limit).
    async fn spend(&mut self, mig: &Migration, n: u64) -> Result<(), MigrationError> {
        if self.per_window == 0 {
            return Ok(());
        }
        self.used += n;
        if self.used < self.per_window {
            return Ok(());
        }
        let end = self.window + RATE_WINDOW;
        tokio::select! {
            biased;
            _ = mig.cancelled() => return Err(mig.stop_reason()),
            _ = tokio::time::sleep_until(end.into()) => {}
        }
        // Whatever went over carries into the next window.
        self.used -= self.per_window;
        self.window = Instant::now();
        Ok(())
    }
}

/// The connection's two directions: our writes, and the destination's
/// replies read by a task of their own (so a refusal sent mid-stream is
/// seen at once, and a stalled return path never blocks a write).
struct Link<S> {
    w: Counted<BufWriter<WriteHalf<S>>>,
    /// Bytes written when the guest stopped for the switchover.
    at_stop: Option<u64>,
    /// COMMIT went out (its acknowledgement is awaited after the storage
    /// copy's teardown, which overlaps the destination's).
    commit_sent: bool,
    replies: mpsc::Receiver<Result<Reply, StreamError>>,
    reader: tokio::task::JoinHandle<()>,
    io: Duration,
}

impl<S> Drop for Link<S> {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Link<S> {
    fn new(conn: S, io: Duration) -> Self {
        let (mut r, w) = tokio::io::split(conn);
        let (tx, replies) = mpsc::channel(4);
        let reader = tokio::spawn(async move {
            loop {
                let reply = stream::read_reply(&mut r).await;
                let end = reply.is_err();
                if tx.send(reply).await.is_err() || end {
                    return;
                }
            }
        });
        let w = Counted { inner: BufWriter::with_capacity(1 << 20, w), bytes: 0 };
        Link { w, at_stop: None, commit_sent: false, replies, reader, io }
    }

    /// The guest stopped: what is written from now on is downtime's.
    fn mark_stopped(&mut self, mig: &Migration) {
        mig.mark_stopped();
        self.at_stop.get_or_insert(self.w.bytes);
    }

    /// Publish the byte counts to `query-migrate`.
    fn account(&self, mig: &Migration) {
        mig.counters.transferred.store(self.w.bytes, Ordering::SeqCst);
        if let Some(at) = self.at_stop {
            mig.counters.downtime_bytes.store(self.w.bytes - at, Ordering::SeqCst);
        }
    }

    /// A refusal that already arrived, if any.
    fn refusal(&mut self) -> Option<String> {
        match self.replies.try_recv() {
            Ok(Ok(Reply::Refused(why))) => Some(why),
            _ => None,
        }
    }

    /// After a failed write: the destination's reason, if it sent one.
    async fn reason_for(&mut self, e: MigrationError) -> MigrationError {
        if matches!(e, MigrationError::Cancelled) || e.is_link_lost() {
            return e;
        }
        match tokio::time::timeout(Duration::from_millis(500), self.replies.recv()).await {
            Ok(Some(Ok(Reply::Refused(why)))) => MigrationError::Refused(why),
            _ => e,
        }
    }

    /// The next reply, within `bound`; a cancel ends the wait.
    async fn expect(&mut self, mig: &Migration, bound: Duration, what: &'static str) -> Result<Reply, MigrationError> {
        tokio::select! {
            biased;
            _ = mig.cancelled() => Err(mig.stop_reason()),
            r = tokio::time::timeout(bound, self.replies.recv()) => match r {
                Err(_) => Err(MigrationError::Timeout(what, bound)),
                Ok(None) => Err(MigrationError::LinkLost("the return path closed")),
                Ok(Some(Err(e))) => Err(MigrationError::ReturnPath(e)),
                Ok(Some(Ok(reply))) => Ok(reply),
            }
        }
    }

    /// Best effort, bounded: tell the destination to roll back.
    async fn abort(&mut self, why: &str) {
        let _ = tokio::time::timeout(ABORT_BOUND, stream::write_abort(&mut self.w, why)).await;
    }
}

/// Write through `f` within the I/O bound; a cancel ends the wait.
async fn guarded<T, F: Future<Output = std::io::Result<T>>>(
    mig: &Migration,
    io: Duration,
    f: F,
) -> Result<T, MigrationError> {
    tokio::select! {
        biased;
        _ = mig.cancelled() => Err(mig.stop_reason()),
        r = tokio::time::timeout(io, f) => match r {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => Err(MigrationError::Stream(StreamError::Io(e))),
            Err(_) => Err(MigrationError::Timeout("progress writing to the destination", io)),
        }
    }
}

/// Send the pages set in `log` (a dirty-log bitmap), in runs of at most
/// RUN pages, within `rate` if given (pre-copy: `max-bandwidth`). A page set
/// in `untouched` (see [`crate::memory::untouched`]) goes as a zero page
/// unread; the others are read straight into the run, and an all-zero one
/// goes as a marker.
async fn send_pages<S>(
    link: &mut Link<S>,
    mig: &Migration,
    vm: &Vm,
    log: &[u64],
    untouched: Option<&[u64]>,
    mut rate: Option<&mut RateLimit>,
) -> Result<(), MigrationError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mem = vm.memory();
    let pages = vm.config().memory / PAGE as u64;
    let bit = |map: &[u64], i: u64| map.get((i / 64) as usize).is_some_and(|w| w & (1 << (i % 64)) != 0);
    let mut run = stream::RamRun { first_page: 0, zero: Vec::with_capacity(RUN), data: Vec::with_capacity(RUN * PAGE) };
    let mut i = 0u64;
    while i < pages {
        if !bit(log, i) {
            i += 1;
            continue;
        }
        run.first_page = i;
        run.zero.clear();
        run.data.clear();
        while i < pages && bit(log, i) && run.zero.len() < RUN {
            if untouched.is_some_and(|u| bit(u, i)) {
                run.zero.push(true);
            } else {
                let at = run.data.len();
                run.data.resize(at + PAGE, 0);
                let addr = i * PAGE as u64;
                mem.read_slice(&mut run.data[at..], GuestAddress(addr))
                    .map_err(|source| crate::memory::error("read", addr, PAGE, source))?;
                let zero = crate::memory::is_zero(&run.data[at..]);
                if zero {
                    run.data.truncate(at);
                }
                run.zero.push(zero);
            }
            i += 1;
        }
        if let Some(why) = link.refusal() {
            return Err(MigrationError::Refused(why));
        }
        let io = link.io;
        let before = link.w.bytes;
        let zero = match guarded(mig, io, stream::write_ram_run(&mut link.w, &run)).await {
            Ok(zero) => zero,
            Err(e) => return Err(link.reason_for(e).await),
        };
        let n = run.zero.len() as u64;
        mig.counters.pages_sent.fetch_add(n - zero, Ordering::SeqCst);
        mig.counters.zero_pages.fetch_add(zero, Ordering::SeqCst);
        let _ =
            mig.counters.dirty_pages.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| Some(d.saturating_sub(n)));
        link.account(mig);
        if let Some(r) = rate.as_deref_mut() {
            r.spend(mig, link.w.bytes - before).await?;
        }
    }
    Ok(())
}

/// One pre-copy pass's measures, for `query-migrate` and the decision to
/// switch over.
struct Pass {
    started: Instant,
    bytes: u64,
    pages: u64,
}

impl Pass {
    fn start<S>(link: &Link<S>, mig: &Migration) -> Pass {
        Pass {
            started: Instant::now(),
            bytes: link.w.bytes,
            pages: mig.counters.pages_sent.load(Ordering::SeqCst) + mig.counters.zero_pages.load(Ordering::SeqCst),
        }
    }

    /// Publish the pass's rates; returns the bytes it put on the wire per
    /// millisecond (QEMU's measure: the switchover's estimate takes every
    /// dirty page at its full size, as a page the guest wrote seldom is zero).
    fn end<S>(self, link: &Link<S>, mig: &Migration) -> f64 {
        let secs = self.started.elapsed().as_secs_f64().max(1e-6);
        let bytes = (link.w.bytes - self.bytes) as f64;
        let pages = mig.counters.pages_sent.load(Ordering::SeqCst) + mig.counters.zero_pages.load(Ordering::SeqCst)
            - self.pages;
        mig.counters.set_mbps(bytes * 8.0 / secs / 1e6);
        mig.counters.pages_per_second.store((pages as f64 / secs) as u64, Ordering::SeqCst);
        bytes / secs / 1000.0
    }
}

/// The source side of a migration whose attempt `mig.begin(Source)` opened;
/// `connect` opens the connection. Ends the attempt: completed, failed or
/// cancelled. On failure the source is as before (the switchover rolled
/// back, or never started) and the destination was told (ABORT, best effort).
/// `storage`: copy the guest's disk to the destination's (storage copy,
/// reaching its exports by this route); the copy's nodes and jobs are
/// gone when the attempt ends, however it ends.
pub async fn migrate_out<C, S>(
    mig: &Arc<Migration>,
    graph: &Arc<Graph>,
    jobs: &Arc<JobManager>,
    vm: &Arc<Vm>,
    connect: C,
    storage: Option<Route>,
) where
    C: Future<Output = std::io::Result<S>> + Send,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let p = mig.params();
    let mut link = None;
    let mut made = Vec::new();
    match outgoing(mig, graph, jobs, vm, connect, &p, storage.as_ref(), &mut made, &mut link).await {
        Ok(()) => {
            if let Err(e) = storage::detach(graph, jobs, &mut made).await {
                tracing::warn!(error = %e, "migrated; removing the storage copy's nodes and jobs left some");
            }
            if let Some(l) = link.as_mut() {
                acknowledged(l, mig, &p).await;
            }
            mig.complete()
        }
        Err(e) => {
            let mut text = crate::error_text(&e);
            tracing::warn!(error = %text, "migration failed; the source is as it was");
            if let Some(l) = link.as_mut() {
                l.abort(&text).await;
            }
            if let Err(e) = storage::detach(graph, jobs, &mut made).await {
                text = format!("{text}; and removing the storage copy left: {e}");
            }
            mig.set_handover(Handover::RolledBack);
            mig.fail(text, mig.is_cancelled());
        }
    }
}

/// The destination acknowledges COMMIT: only for the record (and the
/// downtime, which ends here); the guest is its own either way.
async fn acknowledged<S>(link: &mut Link<S>, mig: &Migration, p: &Parameters)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if !link.commit_sent {
        return;
    }
    let t = Instant::now();
    match link.expect(mig, ACK_BOUND.min(p.io_timeout), "the acknowledgement of COMMIT").await {
        Ok(Reply::Committed) => {
            mig.step_done("commit-acknowledged", t.elapsed());
            mig.set_decision_note("COMMIT acknowledged".into());
        }
        Ok(other) => tracing::warn!(reply = ?other, "an unexpected reply to COMMIT"),
        Err(e) => tracing::warn!(error = %crate::error_text(&e), "COMMIT sent but not acknowledged"),
    }
}

#[allow(clippy::too_many_arguments)]
async fn outgoing<C, S>(
    mig: &Arc<Migration>,
    graph: &Arc<Graph>,
    jobs: &Arc<JobManager>,
    vm: &Arc<Vm>,
    connect: C,
    p: &Parameters,
    storage: Option<&Route>,
    made: &mut Vec<storage::Copy>,
    slot: &mut Option<Link<S>>,
) -> Result<(), MigrationError>
where
    C: Future<Output = std::io::Result<S>> + Send,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Capability dirty-bitmaps: the bitmaps that go are chosen now and stay
    // busy until the attempt ends (they are read once the nodes are inactive).
    let claimed = match mig.capabilities().dirty_bitmaps {
        true => Some(bitmaps::claim(graph, p.block_bitmap_mapping.as_deref()).map_err(MigrationError::Bitmap)?),
        false => None,
    };
    // Setup: connect (abandoned on cancel), HELLO, the destination's disks.
    let conn = tokio::select! {
        biased;
        _ = mig.cancelled() => return Err(mig.stop_reason()),
        r = tokio::time::timeout(p.connect_timeout, connect) => match r {
            Err(_) => return Err(MigrationError::Timeout("connection to the destination", p.connect_timeout)),
            Ok(Err(e)) => return Err(MigrationError::Connect(e)),
            Ok(Ok(c)) => c,
        }
    };
    let link = slot.insert(Link::new(conn, p.io_timeout));
    point("migration::setup").await?;
    let tenure = vm.tenure();
    let hello = Hello {
        memory: vm.config().memory,
        vcpus: vm.config().vcpus,
        disk_size: vm.device().backend().node().length(),
        layout: stream::layout_hash(),
        storage: storage.is_some(),
        lease: tenure.map(|t| stream::HelloLease {
            key: t.key().to_string(),
            owner: t.owner().to_string(),
            generation: t.generation().unwrap_or(0),
        }),
    };
    guarded(mig, p.hello_timeout, async {
        stream::write_header(&mut link.w).await?;
        stream::write_hello(&mut link.w, &hello).await
    })
    .await?;
    let welcome = match link.expect(mig, p.hello_timeout, "answer to HELLO").await? {
        Reply::Welcome(w) => w,
        Reply::Refused(why) => return Err(MigrationError::Refused(why)),
        other @ (Reply::Prepared | Reply::Committed | Reply::Synced) => {
            let what = format!("{other:?} before anything was sent");
            return Err(MigrationError::Stream(StreamError::BadReply(what)));
        }
    };
    let targets = welcome.targets;
    // The lease: both sides keep the same one, under different names.
    let lease = match (tenure, welcome.lease) {
        (None, None) => None,
        (Some(t), None) => {
            return Err(MigrationError::Lease(format!(
                "the destination keeps no lease; this guest's is {} (start the destination with the same --lease key)",
                t.key()
            )))
        }
        (None, Some((key, _))) => {
            return Err(MigrationError::Lease(format!(
                "the destination keeps lease {key}; this source has none (start it with --lease)"
            )))
        }
        (Some(t), Some((key, owner))) => {
            if key != t.key() {
                return Err(MigrationError::Lease(format!(
                    "the destination keeps lease {key}, this guest's is {}",
                    t.key()
                )));
            }
            if owner == t.owner() {
                return Err(MigrationError::Lease(format!(
                    "both daemons call themselves {owner} in the lease store (give each its own owner=)"
                )));
            }
            Some(Leased { tenure: t.clone(), to: owner, generation: hello.lease.as_ref().map_or(0, |l| l.generation) })
        }
    };
    let carriers = match storage {
        None => {
            if let Some(t) = targets.iter().find(|t| t.at.is_some()) {
                return Err(MigrationError::Stream(StreamError::BadReply(format!(
                    "WELCOME says where disk '{}' is exported, but this is no storage copy",
                    t.node
                ))));
            }
            carriers::bind(jobs, vm, &targets).map_err(MigrationError::Disk)?
        }
        Some(route) => {
            // Storage copy: the disks first, in sync before RAM moves.
            let c = storage::attach(mig, graph, jobs, vm, &targets, route, p.io_timeout, made).await?;
            copies_ready(link, mig, &c, p.io_timeout).await?;
            point("migration::storage-ready").await?;
            c
        }
    };
    if !matches!(vm.state(), RunState::Running | RunState::Paused) {
        return Err(MigrationError::Invalid(format!("the guest is {} now", vm.state().as_str())));
    }

    // Active: the first pass sends every page; later passes what the guest
    // dirtied meanwhile, until the switchover's prediction fits
    // `downtime-limit`: the dirty RAM and the mirrors' remaining work at the
    // measured rate, plus the fixed costs measured while the guest still
    // runs (a flush of every node, as the inactivation will do, and the
    // round trips to PREPARED and to COMMIT's acknowledgement). If
    // `x-baton-max-passes` do not get there: fail (`x-baton-strict-downtime`)
    // or switch over anyway, as QEMU, and `downtime` says by how much.
    // As QEMU, the first sync (pass 1) is part of the setup.
    let _ = vm.take_dirty_log()?;
    let mut synced = Instant::now();
    let pages = vm.config().memory / PAGE as u64;
    mig.counters.dirty_pages.store(pages, Ordering::SeqCst);
    mig.counters.expected_downtime.store(p.downtime_limit, Ordering::SeqCst);
    mig.dirty_sync();
    mig.transition(Status::Active);
    let mut rate = RateLimit::new(p.max_bandwidth);
    let all = vec![u64::MAX; pages.div_ceil(64) as usize];
    // Pages the guest never touched go unread (a page touched from now on is
    // in the next pass's dirty log anyway).
    let untouched = crate::memory::untouched(vm.memory())
        .map_err(|e| tracing::info!(error = %e, "every page is read in the first pass"))
        .ok();
    let pass = Pass::start(link, mig);
    send_pages(link, mig, vm, &all, untouched.as_deref(), Some(&mut rate)).await?;
    let mut bandwidth = pass.end(link, mig);
    point("migration::precopy").await?;
    // Dirty pages a sync found and pre-copy left to the switchover.
    let mut unsent = Vec::new();
    let mut rtt = Duration::MAX;
    let mut converged = None;
    let mut flushing = Vec::new();
    for passes in 1..=p.max_passes {
        // The destination has applied everything so far (the round trip
        // only ever overstates the link's: take the least seen).
        rtt = rtt.min(sync(link, mig, p.io_timeout).await?);
        let flush = flush_all(link, graph, mig, &carriers, made, &mut flushing, p.io_timeout).await?;
        if storage.is_some() {
            // A copy that failed meanwhile fails the attempt now, not at the switchover.
            storage::ready(&carriers)?;
        }
        let log = vm.take_dirty_log()?;
        let n = crate::memory::count(&log);
        let since = synced.elapsed().as_secs_f64().max(1e-6);
        synced = Instant::now();
        mig.counters.dirty_pages_rate.store((n as f64 / since) as u64, Ordering::SeqCst);
        mig.counters.dirty_pages.store(n, Ordering::SeqCst);
        mig.dirty_sync();
        // The last RAM goes unthrottled while the guest is stopped: at the
        // bandwidth the operator says is available, else at the measured one.
        let at = match p.avail_switchover_bandwidth {
            0 => bandwidth,
            b => b as f64 / 1000.0,
        };
        let mirrors: u64 = carriers.iter().map(|c| c.job.remaining()).sum();
        let ram_ms = ((n * PAGE as u64 + mirrors) as f64 / at.max(1e-3)) as u64;
        let fixed_ms = (flush + 2 * rtt).as_millis() as u64 + 1;
        let predicted = ram_ms + fixed_ms;
        mig.counters.expected_downtime.store(predicted, Ordering::SeqCst);
        if predicted <= p.downtime_limit {
            // The rest fits: it goes in the switchover, with what the guest dirties until it stops.
            unsent = log;
            converged = Some(());
            break;
        }
        if passes == p.max_passes {
            if p.strict_downtime == 1 {
                return Err(MigrationError::NotConverged {
                    passes,
                    predicted_ms: predicted,
                    ram_ms,
                    fixed_ms,
                    mbps: at / 1000.0,
                    limit_ms: p.downtime_limit,
                });
            }
            tracing::warn!(passes, predicted, limit = p.downtime_limit, "pre-copy did not converge; switching over");
            unsent = log;
            break;
        }
        let pass = Pass::start(link, mig);
        send_pages(link, mig, vm, &log, None, Some(&mut rate)).await?;
        bandwidth = pass.end(link, mig);
    }
    if converged.is_none() {
        mig.set_decision_note(format!(
            "downtime-limit {} ms not met: the switchover was predicted at {} ms",
            p.downtime_limit,
            mig.counters.expected_downtime.load(Ordering::SeqCst)
        ));
    }
    if mig.is_stopping() {
        return Err(mig.stop_reason());
    }

    let was_running = vm.is_running();
    if mig.capabilities().pause_before_switchover {
        // Stop first and let the management decide (migrate-continue or cancel).
        let go = match vm.stop_bounded(RunState::Paused, p.drain_timeout).await {
            Ok(_) => {
                link.mark_stopped(mig);
                mig.transition(Status::PreSwitchover);
                match wait_at_pre_switchover(link, mig, p.io_timeout).await {
                    Ok(()) => point("migration::pre-switchover").await.map_err(MigrationError::from),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e.into()),
        };
        if let Err(e) = go {
            // Stopped for the switchover that is not going to happen: resume.
            if was_running {
                vm.cont().await?;
            }
            return Err(e);
        }
    }

    // Device: the switchover, up to PREPARED and the commit point. As in
    // QEMU, the status says `device` once the guest is stopped and drained
    // (so `device` never goes with a `running` run state).
    link.mark_stopped(mig);
    let bounds = Bounds { drain: p.drain_timeout, sync: p.mirror_sync_timeout, with_ram: false };
    let sync = || carriers::in_sync(&carriers, vm);
    let cancelled = || mig.is_stopping();
    let prepared_timeout = p.prepared_timeout;
    let bitmaps_of = claimed.as_ref().map(bitmaps::Claimed::bitmaps);
    let moved_to = std::sync::Mutex::new(None);
    let (lease, moved_at) = (lease.as_ref(), &moved_to);
    let handover = |st: crate::vm::VmState| async move {
        hand_over(link, mig, vm, st, &unsent, was_running, prepared_timeout, bitmaps_of, lease, moved_at)
            .await
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
    };
    let on_step = |step, took| {
        mig.step_done(step, took);
        // A cancel that came during the stop already moved the status to
        // `cancelling`: the switchover rolls back at its next check.
        if step == "drain" && !mig.is_stopping() {
            mig.transition(Status::Device);
        }
    };
    let moved = || -> switchover::Moved<'_> {
        let waits: Vec<_> = carriers.iter().map(|c| c.job.moved()).collect();
        Box::pin(block::sync::select_any(waits))
    };
    let r = switchover::run(graph, vm, was_running, bounds, sync, &moved, &cancelled, &on_step, handover).await;
    if let Err(e) = r {
        return Err(e.into());
    }
    let commit_generation = *block::sync::lock(&moved_to);
    keep_carriers(&carriers);
    if !made.is_empty() {
        // The storage copy is done with the destination's export: let go of
        // it before COMMIT, so the destination withdraws an idle export
        // (not one it has to cut under our connection).
        let t = Instant::now();
        if let Err(e) = storage::detach(graph, jobs, made).await {
            tracing::warn!(error = %e, "committed; removing the storage copy's nodes and jobs left some");
        }
        mig.step_done("copy-detach", t.elapsed());
    }

    // Committed: the guest belongs to the destination. Tell it; if that
    // fails, it stays paused until the decision reaches it another way.
    let link = match slot.as_mut() {
        Some(l) => l,
        None => return Ok(()),
    };
    let sent = match point("migration::after-commit").await {
        Ok(()) => guarded(mig, p.io_timeout, stream::write_commit(&mut link.w, commit_generation)).await,
        Err(e) => Err(e.into()),
    };
    let t = Instant::now();
    match sent {
        Ok(()) => {
            mig.step_done("commit-sent", t.elapsed());
            mig.set_decision_note("COMMIT sent".into());
            link.commit_sent = true;
        }
        Err(e) => {
            let why = crate::error_text(&e);
            tracing::warn!(error = %why, "COMMIT not delivered: the destination waits for x-baton-migrate-decide commit");
            mig.set_decision_note(format!("committed, but COMMIT could not be sent ({why}): resolve the destination with x-baton-migrate-decide commit"));
        }
    }
    Ok(())
}

/// Wait until every storage copy is READY (then write-blocking, so the disk
/// stays in sync and the switchover has nothing to drain): RAM pre-copy
/// starts with the disks in sync, as libvirt starts `migrate` after
/// BLOCK_JOB_READY. Keepalives go meanwhile, a cancel or a refusal ends
/// the wait, and copies that make no progress within `io` fail it.
async fn copies_ready<S>(
    link: &mut Link<S>,
    mig: &Migration,
    carriers: &[Carrier],
    io: Duration,
) -> Result<(), MigrationError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let left = || carriers.iter().map(|c| c.job.remaining()).sum::<u64>();
    let mut last = (left(), Instant::now());
    let mut alive = Instant::now();
    loop {
        // Armed before the check: a copy's move between the two is not missed.
        let moved = block::sync::select_any(carriers.iter().map(|c| c.job.moved()).collect());
        if storage::ready(carriers)? {
            break;
        }
        let now = left();
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > io {
            return Err(MigrationError::Timeout("progress copying the guest's disk to the destination", io));
        }
        if let Some(why) = link.refusal() {
            return Err(MigrationError::Refused(why));
        }
        if alive.elapsed() >= io / 3 {
            if let Err(e) = guarded(mig, io, stream::write_keepalive(&mut link.w)).await {
                return Err(link.reason_for(e).await);
            }
            alive = Instant::now();
        }
        tokio::select! {
            biased;
            _ = mig.cancelled() => return Err(mig.stop_reason()),
            _ = moved => {}
            _ = tokio::time::sleep(storage::READY_POLL) => {}
        }
    }
    Ok(())
}

/// SYNC and its answer: the destination applied everything before it.
/// Returns the round trip.
async fn sync<S>(link: &mut Link<S>, mig: &Migration, io: Duration) -> Result<Duration, MigrationError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let t = Instant::now();
    if let Err(e) = guarded(mig, io, stream::write_sync(&mut link.w)).await {
        return Err(link.reason_for(e).await);
    }
    match link.expect(mig, io, "SYNCED from the destination").await? {
        Reply::Synced => Ok(t.elapsed()),
        Reply::Refused(why) => Err(MigrationError::Refused(why)),
        other => Err(MigrationError::Stream(StreamError::BadReply(format!("{other:?} instead of SYNCED")))),
    }
}

/// Flush every active node, as the inactivation will (what is flushed now
/// is not flushed again then), side by side; returns how long it took.
/// Remote nodes (`nbd`: mirror targets on the destination) flush only if a
/// carrier writes to them, each in a task of its own (its flush goes on by
/// itself if the wait ends): a storage copy's own (`copies`, whose requests
/// are bounded by `io`) must answer within `io` or the attempt fails now,
/// as the target is stalled; the management's get [`LENIENT_FLUSH`] and a
/// failure is only logged, as a stalled one must fail the switchover's own
/// bounds (and the flush at the inactivation is a round trip, which the
/// prediction counts). Other remote nodes are left alone. Keepalives go
/// meanwhile (a flush may take seconds on a busy host), and a cancel ends
/// the wait.
async fn flush_all<S>(
    link: &mut Link<S>,
    graph: &Graph,
    mig: &Migration,
    carriers: &[Carrier],
    copies: &[storage::Copy],
    pending: &mut Vec<(String, FlushTask)>,
    io: Duration,
) -> Result<Duration, MigrationError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let t = Instant::now();
    // A remote flush an earlier pass stopped waiting for is not sent again
    // while it is still out (a stalled target would pile them up).
    pending.retain(|(_, task)| !task.is_finished());
    let is_remote = |n: &Arc<block::Node>| {
        std::iter::successors(Some(n.clone()), |x| x.child().cloned()).any(|x| x.driver_name() == "nbd")
    };
    let (remote, local): (Vec<_>, Vec<_>) = graph.nodes().into_iter().filter(|n| n.is_active()).partition(is_remote);
    let carried =
        |n: &Arc<block::Node>| carriers.iter().any(|c| c.job.nodes().is_some_and(|(_, t)| Arc::ptr_eq(&t, n)));
    let flush = async {
        let remote: Vec<_> = remote
            .into_iter()
            .filter(carried)
            .filter(|n| !pending.iter().any(|(name, _)| name == n.name()))
            .map(|n| {
                let name = n.name().to_string();
                let strict = copies.iter().any(|c| c.node == name);
                (name, strict, tokio::spawn(async move { n.flush().await.map_err(|e| e.chain()) }))
            })
            .collect();
        let flushed = block::sync::join_all(local.iter().map(|n| n.flush()).collect()).await;
        if let Some((n, Err(e))) = local.iter().zip(flushed).find(|(_, r)| r.is_err()) {
            return Err(MigrationError::Disk(format!("flushing '{}' before the switchover: {}", n.name(), e.chain())));
        }
        for (name, strict, mut task) in remote {
            let bound = if strict { io } else { LENIENT_FLUSH.min(io / 2) };
            let why = match tokio::time::timeout_at((t + bound).into(), &mut task).await {
                Ok(Ok(Ok(()))) => continue,
                Ok(Ok(Err(e))) => e,
                Ok(Err(e)) => e.to_string(),
                Err(_) => {
                    let why = format!("no answer within {bound:?}");
                    pending.push((name.clone(), task));
                    why
                }
            };
            let why = format!("flushing '{name}' (on the destination) before the switchover: {why}");
            if strict {
                return Err(MigrationError::Disk(why));
            }
            tracing::warn!("{why}; the switchover will tell");
        }
        Ok(())
    };
    tokio::pin!(flush);
    let every = (io / 3).max(Duration::from_millis(1));
    loop {
        tokio::select! {
            biased;
            _ = mig.cancelled() => return Err(mig.stop_reason()),
            r = &mut flush => return r.map(|()| t.elapsed()),
            _ = tokio::time::sleep(every) => {
                if let Err(e) = guarded(mig, io, stream::write_keepalive(&mut link.w)).await {
                    return Err(link.reason_for(e).await);
                }
            }
        }
    }
}

/// Wait for migrate-continue (or a cancel). Meanwhile keep the destination's
/// reads alive (KEEPALIVE every third of the I/O bound, since management may
/// take its time: libvirt cancels its mirrors here) and watch for a refusal.
async fn wait_at_pre_switchover<S>(link: &mut Link<S>, mig: &Migration, io: Duration) -> Result<(), MigrationError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let every = (io / 3).max(Duration::from_millis(1));
    loop {
        tokio::select! {
            go = mig.wait_proceed() => return go.map_err(|()| mig.stop_reason()),
            reply = link.replies.recv() => return Err(match reply {
                Some(Ok(Reply::Refused(why))) => MigrationError::Refused(why),
                Some(Ok(_)) => MigrationError::Stream(StreamError::BadReply("an unexpected reply at pre-switchover".into())),
                Some(Err(e)) => MigrationError::ReturnPath(e),
                None => MigrationError::LinkLost("the return path closed"),
            }),
            _ = tokio::time::sleep(every) => {
                if let Err(e) = guarded(mig, io, stream::write_keepalive(&mut link.w)).await {
                    return Err(link.reason_for(e).await);
                }
            }
        }
    }
}

/// The carriers' jobs stay the management's after a success (libvirt
/// cancels them); nothing to do but say so in the log.
fn keep_carriers(carriers: &[Carrier]) {
    for c in carriers {
        tracing::debug!(job = %c.job.id, disk = %c.target.node, "disk handed over");
    }
}

/// Send the dirty bitmaps the attempt claimed (the nodes are inactive:
/// their bits are final). A cancel acts between two.
async fn send_bitmaps<S>(link: &mut Link<S>, mig: &Migration, list: &[bitmaps::Outgoing]) -> Result<(), MigrationError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = link.io;
    for o in list {
        let (meta, bits) = o.export().map_err(MigrationError::Bitmap)?;
        if let Some(why) = link.refusal() {
            return Err(MigrationError::Refused(why));
        }
        if let Err(e) = guarded(mig, io, stream::write_bitmap(&mut link.w, &meta, &bits)).await {
            return Err(link.reason_for(e).await);
        }
        tracing::debug!(node = %o.node, bitmap = %o.bitmap.name(), bytes = bits.len(), "dirty bitmap sent");
    }
    Ok(())
}

/// The guest's lease in a migration: kept by `tenure` at `generation` (as
/// HELLO said), to move to the destination named `to`.
struct Leased {
    tenure: Arc<crate::tenure::Tenure>,
    to: String,
    generation: u64,
}

/// The guest is stopped and every node inactive: the last dirty pages, the
/// dirty bitmaps (capability dirty-bitmaps: `bitmaps_of`, those the attempt
/// claimed), the vCPUs, the device, END; then PREPARED, and the commit point:
/// with a lease, its transfer to the destination (the generation it moved
/// at goes to `moved_at`, for COMMIT).
#[allow(clippy::too_many_arguments)]
async fn hand_over<S>(
    link: &mut Link<S>,
    mig: &Migration,
    vm: &Vm,
    st: crate::vm::VmState,
    unsent: &[u64],
    was_running: bool,
    prepared_timeout: Duration,
    bitmaps_of: Option<&[bitmaps::Outgoing]>,
    lease: Option<&Leased>,
    moved_at: &std::sync::Mutex<Option<u64>>,
) -> Result<(), MigrationError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let t = Instant::now();
    let mut log = vm.take_dirty_log()?;
    for (w, u) in log.iter_mut().zip(unsent) {
        *w |= u;
    }
    mig.counters.dirty_pages.store(crate::memory::count(&log), Ordering::SeqCst);
    mig.dirty_sync();
    send_pages(link, mig, vm, &log, None, None).await?;
    if let Some(list) = bitmaps_of {
        send_bitmaps(link, mig, list).await?;
        point("migration::after-bitmaps").await?;
    }
    let io = link.io;
    let sent = guarded(mig, io, async {
        for (id, v) in st.vcpus.iter().enumerate() {
            stream::write_vcpu(&mut link.w, id as u32, v).await?;
        }
        stream::write_device(&mut link.w, st.device).await?;
        stream::write_kvmclock(&mut link.w, st.clock).await?;
        tokio::io::AsyncWriteExt::flush(&mut link.w).await
    })
    .await;
    if let Err(e) = sent {
        return Err(link.reason_for(e).await);
    }
    point("migration::before-end").await?;
    // The lease, proven afresh; no renewal until the decision, so the
    // destination can tell a source that resumed (its record changes) from
    // one that has not decided yet.
    let handing = match lease {
        None => None,
        Some(l) => {
            let h = l.tenure.begin_handover().await.map_err(|e| MigrationError::Lease(crate::error_text(&e)))?;
            if h.generation() != l.generation {
                return Err(MigrationError::Lease(format!(
                    "the lease moved from generation {} to {} during the migration",
                    l.generation,
                    h.generation()
                )));
            }
            Some(h)
        }
    };
    let sent = guarded(mig, io, stream::write_end(&mut link.w, was_running)).await;
    if let Err(e) = sent {
        return Err(link.reason_for(e).await);
    }
    link.account(mig);
    mig.step_done("send-state", t.elapsed());
    let t = Instant::now();
    mig.set_handover(Handover::AwaitingPrepared);
    point("migration::after-end").await?;
    // With a lease, PREPARED must come while the lease is surely still
    // ours: past its deadline the source could not resume at its generation.
    let prepared_timeout = match &handing {
        Some(h) => prepared_timeout.min(h.deadline().saturating_duration_since(Instant::now())),
        None => prepared_timeout,
    };
    match link.expect(mig, prepared_timeout, "PREPARED from the destination").await? {
        Reply::Prepared => mig.step_done("prepared", t.elapsed()),
        Reply::Refused(why) => return Err(MigrationError::Refused(why)),
        other @ (Reply::Welcome(_) | Reply::Committed | Reply::Synced) => {
            return Err(MigrationError::Stream(StreamError::BadReply(format!("{other:?} instead of PREPARED"))))
        }
    }
    let t = Instant::now();
    point("migration::before-commit").await?;
    // The commit point: one step that a cancel either beat or comes too late for.
    match (handing, lease) {
        (Some(h), Some(l)) => {
            if mig.is_stopping() {
                return Err(MigrationError::Cancelled);
            }
            // The lease's transfer is the commit point: once it moved, the
            // guest is the destination's, whatever happens to COMMIT.
            let moved = h.transfer(&l.to).await.map_err(|e| MigrationError::Lease(crate::error_text(&e)))?;
            *block::sync::lock(moved_at) = Some(moved.generation);
            mig.commit_moved_lease();
        }
        _ => {
            if !mig.try_commit() {
                return Err(MigrationError::Cancelled);
            }
        }
    }
    mig.step_done("commit", t.elapsed());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `max-bandwidth` holds pre-copy to rate/10 bytes a 100 ms window, and
    /// a cancel ends the wait at once.
    #[test]
    fn the_rate_limit_holds_bytes_to_their_windows_and_gives_way_to_a_cancel() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let mig = Migration::new(None);
            let mut r = RateLimit::new(10_000_000); // 1 MB a window
            let t = Instant::now();
            for _ in 0..25 {
                r.spend(&mig, 100_000).await.unwrap(); // 2.5 MB: two full windows waited out
            }
            let took = t.elapsed();
            assert!(took >= Duration::from_millis(190) && took < Duration::from_secs(2), "{took:?}");
            let mut none = RateLimit::new(0);
            let t = Instant::now();
            none.spend(&mig, u64::MAX / 2).await.unwrap();
            assert!(t.elapsed() < Duration::from_millis(50), "0 is no limit");

            mig.begin(super::super::Role::Source).unwrap();
            mig.cancel().unwrap();
            let mut r = RateLimit::new(10);
            let t = Instant::now();
            assert!(matches!(r.spend(&mig, 1 << 20).await, Err(MigrationError::Cancelled)));
            assert!(t.elapsed() < Duration::from_millis(50), "a cancel does not wait out the window");
        });
    }
}
