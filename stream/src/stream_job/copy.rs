//! Copying one chunk: one vectored read through the chain into per-cluster
//! buffers, then "populate if still unallocated" for every cluster at once.

use crate::job::IoOperation;
use crate::node::ImageNode;
use bdev::{submit_wait, BdevError, BdevIo, DmaBuf, IoChannel, IoType};
use futures::future::join_all;
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
        other => -other.errno(),
    }
}

/// Copies `c` from the chain of `top` into `top`, cluster by cluster.
pub(crate) async fn copy_chunk(
    top: &Arc<dyn ImageNode>,
    ch: &Rc<IoChannel>,
    cluster: u64,
    c: Chunk,
) -> Result<(), CopyError> {
    let nomem = |_| CopyError {
        op: IoOperation::Read,
        errno: libc::ENOMEM,
    };
    let mut bufs = Vec::new();
    let mut off = c.offset;
    let end = c.offset + c.len;
    while off < end {
        let n = (cluster - off % cluster).min(end - off);
        // Read targets are filled completely: no need to clear them.
        let b = if c.zero {
            DmaBuf::new(n as usize)
        } else {
            DmaBuf::new_dirty(n as usize)
        };
        bufs.push(b.map_err(nomem)?);
        off += n;
    }
    if !c.zero {
        let refs: Vec<&DmaBuf> = bufs.iter().collect();
        let io = BdevIo::vectored(IoType::Read, c.offset, &refs, None, None);
        drop(refs);
        let io = submit_wait(ch, io).await;
        if !io.status.is_ok() {
            return Err(CopyError {
                op: IoOperation::Read,
                errno: io.status.errno(),
            });
        }
    }
    let mut off = c.offset;
    let mut writes = Vec::with_capacity(bufs.len());
    for b in bufs {
        let n = b.len() as u64;
        writes.push(top.populate_if_unallocated(off, b));
        off += n;
    }
    for r in join_all(writes).await {
        if let Err(e) = r {
            return Err(CopyError {
                op: IoOperation::Write,
                errno: errno_of(&e),
            });
        }
    }
    Ok(())
}
