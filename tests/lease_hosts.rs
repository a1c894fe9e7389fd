#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The lease across hosts that share nothing: network namespaces on a
//! switch of their own (two daemon hosts, three etcd members each on its
//! own host), the migration and the storage copy over TCP between the
//! daemon hosts through the project's delay proxy (10 ms each way) with
//! 0.1% of packets dropped by nftables; faults are etcd members killed, a
//! host cut off by nftables. Each case checks that exactly one daemon runs
//! the guest, that the old holder's guest does not advance, and that no two
//! daemons hold the same generation.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::delay::DelayProxy;
use common::etcd::EtcdCluster;
use common::netns::{Host, Hosts};
use common::{ok, wait_for, Proc, Qmp};
use serde_json::{json, Value};

const TTL_MS: u64 = 4000;

struct Lab {
    hosts: Hosts,
    etcd: EtcdCluster,
    dir: tempfile::TempDir,
    a: Host,
    b: Host,
}

impl Lab {
    fn new() -> Lab {
        let hosts = Hosts::with(&["a", "b", "e1", "e2", "e3"]);
        let etcd = EtcdCluster::start(&hosts, [hosts.host("e1"), hosts.host("e2"), hosts.host("e3")]);
        let (a, b) = (hosts.host("a"), hosts.host("b"));
        Lab { hosts, etcd, dir: tempfile::tempdir().unwrap(), a, b }
    }

    fn d(&self, n: &str) -> String {
        self.dir.path().join(n).display().to_string()
    }

    fn lease(&self, owner: &str) -> String {
        format!("backend=etcd,endpoints={},key=vm1,ttl={TTL_MS},owner={owner}", self.etcd.endpoints().join("+"))
    }

    /// A daemon on `host` with a 32 MiB guest on its own 64 MiB image `name`.img.
    fn daemon(&self, host: Host, name: &str, extra: &[String]) -> (Proc, Qmp) {
        let img = format!("{name}.img");
        std::fs::File::create(self.d(&img)).unwrap().set_len(64 << 20).unwrap();
        let sock = format!("{name}.sock");
        let mut c = self.hosts.command(host, env!("CARGO_BIN_EXE_baton"));
        c.arg("daemon")
            .args([
                "--blockdev".to_string(),
                format!("driver=file,node-name=disk,filename={}", self.d(&img)),
                "--vm".into(),
                "memory=32M,disk=disk".into(),
                "--lease".into(),
                self.lease(name),
                "--qmp".into(),
                format!("unix:{}", self.d(&sock)),
            ])
            .args(extra)
            .stdout(std::process::Stdio::null());
        let p = Proc(c.spawn().unwrap());
        let q = Qmp::connect(&self.dir.path().join(&sock));
        (p, q)
    }
}

fn status(q: &mut Qmp) -> Value {
    ok(q, "query-status", json!({}))
}

fn batches(q: &mut Qmp) -> u64 {
    ok(q, "x-baton-guest-stats", json!({}))["batches"].as_u64().unwrap()
}

fn finished(v: &Value) -> bool {
    matches!(v["status"].as_str(), Some("completed" | "failed" | "cancelled"))
}

fn held(q: &mut Qmp) -> Value {
    wait_for(q, "query-status", "the lease to be held", |s| s["x-baton-lease"]["status"] == "held")
}

/// No two daemons report holding the lease at the same generation.
fn one_holder_per_generation(sides: &mut [&mut Qmp]) {
    let mut gens = Vec::new();
    for q in sides.iter_mut() {
        let l = status(q)["x-baton-lease"].clone();
        if l["status"] == "held" {
            gens.push(l["generation"].as_u64().unwrap());
        }
    }
    let n = gens.len();
    gens.sort_unstable();
    gens.dedup();
    assert_eq!(gens.len(), n, "two daemons hold the same generation");
}

/// The case: a 32 MiB guest writing its 64 MiB disk moves from host
/// A to host B over TCP with 10 ms of added delay each way and 0.1% loss,
/// its lease on a three-member etcd cluster; one member is killed while the
/// handover is under way (held just before the source's last state goes)
/// and the handover completes. The guest's full check passes on B and the
/// generation went up by exactly one.
#[test]
fn a_leased_guest_moves_between_two_hosts_over_a_slow_lossy_link() {
    if !common::kvm_or_skip() {
        return;
    }
    let mut lab = Lab::new();
    let (a, b) = (lab.a, lab.b);
    let baddr = lab.hosts.addr(b).to_string();
    let (_dp, mut dq) = lab.daemon(b, "dst", &["--incoming".into(), format!("tcp:{baddr}:4444")]);
    ok(&mut dq, "migrate-set-parameters", json!({"x-baton-storage-port": 4445}));
    let (_sp, mut sq) = lab.daemon(a, "src", &[]);
    let g = held(&mut sq)["x-baton-lease"]["generation"].as_u64().unwrap();
    lab.hosts.loss(a, 1);
    lab.hosts.loss(b, 1);
    // The delay proxy on host A, in front of B's migration and copy ports.
    let delay = Duration::from_millis(10);
    let proxy = |port: u16| {
        let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let target: SocketAddr = format!("{baddr}:{port}").parse().unwrap();
        DelayProxy::start(Some(lab.hosts.ns(a)), listen, target, delay)
    };
    let (_p1, _p2) = (proxy(4444), proxy(4445));
    ok(&mut sq, "x-baton-failpoint", json!({"name": "migration::before-end", "actions": "return(hold)"}));
    let t = Instant::now();
    ok(&mut sq, "migrate", json!({"uri": "tcp:127.0.0.1:4444", "x-baton-storage": "copy"}));
    wait_for(&mut sq, "query-migrate", "the handover to reach its last state", |m| {
        m["x-baton-held"].as_array().is_some_and(|h| h.iter().any(|p| p == "migration::before-end")) || finished(m)
    });
    lab.etcd.kill(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(lab.etcd.healthy(1) && lab.etcd.healthy(2)) {
        assert!(Instant::now() < deadline, "two etcd members never agreed on a leader");
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(&mut sq, "x-baton-failpoint", json!({"name": "migration::before-end", "actions": "off"}));
    let m = wait_for(&mut sq, "query-migrate", "the end", finished);
    assert_eq!(m["status"], "completed", "{m}");
    let d = wait_for(&mut dq, "query-status", "host B to run the guest", |s| s["status"] == "running");
    assert_eq!(d["x-baton-lease"]["generation"].as_u64(), Some(g + 1), "{d}");
    let s = status(&mut sq);
    assert_eq!(s["status"], "postmigrate", "{s}");
    let e = sq.execute("cont", json!({}));
    assert!(
        e["error"]["desc"].as_str().unwrap_or("").contains(&format!("moved to dst at generation {}", g + 1)),
        "{e}"
    );
    let stopped = batches(&mut sq);
    let v = ok(&mut dq, "x-baton-guest-verify", json!({}));
    assert!(v["checked"].as_u64().unwrap() > 0 && v["mismatches"] == 0, "{v}");
    assert_eq!(batches(&mut sq), stopped, "the old holder's guest advanced");
    one_holder_per_generation(&mut [&mut sq, &mut dq]);
    eprintln!(
        "migrated in {:?} (with an etcd member killed and re-elected meanwhile); packets dropped: A {}, B {}",
        t.elapsed(),
        lab.hosts.dropped(a),
        lab.hosts.dropped(b)
    );
}

/// Host A cut off (its guest running, no migration): it pauses itself
/// before its lease can expire; a daemon on host B cannot take the lease
/// while it is valid, and can after the ttl. Healed, A finds the lease
/// taken: its guest stays paused, its `cont` names the holder.
#[test]
fn a_holder_cut_off_from_etcd_pauses_itself_and_the_lease_waits_out_its_ttl() {
    if !common::kvm_or_skip() {
        return;
    }
    let lab = Lab::new();
    let (a, b) = (lab.a, lab.b);
    let (_sp, mut sq) = lab.daemon(a, "src", &[]);
    held(&mut sq);
    let (_ip, mut iq) = lab.daemon(b, "other", &["-S".into()]);
    lab.hosts.cut(a);
    let cut = Instant::now();
    let s = wait_for(&mut sq, "query-status", "host A to fence its guest", |s| s["status"] == "paused");
    let paused_after = cut.elapsed();
    assert!(paused_after < Duration::from_millis(TTL_MS), "paused {paused_after:?} after the cut: past the ttl");
    assert_eq!(s["x-baton-lease"]["status"], "fenced", "{s}");
    let stopped = batches(&mut sq);
    // Valid in the store still: nobody else may take it.
    let r = iq.execute("cont", json!({}));
    if cut.elapsed() < Duration::from_millis(TTL_MS - 500) {
        let e = r["error"]["desc"].as_str().unwrap_or_else(|| panic!("took a valid lease: {r}"));
        assert!(e.contains("held by src at generation 1"), "{e}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while iq.execute("cont", json!({})).get("return").is_none() {
        assert!(Instant::now() < deadline, "host B never got the expired lease");
        std::thread::sleep(Duration::from_millis(200));
    }
    let taken_after = cut.elapsed();
    // The store's expiry counts from A's last renewal, up to a quarter ttl
    // before the cut; A paused before B could take the lease, never after.
    assert!(taken_after > paused_after, "B took the lease {taken_after:?} after the cut, A paused {paused_after:?}");
    assert!(taken_after >= Duration::from_millis(TTL_MS * 3 / 4 - 200), "taken {taken_after:?} after the cut");
    assert_eq!(status(&mut iq)["x-baton-lease"]["generation"], 2);
    lab.hosts.heal(a);
    std::thread::sleep(Duration::from_millis(TTL_MS / 2));
    let s = status(&mut sq);
    assert_eq!(s["status"], "paused", "{s}");
    let e = sq.execute("cont", json!({}));
    assert!(e["error"]["desc"].as_str().unwrap_or("").contains("held by other at generation 2"), "{e}");
    assert_eq!(batches(&mut sq), stopped, "the old holder's guest advanced");
    one_holder_per_generation(&mut [&mut sq, &mut iq]);
    eprintln!("host A paused {paused_after:?} after the cut; host B took the lease {taken_after:?} after it");
}

/// Two of three etcd members killed: no quorum. The holder cannot renew
/// and pauses itself; a migration cannot commit and both sides roll back.
/// Members back: exactly one side runs (the source, re-acquiring).
#[test]
fn without_quorum_nothing_commits_and_one_side_runs_after() {
    if !common::kvm_or_skip() {
        return;
    }
    let mut lab = Lab::new();
    let (a, b) = (lab.a, lab.b);
    let baddr = lab.hosts.addr(b).to_string();
    let (_dp, mut dq) = lab.daemon(b, "dst", &["--incoming".into(), format!("tcp:{baddr}:4444")]);
    ok(&mut dq, "migrate-set-parameters", json!({"x-baton-storage-port": 4445}));
    let (_sp, mut sq) = lab.daemon(a, "src", &[]);
    held(&mut sq);
    lab.etcd.kill(0);
    lab.etcd.kill(1);
    let lost = Instant::now();
    let s = wait_for(&mut sq, "query-status", "the holder to fence its guest", |s| s["status"] == "paused");
    assert_eq!(s["x-baton-lease"]["status"], "fenced", "{s}");
    let paused_after = lost.elapsed();
    ok(&mut sq, "migrate", json!({"uri": format!("tcp:{baddr}:4444"), "x-baton-storage": "copy"}));
    let m = wait_for(&mut sq, "query-migrate", "the end", finished);
    assert_eq!(m["status"], "failed", "{m}");
    assert!(m["error-desc"].as_str().unwrap_or("").contains("lease"), "{m}");
    let d = wait_for(&mut dq, "query-migrate", "the destination to roll back", finished);
    assert_eq!(d["status"], "failed", "{d}");
    assert_eq!(status(&mut dq)["status"], "inmigrate");
    lab.etcd.restart(0);
    lab.etcd.restart(1);
    lab.etcd.wait_healthy();
    let s = wait_for(&mut sq, "query-status", "the source to run again", |s| s["status"] == "running");
    assert_eq!(s["x-baton-lease"]["status"], "held", "{s}");
    assert_eq!(status(&mut dq)["status"], "inmigrate");
    one_holder_per_generation(&mut [&mut sq, &mut dq]);
    eprintln!("paused {paused_after:?} after quorum was lost; resumed {:?} after", lost.elapsed());
}
