#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The guest workload on a real file-backed disk, through the block graph.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use block::{Graph, PermSet};
use serde_json::{json, Value};
use vmm::{RunState, Vm, VmConfig};

type Events = Arc<Mutex<Vec<(String, Value)>>>;

fn kvm_or_skip() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("skipped: /dev/kvm is missing on this machine");
    false
}

async fn vm_on_file(disk_mb: u64, extra: Value, cfg: VmConfig) -> (Arc<Graph>, Arc<Vm>, tempfile::TempDir, std::path::PathBuf, Events) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("disk.img");
    std::fs::File::create(&p).unwrap().set_len(disk_mb << 20).unwrap();
    let g = Arc::new(Graph::new());
    g.blockdev_add(&json!({"driver": "file", "node-name": "file0", "filename": p})).await.unwrap();
    let mut top = json!({"driver": "blkdebug", "node-name": "disk0", "image": "file0"});
    if let (Some(o), Some(e)) = (top.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    g.blockdev_add(&top).await.unwrap();
    let be = g.attach("disk0", "guest disk", PermSet::GUEST_WRITER, true).unwrap();
    let events: Events = Arc::default();
    let ev = events.clone();
    let vm = Vm::new(cfg, be, tokio::runtime::Handle::current(), Arc::new(move |n: &str, d| ev.lock().unwrap().push((n.to_string(), d))), false).unwrap();
    (g, vm, dir, p, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_writes_and_checks_itself_and_stop_freezes_disk_and_counters() {
    if !kvm_or_skip() {
        return;
    }
    let (_g, vm, _d, path, events) = vm_on_file(16, json!({}), VmConfig::default()).await;
    assert_eq!(vm.state(), RunState::Prelaunch);
    vm.cont().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = vm.stats();
    assert!(s.writes > 0 && s.checks > 0, "the guest made progress: {s:?}");
    assert_eq!(s.mismatches, 0, "{s:?}");
    assert_eq!(s.io_errors, 0, "{s:?}");
    let v = vm.verify(Duration::from_secs(60)).await.unwrap();
    assert!(v.checked > 0 && v.bad == 0, "{v:?}");

    let took = vm.stop().await.unwrap();
    eprintln!("stop took {took:?}");
    assert_eq!(vm.state(), RunState::Paused);
    assert!(!vm.vcpus_in_run(), "no vCPU in KVM_RUN after stop");
    assert_eq!(vm.device().in_flight(), 0, "device drained");
    let frozen = vm.stats();
    let disk = std::fs::read(&path).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(vm.stats(), frozen, "counters do not move while stopped");
    assert!(std::fs::read(&path).unwrap() == disk, "the disk does not change while stopped");

    vm.cont().await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(vm.stats().writes > frozen.writes, "cont resumes the guest");
    vm.shutdown().await;
    let names: Vec<String> = events.lock().unwrap().iter().map(|(n, _)| n.clone()).collect();
    assert!(names.contains(&"STOP".to_string()) && names.contains(&"RESUME".to_string()), "{names:?}");
}
