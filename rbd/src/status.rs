//! An image's last allocation answer, kept for the walk that asks next.
//!
//! A walk of block status (a stream's, a mirror's, `qemu-img map` over NBD)
//! asks about one extent at a time, from where the last answer ended. Each
//! query is a helper thread and an `rbd_diff_iterate2` over the rest of the
//! window ([`crate::bdev`]): with fast-diff a read of the object map from
//! the OSD, without it a listing per object. The query already returns every
//! allocated extent of that window; [`StatusCache`] keeps them, so that the
//! next queries inside the window are answered from memory instead of one
//! cluster round trip per extent (a stream from RBD spent most of its time
//! waiting on these, one after the other).
//!
//! An answer is used only while it is still what a new query would say, as
//! far as this process can know:
//!
//! - no write, discard or write-zeroes went through the image since the
//!   query began: each bumps the image's generation when it is submitted
//!   and again when it completes ([`StatusCache::invalidate`]; so does a
//!   resize), and an answer is kept only if the generation did not move
//!   while it was asked, and used only while it has not moved since;
//! - it is younger than [`TTL`]: another client of the image may allocate
//!   meanwhile (an answer is as stale as that by the time a caller uses it
//!   anyway, as QEMU's is).

use bdev::RangeStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an answer is used at most.
pub const TTL: Duration = Duration::from_millis(500);

/// One query's answer: the allocated extents of `[lo, hi)`, in order,
/// clipped to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Start of the range asked about.
    pub lo: u64,
    /// Its end.
    pub hi: u64,
    /// Allocated extents `(offset, len)`, sorted, disjoint, inside `[lo, hi)`.
    pub extents: Vec<(u64, u64)>,
}

impl Answer {
    /// The status at `offset` (inside `[lo, hi)`), at most `len` bytes
    /// long (and never beyond `hi`).
    pub fn at(&self, offset: u64, len: u64) -> RangeStatus {
        let end = offset.saturating_add(len).min(self.hi);
        let i = self.extents.partition_point(|&(s, l)| s + l <= offset);
        match self.extents.get(i) {
            Some(&(s, l)) if s <= offset => RangeStatus {
                len: (s + l).min(end) - offset,
                allocated: true,
                zero: false,
            },
            Some(&(s, _)) => RangeStatus {
                len: s.min(end) - offset,
                allocated: false,
                zero: true,
            },
            None => RangeStatus {
                len: end - offset,
                allocated: false,
                zero: true,
            },
        }
    }
}

/// The last answer of one image and the generation of its writes.
#[derive(Debug, Default)]
pub struct StatusCache {
    generation: AtomicU64,
    last: Mutex<Option<(Answer, u64, Instant)>>,
}

impl StatusCache {
    /// The generation now: taken before a query, given to [`StatusCache::store`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Something may have changed the allocation (a write, discard or
    /// write-zeroes submitted or completed, a resize): no answer given so
    /// far is used again.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The status at `offset` (at most `len` bytes) from the last answer,
    /// if it covers `offset` and is still valid at `now`.
    pub fn lookup(&self, offset: u64, len: u64, now: Instant) -> Option<RangeStatus> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let (a, g, at) = last.as_ref()?;
        let fresh = *g == self.generation() && now.saturating_duration_since(*at) < TTL;
        (fresh && a.lo <= offset && offset < a.hi && len > 0).then(|| a.at(offset, len))
    }

    /// Keeps `a`, asked at `at` when the generation was `generation`, unless
    /// the generation moved since.
    pub fn store(&self, a: Answer, generation: u64, at: Instant) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if generation == self.generation() {
            *last = Some((a, generation, at));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(len: u64, allocated: bool) -> RangeStatus {
        RangeStatus {
            len,
            allocated,
            zero: !allocated,
        }
    }

    #[test]
    fn an_answer_gives_the_extent_or_hole_at_each_offset() {
        let a = Answer {
            lo: 100,
            hi: 1000,
            extents: vec![(100, 50), (200, 100), (900, 100)],
        };
        assert_eq!(a.at(100, 900), st(50, true));
        assert_eq!(a.at(120, 900), st(30, true));
        assert_eq!(a.at(120, 10), st(10, true), "never beyond len");
        assert_eq!(a.at(150, 900), st(50, false));
        assert_eq!(a.at(150, 20), st(20, false));
        assert_eq!(a.at(299, 900), st(1, true));
        assert_eq!(a.at(300, 900), st(600, false));
        assert_eq!(a.at(950, 900), st(50, true), "never beyond the window");
        let empty = Answer {
            lo: 0,
            hi: 64,
            extents: vec![],
        };
        assert_eq!(empty.at(10, u64::MAX), st(54, false));
    }

    #[test]
    fn answers_are_used_inside_their_window_until_a_write_or_the_ttl() {
        let c = StatusCache::default();
        let t0 = Instant::now();
        let a = Answer {
            lo: 0,
            hi: 8 << 20,
            extents: vec![(0, 4 << 20)],
        };
        assert_eq!(c.lookup(0, 1, t0), None, "nothing asked yet");
        let g = c.generation();
        c.store(a.clone(), g, t0);
        assert_eq!(c.lookup(1 << 20, 64 << 20, t0), Some(st(3 << 20, true)));
        assert_eq!(c.lookup(4 << 20, 64 << 20, t0), Some(st(4 << 20, false)));
        assert_eq!(c.lookup(8 << 20, 1, t0), None, "outside the window");
        assert_eq!(c.lookup(0, 0, t0), None, "an empty query");
        assert_eq!(c.lookup(0, 1, t0 + TTL), None, "too old");
        c.invalidate();
        assert_eq!(c.lookup(0, 1, t0), None, "a write since");
        // A write during the query: its answer is not kept.
        c.store(a.clone(), g, t0);
        assert_eq!(c.lookup(0, 1, t0), None);
        c.store(a, c.generation(), t0);
        assert_eq!(c.lookup(0, 1, t0), Some(st(1, true)));
    }
}
