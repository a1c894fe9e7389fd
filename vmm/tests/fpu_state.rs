#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The FPU fallback: where KVM lacks XSAVE the SSE state goes through
//! KVM_GET/SET_FPU, in the same XSAVE-layout bytes on the wire. (Its own
//! test binary: the knob that forces the fallback is process-wide.)

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{Graph, PermSet};
use common::kvm_or_skip;
use serde_json::json;
use vmm::vcpu::FORCE_FPU_STATE;
use vmm::{RunState, Vm, VmConfig};

async fn vm_on(disk: &std::path::Path, incoming: bool, fpu_only: bool) -> (Arc<Vm>, Arc<Graph>) {
    let g = Arc::new(Graph::new());
    g.blockdev_add(&json!({"driver": "file", "node-name": "d", "filename": disk})).await.unwrap();
    let be = g.attach("d", "guest disk", PermSet::GUEST_WRITER, true).unwrap();
    FORCE_FPU_STATE.store(fpu_only, Ordering::SeqCst);
    let vm = Vm::new(VmConfig::default(), be, tokio::runtime::Handle::current(), Arc::new(|_: &str, _| {}), incoming);
    FORCE_FPU_STATE.store(false, Ordering::SeqCst);
    (vm.unwrap(), g)
}

async fn run_batches(vm: &Vm, n: u32) {
    let start = vm.stats().batches;
    vm.cont().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while vm.stats().batches < start + n {
        assert!(Instant::now() < deadline, "the guest is stuck: {:?} {:?}", vm.stats(), vm.fatal_error());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    vm.stop().await.unwrap();
}

/// A source that reads the SSE state with KVM_GET_FPU (as on a KVM without
/// XSAVE) sends it in the XSAVE layout (legacy area, XSTATE_BV = x87|SSE);
/// an XSAVE destination takes it and the guest finds its registers.
///
/// The other direction cannot be had on an XSAVE host: there KVM_SET_FPU
/// writes the legacy area but leaves XSTATE_BV alone, so a fresh vCPU's SSE
/// registers come back in their init state on the next entry (the guest's
/// check does catch that). On a host without XSAVE the FPU state is the
/// FXSAVE image itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fpu_only_sources_sse_state_lands_in_an_xsave_destination() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("src.img");
    std::fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap();
    let (src, _g) = vm_on(&disk, false, true).await;
    run_batches(&src, 3).await;
    let st = src.save().await.unwrap();
    let v = &st.vcpus[0];
    assert_ne!(v.xmm(1), 0, "the guest's constant is in xmm1");
    assert_eq!(v.xsave[512 / 4], 0b11, "sent as x87 and SSE state");
    src.shutdown().await;
    // Through the stream's encoding.
    let mut w = Vec::new();
    vmm::stream::write_header(&mut w).await.unwrap();
    vmm::stream::write_vcpu(&mut w, 0, v).await.unwrap();
    let mut r = &w[..];
    vmm::stream::read_header(&mut r).await.unwrap();
    let vmm::stream::Section::Vcpu { state, .. } = vmm::stream::read_section(&mut r).await.unwrap() else {
        panic!("not VCPU")
    };
    let st = vmm::vm::VmState { vcpus: vec![*state], ..st };
    let copy = dir.path().join("dst.img");
    std::fs::copy(&disk, &copy).unwrap();
    let (dst, _g2) = vm_on(&copy, true, false).await;
    dst.restore(&st).await.unwrap();
    dst.set_state(RunState::Paused);
    let got = dst.save().await.unwrap();
    for n in 0..8 {
        assert_eq!(got.vcpus[0].xmm(n), st.vcpus[0].xmm(n), "xmm{n}");
    }
    run_batches(&dst, 3).await;
    let s = dst.stats();
    assert_eq!((s.mismatches, s.cpu_mismatches), (0, 0), "{s:?}");
    dst.shutdown().await;
}
