#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The request path: bitmaps marked by every modification, raw windows,
//! null-co, blkdebug errors and delays, block status on real holes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{ErrorKind, Graph, IoBuf, PermSet, WriteFlags, ZeroFlags};
use serde_json::json;

async fn file_graph(size: u64, extra: serde_json::Value) -> (Arc<Graph>, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("disk.img");
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    let g = Arc::new(Graph::new());
    let mut opts = json!({"driver": "file", "node-name": "file0", "filename": p, "discard": "unmap"});
    if let (Some(o), Some(e)) = (opts.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    g.blockdev_add(&opts).await.unwrap();
    (g, dir, p)
}

#[tokio::test]
async fn writes_zeroes_and_discards_mark_enabled_bitmaps_only() {
    let (g, _d, _p) = file_graph(16 << 20, json!({})).await;
    g.blockdev_add(&json!({"driver": "raw", "node-name": "disk0", "file": "file0"})).await.unwrap();
    let on = g.bitmap_add("disk0", "on", Some(65536), false).unwrap();
    let off = g.bitmap_add("disk0", "off", None, true).unwrap();
    let below = g.bitmap_add("file0", "below", Some(4096), false).unwrap();
    let be = g.attach("disk0", "guest", PermSet::GUEST_WRITER, true).unwrap();
    be.write(0, IoBuf::zeroed(4096), WriteFlags::default()).await.unwrap();
    be.write_zeroes(1 << 20, 65536, ZeroFlags { may_unmap: true, ..Default::default() }).await.unwrap();
    be.discard(4 << 20, 131072).await.unwrap();
    assert_eq!(on.count_bytes(), 65536 + 65536 + 131072);
    assert!(on.is_dirty(0) && on.is_dirty(1 << 20) && on.is_dirty((4 << 20) + 65536));
    assert!(!on.is_dirty(65536));
    assert_eq!(off.count_bytes(), 0, "a disabled bitmap is not marked");
    assert_eq!(below.count_bytes(), 4096 + 65536 + 131072, "the child's bitmap is marked too");
    // Reads mark nothing.
    be.read(8 << 20, IoBuf::zeroed(65536)).await.unwrap();
    assert_eq!(on.count_bytes(), 262144);
}

#[tokio::test]
async fn raw_window_maps_offsets_and_bounds() {
    let (g, _d, p) = file_graph(1 << 20, json!({})).await;
    g.blockdev_add(&json!({"driver": "raw", "node-name": "win", "file": "file0", "offset": 65536, "size": 131072}))
        .await
        .unwrap();
    assert_eq!(g.find("win").unwrap().length(), 131072);
    let be = g.attach("win", "guest", PermSet::GUEST_WRITER, true).unwrap();
    be.write(0, IoBuf::from_slice(&[0x11; 512]), WriteFlags::default()).await.unwrap();
    let data = std::fs::read(&p).unwrap();
    assert_eq!(data[65536..65536 + 512], [0x11; 512]);
    assert_eq!(data[..512], [0; 512]);
    let e = be.write(131072 - 256, IoBuf::zeroed(512), WriteFlags::default()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace);
    let e = g
        .blockdev_add(&json!({"driver": "raw", "node-name": "big", "file": "file0", "offset": 1048576, "size": 1}))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not fit"), "{e}");
}

#[tokio::test]
async fn block_status_reports_real_holes() {
    let (g, _d, _p) = file_graph(8 << 20, json!({})).await;
    let be = g.attach("file0", "guest", PermSet::GUEST_WRITER, true).unwrap();
    be.write(2 << 20, IoBuf::from_slice(&vec![1u8; 1 << 20]), WriteFlags::default()).await.unwrap();
    let e = be.block_status(0, 8 << 20).await.unwrap();
    assert!(!e.data && e.zero && e.len == 2 << 20, "{e:?}");
    let e = be.block_status(2 << 20, 6 << 20).await.unwrap();
    assert!(e.data && !e.zero && e.len == 1 << 20, "{e:?}");
    // Punch it again: a hole.
    be.write_zeroes(2 << 20, 1 << 20, ZeroFlags { may_unmap: true, ..Default::default() }).await.unwrap();
    let e = be.block_status(0, 8 << 20).await.unwrap();
    assert!(!e.data && e.len == 8 << 20, "{e:?}");
    let buf = be.read(2 << 20, IoBuf::from_slice(&[9u8; 4096])).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[tokio::test]
async fn fast_zero_without_support_changes_nothing() {
    // discard=ignore and no fallocate path refusal here; a null-co node always succeeds.
    let g = Arc::new(Graph::new());
    g.blockdev_add(&json!({"driver": "null-co", "node-name": "n", "size": 1048576, "read-zeroes": true}))
        .await
        .unwrap();
    let be = g.attach("n", "bench", PermSet::EXPORT_WRITABLE, true).unwrap();
    be.write_zeroes(0, 4096, ZeroFlags { fast: true, ..Default::default() }).await.unwrap();
    let buf = be.read(0, IoBuf::from_slice(&[5u8; 4096])).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0), "read-zeroes fills the buffer");
    assert_eq!(be.length(), 1048576);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blkdebug_delay_lets_a_later_read_finish_first() {
    let (g, _d, _p) = file_graph(1 << 20, json!({})).await;
    g.blockdev_add(&json!({"driver": "blkdebug", "node-name": "dbg", "image": "file0",
        "x-baton-inject-delay": [{"event": "read_aio", "sector": 0, "ms": 300, "once": true}]}))
        .await
        .unwrap();
    let be = Arc::new(g.attach("dbg", "reader", PermSet::EXPORT_READONLY, true).unwrap());
    let start = Instant::now();
    let b1 = be.clone();
    let slow = tokio::spawn(async move {
        b1.read(0, IoBuf::zeroed(512)).await.unwrap();
        start.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    be.read(4096, IoBuf::zeroed(512)).await.unwrap();
    let fast = start.elapsed();
    let slow = slow.await.unwrap();
    assert!(fast < slow && slow >= Duration::from_millis(300), "fast {fast:?} slow {slow:?}");
}

#[tokio::test]
async fn blkdebug_write_error_reaches_the_user_with_its_errno() {
    let (g, _d, p) = file_graph(1 << 20, json!({})).await;
    g.blockdev_add(&json!({"driver": "blkdebug", "node-name": "dbg", "image": "file0",
        "inject-error": [{"event": "write_aio", "errno": 28, "sector": 8}]}))
        .await
        .unwrap();
    let be = g.attach("dbg", "guest", PermSet::GUEST_WRITER, true).unwrap();
    be.write(0, IoBuf::from_slice(&[1; 4096]), WriteFlags::default()).await.unwrap();
    let e = be.write(4096, IoBuf::from_slice(&[2; 512]), WriteFlags::default()).await.unwrap_err();
    assert_eq!(e.errno(), 28);
    assert!(e.to_string().contains("dbg"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap()[4096..4608], [0; 512], "the failed write never reached the file");
}

#[tokio::test]
async fn blockdev_del_removes_implicit_children_and_releases_locks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.img");
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    let g = Arc::new(Graph::new());
    g.blockdev_add(&json!({"driver": "raw", "node-name": "top", "file": {"driver": "file", "filename": p}}))
        .await
        .unwrap();
    assert_eq!(g.nodes().len(), 2);
    let child = g.find("top").unwrap().child().unwrap().clone();
    assert!(child.name().starts_with('#'));
    let be = g.attach("top", "guest", PermSet::GUEST_WRITER, true).unwrap();
    assert!(child.file().unwrap().held_lock().is_some_and(|(p, _)| !p.is_empty()));
    drop(be);
    g.blockdev_del("top").await.unwrap();
    assert!(g.nodes().is_empty());
    assert_eq!(child.file().unwrap().held_lock(), Some((block::Perm::NONE, block::Perm::NONE)));
}
