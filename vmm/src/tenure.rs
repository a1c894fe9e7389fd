//! The guest's lease, as the VMM keeps it: "the lease owner always
//! represents where the guest is unpaused".
//!
//! The VMM is the side that checks the fencing token. Its vCPUs run only
//! while this daemon holds the guest's lease, and only until the lease's
//! local deadline (the [`Fence`] every vCPU checks before entering KVM_RUN,
//! and a timer per vCPU kicks it out at). `cont` proves the lease first
//! (renews it, or acquires a free one); a renewal loop keeps it; a holder
//! that cannot renew before its deadline stops its guest by itself, says
//! so (`X_BATON_LEASE`), and runs it again only once it holds the lease
//! again with nobody else having held it meanwhile:
//!
//! ```text
//!   free ──cont: acquire──> held ──renew──> held
//!                            │ └─ no renewal by the deadline ──> fenced (guest stopped)
//!                            │        └─ re-acquired at g or g+1 ──> held (guest resumed)
//!                            │        └─ someone else holds it ──> lost
//!                            └─ migration: transfer (g -> g+1) ──> transferred
//! ```
//!
//! A migration's commit point is the transfer ([`Handing::transfer`]); the
//! destination claims g+1 and runs. A source whose handover failed resumes
//! only by renewing g: if the transfer went through after all, the renewal
//! says who holds the guest now, and the source stays paused.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use block::sync::lock;
use lease::{Held, Holder, Lease, LeaseError, Record};
use serde_json::{json, Value};

use crate::vcpu::Fence;
use crate::vm::{Vm, VmEvents};

/// What this daemon knows of its guest's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Not held: never taken, or released.
    Free,
    /// Held at `Held::generation` until `Held::deadline`.
    Held,
    /// Being handed over (the source between its last state and the decision).
    HandingOver,
    /// The deadline passed without a renewal: the guest was stopped.
    Fenced,
    /// Someone else holds the lease (or held it since): the guest here is stale.
    Lost,
    /// Moved to the destination at the migration's commit point.
    Transferred { to: String, generation: u64 },
}

impl Phase {
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::Free => "free",
            Phase::Held => "held",
            Phase::HandingOver => "handing-over",
            Phase::Fenced => "fenced",
            Phase::Lost => "lost",
            Phase::Transferred { .. } => "transferred",
        }
    }
}

#[derive(Debug)]
struct St {
    phase: Phase,
    held: Option<Held>,
    /// The last generation this daemon held (the re-acquire rule's base).
    last: Option<u64>,
    /// Why the lease is not held, for query-status.
    reason: Option<String>,
    /// The guest was running when it was fenced: run it again once the
    /// lease is held again.
    resume: bool,
    /// Times the guest was fenced.
    fenced: u64,
}

/// The guest's lease, kept by the VMM.
pub struct Tenure {
    lease: Arc<dyn Lease>,
    owner: String,
    ttl: Duration,
    st: Mutex<St>,
    /// Serialises the store operations that change what this daemon holds
    /// (the renewal loop, `cont`, a handover: a handover holds it from its
    /// last renewal to its decision, so no renewal lands in between).
    ops: Arc<tokio::sync::Mutex<()>>,
    changed: tokio::sync::watch::Sender<u64>,
    fence: Mutex<Option<Arc<Fence>>>,
    vm: Mutex<Weak<Vm>>,
    events: Mutex<Option<VmEvents>>,
}

impl std::fmt::Debug for Tenure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenure").field("key", &self.lease.key()).field("owner", &self.owner).finish_non_exhaustive()
    }
}

/// Why `cont` (or a handover) cannot have the lease.
#[derive(Debug, thiserror::Error)]
pub enum TenureError {
    #[error(transparent)]
    Store(#[from] LeaseError),
    #[error(
        "the lease of guest {key} was held by another daemon since this one held generation {last} \
         (it is at generation {now}): the guest here is stale and does not run"
    )]
    Superseded { key: String, last: u64, now: u64 },
    #[error("the lease of guest {key} moved to {to} at generation {generation}: the guest runs there")]
    Transferred { key: String, to: String, generation: u64 },
}

impl Tenure {
    /// The lease `lease` kept for `owner` (this daemon's name in the store).
    pub fn new(lease: Arc<dyn Lease>, owner: String, ttl: Duration) -> Arc<Tenure> {
        let (changed, _) = tokio::sync::watch::channel(0);
        Arc::new(Tenure {
            lease,
            owner,
            ttl,
            st: Mutex::new(St { phase: Phase::Free, held: None, last: None, reason: None, resume: false, fenced: 0 }),
            ops: Arc::new(tokio::sync::Mutex::new(())),
            changed,
            fence: Mutex::new(None),
            vm: Mutex::new(Weak::new()),
            events: Mutex::new(None),
        })
    }

    pub fn key(&self) -> &str {
        self.lease.key()
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn phase(&self) -> Phase {
        lock(&self.st).phase.clone()
    }

    /// The generation held now, or last held.
    pub fn generation(&self) -> Option<u64> {
        let st = lock(&self.st);
        st.held.as_ref().map(|h| h.generation).or(st.last)
    }

    /// Bind to the VM whose vCPUs it fences; starts the renewal loop.
    pub(crate) fn attach(self: &Arc<Self>, vm: &Arc<Vm>, fence: Arc<Fence>, events: VmEvents) {
        fence.close();
        *lock(&self.fence) = Some(fence);
        *lock(&self.vm) = Arc::downgrade(vm);
        *lock(&self.events) = Some(events);
        let me = Arc::downgrade(self);
        tokio::spawn(keep(me));
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn emit(&self, data: Value) {
        let events = lock(&self.events).clone();
        if let Some(ev) = events {
            ev("X_BATON_LEASE", data);
        }
    }

    /// Record `h` as held (and the vCPUs' deadline with it).
    fn set_held(&self, h: Held) {
        if let Some(f) = lock(&self.fence).as_ref() {
            f.until(h.deadline);
        }
        let mut st = lock(&self.st);
        st.last = Some(h.generation);
        st.held = Some(h);
        st.phase = Phase::Held;
        st.reason = None;
        drop(st);
        self.bump();
    }

    /// No longer held: `phase`, and why.
    fn set_not_held(&self, phase: Phase, reason: String) {
        if let Some(f) = lock(&self.fence).as_ref() {
            f.close();
        }
        let mut st = lock(&self.st);
        if let Some(h) = st.held.take() {
            st.last = Some(h.generation);
        }
        if matches!(phase, Phase::Lost | Phase::Transferred { .. }) {
            st.resume = false;
        }
        st.phase = phase;
        st.reason = Some(reason);
        drop(st);
        self.bump();
    }

    /// The store's answer to a renewal or acquisition that failed: a holder
    /// that is someone else ends the tenure (`Lost`); other failures leave
    /// the phase as it is (the renewal loop's deadline decides).
    fn on_refusal(&self, e: &LeaseError) {
        if matches!(e, LeaseError::HeldBy { .. } | LeaseError::Lost { .. } | LeaseError::Stale { .. }) {
            let text = e.to_string();
            self.set_not_held(Phase::Lost, text.clone());
            self.emit(json!({"status": "lost", "reason": text}));
        }
    }

    /// Prove the lease for running the guest (`cont`, the first start, a
    /// rollback's resume): renew it if held, else acquire it, and accept a
    /// fresh one only at the generation after the last this daemon held
    /// (nobody else held it since). Sets the vCPUs' deadline.
    pub async fn prove(&self) -> Result<Held, TenureError> {
        let _op = self.ops.lock().await;
        self.prove_locked().await
    }

    async fn prove_locked(&self) -> Result<Held, TenureError> {
        let (phase, held, last) = {
            let st = lock(&self.st);
            (st.phase.clone(), st.held.clone(), st.last)
        };
        if let Phase::Transferred { to, generation } = phase {
            return Err(TenureError::Transferred { key: self.key().into(), to, generation });
        }
        if let Some(h) = held {
            match self.lease.renew(&h).await {
                Ok(n) => {
                    self.set_held(n.clone());
                    return Ok(n);
                }
                Err(e @ (LeaseError::Lost { .. } | LeaseError::HeldBy { .. })) => {
                    // Expired (nobody took it) or taken: acquiring says which.
                    if matches!(e, LeaseError::HeldBy { .. }) {
                        self.on_refusal(&e);
                        return Err(e.into());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        let n = match self.lease.acquire(&self.owner).await {
            Ok(n) => n,
            Err(e) => {
                self.on_refusal(&e);
                return Err(e.into());
            }
        };
        if let Some(last) = last {
            if n.generation > last + 1 {
                let now = n.generation;
                if let Err(e) = self.lease.release(n).await {
                    tracing::warn!(error = %e, "cannot release a lease this daemon must not keep");
                }
                let err = TenureError::Superseded { key: self.key().into(), last, now };
                self.set_not_held(Phase::Lost, err.to_string());
                self.emit(json!({"status": "lost", "reason": err.to_string()}));
                return Err(err);
            }
        }
        self.set_held(n.clone());
        Ok(n)
    }

    /// The source's handover begins (before its last state goes): the lease
    /// is proven afresh and no renewal happens until the decision, so a
    /// destination that sees the record change knows the source decided.
    pub async fn begin_handover(self: &Arc<Self>) -> Result<Handing, TenureError> {
        let op = self.ops.clone().lock_owned().await;
        let held = self.prove_locked().await?;
        {
            let mut st = lock(&self.st);
            st.phase = Phase::HandingOver;
        }
        self.bump();
        Ok(Handing { tenure: self.clone(), held, _op: op, done: false })
    }

    /// The destination after the decision to commit: claim generation
    /// `generation` (transferred to this daemon). Retries a store that does
    /// not answer for up to a ttl; a refusal is final.
    pub async fn claim(&self, generation: u64) -> Result<Held, TenureError> {
        let _op = self.ops.lock().await;
        let until = Instant::now() + self.ttl;
        loop {
            match self.lease.claim(&self.owner, generation).await {
                Ok(h) => {
                    self.set_held(h.clone());
                    self.emit(json!({"status": "held", "generation": h.generation}));
                    return Ok(h);
                }
                Err(e @ LeaseError::Backend(_)) if Instant::now() < until => {
                    tracing::warn!(error = %e, "claiming the lease: retrying");
                    tokio::time::sleep(self.ttl / 20).await;
                }
                Err(e) => {
                    self.on_refusal(&e);
                    return Err(e.into());
                }
            }
        }
    }

    /// The destination takes a lease its source let lapse while the
    /// destination held the guest's last state (the source stopped for the
    /// handover and never decided): acquired only at `generation` (the
    /// record's next: nobody may take it in between).
    pub(crate) async fn take_lapsed(&self, generation: u64) -> Result<Held, TenureError> {
        let _op = self.ops.lock().await;
        let h = self.lease.acquire(&self.owner).await?;
        if h.generation != generation {
            let now = h.generation;
            let _ = self.lease.release(h).await;
            return Err(TenureError::Superseded { key: self.key().into(), last: generation - 1, now });
        }
        self.set_held(h.clone());
        self.emit(json!({"status": "held", "generation": h.generation}));
        Ok(h)
    }

    /// The record as stored (a destination deciding from it).
    pub async fn inspect(&self) -> Result<Record, LeaseError> {
        self.lease.inspect().await
    }

    /// `quit`: let go of the lease (the guest stopped first).
    pub async fn release(&self) {
        let _op = self.ops.lock().await;
        let held = lock(&self.st).held.clone();
        if let Some(h) = held {
            if let Err(e) = self.lease.release(h).await {
                tracing::warn!(error = %e, "cannot release the guest's lease");
            }
            self.set_not_held(Phase::Free, "released".into());
        }
    }

    /// The guest was stopped by its operator: not resumed by a re-acquire.
    pub fn stopped(&self) {
        lock(&self.st).resume = false;
    }

    /// A rollback that could not resume its guest for want of the lease:
    /// resume it once the lease is proven again.
    pub fn resume_when_held(&self) {
        let mut st = lock(&self.st);
        if !matches!(st.phase, Phase::Lost | Phase::Transferred { .. }) {
            st.resume = true;
            if st.phase == Phase::Held {
                st.phase = Phase::Fenced;
            }
        }
        drop(st);
        self.bump();
    }

    /// `query-status`'s `x-baton-lease`.
    pub fn status(&self) -> Value {
        let st = lock(&self.st);
        let mut v = json!({
            "key": self.key(), "owner": self.owner, "status": st.phase.as_str(), "fenced": st.fenced,
        });
        if let Some(g) = st.held.as_ref().map(|h| h.generation).or(st.last) {
            v["generation"] = g.into();
        }
        if let Some(h) = &st.held {
            let left = h.deadline.saturating_duration_since(Instant::now());
            v["deadline-ms"] = (left.as_millis() as u64).into();
        }
        if let Phase::Transferred { to, generation } = &st.phase {
            v["holder"] = json!({"owner": to, "generation": generation});
        }
        if let Some(r) = &st.reason {
            v["reason"] = r.clone().into();
        }
        v
    }

    /// The deadline passed without a renewal: stop the guest (if it runs)
    /// and say so. The vCPUs stopped entering KVM_RUN at the deadline already.
    async fn fence_now(&self, why: String) {
        let vm = lock(&self.vm).upgrade();
        let running = vm.as_ref().is_some_and(|v| v.is_running());
        {
            let mut st = lock(&self.st);
            if st.phase != Phase::Held {
                return;
            }
            st.resume |= running;
            st.fenced += 1;
        }
        self.set_not_held(Phase::Fenced, why.clone());
        tracing::error!(key = self.key(), "{why}: the guest is stopped until the lease is held again");
        // Failpoint `lease::fence-stop`: the VMM's own stop does not happen
        // (a stuck or late task), so only the vCPUs' fence keeps guest code
        // from running: what a test of the fence itself needs.
        let skip = crate::migration::points::point("lease::fence-stop").await.is_err();
        if let (Some(vm), true, false) = (vm, running, skip) {
            let _ = vm.stop_fenced().await;
        }
        self.emit(json!({"status": "fenced", "reason": why}));
    }
}

/// A source's handover in progress (see [`Tenure::begin_handover`]).
/// Dropped without a transfer, the lease is the source's as before.
#[derive(Debug)]
pub struct Handing {
    tenure: Arc<Tenure>,
    held: Held,
    _op: tokio::sync::OwnedMutexGuard<()>,
    done: bool,
}

impl Handing {
    pub fn generation(&self) -> u64 {
        self.held.generation
    }

    /// Until when the lease, proven at the handover's start, is certainly
    /// still the source's: a decision must come before, or the source can no
    /// longer resume at its generation.
    pub fn deadline(&self) -> Instant {
        self.held.deadline
    }

    /// The commit point: move the lease to `to` at generation + 1. Ok: the
    /// guest is the destination's. Err: it did not move, or (the store did
    /// not answer) it is not known whether it did; either way the source
    /// does not run the guest without renewing.
    pub async fn transfer(mut self, to: &str) -> Result<Holder, LeaseError> {
        let r = self.tenure.lease.transfer(&self.held, to).await;
        if let Ok(h) = &r {
            self.done = true;
            let t = &self.tenure;
            t.set_not_held(
                Phase::Transferred { to: h.owner.clone(), generation: h.generation },
                format!("transferred to {} at generation {}", h.owner, h.generation),
            );
            t.emit(json!({"status": "transferred", "holder": {"owner": h.owner, "generation": h.generation}}));
        }
        r
    }
}

impl Drop for Handing {
    fn drop(&mut self) {
        if !self.done {
            let mut st = lock(&self.tenure.st);
            if st.phase == Phase::HandingOver {
                st.phase = Phase::Held;
            }
            drop(st);
            self.tenure.bump();
        }
    }
}

/// The renewal loop: renews a held lease every quarter ttl; fences the
/// guest at the deadline if no renewal got through; re-acquires a fenced
/// lease (and resumes the guest) when the store answers again.
async fn keep(me: Weak<Tenure>) {
    let mut changed = match me.upgrade() {
        Some(t) => t.changed.subscribe(),
        None => return,
    };
    loop {
        let Some(t) = me.upgrade() else { return };
        let (phase, held, resume) = {
            let st = lock(&t.st);
            (st.phase.clone(), st.held.clone(), st.resume)
        };
        let every = t.ttl / 4;
        match (phase, held) {
            (Phase::Held, Some(h)) => {
                let renew = async {
                    tokio::time::sleep(every).await;
                    let _op = t.ops.lock().await;
                    // Still the same tenure (a cont or a handover may have moved on).
                    if lock(&t.st).held.as_ref().map(|x| x.generation) != Some(h.generation) {
                        return None;
                    }
                    Some(t.lease.renew(&h).await)
                };
                tokio::select! {
                    _ = tokio::time::sleep_until(h.deadline.into()) => {
                        t.fence_now(format!(
                            "the lease of guest {} (generation {}) could not be renewed before its deadline",
                            t.key(), h.generation
                        )).await;
                    }
                    r = renew => match r {
                        Some(Ok(n)) if lock(&t.st).phase == Phase::Held => t.set_held(n),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "renewing the guest's lease failed");
                            if matches!(e, LeaseError::HeldBy { .. } | LeaseError::Lost { .. }) {
                                // Definitively not ours: stop now, not at the deadline.
                                t.fence_now(e.to_string()).await;
                                t.on_refusal(&e);
                            }
                        }
                        None => {}
                    },
                    _ = changed.changed() => {}
                }
            }
            (Phase::Fenced, _) if resume => {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {
                        let vm = lock(&t.vm).upgrade();
                        if let Some(vm) = vm {
                            match vm.resume_leased().await {
                                Ok(()) => {
                                    lock(&t.st).resume = false;
                                    t.emit(json!({"status": "held", "generation": t.generation(), "resumed": true}));
                                }
                                Err(e) => tracing::debug!(error = %e.chain(), "re-acquiring the guest's lease"),
                            }
                        }
                    }
                    _ = changed.changed() => {}
                }
            }
            _ => {
                drop(t);
                if changed.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The destination's view of the decision, from the store, while it waits
/// PREPARED (see `migration::dest`): what the source's last renewal left
/// (`prepared`, read before PREPARED went) against what the store says now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Moved to this destination at the expected generation.
    Commit,
    /// Nobody holds it and nobody took it since the source's generation:
    /// the source stopped for the handover and let it lapse; this side has
    /// the guest's last state and may take the lease.
    Lapsed,
    /// The source renewed after its last state went (it decided to resume),
    /// or someone else holds it: roll back.
    Abort(String),
    /// Not decided yet.
    Open,
}

/// Judge `now` (read from the store at wall-clock `now_ms`) against the
/// source's record read before PREPARED went.
pub fn verdict(prepared: &Record, now: &Record, me: &str, now_ms: u64) -> Verdict {
    let g = prepared.generation;
    match now.live_holder(now_ms) {
        Some(h) if h.owner == me && h.generation == g + 1 => Verdict::Commit,
        Some(h) if h.owner == prepared.owner && h.generation == g => {
            if now.expires_ms == prepared.expires_ms {
                Verdict::Open
            } else {
                Verdict::Abort(format!(
                    "the source {} renewed its lease at generation {g} after its last state went: it resumed",
                    h.owner
                ))
            }
        }
        Some(h) => Verdict::Abort(format!("the lease is held by {} at generation {}", h.owner, h.generation)),
        None if now.generation == g => Verdict::Lapsed,
        None if now.generation == g + 1 && now.owner == me => Verdict::Lapsed,
        None => Verdict::Abort(format!(
            "the lease went to generation {} since the source's {g}, not held by this destination",
            now.generation
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(owner: &str, generation: u64, expires_ms: u64) -> Record {
        Record { owner: owner.into(), generation, expires_ms }
    }

    #[test]
    fn the_destination_reads_the_decision_from_the_record() {
        let p = rec("src", 7, 1000);
        assert_eq!(verdict(&p, &p, "dst", 500), Verdict::Open);
        assert_eq!(verdict(&p, &rec("dst", 8, 1500), "dst", 500), Verdict::Commit);
        assert!(matches!(verdict(&p, &rec("src", 7, 1200), "dst", 500), Verdict::Abort(w) if w.contains("renewed")));
        assert!(matches!(verdict(&p, &rec("other", 8, 1500), "dst", 500), Verdict::Abort(_)));
        // Expired at g: nobody took it since.
        assert_eq!(verdict(&p, &p, "dst", 1000), Verdict::Lapsed);
        assert_eq!(verdict(&p, &rec("", 7, 0), "dst", 1000), Verdict::Lapsed);
        // Someone took g+1 and let it go: not ours to take.
        assert!(matches!(verdict(&p, &rec("", 8, 0), "dst", 1000), Verdict::Abort(_)));
        assert!(matches!(verdict(&p, &rec("x", 9, 0), "dst", 1000), Verdict::Abort(_)));
    }
}
