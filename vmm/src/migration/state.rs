//! The one owner of a side's migration state. Every status change goes
//! through [`Migration::transition`], which checks it against QEMU's
//! MigrationStatus graph and emits exactly one MIGRATION event (when the
//! `events` capability is on, as in QEMU); `query-migrate` and the QMP verbs
//! (cancel, continue, the operator's decision) only call in here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use block::sync::{lock, wait_until};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;

use super::params::Parameters;

/// QEMU's MigrationStatus names (libvirt parses them: unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    None,
    Setup,
    Active,
    /// Stopped before the switchover, waiting for migrate-continue (capability pause-before-switchover).
    PreSwitchover,
    Device,
    Cancelling,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::None => "none",
            Status::Setup => "setup",
            Status::Active => "active",
            Status::PreSwitchover => "pre-switchover",
            Status::Device => "device",
            Status::Cancelling => "cancelling",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    /// No attempt is under way.
    pub fn is_final(self) -> bool {
        matches!(self, Status::None | Status::Completed | Status::Failed | Status::Cancelled)
    }
}

/// The legal status changes (QEMU's, plus `active -> completed` for the
/// destination, whose switchover is not a separate phase).
fn allowed(from: Status, to: Status) -> bool {
    use Status::*;
    matches!(
        (from, to),
        (None | Completed | Failed | Cancelled, Setup)
            | (Setup, Active | Failed | Cancelling)
            | (Active, PreSwitchover | Device | Completed | Failed | Cancelling)
            | (PreSwitchover, Device | Failed | Cancelling)
            | (Device, Completed | Failed | Cancelling)
            | (Cancelling, Cancelled | Failed)
    )
}

/// Which side this daemon plays in the current (or last) attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Destination,
}

/// Where the two-phase handover is (`x-baton-handover`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// RAM, vCPUs and device state are moving.
    Transfer,
    /// Source: END sent, waiting for PREPARED.
    AwaitingPrepared,
    /// Destination: PREPARED sent (guest loaded, nodes active, not running),
    /// waiting for COMMIT or ABORT.
    Prepared,
    /// Destination: PREPARED, and the source's decision did not arrive within
    /// the bound or the link is gone. Paused until the decision arrives late
    /// or the operator gives it (`x-baton-migrate-decide`).
    DecisionUnknown,
    /// Source: past the commit point. Destination: COMMIT (or the operator's
    /// commit) received.
    Committed,
    /// The attempt was rolled back on this side.
    RolledBack,
}

impl Handover {
    pub fn as_str(self) -> &'static str {
        match self {
            Handover::Transfer => "transfer",
            Handover::AwaitingPrepared => "awaiting-prepared",
            Handover::Prepared => "prepared",
            Handover::DecisionUnknown => "decision-unknown",
            Handover::Committed => "committed",
            Handover::RolledBack => "rolled-back",
        }
    }
}

/// The operator's (or the source's) decision for a prepared destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Commit,
    Abort,
}

/// Errors of the QMP verbs on the migration (GenericError, no state change).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerbError {
    #[error("There's a migration process in progress")]
    InProgress,
    #[error("migrate_cancel is too late: the source passed its commit point and the guest belongs to the destination")]
    TooLate,
    #[error("the destination is prepared and waits for the source's decision: resolve it with x-baton-migrate-decide")]
    PreparedWaiting,
    #[error("Migration not in expected state: {0}")]
    NotInState(&'static str),
    #[error("no prepared incoming migration is waiting for a decision it cannot get from the source (handover: {0})")]
    NotPrepared(&'static str),
    #[error("migration capability '{0}' is not supported")]
    Capability(String),
    /// Not one of QEMU's MigrationCapability values (QEMU's enum error).
    #[error("Parameter 'capability' does not accept value '{0}'")]
    NotACapability(String),
    #[error("{0}")]
    Parameter(String),
}

/// Migration capabilities baton understands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub events: bool,
    pub pause_before_switchover: bool,
    /// The source's named dirty bitmaps travel with the guest.
    pub dirty_bitmaps: bool,
    /// Destination: QEMU's "activate the disks at `cont`, not at the end of
    /// the stream". baton's destination activates its nodes after the end
    /// marker and before PREPARED in every case (PREPARED promises the
    /// destination can run the guest; the source commits on it), and never
    /// writes them before COMMIT; what the capability adds is that a
    /// destination started with `-S` takes the guest's write permission only
    /// at `cont`, as QEMU's late activation does. Accepted on either side.
    pub late_block_activate: bool,
}

/// A capability's name and its place in [`Capabilities`] (`None`: always on).
type CapField = Option<fn(&mut Capabilities) -> &mut bool>;

/// Names accepted by migrate-set-capabilities, in query order; `return-path`
/// is always on (the two-phase commit needs it), so setting it is accepted
/// and changes nothing.
const CAPABILITY_TABLE: [(&str, CapField); 5] = [
    ("events", Some(|c| &mut c.events)),
    ("return-path", None),
    ("pause-before-switchover", Some(|c| &mut c.pause_before_switchover)),
    ("dirty-bitmaps", Some(|c| &mut c.dirty_bitmaps)),
    ("late-block-activate", Some(|c| &mut c.late_block_activate)),
];

/// QEMU 10's MigrationCapability values: baton refuses those it lacks by
/// name, and anything else as QEMU refuses a value outside its enum.
const QEMU_CAPABILITIES: [&str; 22] = [
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
    "mapped-ram",
];

/// The capability names baton accepts (the QMP schema's enum).
pub const CAPABILITIES: [&str; 5] =
    ["events", "return-path", "pause-before-switchover", "dirty-bitmaps", "late-block-activate"];

/// Counters for query-migrate (QEMU's MigrationStats, source side).
#[derive(Debug, Default)]
pub struct Counters {
    /// Pages sent with their bytes (QEMU's `normal`).
    pub pages_sent: AtomicU64,
    /// All-zero pages sent as markers (QEMU's `duplicate`).
    pub zero_pages: AtomicU64,
    pub pages_received: AtomicU64,
    /// Dirty-log syncs (QEMU's `dirty-sync-count`; each emits MIGRATION_PASS).
    pub passes: AtomicU64,
    /// Dirty pages found by the last sync and not sent yet.
    pub dirty_pages: AtomicU64,
    /// Bytes written to the stream (QEMU's `transferred`).
    pub transferred: AtomicU64,
    /// Of those, bytes written while the guest was stopped (`downtime-bytes`).
    pub downtime_bytes: AtomicU64,
    /// Pages the guest dirtied per second, at the last sync.
    pub dirty_pages_rate: AtomicU64,
    /// The stream's rate over the last pass: bits of an f64, megabits/s.
    pub mbps_bits: AtomicU64,
    /// Pages sent per second over the last pass.
    pub pages_per_second: AtomicU64,
    /// The switchover's estimated downtime, ms (QEMU's `expected-downtime`).
    pub expected_downtime: AtomicU64,
}

impl Counters {
    fn reset(&self) {
        for c in [
            &self.pages_sent,
            &self.zero_pages,
            &self.pages_received,
            &self.passes,
            &self.dirty_pages,
            &self.transferred,
            &self.downtime_bytes,
            &self.dirty_pages_rate,
            &self.mbps_bits,
            &self.pages_per_second,
            &self.expected_downtime,
        ] {
            c.store(0, Ordering::SeqCst);
        }
    }

    pub fn set_mbps(&self, mbps: f64) {
        self.mbps_bits.store(mbps.to_bits(), Ordering::SeqCst);
    }

    pub fn mbps(&self) -> f64 {
        f64::from_bits(self.mbps_bits.load(Ordering::SeqCst))
    }
}

/// The switchover's steps, in order, as `x-baton-switchover` names them.
pub const SWITCHOVER_STEPS: [&str; 10] = [
    "stop",
    "drain",
    "mirror-sync",
    "inactivate",
    "device-state",
    "send-state",
    "prepared",
    "commit",
    "commit-sent",
    "commit-acknowledged",
];

/// Called with (event name, data) for MIGRATION events.
pub type EventSink = Arc<dyn Fn(&str, Value) + Send + Sync>;

#[derive(Debug)]
struct Attempt {
    status: Status,
    role: Option<Role>,
    handover: Handover,
    error: Option<String>,
    started: Option<Instant>,
    ended: Option<Instant>,
    /// When the attempt reached `active` (QEMU's setup-time ends).
    setup: Option<Duration>,
    /// When the source stopped the guest for the switchover.
    stopped: Option<Instant>,
    downtime: Option<Duration>,
    /// The switchover's steps done so far and how long each took.
    steps: Vec<(&'static str, Duration)>,
    /// Source: passed the commit point. From here on it never resumes.
    committed: bool,
    cancel_requested: bool,
    /// QMP `yank` of the migration instance: the connection is dropped; the
    /// attempt fails (not cancelled) the way a lost link fails it.
    yanked: bool,
    proceed: bool,
    decision: Option<Decision>,
    /// Why the destination cannot know the decision, or how it was made.
    decision_note: Option<String>,
    /// Source, storage copy: (the guest's disk, the destination's, the job copying it).
    copies: Vec<(String, String, Arc<jobs::Job>)>,
}

impl Attempt {
    /// An attempt runs and has not reached the decision (its connection may be yanked).
    fn yankable(&self) -> bool {
        !(self.status.is_final()
            || self.committed
            || matches!(self.handover, Handover::Prepared | Handover::DecisionUnknown | Handover::Committed))
    }

    fn idle() -> Self {
        Attempt {
            status: Status::None,
            role: None,
            handover: Handover::Transfer,
            error: None,
            started: None,
            ended: None,
            setup: None,
            stopped: None,
            downtime: None,
            steps: Vec::new(),
            committed: false,
            cancel_requested: false,
            yanked: false,
            proceed: false,
            decision: None,
            decision_note: None,
            copies: Vec::new(),
        }
    }
}

/// A side's migration: one per daemon, reused by each attempt.
pub struct Migration {
    attempt: Mutex<Attempt>,
    /// Wakes the attempt's task on cancel, migrate-continue and decisions.
    wake: Notify,
    pub counters: Counters,
    caps: Mutex<Capabilities>,
    params: Mutex<Parameters>,
    events: Mutex<Option<EventSink>>,
}

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration").field("attempt", &*self.lock()).finish_non_exhaustive()
    }
}

impl Default for Migration {
    fn default() -> Self {
        Migration {
            attempt: Mutex::new(Attempt::idle()),
            wake: Notify::new(),
            counters: Counters::default(),
            caps: Mutex::new(Capabilities::default()),
            params: Mutex::new(Parameters::default()),
            events: Mutex::new(None),
        }
    }
}

impl Migration {
    pub fn new(events: Option<EventSink>) -> Arc<Self> {
        let m = Migration::default();
        *lock(&m.events) = events;
        Arc::new(m)
    }

    fn lock(&self) -> MutexGuard<'_, Attempt> {
        lock(&self.attempt)
    }

    pub fn status(&self) -> Status {
        self.lock().status
    }

    pub fn role(&self) -> Option<Role> {
        self.lock().role
    }

    pub fn handover(&self) -> Handover {
        self.lock().handover
    }

    pub fn error(&self) -> Option<String> {
        self.lock().error.clone()
    }

    pub fn params(&self) -> Parameters {
        lock(&self.params).clone()
    }

    pub fn capabilities(&self) -> Capabilities {
        *lock(&self.caps)
    }

    /// Start an attempt in `role`; refused while another is not final, or
    /// while this side holds a prepared guest waiting for a decision.
    pub fn begin(&self, role: Role) -> Result<(), VerbError> {
        {
            let mut a = self.lock();
            if !a.status.is_final() {
                return Err(VerbError::InProgress);
            }
            if matches!(a.handover, Handover::Prepared | Handover::DecisionUnknown) {
                return Err(VerbError::PreparedWaiting);
            }
            *a = Attempt { role: Some(role), started: Some(Instant::now()), status: a.status, ..Attempt::idle() };
            self.counters.reset();
            // Checked and taken in one step: two connections never both begin.
            self.apply(&mut a, Status::Setup);
        }
        self.wake.notify_waiters();
        Ok(())
    }

    /// The one way the status changes. Returns false (and changes nothing)
    /// for a change QEMU's graph does not have.
    pub fn transition(&self, to: Status) -> bool {
        let done = {
            let mut a = self.lock();
            self.apply(&mut a, to)
        };
        self.wake.notify_waiters();
        done
    }

    /// A status change with the attempt locked; its event leaves under the
    /// same lock, so events arrive in the order of the changes.
    fn apply(&self, a: &mut Attempt, to: Status) -> bool {
        if a.status == to {
            return true;
        }
        if !allowed(a.status, to) {
            tracing::error!(from = a.status.as_str(), to = to.as_str(), "invalid migration status change");
            return false;
        }
        a.status = to;
        if to == Status::Active {
            a.setup = a.started.map(|t| t.elapsed());
        }
        if to.is_final() {
            a.ended = Some(Instant::now());
        }
        self.emit("MIGRATION", json!({"status": to.as_str()}));
        true
    }

    /// Send an event if the `events` capability is on (QEMU's rule for
    /// MIGRATION and MIGRATION_PASS).
    fn emit(&self, name: &str, data: Value) {
        if self.capabilities().events {
            if let Some(f) = lock(&self.events).clone() {
                f(name, data);
            }
        }
    }

    /// The source synced the guest's dirty log (a pass of pre-copy starts,
    /// or the last one in the switchover): count it, say MIGRATION_PASS.
    pub fn dirty_sync(&self) {
        let a = self.lock();
        let pass = self.counters.passes.fetch_add(1, Ordering::SeqCst) + 1;
        // Under the attempt's lock, as status events: in order with them.
        self.emit("MIGRATION_PASS", json!({ "pass": pass }));
        drop(a);
    }

    /// Whether the guest is stopped for the switchover (bytes sent now are downtime's).
    pub fn is_stopped(&self) -> bool {
        self.lock().stopped.is_some()
    }

    /// A switchover step ended after `took` (see [`SWITCHOVER_STEPS`]).
    pub fn step_done(&self, step: &'static str, took: Duration) {
        self.lock().steps.push((step, took));
    }

    pub fn set_handover(&self, h: Handover) {
        self.lock().handover = h;
        self.wake.notify_waiters();
    }

    /// The source stopped the guest for the switchover (downtime starts).
    pub fn mark_stopped(&self) {
        self.lock().stopped.get_or_insert_with(Instant::now);
    }

    /// End the attempt: completed.
    pub fn complete(&self) {
        {
            let mut a = self.lock();
            if let Some(s) = a.stopped {
                a.downtime = Some(s.elapsed());
            }
        }
        self.transition(Status::Completed);
    }

    /// End the attempt: failed (or cancelled, if the operator asked for it
    /// and the failure is the cancel's). The source is as it was.
    pub fn fail(&self, why: String, cancelled: bool) {
        {
            let mut a = self.lock();
            if a.error.is_none() {
                a.error = Some(why);
            }
        }
        if cancelled && self.status() == Status::Cancelling {
            self.transition(Status::Cancelled);
        } else {
            self.transition(Status::Failed);
        }
    }

    /// `migrate_cancel`. Before the commit point: the attempt rolls back and
    /// ends `cancelled`. After it: refused. Once final: a no-op, as in QEMU.
    pub fn cancel(&self) -> Result<(), VerbError> {
        {
            let mut a = self.lock();
            if a.status.is_final() {
                return Ok(());
            }
            if a.committed || a.handover == Handover::Committed {
                return Err(VerbError::TooLate);
            }
            if matches!(a.handover, Handover::Prepared | Handover::DecisionUnknown) {
                return Err(VerbError::PreparedWaiting);
            }
            a.cancel_requested = true;
            self.apply(&mut a, Status::Cancelling);
        }
        self.wake.notify_waiters();
        Ok(())
    }

    pub fn is_cancelled(&self) -> bool {
        self.lock().cancel_requested
    }

    /// QMP `yank` with instance `migration`: drop the attempt's connection.
    /// Before the commit point the attempt fails and rolls back; a prepared
    /// destination or a committed source is not yanked (the decision is
    /// what matters there). Returns whether there was a connection to yank.
    pub fn yank(&self) -> bool {
        {
            let mut a = self.lock();
            if !a.yankable() {
                return false;
            }
            a.yanked = true;
        }
        self.wake.notify_waiters();
        true
    }

    /// A cancel or a yank asks the attempt to stop.
    pub fn is_stopping(&self) -> bool {
        let a = self.lock();
        a.cancel_requested || a.yanked
    }

    /// Whether the attempt has a connection that `yank` may drop now.
    pub fn yankable(&self) -> bool {
        self.lock().yankable()
    }

    /// Why the attempt stops: a cancel, or a yank.
    pub fn stop_reason(&self) -> super::MigrationError {
        if self.lock().cancel_requested {
            super::MigrationError::Cancelled
        } else {
            super::MigrationError::LinkLost("the connection was yanked (QMP yank)")
        }
    }

    /// Wait until `f` finds what it looks for in the attempt's state.
    async fn wait_for<T>(&self, f: impl Fn(&Attempt) -> Option<T>) -> T {
        wait_until(&self.wake, || f(&self.lock())).await
    }

    /// Resolves once a cancel (or a yank) was requested.
    pub async fn cancelled(&self) {
        self.wait_for(|a| (a.cancel_requested || a.yanked).then_some(())).await
    }

    /// `migrate-continue` at pre-switchover.
    pub fn proceed(&self) -> Result<(), VerbError> {
        {
            let mut a = self.lock();
            if a.status != Status::PreSwitchover {
                return Err(VerbError::NotInState(a.status.as_str()));
            }
            a.proceed = true;
        }
        self.wake.notify_waiters();
        Ok(())
    }

    /// Wait at pre-switchover: Ok on migrate-continue, Err on cancel.
    pub async fn wait_proceed(&self) -> Result<(), ()> {
        self.wait_for(|a| if a.cancel_requested || a.yanked { Some(Err(())) } else { a.proceed.then_some(Ok(())) })
            .await
    }

    /// The source's commit point: one step, refused if a cancel came first.
    /// From here on the source never resumes and cancel is "too late".
    pub fn try_commit(&self) -> bool {
        let mut a = self.lock();
        if a.cancel_requested || a.yanked {
            return false;
        }
        a.committed = true;
        a.handover = Handover::Committed;
        true
    }

    /// The commit point when the guest has a lease: the lease already moved
    /// to the destination, so a cancel that came meanwhile is too late.
    pub fn commit_moved_lease(&self) {
        let mut a = self.lock();
        a.committed = true;
        a.handover = Handover::Committed;
    }

    /// The destination's step to PREPARED: refused if a cancel or a yank
    /// came first (then it rolls back); from here on neither is accepted.
    pub fn try_prepare(&self) -> bool {
        let mut a = self.lock();
        if a.cancel_requested || a.yanked {
            return false;
        }
        a.handover = Handover::Prepared;
        true
    }

    pub fn is_committed(&self) -> bool {
        self.lock().committed
    }

    /// A prepared destination lost its link (or timed out) before hearing
    /// the source's decision.
    pub fn decision_unknown(&self, why: String) {
        let mut a = self.lock();
        if a.handover == Handover::Prepared {
            a.handover = Handover::DecisionUnknown;
            a.decision_note = Some(why);
        }
    }

    /// The operator's decision for a prepared destination (`x-baton-migrate-decide`).
    pub fn decide(&self, d: Decision) -> Result<(), VerbError> {
        {
            let mut a = self.lock();
            // Only once the source's decision cannot arrive: before that, an
            // operator's abort could race the source's commit.
            if a.role != Some(Role::Destination) || a.handover != Handover::DecisionUnknown {
                return Err(VerbError::NotPrepared(a.handover.as_str()));
            }
            a.decision = Some(d);
            a.decision_note =
                Some(format!("{} by the operator", if d == Decision::Commit { "committed" } else { "aborted" }));
        }
        self.wake.notify_waiters();
        Ok(())
    }

    /// Wait for the operator's decision.
    pub async fn wait_decision(&self) -> Decision {
        self.wait_for(|a| a.decision).await
    }

    pub fn set_decision_note(&self, note: String) {
        self.lock().decision_note = Some(note);
    }

    /// `migrate-set-capabilities`: all checked first; refused while an
    /// attempt runs (QEMU's rule).
    pub fn set_capabilities(&self, caps: &[(String, bool)]) -> Result<(), VerbError> {
        if !self.status().is_final() {
            return Err(VerbError::InProgress);
        }
        let mut next = self.capabilities();
        for (name, on) in caps {
            match CAPABILITY_TABLE.iter().find(|(n, _)| n == name) {
                Some((_, Some(field))) => *field(&mut next) = *on,
                Some((_, None)) => {}
                None if QEMU_CAPABILITIES.contains(&name.as_str()) => return Err(VerbError::Capability(name.clone())),
                None => return Err(VerbError::NotACapability(name.clone())),
            }
        }
        *lock(&self.caps) = next;
        Ok(())
    }

    /// `query-migrate-capabilities`: every capability baton offers (libvirt
    /// sets those it finds here).
    pub fn query_capabilities(&self) -> Value {
        let mut c = self.capabilities();
        let list: Vec<Value> = CAPABILITY_TABLE
            .iter()
            .map(|(name, field)| json!({"capability": name, "state": field.is_none_or(|f| *f(&mut c))}))
            .collect();
        Value::Array(list)
    }

    /// `migrate-set-parameters`: checked whole first.
    pub fn set_parameters(&self, args: &Map<String, Value>) -> Result<(), VerbError> {
        let mut p = self.params();
        p.set(args).map_err(VerbError::Parameter)?;
        *lock(&self.params) = p;
        Ok(())
    }

    /// Source, storage copy: a job copying a disk, for `query-migrate`.
    pub fn add_copy(&self, disk: String, to: String, job: Arc<jobs::Job>) {
        self.lock().copies.push((disk, to, job));
    }

    /// `query-migrate`. `ram_total` is the guest's RAM size.
    pub fn query(&self, ram_total: u64) -> Value {
        let a = self.lock();
        if a.status == Status::None {
            return json!({});
        }
        let c = &self.counters;
        let mut v = json!({"status": a.status.as_str()});
        let end = a.ended.unwrap_or_else(Instant::now);
        let ms = |d: Duration| d.as_millis() as u64;
        // As QEMU: times and RAM statistics on the source while it migrates
        // and once it completed; a destination, or an attempt that failed or
        // was cancelled, says its status (and error).
        let running = matches!(a.status, Status::Active | Status::PreSwitchover | Status::Device);
        let source = a.role == Some(Role::Source);
        if source && (running || a.status == Status::Completed) {
            if let Some(t) = a.started {
                v["total-time"] = json!(ms(end.saturating_duration_since(t)));
            }
            if let Some(d) = a.setup {
                v["setup-time"] = json!(ms(d));
            }
        }
        if let Some(d) = a.downtime {
            v["downtime"] = json!(ms(d));
        }
        if source && running {
            v["expected-downtime"] = json!(c.expected_downtime.load(Ordering::SeqCst));
        }
        if source && a.status == Status::Completed {
            // The prediction the switchover was started on, beside `downtime`.
            v["x-baton-expected-downtime"] = json!(c.expected_downtime.load(Ordering::SeqCst));
        }
        if source && (running || a.status == Status::Completed) {
            let page = crate::stream::PAGE as u64;
            let normal = c.pages_sent.load(Ordering::SeqCst);
            let transferred = c.transferred.load(Ordering::SeqCst);
            let downtime_bytes = c.downtime_bytes.load(Ordering::SeqCst);
            v["ram"] = json!({
                "transferred": transferred,
                "remaining": c.dirty_pages.load(Ordering::SeqCst) * page,
                "total": ram_total,
                "duplicate": c.zero_pages.load(Ordering::SeqCst),
                "normal": normal,
                "normal-bytes": normal * page,
                "dirty-pages-rate": c.dirty_pages_rate.load(Ordering::SeqCst),
                "mbps": c.mbps(),
                "dirty-sync-count": c.passes.load(Ordering::SeqCst),
                "postcopy-requests": 0,
                "page-size": page,
                "multifd-bytes": 0,
                "pages-per-second": c.pages_per_second.load(Ordering::SeqCst),
                "precopy-bytes": transferred.saturating_sub(downtime_bytes),
                "downtime-bytes": downtime_bytes,
                "postcopy-bytes": 0,
                "dirty-sync-missed-zero-copy": 0,
            });
        }
        if !a.steps.is_empty() {
            let steps: Map<String, Value> =
                a.steps.iter().map(|(name, d)| (name.to_string(), json!(d.as_micros() as f64 / 1000.0))).collect();
            v["x-baton-switchover"] = Value::Object(steps);
        }
        if let Some(e) = &a.error {
            v["error-desc"] = json!(e);
        }
        v["x-baton-role"] = json!(match a.role {
            Some(Role::Source) => "source",
            Some(Role::Destination) => "destination",
            None => "none",
        });
        v["x-baton-handover"] = json!(a.handover.as_str());
        if a.role == Some(Role::Destination) {
            v["x-baton-pages-received"] = json!(c.pages_received.load(Ordering::SeqCst));
        }
        if let Some(n) = &a.decision_note {
            v["x-baton-decision"] = json!(n);
        }
        if !a.copies.is_empty() {
            // The storage copy's progress (its jobs are gone once the attempt ends).
            let copies: Vec<Value> = a
                .copies
                .iter()
                .map(|(disk, to, job)| {
                    json!({"device": disk, "destination": to, "job": job.id, "status": job.status().as_str(),
                           "copied": job.progress.load(Ordering::SeqCst), "remaining": job.remaining()})
                })
                .collect();
            v["x-baton-storage"] = json!(copies);
        }
        v
    }

    /// baton's extra members of `query-status` (a prepared destination says
    /// why it is not running).
    pub fn status_extra(&self) -> Option<Value> {
        let a = self.lock();
        a.role?;
        let mut v = json!({"x-baton-handover": a.handover.as_str()});
        if matches!(a.handover, Handover::Prepared | Handover::DecisionUnknown) {
            v["x-baton-waiting"] = json!(match &a.decision_note {
                Some(n) =>
                    format!("prepared; the source's decision is unknown ({n}): resolve with x-baton-migrate-decide"),
                None => "prepared; waiting for the source's decision".to_string(),
            });
        }
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counting() -> (Arc<Migration>, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let m = Migration::new(Some(Arc::new(move |_: &str, d: Value| {
            s.lock().unwrap().push(d["status"].as_str().unwrap().to_string())
        })));
        m.set_capabilities(&[("events".into(), true)]).unwrap();
        (m, seen)
    }

    #[test]
    fn each_status_change_emits_exactly_one_event() {
        let (m, seen) = counting();
        m.begin(Role::Source).unwrap();
        assert!(m.transition(Status::Active));
        assert!(m.transition(Status::Active), "same status: no event");
        assert!(m.transition(Status::Device));
        assert!(m.try_commit());
        m.complete();
        m.complete();
        assert_eq!(*seen.lock().unwrap(), ["setup", "active", "device", "completed"]);
        assert!(!m.transition(Status::Active), "completed stays completed");
    }

    #[test]
    fn cancel_follows_the_commit_point() {
        let (m, seen) = counting();
        m.begin(Role::Source).unwrap();
        assert_eq!(m.begin(Role::Source), Err(VerbError::InProgress));
        assert!(!m.transition(Status::Device), "setup cannot skip active");
        m.transition(Status::Active);
        m.transition(Status::Device);
        assert!(m.try_commit());
        assert_eq!(m.cancel(), Err(VerbError::TooLate));
        m.complete();
        assert_eq!(m.cancel(), Ok(()), "a no-op once final");
        assert_eq!(m.status(), Status::Completed);
        // A cancel before the commit point wins over it.
        m.begin(Role::Source).unwrap();
        m.transition(Status::Active);
        m.transition(Status::Device);
        m.cancel().unwrap();
        assert!(!m.try_commit());
        m.fail("cancelled".into(), true);
        assert_eq!(m.status(), Status::Cancelled);
        assert_eq!(m.cancel(), Ok(()));
        assert_eq!(seen.lock().unwrap().last().unwrap(), "cancelled");
    }

    #[test]
    fn only_a_prepared_destination_takes_a_decision() {
        let m = Migration::new(None);
        assert!(matches!(m.decide(Decision::Commit), Err(VerbError::NotPrepared(_))));
        m.begin(Role::Destination).unwrap();
        m.transition(Status::Active);
        assert!(matches!(m.decide(Decision::Abort), Err(VerbError::NotPrepared("transfer"))));
        m.set_handover(Handover::Prepared);
        assert_eq!(m.cancel(), Err(VerbError::PreparedWaiting));
        assert!(
            matches!(m.decide(Decision::Abort), Err(VerbError::NotPrepared("prepared"))),
            "the source's decision may still come"
        );
        m.decision_unknown("link lost".into());
        assert_eq!(m.handover(), Handover::DecisionUnknown);
        m.decide(Decision::Commit).unwrap();
    }

    #[test]
    fn capabilities_and_parameters_are_checked_whole() {
        let m = Migration::new(None);
        let e = m.set_capabilities(&[("events".into(), true), ("postcopy-ram".into(), true)]).unwrap_err();
        assert_eq!(e, VerbError::Capability("postcopy-ram".into()));
        assert!(!m.capabilities().events);
        m.begin(Role::Source).unwrap();
        assert_eq!(m.set_capabilities(&[("events".into(), true)]), Err(VerbError::InProgress));
    }
}
