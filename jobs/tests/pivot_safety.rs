#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `job-complete` must never move users onto a target that missed data.

use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{Graph, IoBuf, PermSet, WriteFlags};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_with_a_failing_target_fails_the_job_and_keeps_the_guest_on_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt) = (dir.path().join("s.img"), dir.path().join("t.img"));
    for p in [&src, &tgt] {
        std::fs::File::create(p).unwrap().set_len(8 << 20).unwrap();
    }
    let g = Arc::new(Graph::new());
    g.blockdev_add(&json!({"driver": "file", "node-name": "src", "filename": src})).await.unwrap();
    g.blockdev_add(&json!({"driver": "file", "node-name": "tfile", "filename": tgt})).await.unwrap();
    g.blockdev_add(&json!({"driver": "blkdebug", "node-name": "tgt", "image": "tfile"})).await.unwrap();
    let guest = g.attach("src", "guest", PermSet::GUEST_WRITER, true).unwrap();
    guest.write(0, IoBuf::from_slice(&[7u8; 65536]), WriteFlags::default()).await.unwrap();
    let events = Arc::new(std::sync::Mutex::new(Vec::<(String, serde_json::Value)>::new()));
    let ev = events.clone();
    let mgr = jobs::JobManager::new(Arc::new(move |n: &str, d| ev.lock().unwrap().push((n.to_string(), d))));
    let (job, _m) = jobs::mirror::start(
        &g,
        &mgr,
        jobs::JobOptions { id: "m0".into(), speed: 0, auto_finalize: true, auto_dismiss: true },
        jobs::mirror::MirrorOptions::new("src", "tgt"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while job.status() != jobs::Status::Ready {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The target starts failing, the guest dirties more data, then complete.
    let rules = serde_json::from_value(json!([{"event": "write_aio", "errno": 5}])).unwrap();
    g.find("tgt").unwrap().blkdebug().unwrap().set_rules(rules, vec![]);
    guest.write(1 << 20, IoBuf::from_slice(&[9u8; 65536]), WriteFlags::default()).await.unwrap();
    mgr.complete("m0").unwrap();
    job.wait_finished().await;
    assert_eq!(guest.node().name(), "src", "no pivot onto a target that missed a write");
    let evs = events.lock().unwrap();
    let done = evs.iter().find(|(n, _)| n == "BLOCK_JOB_COMPLETED").expect("a completion event");
    assert!(done.1.get("error").is_some(), "the job reports the failure: {:?}", done.1);
}
