//! Owned, aligned I/O buffers.
//!
//! Every I/O in the block layer takes its buffer by value and hands it back on
//! completion. A borrowed `&mut [u8]` cannot be used: an io_uring read or a
//! pread on the blocking pool may still be writing into the memory after the
//! future that asked for it was dropped. Owning the buffer for the lifetime of
//! the operation makes that impossible by construction.
//!
//! Buffers are aligned to [`IO_ALIGN`] so that the same buffer works for
//! `O_DIRECT` (`cache.direct=on`) files.

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;
use std::sync::Mutex;

/// Alignment of every [`IoBuf`]; enough for `O_DIRECT` on 4 KiB-sector disks.
pub const IO_ALIGN: usize = 4096;

/// An owned, `IO_ALIGN`-aligned, zero-initialised byte buffer with a length
/// that can shrink and grow up to its capacity without reallocating.
pub struct IoBuf {
    /// Start of an allocation of `cap` bytes (dangling when `cap == 0`).
    ptr: NonNull<u8>,
    /// Bytes visible through `Deref`; always `<= cap`.
    len: usize,
    /// Bytes allocated, all initialised.
    cap: usize,
}

// SAFETY: IoBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return Self { ptr: NonNull::dangling(), len: 0, cap: 0 };
        }
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size (len > 0) and a valid alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        Self { ptr, len, cap: len }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    fn layout(cap: usize) -> Layout {
        // IO_ALIGN is a power of two and `cap` comes from a usize length, so
        // this only fails for sizes near usize::MAX, which alloc rejects anyway.
        Layout::from_size_align(cap.next_multiple_of(IO_ALIGN), IO_ALIGN)
            .unwrap_or_else(|_| alloc::handle_alloc_error(Layout::new::<[u8; IO_ALIGN]>()))
    }

    /// Bytes allocated.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Change the visible length. Bytes newly exposed keep whatever they held
    /// (they are always initialised). Fails if `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) -> Result<(), usize> {
        if len > self.cap {
            return Err(self.cap);
        }
        self.len = len;
        Ok(())
    }

    /// Raw pointer to the first byte, for handing to the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Raw pointer to the first byte, for handing to the kernel.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if self.cap != 0 {
            // SAFETY: ptr was allocated in `zeroed` with exactly this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
        }
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for `cap >= len` initialised bytes (or dangling
        // with len 0), and we hold it exclusively.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in Deref, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).field("cap", &self.cap).finish()
    }
}

/// A free list of buffers so that steady-state I/O allocates nothing.
///
/// `get` reuses the most recently returned buffer whose capacity suffices;
/// buffers larger than `max_cached` are not kept.
#[derive(Debug)]
pub struct BufPool {
    free: Mutex<Vec<IoBuf>>,
    max_cached: usize,
    max_buffers: usize,
}

impl BufPool {
    /// A pool that keeps at most `max_buffers` buffers of at most `max_cached` bytes.
    pub fn new(max_cached: usize, max_buffers: usize) -> Self {
        Self { free: Mutex::new(Vec::with_capacity(max_buffers)), max_cached, max_buffers }
    }

    /// A buffer of exactly `len` visible bytes (contents unspecified).
    pub fn get(&self, len: usize) -> IoBuf {
        if len <= self.max_cached {
            let mut free = crate::sync::lock(&self.free);
            if let Some(i) = free.iter().rposition(|b| b.capacity() >= len) {
                let mut b = free.swap_remove(i);
                // cannot fail: capacity checked above
                let _ = b.set_len(len);
                return b;
            }
            drop(free);
            // Round small buffers up so that one buffer serves many sizes.
            let mut b = IoBuf::zeroed(len.max(64 * 1024).min(self.max_cached));
            let _ = b.set_len(len);
            return b;
        }
        IoBuf::zeroed(len)
    }

    /// Return a buffer for reuse.
    pub fn put(&self, buf: IoBuf) {
        if buf.capacity() == 0 || buf.capacity() > self.max_cached {
            return;
        }
        let mut free = crate::sync::lock(&self.free);
        if free.len() < self.max_buffers {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let b = IoBuf::zeroed(5000);
        assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
        assert_eq!(b.len(), 5000);
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn set_len_bounded_by_capacity() {
        let mut b = IoBuf::zeroed(10);
        assert!(b.set_len(11).is_err());
        b.set_len(3).unwrap();
        assert_eq!(b.len(), 3);
    }

    #[test]
    fn pool_reuses() {
        let p = BufPool::new(1 << 20, 4);
        let b = p.get(4096);
        let addr = b.as_ptr() as usize;
        p.put(b);
        let c = p.get(8192);
        assert_eq!(c.as_ptr() as usize, addr);
        assert_eq!(c.len(), 8192);
    }
}
