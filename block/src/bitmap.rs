//! Dirty bitmaps: which parts of a disk were written since a point in time.
//!
//! Incremental backup (`qemu:dirty-bitmap:NAME` over NBD) and the mirror job both ask "where is
//! the next dirty extent?" over and over on a disk that is mostly clean. A flat bitmap answers in
//! time proportional to the disk; a 1 TiB disk at 64 KiB granularity is 16 Mi bits. So the bits
//! live in an [`HBitmap`] (QEMU's `HBitmap`): summary levels above the bits let a search skip 64,
//! 4096, 262144... clean bits per step, and the answer costs O(levels + dirty bits visited).
//!
//! ```text
//! level 2 (top, one word)   [1 0 0 ...]                 bit j: word j of level 1 is non-zero
//! level 1                   [0 0 1 0 ...][...]          bit j: word j of level 0 is non-zero
//! level 0 (the bits)        [0...0][0...0][0..1..0]...  one bit per granule
//! ```
//!
//! [`DirtyBitmap`] is the named, byte-addressed, thread-safe bitmap that a node carries (QEMU's
//! `BdrvDirtyBitmap`), with the semantics of the `block-dirty-bitmap-*` QMP commands: writes mark
//! every granule they touch while the bitmap is enabled; a disabled bitmap is still merged into,
//! cleared and read; `busy` marks one owned by an operation (a job's own bitmap, an NBD export).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bitvec::order::Lsb0;
use bitvec::vec::BitVec;

/// Bits in one storage word of every level.
const WORD_BITS: u64 = u64::BITS as u64;

/// The granularity QEMU picks for a new bitmap on most images.
pub const DEFAULT_GRANULARITY: u64 = 64 * 1024;
/// Smallest granularity QEMU accepts (one sector).
pub const MIN_GRANULARITY: u64 = 512;
/// Largest granularity QEMU accepts.
pub const MAX_GRANULARITY: u64 = 1 << 31;
/// Longest bitmap name QEMU accepts (`BDRV_BITMAP_MAX_NAME_SIZE`).
pub const MAX_NAME_LEN: usize = 1023;

/// Errors of the dirty-bitmap operations.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// The granularity is not a power of two in 512 B ..= 2 GiB.
    #[error("granularity must be a power of two between 512 B and 2 GiB, got {granularity}")]
    BadGranularity { granularity: u64 },
    /// A merge source covers a disk of another size.
    #[error("bitmap sizes differ: ours covers {ours} bytes, theirs {theirs}")]
    SizeMismatch { ours: u64, theirs: u64 },
    /// QEMU refuses empty bitmap names.
    #[error("bitmap name cannot be empty")]
    EmptyName,
    /// QEMU refuses names longer than [`MAX_NAME_LEN`] bytes.
    #[error("bitmap name is too long: {len} bytes, at most {max}", max = MAX_NAME_LEN)]
    NameTooLong { len: usize },
    /// The bitmap is owned by an operation (a job, an export) and cannot be changed by the user.
    #[error("bitmap '{name}' is in use by another operation")]
    Busy { name: String },
    /// Serialized bits that cannot be this bitmap's (a migration stream's).
    #[error("bitmap '{name}': {why}")]
    BadBits { name: String, why: String },
}

/// The granularity rule: a power of two in [`MIN_GRANULARITY`]`..=`[`MAX_GRANULARITY`].
pub fn check_granularity(granularity: u64) -> Result<(), BitmapError> {
    if !granularity.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity) {
        return Err(BitmapError::BadGranularity { granularity });
    }
    Ok(())
}

/// The name rule: not empty, at most [`MAX_NAME_LEN`] bytes.
pub fn check_name(name: &str) -> Result<(), BitmapError> {
    if name.is_empty() {
        return Err(BitmapError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(BitmapError::NameTooLong { len: name.len() });
    }
    Ok(())
}

/// Number of words that hold `bits` bits.
fn words_for(bits: u64) -> usize {
    bits.div_ceil(WORD_BITS) as usize
}

/// Bits `lo..hi` of a word, for `lo < hi <= 64`.
fn word_mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= WORD_BITS { u64::MAX } else { (1u64 << hi) - 1 };
    upper & (u64::MAX << lo)
}

/// Sets bits `start..end` (`start < end`, inside `words`); returns how many were clear before.
fn set_bits(words: &mut [u64], start: u64, end: u64) -> u64 {
    let first = (start / WORD_BITS) as usize;
    let last = ((end - 1) / WORD_BITS) as usize;
    let mut newly = 0;
    for (w, word) in (first..=last).zip(&mut words[first..=last]) {
        let lo = if w == first { start % WORD_BITS } else { 0 };
        let hi = if w == last { (end - 1) % WORD_BITS + 1 } else { WORD_BITS };
        let mask = word_mask(lo, hi);
        newly += u64::from((mask & !*word).count_ones());
        *word |= mask;
    }
    newly
}

/// Clears bits `start..end` (`start < end`, inside `words`); returns how many were set before.
fn clear_bits(words: &mut [u64], start: u64, end: u64) -> u64 {
    let first = (start / WORD_BITS) as usize;
    let last = ((end - 1) / WORD_BITS) as usize;
    let mut cleared = 0;
    for (w, word) in (first..=last).zip(&mut words[first..=last]) {
        let lo = if w == first { start % WORD_BITS } else { 0 };
        let hi = if w == last { (end - 1) % WORD_BITS + 1 } else { WORD_BITS };
        let mask = word_mask(lo, hi);
        cleared += u64::from((mask & *word).count_ones());
        *word &= !mask;
    }
    cleared
}

/// Summary levels for `level0`, finest first, up to the first level of at most one word.
fn build_summary(level0: &[u64]) -> Vec<Vec<u64>> {
    let mut levels: Vec<Vec<u64>> = Vec::new();
    loop {
        let below = levels.last().map_or(level0, Vec::as_slice);
        if below.len() <= 1 {
            return levels;
        }
        let mut up = vec![0u64; words_for(below.len() as u64)];
        for (j, word) in below.iter().enumerate() {
            if *word != 0 {
                up[j / 64] |= 1 << (j % 64);
            }
        }
        levels.push(up);
    }
}

/// A hierarchical bitmap of `len` bits (QEMU's `HBitmap`, one bit per item, no granularity of
/// its own: [`DirtyBitmap`] maps bytes to bits).
///
/// Every search for a set bit walks up the summary levels until it finds a non-zero word and
/// back down, so it costs O(levels), whatever the distance skipped. Set and reset touch the
/// summary only where a word changes between zero and non-zero.
#[derive(Clone)]
pub struct HBitmap {
    /// Level 0, one bit per item. Bits at or past `len()` are always clear (also the dead bits of
    /// the last storage word), so whole-word scans and merges need no masking.
    bits: BitVec<u64, Lsb0>,
    /// Summary levels, finest first: bit j of `summary[0]` is set iff word j of level 0 is
    /// non-zero; bit j of `summary[i + 1]` iff word j of `summary[i]` is non-zero. The last
    /// level has at most one word; there is none when level 0 has at most one word.
    summary: Vec<Vec<u64>>,
    /// Number of set bits in level 0, kept on every change so `count()` is O(1).
    count: u64,
}

impl fmt::Debug for HBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HBitmap")
            .field("len", &self.len())
            .field("count", &self.count)
            .field("levels", &(self.summary.len() + 1))
            .finish()
    }
}

impl HBitmap {
    /// A bitmap of `len` clear bits.
    pub fn new(len: u64) -> Self {
        let bits = BitVec::repeat(false, len as usize);
        let summary = build_summary(bits.as_raw_slice());
        Self { bits, summary, count: 0 }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits.len() as u64
    }

    /// Whether no bit is set (QEMU's `hbitmap_empty`); not whether `len()` is 0.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Number of set bits, O(1).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether bit `bit` is set; bits past the end read as clear.
    pub fn get(&self, bit: u64) -> bool {
        bit < self.len() && self.bits[bit as usize]
    }

    /// The level-0 words, least significant bit first. Bits past `len()` are clear, so the
    /// words can be hashed or serialized as they are.
    pub fn as_words(&self) -> &[u64] {
        self.bits.as_raw_slice()
    }

    /// The bits as bytes: bit `i` is bit `i % 8` of byte `i / 8`; `len().div_ceil(8)` bytes,
    /// the bits of the last byte past `len()` clear. The format a migration stream carries.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.as_words().iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(self.len().div_ceil(8) as usize);
        out
    }

    /// The bitmap of `len` bits that [`HBitmap::to_bytes`] wrote: exactly `len.div_ceil(8)`
    /// bytes, and no bit set at or past `len`; `Err` says which rule the bytes break.
    pub fn from_bytes(len: u64, bytes: &[u8]) -> Result<Self, String> {
        let want = len.div_ceil(8);
        if bytes.len() as u64 != want {
            return Err(format!("{} bytes of bits for {len} bits (want {want})", bytes.len()));
        }
        let tail = len % 8;
        if let (Some(&last), true) = (bytes.last(), tail != 0) {
            if last >> tail != 0 {
                return Err(format!("bits set past the end ({len} bits)"));
            }
        }
        let mut bits: BitVec<u64, Lsb0> = BitVec::repeat(false, len as usize);
        for (word, chunk) in bits.as_raw_mut_slice().iter_mut().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_le_bytes(b);
        }
        let count = bits.as_raw_slice().iter().map(|w| u64::from(w.count_ones())).sum();
        let summary = build_summary(bits.as_raw_slice());
        Ok(Self { bits, summary, count })
    }

    /// `start..start + count` clipped to the bitmap, or `None` when that is empty.
    fn clip(&self, start: u64, count: u64) -> Option<(u64, u64)> {
        let end = start.saturating_add(count).min(self.len());
        (start < end).then_some((start, end))
    }

    /// Sets `count` bits from `start`; the part past the end is ignored.
    pub fn set_range(&mut self, start: u64, count: u64) {
        let Some((start, end)) = self.clip(start, count) else {
            return;
        };
        let newly = set_bits(self.bits.as_raw_mut_slice(), start, end);
        self.count += newly;
        if newly != 0 {
            self.summary_set(start / WORD_BITS, (end - 1) / WORD_BITS + 1);
        }
    }

    /// Clears `count` bits from `start`; the part past the end is ignored.
    pub fn reset_range(&mut self, start: u64, count: u64) {
        let Some((start, end)) = self.clip(start, count) else {
            return;
        };
        let cleared = clear_bits(self.bits.as_raw_mut_slice(), start, end);
        self.count -= cleared;
        if cleared != 0 {
            self.summary_clear(start / WORD_BITS, (end - 1) / WORD_BITS);
        }
    }

    /// Records in the summary that level-0 words `first..end` are all non-zero now.
    fn summary_set(&mut self, mut first: u64, mut end: u64) {
        for level in &mut self.summary {
            if set_bits(level, first, end) == 0 {
                // Already recorded, so every level above is too.
                break;
            }
            first /= WORD_BITS;
            end = (end - 1) / WORD_BITS + 1;
        }
    }

    /// Records in the summary the level-0 words of `first..=last` that became zero, given that
    /// every word strictly between `first` and `last` is zero now.
    fn summary_clear(&mut self, mut first: u64, mut last: u64) {
        for level in 0..self.summary.len() {
            let words = self.level(level);
            let lo = if words[first as usize] == 0 { first } else { first + 1 };
            let hi = if words[last as usize] == 0 { last + 1 } else { last };
            if lo >= hi || clear_bits(&mut self.summary[level], lo, hi) == 0 {
                // Nothing changed at the next level, so nothing above changes either.
                break;
            }
            first = lo / WORD_BITS;
            last = (hi - 1) / WORD_BITS;
        }
    }

    /// Words of level `i` (0 is the bits).
    fn level(&self, i: usize) -> &[u64] {
        match i.checked_sub(1) {
            None => self.bits.as_raw_slice(),
            Some(s) => &self.summary[s],
        }
    }

    /// First set bit at or after `from`, in O(levels).
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len() {
            return None;
        }
        // Climb until a word has a set bit at or after `pos`, then descend along lowest bits.
        let mut level = 0;
        let mut pos = from;
        loop {
            let words = self.level(level);
            let w = (pos / WORD_BITS) as usize;
            let word = *words.get(w)?;
            let masked = word & (u64::MAX << (pos % WORD_BITS));
            if masked != 0 {
                pos = w as u64 * WORD_BITS + u64::from(masked.trailing_zeros());
                break;
            }
            if level == self.summary.len() {
                return None;
            }
            pos = w as u64 + 1;
            level += 1;
        }
        while level > 0 {
            level -= 1;
            // The summary bit says this word is non-zero.
            let word = self.level(level)[pos as usize];
            debug_assert_ne!(word, 0, "summary bit set over a zero word");
            pos = pos * WORD_BITS + u64::from(word.trailing_zeros());
        }
        Some(pos)
    }

    /// First clear bit in `from..end`, or `end` when there is none (`from < end <= len()`).
    /// Costs O((result - from) / 64): clear bits have no summary.
    fn first_clear(&self, from: u64, end: u64) -> u64 {
        let words = self.bits.as_raw_slice();
        let mut w = (from / WORD_BITS) as usize;
        let mut free = !words[w] & (u64::MAX << (from % WORD_BITS));
        loop {
            if free != 0 {
                return (w as u64 * WORD_BITS + u64::from(free.trailing_zeros())).min(end);
            }
            w += 1;
            if w as u64 * WORD_BITS >= end {
                return end;
            }
            free = !words[w];
        }
    }

    /// First clear bit at or after `from`. Costs O(distance / 64), not O(levels).
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        let len = self.len();
        if from >= len {
            return None;
        }
        let bit = self.first_clear(from, len);
        (bit < len).then_some(bit)
    }

    /// The first run of set bits at or after `from`, at most `max_bits` long, as
    /// `(start, count)`: O(levels + count / 64).
    pub fn next_set_run(&self, from: u64, max_bits: u64) -> Option<(u64, u64)> {
        if max_bits == 0 {
            return None;
        }
        let start = self.next_set(from)?;
        let limit = start.saturating_add(max_bits).min(self.len());
        Some((start, self.first_clear(start, limit) - start))
    }

    /// Clears every bit.
    pub fn clear_all(&mut self) {
        self.bits.as_raw_mut_slice().fill(0);
        for level in &mut self.summary {
            level.fill(0);
        }
        self.count = 0;
    }

    /// ORs `other` into `self` (QEMU's `hbitmap_merge`). Both are meant to have the same length;
    /// bits of `other` past our end are ignored. Costs O(levels) per non-zero word of `other`.
    pub fn merge_from(&mut self, other: &HBitmap) {
        let len = self.len();
        let tail = len % WORD_BITS;
        let last_word = words_for(len).saturating_sub(1);
        let mut pos = 0;
        while let Some(bit) = other.next_set(pos) {
            if bit >= len {
                break;
            }
            let w = (bit / WORD_BITS) as usize;
            let mut add = other.as_words()[w];
            if w == last_word && tail != 0 {
                add &= word_mask(0, tail);
            }
            let word = &mut self.bits.as_raw_mut_slice()[w];
            let old = *word;
            *word |= add;
            self.count += u64::from((add & !old).count_ones());
            if old == 0 {
                self.summary_set(w as u64, w as u64 + 1);
            }
            pos = (w as u64 + 1) * WORD_BITS;
        }
    }

    /// Changes the length to `new_len` (QEMU's `hbitmap_truncate`): bits past a shrunk end are
    /// dropped, bits added by growing are clear.
    pub fn resize(&mut self, new_len: u64) {
        let old_len = self.len();
        if new_len < old_len {
            // Clears the dropped tail, so the count and the dead bits stay right.
            self.reset_range(new_len, old_len - new_len);
        }
        self.bits.resize(new_len as usize, false);
        let tail = new_len % WORD_BITS;
        if let (Some(last), true) = (self.bits.as_raw_mut_slice().last_mut(), tail != 0) {
            debug_assert_eq!(*last & !word_mask(0, tail), 0, "dead bits set");
            *last &= word_mask(0, tail);
        }
        self.summary = build_summary(self.bits.as_raw_slice());
    }

    /// Panics when a stated invariant is broken; O(len), for tests.
    #[cfg(test)]
    fn check_invariants(&self) {
        let words = self.as_words();
        assert_eq!(words.len(), words_for(self.len()));
        let tail = self.len() % WORD_BITS;
        if let (Some(last), true) = (words.last(), tail != 0) {
            assert_eq!(last & !word_mask(0, tail), 0, "bits past the end are set");
        }
        let ones: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        assert_eq!(ones, self.count, "count drifted");
        assert_eq!(self.summary, build_summary(words), "summary disagrees with the bits");
    }
}

/// Disk size and bits, under one lock so a resize never interleaves with a mark.
struct State {
    /// Disk size in bytes.
    size: u64,
    /// One bit per granule; `bits.len() == size.div_ceil(granularity)`, so bits past the end of
    /// the disk are always clear. The last granule may be partial.
    bits: HBitmap,
}

/// A named, thread-safe dirty bitmap over a disk of `size` bytes, one bit per `granularity`
/// bytes (QEMU's `BdrvDirtyBitmap`).
///
/// All methods are synchronous and hold the inner lock only for their own duration, so it is
/// never held across an await.
pub struct DirtyBitmap {
    /// The QMP `name`, unique per node (enforced by the node, not here).
    name: String,
    /// Bytes per bit: a power of two in `MIN_GRANULARITY..=MAX_GRANULARITY`.
    granularity: u64,
    /// `granularity.trailing_zeros()`.
    shift: u32,
    /// Whether guest writes are recorded (`block-dirty-bitmap-enable`/`-disable`).
    enabled: AtomicBool,
    /// In use by an operation (a job's own bitmap, an exported one): user commands must refuse
    /// to change it. Set and checked by the callers, see [`DirtyBitmap::check_not_busy`].
    busy: AtomicBool,
    state: Mutex<State>,
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("DirtyBitmap")
            .field("name", &self.name)
            .field("granularity", &self.granularity)
            .field("size", &st.size)
            .field("enabled", &self.is_enabled())
            .field("busy", &self.is_busy())
            .field("dirty_granules", &st.bits.count())
            .finish()
    }
}

impl DirtyBitmap {
    /// An enabled, clean bitmap (QEMU's `block-dirty-bitmap-add` defaults).
    pub fn new(name: &str, size: u64, granularity: u64) -> Result<Self, BitmapError> {
        check_granularity(granularity)?;
        check_name(name)?;
        let shift = granularity.trailing_zeros();
        Ok(Self {
            name: name.to_owned(),
            granularity,
            shift,
            enabled: AtomicBool::new(true),
            busy: AtomicBool::new(false),
            state: Mutex::new(State { size, bits: HBitmap::new(size.div_ceil(granularity)) }),
        })
    }

    /// [`DirtyBitmap::new`] with [`DEFAULT_GRANULARITY`].
    pub fn with_default_granularity(name: &str, size: u64) -> Result<Self, BitmapError> {
        Self::new(name, size, DEFAULT_GRANULARITY)
    }

    /// The inner state (a poisoned lock is taken over: [`crate::sync`]'s policy).
    fn lock(&self) -> MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Size of the disk covered, in bytes.
    pub fn size(&self) -> u64 {
        self.lock().size
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Starts or stops recording writes; the bits are kept either way.
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Release);
    }

    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    pub fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::Release);
    }

    /// Mark the bitmap busy if it is not: whether this call did (an operation that must own it
    /// alone, e.g. a migration carrying it, without a window between the check and the mark).
    pub fn try_claim(&self) -> bool {
        self.busy.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Fails when an operation owns the bitmap, as QEMU's `bdrv_dirty_bitmap_check` does before
    /// a user command (merge, clear, remove, enable, disable) touches it.
    pub fn check_not_busy(&self) -> Result<(), BitmapError> {
        if self.is_busy() {
            return Err(BitmapError::Busy { name: self.name.clone() });
        }
        Ok(())
    }

    /// Start of granule `g` in bytes, saturating instead of overflowing near `u64::MAX`.
    fn granule_start(&self, g: u64) -> u64 {
        g.saturating_mul(self.granularity)
    }

    /// Number of granules that hold bytes `..end`.
    fn granules_to(&self, end: u64) -> u64 {
        end.div_ceil(self.granularity)
    }

    /// Granules `(first, count)` overlapping `offset..offset + len` clipped to `size`, or `None`
    /// when that is empty.
    fn granules(&self, offset: u64, len: u64, size: u64) -> Option<(u64, u64)> {
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return None;
        }
        let first = offset >> self.shift;
        Some((first, ((end - 1) >> self.shift) - first + 1))
    }

    /// Records a write: marks every granule overlapping `offset..offset + len` if the bitmap is
    /// enabled. The part past the end of the disk is ignored; `len == 0` marks nothing.
    pub fn mark(&self, offset: u64, len: u64) {
        if self.is_enabled() {
            self.mark_force(offset, len);
        }
    }

    /// [`DirtyBitmap::mark`] even when disabled, for merges and for restoring a bitmap.
    pub fn mark_force(&self, offset: u64, len: u64) {
        let mut st = self.lock();
        if let Some((first, count)) = self.granules(offset, len, st.size) {
            st.bits.set_range(first, count);
        }
    }

    /// Clears every granule overlapping `offset..offset + len` (QEMU's
    /// `bdrv_reset_dirty_bitmap`, which requires granule-aligned ranges; an unaligned range here
    /// also clears the partly covered granules at its ends, so callers that copied only part of a
    /// granule must not reset it). The part past the end of the disk is ignored.
    pub fn reset(&self, offset: u64, len: u64) {
        let mut st = self.lock();
        if let Some((first, count)) = self.granules(offset, len, st.size) {
            st.bits.reset_range(first, count);
        }
    }

    /// Clears the whole bitmap (`block-dirty-bitmap-clear`).
    pub fn clear(&self) {
        self.lock().bits.clear_all();
    }

    /// Whether the granule holding byte `offset` is dirty; bytes past the end are clean.
    pub fn is_dirty(&self, offset: u64) -> bool {
        let st = self.lock();
        offset < st.size && st.bits.get(offset >> self.shift)
    }

    /// Number of dirty granules.
    pub fn dirty_granules(&self) -> u64 {
        self.lock().bits.count()
    }

    /// Dirty bytes: dirty granules times the granularity, the last granule counted only up to
    /// the end of the disk, so a fully dirty bitmap reports exactly `size()`.
    pub fn count_bytes(&self) -> u64 {
        let st = self.lock();
        let granules = st.bits.count();
        let last = st.bits.len().saturating_sub(1);
        if granules == 0 || !st.bits.get(last) {
            return granules * self.granularity;
        }
        // The other dirty granules are whole and end before the last one starts.
        (granules - 1) * self.granularity + (st.size - self.granule_start(last))
    }

    /// The first dirty area at or after byte `offset`, at most `max_len` bytes, clipped to the
    /// disk, as `(offset, len)` in bytes. An area that starts inside a dirty granule before
    /// `offset` is returned from `offset`. O(levels + len / granularity / 64).
    pub fn next_dirty_area(&self, offset: u64, max_len: u64) -> Option<(u64, u64)> {
        let st = self.lock();
        if max_len == 0 || offset >= st.size {
            return None;
        }
        let g = st.bits.next_set(offset >> self.shift)?;
        let start = self.granule_start(g).max(offset);
        let limit = start.saturating_add(max_len).min(st.size);
        let (_, run) = st.bits.next_set_run(g, self.granules_to(limit) - g)?;
        let end = self.granule_start(g + run).min(limit);
        Some((start, end - start))
    }

    /// Alternating clean and dirty extents `(offset, len, dirty)` covering exactly
    /// `offset..offset + len` clipped to the disk, as NBD block status reports
    /// `qemu:dirty-bitmap:NAME`.
    pub fn dirty_extents(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        self.dirty_extents_into(offset, len, &mut out);
        out
    }

    /// [`DirtyBitmap::dirty_extents`] appended to `out`, so a server can reuse one buffer.
    pub fn dirty_extents_into(&self, offset: u64, len: u64, out: &mut Vec<(u64, u64, bool)>) {
        self.dirty_extents_max(offset, len, usize::MAX, out);
    }

    /// At most `max_extents` of [`DirtyBitmap::dirty_extents`] appended to `out` (NBD's
    /// `REQ_ONE` asks for 1); they cover a prefix of the range. Returns how many were appended.
    pub fn dirty_extents_max(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
        out: &mut Vec<(u64, u64, bool)>,
    ) -> usize {
        let st = self.lock();
        let end = offset.saturating_add(len).min(st.size);
        let end_g = self.granules_to(end);
        let mut pos = offset;
        let mut appended = 0;
        while pos < end && appended < max_extents {
            let g = pos >> self.shift;
            let dirty = st.bits.get(g);
            let next_g =
                if dirty { st.bits.first_clear(g, end_g) } else { st.bits.next_set(g).map_or(end_g, |s| s.min(end_g)) };
            let run_end = self.granule_start(next_g).min(end);
            out.push((pos, run_end - pos, dirty));
            appended += 1;
            pos = run_end;
        }
        appended
    }

    /// ORs `src` into `self` (`block-dirty-bitmap-merge`), whether `self` is enabled or not.
    /// Both must cover the same size; granularities may differ, in which case every granule of
    /// ours that overlaps a dirty byte range of `src` becomes dirty. Merging a bitmap into itself
    /// does nothing.
    pub fn merge_from(&self, src: &DirtyBitmap) -> Result<(), BitmapError> {
        if std::ptr::eq(self, src) {
            return Ok(());
        }
        // Two merges in opposite directions must not each hold one lock: take them in address
        // order.
        let (ours, theirs) = if std::ptr::from_ref(self) < std::ptr::from_ref(src) {
            let ours = self.lock();
            (ours, src.lock())
        } else {
            let theirs = src.lock();
            (self.lock(), theirs)
        };
        let mut ours = ours;
        if ours.size != theirs.size {
            return Err(BitmapError::SizeMismatch { ours: ours.size, theirs: theirs.size });
        }
        if self.granularity == src.granularity {
            ours.bits.merge_from(&theirs.bits);
            return Ok(());
        }
        let size = ours.size;
        let mut g = 0;
        while let Some((first, count)) = theirs.bits.next_set_run(g, u64::MAX) {
            let start = src.granule_start(first);
            let len = src.granule_start(first + count).min(size) - start;
            if let Some((f, c)) = self.granules(start, len, size) {
                ours.bits.set_range(f, c);
            }
            g = first + count;
        }
        Ok(())
    }

    /// Follows a disk resize (QEMU's `bdrv_dirty_bitmap_truncate`): granules past a shrunk end
    /// are dropped, granules added by growing are clean. A dirty partial last granule stays
    /// dirty, so after growing, its newly added bytes read as dirty too.
    pub fn resize(&self, new_size: u64) {
        let mut st = self.lock();
        st.bits.resize(self.granules_to(new_size));
        st.size = new_size;
    }

    /// The level-0 words, one bit per granule, least significant bit first, bits past the end
    /// clear: what `x-debug-block-dirty-bitmap-sha256` hashes and a migration stream carries.
    pub fn snapshot_bits(&self) -> Vec<u64> {
        self.lock().bits.as_words().to_vec()
    }

    /// Number of bits (granules): `size().div_ceil(granularity())`.
    pub fn bit_len(&self) -> u64 {
        self.lock().bits.len()
    }

    /// The disk size and the bits as bytes ([`HBitmap::to_bytes`]), read under one lock: what a
    /// migration stream carries of the bitmap.
    pub fn export(&self) -> (u64, Vec<u8>) {
        let st = self.lock();
        (st.size, st.bits.to_bytes())
    }

    /// A bitmap over a disk of `size` bytes with the bits [`DirtyBitmap::export`] gave, enabled
    /// or not: the name and granularity rules of [`DirtyBitmap::new`], and bytes that are
    /// exactly this bitmap's (count, no bit past the end).
    pub fn import(name: &str, size: u64, granularity: u64, enabled: bool, bytes: &[u8]) -> Result<Self, BitmapError> {
        let bm = Self::new(name, size, granularity)?;
        let bits = HBitmap::from_bytes(size.div_ceil(granularity), bytes)
            .map_err(|why| BitmapError::BadBits { name: name.to_owned(), why })?;
        bm.lock().bits = bits;
        bm.set_enabled(enabled);
        Ok(bm)
    }
}

/// A bitmap named by its node and its name (QAPI's `BlockDirtyBitmap`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapRef {
    pub node: String,
    pub name: String,
}

/// One user command on the named bitmaps of a graph (`block-dirty-bitmap-*`), alone or as an
/// action of a `transaction`. Every rule a user command must follow (names, granularity, busy
/// bitmaps, sizes of merged bitmaps) is checked here, once, by [`Action::prepare`].
#[derive(Debug, Clone)]
pub enum Action {
    /// `block-dirty-bitmap-add`; `granularity` as given (`Some(0)` for a negative one).
    Add {
        node: String,
        name: String,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    },
    Remove(BitmapRef),
    Clear(BitmapRef),
    Enable(BitmapRef),
    Disable(BitmapRef),
    /// `block-dirty-bitmap-merge`: OR every source into `target` of `node`.
    Merge {
        node: String,
        target: String,
        sources: Vec<BitmapRef>,
    },
}

/// Why a user command on a bitmap was refused, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error(transparent)]
    Block(#[from] crate::BlockError),
    #[error("Dirty bitmap '{0}' not found")]
    NotFound(String),
    #[error("Bitmap name cannot be empty")]
    EmptyName,
    #[error("Bitmap name too long")]
    NameTooLong,
    #[error("persistent bitmaps are not supported yet (baton has no qcow2)")]
    Persistent,
    #[error("Granularity must be power of 2 and at least 512")]
    Granularity,
    #[error("Bitmap already exists: {0}")]
    Exists(String),
    #[error("Bitmap '{0}' is currently in use by another operation and cannot be used")]
    Busy(String),
    #[error("Bitmap '{from}' is of a different size than '{target}'")]
    SizeMismatch { from: String, target: String },
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
}

/// The busy rule for user commands: a bitmap an operation owns (a job's, an exported one) is
/// neither changed nor handed to another user.
pub fn check_user_may_use(bm: &DirtyBitmap) -> Result<(), ActionError> {
    bm.check_not_busy().map_err(|_| ActionError::Busy(bm.name().to_owned()))
}

/// The bitmap `name` of `node`.
pub fn lookup(graph: &crate::Graph, node: &str, name: &str) -> Result<Arc<DirtyBitmap>, ActionError> {
    graph.find(node)?.bitmap(name).map_err(|_| ActionError::NotFound(name.to_owned()))
}

/// A copy of `bm`'s bits, to restore them on abort.
fn copy_of(bm: &DirtyBitmap) -> Result<DirtyBitmap, ActionError> {
    let c = DirtyBitmap::new(bm.name(), bm.size(), bm.granularity())?;
    c.merge_from(bm)?;
    Ok(c)
}

/// How to undo an applied action.
#[derive(Debug)]
enum Undo {
    Remove { node: String, name: String },
    Reinsert { node: String, bitmap: Arc<DirtyBitmap> },
    Restore { bitmap: Arc<DirtyBitmap>, copy: DirtyBitmap },
    Enabled { bitmap: Arc<DirtyBitmap>, was: bool },
}

/// An action applied by [`Action::prepare`]: [`Prepared::commit`] keeps it,
/// [`Prepared::abort`] undoes it.
#[derive(Debug)]
#[must_use = "a prepared action is committed or aborted"]
pub struct Prepared(Undo);

impl Action {
    /// Check the action's rules against `graph` and apply it; nothing changes when it fails.
    pub fn prepare(&self, graph: &crate::Graph) -> Result<Prepared, ActionError> {
        match self {
            Action::Add { node, name, granularity, persistent, disabled } => {
                check_name(name).map_err(|e| match e {
                    BitmapError::EmptyName => ActionError::EmptyName,
                    _ => ActionError::NameTooLong,
                })?;
                if *persistent {
                    return Err(ActionError::Persistent);
                }
                let n = graph.find(node)?;
                if let Some(g) = *granularity {
                    check_granularity(g).map_err(|source| {
                        if g < MIN_GRANULARITY || !g.is_power_of_two() {
                            ActionError::Granularity
                        } else {
                            crate::BlockError::Bitmap { node: node.clone(), source }.into()
                        }
                    })?;
                }
                if n.bitmap(name).is_ok() {
                    return Err(ActionError::Exists(name.clone()));
                }
                graph.bitmap_add(node, name, *granularity, *disabled)?;
                Ok(Prepared(Undo::Remove { node: node.clone(), name: name.clone() }))
            }
            Action::Merge { node, target, sources } => {
                let target = lookup(graph, node, target)?;
                check_user_may_use(&target)?;
                let sources = sources.iter().map(|r| lookup(graph, &r.node, &r.name)).collect::<Result<Vec<_>, _>>()?;
                // Check every source before changing anything.
                if let Some(src) = sources.iter().find(|s| s.size() != target.size()) {
                    return Err(ActionError::SizeMismatch { from: src.name().into(), target: target.name().into() });
                }
                let copy = copy_of(&target)?;
                for src in &sources {
                    target.merge_from(src)?;
                }
                Ok(Prepared(Undo::Restore { bitmap: target, copy }))
            }
            Action::Remove(r) | Action::Clear(r) | Action::Enable(r) | Action::Disable(r) => {
                let bm = lookup(graph, &r.node, &r.name)?;
                check_user_may_use(&bm)?;
                Ok(Prepared(match self {
                    Action::Remove(_) => {
                        graph.bitmap_remove(&r.node, &r.name)?;
                        Undo::Reinsert { node: r.node.clone(), bitmap: bm }
                    }
                    Action::Clear(_) => {
                        let copy = copy_of(&bm)?;
                        bm.clear();
                        Undo::Restore { bitmap: bm, copy }
                    }
                    _ => {
                        let was = bm.is_enabled();
                        bm.set_enabled(matches!(self, Action::Enable(_)));
                        Undo::Enabled { bitmap: bm, was }
                    }
                }))
            }
        }
    }
}

impl Prepared {
    /// Keep the action.
    pub fn commit(self) {}

    /// Undo the action.
    pub fn abort(self, graph: &crate::Graph) {
        match self.0 {
            Undo::Remove { node, name } => {
                let _ = graph.bitmap_remove(&node, &name);
            }
            Undo::Reinsert { node, bitmap } => {
                let _ = graph.bitmap_insert(&node, bitmap);
            }
            // OR the saved bits back rather than clear first: writes made since the action must
            // stay recorded (a bit too many is safe, one too few is not).
            Undo::Restore { bitmap, copy } => {
                let _ = bitmap.merge_from(&copy);
            }
            Undo::Enabled { bitmap, was } => bitmap.set_enabled(was),
        }
    }
}

/// Apply every action or none (`transaction`): each action is taken from
/// `actions` and prepared in turn; the first failure (to produce an action,
/// e.g. to decode it, or to prepare it) aborts those prepared before it,
/// newest first. A single command is a transaction of one action.
pub fn transaction<E: From<ActionError>>(
    graph: &crate::Graph,
    actions: impl IntoIterator<Item = Result<Action, E>>,
) -> Result<(), E> {
    let mut done: Vec<Prepared> = Vec::new();
    for a in actions {
        match a.and_then(|a| a.prepare(graph).map_err(E::from)) {
            Ok(p) => done.push(p),
            Err(e) => {
                for p in done.into_iter().rev() {
                    p.abort(graph);
                }
                return Err(e);
            }
        }
    }
    done.into_iter().for_each(Prepared::commit);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A transaction of already decoded actions.
    fn tx(g: &crate::Graph, actions: &[Action]) -> Result<(), ActionError> {
        transaction(g, actions.iter().cloned().map(Ok))
    }
    use std::sync::Arc;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    fn bits_of(h: &HBitmap) -> Vec<bool> {
        (0..h.len()).map(|b| h.get(b)).collect()
    }

    #[test]
    fn new_bitmap_is_empty_and_every_search_finds_nothing() {
        for len in [0, 1, 63, 64, 65, 4096, 4097, 300_000] {
            let h = HBitmap::new(len);
            h.check_invariants();
            assert!(h.is_empty());
            assert_eq!(h.next_set(0), None);
            assert_eq!(h.next_set_run(0, u64::MAX), None);
            assert_eq!(h.next_clear(0), (len > 0).then_some(0));
        }
    }

    #[test]
    fn first_and_last_bit_are_set_found_and_counted() {
        let mut h = HBitmap::new(130);
        h.set_range(0, 1);
        h.set_range(129, 1);
        assert!(h.get(0) && h.get(129) && !h.get(1) && !h.get(128));
        assert_eq!(h.count(), 2);
        assert_eq!(h.next_set(1), Some(129));
        assert_eq!(h.next_set(130), None);
        assert_eq!(h.next_set_run(0, 10), Some((0, 1)));
        assert_eq!(h.next_set_run(1, 10), Some((129, 1)));
        h.check_invariants();
    }

    #[test]
    fn range_across_word_boundary_counts_each_bit_once() {
        let mut h = HBitmap::new(256);
        h.set_range(60, 10);
        h.set_range(62, 70);
        assert_eq!(h.count(), 72);
        assert_eq!(h.next_set_run(0, u64::MAX), Some((60, 72)));
        h.reset_range(63, 2);
        assert_eq!(h.count(), 70);
        assert_eq!(h.next_set_run(0, u64::MAX), Some((60, 3)));
        assert_eq!(h.next_set_run(61, u64::MAX), Some((61, 2)));
        assert_eq!(h.next_clear(60), Some(63));
        h.check_invariants();
    }

    #[test]
    fn ranges_past_the_end_are_clipped_and_never_panic() {
        let mut h = HBitmap::new(100);
        h.set_range(90, u64::MAX);
        assert_eq!(h.count(), 10);
        h.set_range(u64::MAX, u64::MAX);
        h.set_range(100, 5);
        h.reset_range(5, 0);
        assert_eq!(h.count(), 10);
        assert_eq!(h.as_words()[1] >> 36, 0, "bits past the end stay clear");
        h.reset_range(95, u64::MAX);
        assert_eq!(h.count(), 5);
        assert!(!h.get(100) && !h.get(u64::MAX));
        h.check_invariants();
    }

    #[test]
    fn next_set_skips_a_clean_span_through_three_summary_levels() {
        let len = 64 * 64 * 64 * 2 + 7;
        let mut h = HBitmap::new(len);
        assert_eq!(h.summary.len(), 3);
        h.set_range(len - 1, 1);
        assert_eq!(h.next_set(0), Some(len - 1));
        h.set_range(5, 1);
        h.reset_range(5, 1);
        assert_eq!(h.next_set(0), Some(len - 1), "a cleared word leaves no stale summary bit");
        assert_eq!(h.next_set_run(0, u64::MAX), Some((len - 1, 1)));
        h.reset_range(0, len);
        assert_eq!(h.next_set(0), None);
        h.check_invariants();
    }

    #[test]
    fn next_set_run_stops_at_max_bits_and_at_the_end() {
        let mut h = HBitmap::new(1000);
        h.set_range(100, 900);
        assert_eq!(h.next_set_run(0, 64), Some((100, 64)));
        assert_eq!(h.next_set_run(950, u64::MAX), Some((950, 50)));
        assert_eq!(h.next_set_run(0, 0), None);
        assert_eq!(h.next_clear(100), None);
    }

    #[test]
    fn resize_drops_the_tail_and_grows_clear() {
        let mut h = HBitmap::new(200);
        h.set_range(0, 200);
        h.resize(70);
        h.check_invariants();
        assert_eq!(h.count(), 70);
        h.resize(5000);
        h.check_invariants();
        assert_eq!(h.count(), 70);
        assert_eq!(h.next_set(70), None);
        assert_eq!(h.next_clear(0), Some(70));
        h.resize(0);
        h.check_invariants();
        assert!(h.is_empty());
    }

    #[test]
    fn merge_ors_bits_and_clips_a_longer_source() {
        let mut a = HBitmap::new(130);
        let mut b = HBitmap::new(300);
        a.set_range(0, 3);
        b.set_range(2, 3);
        b.set_range(128, 100);
        a.merge_from(&b);
        a.check_invariants();
        assert_eq!(bits_of(&a).iter().filter(|b| **b).count(), 7);
        assert_eq!(a.count(), 7);
        assert_eq!(a.next_set_run(0, u64::MAX), Some((0, 5)));
        assert_eq!(a.next_set_run(5, u64::MAX), Some((128, 2)));
    }

    #[test]
    fn clear_all_empties_every_level() {
        let mut h = HBitmap::new(10_000);
        h.set_range(17, 9000);
        h.clear_all();
        h.check_invariants();
        assert_eq!(h.next_set(0), None);
    }

    #[test]
    fn granularity_must_be_a_power_of_two_in_range() {
        for bad in [0, 256, 511, 513, 3 * 1024, 1 << 32] {
            assert!(matches!(
                DirtyBitmap::new("b", MIB, bad),
                Err(BitmapError::BadGranularity { granularity }) if granularity == bad
            ));
        }
        for good in [512, DEFAULT_GRANULARITY, 1 << 31] {
            assert!(DirtyBitmap::new("b", MIB, good).is_ok());
        }
        assert!(matches!(DirtyBitmap::new("", MIB, 512), Err(BitmapError::EmptyName)));
        let long = "x".repeat(1024);
        assert!(matches!(DirtyBitmap::new(&long, MIB, 512), Err(BitmapError::NameTooLong { .. })));
        let msg = DirtyBitmap::new("b", 1, 1000).err().map(|e| e.to_string());
        assert_eq!(msg.as_deref(), Some("granularity must be a power of two between 512 B and 2 GiB, got 1000"));
    }

    #[test]
    fn mark_dirties_every_granule_the_write_touches() {
        let bm = DirtyBitmap::with_default_granularity("b", 10 * MIB).unwrap();
        bm.mark(64 * KIB - 1, 2);
        assert!(bm.is_dirty(0) && bm.is_dirty(64 * KIB) && !bm.is_dirty(128 * KIB));
        assert_eq!(bm.dirty_granules(), 2);
        bm.mark(5 * MIB, 0);
        assert_eq!(bm.dirty_granules(), 2, "a zero-length write marks nothing");
    }

    #[test]
    fn disabled_bitmap_ignores_writes_but_not_forced_marks() {
        let bm = DirtyBitmap::new("b", MIB, 512).unwrap();
        bm.set_enabled(false);
        bm.mark(0, 4096);
        assert_eq!(bm.count_bytes(), 0);
        bm.mark_force(0, 4096);
        assert_eq!(bm.count_bytes(), 4096);
        bm.set_enabled(true);
        bm.mark(8192, 1);
        assert_eq!(bm.count_bytes(), 4096 + 512);
    }

    #[test]
    fn writes_past_the_end_are_clipped_without_overflow() {
        let bm = DirtyBitmap::new("b", MIB, 512).unwrap();
        bm.mark(u64::MAX - 1, u64::MAX);
        bm.mark(MIB, 512);
        assert_eq!(bm.count_bytes(), 0);
        bm.mark(MIB - 1, u64::MAX);
        assert_eq!(bm.count_bytes(), 512);
        assert!(!bm.is_dirty(MIB));
        bm.reset(0, u64::MAX);
        assert_eq!(bm.count_bytes(), 0);
    }

    #[test]
    fn count_bytes_counts_the_partial_last_granule_up_to_the_size() {
        let size = MIB + 1000;
        let bm = DirtyBitmap::with_default_granularity("b", size).unwrap();
        bm.mark(size - 1, 1);
        assert_eq!(bm.count_bytes(), size - MIB);
        bm.mark(0, 1);
        assert_eq!(bm.count_bytes(), 64 * KIB + 1000);
        bm.mark(0, size);
        assert_eq!(bm.count_bytes(), size);
        assert_eq!(bm.next_dirty_area(0, u64::MAX), Some((0, size)));
    }

    #[test]
    fn reset_clears_every_granule_the_range_overlaps() {
        let bm = DirtyBitmap::new("b", MIB, 4096).unwrap();
        bm.mark(0, MIB);
        bm.reset(4095, 2);
        assert_eq!(bm.dirty_extents(0, 3 * 4096), vec![(0, 8192, false), (8192, 4096, true)]);
    }

    #[test]
    fn next_dirty_area_starts_at_offset_inside_a_dirty_granule_and_respects_max_len() {
        let bm = DirtyBitmap::new("b", MIB, 4096).unwrap();
        bm.mark(8192, 3 * 4096);
        assert_eq!(bm.next_dirty_area(0, u64::MAX), Some((8192, 3 * 4096)));
        assert_eq!(bm.next_dirty_area(10_000, u64::MAX), Some((10_000, 20480 - 10_000)));
        assert_eq!(bm.next_dirty_area(0, 5000), Some((8192, 5000)));
        assert_eq!(bm.next_dirty_area(20480, u64::MAX), None);
        assert_eq!(bm.next_dirty_area(0, 0), None);
        assert_eq!(bm.next_dirty_area(u64::MAX, 1), None);
    }

    #[test]
    fn dirty_extents_alternate_and_cover_exactly_the_range_within_the_disk() {
        let bm = DirtyBitmap::new("b", 10_000, 1024).unwrap();
        bm.mark(2048, 1);
        bm.mark(9999, 1);
        let ext = bm.dirty_extents(100, u64::MAX);
        assert_eq!(ext, vec![(100, 1948, false), (2048, 1024, true), (3072, 6144, false), (9216, 784, true)]);
        let mut out = vec![(0, 0, false)];
        assert_eq!(bm.dirty_extents_max(2500, 100, 1, &mut out), 1);
        assert_eq!(out, vec![(0, 0, false), (2500, 100, true)]);
        assert!(bm.dirty_extents(10_000, 5).is_empty());
        assert!(bm.dirty_extents(0, 0).is_empty());
    }

    #[test]
    fn merge_maps_dirty_bytes_between_granularities() {
        let size = 10 * MIB + 512;
        let coarse = DirtyBitmap::new("coarse", size, 64 * KIB).unwrap();
        let fine = DirtyBitmap::new("fine", size, 512).unwrap();
        fine.mark(70 * KIB, 1);
        fine.mark(size - 1, 1);
        coarse.set_enabled(false);
        coarse.merge_from(&fine).unwrap();
        assert_eq!(coarse.dirty_extents(0, 128 * KIB), vec![(0, 64 * KIB, false), (64 * KIB, 64 * KIB, true)]);
        assert!(coarse.is_dirty(size - 1));
        assert_eq!(coarse.dirty_granules(), 2);
        fine.clear();
        fine.merge_from(&coarse).unwrap();
        assert_eq!(fine.count_bytes(), 64 * KIB + 512);
    }

    #[test]
    fn merge_refuses_a_source_of_another_size() {
        let a = DirtyBitmap::new("a", MIB, 512).unwrap();
        let b = DirtyBitmap::new("b", 2 * MIB, 512).unwrap();
        assert!(matches!(
            a.merge_from(&b),
            Err(BitmapError::SizeMismatch { ours, theirs }) if ours == MIB && theirs == 2 * MIB
        ));
    }

    #[test]
    fn merge_into_itself_is_a_no_op_not_a_deadlock() {
        let a = Arc::new(DirtyBitmap::new("a", MIB, 512).unwrap());
        a.mark(0, 1);
        let same = Arc::clone(&a);
        a.merge_from(&same).unwrap();
        assert_eq!(a.count_bytes(), 512);
    }

    #[test]
    fn opposite_merges_from_two_threads_do_not_deadlock() {
        let a = Arc::new(DirtyBitmap::new("a", MIB, 512).unwrap());
        let b = Arc::new(DirtyBitmap::new("b", MIB, 4096).unwrap());
        a.mark(0, 1);
        b.mark(MIB - 1, 1);
        let (a2, b2) = (Arc::clone(&a), Arc::clone(&b));
        let t = std::thread::spawn(move || {
            for _ in 0..2000 {
                a2.merge_from(&b2).unwrap();
            }
        });
        for _ in 0..2000 {
            b.merge_from(&a).unwrap();
            b.mark(4096, 1);
        }
        t.join().unwrap();
        assert!(a.is_dirty(MIB - 1) && b.is_dirty(0));
    }

    #[test]
    fn resize_keeps_marks_inside_and_drops_marks_outside() {
        let bm = DirtyBitmap::new("b", MIB, 4096).unwrap();
        bm.mark(0, 1);
        bm.mark(MIB - 1, 1);
        bm.resize(MIB / 2 + 100);
        assert_eq!(bm.size(), MIB / 2 + 100);
        assert_eq!(bm.count_bytes(), 4096);
        bm.mark(MIB / 2, 4096);
        assert_eq!(bm.count_bytes(), 4096 + 100);
        bm.resize(2 * MIB);
        assert_eq!(bm.count_bytes(), 8192, "the partial granule grew to a whole one");
        assert!(!bm.is_dirty(MIB - 1));
        assert_eq!(bm.snapshot_bits().len(), 2 * MIB as usize / 4096 / 64);
    }

    #[test]
    fn snapshot_bits_has_one_bit_per_granule_lsb_first() {
        let bm = DirtyBitmap::new("b", 100 * 4096, 4096).unwrap();
        bm.mark(0, 1);
        bm.mark(65 * 4096, 1);
        assert_eq!(bm.snapshot_bits(), vec![1, 2]);
    }

    #[test]
    fn export_and_import_round_trip_every_bit_and_refuse_foreign_bytes() {
        // 100 granules of 4 KiB and a partial one: 101 bits, 13 bytes.
        let size = 100 * 4096 + 1;
        let bm = DirtyBitmap::new("b", size, 4096).unwrap();
        for at in [0, 7 * 4096, 64 * 4096, 100 * 4096] {
            bm.mark(at, 1);
        }
        let (sz, bytes) = bm.export();
        assert_eq!((sz, bytes.len(), bm.bit_len()), (size, 13, 101));
        assert_eq!(bytes[0], 0b1000_0001);
        assert_eq!(bytes[12], 0b1_0000, "bit 100 is bit 4 of byte 12");
        assert_eq!(bytes[8], 1, "bit 64 is bit 0 of byte 8");
        let back = DirtyBitmap::import("c", size, 4096, false, &bytes).unwrap();
        assert_eq!(back.snapshot_bits(), bm.snapshot_bits());
        assert_eq!(back.dirty_granules(), 4);
        assert!(!back.is_enabled());
        assert_eq!(back.next_dirty_area(4096, u64::MAX), Some((7 * 4096, 4096)), "the summary follows the bits");
        back.mark(4096, 1);
        assert_eq!(back.dirty_granules(), 4, "disabled: writes are not recorded");
        // Another count of bytes, a bit past the end, a bad granularity or name.
        let e = DirtyBitmap::import("c", size, 4096, true, &bytes[..12]).unwrap_err();
        assert_eq!(e.to_string(), "bitmap 'c': 12 bytes of bits for 101 bits (want 13)");
        let mut past = bytes.clone();
        past[12] |= 0x20;
        let e = DirtyBitmap::import("c", size, 4096, true, &past).unwrap_err();
        assert!(e.to_string().ends_with("bits set past the end (101 bits)"), "{e}");
        assert!(matches!(DirtyBitmap::import("c", size, 1000, true, &bytes), Err(BitmapError::BadGranularity { .. })));
        assert!(matches!(DirtyBitmap::import("", size, 4096, true, &bytes), Err(BitmapError::EmptyName)));
        // An empty disk has no bits.
        let empty = DirtyBitmap::import("e", 0, 512, true, &[]).unwrap();
        assert_eq!(empty.export(), (0, vec![]));
    }

    #[tokio::test]
    async fn an_adopted_bitmap_is_detached_by_identity() {
        let g = graph_with_node().await;
        let bm = DirtyBitmap::new("b", MIB, 4096).unwrap();
        bm.mark(0, 1);
        let adopted = g.bitmap_adopt("n", bm).unwrap();
        assert!(lookup(&g, "n", "b").unwrap().is_dirty(0));
        let e = g.bitmap_adopt("n", DirtyBitmap::new("b", MIB, 4096).unwrap()).unwrap_err();
        assert_eq!(e.to_string(), "bitmap 'b' already exists on node 'n'");
        let e = g.bitmap_adopt("n", DirtyBitmap::new("c", MIB + 1, 4096).unwrap()).unwrap_err();
        assert!(crate::error::chain(&e).contains("ours covers 1048576 bytes, theirs 1048577"), "{e}");
        // Another bitmap of the same name is not the adopted one.
        let other = Arc::new(DirtyBitmap::new("b", MIB, 4096).unwrap());
        assert!(!g.bitmap_detach("n", &other));
        assert!(g.bitmap_detach("n", &adopted));
        assert!(lookup(&g, "n", "b").is_err());
        assert!(!g.bitmap_detach("n", &adopted));
        assert!(!g.bitmap_detach("nosuch", &adopted));
    }

    #[test]
    fn busy_bitmap_refuses_user_commands() {
        let bm = DirtyBitmap::new("job", MIB, 512).unwrap();
        assert!(bm.try_claim() && !bm.try_claim() && bm.is_busy());
        bm.set_busy(false);
        assert!(bm.check_not_busy().is_ok());
        bm.set_busy(true);
        let err = bm.check_not_busy().err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("bitmap 'job' is in use by another operation"));
    }

    async fn graph_with_node() -> crate::Graph {
        let g = crate::Graph::new();
        g.blockdev_add(&serde_json::json!({"driver": "null-co", "node-name": "n", "size": MIB})).await.unwrap();
        g
    }

    fn r(name: &str) -> BitmapRef {
        BitmapRef { node: "n".into(), name: name.into() }
    }

    fn add(name: &str, granularity: Option<u64>) -> Action {
        Action::Add { node: "n".into(), name: name.into(), granularity, persistent: false, disabled: false }
    }

    #[tokio::test]
    async fn user_commands_follow_the_rules_in_qemus_words() {
        let g = graph_with_node().await;
        let err = |a: Action| tx(&g, &[a]).err().map(|e| crate::error::chain(&e)).unwrap_or_default();
        assert_eq!(err(add("", None)), "Bitmap name cannot be empty");
        assert_eq!(err(add(&"x".repeat(MAX_NAME_LEN + 1), None)), "Bitmap name too long");
        assert_eq!(err(add("b", Some(1000))), "Granularity must be power of 2 and at least 512");
        assert_eq!(err(add("b", Some(256))), "Granularity must be power of 2 and at least 512");
        // The upper bound is the same rule as DirtyBitmap::new's.
        assert!(err(add("b", Some(MAX_GRANULARITY * 2))).contains("between 512 B and 2 GiB"));
        assert!(tx(&g, &[add(&"x".repeat(MAX_NAME_LEN), Some(MAX_GRANULARITY))]).is_ok());
        assert!(tx(&g, &[add("b", None)]).is_ok());
        assert_eq!(err(add("b", None)), "Bitmap already exists: b");
        assert_eq!(err(Action::Clear(r("nosuch"))), "Dirty bitmap 'nosuch' not found");
        lookup(&g, "n", "b").unwrap().set_busy(true);
        for a in [Action::Remove(r("b")), Action::Clear(r("b")), Action::Enable(r("b")), Action::Disable(r("b"))] {
            assert_eq!(err(a), "Bitmap 'b' is currently in use by another operation and cannot be used");
        }
        let merge = Action::Merge { node: "n".into(), target: "b".into(), sources: vec![] };
        assert_eq!(err(merge), "Bitmap 'b' is currently in use by another operation and cannot be used");
    }

    #[tokio::test]
    async fn a_failing_action_undoes_the_ones_before_it() {
        let g = graph_with_node().await;
        tx(&g, &[add("keep", Some(512)), add("gone", None)]).unwrap();
        let keep = lookup(&g, "n", "keep").unwrap();
        keep.mark(0, 512);
        let actions = [
            add("new", None),
            Action::Clear(r("keep")),
            Action::Disable(r("keep")),
            Action::Remove(r("gone")),
            Action::Merge { node: "n".into(), target: "keep".into(), sources: vec![r("nosuch")] },
        ];
        assert!(tx(&g, &actions).is_err());
        assert!(lookup(&g, "n", "new").is_err(), "the added bitmap is removed again");
        assert!(keep.is_dirty(0) && keep.is_enabled(), "cleared bits and the enabled state come back");
        assert!(lookup(&g, "n", "gone").is_ok(), "the removed bitmap is put back");
        tx(&g, &actions[..4]).unwrap();
        assert!(lookup(&g, "n", "new").is_ok() && lookup(&g, "n", "gone").is_err());
        assert!(!keep.is_dirty(0) && !keep.is_enabled());
    }

    /// What a model and the real thing are asked to do.
    #[derive(Debug, Clone)]
    enum Op {
        Set(u64, u64),
        Reset(u64, u64),
        NextSet(u64),
        NextClear(u64),
        NextSetRun(u64, u64),
        Merge(Vec<(u64, u64)>),
        Resize(u64),
        ClearAll,
    }

    fn count_strategy(max: u64) -> impl Strategy<Value = u64> {
        prop_oneof![4 => 0..max, 1 => 0..70u64, 1 => Just(u64::MAX)]
    }

    fn op_strategy(max: u64) -> impl Strategy<Value = Op> {
        let pos = 0..max + 70;
        prop_oneof![
            6 => (pos.clone(), count_strategy(max)).prop_map(|(s, c)| Op::Set(s, c)),
            6 => (pos.clone(), count_strategy(max)).prop_map(|(s, c)| Op::Reset(s, c)),
            3 => pos.clone().prop_map(Op::NextSet),
            3 => pos.clone().prop_map(Op::NextClear),
            3 => (pos.clone(), count_strategy(max)).prop_map(|(s, c)| Op::NextSetRun(s, c)),
            2 => prop::collection::vec((pos.clone(), 0..max / 4 + 1), 0..6).prop_map(Op::Merge),
            1 => (0..max + 1).prop_map(Op::Resize),
            1 => Just(Op::ClearAll),
        ]
    }

    fn model_set(m: &mut [bool], start: u64, count: u64, v: bool) {
        let end = start.saturating_add(count).min(m.len() as u64);
        for b in start..end {
            m[b as usize] = v;
        }
    }

    proptest! {
        #[test]
        fn hbitmap_matches_a_vec_of_bools(
            len in 0..5000u64,
            ops in prop::collection::vec(op_strategy(5000), 1..40),
        ) {
            let mut h = HBitmap::new(len);
            let mut m = vec![false; len as usize];
            for op in ops {
                match op {
                    Op::Set(s, c) => { h.set_range(s, c); model_set(&mut m, s, c, true); }
                    Op::Reset(s, c) => { h.reset_range(s, c); model_set(&mut m, s, c, false); }
                    Op::NextSet(f) => {
                        let want = (f..m.len() as u64).find(|b| m[*b as usize]);
                        prop_assert_eq!(h.next_set(f), want);
                    }
                    Op::NextClear(f) => {
                        let want = (f..m.len() as u64).find(|b| !m[*b as usize]);
                        prop_assert_eq!(h.next_clear(f), want);
                    }
                    Op::NextSetRun(f, max) => {
                        let want = (f..m.len() as u64).find(|b| m[*b as usize]).filter(|_| max > 0).map(|s| {
                            let n = (s..m.len() as u64).take_while(|b| m[*b as usize]).count() as u64;
                            (s, n.min(max))
                        });
                        prop_assert_eq!(h.next_set_run(f, max), want);
                    }
                    Op::Merge(ranges) => {
                        let mut other = HBitmap::new(m.len() as u64 + 100);
                        for (s, c) in ranges {
                            other.set_range(s, c);
                            model_set(&mut m, s, c, true);
                        }
                        h.merge_from(&other);
                    }
                    Op::Resize(n) => { h.resize(n); m.resize(n as usize, false); }
                    Op::ClearAll => { h.clear_all(); m.fill(false); }
                }
                h.check_invariants();
                prop_assert_eq!(h.count(), m.iter().filter(|b| **b).count() as u64);
                prop_assert_eq!(bits_of(&h), m.clone());
            }
        }
    }

    /// Naive per-granule model of a [`DirtyBitmap`].
    struct Model {
        size: u64,
        gran: u64,
        bits: Vec<bool>,
    }

    impl Model {
        fn new(size: u64, gran: u64) -> Self {
            Self { size, gran, bits: vec![false; size.div_ceil(gran) as usize] }
        }
        fn put(&mut self, off: u64, len: u64, v: bool) {
            let end = off.saturating_add(len).min(self.size);
            if off >= end {
                return;
            }
            for g in 0..self.bits.len() as u64 {
                if g * self.gran < end && (g + 1) * self.gran > off {
                    self.bits[g as usize] = v;
                }
            }
        }
        fn dirty(&self, byte: u64) -> bool {
            byte < self.size && self.bits[(byte / self.gran) as usize]
        }
        /// Granule-sized pieces of the range, coalesced when alike.
        fn extents(&self, off: u64, len: u64) -> Vec<(u64, u64, bool)> {
            let end = off.saturating_add(len).min(self.size);
            let mut out: Vec<(u64, u64, bool)> = Vec::new();
            let mut pos = off;
            while pos < end {
                let piece_end = ((pos / self.gran + 1) * self.gran).min(end);
                let d = self.dirty(pos);
                match out.last_mut() {
                    Some(last) if last.2 == d => last.1 += piece_end - pos,
                    _ => out.push((pos, piece_end - pos, d)),
                }
                pos = piece_end;
            }
            out
        }
        fn count_bytes(&self) -> u64 {
            self.extents(0, self.size).iter().filter(|e| e.2).map(|e| e.1).sum()
        }
        fn next_dirty_area(&self, off: u64, max: u64) -> Option<(u64, u64)> {
            if max == 0 {
                return None;
            }
            self.extents(off, u64::MAX).into_iter().find(|e| e.2).map(|(s, l, _)| (s, l.min(max)))
        }
    }

    #[derive(Debug, Clone)]
    enum DOp {
        Mark(u64, u64),
        MarkDisabled(u64, u64),
        Reset(u64, u64),
        NextDirtyArea(u64, u64),
        Extents(u64, u64, usize),
        Merge(u32, Vec<(u64, u64)>),
        Clear,
    }

    fn dop_strategy(size: u64) -> impl Strategy<Value = DOp> {
        let off = 0..size + 2000;
        let len = prop_oneof![4 => 0..size / 3 + 1, 2 => 0..3000u64, 1 => Just(u64::MAX)];
        prop_oneof![
            6 => (off.clone(), len.clone()).prop_map(|(o, l)| DOp::Mark(o, l)),
            1 => (off.clone(), len.clone()).prop_map(|(o, l)| DOp::MarkDisabled(o, l)),
            4 => (off.clone(), len.clone()).prop_map(|(o, l)| DOp::Reset(o, l)),
            3 => (off.clone(), len.clone()).prop_map(|(o, l)| DOp::NextDirtyArea(o, l)),
            3 => (off.clone(), len.clone(), 0..5usize).prop_map(|(o, l, n)| DOp::Extents(o, l, n)),
            2 => (0..4u32, prop::collection::vec((off.clone(), len.clone()), 0..4))
                .prop_map(|(g, r)| DOp::Merge(g, r)),
            1 => Just(DOp::Clear),
        ]
    }

    proptest! {
        #[test]
        fn dirty_bitmap_matches_a_per_granule_model(
            (size, gran_log, ops) in (1..200_000u64, 9..13u32).prop_flat_map(|(size, g)| {
                (Just(size), Just(g), prop::collection::vec(dop_strategy(size), 1..25))
            }),
        ) {
            let gran = 1u64 << gran_log;
            let bm = DirtyBitmap::new("p", size, gran).unwrap();
            let mut m = Model::new(size, gran);
            for op in ops {
                match op {
                    DOp::Mark(o, l) => { bm.mark(o, l); m.put(o, l, true); }
                    DOp::MarkDisabled(o, l) => {
                        bm.set_enabled(false);
                        bm.mark(o, l);
                        bm.set_enabled(true);
                    }
                    DOp::Reset(o, l) => { bm.reset(o, l); m.put(o, l, false); }
                    DOp::NextDirtyArea(o, l) => {
                        prop_assert_eq!(bm.next_dirty_area(o, l), m.next_dirty_area(o, l));
                    }
                    DOp::Extents(o, l, n) => {
                        let want = m.extents(o, l);
                        prop_assert_eq!(bm.dirty_extents(o, l), want.clone());
                        let mut out = Vec::new();
                        let got = bm.dirty_extents_max(o, l, n, &mut out);
                        prop_assert_eq!(got, want.len().min(n));
                        prop_assert_eq!(&out[..], &want[..got]);
                    }
                    DOp::Merge(g, ranges) => {
                        let src_gran = 512u64 << (g * 2);
                        let src = DirtyBitmap::new("src", size, src_gran).unwrap();
                        let mut sm = Model::new(size, src_gran);
                        for (o, l) in ranges {
                            src.mark(o, l);
                            sm.put(o, l, true);
                        }
                        for (s, l, d) in sm.extents(0, size) {
                            if d { m.put(s, l, true); }
                        }
                        bm.merge_from(&src).unwrap();
                    }
                    DOp::Clear => { bm.clear(); m.bits.fill(false); }
                }
                prop_assert_eq!(bm.count_bytes(), m.count_bytes());
                prop_assert_eq!(bm.dirty_granules(), m.bits.iter().filter(|b| **b).count() as u64);
            }
            bm.lock().bits.check_invariants();
            prop_assert_eq!(bm.dirty_extents(0, u64::MAX), m.extents(0, u64::MAX));
        }
    }
}
