#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The transmission hot path allocates nothing: a counting global allocator
//! watches 10,000 4 KiB reads and writes after a warm-up and must not move.
//!
//! A separate test binary, because it installs a `#[global_allocator]`.
//! Set `NBD_ALLOC_TRACE=1` to print a backtrace of the first few
//! allocations made during the measured phase.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use baton_nbd::proto::{self, Request};
use baton_nbd::{Export, ExportConfig, Listener, Server, ServerConfig};
use serde_json::json;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
/// Capture backtraces of allocations while set.
static TRACE: AtomicBool = AtomicBool::new(false);
/// Backtraces still to print.
static TRACES_LEFT: AtomicUsize = AtomicUsize::new(3);

thread_local! {
    static IN_TRACE: Cell<bool> = const { Cell::new(false) };
}

impl Counting {
    fn note(&self, size: usize) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        if TRACE.load(Ordering::Relaxed) && !IN_TRACE.with(|t| t.replace(true)) {
            if TRACES_LEFT.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                let bt = std::backtrace::Backtrace::force_capture();
                let name = std::thread::current().name().map(str::to_string);
                eprintln!("=== allocation of {size} bytes on thread {name:?} during the measured phase:\n{bt}");
            }
            IN_TRACE.with(|t| t.set(false));
        }
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counting around it does not touch the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.note(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const SIZE: u64 = 64 << 20;
const DEPTH: u64 = 8;
/// Reads sent at once in the warm-up: 256 x 4 KiB of replies is far more than
/// a unix socket buffers (208 KiB by default).
const BURST: u64 = 256;
const LEN: usize = 4096;

// ---- a blocking client with fixed buffers (allocates nothing per request)

fn read_exact(s: &mut UnixStream, b: &mut [u8]) {
    s.read_exact(b).expect("read from server");
}

fn option(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut h = [0u8; 16];
    h[0..8].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    h[8..12].copy_from_slice(&opt.to_be_bytes());
    h[12..16].copy_from_slice(&(data.len() as u32).to_be_bytes());
    s.write_all(&h).unwrap();
    s.write_all(data).unwrap();
}

/// Read option replies to `opt` until the final one; returns its type.
fn option_final(s: &mut UnixStream, opt: u32) -> u32 {
    loop {
        let mut h = [0u8; 20];
        read_exact(s, &mut h);
        assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), proto::OPTION_REPLY_MAGIC);
        assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), opt);
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut sink = [0u8; 256];
        while len > 0 {
            let n = len.min(sink.len());
            read_exact(s, &mut sink[..n]);
            len -= n;
        }
        if kind == proto::REP_ACK || kind & proto::REP_FLAG_ERROR != 0 {
            return kind;
        }
    }
}

fn handshake(s: &mut UnixStream) {
    let mut g = [0u8; 18];
    read_exact(s, &mut g);
    assert_eq!(u64::from_be_bytes(g[0..8].try_into().unwrap()), proto::NBDMAGIC);
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes()).unwrap();
    option(s, proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(option_final(s, proto::OPT_STRUCTURED_REPLY), proto::REP_ACK);
    let mut go = [0u8; 4 + 4 + 2];
    go[0..4].copy_from_slice(&4u32.to_be_bytes());
    go[4..8].copy_from_slice(b"disk");
    option(s, proto::OPT_GO, &go);
    assert_eq!(option_final(s, proto::OPT_GO), proto::REP_ACK);
}

/// Send `depth` requests (reads on even cookies, writes on odd) and read
/// their replies. A `burst` is all reads, and waits before reading the
/// replies so that they pile up in the socket and block the server's writer.
fn batch(s: &mut UnixStream, first_cookie: u64, depth: u64, burst: bool, wbuf: &[u8; LEN], rbuf: &mut [u8; LEN]) {
    let mut hdr = [0u8; 32];
    for i in 0..depth {
        let cookie = first_cookie + i;
        let write = !burst && cookie % 2 == 1;
        let req = Request {
            flags: 0,
            kind: if write { proto::CMD_WRITE } else { proto::CMD_READ },
            cookie,
            offset: (cookie * LEN as u64 * 7) % (SIZE - LEN as u64) / 512 * 512,
            length: LEN as u64,
        };
        let n = req.encode(false, &mut hdr);
        s.write_all(&hdr[..n]).unwrap();
        if write {
            s.write_all(wbuf).unwrap();
        }
    }
    if burst {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut seen = [false; 256];
    for _ in 0..depth {
        let mut h = [0u8; 20];
        read_exact(s, &mut h[..4]);
        let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
        let n = proto::reply_header_len(magic).unwrap_or_else(|| panic!("bad reply magic {magic:#x}"));
        read_exact(s, &mut h[4..n]);
        match proto::decode_reply_header(&h[..n]).unwrap().unwrap().0 {
            proto::ReplyHeader::Simple { error, cookie } => {
                assert_eq!(error, 0, "request {cookie} failed");
                assert!(!burst && cookie % 2 == 1, "simple reply to a read");
                seen[(cookie - first_cookie) as usize] = true;
            }
            proto::ReplyHeader::Chunk { flags, kind, cookie, length, .. } => {
                assert_eq!(kind, proto::REPLY_TYPE_OFFSET_DATA, "chunk type for request {cookie}");
                assert_ne!(flags & proto::REPLY_FLAG_DONE, 0);
                assert_eq!(length, 8 + LEN as u64);
                let mut off = [0u8; 8];
                read_exact(s, &mut off);
                read_exact(s, rbuf);
                seen[(cookie - first_cookie) as usize] = true;
            }
        }
    }
    assert!(seen[..depth as usize].iter().all(|&x| x), "missing replies");
}

#[test]
fn steady_state_transmission_allocates_nothing() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("nbd-srv")
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let _server = rt.block_on(async {
        let graph = Arc::new(block::Graph::new());
        graph
            .blockdev_add(&json!({"driver": "null-co", "node-name": "nul", "size": SIZE, "read-zeroes": true}))
            .await
            .unwrap();
        let cfg = ExportConfig {
            name: "disk".into(),
            description: String::new(),
            node: "nul".into(),
            writable: true,
            bitmaps: vec![],
            allocation_depth: false,
            allow_inactive: false,
            multi_conn: true,
            id: "e".into(),
        };
        let export = Export::open(&graph, cfg).await.unwrap();
        let server = Server::new(ServerConfig { max_connections: 4, handshake_timeout: Duration::from_secs(10) });
        server.exports.add(export).unwrap();
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(server.clone().serve(Listener::Unix(l)));
        (graph, server)
    });

    let client = std::thread::Builder::new()
        .name("nbd-client".into())
        .spawn(move || {
            let mut s = UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            handshake(&mut s);
            let wbuf = [0x5Au8; LEN];
            let mut rbuf = [0u8; LEN];
            let mut cookie = 0u64;
            let trace = std::env::var_os("NBD_ALLOC_TRACE").is_some();
            // Warm-up, 1,000 requests. First a burst of reads whose replies
            // the client leaves unread for a moment: they overflow the socket
            // buffer, the server's writer blocks, so every worker of the
            // connection ends up holding a pool buffer at once and the pool
            // reaches its high-water mark (one buffer per worker). Without
            // this the pool may still grow by a buffer later, whenever the
            // measured phase happens to have more requests between
            // `BufPool::get` and `put` than the warm-up ever had.
            let a0 = ALLOCS.load(Ordering::SeqCst);
            batch(&mut s, cookie, BURST, true, &wbuf, &mut rbuf);
            cookie += BURST;
            let burst_allocs = ALLOCS.load(Ordering::SeqCst) - a0;
            for _ in 0..(1000 - BURST) / DEPTH {
                batch(&mut s, cookie, DEPTH, false, &wbuf, &mut rbuf);
                cookie += DEPTH;
            }
            let before = ALLOCS.load(Ordering::SeqCst);
            TRACE.store(trace, Ordering::SeqCst);
            for _ in 0..10_000 / DEPTH {
                batch(&mut s, cookie, DEPTH, false, &wbuf, &mut rbuf);
                cookie += DEPTH;
            }
            let after = ALLOCS.load(Ordering::SeqCst);
            TRACE.store(false, Ordering::SeqCst);
            assert!(rbuf.iter().all(|&b| b == 0), "null-co with read-zeroes returned data");
            (burst_allocs, before, after, s)
        })
        .unwrap();
    let (burst_allocs, before, after, s) = client.join().unwrap();
    let delta = after - before;
    println!("allocations: {burst_allocs} during the warm-up burst (connection start-up, pool growth), {delta} during 10,000 requests ({before} -> {after})");
    drop(s);
    assert_eq!(
        delta, 0,
        "the hot path allocated {delta} times in 10,000 requests (rerun with NBD_ALLOC_TRACE=1 for backtraces)"
    );
}
