#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The etcd backend against a real etcd (Debian's etcd-server), one per
//! test: generations, races between two clients, transfer as
//! compare-and-swap, claims, expiry, and the etcd lease that lets a dead
//! holder's key vanish.

mod shared;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lease::{EtcdLease, Lease, LeaseError};

const ETCD: &str = "/usr/bin/etcd";

/// An etcd server on free loopback ports, in a temporary data dir; killed on drop.
struct Etcd {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    async fn start() -> Etcd {
        assert!(
            std::path::Path::new(ETCD).exists(),
            "{ETCD} is missing: run ./scripts/test, which installs etcd-server"
        );
        // Its data in memory where the machine has /dev/shm: etcd fsyncs its
        // WAL on every write, which on this shared disk slows the KVM
        // migration tests that run beside these (the lease's semantics do
        // not depend on the disk).
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = Command::new(ETCD)
            .arg("--name=default")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=default={peer_url}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut etcd = Etcd { child, url, _dir: dir };
        etcd.wait_ready().await;
        etcd
    }

    async fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(self._dir.path().join("etcd.log")).unwrap_or_default();
                panic!("etcd exited with {status}:\n{log}");
            }
            if let Ok(Ok(mut c)) =
                tokio::time::timeout(Duration::from_secs(1), etcd_client::Client::connect([&self.url], None)).await
            {
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), c.get("/ready", None)).await {
                    return;
                }
            }
            assert!(start.elapsed() < Duration::from_secs(30), "etcd at {} did not answer within 30 s", self.url);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn lease(&self, ttl: Duration) -> EtcdLease {
        EtcdLease::new(std::slice::from_ref(&self.url), "vm1", ttl, lease::default_margin(ttl)).unwrap()
    }

    fn pair(&self, ttl: Duration) -> shared::Pair {
        [Arc::new(self.lease(ttl)), Arc::new(self.lease(ttl))]
    }

    async fn raw(&self) -> etcd_client::Client {
        etcd_client::Client::connect([&self.url], None).await.unwrap()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TTL: Duration = Duration::from_secs(10);
const SHORT_TTL: Duration = Duration::from_secs(2);

#[tokio::test]
async fn generation_goes_up_by_one_per_change_of_hands_and_release_keeps_it() {
    let etcd = Etcd::start().await;
    shared::generations(etcd.pair(TTL)).await;
    let mut raw = etcd.raw().await;
    let gen = raw.get("/baton/generation/vm1", None).await.unwrap();
    assert_eq!(gen.kvs()[0].value(), b"4");
    let rec = raw.get("/baton/lease/vm1", None).await.unwrap();
    let rec: serde_json::Value = serde_json::from_slice(rec.kvs()[0].value()).unwrap();
    assert_eq!((rec["owner"].as_str(), rec["generation"].as_u64()), (Some("a"), Some(4)));
    assert_ne!(raw.get("/baton/lease/vm1", None).await.unwrap().kvs()[0].lease(), 0, "the record has no etcd lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_clients_racing_acquire_get_one_winner_per_generation() {
    let etcd = Etcd::start().await;
    shared::race(etcd.pair(TTL), 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transfers_of_one_held_have_one_winner() {
    let etcd = Etcd::start().await;
    shared::concurrent_transfers(etcd.pair(TTL), 15).await;
}

#[tokio::test]
async fn only_the_target_claims_a_transfer_at_its_generation() {
    let etcd = Etcd::start().await;
    shared::claims(etcd.pair(TTL)).await;
}

#[tokio::test]
async fn expiry_frees_the_lease_and_a_stale_transfer_changes_nothing() {
    let etcd = Etcd::start().await;
    let d = etcd.pair(SHORT_TTL);
    let (l, m) = (d[0].clone(), d[1].clone());
    let b = shared::expiry(d, SHORT_TTL).await;
    let mut raw = etcd.raw().await;
    let before = raw.get("/baton/lease/vm1", None).await.unwrap().kvs()[0].mod_revision();
    let stale = lease::Held { owner: "a".into(), generation: 1, deadline: Instant::now() };
    assert!(matches!(l.transfer(&stale, "c").await, Err(LeaseError::HeldBy { generation: 2, .. })));
    assert!(matches!(l.claim("a", 1).await, Err(LeaseError::Stale { presented: 1, current: 2, .. })));
    let after = raw.get("/baton/lease/vm1", None).await.unwrap().kvs()[0].mod_revision();
    assert_eq!(before, after, "a refused transaction wrote the key");
    m.renew(&b).await.unwrap();
}

#[tokio::test]
async fn renewing_keeps_the_lease_past_one_ttl() {
    let etcd = Etcd::start().await;
    shared::renewing(etcd.pair(SHORT_TTL), SHORT_TTL).await;
}

#[tokio::test]
async fn a_holder_that_dies_lets_its_key_vanish_and_the_generation_survives() {
    let etcd = Etcd::start().await;
    let mut raw = etcd.raw().await;
    {
        let holder = etcd.lease(SHORT_TTL);
        let a = holder.acquire("a").await.unwrap();
        assert_eq!(a.generation, 1);
        assert_eq!(raw.get("/baton/lease/vm1", None).await.unwrap().kvs().len(), 1);
        // dropped without release: the daemon died
    }
    let start = Instant::now();
    while !raw.get("/baton/lease/vm1", None).await.unwrap().kvs().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "the dead holder's key is still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = start.elapsed();
    assert!(gone >= Duration::from_millis(1000), "the key vanished before the ttl: {gone:?}");
    let other = etcd.lease(SHORT_TTL);
    assert_eq!(other.read().await.unwrap(), None);
    assert_eq!(other.acquire("b").await.unwrap().generation, 2, "the generation was lost with the key");
}

#[tokio::test]
async fn the_local_deadline_comes_a_margin_before_the_ttl_from_the_send_time() {
    let etcd = Etcd::start().await;
    let l =
        EtcdLease::new(std::slice::from_ref(&etcd.url), "vm1", Duration::from_secs(5), Duration::from_secs(1)).unwrap();
    let before = Instant::now();
    let a = l.acquire("a").await.unwrap();
    let after = Instant::now();
    assert!(a.deadline >= before + Duration::from_secs(4) && a.deadline <= after + Duration::from_secs(4));
}

#[tokio::test]
async fn an_unreachable_cluster_is_a_bounded_backend_error_naming_the_endpoints() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let l =
        EtcdLease::new(std::slice::from_ref(&url), "vm1", Duration::from_secs(2), Duration::from_millis(400)).unwrap();
    let start = Instant::now();
    let err = l.acquire("a").await.unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    let msg = err.to_string();
    assert!(matches!(err, LeaseError::Backend(_)) && msg.contains(&url) && msg.contains("vm1"), "{msg}");
}

#[tokio::test]
async fn a_corrupt_record_is_refused_naming_the_key() {
    let etcd = Etcd::start().await;
    let mut raw = etcd.raw().await;
    raw.put("/baton/lease/vm1", "not json", None).await.unwrap();
    let l = etcd.lease(TTL);
    let msg = l.acquire("a").await.unwrap_err().to_string();
    assert!(msg.contains("/baton/lease/vm1") && msg.contains("is not a lease"), "{msg}");
    assert_eq!(raw.get("/baton/lease/vm1", None).await.unwrap().kvs()[0].value(), b"not json");
}

#[tokio::test]
async fn the_option_opens_an_etcd_lease() {
    let etcd = Etcd::start().await;
    let c = lease::parse_option(&format!("backend=etcd,endpoints={},key=vm1,ttl=5000", etcd.url)).unwrap();
    let l = c.open().unwrap();
    assert_eq!(l.acquire("a").await.unwrap().generation, 1);
}
