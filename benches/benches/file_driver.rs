//! The `file` driver through the graph (node entry, in-flight accounting,
//! leaf call): 4 KiB random reads and writes at queue depth 32 and 1 MiB
//! sequential reads and writes, for each engine, on a 1 GiB file in the page
//! cache. Compare with `benches/fio_file.sh`, which runs fio's io_uring
//! engine on the same workload.

use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{Graph, IoBuf, Node, WriteFlags};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;

const FILE_SIZE: u64 = 1 << 30;
const QD: usize = 32;

fn setup(rt: &tokio::runtime::Runtime, path: &std::path::Path, aio: &str) -> Option<(Arc<Graph>, Arc<Node>)> {
    rt.block_on(async {
        let g = Arc::new(Graph::new());
        let node = g
            .blockdev_add(&json!({"driver": "file", "node-name": "f", "filename": path, "aio": aio, "locking": "off"}))
            .await;
        match node {
            Ok(n) => Some((g, n)),
            Err(e) => {
                eprintln!("skipping {aio}: {e}");
                None
            }
        }
    })
}

/// `ops` requests of `bs` bytes from `QD` concurrent workers; random offsets
/// unless `seq`. Returns the elapsed time.
fn run(
    rt: &tokio::runtime::Runtime,
    node: &Arc<Node>,
    ops: u64,
    bs: usize,
    write: bool,
    seq: bool,
    qd: usize,
) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        let blocks = FILE_SIZE / bs as u64;
        let per = ops.div_ceil(qd as u64).max(1);
        let mut tasks = Vec::with_capacity(qd);
        for w in 0..qd as u64 {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                let mut buf = IoBuf::zeroed(bs);
                let mut rng = 0x2545_f491_4f6c_dd1du64 ^ (w + 1).wrapping_mul(0x9e37_79b9);
                for i in 0..per {
                    let block = if seq {
                        (w * per + i) % blocks
                    } else {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng % blocks
                    };
                    let off = block * bs as u64;
                    let r = if write {
                        node.write(off, buf, WriteFlags::default()).await
                    } else {
                        node.read(off, buf).await
                    };
                    match r {
                        Ok(b) => buf = b,
                        Err(e) => {
                            eprintln!("I/O error: {e}");
                            return;
                        }
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        // Scale to exactly `ops` requests (the workers ran `per * qd`).
        start.elapsed().mul_f64(ops as f64 / (per * qd as u64) as f64)
    })
}

fn bench(c: &mut Criterion) {
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("no runtime: {e}");
            return;
        }
    };
    let dir = std::env::var_os("BATON_BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let path = dir.join("baton-bench-file.img");
    // A fully allocated file, so reads hit data and writes do not allocate.
    if std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) != FILE_SIZE {
        let chunk = vec![0x5au8; 1 << 20];
        let mut f = match std::fs::File::create(&path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("cannot create {}: {e}", path.display());
                return;
            }
        };
        for _ in 0..(FILE_SIZE >> 20) {
            if std::io::Write::write_all(&mut f, &chunk).is_err() {
                return;
            }
        }
    }
    for aio in ["threads", "io_uring"] {
        let Some((_g, node)) = setup(&rt, &path, aio) else { continue };
        let engine = node.file().map(|f| f.engine_name()).unwrap_or("?");
        let mut group = c.benchmark_group(format!("file-{engine}"));
        group.sample_size(10).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
        for (name, bs, write, seq) in [
            ("randread-4k-qd32", 4096usize, false, false),
            ("randwrite-4k-qd32", 4096, true, false),
            ("seqread-1m-qd4", 1 << 20, false, true),
            ("seqwrite-1m-qd4", 1 << 20, true, true),
        ] {
            let qd = if seq { 4 } else { QD };
            group.throughput(Throughput::Bytes(bs as u64));
            group.bench_function(name, |b| b.iter_custom(|iters| run(&rt, &node, iters, bs, write, seq, qd)));
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
