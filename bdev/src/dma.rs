//! DMA-safe memory: aligned buffers that devices may read and write.
//!
//! This first version allocates page-aligned heap memory; the hugepage arena
//! (MAP_HUGETLB, populated, mlocked, sub-allocated) replaces it behind this API.

use crate::error::BdevError;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Alignment of every buffer.
pub const DMA_ALIGN: usize = 4096;

/// An owned, aligned, zero-initialised buffer usable for device I/O.
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
        let cap = len.max(1).next_multiple_of(DMA_ALIGN);
        let layout = Layout::from_size_align(cap, DMA_ALIGN).map_err(|e| BdevError::NoMem(e.to_string()))?;
        // SAFETY: layout has non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(p).ok_or_else(|| BdevError::NoMem(format!("{len} bytes of DMA memory")))?;
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

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len bytes, initialised (zeroed at allocation).
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
        if let Ok(layout) = Layout::from_size_align(self.cap, DMA_ALIGN) {
            // SAFETY: allocated in `new` with this exact layout.
            unsafe { dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DmaBuf({} bytes)", self.len)
    }
}
