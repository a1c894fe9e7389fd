//! The NBD client driver against real servers (qemu-nbd, nbdkit) on unix
//! sockets, through the graph, and against a tiny in-process server that
//! breaks the protocol on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_nbd::client::{self, NbdClient, NbdClientOptions, NbdServer};
use baton_nbd::proto;
use block::driver::{BlockRead, BlockStatus, BlockWrite, Discard, Flush, LeafInfo, WriteZeroes};
use block::{BlockError, ErrorKind, Graph, IoBuf, PermSet, WriteFlags, ZeroFlags};
use serde_json::json;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
/// Bound on any single step that must not hang.
const STEP: Duration = Duration::from_secs(20);

/// Whether a unix socket is bound at `path` and listening.
fn listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else { return path.exists() };
    let want = path.display().to_string();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Num RefCount Protocol Flags Type St Inode Path
        f.len() >= 8 && f[7] == want && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 0x1_0000 != 0)
    })
}

/// A server process owned by the test; killed on drop.
struct Server {
    child: Child,
    sock: PathBuf,
}

impl Server {
    fn spawn(cmd: &mut Command, sock: PathBuf) -> Server {
        let child =
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().expect("spawn server");
        let mut s = Server { child, sock };
        s.wait_for_socket();
        s
    }

    /// Wait until the server listens: its socket file appears at bind(), a
    /// moment before listen(), and a probe connection could end a server
    /// that serves one client only; /proc/net/unix says "listening" (flag
    /// __SO_ACCEPTCON) without touching it.
    fn wait_for_socket(&mut self) {
        let start = Instant::now();
        while !listening(&self.sock) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("server exited early: {status}");
            }
            assert!(start.elapsed() < Duration::from_secs(10), "socket {} never appeared", self.sock.display());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn options(&self) -> NbdClientOptions {
        NbdClientOptions::new(NbdServer::Unix { path: self.sock.clone() }, "")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn nbdkit() -> Command {
    let path = if Path::new("/usr/sbin/nbdkit").exists() { "/usr/sbin/nbdkit" } else { "nbdkit" };
    let mut c = Command::new(path);
    c.arg("-f").arg("--exit-with-parent");
    c
}

/// A 64 MiB sparse raw file with 256 KiB of pattern at 1 MiB and 4 KiB at 40 MiB.
fn sparse_image(dir: &TempDir) -> PathBuf {
    let path = dir.path().join("disk.raw");
    let mut f = std::fs::File::create(&path).unwrap();
    f.set_len(SIZE).unwrap();
    f.seek(SeekFrom::Start(MIB)).unwrap();
    f.write_all(&pattern(1, 256 << 10)).unwrap();
    f.seek(SeekFrom::Start(40 * MIB)).unwrap();
    f.write_all(&pattern(2, 4096)).unwrap();
    f.sync_all().unwrap();
    path
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
}

fn read_file(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).unwrap();
    v
}

fn qemu_nbd(dir: &TempDir, image: &Path, extra: &[&str]) -> Server {
    let sock = dir.path().join("qemu-nbd.sock");
    let mut c = Command::new("qemu-nbd");
    c.args(["-f", "raw", "-t", "--discard=unmap", "-k"]).arg(&sock).args(extra).arg(image);
    Server::spawn(&mut c, sock)
}

/// `nbdkit [flags] memory 64M [params]`.
fn nbdkit_memory(dir: &TempDir, flags: &[&str], params: &[&str]) -> Server {
    let sock = dir.path().join("nbdkit.sock");
    let mut c = nbdkit();
    c.arg("-U").arg(&sock).args(flags).args(["memory", "64M"]).args(params);
    Server::spawn(&mut c, sock)
}

async fn connect(server: &Server) -> Arc<NbdClient> {
    timeout(STEP, client::connect(&server.options())).await.expect("connect hung").expect("connect")
}

async fn read(c: &NbdClient, offset: u64, len: usize) -> Vec<u8> {
    BlockRead::read(c, offset, IoBuf::zeroed(len)).await.unwrap().to_vec()
}

async fn write(c: &NbdClient, offset: u64, data: &[u8]) {
    BlockWrite::write(c, offset, IoBuf::from_slice(data), WriteFlags::default()).await.unwrap();
}

fn assert_connection_lost(e: &BlockError) {
    assert_eq!(e.errno(), 5, "{}", e.chain());
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.chain().contains("connection to nbd server") && e.chain().contains("lost"), "{}", e.chain());
}

// --- qemu-nbd ----------------------------------------------------------------

#[tokio::test]
async fn qemu_nbd_negotiates_extended_headers_and_reads_back_file_data() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(&dir);
    let server = qemu_nbd(&dir, &image, &[]);
    let c = connect(&server).await;
    let info = c.info();
    assert!(info.extended && info.structured, "{info:?}");
    assert!(!info.export_name_fallback);
    assert_eq!(LeafInfo::length(&*c), SIZE);
    assert_eq!(LeafInfo::driver_name(&*c), "nbd");
    let caps = LeafInfo::caps(&*c);
    assert!(
        caps.native_zeroes && caps.discard && caps.fast_zero && caps.fua && caps.block_status && caps.parallel,
        "{caps:?}"
    );

    assert_eq!(read(&c, MIB, 256 << 10).await, pattern(1, 256 << 10));
    assert_eq!(read(&c, 40 * MIB, 4096).await, pattern(2, 4096));
    // A read across hole and data: the hole part arrives as a hole chunk.
    let mixed = read(&c, MIB - 4096, 8192).await;
    assert!(mixed[..4096].iter().all(|&b| b == 0));
    assert_eq!(&mixed[4096..], &pattern(1, 4096)[..]);
    c.disconnect().await;
}

#[tokio::test]
async fn qemu_nbd_writes_reach_the_file_after_flush_including_requests_split_above_32_mib() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(&dir);
    let server = qemu_nbd(&dir, &image, &[]);
    let c = connect(&server).await;

    let small = pattern(7, 4096);
    write(&c, 3 * MIB, &small).await;
    let odd = pattern(8, 12345);
    write(&c, 5 * MIB + 17, &odd).await;
    // 40 MiB: more than one request's worth, so the client splits it.
    let big = pattern(9, 40 << 20);
    write(&c, 20 * MIB, &big).await;
    Flush::flush(&*c).await.unwrap();

    assert_eq!(read_file(&image, 3 * MIB, 4096), small);
    assert_eq!(read_file(&image, 5 * MIB + 17, odd.len()), odd);
    assert_eq!(read_file(&image, 20 * MIB, big.len()), big);
    assert_eq!(read(&c, 20 * MIB, big.len()).await, big);
    c.disconnect().await;
}

#[tokio::test]
async fn qemu_nbd_fua_write_lands_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(&dir);
    let server = qemu_nbd(&dir, &image, &[]);
    let c = connect(&server).await;
    let data = pattern(3, 64 << 10);
    BlockWrite::write(&*c, 7 * MIB, IoBuf::from_slice(&data), WriteFlags { fua: true }).await.unwrap();
    assert_eq!(read_file(&image, 7 * MIB, data.len()), data);
    c.disconnect().await;
}

#[tokio::test]
async fn qemu_nbd_block_status_tells_holes_from_data() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(&dir);
    let server = qemu_nbd(&dir, &image, &[]);
    let c = connect(&server).await;

    let hole = BlockStatus::block_status(&*c, 0, MIB).await.unwrap();
    assert!(!hole.data && hole.zero, "{hole:?}");
    assert!(hole.len > 0 && hole.len <= MIB);
    let data = BlockStatus::block_status(&*c, MIB, 256 << 10).await.unwrap();
    assert!(data.data && !data.zero, "{data:?}");
    assert_eq!(data.len, 256 << 10);
    c.disconnect().await;
}

#[tokio::test]
async fn qemu_nbd_write_zeroes_and_discard_change_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(&dir);
    let server = qemu_nbd(&dir, &image, &[]);
    let c = connect(&server).await;

    // Zeroes without unmap: the range reads as zero and stays allocated.
    WriteZeroes::write_zeroes(&*c, MIB, 64 << 10, ZeroFlags::default()).await.unwrap();
    Flush::flush(&*c).await.unwrap();
    assert!(read_file(&image, MIB, 64 << 10).iter().all(|&b| b == 0));
    assert_eq!(read_file(&image, MIB + (64 << 10), 4096), pattern(1, 256 << 10)[64 << 10..(64 << 10) + 4096].to_vec());
    assert!(read(&c, MIB, 64 << 10).await.iter().all(|&b| b == 0));

    // Zeroes that may unmap: a hole afterwards.
    WriteZeroes::write_zeroes(&*c, MIB + (128 << 10), 64 << 10, ZeroFlags { may_unmap: true, ..Default::default() })
        .await
        .unwrap();
    let st = BlockStatus::block_status(&*c, MIB + (128 << 10), 64 << 10).await.unwrap();
    assert!(st.zero && !st.data, "{st:?}");

    // Fast zeroes are advertised by qemu-nbd and succeed on a file.
    WriteZeroes::write_zeroes(&*c, 2 * MIB, 64 << 10, ZeroFlags { fast: true, may_unmap: true, fua: false })
        .await
        .unwrap();

    // Discard (qemu-nbd runs with --discard=unmap): the data becomes a hole.
    Discard::discard(&*c, 40 * MIB, 4096).await.unwrap();
    Flush::flush(&*c).await.unwrap();
    let st = BlockStatus::block_status(&*c, 40 * MIB, 4096).await.unwrap();
    assert!(!st.data, "{st:?}");
    assert!(read_file(&image, 40 * MIB, 4096).iter().all(|&b| b == 0));
    c.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_writes_and_reads_from_tasks_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(&dir);
    let server = qemu_nbd(&dir, &image, &[]);
    let c = connect(&server).await;

    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(i as u8, 4096);
            let off = 10 * MIB + i * 4096;
            BlockWrite::write(&*c, off, IoBuf::from_slice(&data), WriteFlags::default()).await.unwrap();
            let back = BlockRead::read(&*c, off, IoBuf::zeroed(4096)).await.unwrap();
            assert_eq!(&back[..], &data[..], "task {i}");
        }));
    }
    for t in tasks {
        timeout(STEP, t).await.expect("task hung").unwrap();
    }
    Flush::flush(&*c).await.unwrap();
    for i in 0..64u64 {
        assert_eq!(read_file(&image, 10 * MIB + i * 4096, 4096), pattern(i as u8, 4096), "block {i}");
    }
    c.disconnect().await;
}

#[tokio::test]
async fn read_only_export_refuses_writes_with_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(&dir);
    let server = qemu_nbd(&dir, &image, &["-r"]);
    let c = connect(&server).await;
    assert!(c.info().flags & proto::TFLAG_READ_ONLY != 0);
    let e = BlockWrite::write(&*c, 0, IoBuf::zeroed(4096), WriteFlags::default()).await.unwrap_err();
    assert_eq!(e.errno(), 1, "{}", e.chain());
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    let e = WriteZeroes::write_zeroes(&*c, 0, 4096, ZeroFlags::default()).await.unwrap_err();
    assert_eq!(e.errno(), 1);
    assert_eq!(read(&c, MIB, 4096).await, pattern(1, 4096));
    c.disconnect().await;
}

#[tokio::test]
async fn unknown_export_fails_the_open_with_the_servers_answer() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(&dir);
    let server = qemu_nbd(&dir, &image, &["-x", "disk"]);
    let mut opts = server.options();
    opts.export = "nope".into();
    let e = timeout(STEP, client::connect(&opts)).await.unwrap().unwrap_err();
    let msg = e.chain();
    assert!(matches!(e, BlockError::Open { .. }), "{msg}");
    assert!(msg.contains("export 'nope' is not available") && msg.contains("NBD_REP_ERR_UNKNOWN"), "{msg}");
    opts.export = "disk".into();
    let c = timeout(STEP, client::connect(&opts)).await.unwrap().unwrap();
    assert_eq!(c.uri(), format!("nbd+unix:///disk?socket={}", server.sock.display()));
    c.disconnect().await;
}

// --- nbdkit --------------------------------------------------------------------

#[tokio::test]
async fn nbdkit_memory_round_trips_patterns_and_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit_memory(&dir, &[], &[]);
    let c = connect(&server).await;
    assert!(c.info().structured);
    assert!(LeafInfo::caps(&*c).block_status);

    let a = pattern(4, 1 << 20);
    write(&c, 0, &a).await;
    let b = pattern(5, 3000);
    write(&c, 33 * MIB + 5, &b).await;
    assert_eq!(read(&c, 0, a.len()).await, a);
    assert_eq!(read(&c, 33 * MIB + 5, b.len()).await, b);

    WriteZeroes::write_zeroes(&*c, 4096, 8192, ZeroFlags { may_unmap: true, ..Default::default() }).await.unwrap();
    let back = read(&c, 0, 16384).await;
    assert_eq!(&back[..4096], &a[..4096]);
    assert!(back[4096..12288].iter().all(|&x| x == 0));
    assert_eq!(&back[12288..], &a[12288..16384]);
    let st = BlockStatus::block_status(&*c, 50 * MIB, MIB).await.unwrap();
    assert!(st.zero && !st.data, "{st:?}");
    let st = BlockStatus::block_status(&*c, 0, 4096).await.unwrap();
    assert!(st.data, "{st:?}");
    Flush::flush(&*c).await.unwrap();
    c.disconnect().await;
}

#[tokio::test]
async fn nbdkit_without_structured_replies_uses_simple_replies_and_reports_all_data() {
    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit_memory(&dir, &["--no-sr"], &[]);
    let c = connect(&server).await;
    assert!(!c.info().structured && !c.info().extended);
    assert!(!LeafInfo::caps(&*c).block_status);
    let a = pattern(6, 70000);
    write(&c, 123, &a).await;
    assert_eq!(read(&c, 123, a.len()).await, a);
    let st = BlockStatus::block_status(&*c, 0, MIB).await.unwrap();
    assert_eq!((st.len, st.data, st.zero), (MIB, true, false));
    c.disconnect().await;
}

#[tokio::test]
async fn nbdkit_old_newstyle_server_is_reached_with_export_name() {
    let dir = tempfile::tempdir().unwrap();
    // Mask off FIXED_NEWSTYLE: only NBD_OPT_EXPORT_NAME is possible.
    let server = nbdkit_memory(&dir, &["--mask-handshake=0"], &[]);
    let c = connect(&server).await;
    assert!(c.info().export_name_fallback);
    assert_eq!(LeafInfo::length(&*c), SIZE);
    let a = pattern(11, 8192);
    write(&c, MIB, &a).await;
    assert_eq!(read(&c, MIB, a.len()).await, a);
    c.disconnect().await;
}

#[tokio::test]
async fn requests_are_split_to_the_servers_maximum_block_size_and_aligned_to_its_minimum() {
    let dir = tempfile::tempdir().unwrap();
    // The policy filter fails any request outside these limits instead of fixing it up.
    let server = nbdkit_memory(
        &dir,
        &["--filter=blocksize-policy"],
        &[
            "blocksize-minimum=4096",
            "blocksize-preferred=65536",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    let c = connect(&server).await;
    let info = c.info();
    assert_eq!((info.min_block, info.pref_block, info.max_block), (4096, 65536, 65536), "{info:?}");
    assert_eq!(LeafInfo::alignment(&*c), 4096);
    assert_eq!(info.max_transfer(), 65536);
    let a = pattern(13, 1 << 20);
    write(&c, 4 * MIB, &a).await;
    assert_eq!(read(&c, 4 * MIB, a.len()).await, a);
    c.disconnect().await;
}

#[tokio::test]
async fn dropping_the_client_disconnects_from_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(&dir);
    let sock = dir.path().join("once.sock");
    // Without -t, qemu-nbd exits when its only client leaves.
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "raw", "-k"]).arg(&sock).arg(&image);
    let mut server = Server::spawn(&mut cmd, sock);
    let c = connect(&server).await;
    assert_eq!(read(&c, MIB, 4096).await, pattern(1, 4096));
    drop(c);
    let start = Instant::now();
    while server.child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < STEP, "qemu-nbd still running: the client never disconnected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn server_errors_keep_their_errno() {
    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit_memory(
        &dir,
        &["--filter=error"],
        &["error-pwrite=ENOSPC", "error-pwrite-rate=1", "error-pread=EIO", "error-pread-rate=1"],
    );
    let c = connect(&server).await;
    let e = BlockWrite::write(&*c, 0, IoBuf::zeroed(4096), WriteFlags::default()).await.unwrap_err();
    assert_eq!(e.errno(), 28, "{}", e.chain());
    assert_eq!(e.kind(), ErrorKind::NoSpace);
    let e = BlockRead::read(&*c, 0, IoBuf::zeroed(4096)).await.unwrap_err();
    assert_eq!(e.errno(), 5, "{}", e.chain());
    // The connection survives request errors.
    assert!(c.is_connected());
    Flush::flush(&*c).await.unwrap();
    c.disconnect().await;
}

// --- through the graph ---------------------------------------------------------

#[tokio::test]
async fn blockdev_add_nbd_node_serves_io_through_a_backend() {
    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit_memory(&dir, &[], &[]);
    let graph = Arc::new(Graph::new());
    client::register(&graph);
    let node = graph
        .blockdev_add(
            &json!({"driver": "nbd", "node-name": "n", "server": {"type": "unix", "path": server.sock}, "export": ""}),
        )
        .await
        .unwrap();
    assert_eq!(node.length(), SIZE);
    let be = graph.attach("n", "test", PermSet::EXPORT_WRITABLE, false).unwrap();
    let data = pattern(12, 65536);
    be.write(2 * MIB, IoBuf::from_slice(&data), WriteFlags { fua: true }).await.unwrap();
    let back = be.read(2 * MIB, IoBuf::zeroed(data.len())).await.unwrap();
    assert_eq!(&back[..], &data[..]);
    be.write_zeroes(2 * MIB, 4096, ZeroFlags::default()).await.unwrap();
    let back = be.read(2 * MIB, IoBuf::zeroed(8192)).await.unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert_eq!(&back[4096..], &data[4096..8192]);
    be.discard(3 * MIB, MIB).await.unwrap();
    be.flush().await.unwrap();
    let st = be.block_status(2 * MIB + 4096, 4096).await.unwrap();
    assert!(st.data, "{st:?}");
    let st = be.block_status(60 * MIB, MIB).await.unwrap();
    assert!(!st.data && st.zero, "{st:?}");
}

#[tokio::test]
async fn bad_blockdev_options_are_clear_errors() {
    let graph = Arc::new(Graph::new());
    client::register(&graph);
    let unix = json!({"type": "unix", "path": "/nonexistent/baton.sock"});
    let cases = [
        (json!({"driver": "nbd", "node-name": "a", "server": unix, "bogus": 1}), "'bogus'", "parameter is unexpected"),
        (
            json!({"driver": "nbd", "node-name": "b", "server": unix, "tls-creds": "tls0"}),
            "'tls-creds'",
            "TLS is not supported yet",
        ),
        (json!({"driver": "nbd", "node-name": "c"}), "'server'", "parameter is missing"),
        (
            json!({"driver": "nbd", "node-name": "d", "server": unix, "reconnect-delay": 5}),
            "'reconnect-delay'",
            "reconnect is not implemented",
        ),
        (
            json!({"driver": "nbd", "node-name": "e", "server": {"type": "inet", "host": "localhost"}}),
            "'server.port'",
            "parameter is missing",
        ),
        (
            json!({"driver": "nbd", "node-name": "f", "server": {"type": "vsock", "cid": "3", "port": "1"}}),
            "'server.type'",
            "not supported yet",
        ),
    ];
    for (opts, option, reason) in cases {
        let e = graph.blockdev_add(&opts).await.unwrap_err();
        assert!(matches!(e, BlockError::InvalidOption { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(option) && msg.contains(reason), "{msg}");
    }
    // Well-formed options naming a missing socket: an open error naming the export.
    let e = graph.blockdev_add(&json!({"driver": "nbd", "node-name": "g", "server": unix})).await.unwrap_err();
    assert!(matches!(e, BlockError::Open { .. }), "{e}");
    assert!(e.chain().contains("nbd+unix:///?socket=/nonexistent/baton.sock"), "{}", e.chain());
    assert!(graph.driver_names().contains(&"nbd".to_string()));
}

// --- a dying or misbehaving server ----------------------------------------------

#[tokio::test]
async fn killed_server_fails_pending_and_later_requests_with_eio() {
    let dir = tempfile::tempdir().unwrap();
    // Reads take 10 s, so one is surely pending when the server dies.
    let mut server = nbdkit_memory(&dir, &["--filter=delay"], &["rdelay=10"]);
    let c = connect(&server).await;
    let pending = {
        let c = c.clone();
        tokio::spawn(async move { BlockRead::read(&*c, 0, IoBuf::zeroed(4096)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.kill();
    let started = Instant::now();
    let e = timeout(STEP, pending).await.expect("pending read hung").unwrap().unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_connection_lost(&e);
    assert!(e.chain().contains(&format!("nbd+unix:///?socket={}", server.sock.display())), "{}", e.chain());
    assert!(!c.is_connected());

    let e = timeout(STEP, BlockWrite::write(&*c, 0, IoBuf::zeroed(4096), WriteFlags::default()))
        .await
        .unwrap()
        .unwrap_err();
    assert_connection_lost(&e);
    let e = timeout(STEP, Flush::flush(&*c)).await.unwrap().unwrap_err();
    assert_connection_lost(&e);
}

#[tokio::test]
async fn a_cancelled_request_does_not_disturb_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit_memory(&dir, &["--filter=delay"], &["rdelay=1"]);
    let c = connect(&server).await;
    // Give up on a read that is already on the wire; its late reply must be absorbed.
    let gave_up = timeout(Duration::from_millis(100), BlockRead::read(&*c, 0, IoBuf::zeroed(4096))).await;
    assert!(gave_up.is_err());
    let a = pattern(14, 4096);
    write(&c, 0, &a).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(c.is_connected());
    assert_eq!(timeout(STEP, read(&c, 0, 4096)).await.unwrap(), a);
    c.disconnect().await;
}

#[tokio::test]
async fn shutdown_fails_later_requests_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit_memory(&dir, &[], &[]);
    let c = connect(&server).await;
    c.shutdown();
    c.shutdown();
    let e = BlockRead::read(&*c, 0, IoBuf::zeroed(512)).await.unwrap_err();
    assert_eq!(e.errno(), 5);
    assert!(e.chain().contains("closed by the client"), "{}", e.chain());
}

#[tokio::test]
async fn handshake_times_out_on_a_silent_server() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("silent.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let hold = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    });
    let mut opts = NbdClientOptions::new(NbdServer::Unix { path: sock }, "");
    opts.handshake_timeout = Duration::from_millis(300);
    let e = timeout(STEP, client::connect(&opts)).await.unwrap().unwrap_err();
    assert!(
        matches!(&e, BlockError::Open { source, .. } if source.kind() == std::io::ErrorKind::TimedOut),
        "{}",
        e.chain()
    );
    assert!(e.chain().contains("did not complete the handshake"), "{}", e.chain());
    hold.abort();
}

/// How the in-process server misbehaves once transmission starts.
#[derive(Clone, Copy)]
enum Fake {
    /// Answers with a cookie nobody sent.
    UnknownCookie,
    /// Answers with garbage.
    BadMagic,
}

/// A minimal fixed-newstyle server that knows only NBD_OPT_EXPORT_NAME
/// (everything else gets NBD_REP_ERR_UNSUP), then breaks the protocol.
async fn fake_server(listener: tokio::net::UnixListener, how: Fake) {
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
            s.write_all(&SIZE.to_be_bytes()).await.unwrap();
            s.write_all(&(proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH).to_be_bytes()).await.unwrap();
            break;
        }
        s.write_all(&proto::option_reply_header(opt, proto::REP_ERR_UNSUP, 0)).await.unwrap();
    }
    let mut hdr = [0u8; 28];
    s.read_exact(&mut hdr).await.unwrap();
    let req = proto::Request::decode(&hdr, false).unwrap();
    let mut out = [0u8; 32];
    match how {
        Fake::UnknownCookie => {
            let n = proto::simple_reply(0, req.cookie ^ 0xdead_0000, &mut out);
            s.write_all(&out[..n]).await.unwrap();
        }
        Fake::BadMagic => s.write_all(&[0xff; 16]).await.unwrap(),
    }
    // Stay connected: the client must hang up by itself.
    let mut rest = Vec::new();
    let _ = timeout(Duration::from_secs(30), s.read_to_end(&mut rest)).await;
}

async fn violation_kills_the_connection(how: Fake, expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let server = tokio::spawn(fake_server(listener, how));
    let c = timeout(STEP, client::connect(&NbdClientOptions::new(NbdServer::Unix { path: sock }, "")))
        .await
        .unwrap()
        .unwrap();
    let info = c.info();
    assert!(info.export_name_fallback && !info.structured && info.base_allocation.is_none(), "{info:?}");

    let e = timeout(STEP, BlockRead::read(&*c, 0, IoBuf::zeroed(4096))).await.expect("read hung").unwrap_err();
    assert_connection_lost(&e);
    assert!(e.chain().contains(expect), "{}", e.chain());
    let e = timeout(STEP, Flush::flush(&*c)).await.unwrap().unwrap_err();
    assert_connection_lost(&e);
    // The client closed its side, so the server sees the end.
    timeout(STEP, server).await.expect("client never hung up").unwrap();
}

#[tokio::test]
async fn reply_with_unknown_cookie_kills_the_connection() {
    violation_kills_the_connection(Fake::UnknownCookie, "unknown cookie").await;
}

#[tokio::test]
async fn reply_with_bad_magic_kills_the_connection() {
    violation_kills_the_connection(Fake::BadMagic, "bad reply magic").await;
}
