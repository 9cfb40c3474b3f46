//! Rebuilding refcounts from the L1/L2 tables (images opened with the dirty
//! bit, i.e. written with lazy refcounts and not closed cleanly).

use super::format::MAX_REFTABLE_BYTES;
use super::image::{Image, R};
use super::overlap::OverlapChecks;
use crate::{BdevError, DmaBuf, IoStatus};

impl Image {
    /// Counts every reference from the header and the active tables, writes a
    /// fresh refcount table and blocks past everything in use, then switches the
    /// header to them and clears the dirty bit.
    pub(crate) async fn rebuild_refcounts(&self) -> R<()> {
        let refs = self.count_references(true).await?;
        self.rebuild_refcounts_with(refs).await
    }

    /// [`Image::rebuild_refcounts`] from references counted already
    /// ([`Image::count_references`]; a damaged image's are counted leniently:
    /// references past the image or entries that cannot be decoded are
    /// skipped, and such clusters are refused when accessed).
    pub(crate) async fn rebuild_refcounts_with(&self, mut refs: Vec<u32>) -> R<()> {
        let cs = self.cs;
        let (old_rt, old_rt_clusters) = {
            let h = self.hdr.borrow();
            (h.refcount_table_offset, h.refcount_table_clusters as u64)
        };
        // Place the new structures past everything in use, old refcount structures included.
        let mut end = refs.len() as u64;
        end = end.max((old_rt + old_rt_clusters * cs) / cs);
        for &b in self.reftable.borrow().iter() {
            if b != 0 {
                end = end.max(b / cs + 1);
            }
        }
        let e = self.rf.block_entries();
        let p = end;
        let (mut t, mut b) = (1u64, 1u64);
        loop {
            let nb = (p + t + b).div_ceil(e);
            let nt = (nb * 8).div_ceil(cs);
            if nb == b && nt == t {
                break;
            }
            b = nb;
            t = nt;
        }
        if t * cs > MAX_REFTABLE_BYTES || (p + t + b) * cs > self.capacity.get() {
            return Err(BdevError::Io(IoStatus::Enospc));
        }
        refs.resize((p + t + b) as usize, 0);
        for c in p..p + t + b {
            refs[c as usize] = 1;
        }
        let mut table = vec![0u64; (t * cs / 8) as usize];
        for j in 0..b {
            let mut blk = vec![0u8; cs as usize];
            for i in 0..e {
                let c = j * e + i;
                if let Some(&r) = refs.get(c as usize) {
                    if r != 0 {
                        self.rf
                            .set(&mut blk, i, r as u64)
                            .map_err(BdevError::from)?;
                    }
                }
            }
            let off = (p + t + j) * cs;
            table[j as usize] = off;
            self.write_meta(
                OverlapChecks::REFCOUNT_BLOCK,
                off,
                DmaBuf::from_slice(&blk)?,
            )
            .await?;
        }
        self.install_reftable(p, t, table, true).await?;
        self.free_hint.set(0);
        tracing::info!(image = %self.name, clusters = p + t + b, "refcounts rebuilt");
        Ok(())
    }
}
