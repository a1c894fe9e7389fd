#![cfg(feature = "failpoints")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Every switchover step failed on purpose (failpoints are process-wide, so
//! this binary holds this one test).

mod common;

use std::time::Duration;

use common::{kvm_or_skip, setup};
use vmm::switchover::{switchover, SwitchoverError};
use vmm::RunState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_switchover_step_rolls_back_when_it_fails() {
    if !kvm_or_skip() {
        return;
    }
    let site = setup().await;
    for fp in [
        "switchover::after-stop",
        "switchover::after-jobs",
        "switchover::after-inactivate",
        "switchover::before-handover",
        "block::inactivate-all::after-flush",
    ] {
        fail::cfg(fp, "return").unwrap();
        let e =
            switchover(&site.src, &site.mgr, &site.vm, &["m0".to_string()], |_st| async { Ok(()) }).await.unwrap_err();
        fail::remove(fp);
        assert!(matches!(e, SwitchoverError::RolledBack { .. }), "{fp}: {e}");
        assert_eq!(site.vm.state(), RunState::Running, "{fp}: the guest runs again");
        assert!(site.src.nodes().iter().all(|n| n.is_active()), "{fp}: every node active");
        assert_eq!(site.mgr.find("m0").unwrap().status(), jobs::Status::Ready, "{fp}: the mirror is still ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v = site.vm.verify(Duration::from_secs(60)).await.unwrap();
    assert_eq!(v.bad, 0, "{v:?}");
    site.vm.shutdown().await;
}
