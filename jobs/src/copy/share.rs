//! The reactor's copy budget, shared fairly among the copies running on it.
//!
//! Every copy on a reactor ([`super::copy_all`]) takes part in one budget of
//! chunks in flight ([`super::Tuning::reactor_inflight`]). A copy that has
//! chunks to start (not paused, not cancelled, its walk not done) is
//! *hungry*; each hungry copy may have at most `budget / hungry` chunks in
//! flight (at least one, at most its own window). So N copies at once each
//! keep the same number of chunks before the device, and each progresses
//! at the same pace whatever order the reactor polls them in: without it,
//! every copy kept its whole window in flight, the device's queue was many
//! windows deep, and the copies that got their chunks in first (the first
//! started, the first polled) finished while others had barely begun. One
//! copy alone still gets its whole window, and a copy that stops being
//! hungry hands its share to the others at once.
//!
//! A copy also starts slowly: one chunk in flight, one more for each chunk
//! that ended, up to its share. Copies are started one command at a time;
//! without it the first started put its whole window before the device
//! before the others joined, and kept that lead to the end.
//!
//! The count is the reactor's own (a thread-local cell: no lock or atomic
//! per chunk); a copy joins it for its whole run through a [`Share`].

use std::cell::Cell;
use std::marker::PhantomData;

thread_local! {
    /// Hungry copies on this reactor.
    static HUNGRY: Cell<usize> = const { Cell::new(0) };
}

/// The most chunks in flight for one of `hungry` copies sharing `budget`,
/// with its own window `window`: `budget / hungry`, at least 1, at most
/// `window`.
pub fn fair_share(budget: usize, hungry: usize, window: usize) -> usize {
    (budget / hungry.max(1)).clamp(1, window.max(1))
}

/// One copy's place in its reactor's budget. Not `Send`: it stays on the
/// reactor it counts on.
pub struct Share {
    budget: usize,
    hungry: Cell<bool>,
    _local: PhantomData<*const ()>,
}

impl Share {
    /// Joins this reactor's budget of `budget` chunks (not hungry yet).
    pub fn join(budget: usize) -> Self {
        Self {
            budget: budget.max(1),
            hungry: Cell::new(false),
            _local: PhantomData,
        }
    }

    /// Says whether this copy has chunks to start.
    pub fn set_hungry(&self, h: bool) {
        if self.hungry.replace(h) != h {
            HUNGRY.with(|c| c.set(if h { c.get() + 1 } else { c.get() - 1 }));
        }
    }

    /// The most chunks this copy may have in flight now, given its own
    /// window and how many of its chunks ended so far (the slow start).
    pub fn limit(&self, window: usize, ended: usize) -> usize {
        fair_share(self.budget, HUNGRY.with(Cell::get), window).min(ended.saturating_add(1))
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.set_hungry(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_divided_among_hungry_copies() {
        assert_eq!(fair_share(16, 0, 8), 8, "alone: the whole window");
        assert_eq!(fair_share(16, 1, 8), 8);
        assert_eq!(fair_share(16, 2, 8), 8);
        assert_eq!(fair_share(16, 3, 8), 5);
        assert_eq!(fair_share(16, 8, 8), 2);
        assert_eq!(fair_share(16, 40, 8), 1, "never below one");
        assert_eq!(fair_share(16, 2, 3), 3, "never above the window");
        assert_eq!(fair_share(0, 0, 0), 1);
    }

    #[test]
    fn shares_follow_the_hungry_copies_of_this_thread_after_a_slow_start() {
        std::thread::spawn(|| {
            let a = Share::join(16);
            assert_eq!(a.limit(8, 100), 8);
            let ramp: Vec<_> = (0..10).map(|ended| a.limit(8, ended)).collect();
            assert_eq!(ramp, [1, 2, 3, 4, 5, 6, 7, 8, 8, 8], "the slow start");
            let b = Share::join(16);
            let c = Share::join(16);
            for s in [&a, &b, &c] {
                s.set_hungry(true);
                s.set_hungry(true);
            }
            assert_eq!((a.limit(8, 100), b.limit(8, 100)), (5, 5));
            b.set_hungry(false);
            assert_eq!(
                a.limit(8, 100),
                8,
                "a copy no longer hungry hands on its share"
            );
            drop(c);
            drop(b);
            assert_eq!(a.limit(8, 100), 8);
            let others = std::thread::spawn(|| {
                let s: Vec<_> = (0..16).map(|_| Share::join(16)).collect();
                s.iter().for_each(|s| s.set_hungry(true));
                s[0].limit(8, 100)
            });
            assert_eq!(others.join().unwrap(), 1);
            assert_eq!(
                a.limit(8, 100),
                8,
                "another reactor's copies do not count here"
            );
            drop(a);
            assert_eq!(HUNGRY.with(Cell::get), 0);
        })
        .join()
        .unwrap();
    }
}
