//! The read half of a chunk's copy, shared by the drivers: the chunk's data in
//! a buffer of the job's pool.

use super::{BufPool, Chunk, CopyError};
use crate::job::IoOperation;
use bdev::{submit_wait, BdevIo, DmaBuf, IoChannel};

/// `c`'s data in a buffer taken from `pool`: read through `ch` at the chunk's
/// offset, or zero-filled for a chunk the walk found reading as zeroes. A
/// failed read gives its buffer back to the pool and reports a read error.
/// The read is marked [`BdevIo::background`]: clients' requests on a shared
/// path (a backing file on an NBD server) go ahead of it.
pub async fn read_chunk(pool: &BufPool, ch: &IoChannel, c: &Chunk) -> Result<DmaBuf, CopyError> {
    let read_err = |errno| CopyError {
        op: IoOperation::Read,
        errno,
    };
    let mut buf = pool
        .take(c.len as usize)
        .map_err(|_| read_err(libc::ENOMEM))?;
    if c.zero {
        buf.as_mut_slice().fill(0);
        return Ok(buf);
    }
    let mut io = BdevIo::read(c.offset, buf, None);
    io.background = true;
    let mut io = submit_wait(ch, io).await;
    let st = io.status;
    let b = io.take_buf();
    if !st.is_ok() {
        if let Some(b) = b {
            pool.give(b);
        }
        return Err(read_err(st.errno()));
    }
    b.ok_or(read_err(libc::EIO))
}
