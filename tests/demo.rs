#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `baton demo` runs the whole handover and checks the invariants itself.

mod common;

use std::process::Command;

#[test]
fn the_one_command_demo_moves_the_guest_and_loses_nothing() {
    if !common::kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["demo", "--seconds", "1", "--workdir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("attempt 1 (host B's disk fails to flush): \"failed\""), "{stdout}");
    assert!(
        stdout.contains("host A after the rollback: guest \"running\", every node active: true, mirror ready: true"),
        "{stdout}"
    );
    assert!(stdout.contains("every node inactive: true"), "{stdout}");
    assert!(stdout.contains("0 mismatches\ndone"), "{stdout}");
}
