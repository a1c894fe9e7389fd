//! Dirty-bitmap costs on a 1 TiB disk at 64 KiB granularity (16 Mi granules): recording a guest
//! write, and the scans a mirror job or an incremental backup does over sparse and fully dirty
//! bitmaps.

use std::hint::black_box;

use block::bitmap::{DirtyBitmap, HBitmap};
use criterion::{criterion_group, criterion_main, Criterion};

const TIB: u64 = 1 << 40;
const GRANULARITY: u64 = 64 * 1024;
const WRITE: u64 = 4096;
/// The chunk a mirror job asks for at a time.
const CHUNK: u64 = 64 * 1024 * 1024;

/// xorshift64: enough randomness for offsets, without a dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

fn bitmap() -> Option<DirtyBitmap> {
    match DirtyBitmap::new("bench", TIB, GRANULARITY) {
        Ok(bm) => Some(bm),
        Err(e) => {
            eprintln!("cannot create the bitmap: {e}");
            None
        }
    }
}

/// Walks every dirty area from 0 to the end, `max_len` bytes at a time; returns how many.
fn scan(bm: &DirtyBitmap, max_len: u64) -> u64 {
    let mut pos = 0;
    let mut areas = 0;
    while let Some((off, len)) = bm.next_dirty_area(pos, max_len) {
        pos = off + len;
        areas += 1;
    }
    areas
}

fn mark_random_4k(c: &mut Criterion) {
    let Some(bm) = bitmap() else { return };
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    c.bench_function("bitmap/mark_4k_random_1TiB", |b| {
        b.iter(|| bm.mark(black_box((rng.next() % (TIB / WRITE)) * WRITE), WRITE));
    });
}

fn scan_sparse(c: &mut Criterion) {
    let Some(bm) = bitmap() else { return };
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
    for _ in 0..1000 {
        bm.mark((rng.next() % (TIB / GRANULARITY)) * GRANULARITY, 1);
    }
    c.bench_function("bitmap/next_dirty_area_scan_1000_sparse_1TiB", |b| {
        b.iter(|| scan(black_box(&bm), u64::MAX));
    });

    let mut h = HBitmap::new(TIB / GRANULARITY);
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
    for _ in 0..1000 {
        h.set_range(rng.next() % h.len(), 1);
    }
    c.bench_function("bitmap/hbitmap_next_set_walk_1000_sparse_16Mi_bits", |b| {
        b.iter(|| {
            let mut pos = 0;
            let mut n = 0u64;
            while let Some(bit) = black_box(&h).next_set(pos) {
                pos = bit + 1;
                n += 1;
            }
            n
        });
    });
}

fn scan_full(c: &mut Criterion) {
    let Some(bm) = bitmap() else { return };
    bm.mark(0, TIB);
    c.bench_function("bitmap/next_dirty_area_scan_full_1TiB_unbounded", |b| {
        b.iter(|| scan(black_box(&bm), u64::MAX));
    });
    c.bench_function("bitmap/next_dirty_area_scan_full_1TiB_64MiB_chunks", |b| {
        b.iter(|| scan(black_box(&bm), CHUNK));
    });
}

criterion_group!(benches, mark_random_4k, scan_sparse, scan_full);
criterion_main!(benches);
