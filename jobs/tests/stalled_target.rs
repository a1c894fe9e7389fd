//! A mirror whose NBD target stops answering (a black-holed server) can be
//! force-cancelled at once: the job ends with BLOCK_JOB_CANCELLED within a
//! bound, the guest's writes held by write-blocking mode complete, and the
//! graph is as before the job. The target's connection has no request
//! timeout here, so only the cancel can end the waits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{IoBuf, WriteFlags};
use common::*;
use jobs::mirror::{CopyMode, MirrorOptions, SyncMode, FORCE_CANCEL_GRACE};
use jobs::Status;
use serde_json::json;

const SIZE: u64 = 8 * MIB;
/// How long a forced cancel may take, far above the grace it allows the target.
const PROMPT: Duration = Duration::from_secs(10);

/// Source "src" (a file with data) under a guest, target "tgt" on a black hole.
struct Stalled {
    src: std::path::PathBuf,
    hole: BlackHoleNbd,
    guest: Arc<block::BlockBackend>,
}

async fn stalled_pair(fx: &Fx, hole_flush: bool) -> Stalled {
    let src = fx.image("src.raw", SIZE);
    fill_range(&src, &mut Rng::new(9), 0, 4 * MIB);
    fx.add_file("src", &src).await;
    let hole = BlackHoleNbd::start(&fx.path("hole.sock"), SIZE, hole_flush);
    fx.add(json!({"driver": "nbd", "node-name": "tgt", "server": {"type": "unix", "path": hole.sock}, "export": "",
                  "x-baton-request-timeout": 0}))
        .await;
    let guest = fx.guest("src");
    Stalled { src, hole, guest }
}

fn spawn_guest_write(
    guest: &Arc<block::BlockBackend>,
    offset: u64,
    data: &[u8],
) -> tokio::task::JoinHandle<block::Result<IoBuf>> {
    let (guest, data) = (guest.clone(), data.to_vec());
    tokio::spawn(async move { guest.write(offset, IoBuf::from_slice(&data), WriteFlags::default()).await })
}

/// The checks after the forced cancel: the job ended cancelled in time, the
/// guest's held write completed onto the source, the graph is as before, and
/// the hook is gone (a new guest write does not wait for the dead target).
async fn assert_cancelled_promptly(
    fx: &Fx,
    job: &jobs::Job,
    mirror: jobs::mirror::Mirror,
    cancelled_at: Instant,
    held: tokio::task::JoinHandle<block::Result<IoBuf>>,
    st: &Stalled,
    before: &[NodeSnap],
) {
    wait_finished(job, PROMPT).await;
    let took = cancelled_at.elapsed();
    assert!(took < PROMPT, "the forced cancel took {took:?}");
    assert!(took >= FORCE_CANCEL_GRACE / 2, "the target's I/O got no grace ({took:?})");
    assert_eq!(fx.count("BLOCK_JOB_CANCELLED"), 1, "events: {:?}", fx.event_names());
    assert_eq!(fx.count("BLOCK_JOB_COMPLETED"), 0, "events: {:?}", fx.event_names());

    let written =
        tokio::time::timeout(PROMPT, held).await.expect("the guest's write still hangs after the cancel").unwrap();
    assert!(written.is_ok(), "the guest's write failed: {}", written.unwrap_err().chain());

    fx.release(mirror).await;
    assert_eq!(fx.snapshot(), before, "graph after the forced cancel");

    let data = Rng::new(77).bytes(64 * KIB as usize);
    tokio::time::timeout(
        Duration::from_secs(2),
        st.guest.write(7 * MIB, IoBuf::from_slice(&data), WriteFlags::default()),
    )
    .await
    .expect("a guest write after the job still waits for the target: the write hook is still installed")
    .unwrap();
    st.guest.flush().await.unwrap();
    assert_eq!(read_at(&st.src, 7 * MIB, data.len()), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_cancel_of_a_write_blocking_mirror_into_a_stalled_nbd_target_ends_promptly() {
    let fx = Fx::new();
    let st = stalled_pair(&fx, true).await;
    let before = fx.snapshot();
    let mut opts = MirrorOptions::new("src", "tgt");
    opts.copy_mode = CopyMode::WriteBlocking;
    let (job, mirror) = fx.start("m0", 0, opts).unwrap();
    wait_until("the first copies to reach the stalled server", Duration::from_secs(30), || st.hole.requests() > 0)
        .await;

    // A guest write now waits for the target (write-blocking mode).
    let data = Rng::new(31).bytes(64 * KIB as usize);
    let held = spawn_guest_write(&st.guest, 5 * MIB, &data);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!held.is_finished(), "the guest's write should be held by the stalled target");
    assert_eq!(job.status(), Status::Running);

    let t0 = Instant::now();
    fx.mgr.cancel("m0", true).unwrap();
    assert_cancelled_promptly(&fx, &job, mirror, t0, held, &st, &before).await;
    assert_eq!(read_at(&st.src, 5 * MIB, data.len()), data, "the held write reached the source");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_cancel_of_a_ready_mirror_whose_target_stalled_unblocks_the_guest() {
    let fx = Fx::new();
    // No flush on the wire, sync none: READY without a word from the target.
    let st = stalled_pair(&fx, false).await;
    let before = fx.snapshot();
    let mut opts = MirrorOptions::new("src", "tgt");
    opts.copy_mode = CopyMode::WriteBlocking;
    opts.sync = SyncMode::None;
    let (job, mirror) = fx.start("m0", 0, opts).unwrap();
    wait_status(&job, Status::Ready, Duration::from_secs(30)).await;
    assert_eq!(st.hole.requests(), 0);

    let data = Rng::new(32).bytes(64 * KIB as usize);
    let held = spawn_guest_write(&st.guest, MIB, &data);
    wait_until("the guest's write to reach the stalled server", Duration::from_secs(30), || st.hole.requests() > 0)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "the guest's write should be held by the stalled target");

    // block-job-cancel force=true: no completion, no pivot, and no waiting forever.
    let t0 = Instant::now();
    fx.mgr.cancel("m0", true).unwrap();
    assert_cancelled_promptly(&fx, &job, mirror, t0, held, &st, &before).await;
    assert_eq!(st.guest.node().name(), "src");
    assert_eq!(read_at(&st.src, MIB, data.len()), data, "the held write reached the source");
}
