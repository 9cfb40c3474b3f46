//! Growing an open image (QEMU's `qcow2_co_truncate` for a larger size,
//! `block_resize`): a new virtual size in the header, and, when the L1 table
//! no longer covers it, a new L1 table of exactly the entries needed
//! (`qcow2_grow_l1_table(exact_size)`): written to new clusters and flushed,
//! then the header pointed at it, then the old table's clusters released.
//! The base is extended as the open extended it (room for the new data and
//! its metadata) when it can be. Shrinking is refused (see
//! [`Image::resize`]).

use super::format::put64;
use super::image::{Image, R};
use super::overlap::OverlapChecks;
use crate::{BdevError, DmaBuf};
use std::sync::Arc;

impl Image {
    /// Changes the virtual size to `size` (a multiple of 512) on the owner
    /// reactor; `base` is the image's base bdev, extended for the growth
    /// when it can be. A smaller size is refused: sluice does not shrink
    /// images (QEMU discards the clusters past the end and shrinks the
    /// tables).
    pub(crate) async fn resize(&self, base: &Arc<dyn crate::Bdev>, size: u64) -> R<()> {
        if self.read_only {
            return Err(BdevError::Io(crate::IoStatus::ReadOnly));
        }
        if !size.is_multiple_of(512) {
            return Err(BdevError::InvalidParam(
                "The new size must be a multiple of 512".into(),
            ));
        }
        let _m = self.meta.lock().await;
        let old = self.size.get();
        if size < old {
            return Err(BdevError::Unsupported(format!(
                "qcow2 image '{}' cannot shrink in sluice (from {old} to {size} bytes)",
                self.name
            )));
        }
        if size == old {
            return Ok(());
        }
        self.reserve_room(base, size - old).await;
        let need = super::format::Header::l1_entries_for(size, self.cluster_bits);
        if need > self.hdr.borrow().l1_size as u64 {
            self.grow_l1(need).await?;
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

    /// Extends the base by the room a growth of `delta` bytes may take (its
    /// data and metadata), as the open extended the file; a base that
    /// cannot grow keeps its size (allocations past it fail with ENOSPC).
    async fn reserve_room(&self, base: &Arc<dyn crate::Bdev>, delta: u64) {
        let want = self.capacity.get() + delta + delta / 32;
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
