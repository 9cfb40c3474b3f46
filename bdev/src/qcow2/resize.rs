//! Resizing an open image (QEMU's `qcow2_co_truncate`, `block_resize`).
//!
//! - Growing: when the L1 table no longer covers the new size, a new L1
//!   table of exactly the entries needed (`qcow2_grow_l1_table(exact_size)`)
//!   is written to new clusters and flushed, then the header pointed at it,
//!   then the old table's clusters released; then the header's size. The
//!   base is extended as the open extended it (room for the new data and
//!   its metadata) when it can be. (The caller zeroes the new area where a
//!   longer backing file would show through, as QEMU's `bdrv_co_truncate`
//!   does.)
//! - Shrinking, as QEMU does it: every cluster from the new end rounded up
//!   to a cluster is discarded for good (its L2 entry cleared, its host
//!   cluster released), the L2 tables past the new L1 size are released and
//!   their L1 entries zeroed (`qcow2_shrink_l1_table`; the header's
//!   `l1_size` stays), all of it made durable before the clusters are
//!   unreferenced; then the header's size. The file is trimmed when the
//!   image is closed.

use super::format::{be64, put64, L1Entry};
use super::image::{Image, R};
use super::overlap::OverlapChecks;
use crate::{BdevError, DmaBuf};
use std::sync::Arc;

impl Image {
    /// Changes the virtual size to `size` (a multiple of 512) on the owner
    /// reactor; `base` is the image's base bdev, extended for a growth when
    /// it can be.
    pub(crate) async fn resize(&self, base: &Arc<dyn crate::Bdev>, size: u64) -> R<()> {
        if self.read_only.get() {
            return Err(BdevError::Io(crate::IoStatus::ReadOnly));
        }
        if !size.is_multiple_of(512) {
            return Err(BdevError::InvalidParam(
                "The new size must be a multiple of 512".into(),
            ));
        }
        let _m = self.meta.lock().await;
        let old = self.size.get();
        if size == old {
            return Ok(());
        }
        if size < old {
            // Requests past the new end are refused from here on.
            self.size.set(size);
            if let Err(e) = self.shrink(size, old).await {
                self.size.set(old);
                return Err(e);
            }
        } else {
            let need = super::format::Header::l1_entries_for(size, self.cluster_bits);
            if need.saturating_mul(8) > super::format::MAX_L1_BYTES {
                // QEMU's QCOW_MAX_L1_SIZE, in its words.
                return Err(BdevError::InvalidParam(
                    "Failed to grow the L1 table: File too large".into(),
                ));
            }
            self.reserve_room(base, size - old).await;
            if need > self.hdr.borrow().l1_size as u64 {
                self.grow_l1(need).await?;
            }
        }
        self.hdr.borrow_mut().size = size;
        if let Err(e) = self.write_header().await {
            self.hdr.borrow_mut().size = old;
            return Err(e);
        }
        self.size.set(size);
        tracing::info!(image = %self.name, from = old, to = size, "image resized");
        Ok(())
    }

    /// Discards every cluster from `size` (rounded up to a cluster) to
    /// `old` and releases the L2 tables past the L1 entries `size` needs;
    /// durable before the clusters are unreferenced. The metadata lock is
    /// held.
    async fn shrink(&self, size: u64, old: u64) -> R<()> {
        let l2e = self.l2_entries;
        let keep_l1 = super::format::Header::l1_entries_for(size, self.cluster_bits);
        let l1_size = self.hdr.borrow().l1_size as u64;
        let (first, last) = (size.div_ceil(self.cs), old.div_ceil(self.cs));
        let mut gc = first;
        while gc < last && gc / l2e < keep_l1 {
            let l1i = gc / l2e;
            let end = ((l1i + 1) * l2e).min(last);
            if L1Entry(self.l1.borrow()[l1i as usize]).l2_offset() != 0 {
                for g in gc..end {
                    let e = self.entry_locked(g).await?;
                    if e != 0 {
                        let kind = self.kind(e)?;
                        self.set_entry(g, 0).await?;
                        self.queue_free(kind);
                    }
                }
            }
            gc = end;
        }
        for i in keep_l1..l1_size {
            let off = L1Entry(self.l1.borrow()[i as usize]).l2_offset();
            if off == 0 {
                continue;
            }
            self.load(true, off).await?;
            let entries: Vec<u64> = self
                .l2
                .with(off, |t| {
                    (0..l2e).map(|k| be64(t, (k * 8) as usize)).collect()
                })
                .unwrap_or_default();
            for e in entries.into_iter().filter(|&e| e != 0) {
                self.queue_free(self.kind(e)?);
            }
            // Nothing points at the table once the L1 entry is zero: its
            // cached copy must never be written back.
            self.l2.remove(off);
            self.frees.borrow_mut().push((off, self.cs));
            self.l1.borrow_mut()[i as usize] = 0;
            self.l1_dirty.borrow_mut().insert(i * 8 / self.align);
        }
        self.refresh_meta_map();
        // L2 tables, then the L1 entries, flushed; then the clusters released.
        self.sync_locked(true).await
    }

    /// Extends the base by the room a growth of `delta` bytes may take (its
    /// data and metadata), as the open extended the file; a base that
    /// cannot grow keeps its size (allocations past it fail with ENOSPC).
    pub(crate) async fn reserve_room(&self, base: &Arc<dyn crate::Bdev>, delta: u64) {
        let want = self
            .capacity
            .get()
            .saturating_add(delta)
            .saturating_add(delta / 32);
        let Some(f) = base.resize(want) else {
            return;
        };
        match f.await {
            Ok(()) => {
                crate::refresh_channel_sizes();
                self.capacity.set(base.size());
            }
            Err(e) => {
                tracing::warn!(image = %self.name, error = %e, "base not extended for the growth")
            }
        }
    }

    /// Replaces the L1 table with one of `need` entries (the metadata lock
    /// is held): dirty entries go out first, the new table is written to new
    /// clusters and flushed, the header switched to it, the old clusters
    /// released at the next sync.
    async fn grow_l1(&self, need: u64) -> R<()> {
        self.sync_locked(true).await?;
        let cs = self.cs;
        let n = (need * 8).div_ceil(cs);
        let first = self.find_free(n).await?;
        self.reserved.borrow_mut().extend(first..first + n);
        let mut taken = 0;
        let mut r = Ok(());
        for c in first..first + n {
            r = self.update_refcount(c, 1).await.map(|_| ());
            if r.is_err() {
                break;
            }
            taken += 1;
        }
        self.reserved
            .borrow_mut()
            .retain(|&c| c < first || c >= first + n);
        let release = |taken| async move {
            for c in first..first + taken {
                let _ = self.update_refcount(c, -1).await;
            }
        };
        if let Err(e) = r {
            release(taken).await;
            return Err(e);
        }
        let mut table = self.l1.borrow().clone();
        table.resize((n * cs / 8) as usize, 0);
        let mut buf = vec![0u8; (n * cs) as usize];
        for (i, &e) in table.iter().enumerate() {
            put64(&mut buf, i * 8, e);
        }
        let written = async {
            self.write_refblocks().await?;
            self.write_meta(
                OverlapChecks::ACTIVE_L1,
                first * cs,
                DmaBuf::from_slice(&buf)?,
            )
            .await?;
            self.flush_base().await
        };
        if let Err(e) = written.await {
            release(taken).await;
            return Err(e);
        }
        let (old_off, old_len) = {
            let mut h = self.hdr.borrow_mut();
            let old = (
                h.l1_table_offset,
                (h.l1_size as u64 * 8).next_multiple_of(cs),
            );
            h.l1_table_offset = first * cs;
            h.l1_size = need as u32;
            old
        };
        self.write_header().await?;
        *self.l1.borrow_mut() = table;
        self.l1_dirty.borrow_mut().clear();
        if old_len > 0 {
            self.frees.borrow_mut().push((old_off, old_len));
        }
        self.refresh_meta_map();
        self.sync_locked(true).await
    }
}
