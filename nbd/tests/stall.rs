//! The NBD client against a server that stops answering: requests time out
//! (`x-baton-request-timeout`) and `yank` aborts the connection at once, so
//! neither a job nor a guest hangs on a black-holed target.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::ErrorKind as IoKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_nbd::client::{self, NbdClient, NbdClientOptions, NbdServer};
use baton_nbd::proto;
use block::driver::{BlockRead, BlockWrite, Flush};
use block::{BlockBackend, BlockError, ErrorKind, Graph, IoBuf, PermSet, WriteFlags};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;
use tokio::time::timeout;

const SIZE: u64 = 64 << 20;
/// Bound on any step that must not hang; far above every timeout used here.
const STEP: Duration = Duration::from_secs(10);
const ETIMEDOUT: i32 = 110;
const EIO: i32 = 5;

/// How the server black-holes the connection once transmission starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hole {
    /// Reads every request (and write payload), answers none.
    Swallow,
    /// Reads nothing more: the client's sends fill the socket buffers and block.
    Deaf,
}

/// A server on a unix socket that completes the handshake, then never replies.
struct BlackHole {
    sock: PathBuf,
    /// Fires when the client's side of the connection is gone (EOF or error while reading).
    hung_up: Option<oneshot::Receiver<()>>,
    /// Requests the server read (Swallow only).
    requests: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Fixed newstyle, `NBD_OPT_EXPORT_NAME` only (every other option gets
/// `NBD_REP_ERR_UNSUP`), a writable 64 MiB export with flush.
async fn handshake(s: &mut UnixStream) {
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
            return;
        }
        s.write_all(&proto::option_reply_header(opt, proto::REP_ERR_UNSUP, 0)).await.unwrap();
    }
}

fn black_hole(dir: &Path, how: Hole) -> BlackHole {
    let sock = dir.join("hole.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let (tx, rx) = oneshot::channel();
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = requests.clone();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        handshake(&mut s).await;
        match how {
            Hole::Swallow => loop {
                let mut hdr = [0u8; 28];
                if s.read_exact(&mut hdr).await.is_err() {
                    break;
                }
                let req = proto::Request::decode(&hdr, false).unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if req.kind == proto::CMD_WRITE {
                    let mut payload = vec![0u8; req.length as usize];
                    if s.read_exact(&mut payload).await.is_err() {
                        break;
                    }
                }
            },
            Hole::Deaf => {
                // Keep the socket open without reading, until the test ends.
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }
        let _ = tx.send(());
        // Hold the socket (the client must not wait for us to close it).
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(s);
    });
    BlackHole { sock, hung_up: Some(rx), requests, task }
}

/// A graph with driver `nbd` and node `name` on the black hole, plus a writer on it.
async fn node_on(hole: &BlackHole, name: &str, request_timeout: Option<u64>) -> (Arc<Graph>, BlockBackend) {
    let graph = Arc::new(Graph::new());
    client::register(&graph);
    let mut opts =
        json!({"driver": "nbd", "node-name": name, "server": {"type": "unix", "path": hole.sock}, "export": ""});
    if let Some(t) = request_timeout {
        opts["x-baton-request-timeout"] = json!(t);
    }
    timeout(STEP, graph.blockdev_add(&opts)).await.expect("blockdev-add hung").unwrap();
    let be = graph.attach(name, "test", PermSet::EXPORT_WRITABLE, false).unwrap();
    (graph, be)
}

fn assert_timed_out(e: &BlockError, node: &str, cmd: &str) {
    let chain = e.chain();
    assert!(matches!(e, BlockError::Io { source, .. } if source.kind() == IoKind::TimedOut), "{chain}");
    assert_eq!(e.errno(), ETIMEDOUT, "{chain}");
    assert_eq!(e.kind(), ErrorKind::Io, "{chain}");
    assert!(chain.contains(&format!("node '{node}'")), "the error names the node: {chain}");
    assert!(
        chain.contains(&format!("did not answer {cmd} within 1 s")) && chain.contains("x-baton-request-timeout"),
        "{chain}"
    );
}

fn assert_yanked(e: &BlockError, node: &str) {
    let chain = e.chain();
    assert!(matches!(e, BlockError::Io { source, .. } if source.kind() == IoKind::ConnectionAborted), "{chain}");
    assert_eq!(e.errno(), EIO, "{chain}");
    assert!(chain.contains(&format!("node '{node}'")) && chain.contains("was yanked"), "{chain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_a_black_holed_server_times_out_naming_the_node_and_fails_every_other_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut hole = black_hole(dir.path(), Hole::Swallow);
    let (_graph, be) = node_on(&hole, "stalled", Some(1)).await;
    let be = Arc::new(be);
    let started = Instant::now();
    let read = {
        let be = be.clone();
        tokio::spawn(async move { be.read(0, IoBuf::zeroed(4096)).await })
    };
    // A second request, sent a little later: the first one's timeout ends it too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let write = {
        let be = be.clone();
        tokio::spawn(async move { be.write(1 << 20, IoBuf::from_slice(&[7u8; 65536]), WriteFlags::default()).await })
    };
    let e = timeout(STEP, read).await.expect("the read hung on a black-holed server").unwrap().unwrap_err();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900), "timed out after {waited:?}, before its 1 s");
    assert!(waited < Duration::from_secs(4), "timed out only after {waited:?}");
    assert_timed_out(&e, "stalled", "NBD_CMD_READ");
    let e = timeout(Duration::from_secs(1), write)
        .await
        .expect("the other request outlived the connection")
        .unwrap()
        .unwrap_err();
    assert_timed_out(&e, "stalled", "NBD_CMD_READ");
    assert_eq!(hole.requests.load(std::sync::atomic::Ordering::SeqCst), 2, "both requests reached the server");

    // The connection is dead: later requests fail at once, the socket is closed.
    let t0 = Instant::now();
    let e = timeout(STEP, be.flush()).await.unwrap().unwrap_err();
    assert!(t0.elapsed() < Duration::from_millis(500));
    assert_timed_out(&e, "stalled", "NBD_CMD_READ");
    timeout(STEP, hole.hung_up.take().unwrap()).await.expect("the client kept the dead connection open").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_caller_gave_up_still_times_the_connection_out() {
    let dir = tempfile::tempdir().unwrap();
    let hole = black_hole(dir.path(), Hole::Swallow);
    let mut opts = NbdClientOptions::new(NbdServer::Unix { path: hole.sock.clone() }, "");
    opts.request_timeout = Some(Duration::from_secs(1));
    let c: Arc<NbdClient> = timeout(STEP, client::connect(&opts)).await.unwrap().unwrap();
    // Sent, then abandoned by its caller (a job giving up on its target).
    assert!(timeout(Duration::from_millis(200), BlockRead::read(&*c, 0, IoBuf::zeroed(4096))).await.is_err());
    assert!(c.is_connected());
    let t0 = Instant::now();
    while c.is_connected() {
        assert!(t0.elapsed() < Duration::from_secs(4), "an unanswered request nobody waits for never timed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = timeout(STEP, Flush::flush(&*c)).await.unwrap().unwrap_err();
    assert_eq!(e.errno(), ETIMEDOUT, "{}", e.chain());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yank_fails_a_hanging_request_at_once_and_every_later_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut hole = black_hole(dir.path(), Hole::Swallow);
    // No request timeout: only the yank can end the wait.
    let (graph, be) = node_on(&hole, "nbd0", Some(0)).await;
    let be = Arc::new(be);
    let pending = {
        let be = be.clone();
        tokio::spawn(async move { be.read(0, IoBuf::zeroed(4096)).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!pending.is_finished(), "without a timeout the request waits for the server");

    let t0 = Instant::now();
    graph.find("nbd0").unwrap().yank();
    let e = timeout(STEP, pending).await.expect("the yanked request hung").unwrap().unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(1), "yank took {:?}", t0.elapsed());
    assert_yanked(&e, "nbd0");
    let e = timeout(STEP, be.write(0, IoBuf::zeroed(4096), WriteFlags::default())).await.unwrap().unwrap_err();
    assert_yanked(&e, "nbd0");
    timeout(STEP, hole.hung_up.take().unwrap()).await.expect("the yank did not shut the socket down").unwrap();
    // Idempotent; the node stays in the graph until blockdev-del.
    graph.find("nbd0").unwrap().yank();
    drop(be);
    timeout(STEP, graph.blockdev_del("nbd0")).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yank_unblocks_a_sender_stuck_writing_to_a_server_that_stopped_reading() {
    let dir = tempfile::tempdir().unwrap();
    let hole = black_hole(dir.path(), Hole::Deaf);
    let mut opts = NbdClientOptions::new(NbdServer::Unix { path: hole.sock.clone() }, "");
    opts.request_timeout = None;
    opts.node_name = Some("deaf".into());
    let c: Arc<NbdClient> = timeout(STEP, client::connect(&opts)).await.unwrap().unwrap();
    // 32 MiB cannot fit in the socket buffers: the sender blocks in write().
    let stuck = {
        let c = c.clone();
        tokio::spawn(async move { BlockWrite::write(&*c, 0, IoBuf::zeroed(32 << 20), WriteFlags::default()).await })
    };
    let queued = {
        let c = c.clone();
        tokio::spawn(async move { BlockRead::read(&*c, 0, IoBuf::zeroed(4096)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!stuck.is_finished() && !queued.is_finished());
    let t0 = Instant::now();
    block::driver::LeafInfo::yank(&*c);
    let e = timeout(STEP, stuck).await.expect("the blocked sender hung after the yank").unwrap().unwrap_err();
    assert_yanked(&e, "deaf");
    let e = timeout(STEP, queued).await.expect("the queued request hung after the yank").unwrap().unwrap_err();
    assert_yanked(&e, "deaf");
    assert!(t0.elapsed() < Duration::from_secs(1), "yank took {:?}", t0.elapsed());
    assert!(!c.is_connected());
}
