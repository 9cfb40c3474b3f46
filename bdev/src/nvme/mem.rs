//! DMA memory for the driver: regions the device can reach (queues, PRP lists,
//! bounce buffers), the address space that maps them (IOMMU through VFIO, or the
//! identity for a software controller), and a page allocator for bounce buffers.

use super::error::NvmeError;
use super::spec::PAGE_SIZE;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The device's view of process memory.
pub trait DmaSpace: Send + Sync {
    /// Makes `[ptr, ptr + len)` reachable by the device; returns its device
    /// address (IOVA). Control path (may be a system call).
    ///
    /// # Safety
    /// The range must be memory of this process that stays mapped until
    /// [`DmaSpace::unmap`], and that Rust code touches only through raw pointers
    /// (volatile accesses) or while the device does not use it.
    unsafe fn map(&self, ptr: *mut u8, len: usize) -> Result<u64, NvmeError>;
    /// Undoes [`DmaSpace::map`].
    fn unmap(&self, iova: u64, len: usize);
    /// The device address of `[ptr, ptr + len)` if that whole range lies in
    /// memory this space has mapped; `None` otherwise (the data then goes through
    /// a bounce buffer). Data path: no system call, no lock.
    fn translate(&self, ptr: *const u8, len: usize) -> Option<u64>;
}

const MAX_RANGES: usize = 256;

/// An append-only table of mapped ranges that readers scan without locks.
pub struct RangeTable {
    starts: Vec<AtomicU64>,
    ends: Vec<AtomicU64>,
    iovas: Vec<AtomicU64>,
    count: AtomicUsize,
    writer: Mutex<()>,
}

impl Default for RangeTable {
    fn default() -> Self {
        Self {
            starts: (0..MAX_RANGES).map(|_| AtomicU64::new(0)).collect(),
            ends: (0..MAX_RANGES).map(|_| AtomicU64::new(0)).collect(),
            iovas: (0..MAX_RANGES).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicUsize::new(0),
            writer: Mutex::new(()),
        }
    }
}

impl RangeTable {
    /// Records a mapped range.
    pub fn insert(&self, start: u64, len: u64, iova: u64) -> Result<(), NvmeError> {
        let _g = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.count.load(Ordering::Relaxed);
        // Reuse a slot freed by `remove`.
        let slot = (0..n)
            .find(|&i| self.ends[i].load(Ordering::Relaxed) == 0)
            .unwrap_or(n);
        if slot == MAX_RANGES {
            return Err(NvmeError::Dma(format!(
                "more than {MAX_RANGES} DMA mappings"
            )));
        }
        self.starts[slot].store(start, Ordering::Relaxed);
        self.iovas[slot].store(iova, Ordering::Relaxed);
        self.ends[slot].store(start + len, Ordering::Release);
        if slot == n {
            self.count.store(n + 1, Ordering::Release);
        }
        Ok(())
    }

    /// Forgets the range that starts at device address `iova`.
    pub fn remove(&self, iova: u64) {
        let _g = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.count.load(Ordering::Relaxed);
        for i in 0..n {
            if self.ends[i].load(Ordering::Relaxed) != 0
                && self.iovas[i].load(Ordering::Relaxed) == iova
            {
                self.ends[i].store(0, Ordering::Release);
            }
        }
    }

    /// The device address of `[ptr, ptr + len)` if it lies in one recorded range.
    #[inline]
    pub fn lookup(&self, ptr: u64, len: u64) -> Option<u64> {
        let n = self.count.load(Ordering::Acquire);
        for i in 0..n {
            let end = self.ends[i].load(Ordering::Acquire);
            let start = self.starts[i].load(Ordering::Relaxed);
            if ptr >= start && ptr.checked_add(len)? <= end {
                return Some(self.iovas[i].load(Ordering::Relaxed) + (ptr - start));
            }
        }
        None
    }
}

/// Maps the DMA arena's regions into `space` now and every region the arena
/// adds later. The arena keeps the listener forever, so it holds `space` weakly:
/// once the space is gone (controller detached), new regions are ignored.
pub fn follow_arena<S: DmaSpace + 'static>(space: &Arc<S>) {
    let weak = Arc::downgrade(space);
    crate::dma::subscribe_fn(move |base, len| {
        if let Some(d) = weak.upgrade() {
            // SAFETY: arena regions are never unmapped while the process runs, and
            // their memory is handed out as DmaBuf, accessed through raw pointers.
            if let Err(e) = unsafe { d.map(base as *mut u8, len) } {
                tracing::warn!("mapping DMA arena region {base:#x}+{len:#x}: {e} (its buffers will be bounced)");
            }
        }
    });
}

/// Process memory that the device reaches directly: a software controller
/// (tests, benchmarks) reads and writes it by address, so IOVA = address.
#[derive(Default)]
pub struct IdentityDma {
    ranges: RangeTable,
    /// When set, every address translates (no bounce buffers at all).
    pub all_memory: bool,
}

impl IdentityDma {
    /// A space that translates only what was mapped (like an IOMMU).
    pub fn new() -> Self {
        Self::default()
    }
    /// A space that translates any address.
    pub fn all_memory() -> Self {
        Self {
            all_memory: true,
            ..Self::default()
        }
    }
}

impl DmaSpace for IdentityDma {
    unsafe fn map(&self, ptr: *mut u8, len: usize) -> Result<u64, NvmeError> {
        self.ranges.insert(ptr as u64, len as u64, ptr as u64)?;
        Ok(ptr as u64)
    }
    fn unmap(&self, iova: u64, _len: usize) {
        self.ranges.remove(iova);
    }
    #[inline]
    fn translate(&self, ptr: *const u8, len: usize) -> Option<u64> {
        if self.all_memory {
            return Some(ptr as u64);
        }
        self.ranges.lookup(ptr as u64, len as u64)
    }
}

/// Anonymous memory mapped for the device: hugepages when reserved, locked
/// ordinary pages otherwise; zeroed; unmapped from the device and the process on drop.
pub struct DmaRegion {
    ptr: *mut u8,
    len: usize,
    iova: u64,
    space: Arc<dyn DmaSpace>,
}

// SAFETY: the region is plain memory owned by this value; the driver accesses it
// only through raw pointers with volatile operations or from one thread at a time.
unsafe impl Send for DmaRegion {}
// SAFETY: as above; `&DmaRegion` only hands out raw pointers.
unsafe impl Sync for DmaRegion {}

const HUGEPAGE: usize = 2 << 20;

impl DmaRegion {
    /// Allocates `len` bytes (rounded up to pages) and maps them into `space`.
    pub fn new(space: Arc<dyn DmaSpace>, len: usize) -> Result<Self, NvmeError> {
        let huge_len = len.max(1).next_multiple_of(HUGEPAGE);
        // SAFETY: an anonymous private mapping at an address the kernel picks.
        let mut p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                huge_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        let mut map_len = huge_len;
        if p == libc::MAP_FAILED {
            map_len = len.max(1).next_multiple_of(PAGE_SIZE);
            // SAFETY: as above, ordinary pages.
            p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    map_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(NvmeError::Dma(format!(
                    "mmap of {map_len} bytes: {}",
                    std::io::Error::last_os_error()
                )));
            }
            // SAFETY: p..p+map_len is the mapping just made. Locking keeps the pages
            // resident; VFIO pins them anyway, so a failure here is only logged.
            if unsafe { libc::mlock(p, map_len) } != 0 {
                tracing::debug!(
                    "mlock of NVMe DMA memory failed: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        let ptr = p as *mut u8;
        // SAFETY: the mapping just made is owned by the region and unmapped from
        // the device in `drop` before it is unmapped from the process.
        match unsafe { space.map(ptr, map_len) } {
            Ok(iova) => Ok(Self {
                ptr,
                len: map_len,
                iova,
                space,
            }),
            Err(e) => {
                // SAFETY: unmapping the mapping made above, which nothing else references.
                unsafe { libc::munmap(p, map_len) };
                Err(e)
            }
        }
    }

    /// Start address.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// Device address of the start.
    pub fn iova(&self) -> u64 {
        self.iova
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether empty (never: regions are at least a page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// A sub-range `[off, off + len)` as (address, device address).
    pub fn at(&self, off: usize) -> (*mut u8, u64) {
        debug_assert!(off <= self.len);
        (self.ptr.wrapping_add(off), self.iova + off as u64)
    }
    /// Zeroes `[off, off + len)`.
    pub fn zero(&self, off: usize, len: usize) {
        assert!(off + len <= self.len, "DmaRegion::zero out of range");
        // SAFETY: the range lies inside the mapping (checked); the device is not
        // using it when the driver zeroes it (queue (re)creation).
        unsafe { std::ptr::write_bytes(self.ptr.add(off), 0, len) };
    }
}

impl Drop for DmaRegion {
    fn drop(&mut self) {
        self.space.unmap(self.iova, self.len);
        // SAFETY: the mapping made in `new`; the device can no longer reach it.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// A first-fit allocator of contiguous pages inside one region (bounce buffers).
/// Used by one queue pair on one reactor.
pub struct PagePool {
    region: DmaRegion,
    used: Vec<bool>,
    hint: usize,
    free_pages: usize,
}

impl PagePool {
    /// A pool over a new region of `pages` pages.
    pub fn new(space: Arc<dyn DmaSpace>, pages: usize) -> Result<Self, NvmeError> {
        let region = DmaRegion::new(space, pages * PAGE_SIZE)?;
        Ok(Self {
            region,
            used: vec![false; pages],
            hint: 0,
            free_pages: pages,
        })
    }

    /// Total pages.
    pub fn capacity(&self) -> usize {
        self.used.len()
    }

    /// Allocates `n` contiguous pages; returns the first page's index.
    pub fn alloc(&mut self, n: usize) -> Option<usize> {
        if n == 0 || n > self.free_pages {
            return None;
        }
        let total = self.used.len();
        for pass in 0..2 {
            let (from, to) = if pass == 0 {
                (self.hint, total)
            } else {
                (0, self.hint.min(total))
            };
            let mut run = 0;
            let mut i = from;
            while i < to {
                if self.used[i] {
                    run = 0;
                } else {
                    run += 1;
                    if run == n {
                        let first = i + 1 - n;
                        self.used[first..=i].iter_mut().for_each(|u| *u = true);
                        self.free_pages -= n;
                        self.hint = (i + 1) % total;
                        return Some(first);
                    }
                }
                i += 1;
            }
        }
        None
    }

    /// Frees `n` pages starting at page `first`.
    pub fn free(&mut self, first: usize, n: usize) {
        for u in &mut self.used[first..first + n] {
            debug_assert!(*u, "double free of a bounce page");
            *u = false;
        }
        self.free_pages += n;
    }

    /// Address and device address of page `i`.
    pub fn page(&self, i: usize) -> (*mut u8, u64) {
        self.region.at(i * PAGE_SIZE)
    }
}
