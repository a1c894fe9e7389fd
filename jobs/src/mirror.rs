//! The mirror job (QEMU's `blockdev-mirror`): copy a node to a target while
//! the node stays in use, then either pivot every user onto the target
//! (`job-complete`) or leave the target as a point-in-time copy
//! (`block-job-cancel` after READY).
//!
//! The bulk copy follows the job's own dirty bitmap on the source, with many
//! chunks in flight; zero and hole extents become write-zeroes on the target
//! (one small request instead of the data). In background mode, writes to the
//! source mark the bitmap and are copied again. In write-blocking mode a write
//! to the source completes only once it reached the target as well (a write
//! hook on the source). READY means: the bitmap is empty and nothing is in
//! flight. `x-baton-auto-converge` switches to write-blocking when the dirty
//! rate outruns the copy rate for longer than a threshold.
//!
//! A chunk is never copied twice at once: a copy, and a write-blocking
//! write, first claim the chunks they touch in `inflight` and wait for
//! whoever holds them. Bits are cleared before the source is read, so a guest
//! write racing a copy re-dirties the chunk and it is copied again.
//!
//! A forced cancel (`block-job-cancel force=true`, `job-cancel`, or any
//! cancel before READY) gives the target I/O in flight [`FORCE_CANCEL_GRACE`]
//! to finish, then stops waiting for it: copies, the READY flush, the
//! completion's last copies and flush, and guest writes held by the
//! write-blocking hook all give up, so a target that stopped answering (a
//! black-holed NBD server) cannot keep the job, or the guest, waiting. The
//! requests given up are dropped, which every driver handles (the NBD client
//! keeps a sent request's slot until its reply or its connection's death). The
//! graph then ends as after any cancel. QEMU's mirror only cancels the NBD
//! client's reconnect wait here and needs a `yank` of the target for a hung
//! server; baton does not yank on its own: the connection stays, and dies by
//! its `x-baton-request-timeout`, by `yank`, or with `blockdev-del`.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block::bitmap::DirtyBitmap;
use block::node::{WriteHook, Written};
use block::sync::{lock, wait_for};
use block::{BlockBackend, BlockError, Graph, IoBuf, Node, Perm, PermSet, WriteFlags, ZeroFlags};
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::job::{Job, JobDriver, JobError, JobManager, JobOptions, Outcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    Full,
    Top,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    Background,
    WriteBlocking,
}

impl CopyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMode::Background => "background",
            CopyMode::WriteBlocking => "write-blocking",
        }
    }
}

/// QEMU's BlockdevOnError (the subset mirror accepts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    Report,
    Ignore,
    Stop,
}

impl OnError {
    fn as_str(self) -> &'static str {
        match self {
            OnError::Report => "report",
            OnError::Ignore => "ignore",
            OnError::Stop => "stop",
        }
    }
}

#[derive(Debug, Clone)]
pub struct MirrorOptions {
    pub source: String,
    pub target: String,
    pub sync: SyncMode,
    /// Copy unit and bitmap granularity (power of two, 512 B .. 64 MiB).
    pub granularity: u64,
    /// Bytes in flight at most.
    pub buf_size: u64,
    pub copy_mode: CopyMode,
    pub on_source_error: OnError,
    pub on_target_error: OnError,
    pub auto_converge: bool,
    /// How long the dirty rate must outrun the copy rate before auto-converge acts.
    pub converge_after: Duration,
}

impl MirrorOptions {
    pub fn new(source: &str, target: &str) -> Self {
        Self {
            source: source.into(),
            target: target.into(),
            sync: SyncMode::Full,
            granularity: 64 << 10,
            buf_size: 16 << 20,
            copy_mode: CopyMode::Background,
            on_source_error: OnError::Report,
            on_target_error: OnError::Report,
            auto_converge: false,
            converge_after: Duration::from_secs(2),
        }
    }
}

/// Copies in flight at most (QEMU's mirror uses 16 too).
const MAX_IN_FLIGHT: usize = 16;

/// After a forced cancel, how long target I/O in flight may still finish
/// before the job stops waiting for it. A healthy target answers well within
/// it, so its connection is not cut mid-request; a stalled one costs this
/// much before the job ends.
pub const FORCE_CANCEL_GRACE: Duration = Duration::from_secs(1);

/// Chunks being copied (by the job or a write-blocking write).
#[derive(Debug, Default)]
struct Inflight {
    chunks: Mutex<HashSet<u64>>,
    released: Notify,
}

impl Inflight {
    fn try_claim(&self, first: u64, last: u64) -> bool {
        let mut c = lock(&self.chunks);
        if (first..=last).any(|i| c.contains(&i)) {
            return false;
        }
        c.extend(first..=last);
        true
    }

    async fn claim(&self, first: u64, last: u64) {
        wait_for(&self.released, || self.try_claim(first, last)).await
    }

    fn release(&self, first: u64, last: u64) {
        let mut c = lock(&self.chunks);
        for i in first..=last {
            c.remove(&i);
        }
        drop(c);
        self.released.notify_waiters();
    }

    fn is_empty(&self) -> bool {
        lock(&self.chunks).is_empty()
    }

    /// Wait until no chunk is claimed.
    async fn drained(&self) {
        wait_for(&self.released, || self.is_empty()).await
    }
}

/// State shared by the job's task and the write hook.
struct Shared {
    id: String,
    source: Arc<Node>,
    target: Arc<Node>,
    src: BlockBackend,
    tgt: BlockBackend,
    bitmap: Arc<DirtyBitmap>,
    granularity: u64,
    inflight: Inflight,
    write_blocking: AtomicBool,
    opts: MirrorOptions,
    /// An error the write hook met, for the job task to act on.
    hook_error: Mutex<Option<String>>,
    /// Bytes written to the target (data, not zeroes), for tests and stats.
    bytes_written: Arc<AtomicU64>,
    /// Copy buffers, reused: a fresh 1 MiB buffer per copy costs page faults and zeroing.
    pool: block::BufPool,
    /// Every user of the source was moved to the target.
    pivoted: AtomicBool,
    /// When the job stops waiting for its I/O: set once, by a forced cancel.
    abandon_at: tokio::sync::watch::Sender<Option<tokio::time::Instant>>,
}

impl Shared {
    /// A forced cancel: I/O in flight gets `grace` to finish, then nobody waits for it.
    fn abandon_after(&self, grace: Duration) {
        let at = tokio::time::Instant::now() + grace;
        self.abandon_at.send_if_modified(|v| {
            let first = v.is_none();
            if first {
                *v = Some(at);
            }
            first
        });
    }

    /// Resolves once the job has stopped waiting for its I/O (never, unless force-cancelled).
    async fn abandoned(&self) {
        let mut rx = self.abandon_at.subscribe();
        let at = match rx.wait_for(Option::is_some).await {
            Ok(v) => *v,
            // Unreachable: `self` owns the sender.
            Err(_) => None,
        };
        match at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// `f`, unless the job stops waiting for its I/O first (`None`; `f` is dropped).
    async fn or_abandoned<T>(&self, f: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            () = self.abandoned() => None,
            r = f => Some(r),
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror").field("id", &self.id).finish_non_exhaustive()
    }
}

/// The mirror's handle, kept by whoever started it (for stats). It holds
/// nothing of the graph: the job's users go away when the job ends.
#[derive(Debug)]
pub struct Mirror {
    bytes_written: Arc<AtomicU64>,
}

impl Mirror {
    /// Data bytes written to the target so far (write-zeroes not counted).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::SeqCst)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("Can't mirror node '{0}' into itself")]
    SameNode(String),
    #[error("Source and target image have different sizes ({source_len} and {target_len} bytes)")]
    SizeMismatch { source_len: u64, target_len: u64 },
    #[error("Node '{0}' is inactive")]
    Inactive(String),
    #[error("Node '{0}' is busy: block device is in use by block job: mirror")]
    Busy(String),
    #[error("granularity must be a power of 2 between 512 and 64 MiB")]
    Granularity,
    #[error("buf-size must be at least the granularity")]
    BufSize,
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Block(#[from] BlockError),
}

/// `blockdev-mirror`: check everything first (nothing changes on an error), then start.
pub fn start(
    graph: &Arc<Graph>,
    mgr: &Arc<JobManager>,
    job: JobOptions,
    opts: MirrorOptions,
) -> Result<(Arc<Job>, Mirror), MirrorError> {
    mgr.check_id(&job.id)?;
    let source = graph.find(&opts.source)?;
    let target = graph.find(&opts.target)?;
    if Arc::ptr_eq(&source, &target) {
        return Err(MirrorError::SameNode(opts.source.clone()));
    }
    if source.length() != target.length() {
        return Err(MirrorError::SizeMismatch { source_len: source.length(), target_len: target.length() });
    }
    for n in [&source, &target] {
        if !n.is_active() {
            return Err(MirrorError::Inactive(n.name().to_string()));
        }
    }
    let g = opts.granularity;
    if !g.is_power_of_two() || !(512..=64 << 20).contains(&g) {
        return Err(MirrorError::Granularity);
    }
    if opts.buf_size < g {
        return Err(MirrorError::BufSize);
    }
    if source.has_internal_bitmaps() {
        return Err(MirrorError::Busy(source.name().to_string()));
    }
    let user = format!("job '{}'", job.id);
    let src = graph.attach(&opts.source, &user, PermSet::new(Perm::CONSISTENT_READ, Perm::ALL), false)?;
    // The target's content is not the source's until the job is done: take
    // write, share only unchanged writes. The target may be inactivated under
    // the job (QEMU's force_allow_inactivate): a migration's switchover does
    // that once the job is in sync and the guest stopped.
    let tgt = graph.attach(&opts.target, &user, PermSet::new(Perm::WRITE, Perm::WRITE_UNCHANGED), true)?;
    let bitmap = Arc::new(
        DirtyBitmap::new(&format!("#mirror-{}", job.id), source.length(), g)
            .map_err(|e| BlockError::Bitmap { node: source.name().to_string(), source: e })?,
    );
    bitmap.set_busy(true);
    if opts.sync != SyncMode::None {
        bitmap.mark_force(0, source.length());
    }
    source.add_internal_bitmap(bitmap.clone());
    let shared = Arc::new(Shared {
        id: job.id.clone(),
        source,
        target,
        src,
        tgt,
        bitmap,
        granularity: g,
        inflight: Inflight::default(),
        write_blocking: AtomicBool::new(false),
        opts: opts.clone(),
        hook_error: Mutex::new(None),
        bytes_written: Arc::new(AtomicU64::new(0)),
        pool: block::BufPool::new((1 << 20).max(g as usize), 64),
        pivoted: AtomicBool::new(false),
        abandon_at: tokio::sync::watch::Sender::new(None),
    });
    let driver = Arc::new(MirrorDriver { shared: shared.clone() });
    if opts.copy_mode == CopyMode::WriteBlocking {
        driver.set_copy_mode(CopyMode::WriteBlocking);
    }
    let job = match mgr.start(job, driver.clone()) {
        Ok(j) => j,
        Err(e) => {
            driver.teardown();
            return Err(e.into());
        }
    };
    Ok((job, Mirror { bytes_written: shared.bytes_written.clone() }))
}

struct MirrorDriver {
    shared: Arc<Shared>,
}

/// The hook on the source in write-blocking mode.
#[derive(Debug)]
struct Hook(Arc<Shared>);

impl WriteHook for Hook {
    fn before_write(&self, offset: u64, len: u64) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            let s = &self.0;
            if !s.write_blocking.load(Ordering::SeqCst) || len == 0 {
                return false;
            }
            // Claim first: an overlapping write or copy waits, so the target
            // sees writes in the order the source did. A force-cancelled job
            // copies nothing more: the write goes to the source only.
            let g = s.granularity;
            s.or_abandoned(s.inflight.claim(offset / g, (offset + len - 1) / g)).await.is_some()
        })
    }

    fn after_write<'a>(
        &'a self,
        offset: u64,
        len: u64,
        what: Option<Written<'a>>,
        claimed: bool,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            if !claimed {
                return;
            }
            let s = &self.0;
            let g = s.granularity;
            let (first, last) = (offset / g, (offset + len - 1) / g);
            let copy = async {
                match what {
                    // The source write failed: nothing to copy; the range stays dirty.
                    None => Ok(()),
                    Some(Written::Data(d)) => {
                        s.tgt.write(offset, IoBuf::from_slice(d), WriteFlags::default()).await.map(|_| {
                            s.bytes_written.fetch_add(len, Ordering::SeqCst);
                        })
                    }
                    Some(Written::Zeroes { may_unmap }) => {
                        s.tgt.write_zeroes(offset, len, ZeroFlags { may_unmap, ..Default::default() }).await
                    }
                    Some(Written::Discard) => {
                        s.tgt.write_zeroes(offset, len, ZeroFlags { may_unmap: true, ..Default::default() }).await
                    }
                }
            };
            // A force-cancelled job stops waiting for a stalled target, so the
            // guest's write completes (the source has it); the range stays dirty.
            let Some(res) = s.or_abandoned(copy).await else {
                s.inflight.release(first, last);
                return;
            };
            match res {
                Ok(()) if what.is_some() => {
                    // The whole granules this write covered are now in sync.
                    let start = offset.div_ceil(g) * g;
                    let end = (offset + len) / g * g;
                    if end > start {
                        s.bitmap.reset(start, end - start);
                    }
                }
                Ok(()) => {}
                Err(e) => {
                    // Leave the range dirty; the job applies its error policy.
                    *lock(&s.hook_error) = Some(e.chain());
                }
            }
            s.inflight.release(first, last);
        })
    }
}

/// What one chunk copy ended with.
enum CopyResult {
    Ok(u64),
    SourceError(String),
    TargetError(String),
    /// Given up after a forced cancel; the chunk is dirty again.
    Abandoned,
}

impl MirrorDriver {
    fn set_copy_mode(&self, mode: CopyMode) {
        let s = &self.shared;
        match mode {
            CopyMode::WriteBlocking => {
                s.write_blocking.store(true, Ordering::SeqCst);
                s.source.set_write_hook(Some(Arc::new(Hook(s.clone()))));
            }
            CopyMode::Background => {
                s.write_blocking.store(false, Ordering::SeqCst);
                s.source.set_write_hook(None);
            }
        }
    }

    fn copy_mode(&self) -> CopyMode {
        if self.shared.write_blocking.load(Ordering::SeqCst) {
            CopyMode::WriteBlocking
        } else {
            CopyMode::Background
        }
    }

    /// Undo everything the job set up on the graph.
    fn teardown(&self) {
        let s = &self.shared;
        s.write_blocking.store(false, Ordering::SeqCst);
        s.source.set_write_hook(None);
        s.source.remove_internal_bitmap(&s.bitmap);
    }

    /// Copy `[off, off+len)` (whole chunks, claimed by the caller).
    async fn copy(s: Arc<Shared>, off: u64, len: u64) -> CopyResult {
        s.bitmap.reset(off, len);
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let ext = match s.src.block_status(pos, end - pos).await {
                Ok(e) => e,
                Err(e) => return CopyResult::SourceError(e.chain()),
            };
            let n = ext.len.clamp(1, end - pos);
            if ext.zero && !ext.data {
                // Zeroes on the target only where it does not already read as zeroes,
                // so a sparse target stays sparse and nothing crosses the wire.
                let mut tpos = pos;
                while tpos < pos + n {
                    let t = match s.tgt.block_status(tpos, pos + n - tpos).await {
                        Ok(t) => t,
                        Err(e) => return CopyResult::TargetError(e.chain()),
                    };
                    let tn = t.len.clamp(1, pos + n - tpos);
                    if !t.zero {
                        if let Err(e) =
                            s.tgt.write_zeroes(tpos, tn, ZeroFlags { may_unmap: true, ..Default::default() }).await
                        {
                            return CopyResult::TargetError(e.chain());
                        }
                    }
                    tpos += tn;
                }
            } else {
                let buf = match s.src.read(pos, s.pool.get(n as usize)).await {
                    Ok(b) => b,
                    Err(e) => return CopyResult::SourceError(e.chain()),
                };
                match s.tgt.write(pos, buf, WriteFlags::default()).await {
                    Ok(b) => s.pool.put(b),
                    Err(e) => return CopyResult::TargetError(e.chain()),
                }
                s.bytes_written.fetch_add(n, Ordering::SeqCst);
            }
            pos += n;
        }
        CopyResult::Ok(len)
    }

    /// The next dirty chunk run not in flight, at most `max` bytes, scanning from `cursor`.
    fn next_chunk(&self, cursor: &mut u64, max: u64) -> Option<(u64, u64)> {
        let s = &self.shared;
        let size = s.source.length();
        let g = s.granularity;
        for _pass in 0..2 {
            let mut from = *cursor;
            while let Some((off, len)) = s.bitmap.next_dirty_area(from, max) {
                let first = off / g;
                let last = (off + len - 1) / g;
                // Shrink to the prefix not already in flight.
                let mut end_chunk = first;
                while end_chunk <= last && s.inflight.try_claim(end_chunk, end_chunk) {
                    end_chunk += 1;
                }
                if end_chunk > first {
                    let start = first * g;
                    let stop = (end_chunk * g).min(size);
                    *cursor = stop;
                    return Some((start, stop - start));
                }
                from = (first + 1) * g;
            }
            *cursor = 0;
        }
        None
    }

    /// Handle a copy's error under the policy; `Some` ends the job.
    fn on_error(&self, job: &Job, op: &str, policy: OnError, msg: String, off: u64, len: u64) -> Option<Outcome> {
        // The chunk is dirty again either way.
        self.shared.bitmap.mark_force(off, len);
        job.emit("BLOCK_JOB_ERROR", json!({"device": job.id, "operation": op, "action": policy.as_str()}));
        match policy {
            OnError::Report => Some(Outcome::Failed(msg)),
            OnError::Ignore => None,
            OnError::Stop => {
                job.pause_for_error();
                None
            }
        }
    }
}

impl JobDriver for MirrorDriver {
    fn kind(&self) -> &'static str {
        "mirror"
    }

    fn run(self: Arc<Self>, job: Arc<Job>) -> Pin<Box<dyn Future<Output = Outcome> + Send>> {
        Box::pin(async move { self.run_inner(&job).await })
    }

    fn finish(&self, _job: &Job, _success: bool) {
        self.teardown();
    }

    fn cancel(&self, _job: &Job, force: bool) {
        if force {
            self.shared.abandon_after(FORCE_CANCEL_GRACE);
        }
    }

    fn committed(&self) -> bool {
        self.shared.pivoted.load(Ordering::SeqCst)
    }

    fn nodes(&self) -> Option<(Arc<Node>, Arc<Node>)> {
        Some((self.shared.source.clone(), self.shared.target.clone()))
    }

    fn in_sync(&self) -> bool {
        let s = &self.shared;
        s.bitmap.dirty_granules() == 0 && s.inflight.is_empty()
    }

    fn extra_info(&self, job: &Job) -> Value {
        let s = &self.shared;
        let synced = self.copy_mode() == CopyMode::WriteBlocking
            && matches!(job.status(), crate::job::Status::Ready | crate::job::Status::Standby)
            && s.bitmap.dirty_granules() == 0
            && s.inflight.is_empty();
        json!({"actively-synced": synced})
    }

    fn change(&self, job: &Job, opts: &serde_json::Map<String, Value>) -> Result<(), JobError> {
        match opts.get("copy-mode").and_then(Value::as_str) {
            Some("write-blocking") => {
                self.set_copy_mode(CopyMode::WriteBlocking);
                Ok(())
            }
            Some("background") if self.copy_mode() == CopyMode::Background => Ok(()),
            Some("background") => Err(JobError::Invalid(format!(
                "Cannot change copy mode of job '{}' from write-blocking to background",
                job.id
            ))),
            Some(other) => Err(JobError::Invalid(format!("Parameter 'copy-mode' does not accept value '{other}'"))),
            None => Ok(()),
        }
    }
}

impl MirrorDriver {
    async fn run_inner(&self, job: &Arc<Job>) -> Outcome {
        let s = self.shared.clone();
        let size = s.source.length();
        let g = s.granularity;
        // Copy in runs of up to 1 MiB (or one granule when it is larger), at
        // most buf-size bytes and MAX_IN_FLIGHT runs in flight: more only
        // queues in socket buffers and costs memory (measured: 4 runs of 1 MiB
        // into qemu-nbd beat 256 by 40%).
        let max_run = (1u64 << 20).max(g);
        let max_inflight = MAX_IN_FLIGHT.min((s.opts.buf_size / max_run).max(1) as usize);
        let mut tasks: tokio::task::JoinSet<(u64, u64, CopyResult)> = tokio::task::JoinSet::new();
        let mut cursor = 0u64;
        job.total.store(s.bitmap.count_bytes(), Ordering::SeqCst);
        // Rate limit: bytes allowed since `window_start`.
        let mut window_start = Instant::now();
        let mut window_bytes = 0u64;
        // Auto-converge bookkeeping.
        let mut sample_at = Instant::now();
        let mut sample_dirty = s.bitmap.count_bytes();
        let mut sample_copied = 0u64;
        let mut outrun_since: Option<Instant> = None;
        loop {
            // Registered before any check, so a verb arriving meanwhile is not missed.
            let kicked = job.kick.notified();
            tokio::pin!(kicked);
            kicked.as_mut().enable();
            // Pause: let the copies in flight finish first, as QEMU does.
            if job.is_paused_requested() {
                while let Some(r) = tasks.join_next().await {
                    if let Some(o) = self.settle(job, r) {
                        return o;
                    }
                }
                job.pause_point().await;
            }
            let hook_error = lock(&s.hook_error).take();
            if let Some(msg) = hook_error {
                if let Some(o) = self.on_error(job, "write", s.opts.on_target_error, msg, 0, 0) {
                    return self.wind_down(tasks, o).await;
                }
            }
            if job.is_cancelled() && (job.force_cancelled() || job.status() != crate::job::Status::Ready) {
                return self.wind_down(tasks, Outcome::Cancelled).await;
            }
            let finishing = job.complete_requested() || job.is_cancelled();
            if finishing {
                return self.finish_sync(job, tasks, job.complete_requested() && !job.is_cancelled()).await;
            }

            // Start copies up to the in-flight limit and the speed limit.
            let speed = job.speed();
            while tasks.len() < max_inflight {
                if speed > 0 {
                    // Token bucket: each window refills what `speed` allows for
                    // the time it lasted; an overshoot carries into the next one.
                    let elapsed = window_start.elapsed();
                    if elapsed > Duration::from_millis(100) {
                        let allowed = (u128::from(speed) * elapsed.as_micros() / 1_000_000) as u64;
                        window_bytes = window_bytes.saturating_sub(allowed);
                        window_start = Instant::now();
                    }
                    if window_bytes >= speed / 10 {
                        break;
                    }
                }
                let Some((off, len)) = self.next_chunk(&mut cursor, max_run) else { break };
                window_bytes += len;
                let sh = s.clone();
                tasks.spawn(async move {
                    let r = sh.or_abandoned(MirrorDriver::copy(sh.clone(), off, len)).await;
                    (off, len, r.unwrap_or(CopyResult::Abandoned))
                });
            }

            let dirty = s.bitmap.count_bytes();
            job.total.store(job.progress.load(Ordering::SeqCst) + dirty, Ordering::SeqCst);
            if tasks.is_empty() && dirty == 0 && s.inflight.is_empty() && job.status() == crate::job::Status::Running {
                // In sync: make it durable on the target before saying so, as QEMU does.
                match s.or_abandoned(s.tgt.flush()).await {
                    None => return self.wind_down(tasks, Outcome::Cancelled).await,
                    Some(Err(e)) => {
                        if let Some(o) = self.on_error(job, "write", s.opts.on_target_error, e.chain(), 0, 0) {
                            return self.wind_down(tasks, o).await;
                        }
                        continue;
                    }
                    Some(Ok(())) => {}
                }
                // The job was in sync when the flush began; writes made during
                // the flush are copied from READY on, as in QEMU.
                job.set_ready();
            }

            // Auto-converge: once a second, compare how the dirty backlog moves.
            if s.opts.auto_converge
                && self.copy_mode() == CopyMode::Background
                && sample_at.elapsed() >= Duration::from_secs(1)
            {
                let copied = job.progress.load(Ordering::SeqCst) - sample_copied;
                let outrun = dirty > 0 && dirty >= sample_dirty;
                outrun_since = if outrun { outrun_since.or(Some(sample_at)) } else { None };
                if let Some(t) = outrun_since {
                    if t.elapsed() >= s.opts.converge_after {
                        self.set_copy_mode(CopyMode::WriteBlocking);
                        job.emit(
                            "X_BATON_BLOCK_JOB_COPY_MODE_CHANGED",
                            json!({"device": job.id, "copy-mode": "write-blocking", "reason": "auto-converge",
                                   "dirty-bytes": dirty, "copied-bytes-per-second": copied}),
                        );
                    }
                }
                sample_at = Instant::now();
                sample_dirty = dirty;
                sample_copied = job.progress.load(Ordering::SeqCst);
            }

            // Wait for a copy to finish, a kick, or a short tick (new dirty data, rate window).
            let tick = tokio::time::sleep(Duration::from_millis(if tasks.is_empty() { 20 } else { 100 }));
            tokio::select! {
                r = tasks.join_next(), if !tasks.is_empty() => {
                    if let Some(r) = r {
                        if let Some(o) = self.settle(job, r) {
                            return self.wind_down(tasks, o).await;
                        }
                    }
                }
                _ = kicked => {}
                _ = tick => {}
            }
            let _ = size;
        }
    }

    /// Account a finished copy; `Some` ends the job.
    fn settle(&self, job: &Job, r: Result<(u64, u64, CopyResult), tokio::task::JoinError>) -> Option<Outcome> {
        let o = self.settle_one(job, r);
        // After the accounting: a waiter for "in sync" sees this copy's effect.
        job.note_moved();
        o
    }

    fn settle_one(&self, job: &Job, r: Result<(u64, u64, CopyResult), tokio::task::JoinError>) -> Option<Outcome> {
        let g = self.shared.granularity;
        match r {
            Ok((off, len, res)) => {
                self.shared.inflight.release(off / g, (off + len - 1) / g);
                match res {
                    CopyResult::Ok(n) => {
                        job.progress.fetch_add(n, Ordering::SeqCst);
                        None
                    }
                    CopyResult::SourceError(m) => {
                        self.on_error(job, "read", self.shared.opts.on_source_error, m, off, len)
                    }
                    CopyResult::TargetError(m) => {
                        self.on_error(job, "write", self.shared.opts.on_target_error, m, off, len)
                    }
                    // The job is force-cancelled; its loop ends it next.
                    CopyResult::Abandoned => {
                        self.shared.bitmap.mark_force(off, len);
                        None
                    }
                }
            }
            Err(e) => Some(Outcome::Failed(format!("copy task failed: {e}"))),
        }
    }

    /// Let the copies in flight finish, then end with `o`. A copy that
    /// failed re-dirties its range (its bits were cleared when it started);
    /// with `o == Done` any failure turns the outcome into a failure, so a
    /// pivot never lands on an incomplete target, and a copy given up after a
    /// forced cancel into a cancellation. After a forced cancel the copies
    /// give up by themselves once the grace is over.
    async fn wind_down(&self, mut tasks: tokio::task::JoinSet<(u64, u64, CopyResult)>, o: Outcome) -> Outcome {
        let g = self.shared.granularity;
        let mut o = o;
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok((off, len, res)) => {
                    self.shared.inflight.release(off / g, (off + len - 1) / g);
                    match res {
                        CopyResult::Ok(_) => {}
                        CopyResult::SourceError(m) | CopyResult::TargetError(m) => {
                            self.shared.bitmap.mark_force(off, len);
                            if o == Outcome::Done {
                                o = Outcome::Failed(m);
                            }
                        }
                        CopyResult::Abandoned => {
                            self.shared.bitmap.mark_force(off, len);
                            if o == Outcome::Done {
                                o = Outcome::Cancelled;
                            }
                        }
                    }
                }
                Err(e) => {
                    if o == Outcome::Done {
                        o = Outcome::Failed(format!("copy task failed: {e}"));
                    }
                }
            }
        }
        if o != Outcome::Done {
            // The job ends: no new guest write enters the write-blocking
            // path, and those already in it finish (or, after a forced
            // cancel, give up) before the job lets go of its target.
            self.shared.write_blocking.store(false, Ordering::SeqCst);
            self.shared.inflight.drained().await;
        }
        o
    }

    /// Complete (pivot) or soft-cancel after READY: hold the source's users,
    /// copy what is left, flush the target, then pivot if asked.
    async fn finish_sync(
        &self,
        job: &Arc<Job>,
        tasks: tokio::task::JoinSet<(u64, u64, CopyResult)>,
        pivot: bool,
    ) -> Outcome {
        let s = self.shared.clone();
        let except = [s.src.id(), s.tgt.id()];
        let held = s.src.graph().quiesce_users(&s.source, &except).await;
        let o = self.wind_down(tasks, Outcome::Done).await;
        if o != Outcome::Done {
            return o;
        }
        // Nothing writes to the source now: copy the rest until the bitmap is empty.
        let g = s.granularity;
        let mut cursor = 0;
        while let Some((off, len)) = self.next_chunk(&mut cursor, 1 << 20) {
            let r = s.or_abandoned(MirrorDriver::copy(s.clone(), off, len)).await.unwrap_or(CopyResult::Abandoned);
            s.inflight.release(off / g, (off + len - 1) / g);
            match r {
                CopyResult::Ok(n) => {
                    job.progress.fetch_add(n, Ordering::SeqCst);
                }
                CopyResult::SourceError(m) | CopyResult::TargetError(m) => return Outcome::Failed(m),
                CopyResult::Abandoned => {
                    s.bitmap.mark_force(off, len);
                    return Outcome::Cancelled;
                }
            }
        }
        match s.or_abandoned(s.tgt.flush()).await {
            None => return Outcome::Cancelled,
            Some(Err(e)) => return Outcome::Failed(e.chain()),
            Some(Ok(())) => {}
        }
        // A forced cancel that came meanwhile wins: a cancelled job never pivots (as QEMU).
        if job.force_cancelled() {
            return Outcome::Cancelled;
        }
        job.total.store(job.progress.load(Ordering::SeqCst), Ordering::SeqCst);
        if pivot {
            // Our own claim on the target would conflict with the users moving there.
            let old = s.tgt.perms();
            let _ = s.tgt.set_perms(PermSet::new(Perm::NONE, Perm::ALL), false);
            if let Err(e) = s.src.graph().move_users(&s.source, &s.target, &except) {
                let _ = s.tgt.set_perms(old, false);
                return Outcome::Failed(format!("pivot failed: {}", e.chain()));
            }
            s.pivoted.store(true, Ordering::SeqCst);
        }
        drop(held);
        Outcome::Done
    }
}
