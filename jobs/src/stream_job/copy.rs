//! Copying one chunk: one read through the chain into one (pooled) buffer,
//! then one multi-cluster "populate if still unallocated".

use crate::job::IoOperation;
use bdev::{submit_wait, BdevError, BdevIo, DmaBuf, IoChannel};
use graph::node::ImageNode;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// A cluster-aligned range to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub(crate) offset: u64,
    pub(crate) len: u64,
    /// The chain reads zeroes here: write zeroes without reading.
    pub(crate) zero: bool,
    /// Bytes of job progress this chunk accounts for.
    pub(crate) progress: u64,
}

/// A failed chunk: which side failed, with which errno.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CopyError {
    pub(crate) op: IoOperation,
    pub(crate) errno: i32,
}

fn errno_of(e: &BdevError) -> i32 {
    match e {
        BdevError::Io(st) => st.errno(),
        other => other.errno(),
    }
}

/// Chunk buffers handed back by the image after each copy, for the next chunk
/// (no allocation per chunk in steady state).
#[derive(Default)]
pub(crate) struct BufPool {
    free: RefCell<Vec<DmaBuf>>,
}

impl BufPool {
    /// A buffer of `len` bytes whose contents are unspecified.
    fn take(&self, len: usize) -> Result<DmaBuf, BdevError> {
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

    /// Keeps `b` for a later chunk (at most `keep` buffers are kept).
    fn give(&self, b: DmaBuf, keep: usize) {
        let mut free = self.free.borrow_mut();
        if free.len() < keep {
            free.push(b);
        }
    }
}

/// Copies `c` from the chain of `top` into `top`: one read through the chain
/// into one buffer, then one multi-cluster populate (clusters a client wrote
/// meanwhile are left alone). Zero chunks become zero clusters when the image
/// has them, else zero data. `write_behind`: see
/// [`graph::node::ImageNode::populate_range_if_unallocated`].
pub(crate) async fn copy_chunk(
    top: &Arc<dyn ImageNode>,
    ch: &Rc<IoChannel>,
    pool: &BufPool,
    keep: usize,
    c: Chunk,
    write_behind: bool,
) -> Result<(), CopyError> {
    let write_err = |e: &BdevError| CopyError {
        op: IoOperation::Write,
        errno: errno_of(e),
    };
    if c.zero {
        match top.populate_zero_if_unallocated(c.offset, c.len).await {
            Ok(_) => return Ok(()),
            Err(BdevError::Unsupported(_)) => {}
            Err(e) => return Err(write_err(&e)),
        }
    }
    let mut buf = pool.take(c.len as usize).map_err(|_| CopyError {
        op: IoOperation::Read,
        errno: libc::ENOMEM,
    })?;
    if c.zero {
        buf.as_mut_slice().fill(0);
    } else {
        let mut io = submit_wait(ch, BdevIo::read(c.offset, buf, None)).await;
        let st = io.status;
        let b = io.take_buf();
        if !st.is_ok() {
            if let Some(b) = b {
                pool.give(b, keep);
            }
            return Err(CopyError {
                op: IoOperation::Read,
                errno: st.errno(),
            });
        }
        buf = b.ok_or(CopyError {
            op: IoOperation::Read,
            errno: libc::EIO,
        })?;
    }
    let (buf, _) = top
        .populate_range_if_unallocated(c.offset, buf, write_behind)
        .await
        .map_err(|e| write_err(&e))?;
    pool.give(buf, keep);
    Ok(())
}
