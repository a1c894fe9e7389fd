#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! In-process protocol tests of the NBD server: a raw client written here
//! does the fixed-newstyle handshake and the transmission phase byte by byte,
//! so every test controls exactly what goes on the wire.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_nbd::proto::{self, Request};
use baton_nbd::{Export, ExportConfig, Listener, Server, ServerConfig};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Size of the null exports; larger than the 32 MiB block-size maximum.
const SIZE: u64 = 64 << 20;
/// Bound on any single wait in a test.
const T: Duration = Duration::from_secs(5);

async fn tmo<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(T, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {T:?}: {what}"),
    }
}

// ---------------------------------------------------------------- fixture

struct Fx {
    _dir: tempfile::TempDir,
    path: PathBuf,
    server: Arc<Server>,
    graph: Arc<block::Graph>,
}

fn export_config(name: &str, node: &str, writable: bool) -> ExportConfig {
    ExportConfig {
        name: name.into(),
        description: format!("{name} description"),
        node: node.into(),
        writable,
        bitmaps: vec![],
        allocation_depth: false,
        allow_inactive: false,
        multi_conn: true,
        id: format!("e-{name}"),
    }
}

/// A server with these exports:
/// - `disk`: writable, null-co (read-zeroes) of SIZE
/// - `ro`: read-only, another null-co of SIZE
/// - `slow`: read-only, blkdebug over null-co; every read covering sector 0 waits 300 ms
async fn fixture(cfg: ServerConfig) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let graph = Arc::new(block::Graph::new());
    graph
        .blockdev_add(&json!({"driver": "null-co", "node-name": "nul", "size": SIZE, "read-zeroes": true}))
        .await
        .unwrap();
    graph
        .blockdev_add(&json!({"driver": "null-co", "node-name": "nul-ro", "size": SIZE, "read-zeroes": true}))
        .await
        .unwrap();
    graph
        .blockdev_add(&json!({
            "driver": "blkdebug", "node-name": "dbg",
            "image": {"driver": "null-co", "node-name": "dbg-nul", "size": SIZE, "read-zeroes": true},
            "x-baton-inject-delay": [{"event": "read_aio", "sector": 0, "ms": 300, "once": false}],
        }))
        .await
        .unwrap();
    let server = Server::new(cfg);
    for (name, node, w) in [("disk", "nul", true), ("ro", "nul-ro", false), ("slow", "dbg", false)] {
        let e = Export::open(&graph, export_config(name, node, w)).await.unwrap();
        server.exports.add(e).unwrap();
    }
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(server.clone().serve(Listener::Unix(l)));
    Fx { _dir: dir, path, server, graph }
}

fn default_cfg() -> ServerConfig {
    ServerConfig { max_connections: 100, handshake_timeout: Duration::from_secs(10) }
}

// ---------------------------------------------------------------- raw client

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Compact requests, structured replies.
    Structured,
    /// NBD_OPT_EXTENDED_HEADERS.
    Extended,
}

struct Client {
    s: UnixStream,
    ext: bool,
    next_cookie: u64,
}

/// One complete reply to one request (all its chunks).
#[derive(Debug, Default)]
struct Reply {
    cookie: u64,
    /// Error from a simple reply or an error chunk.
    error: Option<u32>,
    data: Vec<(u64, Vec<u8>)>,
    holes: Vec<(u64, u64)>,
    /// Block status: (context id, [(length, flags)]).
    status: Vec<(u32, Vec<(u64, u64)>)>,
    /// Chunk types in arrival order (empty for a simple reply).
    kinds: Vec<u16>,
    /// The offset field of each extended chunk header (extended headers only).
    hdr_offsets: Vec<u64>,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}
fn string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}
/// Payload of NBD_OPT_INFO / NBD_OPT_GO.
fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = string(name);
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}
/// Payload of NBD_OPT_{LIST,SET}_META_CONTEXT.
fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = string(name);
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&string(q));
    }
    v
}
fn option_bytes(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}
fn request_bytes(ext: bool, flags: u16, kind: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    let mut b = [0u8; 32];
    let n = Request { flags, kind, cookie, offset, length }.encode(ext, &mut b);
    b[..n].to_vec()
}

/// Read until EOF (or reset); panics if the peer keeps the connection open.
async fn expect_closed(s: &mut UnixStream, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await {
            Err(_) => panic!("{what}: server kept the connection open (got {} bytes so far)", got.len()),
            Ok(Ok(0)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&b[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Ok(Err(e)) => panic!("{what}: {e}"),
        }
    }
}

impl Client {
    /// Connect and read the server's greeting (nothing sent yet).
    async fn connect(path: &Path) -> Client {
        let mut s = tmo("connect", UnixStream::connect(path)).await.unwrap();
        let mut g = [0u8; 18];
        tmo("greeting", s.read_exact(&mut g)).await.expect("greeting");
        assert_eq!(be64(&g[0..]), proto::NBDMAGIC);
        assert_eq!(be64(&g[8..]), proto::IHAVEOPT);
        let flags = u16::from_be_bytes([g[16], g[17]]);
        assert_ne!(flags & proto::FLAG_FIXED_NEWSTYLE, 0);
        Client { s, ext: false, next_cookie: 1 }
    }

    /// Connect and send FIXED_NEWSTYLE|NO_ZEROES.
    async fn start(path: &Path) -> Client {
        let mut c = Self::connect(path).await;
        c.write(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes()).await;
        c
    }

    async fn write(&mut self, b: &[u8]) {
        tmo("write", self.s.write_all(b)).await.expect("write to server");
    }

    async fn send_opt(&mut self, opt: u32, data: &[u8]) {
        self.write(&option_bytes(opt, data)).await;
    }

    /// One option reply: (option, reply type, data).
    async fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        tmo("option reply", self.s.read_exact(&mut h)).await.expect("option reply header");
        assert_eq!(be64(&h), proto::OPTION_REPLY_MAGIC, "option reply magic");
        let len = be32(&h[16..]) as usize;
        assert!(len <= 1 << 20, "absurd option reply length {len}");
        let mut d = vec![0u8; len];
        tmo("option reply data", self.s.read_exact(&mut d)).await.expect("option reply data");
        (be32(&h[8..]), be32(&h[12..]), d)
    }

    /// Replies to `opt` up to and including the final one (ACK or an error).
    async fn opt_replies(&mut self, opt: u32) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let (o, kind, d) = self.opt_reply().await;
            assert_eq!(o, opt, "reply for the wrong option");
            let last = kind == proto::REP_ACK || kind & proto::REP_FLAG_ERROR != 0;
            v.push((kind, d));
            if last {
                return v;
            }
        }
    }

    /// Send an option expecting a single ACK.
    async fn ack(&mut self, opt: u32, data: &[u8]) {
        self.send_opt(opt, data).await;
        let r = self.opt_replies(opt).await;
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].0, proto::REP_ACK, "{}: {:?}", proto::option_name(opt), String::from_utf8_lossy(&r[0].1));
    }

    /// NBD_OPT_GO; returns (size, transmission flags).
    async fn go(&mut self, name: &str) -> (u64, u16) {
        self.send_opt(proto::OPT_GO, &go_payload(name, &[])).await;
        let r = self.opt_replies(proto::OPT_GO).await;
        assert_eq!(r.last().unwrap().0, proto::REP_ACK, "GO {name}: {r:?}");
        let info = r
            .iter()
            .find(|(k, d)| {
                *k == proto::REP_INFO && d.len() == 12 && u16::from_be_bytes([d[0], d[1]]) == proto::INFO_EXPORT
            })
            .expect("GO without NBD_INFO_EXPORT");
        (be64(&info.1[2..]), u16::from_be_bytes([info.1[10], info.1[11]]))
    }

    /// SET_META_CONTEXT base:allocation; returns its id.
    async fn set_base_allocation(&mut self, name: &str) -> u32 {
        self.send_opt(proto::OPT_SET_META_CONTEXT, &meta_payload(name, &["base:allocation"])).await;
        let r = self.opt_replies(proto::OPT_SET_META_CONTEXT).await;
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].0, proto::REP_META_CONTEXT);
        assert_eq!(&r[0].1[4..], b"base:allocation");
        assert_eq!(r[1].0, proto::REP_ACK);
        be32(&r[0].1)
    }

    /// A client in transmission on `name`, in `mode`, with base:allocation if `meta`.
    async fn open(path: &Path, mode: Mode, name: &str, meta: bool) -> (Client, u64, u16) {
        let mut c = Self::start(path).await;
        match mode {
            Mode::Structured => c.ack(proto::OPT_STRUCTURED_REPLY, &[]).await,
            Mode::Extended => c.ack(proto::OPT_EXTENDED_HEADERS, &[]).await,
        }
        if meta {
            c.set_base_allocation(name).await;
        }
        let (size, flags) = c.go(name).await;
        c.ext = mode == Mode::Extended;
        (c, size, flags)
    }

    async fn send(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, length: u64, payload: &[u8]) {
        let mut b = request_bytes(self.ext, flags, kind, cookie, offset, length);
        b.extend_from_slice(payload);
        self.write(&b).await;
    }

    /// Read one complete reply (every chunk up to DONE).
    async fn reply(&mut self) -> Reply {
        tmo("reply", self.reply_inner()).await
    }

    async fn reply_inner(&mut self) -> Reply {
        let mut r = Reply::default();
        let mut first = true;
        loop {
            let mut h = [0u8; 32];
            self.s.read_exact(&mut h[..4]).await.expect("reply magic");
            let n = proto::reply_header_len(be32(&h)).unwrap_or_else(|| panic!("bad reply magic {:#x}", be32(&h)));
            self.s.read_exact(&mut h[4..n]).await.expect("reply header");
            let (hdr, _) = proto::decode_reply_header(&h[..n]).unwrap().unwrap();
            match hdr {
                proto::ReplyHeader::Simple { error, cookie } => {
                    assert!(first, "simple reply in the middle of a structured reply");
                    assert!(!self.ext, "simple reply after extended headers were negotiated");
                    r.cookie = cookie;
                    r.error = (error != 0).then_some(error);
                    return r;
                }
                proto::ReplyHeader::Chunk { flags, kind, cookie, offset, length } => {
                    if self.ext {
                        assert_eq!(be32(&h), proto::EXTENDED_REPLY_MAGIC, "compact chunk after extended headers");
                    } else {
                        assert_eq!(be32(&h), proto::STRUCTURED_REPLY_MAGIC, "extended chunk without extended headers");
                    }
                    if first {
                        r.cookie = cookie;
                    }
                    assert_eq!(cookie, r.cookie, "chunks of two replies interleaved");
                    first = false;
                    assert!(length <= 64 << 20, "absurd chunk length {length}");
                    let mut p = vec![0u8; length as usize];
                    self.s.read_exact(&mut p).await.expect("chunk payload");
                    r.kinds.push(kind);
                    if self.ext {
                        r.hdr_offsets.push(offset);
                    }
                    match kind {
                        proto::REPLY_TYPE_NONE => assert_eq!(length, 0),
                        proto::REPLY_TYPE_OFFSET_DATA => {
                            // Spec: "length MUST be at least 9".
                            assert!(
                                p.len() >= 9,
                                "OFFSET_DATA chunk with payload length {} (the spec says at least 9)",
                                p.len()
                            );
                            r.data.push((be64(&p), p[8..].to_vec()));
                        }
                        proto::REPLY_TYPE_OFFSET_HOLE => {
                            assert_eq!(p.len(), 12);
                            assert_ne!(be32(&p[8..]), 0, "OFFSET_HOLE of size 0");
                            r.holes.push((be64(&p), u64::from(be32(&p[8..]))));
                        }
                        proto::REPLY_TYPE_BLOCK_STATUS => {
                            assert!(
                                p.len() >= 12 && (p.len() - 4) % 8 == 0,
                                "BLOCK_STATUS payload of {} bytes",
                                p.len()
                            );
                            let d = p[4..].chunks(8).map(|c| (u64::from(be32(c)), u64::from(be32(&c[4..])))).collect();
                            r.status.push((be32(&p), d));
                        }
                        proto::REPLY_TYPE_BLOCK_STATUS_EXT => {
                            let count = be32(&p[4..]) as usize;
                            assert!(
                                count > 0 && p.len() == 8 + 16 * count,
                                "BLOCK_STATUS_EXT: {count} descriptors in {} bytes",
                                p.len()
                            );
                            let d = p[8..].chunks(16).map(|c| (be64(c), be64(&c[8..]))).collect();
                            r.status.push((be32(&p), d));
                        }
                        proto::REPLY_TYPE_ERROR | proto::REPLY_TYPE_ERROR_OFFSET => {
                            let msg_len = u16::from_be_bytes([p[4], p[5]]) as usize;
                            assert!(6 + msg_len <= p.len(), "error message longer than the chunk");
                            r.error = Some(be32(&p));
                        }
                        other => panic!("unknown chunk type {other}"),
                    }
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        return r;
                    }
                }
            }
        }
    }

    /// Send one request and wait for its reply.
    async fn call(&mut self, flags: u16, kind: u16, offset: u64, length: u64, payload: &[u8]) -> Reply {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.send(flags, kind, cookie, offset, length, payload).await;
        let r = self.reply().await;
        assert_eq!(r.cookie, cookie, "reply for another request");
        r
    }

    /// A 4 KiB read at 0 that must succeed (proves the stream is in sync).
    async fn read_ok(&mut self, offset: u64, len: u64) -> Vec<u8> {
        let r = self.call(0, proto::CMD_READ, offset, len, &[]).await;
        assert_eq!(r.error, None, "read {offset}+{len} failed: {r:?}");
        let mut buf = vec![0xEEu8; len as usize];
        for (o, d) in &r.data {
            let at = (o - offset) as usize;
            buf[at..at + d.len()].copy_from_slice(d);
        }
        for (o, l) in &r.holes {
            let at = (o - offset) as usize;
            buf[at..at + *l as usize].fill(0);
        }
        buf
    }
}

fn assert_err(r: &Reply, want: &[u32], what: &str) {
    match r.error {
        Some(e) if want.contains(&e) => {}
        other => panic!("{what}: expected error {want:?}, got {other:?} ({r:?})"),
    }
}

// ================================================================ negotiation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_option_is_unsupported_and_negotiation_continues() {
    let fx = fixture(default_cfg()).await;
    let mut c = Client::start(&fx.path).await;
    c.send_opt(0xdead, b"some data").await;
    let r = c.opt_replies(0xdead).await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, proto::REP_ERR_UNSUP);
    c.ack(proto::OPT_STRUCTURED_REPLY, &[]).await;
    let (size, _) = c.go("disk").await;
    assert_eq!(size, SIZE);
    assert_eq!(c.read_ok(0, 4096).await, vec![0u8; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_is_refused_by_policy() {
    let fx = fixture(default_cfg()).await;
    let mut c = Client::start(&fx.path).await;
    c.send_opt(proto::OPT_STARTTLS, &[]).await;
    let r = c.opt_replies(proto::OPT_STARTTLS).await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, proto::REP_ERR_POLICY);
    // Still negotiating in plain text.
    c.go("disk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_names_every_export() {
    let fx = fixture(default_cfg()).await;
    let mut c = Client::start(&fx.path).await;
    c.send_opt(proto::OPT_LIST, &[]).await;
    let r = c.opt_replies(proto::OPT_LIST).await;
    assert_eq!(r.last().unwrap().0, proto::REP_ACK);
    let mut names = Vec::new();
    for (kind, d) in &r[..r.len() - 1] {
        assert_eq!(*kind, proto::REP_SERVER);
        let n = be32(d) as usize;
        let name = std::str::from_utf8(&d[4..4 + n]).unwrap().to_string();
        assert_eq!(&d[4 + n..], format!("{name} description").as_bytes());
        names.push(name);
    }
    names.sort();
    assert_eq!(names, ["disk", "ro", "slow"]);
    // LIST with data is invalid, and negotiation goes on.
    c.send_opt(proto::OPT_LIST, b"x").await;
    assert_eq!(c.opt_replies(proto::OPT_LIST).await[0].0, proto::REP_ERR_INVALID);
    c.go("disk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_for_unknown_export_is_err_unknown_and_info_for_known_reports_it() {
    let fx = fixture(default_cfg()).await;
    let mut c = Client::start(&fx.path).await;
    c.send_opt(proto::OPT_INFO, &go_payload("nope", &[])).await;
    let r = c.opt_replies(proto::OPT_INFO).await;
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].0, proto::REP_ERR_UNKNOWN);
    c.send_opt(
        proto::OPT_INFO,
        &go_payload("ro", &[proto::INFO_NAME, proto::INFO_DESCRIPTION, proto::INFO_BLOCK_SIZE]),
    )
    .await;
    let r = c.opt_replies(proto::OPT_INFO).await;
    assert_eq!(r.last().unwrap().0, proto::REP_ACK);
    let infos: Vec<(u16, &[u8])> = r[..r.len() - 1]
        .iter()
        .map(|(k, d)| {
            assert_eq!(*k, proto::REP_INFO);
            (u16::from_be_bytes([d[0], d[1]]), &d[2..])
        })
        .collect();
    let get = |t| infos.iter().find(|(k, _)| *k == t).map(|(_, d)| *d).unwrap_or_else(|| panic!("no info {t}"));
    let e = get(proto::INFO_EXPORT);
    assert_eq!(be64(e), SIZE);
    assert_ne!(u16::from_be_bytes([e[8], e[9]]) & proto::TFLAG_READ_ONLY, 0);
    assert_eq!(get(proto::INFO_NAME), b"ro");
    assert_eq!(get(proto::INFO_DESCRIPTION), b"ro description");
    let bs = get(proto::INFO_BLOCK_SIZE);
    assert_eq!(bs.len(), 12);
    assert_eq!(be32(&bs[8..]), proto::MAX_PAYLOAD);
    // INFO does not end negotiation.
    c.go("disk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_with_malformed_payload_is_invalid_and_negotiation_continues() {
    let fx = fixture(default_cfg()).await;
    let mut c = Client::start(&fx.path).await;
    let good = go_payload("disk", &[proto::INFO_BLOCK_SIZE]);
    let bad: Vec<Vec<u8>> = vec![
        vec![],                                      // nothing at all
        vec![0, 0],                                  // truncated name length
        vec![0, 0, 0, 10, b'd'],                     // name longer than the payload
        good[..good.len() - 1].to_vec(),             // truncated info request
        [good.clone(), vec![0]].concat(),            // trailing byte
        [string("disk"), vec![0, 5, 0, 1]].concat(), // 5 infos announced, 1 present
    ];
    for b in &bad {
        c.send_opt(proto::OPT_GO, b).await;
        let r = c.opt_replies(proto::OPT_GO).await;
        assert_eq!(r.len(), 1, "{b:?}: {r:?}");
        assert_eq!(r[0].0, proto::REP_ERR_INVALID, "GO payload {b:?}");
    }
    c.ack(proto::OPT_STRUCTURED_REPLY, &[]).await;
    c.go("disk").await;
    c.read_ok(0, 4096).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_longer_than_64k_disconnects() {
    let fx = fixture(default_cfg()).await;
    // Exactly the limit is fine (an unknown option that big gets ERR_UNSUP).
    let mut c = Client::start(&fx.path).await;
    c.send_opt(0x4242, &vec![7u8; proto::MAX_OPTION_LEN as usize]).await;
    assert_eq!(c.opt_replies(0x4242).await[0].0, proto::REP_ERR_UNSUP);
    // One byte more: the server hangs up without reading the payload.
    let mut h = proto::IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&0x4242u32.to_be_bytes());
    h.extend_from_slice(&(proto::MAX_OPTION_LEN + 1).to_be_bytes());
    c.write(&h).await;
    let got = expect_closed(&mut c.s, "option of 64 KiB + 1").await;
    assert!(got.is_empty(), "server replied {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_1024_options_disconnect() {
    let fx = fixture(default_cfg()).await;
    // 1023 options and a GO: the GO is the 1024th and still works.
    let mut c = Client::start(&fx.path).await;
    let mut all = Vec::new();
    for _ in 0..1023 {
        all.extend_from_slice(&option_bytes(proto::OPT_STRUCTURED_REPLY, &[]));
    }
    let (mut rd, mut wr) = c.s.into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(&all).await.unwrap();
        wr
    });
    for _ in 0..1023 {
        let mut h = [0u8; 20];
        tmo("ack", rd.read_exact(&mut h)).await.unwrap();
        assert_eq!(be32(&h[12..]), proto::REP_ACK);
    }
    let wr = writer.await.unwrap();
    c = Client { s: rd.reunite(wr).unwrap(), ext: false, next_cookie: 1 };
    c.go("disk").await;
    c.read_ok(0, 4096).await;

    // 1025 options: the connection is dropped without an answer to the last.
    let c = Client::start(&fx.path).await;
    let mut all = Vec::new();
    for _ in 0..1025 {
        all.extend_from_slice(&option_bytes(proto::OPT_STRUCTURED_REPLY, &[]));
    }
    let (mut rd, mut wr) = c.s.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&all).await;
        wr
    });
    let mut replies = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), rd.read_to_end(&mut replies)).await;
    assert!(closed.is_ok(), "server still connected after 1025 options ({} reply bytes)", replies.len());
    assert_eq!(replies.len() % 20, 0);
    assert_eq!(replies.len() / 20, 1024, "answered options");
    let _ = writer.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_option_magic_disconnects() {
    let fx = fixture(default_cfg()).await;
    let mut c = Client::start(&fx.path).await;
    c.ack(proto::OPT_STRUCTURED_REPLY, &[]).await;
    let mut b = option_bytes(proto::OPT_GO, &go_payload("disk", &[]));
    b[0] ^= 0xff;
    c.write(&b).await;
    let got = expect_closed(&mut c.s, "bad option magic").await;
    assert!(got.is_empty(), "server replied {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_client_flags_disconnect() {
    let fx = fixture(default_cfg()).await;
    let mut c = Client::connect(&fx.path).await;
    c.write(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES | 1 << 7).to_be_bytes()).await;
    // Best effort: the server may already have closed.
    let _ = c.s.write_all(&option_bytes(proto::OPT_GO, &go_payload("disk", &[]))).await;
    let got = expect_closed(&mut c.s, "unknown client flags").await;
    assert!(got.is_empty(), "server replied {got:?}");
    // Known flags are accepted.
    let mut c = Client::start(&fx.path).await;
    c.go("disk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_after_the_handshake_timeout() {
    let fx = fixture(ServerConfig { max_connections: 10, handshake_timeout: Duration::from_millis(300) }).await;
    // A client that finishes negotiating in time is not affected later.
    let mut ok = Client::start(&fx.path).await;
    ok.ack(proto::OPT_STRUCTURED_REPLY, &[]).await;
    ok.go("disk").await;

    let t0 = Instant::now();
    let mut c = Client::connect(&fx.path).await;
    expect_closed(&mut c.s, "silent client").await;
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(250), "dropped after {took:?}, before the timeout");
    assert!(took < Duration::from_secs(2), "dropped only after {took:?}");

    // A client that sends its flags and one option, then stalls, too.
    let mut c = Client::start(&fx.path).await;
    c.ack(proto::OPT_STRUCTURED_REPLY, &[]).await;
    expect_closed(&mut c.s, "stalled client").await;

    tokio::time::sleep(Duration::from_millis(100)).await;
    ok.read_ok(0, 4096).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_max_connections_are_closed_at_once() {
    let fx = fixture(ServerConfig { max_connections: 2, handshake_timeout: Duration::from_secs(10) }).await;
    let (mut a, ..) = Client::open(&fx.path, Mode::Structured, "disk", false).await;
    let (mut b, ..) = Client::open(&fx.path, Mode::Extended, "disk", false).await;
    assert_eq!(fx.server.connections(), 2);

    let t0 = Instant::now();
    let mut third = tmo("connect", UnixStream::connect(&fx.path)).await.unwrap();
    let got = expect_closed(&mut third, "third connection").await;
    assert!(got.is_empty(), "third connection got {} bytes (a greeting?)", got.len());
    assert!(t0.elapsed() < Duration::from_secs(1), "third connection closed only after {:?}", t0.elapsed());

    a.read_ok(0, 4096).await;
    b.read_ok(4096, 4096).await;

    // A slot frees up when a client leaves.
    drop(a);
    let deadline = Instant::now() + T;
    while fx.server.connections() > 1 {
        assert!(Instant::now() < deadline, "closed connection still counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut d, ..) = Client::open(&fx.path, Mode::Structured, "disk", false).await;
    d.read_ok(0, 4096).await;
    b.read_ok(0, 4096).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_context_options_before_structured_replies_are_invalid() {
    let fx = fixture(default_cfg()).await;
    let mut c = Client::start(&fx.path).await;
    for opt in [proto::OPT_LIST_META_CONTEXT, proto::OPT_SET_META_CONTEXT] {
        c.send_opt(opt, &meta_payload("disk", &["base:allocation"])).await;
        let r = c.opt_replies(opt).await;
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].0, proto::REP_ERR_INVALID, "{}", proto::option_name(opt));
    }
    // After STRUCTURED_REPLY, LIST works.
    c.ack(proto::OPT_STRUCTURED_REPLY, &[]).await;
    c.send_opt(proto::OPT_LIST_META_CONTEXT, &meta_payload("disk", &[])).await;
    let r = c.opt_replies(proto::OPT_LIST_META_CONTEXT).await;
    assert_eq!(r.last().unwrap().0, proto::REP_ACK);
    assert!(r.iter().any(|(k, d)| *k == proto::REP_META_CONTEXT && &d[4..] == b"base:allocation"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_meta_context_base_allocation_enables_block_status() {
    let fx = fixture(default_cfg()).await;
    for mode in [Mode::Structured, Mode::Extended] {
        let mut c = Client::start(&fx.path).await;
        match mode {
            Mode::Structured => c.ack(proto::OPT_STRUCTURED_REPLY, &[]).await,
            Mode::Extended => c.ack(proto::OPT_EXTENDED_HEADERS, &[]).await,
        }
        let id = c.set_base_allocation("disk").await;
        c.go("disk").await;
        c.ext = mode == Mode::Extended;
        let r = c.call(0, proto::CMD_BLOCK_STATUS, 0, 1 << 20, &[]).await;
        assert_eq!(r.error, None, "{r:?}");
        assert_eq!(r.status.len(), 1, "{r:?}");
        let (rid, ext) = &r.status[0];
        assert_eq!(*rid, id);
        let want =
            if mode == Mode::Extended { proto::REPLY_TYPE_BLOCK_STATUS_EXT } else { proto::REPLY_TYPE_BLOCK_STATUS };
        assert_eq!(r.kinds, [want]);
        // null-co with read-zeroes: all of it reads as zeroes, nothing allocated.
        assert_eq!(ext.iter().map(|e| e.0).sum::<u64>(), 1 << 20, "{ext:?}");
        assert!(ext.iter().all(|e| e.1 == u64::from(proto::STATE_HOLE | proto::STATE_ZERO)), "{ext:?}");
    }
    // Without a context, block status is refused.
    let (mut c, ..) = Client::open(&fx.path, Mode::Structured, "disk", false).await;
    assert_err(
        &c.call(0, proto::CMD_BLOCK_STATUS, 0, 4096, &[]).await,
        &[proto::EINVAL],
        "block status without context",
    );
    c.read_ok(0, 4096).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_for_unknown_export_disconnects() {
    let fx = fixture(default_cfg()).await;
    let mut c = Client::start(&fx.path).await;
    c.send_opt(proto::OPT_EXPORT_NAME, b"nope").await;
    let got = expect_closed(&mut c.s, "EXPORT_NAME nope").await;
    assert!(got.is_empty(), "server replied {got:?}");
    // The known name works (size, flags, no zero padding since NO_ZEROES).
    let mut c = Client::start(&fx.path).await;
    c.send_opt(proto::OPT_EXPORT_NAME, b"disk").await;
    let mut b = [0u8; 10];
    tmo("export name reply", c.s.read_exact(&mut b)).await.unwrap();
    assert_eq!(be64(&b), SIZE);
    c.read_ok(0, 4096).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_is_acked_then_closed() {
    let fx = fixture(default_cfg()).await;
    let mut c = Client::start(&fx.path).await;
    c.send_opt(proto::OPT_ABORT, &[]).await;
    let r = c.opt_replies(proto::OPT_ABORT).await;
    assert_eq!(r, [(proto::REP_ACK, vec![])]);
    let got = expect_closed(&mut c.s, "after ABORT").await;
    assert!(got.is_empty(), "server sent {got:?} after the ABORT ack");
}

// ================================================================ transmission

/// Run a transmission test in both header modes.
macro_rules! both_modes {
    ($name:ident, $body:ident) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn structured() {
                $body(Mode::Structured).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn extended() {
                $body(Mode::Extended).await
            }
        }
    };
}

async fn read_past_the_end_is_einval(mode: Mode) {
    let fx = fixture(default_cfg()).await;
    let (mut c, size, _) = Client::open(&fx.path, mode, "disk", false).await;
    assert_err(&c.call(0, proto::CMD_READ, size - 4096, 8192, &[]).await, &[proto::EINVAL], "read across the end");
    assert_err(&c.call(0, proto::CMD_READ, size, 512, &[]).await, &[proto::EINVAL], "read at the end");
    // Up to the end is fine.
    c.read_ok(size - 4096, 4096).await;
}
both_modes!(read_past_the_end, read_past_the_end_is_einval);

async fn write_past_the_end_is_enospc_and_stays_in_sync(mode: Mode) {
    let fx = fixture(default_cfg()).await;
    let (mut c, size, _) = Client::open(&fx.path, mode, "disk", false).await;
    let payload = vec![0xABu8; 8192];
    assert_err(
        &c.call(0, proto::CMD_WRITE, size - 4096, 8192, &payload).await,
        &[proto::ENOSPC],
        "write across the end",
    );
    // The payload was consumed: the next request is parsed correctly.
    c.read_ok(0, 4096).await;
    let r = c.call(0, proto::CMD_WRITE, size - 4096, 4096, &payload[..4096]).await;
    assert_eq!(r.error, None, "{r:?}");
    c.read_ok(0, 4096).await;
}
both_modes!(write_past_the_end, write_past_the_end_is_enospc_and_stays_in_sync);

async fn write_zeroes_past_the_end_is_enospc(mode: Mode) {
    let fx = fixture(default_cfg()).await;
    let (mut c, size, flags) = Client::open(&fx.path, mode, "disk", false).await;
    assert_ne!(flags & proto::TFLAG_SEND_WRITE_ZEROES, 0);
    assert_err(
        &c.call(0, proto::CMD_WRITE_ZEROES, size - 4096, 8192, &[]).await,
        &[proto::ENOSPC],
        "write_zeroes across the end",
    );
    let r = c.call(0, proto::CMD_WRITE_ZEROES, size - 4096, 4096, &[]).await;
    assert_eq!(r.error, None, "{r:?}");
}
both_modes!(write_zeroes_past_the_end, write_zeroes_past_the_end_is_enospc);

async fn trim_and_block_status_past_the_end_are_einval(mode: Mode) {
    let fx = fixture(default_cfg()).await;
    let (mut c, size, _) = Client::open(&fx.path, mode, "disk", true).await;
    assert_err(&c.call(0, proto::CMD_TRIM, size - 4096, 8192, &[]).await, &[proto::EINVAL], "trim across the end");
    assert_err(
        &c.call(0, proto::CMD_BLOCK_STATUS, size - 4096, 8192, &[]).await,
        &[proto::EINVAL],
        "block status across the end",
    );
    assert_eq!(c.call(0, proto::CMD_TRIM, size - 4096, 4096, &[]).await.error, None);
    let r = c.call(0, proto::CMD_BLOCK_STATUS, size - 4096, 4096, &[]).await;
    assert_eq!(r.error, None, "{r:?}");
    assert_eq!(r.status.len(), 1);
}
both_modes!(trim_and_block_status_past_the_end, trim_and_block_status_past_the_end_are_einval);

async fn offset_plus_length_overflowing_u64_is_an_error(mode: Mode) {
    let fx = fixture(default_cfg()).await;
    let (mut c, ..) = Client::open(&fx.path, mode, "disk", true).await;
    let off = u64::MAX - 1024;
    assert_err(&c.call(0, proto::CMD_READ, off, 4096, &[]).await, &[proto::EINVAL], "read overflow");
    assert_err(
        &c.call(0, proto::CMD_WRITE, off, 4096, &[1u8; 4096]).await,
        &[proto::ENOSPC, proto::EINVAL],
        "write overflow",
    );
    for kind in [proto::CMD_WRITE_ZEROES] {
        assert_err(&c.call(0, kind, off, 4096, &[]).await, &[proto::ENOSPC, proto::EINVAL], "write_zeroes overflow");
    }
    for kind in [proto::CMD_TRIM, proto::CMD_BLOCK_STATUS, proto::CMD_CACHE] {
        assert_err(&c.call(0, kind, off, 4096, &[]).await, &[proto::EINVAL], "overflow");
    }
    if mode == Mode::Extended {
        // 64-bit lengths: offset small, length huge.
        for kind in [proto::CMD_TRIM, proto::CMD_BLOCK_STATUS, proto::CMD_WRITE_ZEROES, proto::CMD_CACHE] {
            assert_err(
                &c.call(0, kind, 4096, u64::MAX, &[]).await,
                &[proto::EINVAL, proto::ENOSPC],
                "64-bit length overflow",
            );
        }
    }
    c.read_ok(0, 4096).await;
    assert_eq!(fx.server.connections(), 1);
}
both_modes!(offset_plus_length_overflow, offset_plus_length_overflowing_u64_is_an_error);

async fn read_larger_than_32m_is_refused_in_sync(mode: Mode) {
    let fx = fixture(default_cfg()).await;
    let (mut c, ..) = Client::open(&fx.path, mode, "disk", false).await;
    let len = u64::from(proto::MAX_PAYLOAD) + 4096;
    assert_err(&c.call(0, proto::CMD_READ, 0, len, &[]).await, &[proto::EINVAL, proto::EOVERFLOW], "33 MiB read");
    c.read_ok(0, 4096).await;
    // Exactly the maximum works.
    let d = c.read_ok(0, u64::from(proto::MAX_PAYLOAD)).await;
    assert!(d.iter().all(|&b| b == 0));
}
both_modes!(read_larger_than_32m, read_larger_than_32m_is_refused_in_sync);

async fn write_larger_than_32m_is_refused_and_its_payload_skipped(mode: Mode) {
    let fx = fixture(default_cfg()).await;
    let (mut c, ..) = Client::open(&fx.path, mode, "disk", false).await;
    let len = u64::from(proto::MAX_PAYLOAD) + 4096;
    // A payload that looks like request headers: if the server did not skip
    // it, it would parse them.
    let mut payload = vec![0u8; len as usize];
    for (i, ch) in payload.chunks_mut(32).enumerate() {
        let h = request_bytes(mode == Mode::Extended, 0, proto::CMD_READ, 1000 + i as u64, 0, 512);
        let n = h.len().min(ch.len());
        ch[..n].copy_from_slice(&h[..n]);
    }
    let cookie = 77;
    c.send(0, proto::CMD_WRITE, cookie, 0, len, &payload).await;
    let r = c.reply().await;
    assert_eq!(r.cookie, cookie);
    assert_err(&r, &[proto::EINVAL, proto::EOVERFLOW, proto::ENOSPC], "33 MiB write");
    c.read_ok(0, 4096).await;
    assert_eq!(c.call(0, proto::CMD_WRITE, 0, 4096, &payload[..4096]).await.error, None);
}
both_modes!(write_larger_than_32m, write_larger_than_32m_is_refused_and_its_payload_skipped);

async fn unknown_command_and_flags_are_einval(mode: Mode) {
    let fx = fixture(default_cfg()).await;
    let (mut c, ..) = Client::open(&fx.path, mode, "disk", true).await;
    for kind in [proto::CMD_RESIZE, 9, 42, 0xffff] {
        assert_err(&c.call(0, kind, 0, 4096, &[]).await, &[proto::EINVAL], &format!("command {kind}"));
    }
    // Flags no command defines, and defined flags on the wrong command.
    let cases = [
        (proto::CMD_READ, 1 << 10),
        (proto::CMD_READ, proto::CMD_FLAG_NO_HOLE),
        (proto::CMD_READ, proto::CMD_FLAG_REQ_ONE),
        (proto::CMD_FLUSH, proto::CMD_FLAG_DF),
        (proto::CMD_TRIM, 1 << 15),
        (proto::CMD_BLOCK_STATUS, proto::CMD_FLAG_FAST_ZERO),
        (proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_REQ_ONE),
    ];
    for (kind, flags) in cases {
        assert_err(
            &c.call(flags, kind, 0, 4096, &[]).await,
            &[proto::EINVAL],
            &format!("command {kind} flags {flags:#x}"),
        );
    }
    assert_err(
        &c.call(1 << 9, proto::CMD_WRITE, 0, 4096, &[5u8; 4096]).await,
        &[proto::EINVAL],
        "write with flag 1<<9",
    );
    c.read_ok(0, 4096).await;
}
both_modes!(unknown_command_and_flags, unknown_command_and_flags_are_einval);

async fn writes_to_a_read_only_export_are_eperm(mode: Mode) {
    let fx = fixture(default_cfg()).await;
    let (mut c, _, flags) = Client::open(&fx.path, mode, "ro", false).await;
    assert_ne!(flags & proto::TFLAG_READ_ONLY, 0);
    assert_err(&c.call(0, proto::CMD_WRITE, 0, 4096, &[1u8; 4096]).await, &[proto::EPERM], "write to ro");
    assert_err(&c.call(0, proto::CMD_WRITE_ZEROES, 0, 4096, &[]).await, &[proto::EPERM], "write_zeroes to ro");
    assert_err(&c.call(0, proto::CMD_TRIM, 0, 4096, &[]).await, &[proto::EPERM], "trim on ro");
    c.read_ok(0, 4096).await;
    assert_eq!(c.call(0, proto::CMD_FLUSH, 0, 0, &[]).await.error, None);
}
both_modes!(read_only_export, writes_to_a_read_only_export_are_eperm);

async fn disc_closes_after_answering_requests_in_flight(mode: Mode) {
    let fx = fixture(default_cfg()).await;
    let (mut c, ..) = Client::open(&fx.path, mode, "slow", false).await;
    let t0 = Instant::now();
    // Sector 0 reads take 300 ms; DISC right behind them.
    c.send(0, proto::CMD_READ, 1, 0, 4096, &[]).await;
    c.send(0, proto::CMD_READ, 2, 0, 512, &[]).await;
    c.send(0, proto::CMD_DISC, 3, 0, 0, &[]).await;
    let mut cookies = Vec::new();
    for _ in 0..2 {
        let r = c.reply().await;
        assert_eq!(r.error, None, "{r:?}");
        cookies.push(r.cookie);
    }
    cookies.sort();
    assert_eq!(cookies, [1, 2]);
    assert!(t0.elapsed() >= Duration::from_millis(250), "reads were not delayed; the test proves nothing");
    let got = expect_closed(&mut c.s, "after DISC").await;
    assert!(got.is_empty(), "server sent {} bytes after DISC (a reply to DISC?)", got.len());
    // DISC on an idle connection closes it too.
    let (mut c, ..) = Client::open(&fx.path, mode, "disk", false).await;
    c.send(0, proto::CMD_DISC, 9, 0, 0, &[]).await;
    assert!(expect_closed(&mut c.s, "idle DISC").await.is_empty());
}
both_modes!(disc, disc_closes_after_answering_requests_in_flight);

async fn bad_request_magic_disconnects(mode: Mode) {
    let fx = fixture(default_cfg()).await;
    let (mut c, ..) = Client::open(&fx.path, mode, "disk", false).await;
    c.read_ok(0, 4096).await;
    let mut b = request_bytes(mode == Mode::Extended, 0, proto::CMD_READ, 5, 0, 4096);
    b[3] ^= 1;
    c.write(&b).await;
    let got = expect_closed(&mut c.s, "bad request magic").await;
    assert!(got.is_empty(), "server replied {} bytes", got.len());
    // The compact magic after extended headers were negotiated is bad too.
    if mode == Mode::Extended {
        let (mut c, ..) = Client::open(&fx.path, mode, "disk", false).await;
        c.write(&request_bytes(false, 0, proto::CMD_READ, 5, 0, 4096)).await;
        c.write(&[0u8; 4]).await;
        expect_closed(&mut c.s, "compact request after extended headers").await;
    }
}
both_modes!(bad_request_magic, bad_request_magic_disconnects);

async fn a_client_sending_garbage_does_not_affect_another(mode: Mode) {
    let fx = fixture(default_cfg()).await;
    let (mut good, ..) = Client::open(&fx.path, mode, "disk", false).await;
    let (mut bad, ..) = Client::open(&fx.path, mode, "disk", false).await;
    good.call(0, proto::CMD_WRITE, 0, 4096, &[3u8; 4096]).await;
    // A valid request in flight on the bad connection, then garbage.
    let mut junk = request_bytes(bad.ext, 0, proto::CMD_READ, 1, 0, 4096);
    junk.extend((0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    let _ = bad.s.write_all(&junk).await;
    for i in 0..50 {
        good.read_ok(i * 4096, 4096).await;
        assert_eq!(good.call(0, proto::CMD_WRITE, i * 4096, 4096, &[i as u8; 4096]).await.error, None);
    }
    expect_closed(&mut bad.s, "garbage client").await;
    good.read_ok(0, 4096).await;
    assert_eq!(good.call(0, proto::CMD_FLUSH, 0, 0, &[]).await.error, None);
}
both_modes!(garbage_isolation, a_client_sending_garbage_does_not_affect_another);

// ================================================================ out of order

async fn replies_come_back_out_of_order(mode: Mode) {
    let fx = fixture(default_cfg()).await;
    let (mut c, ..) = Client::open(&fx.path, mode, "slow", false).await;
    let t0 = Instant::now();
    c.send(0, proto::CMD_READ, 1, 0, 4096, &[]).await;
    c.send(0, proto::CMD_READ, 2, 4096, 4096, &[]).await;
    let first = c.reply().await;
    let t_first = t0.elapsed();
    let second = c.reply().await;
    assert_eq!((first.cookie, second.cookie), (2, 1), "the fast read was held up behind the slow one");
    assert!(t_first < Duration::from_millis(250), "fast read answered after {t_first:?}");
    assert!(t0.elapsed() >= Duration::from_millis(250), "slow read was not delayed");
    for r in [first, second] {
        assert_eq!(r.error, None);
        assert_eq!(r.data.len(), 1);
        assert_eq!(r.data[0].1.len(), 4096);
    }
}
both_modes!(out_of_order, replies_come_back_out_of_order);

// ================================================================ sparse reads

/// Expected contents: data at [0,128K) and [512K,576K), holes elsewhere in the first MiB.
fn sparse_pattern(off: usize) -> u8 {
    (off / 4096 % 251) as u8 + 1
}

/// A 4 MiB image with data at [0,128K) and [512K,576K) and holes elsewhere,
/// exported writable as `img`. Returns what the first MiB must read as.
async fn sparse_fixture() -> (tempfile::TempDir, PathBuf, Arc<Server>, Arc<block::Graph>, Vec<u8>) {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(4 << 20).unwrap();
    let mut expect = vec![0u8; 1 << 20];
    for (start, len) in [(0usize, 128usize << 10), (512 << 10, 64 << 10)] {
        for (i, b) in expect[start..start + len].iter_mut().enumerate() {
            *b = sparse_pattern(start + i);
        }
        f.write_all_at(&expect[start..start + len], start as u64).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);

    let path = dir.path().join("nbd.sock");
    let graph = Arc::new(block::Graph::new());
    graph.blockdev_add(&json!({"driver": "file", "node-name": "f", "filename": img.to_str().unwrap()})).await.unwrap();
    let server = Server::new(default_cfg());
    server.exports.add(Export::open(&graph, export_config("img", "f", true)).await.unwrap()).unwrap();
    tokio::spawn(server.clone().serve(Listener::Unix(tokio::net::UnixListener::bind(&path).unwrap())));
    (dir, path, server, graph, expect)
}

async fn structured_read_over_data_and_holes_is_sparse(mode: Mode) {
    let (_dir, path, _server, _graph, expect) = sparse_fixture().await;
    let (mut c, size, _) = Client::open(&path, mode, "img", false).await;
    assert_eq!(size, 4 << 20);
    let r = c.call(0, proto::CMD_READ, 0, 1 << 20, &[]).await;
    assert_eq!(r.error, None, "{r:?}");
    assert!(!r.holes.is_empty(), "no OFFSET_HOLE chunk: {:?}", r.kinds);
    assert!(!r.data.is_empty(), "no OFFSET_DATA chunk: {:?}", r.kinds);
    // Chunks cover [0, 1 MiB) exactly once.
    let mut pieces: Vec<(u64, u64, Option<&[u8]>)> =
        r.data.iter().map(|(o, d)| (*o, d.len() as u64, Some(&d[..]))).collect();
    pieces.extend(r.holes.iter().map(|&(o, l)| (o, l, None)));
    pieces.sort_by_key(|p| p.0);
    let mut at = 0u64;
    let mut got = vec![0xEEu8; 1 << 20];
    for (o, l, d) in &pieces {
        assert_eq!(
            *o,
            at,
            "gap or overlap at {at}: {pieces:?}",
            pieces = pieces.iter().map(|p| (p.0, p.1, p.2.is_some())).collect::<Vec<_>>()
        );
        assert!(*l > 0, "empty chunk at {o}");
        match d {
            Some(d) => got[*o as usize..(*o + *l) as usize].copy_from_slice(d),
            None => got[*o as usize..(*o + *l) as usize].fill(0),
        }
        at += l;
    }
    assert_eq!(at, 1 << 20, "chunks end at {at}");
    assert!(got == expect, "sparse read returned the wrong bytes");
    // Holes lie only where the file has no data.
    for &(o, l) in &r.holes {
        assert!(expect[o as usize..(o + l) as usize].iter().all(|&b| b == 0), "hole chunk {o}+{l} over data");
    }
    // Same bytes with DF (one data chunk) and the stream is still in sync.
    let r = c.call(proto::CMD_FLAG_DF, proto::CMD_READ, 0, 1 << 20, &[]).await;
    assert_eq!(r.kinds, [proto::REPLY_TYPE_OFFSET_DATA]);
    assert!(r.data[0].1 == expect);
}
both_modes!(sparse_read, structured_read_over_data_and_holes_is_sparse);

// ================================================================ spec details

/// Spec, "Command flags": NBD_CMD_FLAG_FUA "is valid for all commands,
/// provided NBD_FLAG_SEND_FUA has been negotiated, in which case the server
/// MUST accept all commands with this bit set (even by ignoring the bit)".
async fn fua_is_accepted_on_every_command(mode: Mode) {
    let fx = fixture(default_cfg()).await;
    let (mut c, _, flags) = Client::open(&fx.path, mode, "disk", true).await;
    assert_ne!(flags & proto::TFLAG_SEND_FUA, 0);
    let fua = proto::CMD_FLAG_FUA;
    let mut failed = Vec::new();
    for (name, kind, len, payload) in [
        ("READ", proto::CMD_READ, 4096, &[][..]),
        ("WRITE", proto::CMD_WRITE, 4096, &[7u8; 4096][..]),
        ("FLUSH", proto::CMD_FLUSH, 0, &[][..]),
        ("TRIM", proto::CMD_TRIM, 4096, &[][..]),
        ("CACHE", proto::CMD_CACHE, 4096, &[][..]),
        ("WRITE_ZEROES", proto::CMD_WRITE_ZEROES, 4096, &[][..]),
        ("BLOCK_STATUS", proto::CMD_BLOCK_STATUS, 4096, &[][..]),
    ] {
        let r = c.call(fua, kind, 0, len, payload).await;
        if r.error.is_some() {
            failed.push(format!("{name}+FUA -> errno {:?}", r.error));
        }
    }
    assert!(failed.is_empty(), "commands refused with FUA set: {failed:?}");
}
both_modes!(fua_on_every_command, fua_is_accepted_on_every_command);

/// A zero-length read is unspecified by the spec, but whatever the server
/// answers must be valid: an OFFSET_DATA chunk "length MUST be at least 9",
/// so no empty data chunk (an error or a NONE chunk are fine; qemu-nbd
/// sends NONE).
async fn zero_length_read_gets_a_valid_reply(mode: Mode) {
    let fx = fixture(default_cfg()).await;
    let (mut c, ..) = Client::open(&fx.path, mode, "disk", false).await;
    // The reader asserts the OFFSET_DATA minimum length.
    let r = c.call(0, proto::CMD_READ, 4096, 0, &[]).await;
    assert!(r.data.iter().all(|(_, d)| !d.is_empty()), "{r:?}");
    c.read_ok(0, 4096).await;
}
both_modes!(zero_length_read, zero_length_read_gets_a_valid_reply);

/// Spec, extended reply chunk: "64 bits, offset (MUST match the request)",
/// "even in reply types such as NBD_REPLY_TYPE_OFFSET_DATA where the payload
/// itself contains a different offset". libnbd drops chunks whose header
/// offset differs from the request's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_reply_headers_echo_the_request_offset() {
    let (_dir, path, _server, _graph, _) = sparse_fixture().await;
    let (mut c, size, _) = Client::open(&path, Mode::Extended, "img", true).await;
    let mut wrong = Vec::new();
    let mut check = |what: &str, off: u64, r: &Reply| {
        assert!(!r.hdr_offsets.is_empty());
        if r.hdr_offsets.iter().any(|&o| o != off) {
            wrong.push(format!("{what} at {off}: chunk header offsets {:?} (types {:?})", r.hdr_offsets, r.kinds));
        }
    };
    let off = 1 << 20;
    check("WRITE", off, &c.call(0, proto::CMD_WRITE, off, 4096, &[1u8; 4096]).await);
    check("WRITE_ZEROES", off, &c.call(0, proto::CMD_WRITE_ZEROES, off, 4096, &[]).await);
    check("TRIM", off, &c.call(0, proto::CMD_TRIM, off, 4096, &[]).await);
    check("FLUSH", 0, &c.call(0, proto::CMD_FLUSH, 0, 0, &[]).await);
    check("READ 4K", off, &c.call(0, proto::CMD_READ, off, 4096, &[]).await);
    check("BLOCK_STATUS", off, &c.call(0, proto::CMD_BLOCK_STATUS, off, 4096, &[]).await);
    check("READ past the end (error)", size - 4096, &c.call(0, proto::CMD_READ, size - 4096, 8192, &[]).await);
    check(
        "WRITE past the end (error)",
        size - 4096,
        &c.call(0, proto::CMD_WRITE, size - 4096, 8192, &[0u8; 8192]).await,
    );
    check("unknown command (error)", off, &c.call(0, 42, off, 4096, &[]).await);
    // Sparse read starting at 64 KiB: data, hole, data, hole chunks.
    let r = c.call(0, proto::CMD_READ, 64 << 10, 1 << 20, &[]).await;
    assert!(r.kinds.len() > 1, "expected several chunks: {:?}", r.kinds);
    check("sparse READ", 64 << 10, &r);
    assert!(wrong.is_empty(), "extended reply headers not echoing the request offset:\n  {}", wrong.join("\n  "));
}

// ================================================================ fuzzing

static FUZZ_PANICS: AtomicUsize = AtomicUsize::new(0);

/// Feed `bytes` as the client side of a connection, then half-close; the
/// server must close its side within the timeout. Returns false on a hang.
async fn feed(path: &Path, prefix: Option<Mode>, bytes: &[u8]) -> bool {
    let mut s = if let Some(mode) = prefix {
        Client::open(path, mode, "disk", true).await.0.s
    } else {
        UnixStream::connect(path).await.unwrap()
    };
    let (mut rd, mut wr) = s.split();
    let drain = async {
        let mut b = vec![0u8; 64 << 10];
        loop {
            match rd.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let send = async {
        let _ = wr.write_all(bytes).await;
        let _ = wr.shutdown().await;
    };
    tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(drain, send) }).await.is_ok()
}

/// Random bytes up to 64 long.
fn garbage() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)
}

/// Well-formed request headers with random fields (any flags, known and
/// unknown commands, edge-case offsets and lengths), then random bytes.
fn request_stream(ext: bool) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let len = prop_oneof![
        Just(0u64),
        1u64..70_000,
        Just(u64::from(proto::MAX_PAYLOAD) + 1),
        Just(u64::from(u32::MAX)),
        any::<u64>()
    ];
    let off = prop_oneof![0u64..SIZE, Just(SIZE), Just(u64::MAX - 511), any::<u64>()];
    let flags = prop_oneof![0u16..64, any::<u16>()];
    let req =
        (flags, 0u16..12, any::<u64>(), off, len).prop_map(move |(f, k, c, o, l)| request_bytes(ext, f, k, c, o, l));
    (proptest::collection::vec(req, 0..12), garbage()).prop_map(|(v, tail)| [v.concat(), tail].concat())
}

/// Well-formed options with random codes and payloads (and some real GO,
/// INFO and meta-context payloads), then random bytes.
fn option_stream() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let payload = prop_oneof![
        garbage(),
        (0usize..4, 0usize..4).prop_map(|(n, i)| go_payload(["disk", "ro", "nope", ""][n], &[0, 1, 2, 3][..i])),
        (0usize..3, 0usize..3)
            .prop_map(|(n, q)| meta_payload(["disk", "nope", ""][n], &["base:allocation", "qemu:", "x"][..q])),
    ];
    let opt = (prop_oneof![0u32..16, any::<u32>()], payload).prop_map(|(o, d)| option_bytes(o, &d));
    (proptest::collection::vec(opt, 0..12), garbage()).prop_map(|(v, tail)| [v.concat(), tail].concat())
}

#[test]
fn random_client_bytes_never_panic_or_hang_the_server() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name().is_some_and(|n| n.starts_with("fuzz-srv")) {
            FUZZ_PANICS.fetch_add(1, Ordering::SeqCst);
        }
        prev(info)
    }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fuzz-srv")
        .enable_all()
        .build()
        .unwrap();
    let fx = rt.block_on(fixture(default_cfg()));

    let config = Config { cases: 64, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config.clone());
    // 1. Raw bytes (and well-formed-ish option streams) as the whole negotiation.
    let strat = prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..512),
        1 => (any::<u32>(), option_stream()).prop_map(|(fl, b)| [fl.to_be_bytes().to_vec(), b].concat()),
        3 => (0u32..4, option_stream()).prop_map(|(fl, b)| [fl.to_be_bytes().to_vec(), b].concat()),
    ];
    runner
        .run(&strat, |bytes| {
            prop_assert!(rt.block_on(feed(&fx.path, None, &bytes)), "negotiation input hung the server: {:?}", bytes);
            prop_assert_eq!(FUZZ_PANICS.load(Ordering::SeqCst), 0);
            Ok(())
        })
        .unwrap();
    // 2. After a valid handshake, as the transmission stream.
    let mut runner = TestRunner::new(config);
    let strat = any::<bool>().prop_flat_map(|ext| {
        prop_oneof![1 => proptest::collection::vec(any::<u8>(), 0..256), 4 => request_stream(ext)]
            .prop_map(move |b| (ext, b))
    });
    runner
        .run(&strat, |(ext, bytes)| {
            let mode = if ext { Mode::Extended } else { Mode::Structured };
            prop_assert!(
                rt.block_on(feed(&fx.path, Some(mode), &bytes)),
                "transmission input hung the server ({mode:?}): {:?}",
                bytes
            );
            prop_assert_eq!(FUZZ_PANICS.load(Ordering::SeqCst), 0);
            Ok(())
        })
        .unwrap();

    rt.block_on(async {
        // Every fuzz connection is gone, and a valid client still works.
        let deadline = Instant::now() + T;
        while fx.server.connections() > 0 {
            assert!(Instant::now() < deadline, "{} fuzz connections still open", fx.server.connections());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for mode in [Mode::Structured, Mode::Extended] {
            let (mut c, ..) = Client::open(&fx.path, mode, "disk", true).await;
            assert_eq!(c.call(0, proto::CMD_WRITE, 0, 4096, &[9u8; 4096]).await.error, None);
            c.read_ok(0, 4096).await;
            assert_eq!(c.call(0, proto::CMD_BLOCK_STATUS, 0, 4096, &[]).await.error, None);
        }
    });
    assert_eq!(FUZZ_PANICS.load(Ordering::SeqCst), 0, "the server panicked on fuzz input");
    // Every case really reached the server (64 + 64 cases, 2 valid clients).
    assert!(fx.server.accepted() >= 130, "only {} connections accepted", fx.server.accepted());
    let _ = &fx.graph;
}
