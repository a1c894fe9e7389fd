//! The switchover, source side: the step of a migration where the guest
//! and its disks change hosts, all or nothing (DESIGN.md, I3 and I6–I8).
//!
//! ```text
//!  stop vCPUs, drain the device ──> every mirror job READY and in sync
//!     ──> inactivate every node (quiesce, flush, flip)
//!     ──> hand the guest state to the destination ──> its acknowledgement
//!     ──> postmigrate
//!  any failure before the acknowledgement:
//!     reactivate every node ──> resume the guest if it was running
//!     (if reactivation fails the guest stays paused and the error says so)
//! ```
//!
//! Jobs are neither cancelled nor completed here: a mirror that was READY
//! is READY again after a rollback (I7), and after a success its cancel is
//! the management's (as libvirt does). Every step has a failpoint named
//! after it, so the tests can fail each one on purpose.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::Graph;
use jobs::JobManager;

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

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct StepError(String);

#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn injected(step: &str) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(StepError(format!("failpoint at {step}")))
}

/// How long mirror jobs get to catch up once the guest is stopped.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// Run the switchover. `mirrors` are the jobs carrying the disks; `handover`
/// delivers the guest state to the destination and resolves once the
/// destination acknowledged it (it has activated its nodes).
pub async fn switchover<F, Fut>(graph: &Arc<Graph>, jobs: &Arc<JobManager>, vm: &Arc<Vm>, mirrors: &[String], handover: F) -> Result<(), SwitchoverError>
where
    F: FnOnce(VmState) -> Fut,
    Fut: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
{
    let was_running = vm.is_running();
    switchover_resuming(graph, jobs, vm, mirrors, was_running, handover).await
}

/// As `switchover`, when the guest was already stopped for it (the
/// pause-before-switchover capability): `was_running` says whether a
/// rollback resumes it.
pub async fn switchover_resuming<F, Fut>(graph: &Arc<Graph>, jobs: &Arc<JobManager>, vm: &Arc<Vm>, mirrors: &[String], was_running: bool, handover: F) -> Result<(), SwitchoverError>
where
    F: FnOnce(VmState) -> Fut,
    Fut: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
{
    let res = steps(graph, jobs, vm, mirrors, handover).await;
    match res {
        Ok(()) => {
            vm.set_state(RunState::PostMigrate);
            Ok(())
        }
        Err((step, cause)) => rollback(graph, vm, was_running, step, cause).await,
    }
}

type Step = (&'static str, Box<dyn std::error::Error + Send + Sync>);

async fn steps<F, Fut>(graph: &Arc<Graph>, jobs: &Arc<JobManager>, vm: &Arc<Vm>, mirrors: &[String], handover: F) -> Result<(), Step>
where
    F: FnOnce(VmState) -> Fut,
    Fut: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
{
    // 1. Stop the vCPUs and drain the device: no guest write is in flight after this.
    vm.stop_into(RunState::FinishMigrate).await.map_err(|e| ("stop", Box::new(e) as _))?;
    fail::fail_point!("switchover::after-stop", |_| Err(("stop", injected("after-stop"))));

    // 2. Every mirror READY and with nothing left to copy.
    let deadline = Instant::now() + SYNC_TIMEOUT;
    for id in mirrors {
        let job = jobs.find(id).map_err(|e| ("jobs", Box::new(e) as _))?;
        if job.status() != jobs::Status::Ready {
            return Err(("jobs", Box::new(StepError(format!("mirror job '{id}' is {}, not ready", job.status().as_str())))));
        }
        while !jobs.in_sync(id) {
            if Instant::now() > deadline {
                return Err(("jobs", Box::new(StepError(format!("mirror job '{id}' did not get in sync within {SYNC_TIMEOUT:?}")))));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    fail::fail_point!("switchover::after-jobs", |_| Err(("jobs", injected("after-jobs"))));

    // 3. Inactivate every node, all or nothing (flushes the mirror targets too).
    graph.inactivate_all().await.map_err(|e| ("inactivate", Box::new(e) as _))?;
    fail::fail_point!("switchover::after-inactivate", |_| Err(("inactivate", injected("after-inactivate"))));

    // 4. Hand the guest over; done only once the destination acknowledged.
    let state = vm.save().await.map_err(|e| ("save", Box::new(e) as _))?;
    fail::fail_point!("switchover::before-handover", |_| Err(("handover", injected("before-handover"))));
    handover(state).await.map_err(|e| ("handover", e))?;
    Ok(())
}

async fn rollback(graph: &Arc<Graph>, vm: &Arc<Vm>, was_running: bool, step: &'static str, cause: Box<dyn std::error::Error + Send + Sync>) -> Result<(), SwitchoverError> {
    tracing::warn!(step, error = %cause, "switchover failed: rolling back");
    if let Err(reactivate) = graph.activate_all().await {
        // I3/I8: never run on an inactive node; stay paused and say so.
        vm.set_state(RunState::Paused);
        return Err(SwitchoverError::Stuck { step, cause: cause.to_string(), reactivate });
    }
    vm.set_state(RunState::Paused);
    if was_running {
        if let Err(e) = vm.cont().await {
            return Err(SwitchoverError::RolledBack { step, cause: format!("{cause}; and resuming failed: {e}").into() });
        }
    }
    Err(SwitchoverError::RolledBack { step, cause })
}
