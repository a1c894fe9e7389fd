#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Live migration between two `baton daemon` processes that do not share
//! storage: the disk moves through a mirror into the destination's NBD
//! export, RAM by pre-copy, the rest at the switchover; the guest's own
//! check proves no write was lost. A refused migration leaves the source
//! running as before (a second attempt after a refusal is covered in vmm/tests/switchover.rs).

mod common;

use std::time::{Duration, Instant};

use common::{daemon_env, image, ok, wait_for, Proc, Qmp};
use serde_json::json;

fn daemon(args: &[String]) -> Proc {
    daemon_env(args, &[])
}

struct Pair {
    dir: tempfile::TempDir,
    _src: Proc,
    dst: Proc,
    sq: Qmp,
    dq: Qmp,
}

/// Source guest running on src.img; destination waiting (-S) with an empty
/// dst.img exported for the mirror; the mirror READY.
fn pair(dst_memory: &str) -> Pair {
    pair_on(dst_memory, None)
}

/// As `pair`, with the destination listening on `incoming` (default: a unix socket).
fn pair_on(dst_memory: &str, incoming: Option<String>) -> Pair {
    pair_with(dst_memory, incoming, &[])
}

/// As `pair_on`, with extra environment for the destination (failpoints).
fn pair_with(dst_memory: &str, incoming: Option<String>, dst_env: &[(&str, &str)]) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    image(&dir.path().join("src.img"));
    image(&dir.path().join("dst.img"));
    let dst = daemon_env(
        &[
            "--blockdev".into(),
            format!("driver=file,node-name=disk,filename={}", d("dst.img")),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", d("nbd.sock")),
            "--export".into(),
            "type=nbd,id=e,node-name=disk,writable=on".into(),
            "--vm".into(),
            format!("memory={dst_memory},disk=disk"),
            "-S".into(),
            "--incoming".into(),
            incoming.unwrap_or_else(|| format!("unix:{}", d("mig.sock"))),
            "--qmp".into(),
            format!("unix:{}", d("dq.sock")),
        ],
        dst_env,
    );
    let src = daemon(&[
        "--blockdev".into(),
        format!("driver=file,node-name=disk,filename={}", d("src.img")),
        "--vm".into(),
        "memory=64M,disk=disk".into(),
        "--qmp".into(),
        format!("unix:{}", d("sq.sock")),
    ]);
    let mut sq = Qmp::connect(&dir.path().join("sq.sock"));
    let dq = Qmp::connect(&dir.path().join("dq.sock"));
    ok(
        &mut sq,
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "tgt", "server": {"type": "unix", "path": d("nbd.sock")}, "export": "disk"}),
    );
    ok(&mut sq, "blockdev-mirror", json!({"job-id": "m0", "device": "disk", "target": "tgt", "sync": "full"}));
    wait_for(&mut sq, "query-block-jobs", "READY", |v| v[0]["ready"] == true);
    std::thread::sleep(Duration::from_millis(500));
    Pair { dir, _src: src, dst, sq, dq }
}

#[test]
fn a_running_guest_and_its_disk_move_to_another_daemon() {
    if !common::kvm_or_skip() {
        return;
    }
    let mut p = pair("64M");
    let before = ok(&mut p.sq, "x-baton-guest-stats", json!({}));
    ok(&mut p.sq, "migrate", json!({"uri": format!("unix:{}", p.dir.path().join("mig.sock").display())}));
    let m = wait_for(&mut p.sq, "query-migrate", "the end of the migration", |v| {
        matches!(v["status"].as_str(), Some("completed" | "failed"))
    });
    assert_eq!(m["status"], "completed", "{m}");
    // I8: the source is stopped for good, its disk inactive; the destination waits (-S).
    assert_eq!(ok(&mut p.sq, "query-status", json!({}))["status"], "postmigrate");
    let nodes = ok(&mut p.sq, "query-named-block-nodes", json!({}));
    assert!(nodes.as_array().unwrap().iter().all(|n| n["active"] == false), "{nodes}");
    let r = p.sq.execute("cont", json!({}));
    assert!(r.get("error").is_some(), "the source never runs the guest again: {r}");
    // The destination heard COMMIT: it dropped the export that fed its disk and waits (-S).
    let dm = wait_for(&mut p.dq, "query-migrate", "the destination to complete", |v| v["status"] == "completed");
    assert_eq!(dm["x-baton-handover"], "committed", "{dm}");
    assert_eq!(ok(&mut p.dq, "query-status", json!({}))["status"], "paused");
    assert_eq!(ok(&mut p.dq, "query-block-exports", json!({})), json!([]), "the mirror's export is gone");
    ok(&mut p.dq, "cont", json!({}));
    std::thread::sleep(Duration::from_millis(800));
    let after = ok(&mut p.dq, "x-baton-guest-stats", json!({}));
    assert!(
        after["writes"].as_u64().unwrap() > before["writes"].as_u64().unwrap(),
        "the guest goes on: {before} -> {after}"
    );
    // Its own checks pass: the blocks it re-read and its SSE registers (the whole vCPU moved).
    assert_eq!(after["mismatches"], 0, "{after}");
    // I6: every write the guest made before the switchover is there.
    let v = ok(&mut p.dq, "x-baton-guest-verify", json!({}));
    assert!(v["checked"].as_u64().unwrap() > 0 && v["mismatches"] == 0, "{v}");
}

#[test]
fn a_refused_migration_leaves_the_source_running_as_before() {
    if !common::kvm_or_skip() {
        return;
    }
    // The destination's guest has less RAM: it refuses at the first section.
    let mut p = pair("32M");
    ok(&mut p.sq, "migrate", json!({"uri": format!("unix:{}", p.dir.path().join("mig.sock").display())}));
    let m = wait_for(&mut p.sq, "query-migrate", "the end of the migration", |v| {
        matches!(v["status"].as_str(), Some("completed" | "failed"))
    });
    assert_eq!(m["status"], "failed", "{m}");
    // The destination's reason reaches the source (not "Broken pipe").
    let why = m["error-desc"].as_str().unwrap_or("");
    assert!(
        why.contains("the destination refused")
            && why.contains("67108864 bytes of RAM")
            && why.contains("this one 33554432"),
        "the error says why: {m}"
    );
    assert_eq!(
        ok(&mut p.dq, "query-status", json!({}))["status"],
        "inmigrate",
        "the destination is ready for another attempt"
    );
    // I7: same run state, same nodes (active), same job (ready).
    assert_eq!(ok(&mut p.sq, "query-status", json!({}))["status"], "running");
    let nodes = ok(&mut p.sq, "query-named-block-nodes", json!({}));
    assert!(nodes.as_array().unwrap().iter().all(|n| n["active"] == true), "{nodes}");
    assert_eq!(ok(&mut p.sq, "query-block-jobs", json!({}))[0]["ready"], true);
    let v = ok(&mut p.sq, "x-baton-guest-verify", json!({}));
    assert_eq!(v["mismatches"], 0, "{v}");
}

#[test]
fn pause_before_switchover_waits_for_continue_and_a_cancel_there_resumes_the_source() {
    if !common::kvm_or_skip() {
        return;
    }
    let mut p = pair("64M");
    let uri = format!("unix:{}", p.dir.path().join("mig.sock").display());
    ok(
        &mut p.sq,
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]}),
    );
    // First attempt: cancelled while waiting before the switchover.
    ok(&mut p.sq, "migrate", json!({"uri": uri}));
    wait_for(&mut p.sq, "query-migrate", "pre-switchover", |v| v["status"] == "pre-switchover");
    assert_eq!(
        ok(&mut p.sq, "query-status", json!({}))["status"],
        "paused",
        "the guest is stopped before the switchover"
    );
    ok(&mut p.sq, "migrate_cancel", json!({}));
    wait_for(&mut p.sq, "query-migrate", "cancelled", |v| v["status"] == "cancelled");
    assert_eq!(ok(&mut p.sq, "query-status", json!({}))["status"], "running", "a cancel resumes the guest");
    // The destination heard ABORT and rolls back; its attempt ends before it takes the next.
    wait_for(&mut p.dq, "query-migrate", "the destination's attempt to end", |v| {
        matches!(v["status"].as_str(), Some("failed" | "cancelled"))
    });
    // Second attempt: continue, and it completes.
    ok(&mut p.sq, "migrate", json!({"uri": uri}));
    wait_for(&mut p.sq, "query-migrate", "pre-switchover", |v| v["status"] == "pre-switchover");
    ok(&mut p.sq, "migrate-continue", json!({"state": "pre-switchover"}));
    let m = wait_for(&mut p.sq, "query-migrate", "the end", |v| {
        matches!(v["status"].as_str(), Some("completed" | "failed"))
    });
    assert_eq!(m["status"], "completed", "{m}");
    assert_eq!(ok(&mut p.sq, "query-status", json!({}))["status"], "postmigrate");
}

#[test]
fn migration_over_tcp_on_loopback_completes() {
    if !common::kvm_or_skip() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut p = pair_on("64M", Some(format!("tcp:127.0.0.1:{port}")));
    ok(&mut p.sq, "migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let m = wait_for(&mut p.sq, "query-migrate", "the end", |v| {
        matches!(v["status"].as_str(), Some("completed" | "failed"))
    });
    assert_eq!(m["status"], "completed", "{m}");
    wait_for(&mut p.dq, "query-status", "the destination to be paused", |v| v["status"] == "paused");
}

#[test]
fn a_destination_that_dies_at_the_switchover_leaves_the_source_running() {
    if !common::kvm_or_skip() {
        return;
    }
    let mut p = pair("64M");
    ok(
        &mut p.sq,
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]}),
    );
    ok(&mut p.sq, "migrate", json!({"uri": format!("unix:{}", p.dir.path().join("mig.sock").display())}));
    wait_for(&mut p.sq, "query-migrate", "pre-switchover", |v| v["status"] == "pre-switchover");
    // The destination host goes away with the mirror's export and the migration stream.
    p.dst.0.kill().unwrap();
    p.dst.0.wait().unwrap();
    // The source watches the link while it waits: it fails by itself, no
    // migrate-continue needed (one now would find nothing to continue).
    let m = wait_for(&mut p.sq, "query-migrate", "the end", |v| {
        matches!(v["status"].as_str(), Some("completed" | "failed"))
    });
    assert_eq!(m["status"], "failed", "{m}");
    // I7/I8: the source runs again on active nodes; nothing ran twice.
    assert_eq!(ok(&mut p.sq, "query-status", json!({}))["status"], "running", "{m}");
    let nodes = ok(&mut p.sq, "query-named-block-nodes", json!({}));
    let disk = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "disk").unwrap().clone();
    assert_eq!(disk["active"], true, "{nodes}");
    std::thread::sleep(Duration::from_millis(300));
    let v = ok(&mut p.sq, "x-baton-guest-verify", json!({}));
    assert_eq!(v["mismatches"], 0, "{v}");
}

#[cfg(feature = "failpoints")]
#[test]
fn a_destination_failing_after_activation_leaves_the_source_running_and_neither_runs_twice() {
    if !common::kvm_or_skip() {
        return;
    }
    let mut p = pair_with("64M", None, &[("FAILPOINTS", "migration::incoming-before-ack=return")]);
    ok(&mut p.sq, "migrate", json!({"uri": format!("unix:{}", p.dir.path().join("mig.sock").display())}));
    let m = wait_for(&mut p.sq, "query-migrate", "the end", |v| {
        matches!(v["status"].as_str(), Some("completed" | "failed"))
    });
    assert_eq!(m["status"], "failed", "{m}");
    assert!(
        m["error-desc"].as_str().unwrap_or("").contains("incoming-before-ack"),
        "the destination's reason reaches the source: {m}"
    );
    // I7: the source runs again; I8: the destination never ran.
    assert_eq!(ok(&mut p.sq, "query-status", json!({}))["status"], "running");
    assert_eq!(ok(&mut p.dq, "query-status", json!({}))["status"], "inmigrate");
    let v = ok(&mut p.sq, "x-baton-guest-verify", json!({}));
    assert_eq!(v["mismatches"], 0, "{v}");
}

/// libvirt's storage-migration sequence: capabilities `events` and
/// `pause-before-switchover`, the mirror cancelled (in sync) at
/// `pre-switchover`, `migrate-continue`, then `cont` on the destination. Each
/// side sends exactly one MIGRATION event per status change.
#[test]
fn libvirts_sequence_with_mirrors_cancelled_at_pre_switchover_completes() {
    if !common::kvm_or_skip() {
        return;
    }
    let mut p = pair("64M");
    let caps = json!({"capabilities": [{"capability": "events", "state": true}, {"capability": "pause-before-switchover", "state": true}]});
    ok(&mut p.sq, "migrate-set-capabilities", caps);
    ok(&mut p.dq, "migrate-set-capabilities", json!({"capabilities": [{"capability": "events", "state": true}]}));
    let on_source = ok(&mut p.sq, "x-baton-guest-verify", json!({}));
    let c = ok(&mut p.sq, "query-migrate-capabilities", json!({}));
    assert!(
        c.as_array().unwrap().iter().any(|c| c["capability"] == "pause-before-switchover" && c["state"] == true),
        "{c}"
    );
    ok(&mut p.sq, "migrate", json!({"uri": format!("unix:{}", p.dir.path().join("mig.sock").display())}));
    wait_for(&mut p.sq, "query-migrate", "pre-switchover", |v| v["status"] == "pre-switchover");
    let r = p.sq.execute("migrate", json!({"uri": "unix:/nonexistent"}));
    assert!(r["error"]["desc"].as_str().unwrap_or("").contains("in progress"), "a second migrate is refused: {r}");
    ok(&mut p.sq, "block-job-cancel", json!({"device": "m0"}));
    wait_for(&mut p.sq, "query-block-jobs", "the mirror to end", |v| v.as_array().is_some_and(|a| a.is_empty()));
    ok(&mut p.sq, "migrate-continue", json!({"state": "pre-switchover"}));
    let m = wait_for(&mut p.sq, "query-migrate", "the end", |v| {
        matches!(v["status"].as_str(), Some("completed" | "failed"))
    });
    assert_eq!(m["status"], "completed", "{m}");
    wait_for(&mut p.dq, "query-migrate", "the destination", |v| v["status"] == "completed");
    assert_eq!(ok(&mut p.dq, "query-status", json!({}))["status"], "paused");
    ok(&mut p.dq, "cont", json!({}));
    let v = ok(&mut p.dq, "x-baton-guest-verify", json!({}));
    assert!(v["checked"].as_u64().unwrap() > 0 && v["mismatches"] == 0, "{v}");
    // The source's answer travelled in the guest's RAM; the destination's is its own pass.
    assert_ne!(v["request"], on_source["request"], "a fresh pass, not the source's answer: {v} {on_source}");
    assert_eq!(p.sq.migration_events(), ["setup", "active", "pre-switchover", "device", "completed"]);
    assert_eq!(p.dq.migration_events(), ["setup", "active", "completed"]);
}

/// A mirror that failed (its target ran out of space) carries nothing:
/// `migrate` fails at once naming the disk, and the source keeps running.
#[test]
fn a_migration_whose_mirror_failed_is_refused_naming_the_disk() {
    if !common::kvm_or_skip() {
        return;
    }
    let mut p = pair("64M");
    ok(&mut p.sq, "block-job-cancel", json!({"device": "m0", "force": true}));
    wait_for(&mut p.sq, "query-block-jobs", "the mirror to end", |v| v.as_array().is_some_and(|a| a.is_empty()));
    ok(&mut p.sq, "migrate", json!({"uri": format!("unix:{}", p.dir.path().join("mig.sock").display())}));
    let m = wait_for(&mut p.sq, "query-migrate", "the end", |v| {
        matches!(v["status"].as_str(), Some("completed" | "failed"))
    });
    assert_eq!(m["status"], "failed", "{m}");
    assert!(m["error-desc"].as_str().unwrap().contains("destination disk 'disk'"), "{m}");
    // As QEMU, a failed attempt's query-migrate has no RAM statistics.
    assert!(m.get("ram").is_none(), "{m}");
    assert_eq!(ok(&mut p.sq, "query-status", json!({}))["status"], "running");
    assert_eq!(ok(&mut p.dq, "query-status", json!({}))["status"], "inmigrate");
    let d = ok(&mut p.dq, "query-migrate", json!({}));
    assert_eq!(d["x-baton-pages-received"], 0, "no RAM moved: {d}");
}

/// Shared storage, as in QEMU: the destination opens the same image
/// inactive (no export, no mirror); the handover moves the image lock.
#[test]
fn a_plain_shared_storage_migration_moves_the_guest_and_the_lock() {
    if !common::kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    image(&dir.path().join("shared.img"));
    let _dst = daemon(&[
        "--blockdev".into(),
        format!("driver=file,node-name=disk,filename={},active=off", d("shared.img")),
        "--vm".into(),
        "memory=64M,disk=disk".into(),
        "-S".into(),
        "--incoming".into(),
        format!("unix:{}", d("mig.sock")),
        "--qmp".into(),
        format!("unix:{}", d("dq.sock")),
    ]);
    let _src = daemon(&[
        "--blockdev".into(),
        format!("driver=file,node-name=disk,filename={}", d("shared.img")),
        "--vm".into(),
        "memory=64M,disk=disk".into(),
        "--qmp".into(),
        format!("unix:{}", d("sq.sock")),
    ]);
    let mut sq = Qmp::connect(&dir.path().join("sq.sock"));
    let mut dq = Qmp::connect(&dir.path().join("dq.sock"));
    std::thread::sleep(Duration::from_millis(300));
    ok(&mut sq, "migrate", json!({"uri": format!("unix:{}", d("mig.sock"))}));
    let m =
        wait_for(&mut sq, "query-migrate", "the end", |v| matches!(v["status"].as_str(), Some("completed" | "failed")));
    assert_eq!(m["status"], "completed", "{m}");
    wait_for(&mut dq, "query-migrate", "the destination", |v| v["status"] == "completed");
    ok(&mut dq, "cont", json!({}));
    assert_eq!(
        common::locked_bytes(&dir.path().join("shared.img")),
        [100, 101, 201].into(),
        "one writer holds the image"
    );
    let v = ok(&mut dq, "x-baton-guest-verify", json!({}));
    assert!(v["checked"].as_u64().unwrap() > 0 && v["mismatches"] == 0, "{v}");
}

/// `--incoming defer`: nothing listens until `migrate-incoming`, which is
/// taken once; with QEMU's default `exit-on-error`, a failed attempt ends
/// the destination (exit status 1, saying why) while the source runs on.
#[test]
fn a_deferred_destination_listens_on_migrate_incoming_and_exits_on_a_failed_attempt() {
    if !common::kvm_or_skip() {
        return;
    }
    // 32M on the destination: the source's 64M guest is refused at HELLO.
    let mut p = pair_on("32M", Some("defer".into()));
    let uri = format!("unix:{}", p.dir.path().join("mig.sock").display());
    assert!(!p.dir.path().join("mig.sock").exists(), "nothing listens before migrate-incoming");
    let r = p.dq.execute("migrate-incoming", json!({}));
    assert_eq!(r["error"]["desc"], "need either 'uri' or 'channels' argument", "{r}");
    let r = p.sq.execute("migrate-incoming", json!({"uri": uri}));
    assert_eq!(r["error"]["desc"], "'-incoming' was not specified on the command line", "{r}");
    let channels = json!([{"channel-type": "main", "addr": {"transport": "socket", "type": "unix",
        "path": p.dir.path().join("mig.sock")}}]);
    ok(&mut p.dq, "migrate-incoming", json!({ "channels": channels }));
    let r = p.dq.execute("migrate-incoming", json!({"uri": uri}));
    assert_eq!(r["error"]["desc"], "The incoming migration has already been started", "{r}");
    ok(&mut p.sq, "migrate", json!({ "uri": uri }));
    let m = wait_for(&mut p.sq, "query-migrate", "the end", |v| matches!(v["status"].as_str(), Some("failed")));
    assert!(m["error-desc"].as_str().unwrap_or("").contains("the destination refused"), "{m}");
    assert_eq!(ok(&mut p.sq, "query-status", json!({}))["status"], "running");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = p.dst.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the destination did not exit after its failed attempt");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1), "{status:?}");
}
