#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Dirty bitmaps travel with a migration (capability `dirty-bitmaps`,
//! parameter `block-bitmap-mapping`), between two `baton daemon` processes
//! that do not share storage, as in tests/migration.rs: the destination's
//! bitmaps equal the source's bit for bit (x-debug-block-dirty-bitmap-sha256),
//! with their granularity and recording state; a failed attempt leaves no
//! bitmap behind on the destination and the source's as they were; a mapping
//! that names what the source lacks is refused at `migrate`, changing nothing.

mod common;

use std::time::{Duration, Instant};

use common::{image, ok, wait_for, Proc, Qmp};

fn daemon(args: &[String], env: &[(&str, &str)]) -> Proc {
    common::daemon_env(args, env)
}
use serde_json::{json, Value};

fn err(q: &mut Qmp, cmd: &str, args: Value) -> String {
    let r = q.execute(cmd, args.clone());
    r["error"]["desc"].as_str().unwrap_or_else(|| panic!("{cmd} {args} should fail: {r}")).to_string()
}

struct Pair {
    dir: tempfile::TempDir,
    _src: Proc,
    _dst: Proc,
    sq: Qmp,
    dq: Qmp,
}

/// Source guest running on node `disk`; the destination waiting (-S) with
/// its disk as node `dst_node`, exported for the mirror; the mirror READY;
/// capability dirty-bitmaps on both sides.
fn pair(dst_node: &str, dst_env: &[(&str, &str)]) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    image(&dir.path().join("src.img"));
    image(&dir.path().join("dst.img"));
    let dst = daemon(
        &[
            "--blockdev".into(),
            format!("driver=file,node-name={dst_node},filename={}", d("dst.img")),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", d("nbd.sock")),
            "--export".into(),
            format!("type=nbd,id=e,node-name={dst_node},name=disk,writable=on"),
            "--vm".into(),
            format!("memory=64M,disk={dst_node}"),
            "-S".into(),
            "--incoming".into(),
            format!("unix:{}", d("mig.sock")),
            "--qmp".into(),
            format!("unix:{}", d("dq.sock")),
        ],
        dst_env,
    );
    let src = daemon(
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
    let mut sq = Qmp::connect(&dir.path().join("sq.sock"));
    let mut dq = Qmp::connect(&dir.path().join("dq.sock"));
    for q in [&mut sq, &mut dq] {
        ok(q, "migrate-set-capabilities", json!({"capabilities": [{"capability": "dirty-bitmaps", "state": true}]}));
    }
    ok(
        &mut sq,
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "tgt", "server": {"type": "unix", "path": d("nbd.sock")}, "export": "disk"}),
    );
    ok(&mut sq, "blockdev-mirror", json!({"job-id": "m0", "device": "disk", "target": "tgt", "sync": "full"}));
    wait_for(&mut sq, "query-block-jobs", "READY", |v| v[0]["ready"] == true);
    Pair { dir, _src: src, _dst: dst, sq, dq }
}

impl Pair {
    fn migrate(&mut self) -> Value {
        let uri = format!("unix:{}", self.dir.path().join("mig.sock").display());
        ok(&mut self.sq, "migrate", json!({ "uri": uri }));
        wait_for(&mut self.sq, "query-migrate", "the end of the migration", |v| {
            matches!(v["status"].as_str(), Some("completed" | "failed"))
        })
    }
}

/// A node's bitmaps as query-named-block-nodes lists them, by name.
fn bitmaps(q: &mut Qmp, node: &str) -> Vec<Value> {
    let nodes = ok(q, "query-named-block-nodes", json!({}));
    let n = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == node).unwrap_or_else(|| panic!("{nodes}"));
    let mut v = n["dirty-bitmaps"].as_array().cloned().unwrap_or_default();
    v.sort_by_key(|b| b["name"].as_str().unwrap_or("").to_string());
    v
}

fn sha(q: &mut Qmp, node: &str, name: &str) -> String {
    ok(q, "x-debug-block-dirty-bitmap-sha256", json!({"node": node, "name": name}))["sha256"].as_str().unwrap().into()
}

/// Two bitmaps on the source's disk with bits the guest set: `inc0`
/// (64 KiB, recording) and `frozen` (4 KiB, disabled once it has bits).
fn source_bitmaps(sq: &mut Qmp) {
    ok(sq, "block-dirty-bitmap-add", json!({"node": "disk", "name": "inc0", "granularity": 65536}));
    ok(sq, "block-dirty-bitmap-add", json!({"node": "disk", "name": "frozen", "granularity": 4096}));
    let deadline = Instant::now() + Duration::from_secs(30);
    while bitmaps(sq, "disk").iter().any(|b| b["count"] == 0) {
        assert!(Instant::now() < deadline, "the guest never wrote: {:?}", bitmaps(sq, "disk"));
        std::thread::sleep(Duration::from_millis(50));
    }
    ok(sq, "block-dirty-bitmap-disable", json!({"node": "disk", "name": "frozen"}));
}

/// Drop `busy` (this side's use) from a bitmap listing, to compare two sides.
fn described(v: &[Value]) -> Vec<Value> {
    v.iter()
        .map(|b| {
            json!({"name": b["name"], "granularity": b["granularity"], "recording": b["recording"],
                        "persistent": b["persistent"], "count": b["count"]})
        })
        .collect()
}

#[test]
fn bitmaps_arrive_bit_for_bit_and_a_refused_attempt_leaves_none_behind() {
    if !common::kvm_or_skip() {
        return;
    }
    let mut p = pair("disk", &[]);
    source_bitmaps(&mut p.sq);
    // A destination without the capability refuses the source's bitmaps (I9: nothing is ignored).
    let off = json!({"capabilities": [{"capability": "dirty-bitmaps", "state": false}]});
    ok(&mut p.dq, "migrate-set-capabilities", off);
    let m = p.migrate();
    assert_eq!(m["status"], "failed", "{m}");
    assert!(m["error-desc"].as_str().unwrap_or("").contains("capability dirty-bitmaps is off here"), "{m}");
    wait_for(&mut p.dq, "query-migrate", "the destination to roll back", |v| v["status"] == "failed");
    let on = json!({"capabilities": [{"capability": "dirty-bitmaps", "state": true}]});
    ok(&mut p.dq, "migrate-set-capabilities", on);
    wait_for(&mut p.sq, "query-block-jobs", "READY again", |v| v[0]["ready"] == true);
    // The destination already has a bitmap named `frozen`: QEMU's rule refuses
    // the migration; `inc0`, created before it, is removed again.
    ok(&mut p.dq, "block-dirty-bitmap-add", json!({"node": "disk", "name": "frozen", "granularity": 512}));
    let m = p.migrate();
    assert_eq!(m["status"], "failed", "{m}");
    let why = m["error-desc"].as_str().unwrap_or("");
    assert!(why.contains("Bitmap with the same name ('frozen') already exists"), "{m}");
    wait_for(&mut p.dq, "query-migrate", "the destination to roll back", |v| v["status"] == "failed");
    assert_eq!(ok(&mut p.sq, "query-status", json!({}))["status"], "running");
    assert_eq!(ok(&mut p.dq, "query-status", json!({}))["status"], "inmigrate");
    let left = bitmaps(&mut p.dq, "disk");
    assert_eq!(left.len(), 1, "only the destination's own bitmap is left: {left:?}");
    // (It records the mirror's writes into this disk, as any recording bitmap would.)
    assert_eq!((&left[0]["name"], &left[0]["granularity"]), (&json!("frozen"), &json!(512)));
    // The source's bitmaps are still there, recording as before.
    assert_eq!(bitmaps(&mut p.sq, "disk").len(), 2);

    // Without the clash the next attempt carries both, bit for bit.
    ok(&mut p.dq, "block-dirty-bitmap-remove", json!({"node": "disk", "name": "frozen"}));
    wait_for(&mut p.sq, "query-block-jobs", "READY again", |v| v[0]["ready"] == true);
    let m = p.migrate();
    assert_eq!(m["status"], "completed", "{m}");
    wait_for(&mut p.dq, "query-migrate", "the destination to complete", |v| v["status"] == "completed");
    let (src, dst) = (bitmaps(&mut p.sq, "disk"), bitmaps(&mut p.dq, "disk"));
    assert_eq!(described(&src), described(&dst));
    assert_eq!(dst.len(), 2, "{dst:?}");
    assert_eq!(
        (&dst[0]["name"], &dst[0]["granularity"], &dst[0]["recording"]),
        (&json!("frozen"), &json!(4096), &json!(false))
    );
    assert_eq!(
        (&dst[1]["name"], &dst[1]["granularity"], &dst[1]["recording"]),
        (&json!("inc0"), &json!(65536), &json!(true))
    );
    assert!(dst[1]["count"].as_u64().unwrap() > 0, "the guest's writes are in it: {dst:?}");
    for name in ["inc0", "frozen"] {
        assert_eq!(sha(&mut p.sq, "disk", name), sha(&mut p.dq, "disk", name), "{name}");
    }
    // The destination's guest runs: the recording bitmap records, the disabled one does not.
    // (Cleared first: the source's guest may have dirtied every granule already.)
    let frozen = sha(&mut p.dq, "disk", "frozen");
    ok(&mut p.dq, "block-dirty-bitmap-clear", json!({"node": "disk", "name": "inc0"}));
    ok(&mut p.dq, "cont", json!({}));
    let deadline = Instant::now() + Duration::from_secs(30);
    while bitmaps(&mut p.dq, "disk")[1]["count"] == 0 {
        assert!(Instant::now() < deadline, "inc0 never recorded the destination's writes");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sha(&mut p.dq, "disk", "frozen"), frozen);
}

#[test]
#[cfg(feature = "failpoints")]
fn a_mapping_carries_bitmaps_between_other_node_names_and_a_failure_leaves_none() {
    if !common::kvm_or_skip() {
        return;
    }
    // The destination fails once it created the bitmaps, before PREPARED.
    let mut p = pair("vda", &[("FAILPOINTS", "migration::incoming-before-prepared=return")]);
    source_bitmaps(&mut p.sq);
    let map = |node: &str, inc0: &str, frozen: &str| {
        json!([{"node-name": node, "alias": "d0", "bitmaps": [
            {"name": inc0, "alias": "b-inc"},
            {"name": frozen, "alias": "b-frozen", "transform": {"persistent": false}},
        ]}])
    };
    ok(&mut p.sq, "migrate-set-parameters", json!({"block-bitmap-mapping": map("disk", "inc0", "frozen")}));
    ok(&mut p.dq, "migrate-set-parameters", json!({"block-bitmap-mapping": map("vda", "backup-0", "old")}));
    let before = sha(&mut p.sq, "disk", "frozen");
    let m = p.migrate();
    assert_eq!(m["status"], "failed", "{m}");
    assert!(m["error-desc"].as_str().unwrap_or("").contains("incoming-before-prepared"), "{m}");
    wait_for(&mut p.dq, "query-migrate", "the destination to roll back", |v| v["status"] == "failed");
    assert_eq!(bitmaps(&mut p.dq, "vda"), Vec::<Value>::new(), "no bitmap left behind");
    assert_eq!(ok(&mut p.sq, "query-status", json!({}))["status"], "running");
    assert_eq!(sha(&mut p.sq, "disk", "frozen"), before, "the source's bitmap is as it was");

    ok(&mut p.dq, "x-baton-failpoint", json!({"name": "migration::incoming-before-prepared", "actions": "off"}));
    // The source fails after PREPARED: its ABORT makes the destination remove what it created.
    ok(&mut p.sq, "x-baton-failpoint", json!({"name": "migration::before-commit", "actions": "return"}));
    wait_for(&mut p.sq, "query-block-jobs", "READY again", |v| v[0]["ready"] == true);
    let m = p.migrate();
    assert_eq!(m["status"], "failed", "{m}");
    let dm = wait_for(&mut p.dq, "query-migrate", "the destination to roll back", |v| v["status"] == "failed");
    assert!(dm["error-desc"].as_str().unwrap_or("").contains("the source aborted"), "{dm}");
    assert_eq!(bitmaps(&mut p.dq, "vda"), Vec::<Value>::new(), "no bitmap left behind after ABORT");
    assert_eq!(sha(&mut p.sq, "disk", "frozen"), before);
    ok(&mut p.sq, "x-baton-failpoint", json!({"name": "migration::before-commit", "actions": "off"}));
    wait_for(&mut p.sq, "query-block-jobs", "READY again", |v| v[0]["ready"] == true);
    let m = p.migrate();
    assert_eq!(m["status"], "completed", "{m}");
    wait_for(&mut p.dq, "query-migrate", "the destination to complete", |v| v["status"] == "completed");
    let names: Vec<Value> = bitmaps(&mut p.dq, "vda").iter().map(|b| b["name"].clone()).collect();
    assert_eq!(names, vec![json!("backup-0"), json!("old")]);
    assert_eq!(sha(&mut p.sq, "disk", "inc0"), sha(&mut p.dq, "vda", "backup-0"));
    assert_eq!(sha(&mut p.sq, "disk", "frozen"), sha(&mut p.dq, "vda", "old"));
    assert_eq!(bitmaps(&mut p.dq, "vda")[1]["recording"], false);
}

#[test]
fn a_mapping_naming_what_the_source_lacks_is_refused_at_migrate_changing_nothing() {
    if !common::kvm_or_skip() {
        return;
    }
    let mut p = pair("disk", &[]);
    ok(&mut p.sq, "block-dirty-bitmap-add", json!({"node": "disk", "name": "inc0"}));
    // QEMU's set-time rules: refused by migrate-set-parameters, nothing set.
    let e = err(
        &mut p.sq,
        "migrate-set-parameters",
        json!({"block-bitmap-mapping": [{"node-name": "disk", "alias": "d0", "bitmaps": []},
                                        {"node-name": "tgt", "alias": "d0", "bitmaps": []}]}),
    );
    assert!(e.contains("The node alias 'd0' is used twice"), "{e}");
    let e = err(
        &mut p.sq,
        "migrate-set-parameters",
        json!({"block-bitmap-mapping": [{"node-name": "disk", "alias": "0d", "bitmaps": []}]}),
    );
    assert!(e.contains("The node alias '0d' is not well-formed"), "{e}");
    let uri = format!("unix:{}", p.dir.path().join("mig.sock").display());
    for (mapping, want) in [
        (
            json!([{"node-name": "nosuch", "alias": "d0", "bitmaps": []}]),
            "names node 'nosuch', which does not exist here",
        ),
        (
            json!([{"node-name": "disk", "alias": "d0", "bitmaps": [{"name": "nope", "alias": "b"}]}]),
            "names bitmap 'nope' of node 'disk', which does not exist here",
        ),
        (
            json!([{"node-name": "disk", "alias": "d0", "bitmaps": [{"name": "inc0", "alias": "b", "transform": {"persistent": true}}]}]),
            "bitmap 'inc0' of node 'disk' would be persistent",
        ),
    ] {
        ok(&mut p.sq, "migrate-set-parameters", json!({ "block-bitmap-mapping": mapping }));
        let e = err(&mut p.sq, "migrate", json!({ "uri": uri }));
        assert!(e.contains(want), "{e} (want {want})");
        assert_eq!(ok(&mut p.sq, "query-migrate", json!({})), json!({}), "no attempt began");
        assert_eq!(ok(&mut p.sq, "query-status", json!({}))["status"], "running");
    }
    assert_eq!(ok(&mut p.dq, "query-migrate", json!({})), json!({}), "the destination heard nothing");
    assert_eq!(bitmaps(&mut p.sq, "disk").len(), 1);
    // While an attempt runs, what it carries is busy (QEMU's rule); a cancel frees it.
    let good = json!([{"node-name": "disk", "alias": "d0", "bitmaps": [{"name": "inc0", "alias": "b"}]}]);
    ok(&mut p.sq, "migrate-set-parameters", json!({ "block-bitmap-mapping": good }));
    let pause = json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]});
    ok(&mut p.sq, "migrate-set-capabilities", pause);
    ok(&mut p.sq, "migrate", json!({ "uri": uri }));
    wait_for(&mut p.sq, "query-migrate", "pre-switchover", |v| v["status"] == "pre-switchover");
    assert_eq!(bitmaps(&mut p.sq, "disk")[0]["busy"], true);
    let e = err(&mut p.sq, "block-dirty-bitmap-remove", json!({"node": "disk", "name": "inc0"}));
    assert!(e.contains("in use by another operation"), "{e}");
    ok(&mut p.sq, "migrate_cancel", json!({}));
    wait_for(&mut p.sq, "query-migrate", "the cancel", |v| v["status"] == "cancelled");
    assert_eq!(bitmaps(&mut p.sq, "disk")[0]["busy"], false);
    assert_eq!(ok(&mut p.sq, "query-status", json!({}))["status"], "running");
}
