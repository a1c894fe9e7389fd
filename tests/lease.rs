#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The guest's lease, end to end: `baton daemon --lease` processes that
//! share a guest's image (shared storage) and a lease store, a fault proxy
//! on the migration's connection, failpoints, SIGSTOP. Every case checks
//! the safety rule causally: the old holder's guest never advances after
//! its stop, the new holder starts from its last state (the guest's own
//! full check passes there), and no two daemons report holding the lease
//! at the same generation.

mod common;
#[path = "common/etcd1.rs"]
mod etcd_single;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::proxy::{Action, Dir, Flow, Proxy};
use common::{daemon_env, ok, wait_for, Proc, Qmp};
use serde_json::{json, Value};

/// The lease's time to live in these tests (the daemons' minimum is 1 s).
const TTL_MS: u64 = 2000;

/// Where the lease lives.
enum Store {
    File(PathBuf),
    Etcd(etcd_single::Etcd),
}

impl Store {
    fn option(&self, owner: &str) -> String {
        match self {
            Store::File(dir) => {
                format!("backend=file,dir={},key=vm1,ttl={TTL_MS},owner={owner}", dir.display())
            }
            Store::Etcd(e) => format!("backend=etcd,endpoints={},key=vm1,ttl={TTL_MS},owner={owner}", e.url),
        }
    }
}

fn stores() -> Vec<(&'static str, Store, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let leases = dir.path().join("leases");
    std::fs::create_dir(&leases).unwrap();
    vec![
        ("file", Store::File(leases), dir),
        ("etcd", Store::Etcd(etcd_single::Etcd::start()), tempfile::tempdir().unwrap()),
    ]
}

struct Rig {
    dir: tempfile::TempDir,
    store: Store,
    src: Proc,
    sq: Qmp,
    dst: Proc,
    dq: Qmp,
    proxy: Proxy,
}

const PARAMS: &str = r#"{"x-baton-connect-timeout": 2000, "x-baton-hello-timeout": 2000, "x-baton-io-timeout": 4000,
    "x-baton-prepared-timeout": 2500, "x-baton-commit-timeout": 1500}"#;

impl Rig {
    /// A source running the guest on `disk.img` with the lease (owner `src`),
    /// and a destination waiting for it on the same image (owner `dst`),
    /// reached through a fault proxy.
    fn new(store: Store) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        std::fs::File::create(dir.path().join("disk.img")).unwrap().set_len(16 << 20).unwrap();
        let d = |n: &str| dir.path().join(n).display().to_string();
        let vm = |extra: &[String]| {
            let mut a = vec![
                "--blockdev".to_string(),
                format!("driver=file,node-name=disk,filename={}", d("disk.img")),
                "--vm".into(),
                "memory=32M,disk=disk".into(),
            ];
            a.extend_from_slice(extra);
            a
        };
        let dst = daemon_env(
            &vm(&[
                "--incoming".into(),
                format!("unix:{}", d("mig.sock")),
                "--lease".into(),
                store.option("dst"),
                "--qmp".into(),
                format!("unix:{}", d("dq.sock")),
            ]),
            &[],
        );
        let src = daemon_env(
            &vm(&["--lease".into(), store.option("src"), "--qmp".into(), format!("unix:{}", d("sq.sock"))]),
            &[],
        );
        let mut sq = Qmp::connect(&dir.path().join("sq.sock"));
        let mut dq = Qmp::connect(&dir.path().join("dq.sock"));
        ok(&mut sq, "migrate-set-parameters", serde_json::from_str(PARAMS).unwrap());
        ok(&mut dq, "migrate-set-parameters", serde_json::from_str(PARAMS).unwrap());
        let proxy = Proxy::start(&dir.path().join("proxy.sock"), &dir.path().join("mig.sock"), true);
        Rig { dir, store, src, sq, dst, dq, proxy }
    }

    fn migrate(&mut self) {
        let uri = format!("unix:{}", self.dir.path().join("proxy.sock").display());
        ok(&mut self.sq, "migrate", json!({"uri": uri}));
    }

    /// A third daemon on its own image, paused, keeping the same lease as `owner`.
    fn intruder(&self, owner: &str) -> (Proc, Qmp) {
        let d = |n: &str| self.dir.path().join(n).display().to_string();
        let img = format!("{owner}.img");
        std::fs::File::create(d(&img)).unwrap().set_len(16 << 20).unwrap();
        let sock = format!("{owner}.sock");
        let p = daemon_env(
            &[
                "--blockdev".into(),
                format!("driver=file,node-name=disk,filename={}", d(&img)),
                "--vm".into(),
                "memory=32M,disk=disk".into(),
                "-S".into(),
                "--lease".into(),
                self.store.option(owner),
                "--qmp".into(),
                format!("unix:{}", d(&sock)),
            ],
            &[],
        );
        let q = Qmp::connect(&self.dir.path().join(&sock));
        (p, q)
    }
}

fn status(q: &mut Qmp) -> Value {
    ok(q, "query-status", json!({}))
}

fn lease(q: &mut Qmp) -> Value {
    status(q)["x-baton-lease"].clone()
}

fn batches(q: &mut Qmp) -> u64 {
    ok(q, "x-baton-guest-stats", json!({}))["batches"].as_u64().unwrap()
}

/// The error a command returns; it must fail.
fn refused(q: &mut Qmp, cmd: &str) -> String {
    let r = q.execute(cmd, json!({}));
    r["error"]["desc"].as_str().unwrap_or_else(|| panic!("{cmd} should fail: {r}")).to_string()
}

/// No two daemons report holding the lease at the same generation.
fn one_holder_per_generation(sides: &mut [&mut Qmp]) {
    let mut held = Vec::new();
    for q in sides.iter_mut() {
        let l = lease(q);
        if l["status"] == "held" {
            held.push((l["owner"].clone(), l["generation"].as_u64().unwrap()));
        }
    }
    let mut gens: Vec<u64> = held.iter().map(|h| h.1).collect();
    gens.sort_unstable();
    gens.dedup();
    assert_eq!(gens.len(), held.len(), "two daemons hold the same generation: {held:?}");
}

/// The guest's own full check on the side that runs it: every block it
/// wrote anywhere before is there.
fn verified(q: &mut Qmp) {
    let v = ok(q, "x-baton-guest-verify", json!({}));
    assert!(v["checked"].as_u64().unwrap() > 0 && v["mismatches"] == 0, "{v}");
}

/// The source's guest does not advance for `d` (it is stopped for good).
fn frozen(q: &mut Qmp, d: Duration) -> u64 {
    let b = batches(q);
    std::thread::sleep(d);
    assert_eq!(batches(q), b, "the old holder's guest advanced after its stop");
    b
}

fn wait_status(q: &mut Qmp, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    wait_for(q, "query-status", what, f)
}

fn finished(v: &Value) -> bool {
    matches!(v["status"].as_str(), Some("completed" | "failed" | "cancelled"))
}

/// A completed migration moves the lease from generation g to g+1; the old
/// source's `cont` is refused naming the holder; a third daemon's `cont` is
/// refused naming whoever holds it.
#[test]
fn a_migration_moves_the_lease_and_the_guest_runs_in_one_place() {
    if !common::kvm_or_skip() {
        return;
    }
    for (name, store, _keep) in stores() {
        let mut r = Rig::new(store);
        let l = wait_status(&mut r.sq, "the source to hold the lease", |s| s["x-baton-lease"]["status"] == "held");
        assert_eq!(
            (l["status"].as_str(), l["x-baton-lease"]["generation"].as_u64()),
            (Some("running"), Some(1)),
            "{name}"
        );
        let (_ip, mut iq) = r.intruder("intruder");
        let e = refused(&mut iq, "cont");
        assert!(e.contains("held by src at generation 1"), "{name}: {e}");

        r.migrate();
        let m = wait_for(&mut r.sq, "query-migrate", "the end", finished);
        assert_eq!(m["status"], "completed", "{name}: {m}");
        let d = wait_status(&mut r.dq, "the destination to run", |s| s["status"] == "running");
        assert_eq!(
            (d["x-baton-lease"]["status"].as_str(), d["x-baton-lease"]["generation"].as_u64()),
            (Some("held"), Some(2)),
            "{name}: {d}"
        );
        let s = status(&mut r.sq);
        assert_eq!(s["status"], "postmigrate", "{name}");
        assert_eq!(s["x-baton-lease"]["status"], "transferred", "{name}: {s}");
        let e = refused(&mut r.sq, "cont");
        assert!(e.contains("moved to dst at generation 2"), "{name}: {e}");
        let e = refused(&mut iq, "cont");
        assert!(e.contains("held by dst at generation 2"), "{name}: {e}");
        frozen(&mut r.sq, Duration::from_millis(500));
        verified(&mut r.dq);
        one_holder_per_generation(&mut [&mut r.sq, &mut r.dq, &mut iq]);
        // Renewals keep it past several ttls.
        std::thread::sleep(Duration::from_millis(TTL_MS * 2));
        assert_eq!(lease(&mut r.dq)["generation"], 2, "{name}");
        assert_eq!(status(&mut r.dq)["status"], "running", "{name}");
        drop(r.src);
        drop(r.dst);
    }
}

/// The link cut just after PREPARED (both ways, silently): the source
/// times out, still holds g and resumes; the destination reads the store,
/// sees the source renewed, never holds the lease and rolls back. Healed
/// after longer than the ttl: nothing changes.
#[test]
fn a_link_cut_after_prepared_leaves_the_source_running_at_g() {
    if !common::kvm_or_skip() {
        return;
    }
    for (name, store, _keep) in stores() {
        let mut r = Rig::new(store);
        wait_status(&mut r.sq, "the source to hold the lease", |s| s["x-baton-lease"]["status"] == "held");
        r.proxy.on_frame(Dir::Down, vmm::stream::REPLY_PREPARED, Action::BlackHole(Dir::Down));
        r.migrate();
        // PREPARED went into the black hole; the other way goes too (the
        // source's ABORT comes only after its PREPARED wait, 1.6 s at most).
        wait_for(&mut r.dq, "query-migrate", "the destination to be prepared", |m| {
            m["x-baton-handover"] == "prepared" || finished(m)
        });
        r.proxy.set(Dir::Up, Flow::BlackHole);
        let m = wait_for(&mut r.sq, "query-migrate", "the end", finished);
        assert_eq!(m["status"], "failed", "{name}: {m}");
        let s = wait_status(&mut r.sq, "the source to resume", |s| s["status"] == "running");
        assert_eq!(s["x-baton-lease"]["generation"], 1, "{name}: {s}");
        let d = wait_for(&mut r.dq, "query-migrate", "the destination to roll back", finished);
        assert_eq!(d["status"], "failed", "{name}: {d}");
        assert!(d["error-desc"].as_str().unwrap_or("").contains("lease"), "{name}: {d}");
        let ds = status(&mut r.dq);
        assert_eq!(ds["status"], "inmigrate", "{name}: {ds}");
        assert_ne!(ds["x-baton-lease"]["status"], "held", "{name}: {ds}");
        std::thread::sleep(Duration::from_millis(TTL_MS + 500));
        r.proxy.heal();
        assert_eq!(status(&mut r.sq)["status"], "running", "{name}");
        assert_eq!(lease(&mut r.sq)["generation"], 1, "{name}");
        assert_eq!(status(&mut r.dq)["status"], "inmigrate", "{name}");
        verified(&mut r.sq);
        one_holder_per_generation(&mut [&mut r.sq, &mut r.dq]);
    }
}

/// The link lost after the commit point, before COMMIT arrives: the
/// destination reads the store, holds g+1 and runs; the source stays
/// `postmigrate`.
#[test]
fn a_commit_that_never_arrives_is_read_from_the_store() {
    if !common::kvm_or_skip() {
        return;
    }
    for (name, store, _keep) in stores() {
        let mut r = Rig::new(store);
        wait_status(&mut r.sq, "the source to hold the lease", |s| s["x-baton-lease"]["status"] == "held");
        ok(&mut r.sq, "x-baton-failpoint", json!({"name": "migration::after-commit", "actions": "return"}));
        r.migrate();
        let m = wait_for(&mut r.sq, "query-migrate", "the end", finished);
        assert_eq!(m["status"], "completed", "{name}: {m}");
        let d = wait_status(&mut r.dq, "the destination to run", |s| s["status"] == "running");
        assert_eq!(d["x-baton-lease"]["generation"], 2, "{name}: {d}");
        let dm = ok(&mut r.dq, "query-migrate", json!({}));
        assert!(dm["x-baton-decision"].as_str().unwrap_or("").contains("lease store"), "{name}: {dm}");
        assert_eq!(status(&mut r.sq)["status"], "postmigrate", "{name}");
        frozen(&mut r.sq, Duration::from_millis(300));
        verified(&mut r.dq);
        one_holder_per_generation(&mut [&mut r.sq, &mut r.dq]);
    }
}

/// A source frozen (SIGSTOP) while its guest runs, past its deadline; the
/// lease expires and another daemon takes it. Thawed, the source's guest
/// never runs again: with the VMM's own stop disabled (failpoint), only the
/// vCPUs' fence (a timer per vCPU, pending when the process thaws, and the
/// check before KVM_RUN) keeps guest code out. Its `cont` is refused,
/// naming the holder and the newer generation.
#[test]
fn a_frozen_holder_never_runs_its_guest_again_after_its_deadline() {
    if !common::kvm_or_skip() {
        return;
    }
    let (_, store, _keep) = stores().into_iter().next().unwrap();
    let mut r = Rig::new(store);
    wait_status(&mut r.sq, "the source to hold the lease", |s| s["x-baton-lease"]["status"] == "held");
    ok(&mut r.sq, "x-baton-failpoint", json!({"name": "lease::fence-stop", "actions": "return"}));
    let before = batches(&mut r.sq);
    std::thread::sleep(Duration::from_millis(300));
    assert!(batches(&mut r.sq) > before, "the guest runs before the freeze");
    let pid = nix::unistd::Pid::from_raw(r.src.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(TTL_MS + 300));
    let (_ip, mut iq) = r.intruder("intruder");
    let t = Instant::now();
    ok(&mut iq, "cont", json!({}));
    assert_eq!(lease(&mut iq)["generation"], 2);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let at_thaw = batches(&mut r.sq);
    let after = frozen(&mut r.sq, Duration::from_millis(1500));
    assert_eq!(at_thaw, after);
    let l = wait_for(&mut r.sq, "query-status", "the source to see its lease gone", |s| {
        matches!(s["x-baton-lease"]["status"].as_str(), Some("fenced" | "lost"))
    });
    assert!(l["x-baton-lease"]["fenced"].as_u64().unwrap() >= 1, "{l}");
    ok(&mut r.sq, "x-baton-failpoint", json!({"name": "lease::fence-stop", "actions": "off"}));
    ok(&mut r.sq, "stop", json!({}));
    let e = refused(&mut r.sq, "cont");
    assert!(e.contains("held by intruder at generation 2"), "{e}");
    assert_eq!(batches(&mut r.sq), after);
    one_holder_per_generation(&mut [&mut r.sq, &mut iq]);
    eprintln!("the intruder ran {:?} after it took the lease", t.elapsed());
}

/// Cut off from its store while the guest runs (etcd frozen), the holder
/// pauses itself before its lease can expire. The store back, exactly one
/// daemon runs a guest: the holder, re-acquiring at its generation, or the
/// third daemon that took the expired lease; never both.
#[test]
fn a_holder_cut_off_from_its_store_pauses_itself_before_expiry() {
    if !common::kvm_or_skip() {
        return;
    }
    let etcd = etcd_single::Etcd::start();
    let mut r = Rig::new(Store::Etcd(etcd));
    wait_status(&mut r.sq, "the source to hold the lease", |s| s["x-baton-lease"]["status"] == "held");
    let (_ip, mut iq) = r.intruder("intruder");
    let Store::Etcd(e) = &r.store else { unreachable!() };
    e.stop();
    let cut = Instant::now();
    let s = wait_status(&mut r.sq, "the holder to fence itself", |s| s["status"] == "paused");
    let paused_after = cut.elapsed();
    assert_eq!(s["x-baton-lease"]["status"], "fenced", "{s}");
    assert!(paused_after < Duration::from_millis(TTL_MS), "paused {paused_after:?} after the cut: past the ttl");
    let stopped_at = frozen(&mut r.sq, Duration::from_millis(300));
    e.resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if status(&mut r.sq)["status"] == "running" || iq.execute("cont", json!({})).get("return").is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "nobody runs the guest after the store came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(TTL_MS));
    let (s, i) = (status(&mut r.sq), status(&mut iq));
    let running = [&s, &i].iter().filter(|v| v["status"] == "running").count();
    assert_eq!(running, 1, "exactly one side runs: source {s}, intruder {i}");
    if i["status"] == "running" {
        assert_eq!(batches(&mut r.sq), stopped_at, "the old holder advanced");
    } else {
        assert_eq!(s["x-baton-lease"]["generation"], 1, "re-acquired at its own generation: {s}");
    }
    eprintln!("the holder paused {paused_after:?} after its store stopped answering");
    one_holder_per_generation(&mut [&mut r.sq, &mut iq]);
}

/// The source frozen (SIGSTOP) across the handover, after its last state
/// went and before it read PREPARED: its lease lapses, the destination
/// (which holds the guest's last state) takes it and runs. Thawed, the
/// source cannot move a lease it no longer holds: it stays paused, its
/// guest does not advance, its `cont` is refused naming the holder.
#[test]
fn a_source_frozen_across_the_handover_stays_paused_after_the_destination_runs() {
    if !common::kvm_or_skip() {
        return;
    }
    for (name, store, _keep) in stores() {
        let mut r = Rig::new(store);
        wait_status(&mut r.sq, "the source to hold the lease", |s| s["x-baton-lease"]["status"] == "held");
        ok(&mut r.sq, "x-baton-failpoint", json!({"name": "migration::after-end", "actions": "return(hold)"}));
        r.migrate();
        wait_for(&mut r.dq, "query-migrate", "the destination to be prepared", |m| {
            m["x-baton-handover"] == "prepared" || finished(m)
        });
        let stopped = batches(&mut r.sq);
        let pid = nix::unistd::Pid::from_raw(r.src.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let frozen_at = Instant::now();
        let d = wait_status(&mut r.dq, "the destination to run", |s| s["status"] == "running");
        let took = frozen_at.elapsed();
        assert_eq!(d["x-baton-lease"]["generation"], 2, "{name}: {d}");
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
        ok(&mut r.sq, "x-baton-failpoint", json!({"name": "migration::after-end", "actions": "off"}));
        let m = wait_for(&mut r.sq, "query-migrate", "the source's attempt to end", finished);
        assert_eq!(m["status"], "failed", "{name}: {m}");
        let s = status(&mut r.sq);
        assert_ne!(s["status"], "running", "{name}: {s}");
        let e = refused(&mut r.sq, "cont");
        assert!(e.contains("held by dst at generation 2"), "{name}: {e}");
        assert_eq!(frozen(&mut r.sq, Duration::from_millis(300)), stopped, "{name}: the source's guest advanced");
        verified(&mut r.dq);
        one_holder_per_generation(&mut [&mut r.sq, &mut r.dq]);
        eprintln!("{name}: the destination ran {took:?} after the source froze");
    }
}
