//! Engine-level helpers for streaming: per-layer allocation status, "populate
//! if still unallocated", and changing the backing file in the header.

use super::format::{be64, ClusterKind, FormatError, L1Entry, L2Entry, EXT_FEATURE_TABLE};
use super::image::{Image, R};
use super::overlap::OverlapChecks;
use crate::{write_at, BdevError, DmaBuf};
use std::rc::Rc;

impl Image {
    /// Status of this layer alone at `offset`: `None` when not allocated here,
    /// `Some(zero)` when allocated (zero: reads as zeroes), and the number of bytes
    /// (at most `len`) over which that answer holds.
    ///
    /// Cost follows the metadata, not the range: an empty L1 entry answers
    /// for the whole range its L2 table would map (512 MiB at 64 KiB
    /// clusters) at once, and an L2 table is scanned in one pass over its
    /// entries, stopping at the first cluster whose status differs.
    pub(crate) async fn layer_status(&self, offset: u64, len: u64) -> R<(Option<bool>, u64)> {
        let class = |k: ClusterKind| match k {
            ClusterKind::Unallocated => None,
            ClusterKind::Zero { .. } => Some(true),
            _ => Some(false),
        };
        let cs = self.cs;
        let span = self.l2_entries * cs;
        let end = offset.saturating_add(len);
        let mut first: Option<Option<bool>> = None;
        let mut pos = offset;
        while pos < end {
            let table_end = (pos / span + 1).saturating_mul(span).min(end);
            let l1e = self
                .l1
                .borrow()
                .get((pos / span) as usize)
                .copied()
                .unwrap_or(0);
            let off = L1Entry(l1e).l2_offset();
            if off == 0 {
                match first {
                    None => first = Some(None),
                    Some(Some(_)) => break,
                    Some(None) => {}
                }
                pos = table_end;
                continue;
            }
            if !self.l2.contains(off) {
                // Loaded under the metadata lock; then the L1 entry is read
                // again (it may have changed while the lock was awaited).
                let _g = self.meta.lock().await;
                let l1e = self
                    .l1
                    .borrow()
                    .get((pos / span) as usize)
                    .copied()
                    .unwrap_or(0);
                let off = L1Entry(l1e).l2_offset();
                if off != 0 {
                    self.load(true, off).await?;
                }
                continue;
            }
            // No await from the check to here: the table is cached.
            let scanned = self.l2.with(off, |t| -> R<(u64, bool)> {
                let mut p = pos;
                while p < table_end {
                    let gc = p / cs;
                    let c = class(self.kind(be64(t, ((gc % self.l2_entries) * 8) as usize))?);
                    match first {
                        None => first = Some(c),
                        Some(f) if f != c => return Ok((p, true)),
                        Some(_) => {}
                    }
                    p = ((gc + 1) * cs).min(table_end);
                }
                Ok((p, false))
            });
            let Some(scanned) = scanned else {
                continue;
            };
            let (p, changed) = scanned?;
            pos = p;
            if changed {
                break;
            }
        }
        Ok((first.flatten(), pos.min(end) - offset))
    }

    /// Writes one whole guest cluster at `offset` only if nothing allocated it yet
    /// (serialised with guest writes through the cluster lock). Returns whether it wrote.
    pub(crate) async fn populate(self: &Rc<Self>, offset: u64, data: DmaBuf) -> R<bool> {
        if self.read_only.get() || self.broken.get() {
            return Err(BdevError::Io(crate::IoStatus::ReadOnly));
        }
        let cs = self.cs;
        let last = offset < self.size.get() && offset + data.len() as u64 >= self.size.get();
        if !offset.is_multiple_of(cs)
            || data.is_empty()
            || data.len() as u64 > cs
            || (data.len() as u64 != cs && !last)
        {
            return Err(BdevError::InvalidParam(format!(
                "populate: offset {offset} and length {} must cover one whole cluster of {cs} bytes",
                data.len()
            )));
        }
        let gc = offset / cs;
        let _lk = self.locks.lock(gc).await;
        let e = self.entry(gc).await?;
        if self.kind(e)? != ClusterKind::Unallocated {
            return Ok(false);
        }
        let host = {
            let _m = self.meta.lock().await;
            self.alloc_cluster().await?
        };
        let buf = if data.len() as u64 == cs {
            data
        } else {
            let mut b = DmaBuf::new(cs as usize)?;
            b.as_mut_slice()[..data.len()].copy_from_slice(data.as_slice());
            b
        };
        let res = match self.pre_write_check(OverlapChecks::NONE, host, cs).await {
            Ok(()) => write_at(&self.ch, host, buf).await,
            Err(e) => Err(e),
        };
        let _m = self.meta.lock().await;
        if let Err(e) = res {
            let _ = self.update_refcount(host / cs, -1).await;
            return Err(e);
        }
        self.set_entry(gc, L2Entry::normal(host).0).await?;
        Ok(true)
    }

    /// Rewrites the header with a new backing file name and format (or none);
    /// one write of the header cluster. Before it, every earlier write is made
    /// durable (`durable`), or, without it, all metadata is written in order
    /// but not flushed: safe against a killed process, not a power loss.
    pub(crate) async fn set_backing_file(
        &self,
        name: Option<&str>,
        format: Option<&str>,
        durable: bool,
    ) -> R<()> {
        if self.read_only.get() || self.broken.get() {
            return Err(BdevError::Io(crate::IoStatus::ReadOnly));
        }
        let _m = self.meta.lock().await;
        if durable || !self.frees.borrow().is_empty() {
            self.sync_locked(true).await?;
        } else {
            self.write_metadata_in_order().await?;
        }
        let mut h = self.hdr.borrow().clone();
        h.backing_file = name.map(str::to_string);
        h.backing_format = if name.is_some() {
            format.map(str::to_string)
        } else {
            None
        };
        if h.to_cluster().is_err() {
            // Make room by dropping the (informative) feature name table.
            h.extensions.retain(|e| e.kind != EXT_FEATURE_TABLE);
        }
        h.to_cluster()
            .map_err(|e: FormatError| BdevError::InvalidParam(e.to_string()))?;
        *self.hdr.borrow_mut() = h;
        if durable {
            self.write_header().await
        } else {
            self.write_header_unflushed().await
        }
    }

    /// Bytes up to the end of the last cluster in use (for trimming an image file).
    pub(crate) async fn used_end(&self) -> R<u64> {
        let _m = self.meta.lock().await;
        self.used_end_locked().await
    }

    /// [`Image::used_end`] with the metadata lock held (so that no cluster is
    /// allocated until the caller lets it go). Scans from the last refcount
    /// block down: usually one block is read, however large the image.
    pub(crate) async fn used_end_locked(&self) -> R<u64> {
        let per_block = self.rf.block_entries();
        let limit = self.capacity.get() / self.cs;
        let blocks = self.reftable.borrow().len();
        for ti in (0..blocks).rev() {
            let off = self.reftable.borrow().get(ti).copied().unwrap_or(0);
            let first = ti as u64 * per_block;
            if off == 0 || first >= limit {
                continue;
            }
            self.load(false, off).await?;
            let (rf, top) = (self.rf, (limit - first).min(per_block));
            let last = self
                .rb
                .with(off, |b| (0..top).rev().find(|&i| rf.get(b, i) != 0))
                .flatten();
            if let Some(i) = last {
                return Ok((first + i + 1) * self.cs);
            }
        }
        Ok(0)
    }
}
