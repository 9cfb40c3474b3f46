//! Chunk buffers handed back after each copy, for the next chunk (no
//! allocation per chunk in steady state).

use bdev::{BdevError, DmaBuf};
use std::cell::RefCell;

/// A pool of DMA buffers, local to the job's reactor.
#[derive(Default)]
pub struct BufPool {
    free: RefCell<Vec<DmaBuf>>,
    keep: usize,
}

impl BufPool {
    /// A pool keeping at most `keep` buffers.
    pub fn new(keep: usize) -> Self {
        Self {
            free: RefCell::new(Vec::with_capacity(keep)),
            keep,
        }
    }

    /// A buffer of `len` bytes whose contents are unspecified.
    pub fn take(&self, len: usize) -> Result<DmaBuf, BdevError> {
        let mut free = self.free.borrow_mut();
        match free.iter().position(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = free.swap_remove(i);
                b.set_len(len);
                Ok(b)
            }
            None => DmaBuf::new_dirty(len),
        }
    }

    /// Keeps `b` for a later chunk (dropped when the pool is full).
    pub fn give(&self, b: DmaBuf) {
        let mut free = self.free.borrow_mut();
        if free.len() < self.keep {
            free.push(b);
        }
    }
}
