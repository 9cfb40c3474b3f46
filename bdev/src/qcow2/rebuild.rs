//! Rebuilding refcounts from the L1/L2 tables (images opened with the dirty
//! bit, i.e. written with lazy refcounts and not closed cleanly).

use super::format::{be64, ClusterKind, FormatError, L1Entry, L2Entry, MAX_REFTABLE_BYTES};
use super::image::{Image, R};
use super::overlap::OverlapChecks;
use crate::{read_at, BdevError, DmaBuf, IoStatus};

impl Image {
    /// Counts every reference from the header and the active tables, writes a
    /// fresh refcount table and blocks past everything in use, then switches the
    /// header to them and clears the dirty bit.
    pub(crate) async fn rebuild_refcounts(&self) -> R<()> {
        let cs = self.cs;
        let max_clusters = self.capacity / cs;
        let mut refs: Vec<u32> = Vec::new();
        let mut add = |off: u64, len: u64| -> R<()> {
            let first = off / cs;
            let last = (off + len.max(1) - 1) / cs;
            if last >= max_clusters {
                return Err(FormatError::Corrupt(format!(
                    "reference to {off:#x} lies past the end of the image"
                ))
                .into());
            }
            if refs.len() <= last as usize {
                refs.resize(last as usize + 1, 0);
            }
            for c in first..=last {
                refs[c as usize] = refs[c as usize].saturating_add(1);
            }
            Ok(())
        };
        let (l1_off, l1_size, old_rt, old_rt_clusters) = {
            let h = self.hdr.borrow();
            (
                h.l1_table_offset,
                h.l1_size as u64,
                h.refcount_table_offset,
                h.refcount_table_clusters as u64,
            )
        };
        add(0, cs)?;
        if l1_size > 0 {
            add(l1_off, (l1_size * 8).next_multiple_of(cs))?;
        }
        let l1: Vec<u64> = self
            .l1
            .borrow()
            .iter()
            .take(l1_size as usize)
            .copied()
            .collect();
        for e in l1 {
            let l2off = L1Entry(e).l2_offset();
            if l2off == 0 {
                continue;
            }
            add(l2off, cs)?;
            let t = read_at(&self.ch, l2off, cs as usize).await?;
            for i in 0..self.l2_entries as usize {
                match L2Entry(be64(t.as_slice(), i * 8))
                    .decode(self.version, self.cluster_bits)
                    .map_err(BdevError::from)?
                {
                    ClusterKind::Normal { host, .. } => add(host, cs)?,
                    ClusterKind::Zero { host } if host != 0 => add(host, cs)?,
                    ClusterKind::Compressed { host, len } => {
                        add(host, len.min(self.capacity.saturating_sub(host)))?
                    }
                    _ => {}
                }
            }
        }
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
        if t * cs > MAX_REFTABLE_BYTES || (p + t + b) * cs > self.capacity {
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
            self.write_meta(OverlapChecks::REFCOUNT_BLOCK, off, DmaBuf::from_slice(&blk)?)
                .await?;
        }
        self.install_reftable(p, t, table, true).await?;
        self.free_hint.set(0);
        tracing::info!(image = %self.name, clusters = p + t + b, "refcounts rebuilt");
        Ok(())
    }
}
