//! The copier's progress: the end of the contiguous prefix of the walk that
//! is done. Chunks complete out of order; a range done beyond a gap waits
//! here until the gap is filled, so the offset a job reports (on an error
//! above all: `BLOCK_JOB_ERROR`, `BLOCK_JOB_COMPLETED` with `error`, the 2011
//! `BLOCK_STREAM_COMPLETED`) means what QEMU's sequential copy means by it:
//! everything before it is done, and nothing after it is counted.

use std::collections::BTreeMap;

/// Done ranges of `[0, size)`, folded into a prefix.
#[derive(Debug, Default)]
pub struct Prefix {
    /// Everything below is done.
    done: u64,
    /// Done ranges beyond a gap: start -> end (disjoint, all above `done`).
    ahead: BTreeMap<u64, u64>,
}

impl Prefix {
    /// The end of the done prefix.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Marks `[from, to)` done; returns how far the prefix advanced.
    pub fn complete(&mut self, from: u64, to: u64) -> u64 {
        if to <= from {
            return 0;
        }
        let before = self.done;
        if from > self.done {
            self.ahead.insert(from, to);
            return 0;
        }
        self.done = self.done.max(to);
        while let Some(e) = self.ahead.first_entry() {
            if *e.key() > self.done {
                break;
            }
            let end = e.remove();
            self.done = self.done.max(end);
        }
        self.done - before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_beyond_a_gap_count_once_the_gap_is_done() {
        let mut p = Prefix::default();
        assert_eq!(p.complete(4, 8), 0);
        assert_eq!(p.complete(8, 12), 0);
        assert_eq!(p.done(), 0);
        assert_eq!(p.complete(0, 4), 12);
        assert_eq!(p.done(), 12);
        assert_eq!(p.complete(12, 12), 0, "empty range");
        assert_eq!(p.complete(20, 24), 0);
        assert_eq!(p.complete(12, 20), 12);
        assert!(p.ahead.is_empty());
    }
}
