//! Access to a controller's registers (BAR0): the one seam between the driver
//! logic and the hardware. VFIO provides a memory-mapped BAR; tests and the
//! microbenchmark provide plain memory that a software controller watches.

/// 32- and 64-bit access to a controller's register space (byte offsets).
///
/// Implementations must make each access a single, ordered access: a doorbell
/// write must not be reordered before the queue-entry stores that precede it.
pub trait RegisterIo: Send + Sync {
    /// Reads the 32-bit register at `off`.
    fn read32(&self, off: usize) -> u32;
    /// Writes the 32-bit register at `off`.
    fn write32(&self, off: usize, v: u32);
    /// Reads a 64-bit register as two 32-bit halves (low first), which every
    /// controller accepts.
    fn read64(&self, off: usize) -> u64 {
        let lo = self.read32(off) as u64;
        let hi = self.read32(off + 4) as u64;
        hi << 32 | lo
    }
    /// Writes a 64-bit register as two 32-bit halves (low first).
    fn write64(&self, off: usize, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }
    /// Length of the register space in bytes.
    fn len(&self) -> usize;
    /// Whether the register space is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A register window in memory-mapped I/O space (a mapped BAR).
pub struct MmioRegs {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is process-wide and every access is a volatile 32-bit access
// to device registers, which the device serialises; no Rust references are formed.
unsafe impl Send for MmioRegs {}
// SAFETY: as above.
unsafe impl Sync for MmioRegs {}

impl MmioRegs {
    /// Wraps a mapped register window.
    ///
    /// # Safety
    /// `base` must point to a mapping of at least `len` bytes of device registers
    /// that stays mapped for the life of the value.
    pub unsafe fn new(base: *mut u8, len: usize) -> Self {
        Self { base, len }
    }

    #[inline]
    fn ptr(&self, off: usize) -> *mut u32 {
        assert!(
            off.is_multiple_of(4) && off + 4 <= self.len,
            "register offset {off:#x} outside the BAR"
        );
        self.base.wrapping_add(off) as *mut u32
    }
}

impl RegisterIo for MmioRegs {
    #[inline]
    fn read32(&self, off: usize) -> u32 {
        let p = self.ptr(off);
        // SAFETY: `p` lies inside the mapped window (checked) and is 4-byte aligned.
        unsafe { p.read_volatile() }
    }

    #[inline]
    fn write32(&self, off: usize, v: u32) {
        let p = self.ptr(off);
        // Queue entries and data written before a doorbell must be visible first.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        // SAFETY: as in `read32`.
        unsafe { p.write_volatile(v) }
    }

    fn len(&self) -> usize {
        self.len
    }
}
