//! Guest memory: one anonymous mapping registered with KVM with dirty-page
//! logging on, plus vm-memory's own bitmap of the pages the VMM wrote (device
//! DMA, completions). A dirty-log pass ORs the two, so a page changed by
//! either side is reported.

use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::VmmError;

/// Guest RAM with VMM-side write tracking.
pub type Mem = GuestMemoryMmap<AtomicBitmap>;

pub const PAGE_SIZE: u64 = 4096;

/// A failed access to guest RAM: `op` ("read", "write") of `len` bytes at `addr`.
pub fn error(op: &'static str, addr: u64, len: usize, source: vm_memory::GuestMemoryError) -> VmmError {
    VmmError::GuestMemory { op, addr, len, source }
}

/// Allocate `size` bytes of guest RAM at guest-physical 0 and register it as slot 0.
pub fn create(vm: &VmFd, size: u64) -> Result<Arc<Mem>, VmmError> {
    let mem = Mem::from_ranges(&[(GuestAddress(0), size as usize)])
        .map_err(|source| VmmError::AllocMemory { size, source })?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|source| error("map", region.start_addr().0, region.len() as usize, source))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: KVM needs `userspace_addr` to point to `memory_size` bytes
        // of valid memory for as long as a guest can touch them, and slots
        // that do not overlap. `host` is the start of the mapping vm-memory
        // made for `region`, which is `region.len()` bytes long; slots are
        // numbered by region and vm-memory refuses overlapping regions. The
        // mapping lives in `mem` (an Arc) until the last clone goes, and a
        // guest runs only in a `Vm`, which holds a clone and joins its vCPU
        // threads (closing their VcpuFds) before its fields drop; `Vm::new`
        // ends the threads it started before an error drops `mem`.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|source| VmmError::Kvm { op: "KVM_SET_USER_MEMORY_REGION", source })?;
    }
    Ok(Arc::new(mem))
}

/// One pass of the dirty log: pages written by the guest (KVM's log) or by
/// the VMM (vm-memory's bitmap) since the last pass, as a bitmap of u64
/// words, page `i` in bit `i % 64` of word `i / 64`. Both sources are reset.
pub fn take_dirty_log(vm: &VmFd, mem: &Mem) -> Result<Vec<u64>, VmmError> {
    let mut out = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let pages = (region.len() / PAGE_SIZE) as usize;
        let mut words = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|source| VmmError::Kvm { op: "KVM_GET_DIRTY_LOG", source })?;
        words.resize(pages.div_ceil(64), 0);
        // The region's whole AtomicBitmap (not the trait's slice view), read
        // and cleared word by word in one atomic step each: a VMM write that
        // sets a bit meanwhile is either in this pass or in the next, never
        // lost between a read and a reset. Same layout: page p is bit p % 64
        // of word p / 64.
        let bm: &AtomicBitmap = std::ops::Deref::deref(region).bitmap();
        for (w, bits) in words.iter_mut().zip(bm.get_and_reset()) {
            *w |= bits;
        }
        out.extend(words);
    }
    Ok(out)
}

/// Each region's host address and length, if every region is a private
/// anonymous mapping: only such memory reads zeroes where nothing was ever
/// written and is zeroed by MADV_DONTNEED (a file or shared mapping keeps
/// its data elsewhere).
fn anonymous_regions(mem: &Mem) -> Result<Vec<(*mut u8, usize)>, VmmError> {
    let mut out = Vec::new();
    for region in mem.iter() {
        let len = region.len() as usize;
        if region.file_offset().is_some() {
            return Err(VmmError::Sys { op: "guest RAM is not anonymous memory", source: nix::Error::EINVAL });
        }
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|source| error("map", region.start_addr().0, len, source))?;
        out.push((host, len));
    }
    Ok(out)
}

/// Give every page of guest RAM back to the kernel: it reads as zeroes
/// again (the kernel's zero page) until written. For a destination before
/// an incoming attempt, so a zero page that arrives needs no write and no
/// read of what was there.
pub fn discard(mem: &Mem) -> Result<(), VmmError> {
    for (host, len) in anonymous_regions(mem)? {
        let Some(addr) = std::ptr::NonNull::new(host.cast::<std::ffi::c_void>()) else { continue };
        // SAFETY: `host` starts the private anonymous mapping vm-memory made
        // for `region`, `len` bytes long, alive while `mem` is. MADV_DONTNEED
        // on such a mapping only drops its pages' contents (later reads see
        // zeroes); it never unmaps, so no reference into it dangles. KVM
        // follows through its MMU notifier. Callers ensure no vCPU or device
        // uses the memory meanwhile (an incoming guest that never ran here).
        unsafe { nix::sys::mman::madvise(addr, len, nix::sys::mman::MmapAdvise::MADV_DONTNEED) }
            .map_err(|source| VmmError::Sys { op: "madvise(MADV_DONTNEED) of guest RAM", source })?;
    }
    Ok(())
}

/// The pages of guest RAM that were never touched (nor swapped out): they
/// read as zeroes, and reading one would only fault in the kernel's zero
/// page. As a bitmap like the dirty log's, from /proc/self/pagemap (bit 63:
/// present, bit 62: swapped). For pre-copy's first pass, which would
/// otherwise read (and fault) every page of a mostly idle guest.
pub fn untouched(mem: &Mem) -> Result<Vec<u64>, VmmError> {
    use std::os::unix::fs::FileExt;
    let io = |source: std::io::Error| VmmError::Sys { op: "reading /proc/self/pagemap", source: io_errno(&source) };
    let f = std::fs::File::open("/proc/self/pagemap").map_err(io)?;
    let entry = |addr: usize| -> Result<u64, VmmError> {
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, addr as u64 / PAGE_SIZE * 8).map_err(io)?;
        Ok(u64::from_ne_bytes(e))
    };
    // Trust the flags only if they show a page this thread just wrote as
    // present (a sandbox may serve a pagemap of zeroes: every page would
    // then look untouched).
    let probe = Box::new([1u8; PAGE_SIZE as usize]);
    if entry(std::hint::black_box(probe.as_ptr()) as usize)? & (3 << 62) == 0 {
        return Err(VmmError::Sys { op: "/proc/self/pagemap shows no page present", source: nix::Error::EINVAL });
    }
    let mut out = Vec::new();
    for (host, len) in anonymous_regions(mem)? {
        let pages = len / PAGE_SIZE as usize;
        let mut entries = vec![0u8; pages * 8];
        f.read_exact_at(&mut entries, host as u64 / PAGE_SIZE * 8).map_err(io)?;
        let mut words = vec![0u64; pages.div_ceil(64)];
        for (i, e) in entries.chunks_exact(8).enumerate() {
            let e = u64::from_ne_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            if e & (3 << 62) == 0 {
                words[i / 64] |= 1 << (i % 64);
            }
        }
        out.extend(words);
    }
    Ok(out)
}

fn io_errno(e: &std::io::Error) -> nix::Error {
    e.raw_os_error().map(nix::Error::from_raw).unwrap_or(nix::Error::EIO)
}

/// Number of pages set in a dirty log.
pub fn count(log: &[u64]) -> u64 {
    log.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// Whether every byte of `b` is zero: 64 bytes at a time without an early
/// exit inside each, which the compiler turns into vector instructions (a
/// byte-wise `all` does not vectorise, and pre-copy checks every page).
pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    let whole = chunks.by_ref().all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0);
    whole && chunks.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn is_zero_sees_a_set_byte_anywhere() {
        for len in [0usize, 1, 63, 64, 65, 4096, 4100] {
            let mut b = vec![0u8; len];
            assert!(super::is_zero(&b), "{len}");
            for at in 0..len {
                b[at] = 0x10;
                assert!(!super::is_zero(&b), "{len} {at}");
                b[at] = 0;
            }
        }
    }

    /// A page written reads as touched; a page only allocated, or discarded
    /// again, as untouched (and reads zeroes).
    #[test]
    fn untouched_pages_are_the_ones_never_written_or_discarded() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = super::Mem::from_ranges(&[(GuestAddress(0), 64 * 4096)]).unwrap();
        let all = super::untouched(&mem).unwrap();
        assert_eq!(all, [u64::MAX], "a fresh mapping is untouched");
        mem.write_slice(&[1u8; 8], GuestAddress(3 * 4096 + 100)).unwrap();
        let u = super::untouched(&mem).unwrap();
        assert_eq!(u, [!(1u64 << 3)], "page 3 was written");
        super::discard(&mem).unwrap();
        assert_eq!(super::untouched(&mem).unwrap(), [u64::MAX]);
        let mut b = [7u8; 8];
        mem.read_slice(&mut b, GuestAddress(3 * 4096 + 100)).unwrap();
        assert_eq!(b, [0u8; 8], "a discarded page reads zeroes");
    }
}
