//! Storage migration in one command: `migrate {uri, "x-baton-storage":
//! "copy"}` (DESIGN.md, "Disks"). What libvirt does with a dozen QMP
//! commands, the handover does itself, over its own connection:
//!
//! ```text
//!  source                                     destination
//!  HELLO {.., storage copy} ───────────────>  refuses a disk already exported or of
//!                                             another size; exports its guest disk on an
//!                                             NBD server of this attempt's (an Exporter,
//!                                             which the binary implements)
//!                            <───────────────  WELCOME {node, export, size, unix | port}
//!  add an nbd node on it, mirror the guest
//!  disk into it (sync full, write-blocking:
//!  each guest write reaches both), wait for
//!  READY with nothing dirty: nothing to drain
//!  at the switchover
//!  RAM pre-copy, switchover (the mirror is a carrier: checked in sync, as by hand)
//!  commit point: cancel the mirror (in sync,
//!  no pivot), delete the nbd node; COMMIT ─>  withdraw the exports and their server, run
//!  any failure: the same teardown, ABORT ──>  withdraw, inactivate the disk again
//! ```
//!
//! The source's nodes and jobs are named `baton-copy-N` (the first N free),
//! so `query-block-jobs` and `query-named-block-nodes` show them while they live.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::Graph;
use jobs::{Job, JobManager};
use serde_json::json;

use super::carriers::Carrier;
use super::MigrationError;
use crate::stream::{Target, TargetAt};
use crate::vm::Vm;

/// A boxed future, for the object-safe [`Exporter`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The destination's exports for a storage copy. vmm does not serve NBD:
/// the binary, which does, implements this.
pub trait Exporter: Send + Sync {
    /// Export `node` (the guest's disk) writable, for this attempt only, on
    /// a server of the attempt's own. Err: why not, in words the source's
    /// operator reads (the disk is already exported, no address to listen on).
    fn export<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<Target, String>>;
    /// Remove every export [`Exporter::export`] made and the server, cutting
    /// any connection left. Idempotent; nothing to do when nothing was made.
    /// Err: an export still holds the disk (named): the guest must not run.
    fn withdraw(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// How the source reaches the destination's exports: where it reached the
/// migration. Over TCP, the export is on that host (a port of the
/// destination's choosing); over a unix socket, the export's socket must
/// be the migration socket's path with `.disk` appended: the source never
/// connects (and mirrors the guest's disk) wherever a destination says.
#[derive(Debug, Clone)]
pub enum Route {
    Tcp { host: String },
    Unix { migration: std::path::PathBuf },
}

/// What the source made for one destination disk.
#[derive(Debug)]
pub struct Copy {
    /// The `nbd` node connected to the destination's export.
    pub node: String,
    /// The mirror job into it, once started.
    pub job: Option<Arc<Job>>,
}

/// How long a copy's teardown waits for its job to end.
const JOB_END_BOUND: Duration = Duration::from_secs(5);
/// How often the wait for READY looks at the jobs.
pub const READY_POLL: Duration = Duration::from_millis(10);

/// The first `baton-copy-N` that names neither a node nor a job.
fn free_name(graph: &Graph, jobs: &JobManager) -> String {
    (0u32..)
        .map(|i| format!("baton-copy-{i}"))
        .find(|n| graph.find(n).is_err() && jobs.check_id(n).is_ok())
        .unwrap_or_else(|| "baton-copy".into())
}

/// The copy's granularity: a guest's 4 KiB write covers whole granules, so
/// once write-blocking it leaves nothing dirty (a 64 KiB granule a write
/// covers in part stays dirty for the background copy, which the switchover
/// would wait for); past 64 GiB it grows to keep the bitmap within 2 MiB.
fn granularity(size: u64) -> u64 {
    (size >> 24).next_power_of_two().clamp(4096, 64 << 10)
}

/// The nbd node's options for `t`.
fn nbd_options(name: &str, t: &Target, route: &Route, io: Duration) -> Result<serde_json::Value, MigrationError> {
    let server = match (&t.at, route) {
        (Some(TargetAt::Unix(path)), Route::Unix { migration }) => {
            let mut expected = migration.clone().into_os_string();
            expected.push(".disk");
            if std::path::Path::new(path) != std::path::Path::new(&expected) {
                return Err(MigrationError::Disk(format!(
                    "the destination exports disk '{}' at {path}, not at {}: refused",
                    t.node,
                    std::path::Path::new(&expected).display()
                )));
            }
            json!({"type": "unix", "path": path})
        }
        (Some(TargetAt::Port(port)), Route::Tcp { host }) => {
            json!({"type": "inet", "host": host, "port": port.to_string()})
        }
        (Some(_), _) => {
            return Err(MigrationError::Disk(format!(
                "the destination exports disk '{}' over another transport than the migration's",
                t.node
            )))
        }
        (None, _) => {
            return Err(MigrationError::Disk(format!(
                "the destination did not say where it exports disk '{}' (export '{}')",
                t.node, t.export
            )))
        }
    };
    Ok(json!({
        "driver": "nbd",
        "node-name": name,
        "server": server,
        "export": t.export,
        // A stalled destination fails the copy instead of holding it.
        "x-baton-request-timeout": io.as_secs().max(1),
    }))
}

/// Connect to each target and start its mirror; `made` records what exists
/// as it is made (the caller tears it down, success or not). Returns the
/// carriers for the switchover's checks.
#[allow(clippy::too_many_arguments)]
pub async fn attach(
    mig: &super::Migration,
    graph: &Arc<Graph>,
    jobs: &Arc<JobManager>,
    vm: &Vm,
    targets: &[Target],
    route: &Route,
    io: Duration,
    made: &mut Vec<Copy>,
) -> Result<Vec<Carrier>, MigrationError> {
    let disk = vm.device().backend().node();
    if targets.is_empty() {
        return Err(MigrationError::Disk("the destination offered no disk to copy into".into()));
    }
    let mut carriers = Vec::with_capacity(targets.len());
    for t in targets {
        if t.size != disk.length() {
            return Err(MigrationError::Disk(format!(
                "the destination's disk '{}' has {} bytes, the guest's '{}' {}",
                t.node,
                t.size,
                disk.name(),
                disk.length()
            )));
        }
        let name = free_name(graph, jobs);
        let opts = nbd_options(&name, t, route, io)?;
        super::points::point("migration::storage-connect").await?;
        graph.blockdev_add(&opts).await.map_err(|e| {
            MigrationError::Disk(format!("connecting to the destination's export '{}': {}", t.export, e.chain()))
        })?;
        made.push(Copy { node: name.clone(), job: None });
        super::points::point("migration::storage-mirror").await?;
        let mut m = jobs::mirror::MirrorOptions::new(disk.name(), &name);
        // Write-blocking from the first write (where auto-converge ends up):
        // each guest write reaches both disks as it is made, so the copy
        // gets READY once the bulk is copied, whatever the guest's write
        // rate, and nothing is left to drain at the switchover. A guest
        // write waits for the destination meanwhile, as with QEMU's active
        // mirror.
        m.copy_mode = jobs::mirror::CopyMode::WriteBlocking;
        m.granularity = granularity(disk.length());
        let job = jobs::JobOptions { id: name.clone(), speed: 0, auto_finalize: true, auto_dismiss: true };
        let (job, _) = jobs::mirror::start(graph, jobs, job, m).map_err(|e| {
            MigrationError::Disk(format!(
                "mirroring disk '{}' to the destination: {}",
                disk.name(),
                crate::error_text(&e)
            ))
        })?;
        if let Some(c) = made.last_mut() {
            c.job = Some(job.clone());
        }
        mig.add_copy(disk.name().to_string(), t.node.clone(), job.clone());
        carriers.push(Carrier { target: t.clone(), job });
    }
    Ok(carriers)
}

/// Whether every copy is READY (write-blocking: it stays in sync with each
/// guest write and the switchover has nothing to drain) with nothing left
/// dirty. Err: a copy ended or failed.
pub fn ready(carriers: &[Carrier]) -> Result<bool, MigrationError> {
    let mut all = true;
    for c in carriers {
        match c.job.status() {
            jobs::Status::Ready => {
                // What is left is copied now, not at the job's next tick.
                if c.job.remaining() > 0 {
                    c.job.wake();
                    all = false;
                }
            }
            jobs::Status::Running | jobs::Status::Created => all = false,
            other => {
                let why = c.job.error().unwrap_or_else(|| format!("it is {}", other.as_str()));
                return Err(MigrationError::Disk(format!(
                    "copying the guest's disk to the destination's '{}' failed: {why}",
                    c.target.node
                )));
            }
        }
    }
    Ok(all)
}

/// Tear down what [`attach`] made: cancel each job (forced: nothing pivots,
/// and after the commit point its target was flushed when the switchover
/// inactivated it, so there is nothing to finish; a stalled target holds
/// it for the job's one-second grace at most), wait for it to end, delete
/// the `nbd` node (which disconnects). Returns what could not be removed.
pub async fn detach(graph: &Graph, jobs: &JobManager, made: &mut Vec<Copy>) -> Result<(), String> {
    let mut left = Vec::new();
    for c in made.drain(..).rev() {
        if let Some(job) = &c.job {
            if !matches!(job.status(), jobs::Status::Concluded | jobs::Status::Null) {
                let _ = jobs.cancel(&job.id, true);
            }
            if tokio::time::timeout(JOB_END_BOUND, job.wait_finished()).await.is_err() {
                left.push(format!("job '{}' did not end within {JOB_END_BOUND:?}", job.id));
            }
            // Not auto-dismissed if it never reached a final state on its own.
            if jobs.find(&job.id).is_ok_and(|j| Arc::ptr_eq(&j, job)) {
                let _ = jobs.dismiss(&job.id);
            }
        }
        let t = Instant::now();
        loop {
            match graph.blockdev_del(&c.node).await {
                Ok(()) => break,
                Err(block::BlockError::NodeNotFound(_)) => break,
                // The job lets go of its target as it ends.
                Err(_) if t.elapsed() < JOB_END_BOUND => tokio::time::sleep(READY_POLL).await,
                Err(e) => {
                    left.push(format!("node '{}': {}", c.node, e.chain()));
                    break;
                }
            }
        }
    }
    if left.is_empty() {
        Ok(())
    } else {
        Err(left.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(at: Option<TargetAt>) -> Target {
        Target { node: "disk".into(), export: "disk".into(), size: 1 << 20, at }
    }

    /// The source connects only where the migration went: `<socket>.disk`,
    /// or a port on the migration's host; any other address a destination
    /// names is refused before anything connects.
    #[test]
    fn the_copy_connects_only_next_to_the_migration() {
        let io = Duration::from_secs(30);
        let unix = Route::Unix { migration: "/run/baton/mig.sock".into() };
        let o =
            nbd_options("baton-copy-0", &target(Some(TargetAt::Unix("/run/baton/mig.sock.disk".into()))), &unix, io)
                .unwrap();
        assert_eq!(o["server"], json!({"type": "unix", "path": "/run/baton/mig.sock.disk"}));
        assert_eq!(o["x-baton-request-timeout"], 30);
        for elsewhere in ["/run/other-vm/nbd.sock", "/run/baton/mig.sock", "/run/baton/../baton/mig.sock.disk"] {
            let e = nbd_options("n", &target(Some(TargetAt::Unix(elsewhere.into()))), &unix, io).unwrap_err();
            assert!(e.to_string().contains("refused"), "{elsewhere}: {e}");
        }
        assert!(
            nbd_options("n", &target(Some(TargetAt::Port(10809))), &unix, io).is_err(),
            "TCP after a unix migration"
        );
        assert!(nbd_options("n", &target(None), &unix, io).is_err(), "no address at all");
        let tcp = Route::Tcp { host: "192.0.2.7".into() };
        let o = nbd_options("n", &target(Some(TargetAt::Port(10809))), &tcp, io).unwrap();
        assert_eq!(o["server"], json!({"type": "inet", "host": "192.0.2.7", "port": "10809"}));
        assert!(nbd_options("n", &target(Some(TargetAt::Unix("/x.disk".into()))), &tcp, io).is_err());
    }

    #[test]
    fn the_copys_granule_is_4_kib_up_to_64_gib_and_the_bitmap_stays_small() {
        assert_eq!(granularity(1 << 20), 4096);
        assert_eq!(granularity(64 << 30), 4096);
        assert_eq!(granularity(128 << 30), 8192);
        assert_eq!(granularity(1 << 50), 64 << 10);
        for size in [1u64 << 30, 100 << 30, 1 << 40] {
            assert!(size / granularity(size) <= 1 << 24, "{size}");
        }
    }
}
