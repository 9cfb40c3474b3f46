//! `NBD_CMD_BLOCK_STATUS` for `base:allocation`: extents from the bdev's
//! allocation status (`Bdev::range_status`; bdevs without it are all data).

use super::proto::{errno, state};
use bdev::{Bdev, BdevError, RangeStatus};
use std::sync::Arc;

/// Most extents in one reply; the reply may then cover less than was asked.
const MAX_EXTENTS: usize = 2048;

fn flags(st: &RangeStatus) -> u32 {
    let mut f = 0;
    if !st.allocated {
        f |= state::HOLE;
    }
    if st.zero {
        f |= state::ZERO;
    }
    f
}

/// Extents `(length, flags)` from `offset` covering at most `len` bytes; one
/// extent if `one`. Errors are NBD errnos.
pub(crate) async fn extents(
    bdev: &Arc<dyn Bdev>,
    offset: u64,
    len: u32,
    one: bool,
) -> Result<Vec<(u32, u32)>, u32> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut done: u64 = 0;
    let want = len as u64;
    while done < want && out.len() < MAX_EXTENTS {
        let Some(fut) = bdev.range_status(offset + done, want - done) else {
            // No allocation information: everything left is data.
            push(&mut out, (want - done) as u32, 0);
            break;
        };
        let st = fut.await.map_err(|e| match e {
            BdevError::Io(s) if s.errno() == libc::EINVAL => errno::EINVAL,
            BdevError::NoMem(_) => errno::ENOMEM,
            _ => errno::EIO,
        })?;
        if st.len == 0 {
            tracing::warn!(
                bdev = bdev.name(),
                offset = offset + done,
                "range_status returned an empty extent"
            );
            return Err(errno::EIO);
        }
        let n = st.len.min(want - done);
        push(&mut out, n as u32, flags(&st));
        done += n;
        if one {
            break;
        }
    }
    if one {
        out.truncate(1);
    }
    Ok(out)
}

fn push(out: &mut Vec<(u32, u32)>, len: u32, f: u32) {
    match out.last_mut() {
        Some((l, lf)) if *lf == f => *l += len,
        _ => out.push((len, f)),
    }
}

/// The payload of a `BLOCK_STATUS` chunk: context id, then (length, flags) pairs.
pub(crate) fn payload(context: u32, ext: &[(u32, u32)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + 8 * ext.len());
    v.extend_from_slice(&context.to_be_bytes());
    for (l, f) in ext {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&f.to_be_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_equal_neighbours() {
        let mut v = Vec::new();
        push(&mut v, 4096, 0);
        push(&mut v, 4096, 0);
        push(&mut v, 512, state::HOLE | state::ZERO);
        assert_eq!(v, vec![(8192, 0), (512, 3)]);
        let p = payload(1, &v);
        assert_eq!(p.len(), 4 + 16);
        assert_eq!(&p[0..4], &[0, 0, 0, 1]);
    }
}
