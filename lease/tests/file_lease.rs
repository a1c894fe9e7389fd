#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The file backend on real files: generations, races between two handles
//! (two daemons), transfer as compare-and-swap, expiry, deadlines, corrupt
//! files, and the OFD lock held by another process.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use lease::{FileLease, Holder, Lease, LeaseError};

// Short, but long enough that a slow fsync on a loaded machine does not expire it early.
const SHORT_TTL: Duration = Duration::from_millis(1000);
const SHORT_MARGIN: Duration = Duration::from_millis(200);

/// A directory for one test's lease files: in memory where the machine has
/// /dev/shm (the fsyncs then cost nothing and do not slow the KVM tests
/// beside these; rename, fsync and OFD locks behave the same there).
fn scratch() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap()
}

fn open(dir: &std::path::Path, ttl: Duration) -> FileLease {
    FileLease::new(dir, "vm1", ttl, lease::default_margin(ttl)).unwrap()
}

fn stored(l: &FileLease) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(l.path()).unwrap()).unwrap()
}

#[tokio::test]
async fn generation_goes_up_by_one_per_change_of_hands_and_release_keeps_it() {
    let dir = scratch();
    let l = open(dir.path(), Duration::from_secs(10));
    assert_eq!(l.read().await.unwrap(), None);
    let a = l.acquire("a").await.unwrap();
    assert_eq!(a.generation, 1);
    assert_eq!(l.acquire("a").await.unwrap().generation, 1, "re-acquire by the holder keeps g");
    assert_eq!(l.renew(&a).await.unwrap().generation, 1);
    l.release(a.clone()).await.unwrap();
    assert_eq!(l.read().await.unwrap(), None);
    assert_eq!(stored(&l)["generation"], 1, "release keeps the generation");
    assert_eq!(stored(&l)["owner"], "");
    assert!(matches!(l.renew(&a).await, Err(LeaseError::Lost { generation: 1, .. })));
    let b = l.acquire("b").await.unwrap();
    assert_eq!(b.generation, 2);
    assert_eq!(l.transfer(&b, "c").await.unwrap(), Holder { owner: "c".into(), generation: 3 });
    let c = l.claim("c", 3).await.unwrap();
    assert_eq!((c.owner.as_str(), c.generation), ("c", 3));
    l.release(c).await.unwrap();
    assert_eq!(l.acquire("a").await.unwrap().generation, 4, "a generation is never reused");
}

#[tokio::test]
async fn transfer_from_a_stale_held_fails_and_changes_nothing() {
    let dir = scratch();
    let l = FileLease::new(dir.path(), "vm1", SHORT_TTL, SHORT_MARGIN).unwrap();
    let a = l.acquire("a").await.unwrap();
    tokio::time::sleep(SHORT_TTL + Duration::from_millis(50)).await;
    let b = l.acquire("b").await.unwrap();
    assert_eq!(b.generation, 2);
    let before = std::fs::read(l.path()).unwrap();
    let err = l.transfer(&a, "c").await.unwrap_err();
    assert!(matches!(err, LeaseError::HeldBy { ref owner, generation: 2, .. } if owner == "b"), "{err}");
    assert_eq!(std::fs::read(l.path()).unwrap(), before, "a failed transfer wrote the lease");
    assert_eq!(l.read().await.unwrap(), Some(Holder { owner: "b".into(), generation: 2 }));
}

#[tokio::test]
async fn only_the_target_claims_a_transfer_at_its_generation() {
    let dir = scratch();
    let l = open(dir.path(), Duration::from_secs(10));
    let a = l.acquire("a").await.unwrap();
    assert_eq!(l.transfer(&a, "b").await.unwrap().generation, 2);
    assert!(matches!(l.transfer(&a, "c").await, Err(LeaseError::HeldBy { generation: 2, .. })), "a second transfer");
    assert!(matches!(l.claim("c", 2).await, Err(LeaseError::HeldBy { .. })), "the wrong owner claimed");
    assert!(matches!(l.claim("b", 3).await, Err(LeaseError::HeldBy { .. })), "the wrong generation claimed");
    let err = l.claim("b", 1).await.unwrap_err();
    assert!(matches!(err, LeaseError::Stale { presented: 1, current: 2, .. }), "{err}");
    assert_eq!(err.to_string(), "generation 1 of the lease of guest vm1 is stale: the lease is at generation 2");
    assert!(matches!(l.renew(&a).await, Err(LeaseError::HeldBy { .. })), "the source renewed after the transfer");
    assert_eq!(l.claim("b", 2).await.unwrap().generation, 2);
}

#[tokio::test]
async fn an_unrenewed_lease_expires_and_the_old_holder_loses_it() {
    let dir = scratch();
    let l = FileLease::new(dir.path(), "vm1", SHORT_TTL, SHORT_MARGIN).unwrap();
    let a = l.acquire("a").await.unwrap();
    let err = l.acquire("b").await;
    // Before a's deadline (which comes before the store's expiry) nobody
    // else gets it; past it, on a loaded machine, b may, rightly.
    if std::time::Instant::now() >= a.deadline {
        eprintln!("the machine is too slow for a {SHORT_TTL:?} lease: nothing to check in this run");
        return;
    }
    assert_eq!(err.unwrap_err().to_string(), "the lease of guest vm1 is held by a at generation 1");
    tokio::time::sleep(SHORT_TTL + Duration::from_millis(50)).await;
    assert_eq!(l.read().await.unwrap(), None, "an expired lease is free");
    assert!(matches!(l.renew(&a).await, Err(LeaseError::Lost { .. })), "renewed after expiry");
    let b = l.acquire("b").await.unwrap();
    assert_eq!(b.generation, 2);
    assert!(matches!(l.renew(&a).await, Err(LeaseError::HeldBy { generation: 2, .. })));
}

#[tokio::test]
async fn renewing_keeps_the_lease_past_one_ttl() {
    let dir = scratch();
    // 2 s of lease renewed every 500 ms for 2.5 s: past one ttl, with room
    // for a slow fsync on a loaded machine.
    let l = FileLease::new(dir.path(), "vm1", Duration::from_secs(2), SHORT_MARGIN).unwrap();
    let mut a = l.acquire("a").await.unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        a = l.renew(&a).await.unwrap();
    }
    let got = l.acquire("b").await;
    assert!(matches!(got, Err(LeaseError::HeldBy { generation: 1, .. })), "{got:?}");
}

#[tokio::test]
async fn the_local_deadline_comes_a_margin_before_the_stores_expiry() {
    let dir = scratch();
    let l = FileLease::new(dir.path(), "vm1", Duration::from_secs(5), Duration::from_secs(1)).unwrap();
    let before_send = Instant::now();
    let a = l.acquire("a").await.unwrap();
    let (now, wall) = (Instant::now(), SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap());
    let store_left = Duration::from_millis(stored(&l)["expires_ms"].as_u64().unwrap()).saturating_sub(wall);
    let local_left = a.deadline.saturating_duration_since(now);
    // +1 ms: the store keeps whole milliseconds.
    assert!(
        local_left + Duration::from_secs(1) <= store_left + Duration::from_millis(1),
        "{local_left:?} vs {store_left:?}"
    );
    assert!(a.deadline <= before_send + Duration::from_secs(4) + now.duration_since(before_send));
    assert!(a.deadline >= before_send + Duration::from_secs(4), "the deadline is measured from the send time");
}

#[tokio::test]
async fn corrupt_and_foreign_lease_files_are_refused_with_their_path() {
    let dir = scratch();
    let l = open(dir.path(), Duration::from_secs(10));
    let cases: [&[u8]; 5] = [
        b"",
        b"{\"owner\":\"a\",\"generation\":1,\"expi",
        b"\x00\xff garbage",
        b"{\"owner\":\"a\",\"generation\":1,\"expires_ms\":1,\"colour\":\"red\"}",
        b"{\"owner\":\"a\",\"generation\":0,\"expires_ms\":1}",
    ];
    for content in cases {
        std::fs::write(l.path(), content).unwrap();
        for err in [l.acquire("b").await.unwrap_err(), l.read().await.unwrap_err()] {
            let msg = err.to_string();
            assert!(matches!(err, LeaseError::Backend(_)), "{msg}");
            assert!(msg.contains(&l.path().display().to_string()) && msg.contains("is not a lease file"), "{msg}");
        }
        assert_eq!(std::fs::read(l.path()).unwrap(), content, "a refused transaction rewrote the file");
    }
}

#[test]
fn bad_keys_and_margins_are_refused() {
    let ttl = Duration::from_secs(1);
    for key in ["", "../etc/passwd", ".vm1", "a/b", "vm 1"] {
        let err = FileLease::new("/tmp", key, ttl, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, LeaseError::InvalidKey(_)), "{key:?}: {err}");
    }
    assert!(matches!(FileLease::new("/tmp", "vm1", ttl, ttl), Err(LeaseError::InvalidOption(_))));
}

#[tokio::test]
async fn leases_work_behind_a_dyn_lease() {
    let dir = scratch();
    let l: Arc<dyn Lease> = Arc::new(open(dir.path(), Duration::from_secs(10)));
    assert_eq!(l.acquire("a").await.unwrap().generation, 1);
    assert!(dir.path().join("vm1.lease").exists());
}

/// The child's side of `another_process_holding_the_lock_blocks_our_transaction`:
/// takes the OFD write lock on the lock file, says so, holds it, exits.
#[test]
fn ofd_lock_helper_process() {
    let Ok(path) = std::env::var("LEASE_TEST_HOLD_LOCK") else { return };
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).unwrap();
    let fl = nix::libc::flock {
        l_type: nix::libc::F_WRLCK as nix::libc::c_short,
        l_whence: nix::libc::SEEK_SET as nix::libc::c_short,
        l_start: lease::LOCK_BYTE,
        l_len: 1,
        l_pid: 0,
    };
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)).unwrap();
    println!("LOCKED");
    std::thread::sleep(Duration::from_millis(700));
    drop(file);
}

#[tokio::test]
async fn another_process_holding_the_lock_blocks_our_transaction() {
    let dir = scratch();
    let l = open(dir.path(), Duration::from_secs(10));
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["ofd_lock_helper_process", "--exact", "--nocapture", "--test-threads=1"])
        .env("LEASE_TEST_HOLD_LOCK", l.lock_path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|line| line.unwrap().contains("LOCKED")), "the helper never took the lock");
    let start = Instant::now();
    let a = l.acquire("a").await.unwrap();
    let waited = start.elapsed();
    assert!(child.wait().unwrap().success());
    assert_eq!(a.generation, 1);
    assert!(waited >= Duration::from_millis(400), "the acquire did not wait for the other process: {waited:?}");
    let start = Instant::now();
    l.renew(&a).await.unwrap();
    assert!(start.elapsed() < Duration::from_millis(300), "an uncontended transaction is slow");
}

mod shared;

fn file_pair(dir: &std::path::Path, ttl: Duration) -> shared::Pair {
    let margin = lease::default_margin(ttl);
    [
        Arc::new(FileLease::new(dir, "vm1", ttl, margin).unwrap()),
        Arc::new(FileLease::new(dir, "vm1", ttl, margin).unwrap()),
    ]
}

#[tokio::test]
async fn shared_generations() {
    let dir = scratch();
    shared::generations(file_pair(dir.path(), Duration::from_secs(10))).await;
}

#[tokio::test]
async fn shared_claims() {
    let dir = scratch();
    shared::claims(file_pair(dir.path(), Duration::from_secs(10))).await;
}

#[tokio::test]
async fn shared_expiry() {
    let dir = scratch();
    shared::expiry(file_pair(dir.path(), Duration::from_secs(2)), Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_race() {
    let dir = scratch();
    shared::race(file_pair(dir.path(), Duration::from_secs(10)), 25).await;
}

#[tokio::test]
async fn shared_renewing() {
    let dir = scratch();
    shared::renewing(file_pair(dir.path(), Duration::from_secs(2)), Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_concurrent_transfers() {
    let dir = scratch();
    shared::concurrent_transfers(file_pair(dir.path(), Duration::from_secs(10)), 10).await;
}
