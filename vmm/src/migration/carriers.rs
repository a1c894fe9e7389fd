//! The disks are accounted for (DESIGN.md, "Disks"). A destination disk that
//! is an incoming mirror target must be carried by a mirror job of this
//! source into an `nbd` node connected to that export, bound to the
//! migration by the job itself (a new job under the same id is another
//! job); at the switchover it is READY and in sync, or it ended in sync
//! (cancelled after READY, without error and without a pivot) after the
//! guest last stopped, with no resume since. A destination disk that is not
//! a mirror target is shared storage, as in QEMU.

use std::sync::Arc;

use jobs::{Job, JobManager};

use crate::stream::Target;
use crate::vm::Vm;

/// A destination disk and the job that carries it.
#[derive(Debug, Clone)]
pub struct Carrier {
    pub target: Target,
    pub job: Arc<Job>,
}

fn describe(t: &Target) -> String {
    format!("destination disk '{}' (export '{}')", t.node, t.export)
}

/// Find the job for each target, or name the first disk nobody carries.
pub fn bind(jobs: &JobManager, vm: &Vm, targets: &[Target]) -> Result<Vec<Carrier>, String> {
    let disk = vm.device().backend().node();
    let mut out = Vec::with_capacity(targets.len());
    for t in targets {
        let job = jobs.jobs().into_iter().find(|j| {
            j.kind() == "mirror"
                && matches!(
                    j.status(),
                    jobs::Status::Running | jobs::Status::Ready | jobs::Status::Paused | jobs::Status::Standby
                )
                && j.nodes().is_some_and(|(src, tgt)| {
                    let src_is_disk = Arc::ptr_eq(&src, &disk)
                        || std::iter::successors(Some(disk.clone()), |n| n.child().cloned())
                            .any(|n| Arc::ptr_eq(&n, &src));
                    src_is_disk && tgt.remote_export().as_deref() == Some(t.export.as_str()) && tgt.length() == t.size
                })
        });
        match job {
            Some(job) => out.push(Carrier { target: t.clone(), job }),
            None => {
                return Err(format!(
                    "{} is an incoming mirror target, but no running mirror job of this source's guest disk writes to it: start blockdev-mirror into an nbd node on that export first",
                    describe(t)
                ))
            }
        }
    }
    Ok(out)
}

/// Whether every carrier has the disk in sync now: Ok(true) in sync,
/// Ok(false) still copying, Err when a carrier can no longer get there.
pub fn in_sync(carriers: &[Carrier], vm: &Vm) -> Result<bool, String> {
    let mut all = true;
    for c in carriers {
        let j = &c.job;
        match j.status() {
            jobs::Status::Ready => {
                if !j.in_sync() {
                    // Copy what is left now, not at the job's next tick.
                    j.wake();
                    all = false;
                }
            }
            jobs::Status::Running | jobs::Status::Paused | jobs::Status::Standby => all = false,
            _ => match j.ended() {
                Some(e) if e.outcome == jobs::Outcome::Done && !e.committed => {
                    // Ended in sync: fine only if the guest cannot have written since.
                    match vm.stopped_since() {
                        Some(stop) if e.at >= stop => {}
                        _ => {
                            return Err(format!(
                                "mirror job '{}' carrying {} ended before the guest stopped for this migration: the disk may have changed since",
                                j.id,
                                describe(&c.target)
                            ))
                        }
                    }
                }
                Some(e) => {
                    let how = match &e.outcome {
                        jobs::Outcome::Failed(why) => format!("failed: {why}"),
                        jobs::Outcome::Cancelled => "was cancelled before it was in sync".to_string(),
                        jobs::Outcome::Done => "pivoted to its target".to_string(),
                    };
                    return Err(format!("mirror job '{}' carrying {} {how}", j.id, describe(&c.target)));
                }
                None => {
                    return Err(format!(
                        "mirror job '{}' carrying {} is {}",
                        j.id,
                        describe(&c.target),
                        j.status().as_str()
                    ))
                }
            },
        }
    }
    Ok(all)
}
