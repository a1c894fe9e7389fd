//! Two "hosts" in one process for the switchover tests: a source graph with
//! a running guest whose disk a READY mirror copies into the destination's
//! NBD export, and the destination's side of the handover.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block::{Graph, PermSet};
use serde_json::json;
use vmm::{RunState, Vm, VmConfig};

/// Whether this machine can run the KVM tests. Without `/dev/kvm` a KVM test
/// fails (a CI runner that silently lost KVM must not look green), unless
/// `BATON_NO_KVM=1` asks to skip them: then it says so and the test returns.
pub fn kvm_or_skip() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var_os("BATON_NO_KVM").is_some_and(|v| v == "1") {
        eprintln!("skipped by request (BATON_NO_KVM=1): /dev/kvm is missing on this machine");
        return false;
    }
    panic!("/dev/kvm is missing: this test runs a KVM guest (set BATON_NO_KVM=1 to skip the KVM tests on purpose)");
}

pub struct Site {
    pub _dir: tempfile::TempDir,
    pub src: Arc<Graph>,
    pub vm: Arc<Vm>,
    pub mgr: Arc<jobs::JobManager>,
    pub dst: Arc<Graph>,
    pub server: Arc<baton_nbd::Server>,
}

pub async fn setup() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let (s, d) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    for p in [&s, &d] {
        std::fs::File::create(p).unwrap().set_len(8 << 20).unwrap();
    }
    // Destination: an empty disk exported writable for the mirror.
    let dst = Arc::new(Graph::new());
    dst.blockdev_add(&json!({"driver": "file", "node-name": "disk", "filename": d})).await.unwrap();
    let export = baton_nbd::Export::open(
        &dst,
        baton_nbd::ExportConfig {
            name: "disk".into(),
            description: String::new(),
            node: "disk".into(),
            writable: true,
            bitmaps: vec![],
            allocation_depth: false,
            allow_inactive: false,
            multi_conn: true,
            id: "e".into(),
        },
    )
    .await
    .unwrap();
    let server = baton_nbd::Server::new(baton_nbd::ServerConfig::default());
    server.exports.add(export).unwrap();
    let sock = dir.path().join("nbd.sock");
    tokio::spawn(server.clone().serve(baton_nbd::Listener::Unix(tokio::net::UnixListener::bind(&sock).unwrap())));

    // Source: the running guest, and a mirror of its disk into the destination.
    let src = Arc::new(Graph::new());
    baton_nbd::client::register(&src);
    src.blockdev_add(&json!({"driver": "file", "node-name": "disk", "filename": s})).await.unwrap();
    src.blockdev_add(
        &json!({"driver": "nbd", "node-name": "tgt", "server": {"type": "unix", "path": sock}, "export": "disk"}),
    )
    .await
    .unwrap();
    let be = src.attach("disk", "guest disk", PermSet::GUEST_WRITER, true).unwrap();
    let vm =
        Vm::new(VmConfig::default(), be, tokio::runtime::Handle::current(), Arc::new(|_: &str, _| {}), false).unwrap();
    vm.cont().await.unwrap();
    let mgr = jobs::JobManager::new(Arc::new(|_: &str, _| {}));
    let (job, _m) = jobs::mirror::start(
        &src,
        &mgr,
        jobs::JobOptions { id: "m0".into(), speed: 0, auto_finalize: true, auto_dismiss: true },
        jobs::mirror::MirrorOptions::new("disk", "tgt"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while job.status() != jobs::Status::Ready {
        assert!(Instant::now() < deadline, "mirror never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    Site { _dir: dir, src, vm, mgr, dst, server }
}

/// The destination's side of the handover: close the mirror's export, attach
/// the guest to the disk, load the state, run.
pub async fn receive(
    dst: Arc<Graph>,
    server: Arc<baton_nbd::Server>,
    state: vmm::vm::VmState,
    out: Arc<Mutex<Option<Arc<Vm>>>>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if let Some(e) = server.exports.remove("e") {
        e.close();
        e.wait_idle().await;
    }
    // The export's last connection lets go of the node just after it counts itself out.
    let mut tries = 0;
    let be = loop {
        match dst.attach("disk", "guest disk", PermSet::GUEST_WRITER, true) {
            Ok(be) => break be,
            Err(e) if tries < 100 => {
                tries += 1;
                tracing::debug!(error = %e, "the export still holds the disk");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let vm = Vm::new(VmConfig::default(), be, tokio::runtime::Handle::current(), Arc::new(|_: &str, _| {}), true)?;
    vm.restore(&state).await?;
    vm.set_state(RunState::Paused);
    vm.cont().await?;
    *out.lock().unwrap() = Some(vm);
    Ok(())
}
