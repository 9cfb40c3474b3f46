//! Per-reactor pool of DMA buffers for request payloads, so the steady state of
//! an export allocates nothing per request.

use bdev::{BdevError, DmaBuf};
use std::cell::RefCell;

/// Smallest pooled size class (4 KiB).
const MIN_SHIFT: u32 = 12;
/// Largest pooled size class (1 MiB); bigger buffers are allocated and freed.
const MAX_SHIFT: u32 = 20;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
/// Bytes a reactor keeps cached per size class.
const CLASS_BUDGET: usize = 8 << 20;

thread_local! {
    static POOL: RefCell<[Vec<DmaBuf>; CLASSES]> = RefCell::new(Default::default());
}

fn class_of(cap: usize) -> Option<usize> {
    if !cap.is_power_of_two() {
        return None;
    }
    let shift = cap.trailing_zeros();
    (MIN_SHIFT..=MAX_SHIFT)
        .contains(&shift)
        .then(|| (shift - MIN_SHIFT) as usize)
}

/// A buffer of `len` bytes (contents unspecified: previous data of this reactor's
/// requests; every use overwrites what it sends).
pub fn get(len: usize) -> Result<DmaBuf, BdevError> {
    let cap = len.max(1 << MIN_SHIFT).next_power_of_two();
    if let Some(c) = class_of(cap) {
        if let Some(mut b) = POOL.with(|p| p.borrow_mut()[c].pop()) {
            b.set_len(len);
            return Ok(b);
        }
        let mut b = DmaBuf::new(cap)?;
        b.set_len(len);
        return Ok(b);
    }
    DmaBuf::new(len)
}

/// Returns a buffer to the pool (or frees it).
pub fn put(buf: DmaBuf) {
    if let Some(c) = class_of(buf.capacity()) {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p[c].len() * buf.capacity() < CLASS_BUDGET {
                p[c].push(buf);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_by_class() {
        let b = get(4096).unwrap();
        let p = b.as_ptr();
        put(b);
        let b2 = get(3000).unwrap();
        assert_eq!(b2.as_ptr(), p);
        assert_eq!(b2.len(), 3000);
        let big = get(3 << 20).unwrap();
        assert_eq!(big.len(), 3 << 20);
        put(big);
        assert_eq!(class_of(4096), Some(0));
        assert_eq!(class_of(1 << 20), Some(8));
        assert_eq!(class_of(2 << 20), None);
    }
}
