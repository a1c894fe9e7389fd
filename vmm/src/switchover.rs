//! The switchover, source side: the step of a migration where the guest
//! and its disks change hosts, all or nothing (DESIGN.md, I3 and I6–I8).
//!
//! ```text
//!  stop vCPUs, drain the device (bounded) ──> every disk's carrier in sync (bounded)
//!     ──> inactivate every node (quiesce, flush, flip)
//!     ──> hand the guest state over; the handover returns once the
//!         destination is PREPARED and the commit point is passed
//!     ──> postmigrate
//!  any failure or cancel before the commit point:
//!     reactivate every node ──> resume the guest if it was running
//!     (if reactivation fails the guest stays paused and the error says so)
//! ```
//!
//! Jobs are neither cancelled nor completed here: a mirror that was READY
//! is READY again after a rollback (I7), and after a success its cancel is
//! the management's (as libvirt does). Every step has a failpoint named
//! after it (`migration::points`), so the tests can fail or hold each one.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::Graph;
use jobs::JobManager;

use crate::migration::points::point;
use crate::vm::{RunState, Vm, VmState};

#[derive(Debug, thiserror::Error)]
pub enum SwitchoverError {
    #[error("switchover failed at '{step}'; the source is back as it was")]
    RolledBack {
        step: &'static str,
        #[source]
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("switchover failed at '{step}' ({cause}) and reactivating the source failed too; the guest stays paused")]
    Stuck {
        step: &'static str,
        cause: String,
        #[source]
        reactivate: block::BlockError,
    },
}

impl SwitchoverError {
    /// The failure that started the rollback.
    pub fn cause(&self) -> String {
        match self {
            SwitchoverError::RolledBack { cause, .. } => crate::error_text(cause.as_ref()),
            SwitchoverError::Stuck { cause, .. } => cause.clone(),
        }
    }
}

/// Why the carriers' step failed.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("the mirrors did not get in sync within {0:?}")]
    SyncTimeout(Duration),
    /// A carrier can no longer get in sync (its own message: a job's state).
    #[error("{0}")]
    Carrier(String),
    #[error("migration cancelled")]
    Cancelled,
}

/// The bounded waits of the switchover.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// The device's requests in flight once the vCPUs stopped.
    pub drain: Duration,
    /// The carriers catching up with the stopped guest.
    pub sync: Duration,
    /// The saved state carries a copy of the RAM (a handover inside one
    /// process); a migration sends RAM from guest memory and leaves it out.
    pub with_ram: bool,
}

impl Default for Bounds {
    fn default() -> Self {
        let p = crate::migration::Parameters::default();
        Bounds { drain: p.drain_timeout, sync: p.mirror_sync_timeout, with_ram: true }
    }
}

/// Run the switchover with the mirror jobs `mirrors` (by id) carrying the
/// disks and default bounds; `handover` delivers the guest state and
/// resolves once the destination has it (one process, two graphs: tests).
pub async fn switchover<F, Fut>(
    graph: &Arc<Graph>,
    jobs: &Arc<JobManager>,
    vm: &Arc<Vm>,
    mirrors: &[String],
    handover: F,
) -> Result<(), SwitchoverError>
where
    F: FnOnce(VmState) -> Fut,
    Fut: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
{
    let was_running = vm.is_running();
    let in_sync = || -> Result<bool, String> {
        let mut all = true;
        for id in mirrors {
            let job = jobs.find(id).map_err(|e| e.to_string())?;
            if job.status() != jobs::Status::Ready {
                return Err(format!("mirror job '{id}' is {}, not ready", job.status().as_str()));
            }
            all &= job.in_sync();
        }
        Ok(all)
    };
    let moved = || -> Moved<'_> { Box::pin(tokio::time::sleep(Duration::from_millis(2))) };
    run(graph, vm, was_running, Bounds::default(), in_sync, &moved, &|| false, &|_, _| {}, handover).await
}

/// A future that resolves when a carrier's work may have moved (a copy
/// settled): the switchover then checks "in sync" again, without polling.
pub type Moved<'a> = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Told each step's name and how long it took, as it ends.
pub type OnStep<'a> = &'a (dyn Fn(&'static str, Duration) + Sync);

/// The switchover. `in_sync` says whether the disks' carriers are in sync
/// (an error when one can no longer be); `cancelled` is polled in the waits;
/// `was_running` says whether a rollback resumes the guest; `on_step`
/// hears each step's time (`stop`, `drain`, `mirror-sync`, `inactivate`,
/// `device-state`; the handover times its own).
#[allow(clippy::too_many_arguments)]
pub async fn run<'m, C, F, Fut>(
    graph: &Arc<Graph>,
    vm: &Arc<Vm>,
    was_running: bool,
    bounds: Bounds,
    in_sync: C,
    moved: &'m (dyn Fn() -> Moved<'m> + Sync),
    cancelled: &(dyn Fn() -> bool + Sync),
    on_step: OnStep<'_>,
    handover: F,
) -> Result<(), SwitchoverError>
where
    C: FnMut() -> Result<bool, String>,
    F: FnOnce(VmState) -> Fut,
    Fut: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
{
    match steps(graph, vm, bounds, in_sync, moved, cancelled, on_step, handover).await {
        Ok(()) => {
            vm.set_state(RunState::PostMigrate);
            Ok(())
        }
        Err((step, cause)) => rollback(graph, vm, was_running, step, cause).await,
    }
}

type Step = (&'static str, Box<dyn std::error::Error + Send + Sync>);

fn step_err(step: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Step {
    (step, Box::new(e))
}

#[allow(clippy::too_many_arguments)]
async fn steps<'m, C, F, Fut>(
    graph: &Arc<Graph>,
    vm: &Arc<Vm>,
    bounds: Bounds,
    mut in_sync: C,
    moved: &'m (dyn Fn() -> Moved<'m> + Sync),
    cancelled: &(dyn Fn() -> bool + Sync),
    on_step: OnStep<'_>,
    handover: F,
) -> Result<(), Step>
where
    C: FnMut() -> Result<bool, String>,
    F: FnOnce(VmState) -> Fut,
    Fut: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
{
    // 1. Stop the vCPUs and drain the device: no guest write is in flight after this.
    let t = Instant::now();
    vm.stop_bounded(RunState::FinishMigrate, bounds.drain).await.map_err(|e| step_err("stop", e))?;
    let drain = vm.last_drain();
    on_step("stop", t.elapsed().saturating_sub(drain));
    on_step("drain", drain);
    point("switchover::after-stop").await.map_err(|e| step_err("stop", e))?;
    let t = Instant::now();

    // 2. Every disk's carrier in sync.
    let deadline = Instant::now() + bounds.sync;
    loop {
        // Armed before the check, so a move between the two is not missed.
        let next = moved();
        match in_sync() {
            Ok(true) => break,
            Ok(false) if Instant::now() > deadline => {
                return Err(step_err("jobs", StepError::SyncTimeout(bounds.sync)));
            }
            Ok(false) => {}
            Err(e) => return Err(step_err("jobs", StepError::Carrier(e))),
        }
        if cancelled() {
            return Err(step_err("jobs", StepError::Cancelled));
        }
        // The next move, or 2 ms (a move the future missed, a cancel, the deadline).
        let _ = tokio::time::timeout(Duration::from_millis(2), next).await;
    }
    on_step("mirror-sync", t.elapsed());
    point("switchover::after-jobs").await.map_err(|e| step_err("jobs", e))?;

    // 3. Inactivate every node, all or nothing (flushes the mirror targets too).
    //    Never interrupted: a cancel takes effect at the next step.
    let t = Instant::now();
    graph.inactivate_all().await.map_err(|e| step_err("inactivate", e))?;
    on_step("inactivate", t.elapsed());
    point("switchover::after-inactivate").await.map_err(|e| step_err("inactivate", e))?;

    // 4. Hand the guest over; done once the destination is prepared and the
    //    commit point is passed.
    let t = Instant::now();
    let state = vm.save_state(bounds.with_ram).await.map_err(|e| step_err("save", e))?;
    on_step("device-state", t.elapsed());
    point("switchover::before-handover").await.map_err(|e| step_err("handover", e))?;
    handover(state).await.map_err(|e| ("handover", e))?;
    Ok(())
}

async fn rollback(
    graph: &Arc<Graph>,
    vm: &Arc<Vm>,
    was_running: bool,
    step: &'static str,
    cause: Box<dyn std::error::Error + Send + Sync>,
) -> Result<(), SwitchoverError> {
    tracing::warn!(step, error = %crate::error_text(cause.as_ref()), "switchover failed: rolling back");
    if let Err(reactivate) = graph.activate_all().await {
        // I3/I8: never run on an inactive node; stay paused and say so.
        vm.set_state(RunState::Paused);
        return Err(SwitchoverError::Stuck { step, cause: crate::error_text(cause.as_ref()), reactivate });
    }
    vm.set_state(RunState::Paused);
    if was_running {
        if let Err(e) = vm.cont().await {
            // Without its lease the guest waits: resumed once the lease is
            // proven again (the store answers), unless someone else has it.
            if let (crate::VmmError::Lease(_), Some(t)) = (&e, vm.tenure()) {
                t.resume_when_held();
            }
            return Err(SwitchoverError::RolledBack {
                step,
                cause: format!("{}; and resuming failed: {e}", crate::error_text(cause.as_ref())).into(),
            });
        }
    }
    Err(SwitchoverError::RolledBack { step, cause })
}
