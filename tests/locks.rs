#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Image locks against the real thing: the bytes baton's block layer holds
//! in /proc/locks are the ones qemu-nbd and qemu-storage-daemon hold for the
//! same use, they vanish on inactivation and on exit, and QEMU's tools and
//! baton refuse each other's exclusive writers.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use block::{BlockError, Graph, PermSet};
use common::locked_bytes;
use serde_json::json;

fn image(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(64 << 20).unwrap();
    p
}

/// Wait until `path` has locks and they stopped changing (a process takes
/// them one byte at a time), at most 10 s.
fn wait_locked(path: &Path) -> BTreeSet<u64> {
    let mut last = BTreeSet::new();
    for _ in 0..200 {
        let b = locked_bytes(path);
        if !b.is_empty() && b == last {
            return b;
        }
        last = b;
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no stable lock set appeared on {}: last {last:?}", path.display());
}

struct Peer(Child);
impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_nbd(path: &Path, sock: &Path, writable: bool) -> Peer {
    let mut c = Command::new("qemu-nbd");
    c.args(["-f", "raw", "-k"]).arg(sock);
    if !writable {
        c.arg("-r");
    }
    Peer(c.arg(path).stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().expect("qemu-nbd"))
}

fn qsd_export(path: &Path, sock: &Path, writable: bool) -> Peer {
    Peer(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=f,filename={}", path.display()))
            .args(["--blockdev", "driver=raw,node-name=r,file=f", "--nbd-server"])
            .arg(format!("addr.type=unix,addr.path={}", sock.display()))
            .arg("--export")
            .arg(format!("type=nbd,id=e,node-name=r,writable={}", if writable { "on" } else { "off" }))
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon"),
    )
}

async fn baton_node(path: &Path) -> Arc<Graph> {
    let g = Arc::new(Graph::new());
    g.blockdev_add(&json!({"driver": "file", "node-name": "f", "filename": path})).await.unwrap();
    g.blockdev_add(&json!({"driver": "raw", "node-name": "r", "file": "f"})).await.unwrap();
    g
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_lock_bytes_match_qemu_nbd_and_qemu_storage_daemon() {
    common::require_tools(&["qemu-nbd", "qemu-storage-daemon"]);
    let dir = tempfile::tempdir().unwrap();
    for writable in [true, false] {
        let a = image(dir.path(), "qemu.img");
        let qnbd = {
            let _p = qemu_nbd(&a, &dir.path().join("n.sock"), writable);
            wait_locked(&a)
        };
        let qsd = {
            let _p = qsd_export(&a, &dir.path().join("q.sock"), writable);
            wait_locked(&a)
        };
        let b = image(dir.path(), "baton.img");
        let g = baton_node(&b).await;
        let perms = if writable { PermSet::EXPORT_WRITABLE } else { PermSet::EXPORT_READONLY };
        let be = g.attach("r", "export 'e'", perms, false).unwrap();
        let ours = locked_bytes(&b);
        assert_eq!(ours, qnbd, "writable={writable}: baton vs qemu-nbd");
        assert_eq!(ours, qsd, "writable={writable}: baton vs qemu-storage-daemon");
        drop(be);
        assert!(locked_bytes(&b).is_empty(), "no user, no lock (as QSD without an export)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_writer_holds_virtio_blk_bytes_and_drops_them_when_inactive() {
    let dir = tempfile::tempdir().unwrap();
    let b = image(dir.path(), "guest.img");
    let g = baton_node(&b).await;
    let _guest = g.attach("r", "guest disk", PermSet::GUEST_WRITER, true).unwrap();
    // QEMU's virtio-blk (share-rw=off): consistent-read and write held (100, 101),
    // write not shared (201); read, write-unchanged and resize shared.
    assert_eq!(locked_bytes(&b), BTreeSet::from([100, 101, 201]));
    g.inactivate_all().await.unwrap();
    assert!(locked_bytes(&b).is_empty(), "inactive nodes hold no lock");
    g.activate_all().await.unwrap();
    assert_eq!(locked_bytes(&b), BTreeSet::from([100, 101, 201]), "activation re-takes the lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_cannot_write_an_image_baton_holds_as_a_guest_disk() {
    common::require_tools(&["qemu-io"]);
    let dir = tempfile::tempdir().unwrap();
    let b = image(dir.path(), "guest.img");
    let g = baton_node(&b).await;
    let guest = g.attach("r", "guest disk", PermSet::GUEST_WRITER, true).unwrap();
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x55 0 4k"]).arg(&b).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Failed to get \"write\" lock"), "qemu-io said: {stderr}");
    assert_eq!(std::fs::read(&b).unwrap()[..4096], [0; 4096]);
    // A read-only look is fine (shared consistent-read), as with QEMU.
    let out = Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read 0 4k"]).arg(&b).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Once baton lets go, qemu-io may write.
    drop(guest);
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x55 0 4k"]).arg(&b).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baton_refuses_an_image_a_qemu_exclusive_writer_holds() {
    common::require_tools(&["qemu-storage-daemon"]);
    let dir = tempfile::tempdir().unwrap();
    let b = image(dir.path(), "held.img");
    // A real QEMU exclusive writer: the target of a running (speed-limited)
    // mirror job in qemu-storage-daemon takes write and does not share it,
    // as a running VM's disk does. (qemu-io and qemu-img share write.)
    let qmp_sock = dir.path().join("qmp.sock");
    let _qsd = Peer(
        Command::new("qemu-storage-daemon")
            .args(["--blockdev", "driver=null-co,node-name=src,size=67108864,read-zeroes=on"])
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=tgt,filename={}", b.display()))
            .arg("--chardev")
            .arg(format!("socket,path={},server=on,wait=off,id=m", qmp_sock.display()))
            .args(["--monitor", "chardev=m"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut qmp = common::Qmp::connect(&qmp_sock);
    let r = qmp.execute(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "src", "target": "tgt", "sync": "full", "speed": 4096}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let held = wait_locked(&b);
    assert!(held.contains(&201), "QSD's mirror target does not share write: {held:?}");

    let g = baton_node(&b).await;
    let e = g.attach("r", "guest disk", PermSet::GUEST_WRITER, true).unwrap_err();
    // QEMU checks the bits in order and names the first: consistent read, which a
    // mirror target does not share either (qemu-io says the same on this image).
    assert!(matches!(e, BlockError::LockConflict { perm: "consistent read", .. }), "{e}");
    assert!(e.to_string().contains("\"consistent read\" lock"), "the error names the lock: {e}");
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 4k"]).arg(&b).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Failed to get \"consistent read\" lock"), "{out:?}");
    let e = g.attach("r", "export", PermSet::EXPORT_WRITABLE, false).unwrap_err();
    assert!(matches!(e, BlockError::LockConflict { .. }), "{e}");
    // A mirror target's content is not consistent yet: QSD shares no
    // consistent read either, and baton respects that too.
    let e = g.attach("r", "reader", PermSet::EXPORT_READONLY, false).unwrap_err();
    assert!(matches!(e, BlockError::LockConflict { perm: "consistent read", .. }), "{e}");
    // The failed attempts left nothing behind.
    assert_eq!(locked_bytes(&b), held, "only QSD's bytes remain");
}

#[test]
fn locks_vanish_when_baton_exits() {
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("exit.img");
    let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["exercise", "--create", "16M", "--seconds", "30", "--queue-depth", "1"])
        .arg(&b)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // The bytes are taken one fcntl at a time: wait for the whole set.
    let want = BTreeSet::from([100, 101, 201]);
    for _ in 0..200 {
        if b.exists() && locked_bytes(&b) == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(locked_bytes(&b), want);
    child.kill().unwrap();
    child.wait().unwrap();
    // The kernel drops OFD locks with the file's last reference; an io_uring
    // being torn down after the exit may hold it a few milliseconds longer.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !locked_bytes(&b).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(locked_bytes(&b).is_empty(), "the locks of a dead process are gone");
}
