#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Storage migration in one command: `migrate {uri, "x-baton-storage":
//! "copy"}` between two `baton daemon` processes that share nothing. The
//! destination exports the disk it holds for the guest on a server of the
//! attempt's own, the source mirrors into it, and the handover commits both;
//! a failure at any step leaves both sides as they were, with nothing
//! left behind on either; bad input is refused before anything moves.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{daemon_env, ok, wait_for, Proc, Qmp};
use serde_json::{json, Value};

struct Pair {
    dir: tempfile::TempDir,
    src: Proc,
    dst: Proc,
    sq: Qmp,
    dq: Qmp,
}

impl Pair {
    fn path(&self, n: &str) -> std::path::PathBuf {
        self.dir.path().join(n)
    }

    fn uri(&self) -> String {
        format!("unix:{}", self.path("mig.sock").display())
    }

    /// `migrate` with the storage copy; waits for the source's end; its query-migrate.
    fn migrate(&mut self) -> Value {
        let uri = self.uri();
        ok(&mut self.sq, "migrate", json!({"uri": uri, "x-baton-storage": "copy"}));
        wait_for(&mut self.sq, "query-migrate", "the end of the migration", |v| {
            matches!(v["status"].as_str(), Some("completed" | "failed"))
        })
    }

    /// Both sides as before an attempt: the source runs on its own disk,
    /// active and locked, with no node or job of the copy; the destination
    /// waits, its disk inactive and unlocked, exporting nothing.
    fn assert_as_before(&mut self, what: &str) {
        assert_eq!(ok(&mut self.sq, "query-status", json!({}))["status"], "running", "{what}");
        let nodes = ok(&mut self.sq, "query-named-block-nodes", json!({}));
        let names: Vec<&str> = nodes.as_array().unwrap().iter().filter_map(|n| n["node-name"].as_str()).collect();
        assert_eq!(names, ["disk"], "{what}: the copy's nbd node is gone: {nodes}");
        assert!(nodes[0]["active"] == true, "{what}: {nodes}");
        wait_for(&mut self.sq, "query-block-jobs", "the copy's job to be gone", |v| v == &json!([]));
        assert!(!common::locked_bytes(&self.path("src.img")).is_empty(), "{what}: the source holds its image");

        let d = wait_for(&mut self.dq, "query-migrate", "the destination to roll back", |v| {
            matches!(v["status"].as_str(), Some("failed" | "cancelled"))
        });
        assert_eq!(d["x-baton-handover"], "rolled-back", "{what}: {d}");
        assert_eq!(ok(&mut self.dq, "query-status", json!({}))["status"], "inmigrate", "{what}");
        assert_eq!(ok(&mut self.dq, "query-block-exports", json!({})), json!([]), "{what}");
        let dnodes = ok(&mut self.dq, "query-named-block-nodes", json!({}));
        assert!(dnodes.as_array().unwrap().iter().all(|n| n["active"] == false), "{what}: {dnodes}");
        assert!(common::locked_bytes(&self.path("dst.img")).is_empty(), "{what}: the destination's image is free");
        assert!(!self.path("mig.sock.disk").exists(), "{what}: the copy's socket is gone");
    }
}

/// The guest's own check on the destination: every write it made is there.
fn verified(q: &mut Qmp) {
    let v = ok(q, "x-baton-guest-verify", json!({}));
    assert!(v["checked"].as_u64().unwrap() > 0 && v["mismatches"] == 0, "{v}");
}

fn sized(p: &Path, size: u64) {
    std::fs::File::create(p).unwrap().set_len(size).unwrap();
}

/// A source guest running on src.img (`src_size`), a destination waiting on
/// its own dst.img (`dst_size`, inactive until the migration) with `extra`
/// arguments, and neither sharing anything.
fn pair(src_size: u64, dst_size: u64, extra: &[String]) -> Pair {
    pair_at(src_size, dst_size, extra, None)
}

/// As `pair`, the destination listening on `incoming` (default: unix mig.sock).
fn pair_at(src_size: u64, dst_size: u64, extra: &[String], incoming: Option<String>) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    sized(&dir.path().join("src.img"), src_size);
    sized(&dir.path().join("dst.img"), dst_size);
    let mut args = vec![
        "--blockdev".into(),
        format!("driver=file,node-name=disk,filename={},active=off", d("dst.img")),
        "--vm".into(),
        "memory=64M,disk=disk".into(),
        "--incoming".into(),
        incoming.unwrap_or_else(|| format!("unix:{}", d("mig.sock"))),
        "--qmp".into(),
        format!("unix:{}", d("dq.sock")),
    ];
    args.extend_from_slice(extra);
    let dst = daemon_env(&args, &[]);
    let src = daemon_env(
        &[
            "--blockdev".into(),
            format!("driver=file,node-name=disk,filename={}", d("src.img")),
            "--vm".into(),
            "memory=64M,disk=disk".into(),
            "--qmp".into(),
            format!("unix:{}", d("sq.sock")),
        ],
        &[],
    );
    let sq = Qmp::connect(&dir.path().join("sq.sock"));
    let dq = Qmp::connect(&dir.path().join("dq.sock"));
    Pair { dir, src, dst, sq, dq }
}

/// The case: a writing guest with a 256 MiB disk moves in one
/// command; the destination runs it on its own (no -S), the guest's checks
/// pass, the source's image is inactive and unlocked, and neither side
/// keeps a node, job, export or socket of the copy.
#[test]
fn one_command_moves_a_writing_guest_and_its_256_mib_disk() {
    if !common::kvm_or_skip() {
        return;
    }
    let mut p = pair(256 << 20, 256 << 20, &[]);
    std::thread::sleep(Duration::from_millis(500));
    let before = ok(&mut p.sq, "x-baton-guest-stats", json!({}));
    let m = p.migrate();
    assert_eq!(m["status"], "completed", "{m}");
    assert_eq!(ok(&mut p.sq, "query-status", json!({}))["status"], "postmigrate");
    let nodes = ok(&mut p.sq, "query-named-block-nodes", json!({}));
    let names: Vec<&str> = nodes.as_array().unwrap().iter().filter_map(|n| n["node-name"].as_str()).collect();
    assert_eq!(names, ["disk"], "the copy's nbd node is gone: {nodes}");
    assert_eq!(nodes[0]["active"], false, "{nodes}");
    wait_for(&mut p.sq, "query-block-jobs", "the copy's job to be gone", |v| v == &json!([]));
    assert!(common::locked_bytes(&p.path("src.img")).is_empty(), "the source let go of its image");
    let copy = &m["x-baton-storage"][0];
    assert!(copy["device"] == "disk" && copy["destination"] == "disk" && copy["job"] == "baton-copy-0", "{m}");
    // Granules the guest rewrote in full went by its writes (write-blocking), not the copy.
    assert!(copy["copied"].as_u64().unwrap() > 128 << 20, "the copy's progress: {m}");
    let steps = m["x-baton-switchover"].as_object().unwrap();
    assert!(steps.contains_key("mirror-sync"), "the copy was checked in sync at the switchover: {m}");

    let dm = wait_for(&mut p.dq, "query-migrate", "the destination to complete", |v| v["status"] == "completed");
    assert_eq!(dm["x-baton-handover"], "committed", "{dm}");
    assert!(dm["x-baton-switchover"]["withdraw-exports"].is_number(), "{dm}");
    wait_for(&mut p.dq, "query-status", "the destination to run the guest", |v| v["status"] == "running");
    assert_eq!(ok(&mut p.dq, "query-block-exports", json!({})), json!([]), "the copy's export is gone");
    assert!(!p.path("mig.sock.disk").exists(), "the copy's socket is gone");
    assert!(!common::locked_bytes(&p.path("dst.img")).is_empty(), "the destination holds its image");
    std::thread::sleep(Duration::from_millis(800));
    let after = ok(&mut p.dq, "x-baton-guest-stats", json!({}));
    assert!(after["writes"].as_u64().unwrap() > before["writes"].as_u64().unwrap(), "{before} -> {after}");
    assert_eq!(after["mismatches"], 0, "{after}");
    // I6: every write the guest made on the source is on the destination's own image.
    verified(&mut p.dq);
}

/// A failure injected at each step of a storage copy, on either side,
/// leaves both sides as before (and the next attempt, with no failure,
/// completes on the same two processes).
#[test]
fn a_failure_at_each_step_of_a_storage_copy_leaves_both_sides_as_before() {
    if !common::kvm_or_skip() {
        return;
    }
    let mut p = pair(16 << 20, 16 << 20, &[]);
    let cells: &[(&str, &str)] = &[
        ("D", "migration::incoming-storage"),
        ("S", "migration::storage-connect"),
        ("S", "migration::storage-mirror"),
        ("S", "migration::storage-ready"),
        ("S", "migration::precopy"),
        ("S", "migration::after-end"),
        ("D", "migration::incoming-before-prepared"),
        ("S", "migration::before-commit"),
    ];
    for (side, name) in cells {
        let q = if *side == "S" { &mut p.sq } else { &mut p.dq };
        ok(q, "x-baton-failpoint", json!({"name": name, "actions": "return"}));
        let m = p.migrate();
        assert_eq!(m["status"], "failed", "{name}: {m}");
        assert!(m["error-desc"].as_str().unwrap().contains(name), "{name}: {m}");
        let q = if *side == "S" { &mut p.sq } else { &mut p.dq };
        ok(q, "x-baton-failpoint", json!({"name": name, "actions": "off"}));
        p.assert_as_before(name);
    }
    let m = p.migrate();
    assert_eq!(m["status"], "completed", "{m}");
    wait_for(&mut p.dq, "query-status", "the destination to run the guest", |v| v["status"] == "running");
    verified(&mut p.dq);
}

/// Bad input is refused before anything moves, saying what is wrong: a
/// destination disk of another size, a disk the destination already
/// exports, a storage mode that does not exist.
#[test]
fn a_storage_copy_refuses_bad_input_before_anything_moves() {
    if !common::kvm_or_skip() {
        return;
    }
    let mut p = pair(16 << 20, 32 << 20, &[]);
    let m = p.migrate();
    assert_eq!(m["status"], "failed", "{m}");
    let e = m["error-desc"].as_str().unwrap();
    assert!(e.contains("16777216") && e.contains("33554432"), "both sizes named: {e}");
    p.assert_as_before("another size");
    let r = p.sq.execute("migrate", json!({"uri": p.uri(), "x-baton-storage": "move"}));
    assert!(r["error"]["desc"].as_str().unwrap().contains("'x-baton-storage'"), "{r}");
    assert_eq!(ok(&mut p.sq, "query-migrate", json!({})), m, "nothing started: the last attempt's record stands");

    let nbd = p.path("nbd.sock").display().to_string();
    let extra = [
        "--nbd-server".to_string(),
        format!("addr.type=unix,addr.path={nbd}"),
        "--export".into(),
        "type=nbd,id=e,node-name=disk,name=mine".into(),
    ];
    let mut p = pair(16 << 20, 16 << 20, &extra);
    let m = p.migrate();
    assert_eq!(m["status"], "failed", "{m}");
    let e = m["error-desc"].as_str().unwrap();
    assert!(e.contains("already exports disk 'disk'") && e.contains("'mine'"), "{e}");
    assert_eq!(ok(&mut p.sq, "query-status", json!({}))["status"], "running");
    let exports = ok(&mut p.dq, "query-block-exports", json!({}));
    assert_eq!(exports.as_array().unwrap().len(), 1, "the management's export stays: {exports}");
    assert!(!p.path("mig.sock.disk").exists());
    let d = ok(&mut p.dq, "query-migrate", json!({}));
    assert_eq!(d["x-baton-pages-received"], 0, "no RAM moved: {d}");
}

/// Over TCP the destination's export listens on a port of the migration's
/// host, and the source finds it there.
#[test]
fn a_storage_copy_over_tcp_reaches_the_export_on_the_migrations_host() {
    if !common::kvm_or_skip() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut p = pair_at(16 << 20, 16 << 20, &["-S".into()], Some(format!("tcp:0.0.0.0:{port}")));
    ok(&mut p.sq, "migrate", json!({"uri": format!("tcp:127.0.0.1:{port}"), "x-baton-storage": "copy"}));
    let m = wait_for(&mut p.sq, "query-migrate", "the end", |v| {
        matches!(v["status"].as_str(), Some("completed" | "failed"))
    });
    assert_eq!(m["status"], "completed", "{m}");
    wait_for(&mut p.dq, "query-migrate", "the destination", |v| v["status"] == "completed");
    // -S: the guest waits for cont.
    assert_eq!(ok(&mut p.dq, "query-status", json!({}))["status"], "paused");
    ok(&mut p.dq, "cont", json!({}));
    verified(&mut p.dq);
}

/// Either process killed while the copy runs (held at READY): the other
/// side ends its attempt and is as before, with nothing of the copy left.
#[test]
fn a_process_killed_during_the_copy_leaves_the_other_side_as_before() {
    if !common::kvm_or_skip() {
        return;
    }
    // The destination dies: the source fails the attempt and runs on.
    let mut p = pair(16 << 20, 16 << 20, &[]);
    ok(&mut p.sq, "x-baton-failpoint", json!({"name": "migration::storage-ready", "actions": "return(hold)"}));
    let uri = p.uri();
    ok(&mut p.sq, "migrate", json!({"uri": uri, "x-baton-storage": "copy"}));
    wait_for(&mut p.sq, "query-migrate", "the copy to be READY", |v| {
        v["x-baton-held"].as_array().is_some_and(|h| h.iter().any(|n| n == "migration::storage-ready"))
    });
    p.dst.0.kill().unwrap();
    p.dst.0.wait().unwrap();
    ok(&mut p.sq, "x-baton-failpoint", json!({"name": "migration::storage-ready", "actions": "off"}));
    let m = wait_for(&mut p.sq, "query-migrate", "the end", |v| {
        matches!(v["status"].as_str(), Some("completed" | "failed"))
    });
    assert_eq!(m["status"], "failed", "{m}");
    assert_eq!(ok(&mut p.sq, "query-status", json!({}))["status"], "running");
    let nodes = ok(&mut p.sq, "query-named-block-nodes", json!({}));
    let names: Vec<&str> = nodes.as_array().unwrap().iter().filter_map(|n| n["node-name"].as_str()).collect();
    assert_eq!(names, ["disk"], "{nodes}");
    wait_for(&mut p.sq, "query-block-jobs", "the copy's job to be gone", |v| v == &json!([]));

    // The source dies: the destination rolls back, withdraws its export and waits.
    let mut p = pair(16 << 20, 16 << 20, &[]);
    ok(&mut p.sq, "x-baton-failpoint", json!({"name": "migration::storage-ready", "actions": "return(hold)"}));
    let uri = p.uri();
    ok(&mut p.sq, "migrate", json!({"uri": uri, "x-baton-storage": "copy"}));
    wait_for(&mut p.sq, "query-migrate", "the copy to be READY", |v| {
        v["x-baton-held"].as_array().is_some_and(|h| h.iter().any(|n| n == "migration::storage-ready"))
    });
    assert!(p.path("mig.sock.disk").exists(), "the copy's export listens");
    p.src.0.kill().unwrap();
    p.src.0.wait().unwrap();
    let d = wait_for(&mut p.dq, "query-migrate", "the destination to roll back", |v| v["status"] == "failed");
    assert_eq!(d["x-baton-handover"], "rolled-back", "{d}");
    assert_eq!(ok(&mut p.dq, "query-status", json!({}))["status"], "inmigrate");
    assert_eq!(ok(&mut p.dq, "query-block-exports", json!({})), json!([]));
    let dnodes = ok(&mut p.dq, "query-named-block-nodes", json!({}));
    assert!(dnodes.as_array().unwrap().iter().all(|n| n["active"] == false), "{dnodes}");
    assert!(common::locked_bytes(&p.path("dst.img")).is_empty(), "the destination's image is free");
    assert!(!p.path("mig.sock.disk").exists());
}

/// Two hosts that share nothing (network namespaces on a switch of their own,
/// 0.1% of packets dropped each way by nftables, the destination's firewall
/// open to the migration's port and `x-baton-storage-port` only): a 32 MiB
/// guest writing its 64 MiB disk moves in one command over TCP between
/// their addresses; the guest's own check passes on the destination.
#[test]
fn a_storage_copy_moves_a_guest_between_two_hosts_over_a_lossy_link() {
    if !common::kvm_or_skip() {
        return;
    }
    use common::netns::{Host, Hosts};
    let hosts = Hosts::new();
    hosts.loss(Host::A, 1);
    hosts.loss(Host::B, 1);
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    sized(&dir.path().join("src.img"), 64 << 20);
    sized(&dir.path().join("dst.img"), 64 << 20);
    let spawn = |host: Host, args: Vec<String>| {
        let mut c = hosts.command(host, env!("CARGO_BIN_EXE_baton"));
        c.arg("daemon").args(args).stdout(std::process::Stdio::null());
        Proc(c.spawn().unwrap())
    };
    let b = hosts.addr(Host::B).to_string();
    let _dst = spawn(
        Host::B,
        vec![
            "--blockdev".into(),
            format!("driver=file,node-name=disk,filename={},active=off", d("dst.img")),
            "--vm".into(),
            "memory=32M,disk=disk".into(),
            "--incoming".into(),
            format!("tcp:{b}:4444"),
            "--qmp".into(),
            format!("unix:{}", d("dq.sock")),
        ],
    );
    let _src = spawn(
        Host::A,
        vec![
            "--blockdev".into(),
            format!("driver=file,node-name=disk,filename={}", d("src.img")),
            "--vm".into(),
            "memory=32M,disk=disk".into(),
            "--qmp".into(),
            format!("unix:{}", d("sq.sock")),
        ],
    );
    let mut sq = Qmp::connect(&dir.path().join("sq.sock"));
    let mut dq = Qmp::connect(&dir.path().join("dq.sock"));
    // Host B's firewall lets in the migration's port and the copy's only.
    hosts.only_tcp_ports(Host::B, &[4444, 4445]);
    ok(&mut dq, "migrate-set-parameters", json!({"x-baton-storage-port": 4445}));
    std::thread::sleep(Duration::from_millis(300));
    // Loopback is the host's own: the destination is not reachable there.
    let r = sq.execute("migrate", json!({"uri": "tcp:127.0.0.1:4444", "x-baton-storage": "copy"}));
    assert!(r.get("return").is_some(), "{r}");
    let m =
        wait_for(&mut sq, "query-migrate", "the end", |v| matches!(v["status"].as_str(), Some("completed" | "failed")));
    assert_eq!(m["status"], "failed", "nothing listens on host A's loopback: {m}");
    ok(&mut sq, "migrate", json!({"uri": format!("tcp:{b}:4444"), "x-baton-storage": "copy"}));
    let m =
        wait_for(&mut sq, "query-migrate", "the end", |v| matches!(v["status"].as_str(), Some("completed" | "failed")));
    assert_eq!(m["status"], "completed", "{m}");
    wait_for(&mut dq, "query-status", "the destination to run the guest", |v| v["status"] == "running");
    assert_eq!(ok(&mut sq, "query-status", json!({}))["status"], "postmigrate");
    wait_for(&mut sq, "query-block-jobs", "the copy's job to be gone", |v| v == &json!([]));
    verified(&mut dq);
    eprintln!("packets dropped: host A {}, host B {}", hosts.dropped(Host::A), hosts.dropped(Host::B));
}
