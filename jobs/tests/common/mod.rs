//! Helpers for the mirror job's in-process tests: a graph with an event log,
//! sparse images with random extents, a guest-style random writer, snapshots
//! of the graph, and the real `qemu-img` / `qemu-nbd` as judges and peers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block::{BlockBackend, Graph, IoBuf, PermSet, WriteFlags};
use jobs::mirror::{Mirror, MirrorError, MirrorOptions};
use jobs::{Job, JobManager, JobOptions, Status};
use serde_json::{json, Value};

pub const MIB: u64 = 1 << 20;
pub const KIB: u64 = 1 << 10;

/// xorshift64*: reproducible data and offsets without another dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Random bytes, never a whole zero block (so data stays data).
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&(self.next() | 1).to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

pub type Events = Arc<Mutex<Vec<(String, Value)>>>;
/// Per end event: its name and every node's users at that moment.
pub type UsersAtEnd = Arc<Mutex<Vec<(String, Vec<(String, Vec<String>)>)>>>;

/// A graph with the nbd driver, a job manager whose events are logged, and a temp dir.
pub struct Fx {
    pub dir: tempfile::TempDir,
    pub graph: Arc<Graph>,
    pub mgr: Arc<JobManager>,
    pub events: Events,
    /// For each BLOCK_JOB_{COMPLETED,CANCELLED}: every node's users at the moment it was emitted.
    pub users_at_end: UsersAtEnd,
}

impl Fx {
    pub fn new() -> Fx {
        let graph = Arc::new(Graph::new());
        baton_nbd::client::register(&graph);
        let events: Events = Arc::new(Mutex::new(Vec::new()));
        let e2 = events.clone();
        let users_at_end: UsersAtEnd = Arc::new(Mutex::new(Vec::new()));
        let u2 = users_at_end.clone();
        let g = Arc::downgrade(&graph);
        let sink: jobs::EventSink = Arc::new(move |name: &str, data| {
            if name == "BLOCK_JOB_COMPLETED" || name == "BLOCK_JOB_CANCELLED" {
                if let Some(g) = g.upgrade() {
                    let users = g
                        .nodes()
                        .iter()
                        .map(|n| (n.name().to_string(), n.users().into_iter().map(|u| u.name).collect()))
                        .collect();
                    u2.lock().unwrap().push((name.to_string(), users));
                }
            }
            e2.lock().unwrap().push((name.to_string(), data));
        });
        let mgr = JobManager::new(sink);
        Fx { dir: tempfile::tempdir().unwrap(), graph, mgr, events, users_at_end }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A sparse raw image of `size` bytes.
    pub fn image(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        sparse_image(&p, size);
        p
    }

    pub async fn add_file(&self, node: &str, path: &Path) {
        self.graph.blockdev_add(&json!({"driver": "file", "node-name": node, "filename": path})).await.unwrap();
    }

    pub async fn add(&self, opts: Value) {
        self.graph.blockdev_add(&opts).await.unwrap_or_else(|e| panic!("blockdev-add {opts}: {e}"));
    }

    /// A guest-style writer on `node`.
    pub fn guest(&self, node: &str) -> Arc<BlockBackend> {
        Arc::new(self.graph.attach(node, "guest", PermSet::GUEST_WRITER, true).unwrap())
    }

    pub fn start(&self, id: &str, speed: u64, opts: MirrorOptions) -> Result<(Arc<Job>, Mirror), MirrorError> {
        jobs::mirror::start(
            &self.graph,
            &self.mgr,
            JobOptions { id: id.into(), speed, auto_finalize: true, auto_dismiss: true },
            opts,
        )
    }

    pub fn events_named(&self, name: &str) -> Vec<Value> {
        self.events.lock().unwrap().iter().filter(|(n, _)| n == name).map(|(_, d)| d.clone()).collect()
    }

    pub fn count(&self, name: &str) -> usize {
        self.events.lock().unwrap().iter().filter(|(n, _)| n == name).count()
    }

    pub fn event_names(&self) -> Vec<String> {
        self.events.lock().unwrap().iter().map(|(n, _)| n.clone()).collect()
    }

    /// `(id, status)` of every job.
    pub fn job_list(&self) -> Vec<(String, Status)> {
        self.mgr.jobs().iter().map(|j| (j.id.clone(), j.status())).collect()
    }

    /// Users named like a job's ("job 'ID'") on any node.
    pub fn job_users(&self) -> Vec<(String, String)> {
        self.graph
            .nodes()
            .iter()
            .flat_map(|n| {
                n.users()
                    .into_iter()
                    .filter(|u| u.name.starts_with("job "))
                    .map(|u| (n.name().to_string(), u.name))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Drop the mirror's stats handle and wait (bounded) until no node has a job user left.
    pub async fn release(&self, mirror: Mirror) {
        drop(mirror);
        wait_until("the ended job to detach from its nodes", secs(2), || self.job_users().is_empty()).await;
    }

    /// Wait (bounded) until `job` concluded and, auto-dismissed, left the job list.
    pub async fn wait_done(&self, job: &Job) {
        wait_finished(job, secs(5)).await;
        wait_until("the concluded job to be dismissed", secs(1), || !self.mgr.jobs().iter().any(|j| j.id == job.id))
            .await;
    }

    pub fn snapshot(&self) -> Vec<NodeSnap> {
        snapshot(&self.graph)
    }
}

/// What a graph looks like from outside: per node, its state, users, bitmaps and applied permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSnap {
    pub name: String,
    pub active: bool,
    pub users: Vec<(String, PermSet)>,
    pub bitmaps: Vec<String>,
    pub applied: PermSet,
}

pub fn snapshot(graph: &Graph) -> Vec<NodeSnap> {
    graph
        .nodes()
        .iter()
        .map(|n| NodeSnap {
            name: n.name().to_string(),
            active: n.is_active(),
            users: n.users().into_iter().map(|u| (u.name, u.perms)).collect(),
            bitmaps: n.bitmaps().iter().map(|b| b.name().to_string()).collect(),
            applied: n.applied_perms(),
        })
        .collect()
}

pub fn sparse_image(p: &Path, size: u64) {
    let f = std::fs::File::create(p).unwrap();
    f.set_len(size).unwrap();
}

/// Write `count` extents of `len` random bytes at random `len`-aligned offsets.
pub fn fill_extents(p: &Path, rng: &mut Rng, count: usize, len: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    let size = f.metadata().unwrap().len();
    for _ in 0..count {
        let off = rng.below(size / len) * len;
        f.write_all_at(&rng.bytes(len as usize), off).unwrap();
    }
    f.sync_all().unwrap();
}

/// Write random data over `[off, off+len)`.
pub fn fill_range(p: &Path, rng: &mut Rng, off: u64, len: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&rng.bytes(len as usize), off).unwrap();
}

pub fn read_at(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(p).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, off).unwrap();
    v
}

/// Bytes the filesystem allocated for the file.
pub fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// `qemu-img compare` (the real one), with force-share since baton may still hold the images.
pub fn qemu_img_compare(a: &Path, b: &Path) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .expect("run qemu-img");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

pub fn assert_identical(a: &Path, b: &Path) {
    let (ok, text) = qemu_img_compare(a, b);
    assert!(ok && text.contains("Images are identical"), "qemu-img compare {} {}: {text}", a.display(), b.display());
}

/// The data extents `qemu-img map` reports, merged, as `(start, len)`.
pub fn data_map(p: &Path) -> Vec<(u64, u64)> {
    let out = Command::new("qemu-img")
        .args(["map", "-U", "--output=json", "-f", "raw"])
        .arg(p)
        .output()
        .expect("run qemu-img map");
    assert!(out.status.success(), "qemu-img map: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut m: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if e["data"] != json!(true) {
            continue;
        }
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match m.last_mut() {
            Some(last) if last.0 + last.1 == s => last.1 += l,
            _ => m.push((s, l)),
        }
    }
    m
}

/// Poll `f` until true or panic after `timeout`, naming `what`.
pub async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn wait_status(job: &Job, status: Status, timeout: Duration) {
    let t0 = Instant::now();
    while job.status() != status {
        assert!(
            t0.elapsed() < timeout,
            "job '{}' did not become {status:?} in {timeout:?}; it is {:?} (error {:?})",
            job.id,
            job.status(),
            job.error()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `job.wait_finished()` with a bound, so a hang is a failure and not a stuck suite.
pub async fn wait_finished(job: &Job, timeout: Duration) {
    if tokio::time::timeout(timeout, job.wait_finished()).await.is_err() {
        panic!("job '{}' did not finish in {timeout:?}; it is {:?}", job.id, job.status());
    }
}

/// A task writing random `bs`-sized blocks at random `bs`-aligned offsets
/// through `guest` until `stop`; returns how many writes it made.
pub fn spawn_writer(
    guest: Arc<BlockBackend>,
    size: u64,
    bs: u64,
    seed: u64,
    stop: Arc<AtomicBool>,
    pause: Duration,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut rng = Rng::new(seed);
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let off = rng.below(size / bs) * bs;
            let data = rng.bytes(bs as usize);
            guest.write(off, IoBuf::from_slice(&data), WriteFlags::default()).await.unwrap();
            n += 1;
            if pause.is_zero() {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(pause).await;
            }
        }
        n
    })
}

/// A `qemu-nbd` serving a raw file on a unix socket; killed on drop.
pub struct QemuNbd {
    child: Child,
    pub sock: PathBuf,
}

impl QemuNbd {
    pub fn start(file: &Path, sock: &Path) -> QemuNbd {
        let child = Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-k"])
            .arg(sock)
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qemu-nbd");
        let q = QemuNbd { child, sock: sock.to_path_buf() };
        // The file appears at bind(), a moment before listen(): wait until a
        // connection is taken (qemu-nbd -t serves the next one as usual).
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(30), "qemu-nbd does not listen on {}", sock.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        q
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serve node `node` of `graph` as export `name` through baton's own NBD server on `sock`.
pub async fn serve_baton_export(graph: &Arc<Graph>, node: &str, name: &str, sock: &Path) -> Arc<baton_nbd::Server> {
    let cfg = baton_nbd::ExportConfig {
        name: name.into(),
        description: String::new(),
        node: node.into(),
        writable: true,
        bitmaps: Vec::new(),
        allocation_depth: false,
        allow_inactive: false,
        multi_conn: true,
        id: String::new(),
    };
    let export = baton_nbd::Export::open(graph, cfg).await.unwrap();
    let server = baton_nbd::Server::new(baton_nbd::ServerConfig::default());
    server.exports.add(export).unwrap();
    let listener = tokio::net::UnixListener::bind(sock).unwrap();
    tokio::spawn(server.clone().serve(baton_nbd::Listener::Unix(listener)));
    server
}

pub fn require_tools(tools: &[&str]) {
    for t in tools {
        let found =
            std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file())).unwrap_or(false);
        assert!(found, "{t} is not installed (qemu-utils)");
    }
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// An NBD server on a unix socket that completes the handshake (fixed
/// newstyle, `NBD_OPT_EXPORT_NAME` only), then reads every request and
/// answers none: a target that stopped answering. Aborted on drop.
pub struct BlackHoleNbd {
    pub sock: PathBuf,
    /// Requests the server has read.
    pub requests: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHoleNbd {
    /// A `size`-byte writable export; `flush` says whether it advertises
    /// `NBD_CMD_FLUSH` (without it the client's flushes never reach the wire).
    pub fn start(sock: &Path, size: u64, flush: bool) -> BlackHoleNbd {
        use baton_nbd::proto;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::UnixListener::bind(sock).unwrap();
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = requests.clone();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(&proto::NBDMAGIC.to_be_bytes()).await.unwrap();
            s.write_all(&proto::IHAVEOPT.to_be_bytes()).await.unwrap();
            s.write_all(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes()).await.unwrap();
            let _cflags = s.read_u32().await.unwrap();
            loop {
                assert_eq!(s.read_u64().await.unwrap(), proto::IHAVEOPT);
                let opt = s.read_u32().await.unwrap();
                let len = s.read_u32().await.unwrap();
                let mut data = vec![0u8; len as usize];
                s.read_exact(&mut data).await.unwrap();
                if opt == proto::OPT_EXPORT_NAME {
                    let flags = proto::TFLAG_HAS_FLAGS | if flush { proto::TFLAG_SEND_FLUSH } else { 0 };
                    s.write_all(&size.to_be_bytes()).await.unwrap();
                    s.write_all(&flags.to_be_bytes()).await.unwrap();
                    break;
                }
                s.write_all(&proto::option_reply_header(opt, proto::REP_ERR_UNSUP, 0)).await.unwrap();
            }
            let mut hdr = [0u8; 28];
            while s.read_exact(&mut hdr).await.is_ok() {
                let Ok(req) = proto::Request::decode(&hdr, false) else { break };
                count.fetch_add(1, Ordering::SeqCst);
                if req.kind == proto::CMD_WRITE {
                    let mut payload = vec![0u8; req.length as usize];
                    if s.read_exact(&mut payload).await.is_err() {
                        break;
                    }
                }
            }
            // Keep our end open: whoever waits must stop waiting on its own.
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        BlackHoleNbd { sock: sock.to_path_buf(), requests, task }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for BlackHoleNbd {
    fn drop(&mut self) {
        self.task.abort();
    }
}
