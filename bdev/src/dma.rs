//! DMA-safe memory: aligned buffers that devices may read and write.
//!
//! Every [`DmaBuf`] is a block of one process-wide arena: a few large mappings,
//! backed by hugepages when the kernel has them reserved (`MAP_HUGETLB`), else by
//! ordinary pages with one warning, populated and locked either way. Drivers that
//! map memory into an IOMMU once (NVMe over VFIO) get the arena's ranges from
//! [`regions`] and hear about later ones through [`subscribe`].

mod arena;
pub(crate) mod map;

pub use arena::{configure, ArenaConfig, ArenaStats, RegionListener};
pub use map::hugepage_size;

use crate::error::BdevError;
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every buffer.
pub const DMA_ALIGN: usize = arena::MIN_BLOCK;

/// An owned, 4 KiB aligned buffer from the DMA arena, usable for device I/O.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: DmaBuf owns its memory exclusively, like a Box<[u8]>.
unsafe impl Send for DmaBuf {}
// SAFETY: shared access is read-only through &self, like a Box<[u8]>.
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Result<Self, BdevError> {
        let b = Self::new_dirty(len)?;
        // SAFETY: the block is valid for `cap` bytes and exclusively ours.
        unsafe { std::ptr::write_bytes(b.ptr.as_ptr(), 0, b.cap) };
        Ok(b)
    }

    /// A buffer of `len` bytes whose contents are unspecified (earlier data of
    /// the arena), for buffers that are filled completely before use (read
    /// targets): saves clearing them.
    pub fn new_dirty(len: usize) -> Result<Self, BdevError> {
        let cap = arena::block_size_for(len);
        let addr = arena::arena().alloc(cap)?;
        let ptr = NonNull::new(addr as *mut u8)
            .ok_or_else(|| BdevError::NoMem("null DMA block".into()))?;
        Ok(Self { ptr, len, cap })
    }

    /// A zeroed buffer of `len` bytes in hugepage memory only: fails rather than
    /// growing the arena with ordinary pages (for large, optional users).
    pub fn new_hugepage(len: usize) -> Result<Self, BdevError> {
        let cap = arena::block_size_for(len);
        let addr = arena::arena().alloc_with(cap, false)?;
        let ptr = NonNull::new(addr as *mut u8)
            .ok_or_else(|| BdevError::NoMem("null DMA block".into()))?;
        // SAFETY: the block is valid for `cap` bytes and exclusively ours.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, cap) };
        Ok(Self { ptr, len, cap })
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Result<Self, BdevError> {
        let mut b = Self::new(data.len())?;
        b.as_mut_slice().copy_from_slice(data);
        Ok(b)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start address.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Start address, for writing through raw pointers (devices, memcpy).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len bytes; arena memory is always
        // initialised (zero-filled when mapped, then only ever written).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Shrinks or grows the visible length within the allocation.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "DmaBuf::set_len beyond capacity");
        self.len = len;
    }

    /// Allocated capacity.
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        arena::arena().free(self.ptr.as_ptr() as usize, self.cap);
    }
}

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DmaBuf({} bytes)", self.len)
    }
}

/// The arena's mappings as `(virtual address, length)`; a driver maps each into
/// its IOMMU with IOVA = virtual address. Creates the arena if needed.
pub fn regions() -> Vec<(usize, usize)> {
    arena::arena()
        .regions()
        .iter()
        .map(|r| (r.base, r.len))
        .collect()
}

/// Calls `f(vaddr, len)` for every current region now and for every region the
/// arena adds later (under the arena's lock: `f` must not allocate DMA memory).
pub fn subscribe(f: RegionListener) {
    arena::arena().subscribe(f)
}

/// Convenience for [`subscribe`] with a closure.
pub fn subscribe_fn(f: impl Fn(usize, usize) + Send + Sync + 'static) {
    subscribe(Arc::new(f))
}

/// Whether the arena is backed by hugepages (creates it if needed).
pub fn hugepages_in_use() -> bool {
    arena::arena().stats().hugepages
}

/// The arena's counters.
pub fn stats() -> ArenaStats {
    arena::arena().stats()
}

/// Whether `[ptr, ptr+len)` lies inside one arena region.
pub fn contains(ptr: *const u8, len: usize) -> bool {
    let a = ptr as usize;
    arena::arena()
        .regions()
        .iter()
        .any(|r| a >= r.base && a.saturating_add(len) <= r.base + r.len)
}
