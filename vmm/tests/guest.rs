#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The guest workload on a real file-backed disk, through the block graph.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use block::{Graph, PermSet};
use common::kvm_or_skip;
use serde_json::{json, Value};
use vmm::{RunState, Vm, VmConfig};

type Events = Arc<Mutex<Vec<(String, Value)>>>;

async fn vm_on_file(
    disk_mb: u64,
    extra: Value,
    cfg: VmConfig,
) -> (Arc<Graph>, Arc<Vm>, tempfile::TempDir, std::path::PathBuf, Events) {
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
    let vm = Vm::new(
        cfg,
        be,
        tokio::runtime::Handle::current(),
        Arc::new(move |n: &str, d| ev.lock().unwrap().push((n.to_string(), d))),
        false,
    )
    .unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_dma_into_guest_ram_shows_in_the_dirty_log() {
    if !kvm_or_skip() {
        return;
    }
    // No dirtying by the guest's own RAM loop: only its stack/counters and the device.
    let cfg = VmConfig { dirty_pages: 0, ..VmConfig::default() };
    let (_g, vm, _d, _p, _e) = vm_on_file(8, json!({}), cfg).await;
    let _ = vm.take_dirty_log().unwrap();
    // A DMA write by the device path (vm-memory) into a page the guest never touches.
    let page = 3000u64;
    use vm_memory::Bytes;
    vm.memory().write_obj(0xdead_beef_u32, vm_memory::GuestAddress(page * 4096)).unwrap();
    let log = vm.take_dirty_log().unwrap();
    assert!(log[(page / 64) as usize] & (1 << (page % 64)) != 0, "the page the VMM wrote is dirty");
    assert_eq!(vmm::memory::count(&log), 1, "nothing else ran, only that page");
    let log = vm.take_dirty_log().unwrap();
    assert_eq!(vmm::memory::count(&log), 0, "a pass resets the log");
    // Now let the guest run: the device's read completions land in the buffers and the ring.
    vm.cont().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    vm.stop().await.unwrap();
    let log = vm.take_dirty_log().unwrap();
    let dirty = |addr: u64| log[(addr / 4096 / 64) as usize] & (1 << ((addr / 4096) % 64)) != 0;
    assert!(dirty(vmm::layout::RING), "completions written by the device mark the ring page");
    assert!(dirty(vmm::layout::CHECK_BUF), "read DMA marks the guest's check buffer");
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_write_error_reaches_the_guest_as_an_error_status() {
    if !kvm_or_skip() {
        return;
    }
    let (g, vm, _d, _p, events) = vm_on_file(8, json!({}), VmConfig::default()).await;
    vm.cont().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rules = serde_json::from_value(json!([{"event": "write_aio", "errno": 5}])).unwrap();
    g.find("disk0").unwrap().blkdebug().unwrap().set_rules(rules, vec![]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    g.find("disk0").unwrap().blkdebug().unwrap().set_rules(vec![], vec![]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = vm.stats();
    assert!(s.io_errors > 0, "the guest saw I/O errors: {s:?}");
    assert_eq!(s.mismatches, 0, "failed writes never corrupt the guest's view: {s:?}");
    assert!(vm.device().errors.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert!(vm.device().last_error().unwrap().contains("blkdebug"), "{:?}", vm.device().last_error());
    assert!(
        events.lock().unwrap().iter().any(|(n, d)| n == "BLOCK_IO_ERROR" && d["operation"] == "write"),
        "reported as an event"
    );
    let v = vm.verify(Duration::from_secs(60)).await.unwrap();
    assert_eq!(v.bad, 0, "{v:?}");
    assert_eq!(vm.state(), RunState::Running, "the guest keeps running");
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_io_marks_bitmaps_and_a_mirror_copies_the_running_guests_disk() {
    if !kvm_or_skip() {
        return;
    }
    let (g, vm, dir, src, _events) = vm_on_file(16, json!({}), VmConfig::default()).await;
    let bm = g.bitmap_add("disk0", "b0", None, false).unwrap();
    let tgt = dir.path().join("target.img");
    std::fs::File::create(&tgt).unwrap().set_len(16 << 20).unwrap();
    g.blockdev_add(&json!({"driver": "file", "node-name": "tgt", "filename": tgt})).await.unwrap();
    vm.cont().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(bm.count_bytes() > 0, "the guest's writes mark the node's bitmap");

    let mgr = jobs::JobManager::new(Arc::new(|_: &str, _| {}));
    let (job, _m) = jobs::mirror::start(
        &g,
        &mgr,
        jobs::JobOptions { id: "m0".into(), speed: 0, auto_finalize: true, auto_dismiss: true },
        jobs::mirror::MirrorOptions::new("disk0", "tgt"),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while job.status() != jobs::Status::Ready {
        assert!(std::time::Instant::now() < deadline, "mirror never became ready: {:?}", job.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Keep the guest writing while READY, then stop it and cancel: a point-in-time copy.
    tokio::time::sleep(Duration::from_millis(500)).await;
    vm.stop().await.unwrap();
    mgr.cancel("m0", false).unwrap();
    job.wait_finished().await;
    // -U: the guest still holds its disk (paused), as a QEMU guest would.
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&tgt)
        .output()
        .unwrap();
    assert!(out.status.success(), "{} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_an_inactivated_disk_complete_with_an_error_status_not_a_panic() {
    if !kvm_or_skip() {
        return;
    }
    let (g, vm, _d, path, _events) = vm_on_file(8, json!({}), VmConfig::default()).await;
    vm.cont().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The guest disk allows inactivation (as a QEMU device does); its writes then fail with EPERM.
    g.inactivate_all().await.unwrap();
    let before = std::fs::read(&path).unwrap();
    let errors_before = vm.stats().io_errors;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(vm.stats().io_errors > errors_before, "the guest saw error statuses");
    assert!(std::fs::read(&path).unwrap() == before, "nothing reached the inactive disk");
    assert!(vm.device().last_error().unwrap().contains("inactive"), "{:?}", vm.device().last_error());
    g.activate_all().await.unwrap();
    let v = vm.verify(Duration::from_secs(60)).await.unwrap();
    assert_eq!(v.bad, 0, "{v:?}");
    vm.shutdown().await;
    // I2: a stopped guest cannot be continued on an inactive disk.
    g.inactivate_all().await.unwrap();
    let e = vm.cont().await.unwrap_err();
    assert!(e.to_string().contains("inactive"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vcpus_keep_running_across_repeated_stop_and_cont() {
    if !kvm_or_skip() {
        return;
    }
    let cfg = VmConfig { vcpus: 2, ..VmConfig::default() };
    let (_g, vm, _d, _p, _e) = vm_on_file(8, json!({}), cfg).await;
    for round in 0..5 {
        let before = vm.stats().writes;
        vm.cont().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(vm.stats().writes > before, "round {round}: the guest runs after cont (no vCPU stuck on a stale kick)");
        vm.stop().await.unwrap();
        assert!(!vm.vcpus_in_run());
    }
    assert_eq!(vm.stats().mismatches, 0);
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_descriptors_get_an_error_status_and_nothing_else() {
    if !kvm_or_skip() {
        return;
    }
    use vm_memory::{Bytes, GuestAddress};
    use vmm::layout::*;
    let (_g, vm, _d, path, _e) = vm_on_file(8, json!({}), VmConfig::default()).await;
    vm.cont().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    vm.stop().await.unwrap();
    let disk = std::fs::read(&path).unwrap();
    let mem = vm.memory();
    // (op, sector, count, buffer): a 2 TiB request, zero sectors, past the end, a buffer outside RAM.
    let bad: [(u32, u64, u32, u32); 4] = [
        (2, 0, u32::MAX, BUFFERS as u32),
        (2, 0, 0, BUFFERS as u32),
        (1, u64::MAX / 512, 8, BUFFERS as u32),
        (2, 0, 8, 0xffff_f000),
    ];
    let submit = mem.read_obj::<u32>(GuestAddress(RING_SUBMIT)).unwrap();
    for (i, (op, sector, count, buf)) in bad.iter().enumerate() {
        let d = RING_DESCS + u64::from((submit + i as u32) % RING_SLOTS as u32) * DESC_SIZE;
        mem.write_obj(*op, GuestAddress(d + DESC_OP)).unwrap();
        mem.write_obj(STATUS_PENDING as u32, GuestAddress(d + DESC_STATUS)).unwrap();
        mem.write_obj(*sector, GuestAddress(d + DESC_SECTOR)).unwrap();
        mem.write_obj(*count, GuestAddress(d + DESC_COUNT)).unwrap();
        mem.write_obj(*buf, GuestAddress(d + DESC_BUF)).unwrap();
    }
    mem.write_obj(submit + bad.len() as u32, GuestAddress(RING_SUBMIT)).unwrap();
    vm.device().doorbell();
    tokio::time::sleep(Duration::from_millis(200)).await;
    vm.device().drain().await;
    for i in 0..bad.len() as u32 {
        let d = RING_DESCS + u64::from((submit + i) % RING_SLOTS as u32) * DESC_SIZE;
        assert_eq!(mem.read_obj::<u32>(GuestAddress(d + DESC_STATUS)).unwrap(), STATUS_IOERR as u32, "descriptor {i}");
    }
    assert!(std::fs::read(&path).unwrap() == disk, "nothing reached the disk");
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_guest_continues_in_a_new_vm_on_a_copy_of_its_disk() {
    if !kvm_or_skip() {
        return;
    }
    let cfg = VmConfig { vcpus: 2, ..VmConfig::default() };
    let (_g, vm, dir, path, _e) = vm_on_file(8, json!({}), cfg.clone()).await;
    vm.cont().await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(vm.save().await.is_err(), "a running guest cannot be saved");
    vm.stop().await.unwrap();
    let before = vm.stats();
    let state = vm.save().await.unwrap();
    vm.shutdown().await;

    // The disk's handover, here a plain copy; then a new VM loads the guest.
    let copy = dir.path().join("copy.img");
    std::fs::copy(&path, &copy).unwrap();
    let g2 = Arc::new(Graph::new());
    g2.blockdev_add(&json!({"driver": "file", "node-name": "d", "filename": copy})).await.unwrap();
    let be = g2.attach("d", "guest disk", PermSet::GUEST_WRITER, true).unwrap();
    let vm2 = Vm::new(cfg, be, tokio::runtime::Handle::current(), Arc::new(|_: &str, _| {}), true).unwrap();
    assert_eq!(vm2.state(), RunState::InMigrate);
    let mut bad = state.clone();
    bad.ram.truncate(4096);
    assert!(vm2.restore(&bad).await.is_err(), "a state that does not fit is refused");
    vm2.restore(&state).await.unwrap();
    vm2.set_state(RunState::Paused);
    assert_eq!(vm2.stats(), before, "the counters came along in RAM");
    vm2.cont().await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let after = vm2.stats();
    assert!(after.writes > before.writes, "the guest goes on where it stopped: {before:?} -> {after:?}");
    assert_eq!(after.mismatches, 0);
    let v = vm2.verify(Duration::from_secs(60)).await.unwrap();
    assert!(v.checked > 0 && v.bad == 0, "every block written before and after the move checks out: {v:?}");
    vm2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_that_loses_writes_is_caught_by_the_guest() {
    if !kvm_or_skip() {
        return;
    }
    let (_g, vm, dir, path, _e) = vm_on_file(8, json!({}), VmConfig::default()).await;
    vm.cont().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A stale copy of the disk: the writes after this point are "lost".
    let stale = dir.path().join("stale.img");
    std::fs::copy(&path, &stale).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    vm.stop().await.unwrap();
    let state = vm.save().await.unwrap();
    vm.shutdown().await;
    let g2 = Arc::new(Graph::new());
    g2.blockdev_add(&json!({"driver": "file", "node-name": "d", "filename": stale})).await.unwrap();
    let be = g2.attach("d", "guest disk", PermSet::GUEST_WRITER, true).unwrap();
    let vm2 =
        Vm::new(VmConfig::default(), be, tokio::runtime::Handle::current(), Arc::new(|_: &str, _| {}), true).unwrap();
    vm2.restore(&state).await.unwrap();
    vm2.set_state(RunState::Paused);
    vm2.cont().await.unwrap();
    let v = vm2.verify(Duration::from_secs(60)).await.unwrap();
    assert!(v.bad > 0, "lost writes show up as mismatches: {v:?}");
    vm2.shutdown().await;
}
