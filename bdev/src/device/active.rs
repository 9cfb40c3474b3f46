//! Active mirroring (QEMU's `copy-mode: write-blocking`,
//! `do_sync_target_write`): while an [`ActiveSync`] is attached to a
//! [`super::Device`] and enabled, a write (or write-zeroes) through the
//! device completes to its client only once it is on the root *and* on the
//! mirror's target. Such a write does not mark the [`DirtyMap`]: a granule
//! that was clean (already copied) stays clean, because the target got the
//! same bytes; one that was dirty stays dirty and the job copies it.
//!
//! Ordering against the job's own copies and other writes: every active
//! write and every job copy holds its granules in a busy map (a count per
//! granule and a *conflict* bit, one `AtomicU32`, set when a granule is
//! taken while already held). An active write that ends with the conflict
//! bit set, or whose target write failed, marks its range dirty: the job
//! copies it again from the source, so the target never keeps an older
//! version than the source, whatever order the overlapping writes reached
//! each side in. The conflict bit is cleared when the last holder lets go.
//!
//! A write's target half keeps the write in flight on the device, so a
//! quiesce (the pivot) waits for both halves.

use super::DirtyMap;
use crate::bdev::Bdev;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

const CONFLICT: u32 = 1 << 31;
const COUNT: u32 = CONFLICT - 1;

/// A mirror's write-blocking state, shared by every reactor.
pub struct ActiveSync {
    target: Arc<dyn Bdev>,
    map: Arc<DirtyMap>,
    shift: u32,
    size: u64,
    busy: Vec<AtomicU32>,
    enabled: AtomicBool,
}

impl ActiveSync {
    /// The state for a mirror onto `target` tracking `map` (its granules
    /// are the busy map's). Disabled until [`ActiveSync::enable`].
    pub fn new(target: Arc<dyn Bdev>, map: Arc<DirtyMap>, size: u64) -> Arc<ActiveSync> {
        let g = map.granularity();
        let shift = g.trailing_zeros();
        let n = size.div_ceil(g);
        Arc::new(ActiveSync {
            target,
            map,
            shift,
            size,
            busy: (0..n).map(|_| AtomicU32::new(0)).collect(),
            enabled: AtomicBool::new(false),
        })
    }

    /// Writes through the device go to the target too from now on.
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::SeqCst);
    }

    /// Whether writes are mirrored synchronously.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// The mirror's target.
    pub fn target(&self) -> &Arc<dyn Bdev> {
        &self.target
    }

    fn granules(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<usize> {
        if len == 0 || offset >= self.size || self.busy.is_empty() {
            #[allow(clippy::reversed_empty_ranges)]
            return 1..=0;
        }
        let end = (offset + len).min(self.size);
        (offset >> self.shift) as usize..=((end - 1) >> self.shift) as usize
    }

    /// Holds `[offset, offset + len)` (a job's copy or an active write).
    pub fn acquire(&self, offset: u64, len: u64) {
        for g in self.granules(offset, len) {
            let v = self.busy[g].fetch_add(1, Ordering::AcqRel);
            if v & COUNT != 0 {
                self.busy[g].fetch_or(CONFLICT, Ordering::AcqRel);
            }
        }
    }

    /// Lets go of `[offset, offset + len)`; whether any granule saw a
    /// conflict while held.
    pub fn release(&self, offset: u64, len: u64) -> bool {
        let mut conflict = false;
        for g in self.granules(offset, len) {
            let a = &self.busy[g];
            let mut cur = a.load(Ordering::Acquire);
            loop {
                let mut new = cur.wrapping_sub(1);
                if new & COUNT == 0 {
                    new = 0;
                }
                match a.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break,
                    Err(v) => cur = v,
                }
            }
            conflict |= cur & CONFLICT != 0;
        }
        conflict
    }

    /// An active write's end: released, and its range marked dirty if the
    /// target half failed (`ok` false) or another copy or write overlapped.
    pub fn finish(&self, offset: u64, len: u64, ok: bool) {
        let conflict = self.release(offset, len);
        if conflict || !ok {
            self.map.mark(offset, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ActiveSync;
    use crate::device::DirtyMap;
    use crate::null::NullBdev;
    use std::sync::Arc;

    #[test]
    fn overlaps_mark_dirty_and_lone_writes_do_not() {
        let map = Arc::new(DirtyMap::new(1 << 20, 64 << 10));
        let t = NullBdev::new("t", (1 << 20) / 512, 512, None).unwrap();
        let s = ActiveSync::new(t, map.clone(), 1 << 20);
        // A lone write: nothing marked.
        s.acquire(4096, 4096);
        s.finish(4096, 4096, true);
        assert_eq!(map.dirty_bytes(), 0);
        // A copy held while a write runs: the write marks its range.
        s.acquire(0, 128 << 10);
        s.acquire(4096, 4096);
        s.finish(4096, 4096, true);
        assert_eq!(map.take(0, 1 << 20), Some((0, 64 << 10)));
        // The copy's release sees the conflict too; then the bit is gone.
        assert!(s.release(0, 128 << 10));
        s.acquire(70 << 10, 1024);
        s.finish(70 << 10, 1024, true);
        assert_eq!(map.dirty_bytes(), 0);
        // A failed target write marks its range.
        s.acquire(200 << 10, 1024);
        s.finish(200 << 10, 1024, false);
        assert_eq!(map.take(0, 1 << 20), Some((192 << 10, 64 << 10)));
    }
}
