#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Mirror interop with real QEMU on both sides: qemu-storage-daemon mirrors
//! into a `baton serve` export, `baton daemon` mirrors into qemu-nbd and into
//! `baton serve` (with a writer and a pivot), and the QMP errors of
//! `blockdev-mirror` / `block-job-*` are compared with qemu-storage-daemon's.
//! Every process a test starts is killed when the test ends, pass or fail.

mod common;
#[path = "common/nbd.rs"]
mod nbd_common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::require_tools;
use nbd_common::{qemu_io, run, tool, unix_uri, Server, BATON};
use serde_json::{json, Value};

const K: u64 = 1024;
const M: u64 = 1024 * 1024;
const SIZE: u64 = 256 * M;
/// How long any job event may take (debug builds, 2 shared cores).
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

fn ps(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ---------------------------------------------------------------- processes

/// A child process that is SIGKILLed on drop unless it already exited.
struct Proc {
    child: Child,
    name: String,
    stderr: PathBuf,
}

impl Proc {
    fn spawn(dir: &Path, name: &str, cmd: &mut Command) -> Proc {
        let stderr = dir.join(format!("{name}.stderr"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join(format!("{name}.stdout"))).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { child, name: name.into(), stderr }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Wait (at most `timeout`) for the process to exit on its own; panics otherwise.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}; stderr:\n{}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and a clean exit.
    fn terminate(&mut self) {
        let st = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        assert!(st.success());
        let st = self.wait_exit(Duration::from_secs(15));
        assert!(st.success(), "{} exited with {st} after SIGTERM; stderr:\n{}", self.name, self.stderr());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait for a unix socket to accept connections.
fn wait_socket(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while UnixStream::connect(p).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {}", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `qemu-nbd -f raw -t -k SOCK FILE`, ready to accept.
fn qemu_nbd(dir: &Path, sock: &Path, file: &Path) -> Proc {
    let p = Proc::spawn(dir, "qemu-nbd", Command::new("qemu-nbd").args(["-f", "raw", "-t", "-k", ps(sock), ps(file)]));
    wait_socket(sock);
    p
}

/// `baton daemon --blockdev ... --qmp unix:QMP` and a connected monitor.
fn baton_daemon(dir: &Path, blockdevs: &[String]) -> (Proc, Qmp) {
    let qmp = dir.join("baton-qmp.sock");
    let mut c = Command::new(BATON);
    c.arg("daemon");
    for b in blockdevs {
        c.args(["--blockdev", b]);
    }
    c.args(["--qmp", &format!("unix:{}", qmp.display())]);
    let p = Proc::spawn(dir, "baton-daemon", &mut c);
    let q = Qmp::connect(&qmp, "baton");
    (p, q)
}

/// `qemu-storage-daemon --blockdev ... --chardev socket,... --monitor` and a connected monitor.
fn qsd(dir: &Path, blockdevs: &[String]) -> (Proc, Qmp) {
    let qmp = dir.join("qsd-qmp.sock");
    let mut c = Command::new("qemu-storage-daemon");
    for b in blockdevs {
        c.args(["--blockdev", b]);
    }
    c.args(["--chardev", &format!("socket,path={},server=on,wait=off,id=m", qmp.display()), "--monitor", "chardev=m"]);
    let p = Proc::spawn(dir, "qsd", &mut c);
    let q = Qmp::connect(&qmp, "qsd");
    (p, q)
}

fn file_node(name: &str, path: &Path) -> String {
    format!("driver=file,node-name={name},filename={}", path.display())
}

/// The QMP arguments of an `nbd` client node on a unix socket.
fn nbd_node(name: &str, sock: &Path, export: &str) -> Value {
    json!({"driver": "nbd", "node-name": name, "server": {"type": "unix", "path": ps(sock)}, "export": export})
}

// ---------------------------------------------------------------- QMP with events

/// A synchronous QMP client that keeps the events it reads (common::Qmp drops them).
struct Qmp {
    name: String,
    writer: UnixStream,
    lines: mpsc::Receiver<Value>,
    /// Events read and not yet consumed by `wait_event`, oldest first.
    events: Vec<Value>,
    /// Every event ever read, for after-the-fact checks.
    all_events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &Path, name: &str) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(15);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot connect to {name}'s QMP at {}: {e}", path.display())
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (tx, rx) = mpsc::channel();
        let r = s.try_clone().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| json!({"x-bad-line": line, "x-error": e.to_string()}));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut q = Qmp { name: name.into(), writer: s, lines: rx, events: vec![], all_events: vec![] };
        let greeting = q.next(Duration::from_secs(15)).unwrap_or_else(|| panic!("{name}: no QMP greeting"));
        assert!(greeting.get("QMP").is_some(), "{name} greeting: {greeting}");
        q.ok("qmp_capabilities", json!({}));
        q
    }

    /// The next line, or None after `timeout`; panics on a closed monitor or a bad line.
    fn next(&mut self, timeout: Duration) -> Option<Value> {
        match self.lines.recv_timeout(timeout) {
            Ok(v) => {
                assert!(v.get("x-bad-line").is_none(), "{}: bad QMP line {v}", self.name);
                Some(v)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{}: QMP monitor closed", self.name),
        }
    }

    fn note_event(&mut self, v: Value) {
        self.all_events.push(v.clone());
        self.events.push(v);
    }

    /// Run a command; returns the reply (`return` or `error`), keeping events.
    fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let msg = json!({"execute": cmd, "arguments": args});
        writeln!(self.writer, "{msg}").unwrap();
        loop {
            let v = self.next(Duration::from_secs(30)).unwrap_or_else(|| panic!("{}: no reply to {msg}", self.name));
            if v.get("event").is_some() {
                self.note_event(v);
            } else {
                return v;
            }
        }
    }

    /// Run a command that must succeed; its `return`.
    fn ok(&mut self, cmd: &str, args: Value) -> Value {
        let r = self.execute(cmd, args.clone());
        r.get("return").cloned().unwrap_or_else(|| panic!("{}: {cmd} {args} failed: {r}", self.name))
    }

    /// Run a command that must fail; its (class, desc).
    fn err(&mut self, cmd: &str, args: Value) -> (String, String) {
        let r = self.execute(cmd, args.clone());
        let e = r.get("error").unwrap_or_else(|| panic!("{}: {cmd} {args} should fail, got {r}", self.name));
        (e["class"].as_str().unwrap().to_string(), e["desc"].as_str().unwrap().to_string())
    }

    /// Wait for (and consume) the first event named `name`; panics after `timeout`
    /// or if the job ends some other way first.
    fn wait_event(&mut self, name: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return self.events.remove(i);
            }
            let fatal = ["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"];
            if let Some(e) =
                self.events.iter().find(|e| e["event"] != name && fatal.contains(&e["event"].as_str().unwrap_or("")))
            {
                panic!("{}: waiting for {name}, got {e}", self.name);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{}: no {name} within {timeout:?}; events: {:?}", self.name, self.all_events);
            if let Some(v) = self.next(left.min(Duration::from_millis(200))) {
                if v.get("event").is_some() {
                    self.note_event(v);
                }
            }
        }
    }

    /// `quit`, then the process must exit.
    fn quit(&mut self, p: &mut Proc) {
        self.ok("quit", json!({}));
        let st = p.wait_exit(Duration::from_secs(15));
        assert!(st.success(), "{} exited with {st} after quit; stderr:\n{}", p.name, p.stderr());
    }
}

/// The fields of a query-block-jobs entry that must not move on a failed command.
fn job_shape(jobs: &Value) -> Vec<Value> {
    jobs.as_array()
        .unwrap()
        .iter()
        .map(|j| json!({"device": j["device"], "type": j["type"], "status": j["status"], "ready": j["ready"], "paused": j["paused"], "speed": j["speed"], "io-status": j["io-status"]}))
        .collect()
}

// ---------------------------------------------------------------- images

/// A deterministic pseudo-random byte stream (xorshift), different per seed.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(0x9e37_79b9) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// Where the source images hold data: 20 MiB of random bytes in five extents
/// (unaligned starts and ends included), holes between them, and 1 MiB of
/// explicitly written zeroes.
const EXTENTS: [(u64, u64); 5] = [
    (0, 4 * M),
    (17 * M + 4 * K, 5 * M),
    (100 * M, 6 * M - 512),
    (200 * M + 512 * K, 3 * M),
    (SIZE - 2 * M + 512, 2 * M - 512),
];
const WRITTEN_ZEROES: (u64, u64) = (60 * M, M);

/// A sparse 256 MiB image with `EXTENTS` of random data.
fn source_image(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    for (i, &(off, len)) in EXTENTS.iter().enumerate() {
        f.write_all_at(&pattern(len as usize, i as u32 + 1), off).unwrap();
    }
    f.write_all_at(&vec![0; WRITTEN_ZEROES.1 as usize], WRITTEN_ZEROES.0).unwrap();
    f.sync_all().unwrap();
}

/// An empty sparse 256 MiB image.
fn empty_image(path: &Path) {
    std::fs::File::create(path).unwrap().set_len(SIZE).unwrap();
}

fn assert_identical(a: &Path, b: &Path) {
    let out = run(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw", ps(a), ps(b)]));
    assert!(out.contains("Images are identical"), "{out}");
}

fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    std::fs::File::open(path).unwrap().read_exact_at(&mut buf, off).unwrap();
    buf
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

// ---------------------------------------------------------------- (a) QSD -> baton serve

/// qemu-storage-daemon mirrors into a `baton serve` export; the soft cancel
/// after READY leaves a point-in-time copy identical to the source.
#[test]
fn qsd_mirrors_into_a_baton_export() {
    require_tools(&["qemu-storage-daemon", "qemu-img"]);
    let d = tempfile::tempdir().unwrap();
    let (src, tgt, sock) = (d.path().join("src.img"), d.path().join("tgt.img"), d.path().join("tgt.sock"));
    source_image(&src);
    empty_image(&tgt);

    let mut serve = Server::start(d.path(), &["-k", ps(&sock), ps(&tgt)]);
    let (mut qsd_p, mut q) = qsd(d.path(), &[file_node("src", &src)]);
    q.ok("blockdev-add", nbd_node("tgt", &sock, ""));
    q.ok("blockdev-mirror", json!({"job-id": "m0", "device": "src", "target": "tgt", "sync": "full"}));
    let ready = q.wait_event("BLOCK_JOB_READY", EVENT_TIMEOUT);
    assert_eq!(ready["data"]["device"], "m0", "{ready}");
    assert_eq!(ready["data"]["len"], SIZE, "{ready}");
    q.ok("block-job-cancel", json!({"device": "m0"}));
    let done = q.wait_event("BLOCK_JOB_COMPLETED", EVENT_TIMEOUT);
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], done["data"]["len"], "{done}");
    assert_eq!(q.ok("query-block-jobs", json!({})), json!([]));
    q.quit(&mut qsd_p);
    serve.stop_ok();

    assert_identical(&src, &tgt);
}

// ---------------------------------------------------------------- (b) baton daemon -> qemu-nbd

/// `baton daemon` mirrors into a qemu-nbd export: identical after the soft
/// cancel, and the holes of the source stay holes on the target.
#[test]
fn baton_mirrors_into_qemu_nbd_and_keeps_the_target_sparse() {
    require_tools(&["qemu-nbd", "qemu-img"]);
    let d = tempfile::tempdir().unwrap();
    let (src, tgt, sock) = (d.path().join("src.img"), d.path().join("tgt.img"), d.path().join("tgt.sock"));
    source_image(&src);
    empty_image(&tgt);

    let mut nbd = qemu_nbd(d.path(), &sock, &tgt);
    let (mut daemon, mut q) = baton_daemon(d.path(), &[file_node("src", &src)]);
    q.ok("blockdev-add", nbd_node("tgt", &sock, ""));
    q.ok("blockdev-mirror", json!({"job-id": "m0", "device": "src", "target": "tgt", "sync": "full"}));
    let ready = q.wait_event("BLOCK_JOB_READY", EVENT_TIMEOUT);
    assert_eq!(ready["data"]["device"], "m0", "{ready}");
    assert_eq!(ready["data"]["type"], "mirror", "{ready}");
    let jobs = q.ok("query-block-jobs", json!({}));
    assert_eq!(jobs[0]["ready"], true, "{jobs}");
    assert_eq!(jobs[0]["status"], "ready", "{jobs}");
    q.ok("block-job-cancel", json!({"device": "m0"}));
    let done = q.wait_event("BLOCK_JOB_COMPLETED", EVENT_TIMEOUT);
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], done["data"]["len"], "{done}");
    assert!(
        !q.all_events.iter().any(|e| e["event"] == "BLOCK_JOB_CANCELLED"),
        "a soft cancel after READY completes: {:?}",
        q.all_events
    );
    assert_eq!(q.ok("query-block-jobs", json!({})), json!([]));
    q.quit(&mut daemon);
    nbd.terminate();

    assert_identical(&src, &tgt);
    let data: u64 = EXTENTS.iter().map(|e| e.1).sum();
    let alloc = allocated_bytes(&tgt);
    assert!(
        alloc < data + 12 * M,
        "target allocates {alloc} bytes for {data} bytes of data (of {SIZE}): holes were written"
    );
}

// ---------------------------------------------------------------- (c) baton -> baton, writer, pivot

/// Writes through the source's own export while `baton daemon` mirrors into
/// `baton serve`; after `block-job-complete` the export serves the target.
#[test]
fn baton_mirrors_into_baton_with_a_writer_and_pivots_the_export() {
    require_tools(&["qemu-io", "qemu-img"]);
    let d = tempfile::tempdir().unwrap();
    let (src, tgt) = (d.path().join("src.img"), d.path().join("tgt.img"));
    let (tsock, esock) = (d.path().join("tgt.sock"), d.path().join("export.sock"));
    source_image(&src);
    empty_image(&tgt);

    let mut serve = Server::start(d.path(), &["-k", ps(&tsock), ps(&tgt)]);
    let (mut daemon, mut q) = baton_daemon(d.path(), &[file_node("src", &src)]);
    q.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": ps(&esock)}}}));
    q.ok("block-export-add", json!({"type": "nbd", "id": "e0", "node-name": "src", "name": "src", "writable": true}));
    let uri = unix_uri(&esock, "src");
    q.ok("blockdev-add", nbd_node("tgt", &tsock, ""));
    // Slow enough (256 MiB at 32 MiB/s) that the writes below land while the bulk copy runs.
    q.ok("blockdev-mirror", json!({"job-id": "m0", "device": "src", "target": "tgt", "sync": "full", "speed": 32 * M}));

    // Offsets in holes, in data, across granule (64 KiB) boundaries, at both ends.
    let writes: [(u64, u8); 8] = [
        (0, 0x5a),
        (3 * M + 60 * K, 0x5b),
        (40 * M, 0x5c),
        (WRITTEN_ZEROES.0 + 4 * K, 0x5d),
        (100 * M + 32 * K, 0x5e),
        (150 * M + 512, 0x5f),
        (230 * M, 0x60),
        (SIZE - 64 * K, 0x61),
    ];
    for (i, &(off, b)) in writes.iter().enumerate() {
        let jobs = q.ok("query-block-jobs", json!({}));
        if i < 4 {
            assert_eq!(jobs[0]["status"], "running", "the writes are meant to race the bulk copy: {jobs}");
        }
        qemu_io(&uri, &[&format!("write -P {b:#x} {off} 64k"), &format!("read -P {b:#x} {off} 64k")]);
        std::thread::sleep(Duration::from_millis(150));
    }
    // Let it converge, then write once more while READY (the job must copy that too).
    q.ok("block-job-set-speed", json!({"device": "m0", "speed": 0}));
    q.wait_event("BLOCK_JOB_READY", EVENT_TIMEOUT);
    let late = (120 * M + 4 * K, 0x62u8);
    qemu_io(&uri, &[&format!("write -P {:#x} {} 64k", late.1, late.0)]);

    q.ok("block-job-complete", json!({"device": "m0"}));
    let done = q.wait_event("BLOCK_JOB_COMPLETED", EVENT_TIMEOUT);
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(q.ok("query-block-jobs", json!({})), json!([]));
    let exports = q.ok("query-block-exports", json!({}));
    let e0 = exports
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "e0")
        .unwrap_or_else(|| panic!("export e0 gone after the pivot: {exports}"));
    assert_eq!(e0["shutting-down"], false, "{exports}");
    // qemu-storage-daemon 10.0.2 names the node the export now uses: the target
    // (checked last, so the data checks below run whatever this says).
    let node_after_pivot = e0["node-name"].clone();

    // After the pivot, the export reads the target's data and writes land in the target.
    let post = (180 * M + 8 * K, 0x77u8);
    qemu_io(
        &uri,
        &[
            &format!("read -P {:#x} {} 64k", writes[2].1, writes[2].0),
            &format!("write -P {:#x} {} 64k", post.1, post.0),
            &format!("read -P {:#x} {} 64k", post.1, post.0),
        ],
    );
    q.quit(&mut daemon);
    serve.stop_ok();

    for &(off, b) in writes.iter().chain([&late]) {
        assert!(read_at(&src, off, 64 << 10).iter().all(|&x| x == b), "source misses the write of {b:#x} at {off}");
        assert!(read_at(&tgt, off, 64 << 10).iter().all(|&x| x == b), "target misses the write of {b:#x} at {off}");
    }
    assert!(
        read_at(&tgt, post.0, 64 << 10).iter().all(|&x| x == post.1),
        "the post-pivot write is not in the target file"
    );
    assert!(read_at(&src, post.0, 64 << 10).iter().all(|&x| x == 0), "the post-pivot write reached the source file");
    // Everywhere else the two files agree.
    let (mut a, mut b) = (std::fs::File::open(&src).unwrap(), std::fs::File::open(&tgt).unwrap());
    let (mut ba, mut bb) = (vec![0u8; M as usize], vec![0u8; M as usize]);
    for chunk in 0..SIZE / M {
        a.read_exact(&mut ba).unwrap();
        b.read_exact(&mut bb).unwrap();
        if chunk * M <= post.0 && post.0 < (chunk + 1) * M {
            let s = (post.0 - chunk * M) as usize;
            ba[s..s + (64 << 10)].fill(post.1);
        }
        if ba != bb {
            let i = ba.iter().zip(&bb).position(|(x, y)| x != y).unwrap();
            panic!("source and target differ at byte {}", chunk * M + i as u64);
        }
    }
    assert_eq!(
        node_after_pivot, "tgt",
        "query-block-exports after the pivot should name the target node, as qemu-storage-daemon 10.0.2 does"
    );
}

// ---------------------------------------------------------------- (d) QMP errors

/// Mirroring a node onto itself, a size mismatch, an unknown job, completing
/// before READY: each refused with a clear error that leaves the jobs alone.
/// Classes are compared with qemu-storage-daemon's for the same commands.
#[test]
fn mirror_qmp_errors_are_clear_and_change_nothing() {
    require_tools(&["qemu-storage-daemon"]);
    let d = tempfile::tempdir().unwrap();
    let (src, tgt, small) = (d.path().join("src.img"), d.path().join("tgt.img"), d.path().join("small.img"));
    source_image(&src);
    empty_image(&tgt);
    std::fs::File::create(&small).unwrap().set_len(SIZE / 2).unwrap();
    let nodes = [file_node("src", &src), file_node("tgt", &tgt), file_node("small", &small)];

    // What the reference answers (it never touches the images: every command fails or is cancelled).
    let mut reference = std::collections::HashMap::new();
    {
        let (mut p, mut r) = qsd(d.path(), &nodes);
        reference.insert(
            "self",
            r.err("blockdev-mirror", json!({"job-id": "m0", "device": "src", "target": "src", "sync": "full"})),
        );
        reference.insert("unknown", r.err("block-job-cancel", json!({"device": "nope"})));
        r.ok("blockdev-mirror", json!({"job-id": "m0", "device": "src", "target": "tgt", "sync": "full", "speed": M}));
        reference.insert("early", r.err("block-job-complete", json!({"device": "m0"})));
        r.ok("block-job-cancel", json!({"device": "m0", "force": true}));
        r.wait_event("BLOCK_JOB_CANCELLED", EVENT_TIMEOUT);
        r.quit(&mut p);
    }
    empty_image(&tgt);

    let (mut daemon, mut q) = baton_daemon(d.path(), &nodes);
    let mut mismatches = vec![];
    let mut check = |what: &str, got: (String, String), want_desc: &str, q: &mut Qmp, before: &Value| {
        assert!(got.1.contains(want_desc), "{what}: desc {:?} should say {want_desc:?}", got.1);
        let after = q.ok("query-block-jobs", json!({}));
        assert_eq!(job_shape(&after), job_shape(before), "{what} changed the jobs: {before} -> {after}");
        if let Some(r) = reference.get(what) {
            if r.0 != got.0 {
                mismatches.push(format!("{what}: baton answers {got:?}, qemu-storage-daemon 10.0.2 {r:?}"));
            }
        }
    };

    let none = q.ok("query-block-jobs", json!({}));
    assert_eq!(none, json!([]));
    let e = q.err("blockdev-mirror", json!({"job-id": "m0", "device": "src", "target": "src", "sync": "full"}));
    assert_eq!(e.0, "GenericError", "self: {e:?}");
    check("self", e, "into itself", &mut q, &none);
    // qemu-storage-daemon accepts this one and fails the job at once
    // (BLOCK_JOB_COMPLETED with "Source and target image have different sizes"); refusing it is better.
    let e = q.err("blockdev-mirror", json!({"job-id": "m0", "device": "src", "target": "small", "sync": "full"}));
    assert_eq!(e.0, "GenericError", "size: {e:?}");
    check("size", e, "different sizes", &mut q, &none);
    let e = q.err("block-job-cancel", json!({"device": "nope"}));
    check("unknown", e, "'nope' not found", &mut q, &none);
    assert!(
        !q.all_events.iter().any(|e| e["event"] == "JOB_STATUS_CHANGE"),
        "a refused command made a job: {:?}",
        q.all_events
    );

    // Nothing leaked from the refusals: the same job id and nodes start a job, which stays running (1 MiB/s).
    q.ok("blockdev-mirror", json!({"job-id": "m0", "device": "src", "target": "tgt", "sync": "full", "speed": M}));
    let running = q.ok("query-block-jobs", json!({}));
    assert_eq!(running[0]["status"], "running", "{running}");
    let e = q.err("block-job-cancel", json!({"device": "nope"}));
    check("unknown", e, "'nope' not found", &mut q, &running);
    let e = q.err("block-job-complete", json!({"device": "m0"}));
    assert_eq!(e.0, "GenericError", "early: {e:?}");
    check("early", e, "'m0'", &mut q, &running);
    let e = q.err("job-complete", json!({"id": "m0"}));
    assert_eq!(e.0, "GenericError", "early job-complete: {e:?}");
    check("early", e, "'m0'", &mut q, &running);
    let e = q.err("blockdev-mirror", json!({"job-id": "m0", "device": "src", "target": "tgt", "sync": "full"}));
    assert_eq!(e.0, "GenericError", "duplicate id: {e:?}");
    check("duplicate", e, "m0", &mut q, &running);

    q.ok("block-job-cancel", json!({"device": "m0", "force": true}));
    q.wait_event("BLOCK_JOB_CANCELLED", EVENT_TIMEOUT);
    assert_eq!(q.ok("query-block-jobs", json!({})), json!([]));
    q.quit(&mut daemon);
    assert!(mismatches.is_empty(), "error classes differ from the reference:\n{}", mismatches.join("\n"));
}
