#![cfg(feature = "failpoints")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Every inactivation step, failed on purpose through its failpoint, leaves
//! every node active and the image locks held; the next attempt succeeds.

use std::sync::Arc;

use block::{Graph, PermSet};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_inactivation_failpoint_rolls_back_everything() {
    let dir = tempfile::tempdir().unwrap();
    let g = Arc::new(Graph::new());
    for k in 0..3 {
        let p = dir.path().join(format!("d{k}.img"));
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        g.blockdev_add(&json!({"driver": "file", "node-name": format!("f{k}"), "filename": p})).await.unwrap();
        g.blockdev_add(&json!({"driver": "raw", "node-name": format!("r{k}"), "file": format!("f{k}")})).await.unwrap();
    }
    let _guest = g.attach("r1", "guest", PermSet::GUEST_WRITER, true).unwrap();
    let locked = || g.find("f1").unwrap().file().unwrap().held_lock().is_some_and(|(p, _)| !p.is_empty());
    assert!(locked());
    for fp in ["block::inactivate-all::after-drain", "block::inactivate-all::after-flush"] {
        fail::cfg(fp, "return").unwrap();
        let e = g.inactivate_all().await.unwrap_err();
        assert!(e.to_string().contains("injected"), "{fp}: {e}");
        assert!(g.nodes().iter().all(|n| n.is_active()), "{fp}: every node active again");
        assert!(locked(), "{fp}: the lock is still held");
        fail::remove(fp);
    }
    g.inactivate_all().await.unwrap();
    assert!(!locked());
    fail::cfg("block::activate", "return").unwrap();
    let e = g.activate_all().await.unwrap_err();
    assert!(e.to_string().contains("activating node"), "{e}");
    fail::remove("block::activate");
    g.activate_all().await.unwrap();
    assert!(locked() && g.nodes().iter().all(|n| n.is_active()));
}
