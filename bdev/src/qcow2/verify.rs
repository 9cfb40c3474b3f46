//! Counting references and checking them against the refcounts, before a
//! writable image takes its first write.
//!
//! # Contract
//!
//! - [`Image::count_references`]: how often the header, the active L1 table,
//!   its L2 tables and their entries use each host cluster (what
//!   `qemu-img check` counts).
//! - [`Image::uncovered_references`]: whether every cluster that holds
//!   no metadata has a refcount at least as large as its references. When it
//!   does not (the refcounts of a damaged image lie), allocation could hand a
//!   cluster in use out again and in-place writes could land on a cluster
//!   another guest cluster reads: a writable open then rebuilds the refcounts
//!   from the tables (`rebuild.rs`), as it does for the dirty bit, so nothing
//!   acknowledged is overwritten later. Clusters that hold metadata are left to
//!   the overlap checks (`overlap.rs`), which refuse writes there.
//! - [`Image::repair_refcounts`]: that rebuild, then the COPIED flag cleared
//!   from every L2 entry whose cluster has more than one reference (as
//!   `qemu-img check -r all` does), so that no such cluster is written in place.
//! - Reads only; one read of every L2 table and refcount block, up to
//!   [`SCAN_WINDOW`] of them in flight at once.

use super::format::{be64, ClusterKind, FormatError, L1Entry, L2Entry};
use super::format::{put64, COPIED};
use super::image::{read_meta, Image, R};
use crate::BdevError;

/// Tables read at once by a scan (L2 tables, refcount blocks): enough to keep
/// a disk's queue busy, few enough to bound the memory (64 clusters).
const SCAN_WINDOW: usize = 64;

impl Image {
    /// Host offsets of the active L1 table's L2 tables.
    fn l2_tables(&self) -> Vec<u64> {
        let l1_size = self.hdr.borrow().l1_size as usize;
        self.l1
            .borrow()
            .iter()
            .take(l1_size)
            .map(|&e| L1Entry(e).l2_offset())
            .filter(|&o| o != 0)
            .collect()
    }

    /// References to each host cluster (index: cluster number). With `strict`,
    /// a reference past the image or an entry that cannot be decoded is an
    /// error; without, it is skipped.
    pub(crate) async fn count_references(&self, strict: bool) -> R<Vec<u32>> {
        let cs = self.cs;
        let max_clusters = self.capacity.get() / cs;
        let mut refs: Vec<u32> = Vec::new();
        let mut add = |off: u64, len: u64| -> R<()> {
            let first = off / cs;
            let last = (off.saturating_add(len.max(1)) - 1) / cs;
            if last >= max_clusters {
                if !strict {
                    return Ok(());
                }
                return Err(FormatError::Corrupt(format!(
                    "reference to {off:#x} lies past the end of the image"
                ))
                .into());
            }
            if refs.len() <= last as usize {
                // `refs.len()` stays one past the last cluster referenced
                // (`rebuild.rs` places new refcount structures there).
                refs.resize(last as usize + 1, 0);
            }
            for c in first..=last {
                refs[c as usize] = refs[c as usize].saturating_add(1);
            }
            Ok(())
        };
        let (l1_off, l1_size) = {
            let h = self.hdr.borrow();
            (h.l1_table_offset, h.l1_size as u64)
        };
        add(0, cs)?;
        if l1_size > 0 {
            add(l1_off, (l1_size * 8).next_multiple_of(cs))?;
        }
        let tables = self.l2_tables();
        for batch in tables.chunks(SCAN_WINDOW) {
            let reads = batch
                .iter()
                .map(|&off| read_meta(&self.ch, self.capacity.get(), off, cs));
            let read = futures::future::join_all(reads).await;
            for (&l2off, t) in batch.iter().zip(read) {
                let t = t?;
                add(l2off, cs)?;
                for i in 0..self.l2_entries as usize {
                    let kind =
                        match L2Entry(be64(&t, i * 8)).decode(self.version, self.cluster_bits) {
                            Ok(k) => k,
                            Err(e) if strict => return Err(BdevError::from(e)),
                            Err(_) => continue,
                        };
                    match kind {
                        ClusterKind::Normal { host, .. } => add(host, cs)?,
                        ClusterKind::Zero { host } if host != 0 => add(host, cs)?,
                        ClusterKind::Compressed { host, len } => {
                            add(host, len.min(self.capacity.get().saturating_sub(host)))?
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(refs)
    }

    /// Whether every cluster holding no metadata has a refcount covering its
    /// references (see the module doc): `None` when it does, else the
    /// references counted (for [`Image::repair_refcounts`]). Reads every L2
    /// table and refcount block once.
    pub(crate) async fn uncovered_references(&self) -> R<Option<Vec<u32>>> {
        let refs = self.count_references(false).await?;
        Ok((!self.refcounts_cover(&refs).await?).then_some(refs))
    }

    /// Whether the refcounts on disk cover `refs` (see [`Image::uncovered_references`]).
    async fn refcounts_cover(&self, refs: &[u32]) -> R<bool> {
        let cs = self.cs;
        let per = self.rf.block_entries();
        let table = self.reftable.borrow().clone();
        let chunks: Vec<(usize, &[u32])> = refs
            .chunks(per as usize)
            .enumerate()
            .filter(|(_, chunk)| chunk.iter().any(|&r| r != 0))
            .collect();
        for batch in chunks.chunks(SCAN_WINDOW) {
            let reads = batch.iter().map(|&(ti, _)| {
                let off = table.get(ti).copied().unwrap_or(0);
                async move {
                    if off == 0 {
                        Ok(vec![0u8; cs as usize])
                    } else {
                        read_meta(&self.ch, self.capacity.get(), off, cs).await
                    }
                }
            });
            let read = futures::future::join_all(reads).await;
            for (&(ti, chunk), block) in batch.iter().zip(read) {
                let block = block?;
                for (i, &r) in chunk.iter().enumerate() {
                    if r == 0 {
                        continue;
                    }
                    let c = ti as u64 * per + i as u64;
                    if self.rf.get(&block, i as u64) < r as u64 && !self.is_metadata(c * cs, cs) {
                        tracing::warn!(image = %self.name, cluster = c, references = r, refcount = self.rf.get(&block, i as u64), "refcount below the cluster's references");
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }

    /// Rebuilds the refcounts of a damaged image from its tables and clears
    /// COPIED where a cluster is shared; the L2 tables changed are written and
    /// flushed before it returns. The metadata lock is free.
    /// `refs`: the references counted ([`Image::uncovered_references`]).
    pub(crate) async fn repair_refcounts(&self, refs: Vec<u32>) -> R<()> {
        self.rebuild_refcounts_with(refs.clone()).await?;
        let tables = self.l2_tables();
        let _m = self.meta.lock().await;
        let mut fixed = 0u64;
        for off in tables {
            self.load(true, off).await?;
            let shared: Vec<usize> = self
                .l2
                .with(off, |t| {
                    (0..self.l2_entries as usize)
                        .filter(|&i| {
                            let e = be64(t, i * 8);
                            match L2Entry(e).decode(self.version, self.cluster_bits) {
                                Ok(ClusterKind::Normal { host, copied: true }) => {
                                    refs.get((host / self.cs) as usize).is_some_and(|&r| r > 1)
                                }
                                _ => false,
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            if shared.is_empty() {
                continue;
            }
            fixed += shared.len() as u64;
            self.l2.with_mut(off, |t| {
                for &i in &shared {
                    let e = be64(t, i * 8);
                    put64(t, i * 8, e & !COPIED);
                }
            });
        }
        if fixed > 0 {
            tracing::warn!(image = %self.name, entries = fixed, "COPIED cleared from L2 entries of shared clusters");
        }
        self.sync_locked(true).await
    }
}
