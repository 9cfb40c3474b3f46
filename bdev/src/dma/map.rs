//! Anonymous memory mappings: the arena's regions (hugepages or ordinary pages,
//! populated and locked) and large lazily populated mappings (malloc bdevs).

use super::arena::Region;
use crate::error::BdevError;
use nix::sys::mman::{madvise, mlock, mmap_anonymous, munmap, MapFlags, MmapAdvise, ProtFlags};
use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::OnceLock;

/// The system's default hugepage size (from /proc/meminfo; 2 MiB if unknown).
pub fn hugepage_size() -> usize {
    static SIZE: OnceLock<usize> = OnceLock::new();
    *SIZE.get_or_init(|| {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    let rest = l.strip_prefix("Hugepagesize:")?;
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<usize>()
                        .ok()
                        .map(|kb| kb * 1024)
                })
            })
            .unwrap_or(2 << 20)
    })
}

fn map(len: usize, flags: MapFlags) -> nix::Result<NonNull<c_void>> {
    let len = NonZeroUsize::new(len).ok_or(nix::errno::Errno::EINVAL)?;
    // SAFETY: an anonymous private mapping at an address the kernel picks
    // aliases no existing Rust object.
    unsafe {
        mmap_anonymous(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            flags,
        )
    }
}

/// Maps a region of at least `want` bytes: hugepages if `try_huge` and the
/// kernel has them reserved, else ordinary pages; populated and (if allowed) locked.
/// With `small_pages` false, fails instead of falling back to ordinary pages.
pub(crate) fn map_region(
    want: usize,
    try_huge: bool,
    small_pages: bool,
) -> Result<Region, BdevError> {
    let base_flags = MapFlags::MAP_PRIVATE | MapFlags::MAP_ANONYMOUS | MapFlags::MAP_POPULATE;
    if try_huge {
        let len = want.next_multiple_of(hugepage_size());
        match map(len, base_flags | MapFlags::MAP_HUGETLB) {
            Ok(p) => {
                return Ok(Region {
                    base: p.as_ptr() as usize,
                    len,
                    huge: true,
                })
            }
            Err(e) => {
                tracing::debug!(error = %e, mib = len >> 20, "hugepage mapping failed");
                if !small_pages {
                    return Err(BdevError::NoMem(format!(
                        "{} MiB of hugepages: {e}",
                        len >> 20
                    )));
                }
            }
        }
    }
    // Ordinary pages: ask for transparent hugepages (fewer TLB misses), then
    // populate and lock.
    let len = want.next_multiple_of(2 << 20);
    let p = map(len, MapFlags::MAP_PRIVATE | MapFlags::MAP_ANONYMOUS)
        .map_err(|e| BdevError::NoMem(format!("mapping {} MiB of DMA memory: {e}", len >> 20)))?;
    // SAFETY: advice on the mapping just made; it holds no data yet.
    let _ = unsafe { madvise(p, len, MmapAdvise::MADV_HUGEPAGE) };
    populate(p, len);
    // SAFETY: p..p+len is the mapping just made; locking has no aliasing effects.
    if let Err(e) = unsafe { mlock(p, len) } {
        static ONCE: OnceLock<()> = OnceLock::new();
        ONCE.get_or_init(|| {
            tracing::warn!(error = %e, "could not lock DMA memory (RLIMIT_MEMLOCK?); it may be swapped")
        });
    }
    Ok(Region {
        base: p.as_ptr() as usize,
        len,
        huge: false,
    })
}

/// Faults in every page of a fresh private mapping (writable, zero-filled).
fn populate(p: NonNull<c_void>, len: usize) {
    // SAFETY: MADV_POPULATE_WRITE only faults pages of this fresh mapping in.
    if unsafe { libc::madvise(p.as_ptr(), len, libc::MADV_POPULATE_WRITE) } != 0 {
        let base = p.as_ptr() as *mut u8;
        for off in (0..len).step_by(4096) {
            // SAFETY: off < len, inside the fresh mapping; it already reads as zero.
            unsafe { base.add(off).write_volatile(0) };
        }
    }
}

/// A private anonymous mapping populated on first touch (zero-filled), unmapped on drop.
pub(crate) struct LazyMapping {
    ptr: NonNull<c_void>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; callers synchronise access.
unsafe impl Send for LazyMapping {}
// SAFETY: as above; the type only hands out raw pointers.
unsafe impl Sync for LazyMapping {}

impl LazyMapping {
    /// Maps `len` bytes (no swap reservation, populated lazily).
    pub(crate) fn new(len: usize) -> Result<Self, BdevError> {
        let flags = MapFlags::MAP_PRIVATE | MapFlags::MAP_ANONYMOUS | MapFlags::MAP_NORESERVE;
        let ptr = map(len, flags)
            .map_err(|e| BdevError::NoMem(format!("mapping {} MiB: {e}", len >> 20)))?;
        if len >= 2 << 20 {
            // Transparent hugepages where the system allows them: far fewer page
            // faults on first touch and TLB misses afterwards.
            // SAFETY: advice on the mapping just made.
            let _ = unsafe { madvise(ptr, len, MmapAdvise::MADV_HUGEPAGE) };
        }
        Ok(Self { ptr, len })
    }

    /// Faults every page in now (what SPDK's malloc bdev pays at creation), so
    /// the first write to a page does not take a page fault.
    pub(crate) fn populate(&self) {
        populate(self.ptr, self.len);
    }

    /// Start address.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr() as *mut u8
    }

    /// Gives the pages of `[off, off+len)` back to the kernel (they read as zeroes
    /// afterwards); only whole pages inside the range are released.
    pub(crate) fn discard(&self, off: usize, len: usize) -> bool {
        let page = 4096;
        let start = off.next_multiple_of(page);
        let end = (off + len) / page * page;
        if end <= start || end > self.len {
            return false;
        }
        // SAFETY: the range lies inside this mapping (checked above).
        let p = unsafe { NonNull::new_unchecked(self.as_ptr().add(start) as *mut c_void) };
        // SAFETY: MADV_DONTNEED on a private anonymous mapping only drops pages;
        // concurrent readers see either old data or zeroes, like a disk.
        unsafe { madvise(p, end - start, MmapAdvise::MADV_DONTNEED) }.is_ok()
    }
}

impl Drop for LazyMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped; no references into it outlive self.
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}
