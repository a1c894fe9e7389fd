//! The VMM's device path and control latencies, on a `null-co` disk so the
//! storage costs nothing: guest-visible write IOPS at queue depth 1 and 8
//! (the guest's own counter), one dirty-log pass over 256 MiB of guest RAM,
//! and the latency of `stop` (every vCPU out of KVM_RUN, device drained).
//! Needs /dev/kvm; prints why and does nothing without it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{Graph, PermSet};
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use vmm::{Vm, VmConfig};

fn make_vm(rt: &tokio::runtime::Runtime, memory: u64, batch: u32) -> Option<Arc<Vm>> {
    rt.block_on(async {
        let g = Arc::new(Graph::new());
        g.blockdev_add(&json!({"driver": "null-co", "node-name": "n", "size": 64u64 << 20, "read-zeroes": true}))
            .await
            .ok()?;
        let be = g.attach("n", "guest", PermSet::GUEST_WRITER, true).ok()?;
        let cfg = VmConfig { memory, batch, dirty_pages: 0, ..VmConfig::default() };
        match Vm::new(cfg, be, tokio::runtime::Handle::current(), Arc::new(|_: &str, _| {}), false) {
            Ok(vm) => Some(vm),
            Err(e) => {
                eprintln!("skipping the VMM benches: {e}");
                None
            }
        }
    })
}

fn bench(c: &mut Criterion) {
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() else { return };
    let mut group = c.benchmark_group("vmm");
    group.sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    for batch in [1u32, 8] {
        let Some(vm) = make_vm(&rt, 64 << 20, batch) else { return };
        // The null-co reads return zeroes, which never match the guest's patterns: the
        // guest counts mismatches, which is fine here; only its write counter matters.
        let _ = rt.block_on(vm.cont());
        group.bench_function(format!("guest-write-qd{batch}"), |b| {
            b.iter_custom(|iters| {
                let start_writes = vm.stats().writes;
                let t = Instant::now();
                while u64::from(vm.stats().writes.wrapping_sub(start_writes)) < iters {
                    std::thread::sleep(Duration::from_micros(200));
                }
                t.elapsed()
            })
        });
        group.bench_function(format!("stop-cont-latency-qd{batch}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    std::thread::sleep(Duration::from_millis(2));
                    total += rt.block_on(vm.stop()).unwrap_or_default();
                    let _ = rt.block_on(vm.cont());
                }
                total
            })
        });
        rt.block_on(vm.shutdown());
    }
    if let Some(vm) = make_vm(&rt, 256 << 20, 1) {
        group.bench_function("dirty-log-pass-256MiB", |b| {
            b.iter(|| vm.take_dirty_log().map(|l| l.len()).unwrap_or(0));
        });
        rt.block_on(vm.shutdown());
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
