//! The mirror job in process: copies under a concurrent writer onto a file,
//! a baton NBD export and a qemu-nbd export (judged by the real qemu-img),
//! pivot, write-blocking mode, speed and auto-converge, the error policies,
//! leaving the graph as it was, bad input, and pause/resume.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use block::drivers::blkdebug::{InjectDelay, InjectError};
use block::{Graph, IoBuf, WriteFlags};
use common::*;
use jobs::mirror::{CopyMode, MirrorError, MirrorOptions, OnError};
use jobs::{JobError, Status};
use serde_json::json;

// ---------------------------------------------------------------------------
// 1. A copy under a concurrent writer is identical and keeps holes, on three targets
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    File,
    BatonNbd,
    QemuNbd,
}

async fn mirror_under_writer_then_soft_cancel(kind: Target) {
    require_tools(&["qemu-img", "qemu-nbd"]);
    const SIZE: u64 = 256 * MIB;
    let fx = Fx::new();
    let src = fx.image("src.raw", SIZE);
    let mut rng = Rng::new(1);
    fill_extents(&src, &mut rng, 20, MIB);
    fx.add_file("src", &src).await;
    let tgt = fx.image("tgt.raw", SIZE);

    let mut qemu_nbd = None;
    let mut _baton_server = None;
    let mut _target_graph = None;
    match kind {
        Target::File => fx.add_file("tgt", &tgt).await,
        Target::BatonNbd => {
            let g2 = Arc::new(Graph::new());
            g2.blockdev_add(&json!({"driver": "file", "node-name": "disk", "filename": tgt})).await.unwrap();
            let sock = fx.path("baton.sock");
            _baton_server = Some(serve_baton_export(&g2, "disk", "disk", &sock).await);
            fx.add(json!({"driver": "nbd", "node-name": "tgt", "server": {"type": "unix", "path": sock}, "export": "disk"})).await;
            _target_graph = Some(g2);
        }
        Target::QemuNbd => {
            let sock = fx.path("qemu.sock");
            qemu_nbd = Some(QemuNbd::start(&tgt, &sock));
            fx.add(
                json!({"driver": "nbd", "node-name": "tgt", "server": {"type": "unix", "path": sock}, "export": ""}),
            )
            .await;
        }
    }

    let guest = fx.guest("src");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(guest.clone(), SIZE, 4 * KIB, 7, stop.clone(), ms(1));
    let (job, mirror) = fx.start("m0", 0, MirrorOptions::new("src", "tgt")).unwrap();
    tokio::time::sleep(ms(700)).await;
    stop.store(true, Ordering::SeqCst);
    let writes = writer.await.unwrap();
    assert!(writes >= 50, "the writer made only {writes} writes");

    wait_status(&job, Status::Ready, secs(8)).await;
    fx.mgr.cancel("m0", false).unwrap();
    fx.wait_done(&job).await;
    let written = mirror.bytes_written();

    let completed = fx.events_named("BLOCK_JOB_COMPLETED");
    assert_eq!(completed.len(), 1, "events: {:?}", fx.event_names());
    assert!(completed[0].get("error").is_none(), "{}", completed[0]);
    assert_eq!(fx.count("BLOCK_JOB_CANCELLED"), 0);
    assert_eq!(guest.node().name(), "src", "a soft cancel must not pivot");

    fx.release(mirror).await;
    if let Some(q) = qemu_nbd.as_mut() {
        q.stop();
    }
    assert_identical(&src, &tgt);
    // The source's holes are holes on the target: same data extents, same allocation.
    assert_eq!(data_map(&tgt), data_map(&src), "target's data extents differ from the source's");
    let (a_src, a_tgt) = (allocated(&src), allocated(&tgt));
    assert!(a_tgt <= a_src + MIB && a_tgt < 64 * MIB, "target allocated {a_tgt} bytes, source {a_src}");
    assert!(
        (20 * MIB / 2..SIZE / 4).contains(&written),
        "bytes_written {written} for a {SIZE}-byte image with ~20 MiB of data"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_under_writer_onto_file_is_identical_and_sparse() {
    mirror_under_writer_then_soft_cancel(Target::File).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_under_writer_onto_baton_nbd_export_is_identical_and_sparse() {
    mirror_under_writer_then_soft_cancel(Target::BatonNbd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_under_writer_onto_qemu_nbd_export_is_identical_and_sparse() {
    mirror_under_writer_then_soft_cancel(Target::QemuNbd).await;
}

// ---------------------------------------------------------------------------
// Shared set-ups
// ---------------------------------------------------------------------------

/// A `size` source with `extents` MiB of data and a sparse file target "tgt".
async fn file_pair(fx: &Fx, size: u64, extents: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = fx.image("src.raw", size);
    fill_extents(&src, &mut Rng::new(3), extents, MIB);
    fx.add_file("src", &src).await;
    let tgt = fx.image("tgt.raw", size);
    fx.add_file("tgt", &tgt).await;
    (src, tgt)
}

/// An 8 MiB source with 4 MiB of data, and a blkdebug "tgt" over file "tgtfile" with `errors` and `delays`.
async fn blkdebug_target(
    fx: &Fx,
    errors: serde_json::Value,
    delays: serde_json::Value,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = fx.image("src.raw", 8 * MIB);
    fill_range(&src, &mut Rng::new(5), 0, 4 * MIB);
    fx.add_file("src", &src).await;
    let tgt = fx.image("tgt.raw", 8 * MIB);
    fx.add_file("tgtfile", &tgt).await;
    fx.add(json!({"driver": "blkdebug", "node-name": "tgt", "image": "tgtfile", "inject-error": errors, "x-baton-inject-delay": delays})).await;
    (src, tgt)
}

/// A mirror that stays running for seconds: each target write waits 1 s, one copy in flight.
fn slow_opts() -> MirrorOptions {
    let mut o = MirrorOptions::new("src", "tgt");
    o.buf_size = o.granularity;
    o
}

async fn slow_target(fx: &Fx) -> (std::path::PathBuf, std::path::PathBuf) {
    blkdebug_target(fx, json!([]), json!([{"event": "write_aio", "ms": 1000}])).await
}

fn clear_rules(fx: &Fx, node: &str) {
    fx.graph.find(node).unwrap().blkdebug().unwrap().set_rules(Vec::new(), Vec::new());
}

fn set_rules(fx: &Fx, node: &str, errors: serde_json::Value, delays: serde_json::Value) {
    let errors: Vec<InjectError> = serde_json::from_value(errors).unwrap();
    let delays: Vec<InjectDelay> = serde_json::from_value(delays).unwrap();
    fx.graph.find(node).unwrap().blkdebug().unwrap().set_rules(errors, delays);
}

fn users_of(fx: &Fx, node: &str) -> Vec<String> {
    fx.graph.find(node).unwrap().users().into_iter().map(|u| u.name).collect()
}

// ---------------------------------------------------------------------------
// 2. Complete pivots the guest onto the target
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_pivots_guest_to_target_and_leaves_source_unused() {
    const SIZE: u64 = 32 * MIB;
    let fx = Fx::new();
    let (src, tgt) = file_pair(&fx, SIZE, 8).await;
    let guest = fx.guest("src");
    let (job, mirror) = fx.start("m0", 0, MirrorOptions::new("src", "tgt")).unwrap();
    wait_status(&job, Status::Ready, secs(30)).await;

    // Written while READY, before complete: must reach the target too.
    let before = Rng::new(11).bytes(64 * KIB as usize);
    guest.write(3 * MIB, IoBuf::from_slice(&before), WriteFlags::default()).await.unwrap();
    fx.mgr.complete("m0").unwrap();
    fx.wait_done(&job).await;

    assert_eq!(guest.node().name(), "tgt", "the guest was not moved to the target");
    assert_eq!(read_at(&tgt, 3 * MIB, before.len()), before, "a write made while READY is missing on the target");
    fx.release(mirror).await;
    assert_identical(&src, &tgt);

    let after = Rng::new(12).bytes(64 * KIB as usize);
    let off = 5 * MIB + 4 * KIB;
    guest.write(off, IoBuf::from_slice(&after), WriteFlags::default()).await.unwrap();
    assert_eq!(read_at(&tgt, off, after.len()), after, "a write after the pivot did not land in the target file");
    assert_ne!(read_at(&src, off, after.len()), after, "a write after the pivot reached the source");

    let completed = fx.events_named("BLOCK_JOB_COMPLETED");
    assert_eq!(completed.len(), 1);
    assert!(completed[0].get("error").is_none(), "{}", completed[0]);
    assert!(fx.mgr.jobs().is_empty(), "{:?}", fx.job_list());
    assert_eq!(job.status(), Status::Null);
    assert!(fx.graph.find("src").unwrap().bitmaps().is_empty());
    assert_eq!(users_of(&fx, "tgt"), vec!["guest".to_string()], "the target's users after the pivot");
    assert!(users_of(&fx, "src").is_empty(), "source users after the pivot: {:?}", users_of(&fx, "src"));
    // Nothing of the job is left on the source: it can be deleted.
    fx.graph.blockdev_del("src").await.unwrap();
}

// ---------------------------------------------------------------------------
// 3. Write-blocking mode
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_blocking_mode_puts_each_guest_write_on_target_before_it_returns() {
    const SIZE: u64 = 32 * MIB;
    let fx = Fx::new();
    let (src, tgt) = file_pair(&fx, SIZE, 8).await;
    let guest = fx.guest("src");
    let mut opts = MirrorOptions::new("src", "tgt");
    opts.copy_mode = CopyMode::WriteBlocking;
    let (job, m) = fx.start("m0", 0, opts).unwrap();
    wait_status(&job, Status::Ready, secs(30)).await;
    let q = fx.mgr.query_block_jobs();
    assert_eq!(q[0]["actively-synced"], json!(true), "{q}");

    let mut rng = Rng::new(21);
    for i in 0..60u64 {
        // 4 KiB writes anywhere, whole-granule writes, and writes across a granule boundary.
        let (off, len) = match i % 3 {
            0 => (rng.below(SIZE / (4 * KIB)) * 4 * KIB, 4 * KIB),
            1 => (rng.below(SIZE / (64 * KIB)) * 64 * KIB, 64 * KIB),
            _ => ((rng.below(SIZE / (64 * KIB) - 1) + 1) * 64 * KIB - 8 * KIB, 16 * KIB),
        };
        let data = rng.bytes(len as usize);
        guest.write(off, IoBuf::from_slice(&data), WriteFlags::default()).await.unwrap();
        assert_eq!(
            read_at(&tgt, off, len as usize),
            data,
            "write {i} at {off}+{len} not on the target when it returned"
        );
    }
    wait_until("actively-synced again", secs(3), || fx.mgr.query_block_jobs()[0]["actively-synced"] == json!(true))
        .await;
    fx.mgr.cancel("m0", false).unwrap();
    fx.wait_done(&job).await;
    fx.release(m).await;
    assert_identical(&src, &tgt);
}

// ---------------------------------------------------------------------------
// 4. Speed limit, no convergence, auto-converge
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speed_limit_caps_the_copy_rate() {
    const SIZE: u64 = 32 * MIB;
    let fx = Fx::new();
    let src = fx.image("src.raw", SIZE);
    fill_range(&src, &mut Rng::new(8), 0, SIZE);
    fx.add_file("src", &src).await;
    let tgt = fx.image("tgt.raw", SIZE);
    fx.add_file("tgt", &tgt).await;
    let (job, mirror) = fx.start("m0", 2 * MIB, MirrorOptions::new("src", "tgt")).unwrap();
    tokio::time::sleep(secs(2)).await;
    let (done, written) = (job.progress.load(Ordering::SeqCst), mirror.bytes_written());
    fx.mgr.cancel("m0", true).unwrap();
    fx.wait_done(&job).await;
    // 2 s at 2 MiB/s, plus one 1 MiB chunk of slack per second.
    assert!(written > 0, "nothing copied");
    assert!(written <= 7 * MIB, "speed 2 MiB/s but {written} bytes written ({done} progress) in 2 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_mirror_does_not_converge_under_fast_writer_until_auto_converge() {
    const SIZE: u64 = 8 * MIB;
    let fx = Fx::new();
    let (src, tgt) = file_pair(&fx, SIZE, 4).await;
    let guest = fx.guest("src");

    // Background mode, 1 MiB/s, a writer dirtying far faster: never READY.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(guest.clone(), SIZE, 64 * KIB, 31, stop.clone(), ms(0));
    let (job, _m) = fx.start("m0", MIB, MirrorOptions::new("src", "tgt")).unwrap();
    tokio::time::sleep(secs(3)).await;
    assert_eq!(job.status(), Status::Running);
    assert_eq!(fx.count("BLOCK_JOB_READY"), 0, "a 1 MiB/s mirror converged under a fast writer");
    assert_eq!(fx.count("X_BATON_BLOCK_JOB_COPY_MODE_CHANGED"), 0);
    fx.mgr.cancel("m0", true).unwrap();
    fx.wait_done(&job).await;
    fx.release(_m).await;

    // The same with auto-converge: switches to write-blocking and gets READY while the writer runs.
    let mut opts = MirrorOptions::new("src", "tgt");
    opts.auto_converge = true;
    opts.converge_after = ms(500);
    let (job, m) = fx.start("m1", MIB, opts).unwrap();
    wait_until("X_BATON_BLOCK_JOB_COPY_MODE_CHANGED", secs(6), || fx.count("X_BATON_BLOCK_JOB_COPY_MODE_CHANGED") > 0)
        .await;
    let ev = &fx.events_named("X_BATON_BLOCK_JOB_COPY_MODE_CHANGED")[0];
    assert_eq!(ev["device"], json!("m1"));
    assert_eq!(ev["copy-mode"], json!("write-blocking"));
    wait_status(&job, Status::Ready, secs(30)).await;
    assert!(!writer.is_finished(), "the writer stopped");
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    fx.mgr.cancel("m1", false).unwrap();
    fx.wait_done(&job).await;
    fx.release(m).await;
    assert_identical(&src, &tgt);
}

// ---------------------------------------------------------------------------
// 5. I/O errors under each policy
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_write_error_with_report_fails_the_job() {
    let fx = Fx::new();
    blkdebug_target(&fx, json!([{"event": "write_aio", "errno": 5}]), json!([])).await;
    let (job, _m) = fx.start("m0", 0, MirrorOptions::new("src", "tgt")).unwrap();
    fx.wait_done(&job).await;
    let errs = fx.events_named("BLOCK_JOB_ERROR");
    assert!(!errs.is_empty(), "events: {:?}", fx.event_names());
    assert_eq!(errs[0], json!({"device": "m0", "operation": "write", "action": "report"}));
    let completed = fx.events_named("BLOCK_JOB_COMPLETED");
    assert_eq!(completed.len(), 1, "events: {:?}", fx.event_names());
    assert!(completed[0]["error"].as_str().is_some_and(|e| !e.is_empty()), "{}", completed[0]);
    assert_eq!(fx.count("BLOCK_JOB_READY"), 0);
    assert!(fx.mgr.jobs().is_empty(), "{:?}", fx.job_list());
    assert_eq!(job.status(), Status::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_write_error_with_ignore_retries_until_it_succeeds() {
    let fx = Fx::new();
    let (src, tgt) = blkdebug_target(&fx, json!([]), json!([])).await;
    set_rules(&fx, "tgt", json!([{"event": "write_aio", "errno": 5}]), json!([]));
    let mut opts = MirrorOptions::new("src", "tgt");
    opts.on_target_error = OnError::Ignore;
    let (job, m) = fx.start("m0", 0, opts).unwrap();
    wait_until("3 BLOCK_JOB_ERROR", secs(30), || fx.count("BLOCK_JOB_ERROR") >= 3).await;
    assert!(fx
        .events_named("BLOCK_JOB_ERROR")
        .iter()
        .all(|e| *e == json!({"device": "m0", "operation": "write", "action": "ignore"})));
    assert_eq!(job.status(), Status::Running);
    clear_rules(&fx, "tgt");
    wait_status(&job, Status::Ready, secs(30)).await;
    fx.mgr.cancel("m0", false).unwrap();
    fx.wait_done(&job).await;
    let completed = fx.events_named("BLOCK_JOB_COMPLETED");
    assert!(completed.len() == 1 && completed[0].get("error").is_none(), "{completed:?}");
    fx.release(m).await;
    assert_identical(&src, &tgt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_write_error_with_stop_pauses_until_resumed() {
    let fx = Fx::new();
    let (src, tgt) = blkdebug_target(&fx, json!([{"event": "write_aio", "errno": 5}]), json!([])).await;
    let mut opts = MirrorOptions::new("src", "tgt");
    opts.on_target_error = OnError::Stop;
    let (job, m) = fx.start("m0", 0, opts).unwrap();
    wait_status(&job, Status::Paused, secs(30)).await;
    let errs = fx.events_named("BLOCK_JOB_ERROR");
    assert!(!errs.is_empty());
    assert!(errs.iter().all(|e| *e == json!({"device": "m0", "operation": "write", "action": "stop"})), "{errs:?}");
    let n = errs.len();
    tokio::time::sleep(ms(500)).await;
    assert_eq!(job.status(), Status::Paused, "a job stopped on error resumed by itself");
    assert_eq!(fx.count("BLOCK_JOB_ERROR"), n, "a stopped job kept retrying");
    let q = fx.mgr.query_block_jobs();
    assert_eq!(q[0]["paused"], json!(true), "{q}");

    clear_rules(&fx, "tgt");
    fx.mgr.resume("m0").unwrap();
    wait_status(&job, Status::Ready, secs(30)).await;
    fx.mgr.cancel("m0", false).unwrap();
    fx.wait_done(&job).await;
    fx.release(m).await;
    assert_identical(&src, &tgt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_read_error_with_report_fails_the_job() {
    let fx = Fx::new();
    let src = fx.image("src.raw", 8 * MIB);
    fill_range(&src, &mut Rng::new(5), 0, 4 * MIB);
    fx.add_file("srcfile", &src).await;
    fx.add(json!({"driver": "blkdebug", "node-name": "src", "image": "srcfile", "inject-error": [{"event": "read_aio", "errno": 5}]})).await;
    let tgt = fx.image("tgt.raw", 8 * MIB);
    fx.add_file("tgt", &tgt).await;
    let (job, _m) = fx.start("m0", 0, MirrorOptions::new("src", "tgt")).unwrap();
    fx.wait_done(&job).await;
    let errs = fx.events_named("BLOCK_JOB_ERROR");
    assert!(!errs.is_empty(), "events: {:?}", fx.event_names());
    assert_eq!(errs[0], json!({"device": "m0", "operation": "read", "action": "report"}));
    let completed = fx.events_named("BLOCK_JOB_COMPLETED");
    assert!(completed.len() == 1 && completed[0]["error"].is_string(), "{completed:?}");
    assert!(fx.mgr.jobs().is_empty(), "{:?}", fx.job_list());
}

// ---------------------------------------------------------------------------
// 6. Cancel and failure leave the graph as it was
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_cancel_before_ready_leaves_graph_as_before() {
    let fx = Fx::new();
    let (_src, tgt) = slow_target(&fx).await;
    let guest = fx.guest("src");
    let before = fx.snapshot();
    let mut opts = slow_opts();
    opts.copy_mode = CopyMode::WriteBlocking;
    let (job, mirror) = fx.start("m0", 0, opts).unwrap();
    tokio::time::sleep(ms(200)).await;
    assert_eq!(job.status(), Status::Running);
    assert_ne!(fx.snapshot(), before, "the job should be a user of its nodes while it runs");
    fx.mgr.cancel("m0", false).unwrap();
    fx.wait_done(&job).await;
    assert_eq!(fx.count("BLOCK_JOB_CANCELLED"), 1, "events: {:?}", fx.event_names());
    assert_eq!(fx.count("BLOCK_JOB_COMPLETED"), 0);
    assert!(fx.mgr.jobs().is_empty(), "{:?}", fx.job_list());

    // The write hook is gone: a guest write no longer reaches the target.
    let data = Rng::new(41).bytes(64 * KIB as usize);
    guest.write(6 * MIB, IoBuf::from_slice(&data), WriteFlags::default()).await.unwrap();
    assert_ne!(read_at(&tgt, 6 * MIB, data.len()), data, "a cancelled write-blocking mirror still copies guest writes");

    fx.release(mirror).await;
    assert_eq!(fx.snapshot(), before, "graph after the cancel");

    clear_rules(&fx, "tgt");
    let (job, _m) = fx.start("m0", 0, MirrorOptions::new("src", "tgt")).unwrap();
    wait_status(&job, Status::Ready, secs(30)).await;
    fx.mgr.cancel("m0", false).unwrap();
    fx.wait_done(&job).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_mirror_leaves_graph_as_before_and_a_second_one_works() {
    let fx = Fx::new();
    let (src, tgt) = blkdebug_target(&fx, json!([{"event": "write_aio", "errno": 5}]), json!([])).await;
    let _guest = fx.guest("src");
    fx.graph.bitmap_add("src", "b0", None, false).unwrap();
    let before = fx.snapshot();
    let (job, mirror) = fx.start("m0", 0, MirrorOptions::new("src", "tgt")).unwrap();
    fx.wait_done(&job).await;
    assert!(fx.events_named("BLOCK_JOB_COMPLETED")[0]["error"].is_string());
    fx.release(mirror).await;
    assert_eq!(fx.snapshot(), before);
    assert!(users_of(&fx, "tgt").is_empty());

    clear_rules(&fx, "tgt");
    let (job, m) = fx.start("m0", 0, MirrorOptions::new("src", "tgt")).unwrap();
    wait_status(&job, Status::Ready, secs(30)).await;
    fx.mgr.cancel("m0", false).unwrap();
    fx.wait_done(&job).await;
    fx.release(m).await;
    assert_identical(&src, &tgt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_paused_mirror_concludes_it() {
    let fx = Fx::new();
    slow_target(&fx).await;
    let (job, _m) = fx.start("m0", 0, slow_opts()).unwrap();
    fx.mgr.pause("m0").unwrap();
    wait_status(&job, Status::Paused, secs(3)).await;
    fx.mgr.cancel("m0", false).unwrap();
    let done = tokio::time::timeout(secs(5), job.wait_finished()).await.is_ok();
    let statuses: Vec<String> =
        fx.events_named("JOB_STATUS_CHANGE").iter().map(|e| e["status"].as_str().unwrap().to_string()).collect();
    assert!(
        done,
        "cancel of a paused job: still {:?} after 5 s; statuses {statuses:?}; events {:?}; jobs {:?}",
        job.status(),
        fx.event_names(),
        fx.job_list()
    );
    assert_eq!(fx.count("BLOCK_JOB_CANCELLED"), 1, "events: {:?}", fx.event_names());
    wait_until("auto-dismiss", secs(1), || fx.mgr.jobs().is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_mirror_stopped_on_error_concludes_it() {
    let fx = Fx::new();
    blkdebug_target(&fx, json!([{"event": "write_aio", "errno": 5}]), json!([])).await;
    let before = fx.snapshot();
    let mut opts = MirrorOptions::new("src", "tgt");
    opts.on_target_error = OnError::Stop;
    let (job, mirror) = fx.start("m0", 0, opts).unwrap();
    wait_status(&job, Status::Paused, secs(30)).await;
    fx.mgr.cancel("m0", false).unwrap();
    fx.wait_done(&job).await;
    assert_eq!(fx.count("BLOCK_JOB_CANCELLED"), 1, "events: {:?}", fx.event_names());
    fx.release(mirror).await;
    assert_eq!(fx.snapshot(), before);
}

// ---------------------------------------------------------------------------
// 7. Bad input changes nothing
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mirror_requests_fail_and_change_nothing() {
    let fx = Fx::new();
    slow_target(&fx).await;
    let odd = fx.image("odd.raw", 8 * MIB + 4 * KIB);
    fx.add_file("odd", &odd).await;
    let plain = fx.image("plain.raw", 8 * MIB);
    fx.add_file("plain", &plain).await;
    let _guest = fx.guest("src");
    let (job, _m) = fx.start("m0", 0, slow_opts()).unwrap();
    tokio::time::sleep(ms(100)).await;

    let state = |fx: &Fx| (fx.job_list(), fx.snapshot(), fx.events.lock().unwrap().len());
    let s0 = state(&fx);
    assert_eq!(s0.0, vec![("m0".to_string(), Status::Running)]);

    let e = fx.start("m1", 0, MirrorOptions::new("plain", "plain")).unwrap_err();
    assert!(matches!(e, MirrorError::SameNode(_)), "{e}");
    assert_eq!(state(&fx), s0, "mirror onto itself");

    let e = fx.start("m1", 0, MirrorOptions::new("plain", "odd")).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&(8 * MIB).to_string()) && msg.contains(&(8 * MIB + 4 * KIB).to_string()), "{msg}");
    assert_eq!(state(&fx), s0, "different sizes");

    fx.graph.set_active(Some("plain"), false).await.unwrap();
    let s_inactive = state(&fx);
    let e = fx.start("m1", 0, MirrorOptions::new("plain", "tgtfile")).unwrap_err();
    assert!(matches!(e, MirrorError::Inactive(ref n) if n == "plain"), "{e}");
    assert_eq!(state(&fx), s_inactive, "inactive source");
    let plain2 = fx.image("plain2.raw", 8 * MIB);
    fx.add_file("plain2", &plain2).await;
    let s_inactive = state(&fx);
    let e = fx.start("m1", 0, MirrorOptions::new("plain2", "plain")).unwrap_err();
    assert!(matches!(e, MirrorError::Inactive(ref n) if n == "plain"), "{e}");
    assert_eq!(state(&fx), s_inactive, "inactive target");
    fx.graph.set_active(Some("plain"), true).await.unwrap();
    let s0 = state(&fx);

    let e = fx.start("m0", 0, MirrorOptions::new("plain2", "plain")).unwrap_err();
    assert!(matches!(e, MirrorError::Job(JobError::Exists(_))), "{e}");
    assert_eq!(state(&fx), s0, "existing job id");

    assert!(matches!(fx.mgr.complete("m0"), Err(JobError::BadVerb { .. })));
    assert_eq!(state(&fx), s0, "complete before READY");
    assert!(!job.complete_requested());
    assert_eq!(fx.mgr.resume("m0"), Err(JobError::NotPaused));
    assert_eq!(state(&fx), s0, "resume of a running job");
    assert!(matches!(fx.mgr.dismiss("m0"), Err(JobError::BadVerb { .. })));
    assert_eq!(state(&fx), s0, "dismiss of a running job");
    assert!(matches!(fx.mgr.cancel("nope", false), Err(JobError::NotFound(_))));
    assert_eq!(state(&fx), s0, "cancel of an unknown job");

    // The job was not disturbed: it still gets READY and completes.
    clear_rules(&fx, "tgt");
    wait_status(&job, Status::Ready, secs(30)).await;
    fx.mgr.cancel("m0", false).unwrap();
    fx.wait_done(&job).await;
    assert_eq!(fx.count("BLOCK_JOB_COMPLETED"), 1);
}

// ---------------------------------------------------------------------------
// 8. Pause and resume
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_a_running_then_a_ready_mirror() {
    let fx = Fx::new();
    let (src, tgt) = slow_target(&fx).await;
    let (job, m) = fx.start("m0", 0, slow_opts()).unwrap();
    tokio::time::sleep(ms(100)).await;
    fx.mgr.pause("m0").unwrap();
    assert_eq!(fx.mgr.pause("m0"), Err(JobError::AlreadyPaused));
    wait_status(&job, Status::Paused, secs(3)).await;
    clear_rules(&fx, "tgt");
    let p = job.progress.load(Ordering::SeqCst);
    tokio::time::sleep(ms(300)).await;
    assert_eq!(job.status(), Status::Paused);
    assert_eq!(job.progress.load(Ordering::SeqCst), p, "a paused job made progress");
    fx.mgr.resume("m0").unwrap();
    wait_status(&job, Status::Ready, secs(30)).await;

    fx.mgr.pause("m0").unwrap();
    wait_status(&job, Status::Standby, secs(3)).await;
    fx.mgr.resume("m0").unwrap();
    wait_status(&job, Status::Ready, secs(3)).await;
    let statuses: Vec<String> =
        fx.events_named("JOB_STATUS_CHANGE").iter().map(|e| e["status"].as_str().unwrap().to_string()).collect();
    assert_eq!(statuses, ["created", "running", "paused", "running", "ready", "standby", "ready"]);
    fx.mgr.cancel("m0", false).unwrap();
    fx.wait_done(&job).await;
    fx.release(m).await;
    assert_identical(&src, &tgt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_cancel_of_a_paused_ready_mirror_still_completes() {
    let fx = Fx::new();
    let (src, tgt) = file_pair(&fx, 8 * MIB, 2).await;
    let (job, m) = fx.start("m0", 0, MirrorOptions::new("src", "tgt")).unwrap();
    wait_status(&job, Status::Ready, secs(30)).await;
    fx.mgr.pause("m0").unwrap();
    wait_status(&job, Status::Standby, secs(3)).await;
    fx.mgr.cancel("m0", false).unwrap();
    fx.wait_done(&job).await;
    // QEMU: mirror_cancel treats STANDBY as ready, so force=false is a soft cancel.
    assert_eq!(fx.count("BLOCK_JOB_COMPLETED"), 1, "events: {:?}", fx.event_names());
    assert_eq!(fx.count("BLOCK_JOB_CANCELLED"), 0);
    fx.release(m).await;
    assert_identical(&src, &tgt);
}

// ---------------------------------------------------------------------------
// The ended job lets go of its nodes
// ---------------------------------------------------------------------------

/// QEMU drops the job's BlockBackends in commit/abort, before BLOCK_JOB_COMPLETED
/// or BLOCK_JOB_CANCELLED: a manager may `blockdev-del` the target on the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_job_detaches_from_its_nodes_before_its_end_event() {
    let fx = Fx::new();
    file_pair(&fx, 8 * MIB, 2).await;
    let _guest = fx.guest("src");
    // Completed (pivot), with the stats handle dropped at once as QMP does.
    let (job, m) = fx.start("m0", 0, MirrorOptions::new("src", "tgt")).unwrap();
    drop(m);
    wait_status(&job, Status::Ready, secs(30)).await;
    fx.mgr.complete("m0").unwrap();
    fx.wait_done(&job).await;
    let at_end = fx.users_at_end.lock().unwrap().clone();
    assert_eq!(at_end.len(), 1, "{at_end:?}");
    for (event, nodes) in &at_end {
        for (node, users) in nodes {
            assert!(
                !users.iter().any(|u| u.starts_with("job ")),
                "at {event}, node '{node}' still had users {users:?}"
            );
        }
    }
    // So a manager can start the next job (here: back onto the old source) on the event.
    let (job, m) = fx
        .start("m1", 0, MirrorOptions::new("tgt", "src"))
        .expect("a mirror started right after the previous one ended");
    drop(m);
    fx.mgr.cancel("m1", true).unwrap();
    fx.wait_done(&job).await;
    let at_end = fx.users_at_end.lock().unwrap().clone();
    for (event, nodes) in &at_end {
        for (node, users) in nodes {
            assert!(
                !users.iter().any(|u| u.starts_with("job ")),
                "at {event}, node '{node}' still had users {users:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_stats_handle_does_not_keep_the_ended_job_on_its_nodes() {
    let fx = Fx::new();
    let (_src, tgt) = file_pair(&fx, 8 * MIB, 2).await;
    let (job, mirror) = fx.start("m0", 0, MirrorOptions::new("src", "tgt")).unwrap();
    wait_status(&job, Status::Ready, secs(30)).await;
    fx.mgr.cancel("m0", false).unwrap();
    fx.wait_done(&job).await;
    let t0 = std::time::Instant::now();
    while !fx.job_users().is_empty() && t0.elapsed() < secs(1) {
        tokio::time::sleep(ms(10)).await;
    }
    assert!(fx.job_users().is_empty(), "1 s after the job ended, with its Mirror handle alive: {:?}", fx.job_users());
    let (ok, text) = qemu_img_compare(&_src, &tgt);
    assert!(ok, "the target is still locked by the ended job: {text}");
    assert!(mirror.bytes_written() > 0);
}
