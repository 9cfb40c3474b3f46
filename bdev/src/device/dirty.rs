//! A dirty map of a device's writes (QEMU's dirty bitmap on a mirror's
//! source): while a [`DirtyMap`] is attached to a [`super::Device`], every
//! write, write-zeroes and unmap that completes through the device marks the
//! granules it touched, on whichever reactor it completed. A job copying the
//! device's data elsewhere takes dirty ranges out ([`DirtyMap::take`], which
//! clears them *before* the job reads), so a write completing after that
//! read marks its granules again and they are copied again: nothing a client
//! wrote is missed.
//!
//! Shared by every reactor: one `AtomicU64` per 64 granules, marked with
//! `fetch_or` on the client's completion path only while attached.

use std::sync::atomic::{AtomicU64, Ordering};

/// Granules written since they were last taken.
pub struct DirtyMap {
    shift: u32,
    size: u64,
    words: Vec<AtomicU64>,
}

impl DirtyMap {
    /// A clean map of `size` bytes in granules of `granularity` bytes
    /// (rounded up to a power of two, at least 512).
    pub fn new(size: u64, granularity: u64) -> DirtyMap {
        let g = granularity.max(512).next_power_of_two();
        let shift = g.trailing_zeros();
        let granules = size.div_ceil(g);
        DirtyMap {
            shift,
            size,
            words: (0..granules.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// The granule size in bytes.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    fn granules(&self) -> u64 {
        self.size.div_ceil(self.granularity())
    }

    /// Marks every granule `[offset, offset + len)` touches.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = (offset + len).min(self.size);
        let (first, last) = (offset >> self.shift, (end - 1) >> self.shift);
        for g in first..=last {
            self.words[(g / 64) as usize].fetch_or(1 << (g % 64), Ordering::AcqRel);
        }
    }

    /// Takes (clears and returns) the first dirty run at or after `from`,
    /// wrapping around to 0, at most `max` bytes long (at least one
    /// granule): `(offset, len)`, `len` cut at the end of the device.
    pub fn take(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let n = self.granules();
        if n == 0 {
            return None;
        }
        let start = (from >> self.shift) % n;
        let first = (start..n).chain(0..start).find(|&g| self.is_set(g))?;
        let max_granules = (max >> self.shift).max(1);
        let mut g = first;
        while g < n && g - first < max_granules && self.clear(g) {
            g += 1;
        }
        let offset = first << self.shift;
        let end = (g << self.shift).min(self.size);
        Some((offset, end - offset))
    }

    fn is_set(&self, g: u64) -> bool {
        self.words[(g / 64) as usize].load(Ordering::Acquire) & (1 << (g % 64)) != 0
    }

    /// Clears granule `g`; whether it was set.
    fn clear(&self, g: u64) -> bool {
        let bit = 1 << (g % 64);
        self.words[(g / 64) as usize].fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Bytes marked now (whole granules).
    pub fn dirty_bytes(&self) -> u64 {
        let set: u64 = self
            .words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum();
        set << self.shift
    }
}

#[cfg(test)]
mod tests {
    use super::DirtyMap;

    #[test]
    fn marks_take_and_wrap() {
        let m = DirtyMap::new(1 << 20, 64 << 10);
        assert_eq!(m.granularity(), 64 << 10);
        assert_eq!(m.take(0, 1 << 20), None);
        m.mark(100, 1);
        m.mark((200 << 10) + 5, 70 << 10);
        assert_eq!(m.dirty_bytes(), 3 * (64 << 10));
        // From past the first mark: the run at 192K..320K, then wrap to 0.
        assert_eq!(m.take(128 << 10, 1 << 20), Some((192 << 10, 128 << 10)));
        assert_eq!(m.take(128 << 10, 1 << 20), Some((0, 64 << 10)));
        assert_eq!(m.take(0, 1 << 20), None);
        // Runs are cut at `max` and at the end of the device.
        m.mark(0, 1 << 20);
        assert_eq!(m.take(0, 100 << 10), Some((0, 64 << 10)));
        assert_eq!(m.take(0, 1 << 30), Some((64 << 10, (1 << 20) - (64 << 10))));
        let odd = DirtyMap::new(1000, 512);
        odd.mark(999, 10);
        assert_eq!(odd.take(0, 4096), Some((512, 488)));
    }
}
