#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The switchover between two block graphs and two VMs (one process, two
//! "hosts"): the disk moves through a mirror into the destination's NBD
//! export, the guest moves as saved state, and a refusal rolls back.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{kvm_or_skip, receive, setup};
use vmm::switchover::{switchover, SwitchoverError};
use vmm::RunState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_and_disk_move_and_the_guest_finds_every_write() {
    if !kvm_or_skip() {
        return;
    }
    let site = setup().await;
    let before = site.vm.stats();
    let landed = Arc::new(Mutex::new(None));
    let (dst, server, out) = (site.dst.clone(), site.server.clone(), landed.clone());
    switchover(&site.src, &site.mgr, &site.vm, &["m0".to_string()], move |st| receive(dst, server, st, out))
        .await
        .unwrap();
    // I8: exactly one side runs.
    assert_eq!(site.vm.state(), RunState::PostMigrate);
    assert!(!site.vm.vcpus_in_run());
    assert!(site.src.nodes().iter().all(|n| !n.is_active()), "the source's nodes are inactive");
    let vm2 = landed.lock().unwrap().clone().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = vm2.stats();
    assert!(after.writes > before.writes, "the guest goes on at the destination");
    // I6: every write the guest made before the switchover is on the destination's disk.
    let v = vm2.verify(Duration::from_secs(60)).await.unwrap();
    assert!(v.checked > 0 && v.bad == 0, "{v:?}");
    vm2.shutdown().await;
    site.vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_refuses_leaves_the_source_running_as_before() {
    if !kvm_or_skip() {
        return;
    }
    let site = setup().await;
    let e = switchover(&site.src, &site.mgr, &site.vm, &["m0".to_string()], |_st| async {
        Err("destination refused".into())
    })
    .await
    .unwrap_err();
    assert!(matches!(e, SwitchoverError::RolledBack { step: "handover", .. }), "{e}");
    // I7: same nodes (active), same job (ready), same run state.
    assert_eq!(site.vm.state(), RunState::Running);
    assert!(site.src.nodes().iter().all(|n| n.is_active()));
    assert_eq!(site.mgr.find("m0").unwrap().status(), jobs::Status::Ready);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = site.vm.verify(Duration::from_secs(60)).await.unwrap();
    assert_eq!(v.bad, 0);
    // A second attempt works.
    let landed = Arc::new(Mutex::new(None));
    let (dst, server, out) = (site.dst.clone(), site.server.clone(), landed.clone());
    switchover(&site.src, &site.mgr, &site.vm, &["m0".to_string()], move |st| receive(dst, server, st, out))
        .await
        .unwrap();
    let vm2 = landed.lock().unwrap().clone().unwrap();
    let v = vm2.verify(Duration::from_secs(60)).await.unwrap();
    assert_eq!(v.bad, 0, "{v:?}");
    vm2.shutdown().await;
    site.vm.shutdown().await;
}
