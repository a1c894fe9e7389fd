#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! A hard stop must not wait on a client that stopped reading.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use baton_nbd::proto;
use serde_json::json;

fn handshake(s: &mut std::os::unix::net::UnixStream) {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes()).unwrap();
    // NBD_OPT_GO for the default export, no info requests.
    let mut opt = Vec::new();
    opt.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    opt.extend_from_slice(&6u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).unwrap();
        if kind == proto::REP_ACK {
            return;
        }
        assert!(kind & proto::REP_FLAG_ERROR == 0, "GO refused: {kind:#x}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stop_drops_a_client_that_stopped_reading() {
    let dir = tempfile::tempdir().unwrap();
    let graph = Arc::new(block::Graph::new());
    graph
        .blockdev_add(&json!({"driver": "null-co", "node-name": "n", "size": 1u64 << 30, "read-zeroes": true}))
        .await
        .unwrap();
    let export = baton_nbd::Export::open(
        &graph,
        baton_nbd::ExportConfig {
            name: String::new(),
            description: String::new(),
            node: "n".into(),
            writable: false,
            bitmaps: vec![],
            allocation_depth: false,
            allow_inactive: false,
            multi_conn: true,
            id: "e".into(),
        },
    )
    .await
    .unwrap();
    let server = baton_nbd::Server::new(baton_nbd::ServerConfig::default());
    server.exports.add(export).unwrap();
    let sock = dir.path().join("s.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let serving = tokio::spawn(server.clone().serve(baton_nbd::Listener::Unix(listener)));

    let sock2 = sock.clone();
    let client = std::thread::spawn(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&sock2).unwrap();
        handshake(&mut s);
        // 64 reads of 32 MiB, never read back: the server's workers block writing.
        for i in 0..64u64 {
            let r =
                proto::Request { flags: 0, kind: proto::CMD_READ, cookie: i, offset: (i % 32) << 25, length: 32 << 20 };
            let mut b = [0u8; 32];
            let n = r.encode(false, &mut b);
            if s.write_all(&b[..n]).is_err() {
                break;
            }
        }
        std::thread::sleep(Duration::from_secs(20));
        drop(s);
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.connections(), 1);
    server.stop();
    let idle = tokio::time::timeout(Duration::from_secs(5), server.wait_idle()).await;
    assert!(idle.is_ok(), "the stuck connection was dropped at once, not after the client woke up");
    serving.abort();
    drop(client);
}
