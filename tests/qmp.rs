#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! QMP end-to-end tests: each Python script under `tests/qmp/` drives the
//! real `baton daemon` (and, where it compares, qemu-storage-daemon 10.0.2)
//! and exits 0 only if every check passed. The scripts are the tests; this
//! file runs them with `python3` (which needs `qemu.qmp` for session.py),
//! passing the binary in `BATON`, and shows their output on failure.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

/// Longest a script may run before it is killed and the test fails.
const LIMIT: Duration = Duration::from_secs(120);

fn run_script(name: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qmp").join(name);
    assert!(script.is_file(), "{} is missing", script.display());
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("output.log");
    let log = File::create(&log_path).unwrap();
    let started = Instant::now();
    let mut child = Command::new("python3")
        .arg(&script)
        .env("BATON", env!("CARGO_BIN_EXE_baton"))
        .env("PYTHONUNBUFFERED", "1")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 {}: {e}", script.display()));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    if status.is_some_and(|s| s.success()) {
        // Shown with `cargo test -- --nocapture`; on failure the panic message carries it.
        println!("{output}");
    }
    match status {
        None => panic!("{name} did not finish within {LIMIT:?}; its output:\n{output}"),
        Some(s) => assert!(s.success(), "{name} failed ({s}) after {:.1?}; its output:\n{output}", started.elapsed()),
    }
}

/// A whole session through the Python `qemu.qmp` library: nodes, bitmap,
/// NBD export with the bitmap, dirty granules via nbdinfo, inactivation
/// refused on an exported node, BLOCK_EXPORT_DELETED, quit.
#[test]
fn qmp_session_with_qemu_qmp_library() {
    run_script("session.py");
}

/// Malformed and invalid input over a raw socket: one error each, QSD's
/// classes (and descs), ids echoed, the session survives.
#[test]
fn qmp_bad_input() {
    run_script("bad_input.py");
}

/// The same scripted session against qemu-storage-daemon and baton,
/// compared reply by reply (allowlist.json lists intended differences).
#[test]
fn qmp_conformance_with_qemu_storage_daemon() {
    run_script("conformance.py");
}

/// QSD's own command line (blockdev, nbd-server, export, chardev/monitor,
/// pidfile, daemonize) given to baton, compared with QSD.
#[test]
fn qmp_qsd_command_line() {
    run_script("qsd_cmdline.py");
}

/// libvirt's QMP sequence for a migration without shared storage (and a
/// second run ended by migrate_cancel), against real QEMU 10
/// (qemu-system-x86_64) and against baton, compared reply by reply and
/// validated against QEMU's own QAPI schema.
#[test]
fn qmp_libvirt_migration_sequence_matches_qemu() {
    if !common::kvm_or_skip() {
        return;
    }
    run_script("libvirt_migration.py");
}
