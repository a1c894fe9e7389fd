//! QEMU's job model: states, verbs, the transition table, and the events.
//!
//! ```text
//!  created ─> running ⇄ paused            (pause / resume)
//!               │  └──> ready ⇄ standby   (pause / resume)
//!               │         │
//!               v         v  (complete, or the job finished on its own)
//!            waiting ─> pending ─> concluded ─> null
//!               │          │  (finalize)   (dismiss)
//!               └──────────┴──> aborting ─> concluded ─> null
//!                     (cancel, error)
//! ```
//!
//! A job's work runs in a task of its own ([`JobDriver::run`]); this module
//! owns the bookkeeping around it so every job type gets the same verbs,
//! the same checks and the same events.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use block::sync::{lock, wait_for};
use serde_json::{json, Value};
use tokio::sync::Notify;

/// QEMU's JobStatus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Undefined => "undefined",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Ready => "ready",
            Status::Standby => "standby",
            Status::Waiting => "waiting",
            Status::Pending => "pending",
            Status::Aborting => "aborting",
            Status::Concluded => "concluded",
            Status::Null => "null",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// QEMU's JobVerb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Complete,
    Finalize,
    Dismiss,
    Change,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Cancel => "cancel",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::SetSpeed => "set-speed",
            Verb::Complete => "complete",
            Verb::Finalize => "finalize",
            Verb::Dismiss => "dismiss",
            Verb::Change => "change",
        }
    }
}

//                U  C  R  P  Y  S  W  D  X  E  N
const STT: [[bool; 11]; 11] = {
    const O: bool = false;
    const I: bool = true;
    [
        /* U */ [O, I, O, O, O, O, O, O, O, O, O],
        /* C */ [O, O, I, O, O, O, O, O, I, O, I],
        /* R */ [O, O, O, I, I, O, I, O, I, O, O],
        /* P */ [O, O, I, O, O, O, O, O, O, O, O],
        /* Y */ [O, O, O, O, O, I, I, O, I, O, O],
        /* S */ [O, O, O, O, I, O, O, O, O, O, O],
        /* W */ [O, O, O, O, O, O, O, I, I, O, O],
        /* D */ [O, O, O, O, O, O, O, O, I, I, O],
        /* X */ [O, O, O, O, O, O, O, O, I, I, O],
        /* E */ [O, O, O, O, O, O, O, O, O, O, I],
        /* N */ [O, O, O, O, O, O, O, O, O, O, O],
    ]
};

/// Which verbs each state accepts (QEMU's JobVerbTable).
fn verb_allowed(verb: Verb, s: Status) -> bool {
    use Status::*;
    let active = matches!(s, Created | Running | Paused | Ready | Standby | Waiting | Pending);
    match verb {
        Verb::Cancel | Verb::Pause | Verb::Resume | Verb::SetSpeed | Verb::Change => active,
        Verb::Complete => s == Ready,
        Verb::Finalize => s == Pending,
        Verb::Dismiss => s == Concluded,
    }
}

/// How the job's own work ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Finished (mirror: completed or soft-cancelled after READY).
    Done,
    /// Cancelled before it could finish.
    Cancelled,
    Failed(String),
}

/// Events leave through this (the daemon turns them into QMP events).
pub type EventSink = Arc<dyn Fn(&str, Value) + Send + Sync>;

/// Errors of the job verbs (QMP GenericError).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("Job '{id}' in state '{state}' cannot accept command verb '{verb}'")]
    BadVerb { id: String, state: &'static str, verb: &'static str },
    #[error("Job is already paused")]
    AlreadyPaused,
    #[error("Can't resume a job that was not paused")]
    NotPaused,
    #[error("Job '{0}' not found")]
    NotFound(String),
    #[error("Job ID '{0}' already in use")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
}

/// The part a job type implements.
pub trait JobDriver: Send + Sync + 'static {
    /// QEMU's job type name ("mirror").
    fn kind(&self) -> &'static str;
    /// Do the work until it is done, cancelled or failed.
    fn run(self: Arc<Self>, job: Arc<Job>) -> Pin<Box<dyn Future<Output = Outcome> + Send>>;
    /// Commit (success) or abort (failure): leave the graph as it must be.
    fn finish(&self, job: &Job, success: bool);
    /// Extra members of query-block-jobs (e.g. actively-synced).
    fn extra_info(&self, _job: &Job) -> Value {
        json!({})
    }
    /// Nothing is left to copy right now (a mirror: bitmap empty, nothing in flight).
    fn in_sync(&self) -> bool {
        false
    }
    /// The work is committed (a mirror pivoted): cancelling in PENDING cannot undo it.
    fn committed(&self) -> bool {
        false
    }
    /// The node the job reads and the node it writes (a mirror: source and
    /// target), for a migration that needs to know which job carries a disk.
    fn nodes(&self) -> Option<(Arc<block::Node>, Arc<block::Node>)> {
        None
    }
    /// `job-change` / `block-job-change` options.
    fn change(&self, _job: &Job, _opts: &serde_json::Map<String, Value>) -> Result<(), JobError> {
        Err(JobError::Invalid("this job has nothing to change".into()))
    }
    /// The job was just cancelled (QEMU's `JobDriver.cancel`); `force` is
    /// the effective one (a cancel before READY always is). Runs in the
    /// command's context, before the job's task is woken: the place to stop
    /// waiting on I/O that may never complete.
    fn cancel(&self, _job: &Job, _force: bool) {}
}

#[derive(Debug)]
struct State {
    status: Status,
    /// Pause requests outstanding (user and internal).
    pause_count: u32,
    user_paused: bool,
    cancelled: bool,
    /// Cancel without completing (QEMU's force; for mirror after READY).
    force_cancel: bool,
    complete_requested: bool,
    error: Option<String>,
    speed: u64,
    auto_finalize: bool,
    auto_dismiss: bool,
    /// The job reached a state where `complete` may pivot.
    ready: bool,
}

/// A job: its state, its progress, and the notifications its task waits on.
pub struct Job {
    pub id: String,
    state: Mutex<State>,
    /// Bytes done so far (current-progress, offset).
    pub progress: AtomicU64,
    /// Bytes expected in total (total-progress, len); may grow.
    pub total: AtomicU64,
    /// Wakes the job task on pause/resume/cancel/complete/speed changes.
    pub kick: Notify,
    /// Signalled when the job reaches `null` or `concluded`.
    finished: Notify,
    /// Signalled when its work moved (a copy settled, its status changed):
    /// what a waiter for "in sync" waits on instead of polling.
    moved: Notify,
    events: EventSink,
    driver: Mutex<Option<Arc<dyn JobDriver>>>,
    kind: &'static str,
    /// Set once, when the job's work ends.
    ended: Mutex<Option<Ended>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("id", &self.id).field("status", &self.status()).finish()
    }
}

impl Job {
    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub fn status(&self) -> Status {
        self.st().status
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    pub fn speed(&self) -> u64 {
        self.st().speed
    }

    pub fn is_cancelled(&self) -> bool {
        self.st().cancelled
    }

    pub fn force_cancelled(&self) -> bool {
        let s = self.st();
        s.cancelled && s.force_cancel
    }

    pub fn complete_requested(&self) -> bool {
        self.st().complete_requested
    }

    pub fn is_paused_requested(&self) -> bool {
        self.st().pause_count > 0
    }

    pub fn error(&self) -> Option<String> {
        self.st().error.clone()
    }

    /// How the job's work ended, once it has.
    pub fn ended(&self) -> Option<Ended> {
        lock(&self.ended).clone()
    }

    /// The nodes the job reads and writes, while it runs.
    pub fn nodes(&self) -> Option<(Arc<block::Node>, Arc<block::Node>)> {
        JobManager::driver_of(self).and_then(|d| d.nodes())
    }

    /// Bytes left to copy by its own count (QEMU's `len - offset`).
    pub fn remaining(&self) -> u64 {
        self.total.load(Ordering::SeqCst).saturating_sub(self.progress.load(Ordering::SeqCst))
    }

    /// READY with nothing left to copy (this job, not whichever holds its id now).
    pub fn in_sync(&self) -> bool {
        self.status() == Status::Ready && JobManager::driver_of(self).is_some_and(|d| d.in_sync())
    }

    /// Resolves at the job's next move (see [`Job::moved`]); one missed
    /// between a check and this wait is caught by the waiter's own bound.
    pub fn moved(&self) -> tokio::sync::futures::Notified<'_> {
        self.moved.notified()
    }

    /// Tell waiters the job's work moved.
    pub fn note_moved(&self) {
        self.moved.notify_waiters();
    }

    fn transition(&self, to: Status) {
        let mut s = self.st();
        let from = s.status;
        if from == to {
            return;
        }
        if !STT[from.index()][to.index()] {
            tracing::error!(job = %self.id, from = from.as_str(), to = to.as_str(), "invalid job transition");
            return;
        }
        s.status = to;
        drop(s);
        // After the new status is visible: a waiter re-checks and sees it.
        self.moved.notify_waiters();
        (self.events)("JOB_STATUS_CHANGE", json!({"id": self.id, "status": to.as_str()}));
    }

    fn check_verb(&self, verb: Verb) -> Result<(), JobError> {
        let s = self.status();
        if verb_allowed(verb, s) {
            Ok(())
        } else {
            Err(JobError::BadVerb { id: self.id.clone(), state: s.as_str(), verb: verb.as_str() })
        }
    }

    /// The job's work says it is in sync: running -> ready, with BLOCK_JOB_READY.
    pub fn set_ready(&self) {
        if self.status() != Status::Running {
            return;
        }
        self.st().ready = true;
        self.transition(Status::Ready);
        (self.events)("BLOCK_JOB_READY", self.block_event_data());
    }

    /// Wait here while paused (the job's pause point). Returns early on cancel.
    pub async fn pause_point(&self) {
        wait_for(&self.kick, || {
            let (paused, status, cancelled) = {
                let s = self.st();
                (s.pause_count > 0, s.status, s.cancelled)
            };
            if paused && !cancelled {
                // Stay: enter the pause (once) and sleep until the next kick.
                match status {
                    Status::Running => self.transition(Status::Paused),
                    Status::Ready => self.transition(Status::Standby),
                    _ => {}
                }
                return false;
            }
            // Resumed, or cancelled: leave the pause (a cancelled job winds
            // down from there; paused -> aborting is not a transition).
            match status {
                Status::Paused => self.transition(Status::Running),
                Status::Standby => self.transition(Status::Ready),
                _ => {}
            }
            true
        })
        .await
    }

    /// Pause for an error with action `stop` (as a user pause that resume lifts).
    pub fn pause_for_error(&self) {
        let mut s = self.st();
        if !s.user_paused {
            s.user_paused = true;
            s.pause_count += 1;
        }
        drop(s);
        self.kick.notify_waiters();
    }

    pub fn emit(&self, event: &str, data: Value) {
        (self.events)(event, data);
    }

    /// BLOCK_JOB_{READY,COMPLETED,CANCELLED}'s data.
    pub fn block_event_data(&self) -> Value {
        json!({
            "type": self.kind, "device": self.id,
            "len": self.total.load(Ordering::SeqCst), "offset": self.progress.load(Ordering::SeqCst),
            "speed": self.speed(),
        })
    }

    pub fn wake(&self) {
        self.kick.notify_waiters();
    }

    /// Wait until the job is concluded or gone.
    pub async fn wait_finished(&self) {
        wait_for(&self.finished, || matches!(self.status(), Status::Concluded | Status::Null)).await
    }
}

/// How and when a job's work ended: what a migration checks when a mirror
/// that carried a disk ended before the switchover (libvirt cancels its
/// mirrors at `pre-switchover`).
#[derive(Debug, Clone)]
pub struct Ended {
    pub outcome: Outcome,
    pub at: std::time::Instant,
    /// The job switched the source's users to its target (a mirror's pivot).
    pub committed: bool,
}

/// Options common to every job.
#[derive(Debug, Clone)]
pub struct JobOptions {
    pub id: String,
    pub speed: u64,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
}

/// Every job of the daemon.
pub struct JobManager {
    jobs: Mutex<Vec<Arc<Job>>>,
    events: EventSink,
}

impl std::fmt::Debug for JobManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobManager").finish_non_exhaustive()
    }
}

impl JobManager {
    pub fn new(events: EventSink) -> Arc<Self> {
        Arc::new(Self { jobs: Mutex::new(Vec::new()), events })
    }

    fn list_lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Job>>> {
        lock(&self.jobs)
    }

    pub fn jobs(&self) -> Vec<Arc<Job>> {
        self.list_lock().clone()
    }

    pub fn find(&self, id: &str) -> Result<Arc<Job>, JobError> {
        self.list_lock().iter().find(|j| j.id == id).cloned().ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    /// Check a new job id before the job is built.
    pub fn check_id(&self, id: &str) -> Result<(), JobError> {
        if id.is_empty()
            || !id.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        {
            return Err(JobError::Invalid(format!("Invalid job ID '{id}'")));
        }
        if self.list_lock().iter().any(|j| j.id == id) {
            return Err(JobError::Exists(id.to_string()));
        }
        Ok(())
    }

    /// Register and start a job.
    pub fn start(self: &Arc<Self>, opts: JobOptions, driver: Arc<dyn JobDriver>) -> Result<Arc<Job>, JobError> {
        self.check_id(&opts.id)?;
        let job = Arc::new(Job {
            id: opts.id.clone(),
            state: Mutex::new(State {
                status: Status::Undefined,
                pause_count: 0,
                user_paused: false,
                cancelled: false,
                force_cancel: false,
                complete_requested: false,
                error: None,
                speed: opts.speed,
                auto_finalize: opts.auto_finalize,
                auto_dismiss: opts.auto_dismiss,
                ready: false,
            }),
            progress: AtomicU64::new(0),
            total: AtomicU64::new(0),
            kick: Notify::new(),
            moved: Notify::new(),
            finished: Notify::new(),
            events: self.events.clone(),
            driver: Mutex::new(Some(driver.clone())),
            kind: driver.kind(),
            ended: Mutex::new(None),
        });
        self.list_lock().push(job.clone());
        job.transition(Status::Created);
        job.transition(Status::Running);
        let mgr = self.clone();
        let j = job.clone();
        tokio::spawn(async move {
            let outcome = driver.run(j.clone()).await;
            mgr.conclude(&j, outcome);
        });
        Ok(job)
    }

    fn driver_of(job: &Job) -> Option<Arc<dyn JobDriver>> {
        lock(&job.driver).clone()
    }

    /// Take the driver out of the job: once the caller drops it, the job's
    /// users leave their nodes (before the end event, as in QEMU).
    fn take_driver(job: &Job) -> Option<Arc<dyn JobDriver>> {
        lock(&job.driver).take()
    }

    /// The work ended: go through waiting/pending (or aborting) to concluded.
    fn conclude(&self, job: &Arc<Job>, outcome: Outcome) {
        let committed = Self::driver_of(job).is_some_and(|d| d.committed());
        *lock(&job.ended) = Some(Ended { outcome: outcome.clone(), at: std::time::Instant::now(), committed });
        match outcome {
            Outcome::Done => {
                job.transition(Status::Waiting);
                job.transition(Status::Pending);
                if job.st().auto_finalize {
                    self.finalize_one(job);
                } else {
                    // Only a job that waits for job-finalize announces it (as QEMU).
                    job.emit("BLOCK_JOB_PENDING", json!({"type": job.kind, "id": job.id}));
                }
            }
            Outcome::Cancelled | Outcome::Failed(_) => {
                if let Outcome::Failed(e) = &outcome {
                    job.st().error = Some(e.clone());
                }
                job.transition(Status::Aborting);
                if let Some(d) = Self::take_driver(job) {
                    d.finish(job, false);
                }
                let mut data = job.block_event_data();
                match &outcome {
                    Outcome::Failed(e) => {
                        data["error"] = json!(e);
                        job.emit("BLOCK_JOB_COMPLETED", data);
                    }
                    _ => job.emit("BLOCK_JOB_CANCELLED", data),
                }
                self.to_concluded(job);
            }
        }
    }

    fn finalize_one(&self, job: &Arc<Job>) {
        if let Some(d) = Self::take_driver(job) {
            d.finish(job, true);
        }
        job.emit("BLOCK_JOB_COMPLETED", job.block_event_data());
        self.to_concluded(job);
    }

    fn to_concluded(&self, job: &Arc<Job>) {
        job.transition(Status::Concluded);
        drop(Self::take_driver(job));
        if job.st().auto_dismiss {
            self.dismiss_one(job);
        }
        job.finished.notify_waiters();
    }

    fn dismiss_one(&self, job: &Arc<Job>) {
        job.transition(Status::Null);
        self.list_lock().retain(|j| !Arc::ptr_eq(j, job));
        job.finished.notify_waiters();
    }

    /// `job-cancel` / `block-job-cancel` (`force`: do not complete a READY mirror).
    pub fn cancel(&self, id: &str, force: bool) -> Result<(), JobError> {
        let job = self.find(id)?;
        job.check_verb(Verb::Cancel)?;
        let status = job.status();
        if status == Status::Pending && Self::driver_of(&job).is_some_and(|d| d.committed()) {
            return Err(JobError::Invalid(format!(
                "Job '{id}' has already switched to its target and cannot be cancelled; finalize it"
            )));
        }
        let force = {
            let mut s = job.st();
            s.cancelled = true;
            // A second, soft cancel does not take back a forced one.
            s.force_cancel = s.force_cancel || force || !s.ready;
            // A cancel lifts pauses so the job can wind down.
            s.pause_count = 0;
            s.user_paused = false;
            s.force_cancel
        };
        if status == Status::Pending {
            // Finalisation was waiting for the user: abort instead.
            job.transition(Status::Aborting);
            if let Some(d) = Self::take_driver(&job) {
                d.finish(&job, false);
            }
            job.emit("BLOCK_JOB_CANCELLED", job.block_event_data());
            self.to_concluded(&job);
            return Ok(());
        }
        if let Some(d) = Self::driver_of(&job) {
            d.cancel(&job, force);
        }
        job.wake();
        Ok(())
    }

    pub fn pause(&self, id: &str) -> Result<(), JobError> {
        let job = self.find(id)?;
        job.check_verb(Verb::Pause)?;
        {
            let mut s = job.st();
            if s.user_paused {
                return Err(JobError::AlreadyPaused);
            }
            s.user_paused = true;
            s.pause_count += 1;
        }
        job.wake();
        Ok(())
    }

    pub fn resume(&self, id: &str) -> Result<(), JobError> {
        let job = self.find(id)?;
        job.check_verb(Verb::Resume)?;
        {
            let mut s = job.st();
            if !s.user_paused || s.pause_count == 0 {
                return Err(JobError::NotPaused);
            }
            s.user_paused = false;
            s.pause_count -= 1;
        }
        job.wake();
        Ok(())
    }

    pub fn complete(&self, id: &str) -> Result<(), JobError> {
        let job = self.find(id)?;
        job.check_verb(Verb::Complete)?;
        job.st().complete_requested = true;
        job.wake();
        Ok(())
    }

    pub fn finalize(&self, id: &str) -> Result<(), JobError> {
        let job = self.find(id)?;
        job.check_verb(Verb::Finalize)?;
        self.finalize_one(&job);
        Ok(())
    }

    pub fn dismiss(&self, id: &str) -> Result<(), JobError> {
        let job = self.find(id)?;
        job.check_verb(Verb::Dismiss)?;
        self.dismiss_one(&job);
        Ok(())
    }

    pub fn set_speed(&self, id: &str, speed: i64) -> Result<(), JobError> {
        let job = self.find(id)?;
        job.check_verb(Verb::SetSpeed)?;
        if speed < 0 {
            return Err(JobError::Invalid("Parameter 'speed' expects a non-negative value".into()));
        }
        job.st().speed = speed as u64;
        job.wake();
        Ok(())
    }

    pub fn change(&self, id: &str, opts: &serde_json::Map<String, Value>) -> Result<(), JobError> {
        let job = self.find(id)?;
        job.check_verb(Verb::Change)?;
        let d = Self::driver_of(&job).ok_or_else(|| JobError::Invalid("job has finished".into()))?;
        d.change(&job, opts)
    }

    /// `query-jobs`.
    pub fn query_jobs(&self) -> Value {
        Value::Array(
            self.jobs()
                .iter()
                .map(|j| {
                    let mut v = json!({
                        "id": j.id, "type": j.kind, "status": j.status().as_str(),
                        "current-progress": j.progress.load(Ordering::SeqCst),
                        "total-progress": j.total.load(Ordering::SeqCst),
                    });
                    if let Some(e) = j.error() {
                        v["error"] = json!(e);
                    }
                    v
                })
                .collect(),
        )
    }

    /// `query-block-jobs`.
    pub fn query_block_jobs(&self) -> Value {
        Value::Array(
            self.jobs()
                .iter()
                .filter(|j| !matches!(j.status(), Status::Null))
                .map(|j| {
                    let s = j.st();
                    let mut v = json!({
                        "type": j.kind, "device": j.id,
                        "len": j.total.load(Ordering::SeqCst), "offset": j.progress.load(Ordering::SeqCst),
                        "busy": matches!(s.status, Status::Running | Status::Ready | Status::Waiting | Status::Aborting),
                        "paused": s.pause_count > 0, "speed": s.speed, "io-status": "ok",
                        "ready": s.ready && !matches!(s.status, Status::Aborting | Status::Concluded),
                        "status": s.status.as_str(),
                        "auto-finalize": s.auto_finalize, "auto-dismiss": s.auto_dismiss,
                    });
                    if let Some(e) = &s.error {
                        v["error"] = json!(e);
                    }
                    drop(s);
                    if let (Some(d), Some(o)) = (Self::driver_of(j), v.as_object_mut()) {
                        if let Value::Object(extra) = d.extra_info(j) {
                            o.extend(extra);
                        }
                    }
                    v
                })
                .collect(),
        )
    }

    /// Whether job `id` is READY and has nothing left to copy.
    pub fn in_sync(&self, id: &str) -> bool {
        self.find(id).ok().is_some_and(|j| j.in_sync())
    }

    /// Cancel every job and wait for them (daemon shutdown).
    pub async fn cancel_all(&self) {
        for j in self.jobs() {
            let _ = self.cancel(&j.id, true);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), j.wait_finished()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_follow_qemus_table() {
        assert!(verb_allowed(Verb::Complete, Status::Ready));
        assert!(!verb_allowed(Verb::Complete, Status::Running));
        assert!(verb_allowed(Verb::Dismiss, Status::Concluded));
        assert!(!verb_allowed(Verb::Cancel, Status::Concluded));
        assert!(verb_allowed(Verb::Finalize, Status::Pending));
    }

    #[test]
    fn transitions_follow_qemus_table() {
        assert!(STT[Status::Running.index()][Status::Ready.index()]);
        assert!(!STT[Status::Ready.index()][Status::Running.index()]);
        assert!(STT[Status::Standby.index()][Status::Ready.index()]);
        assert!(STT[Status::Concluded.index()][Status::Null.index()]);
    }
}
