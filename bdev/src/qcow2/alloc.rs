//! Refcounts, cluster allocation, refcount table growth and the ordered
//! write-out of metadata (refcounts before the L2 entries that need them, L2
//! entries cleared before the refcounts drop).

use super::format::{put64, FormatError, L1Entry, COPIED, INCOMPAT_DIRTY, MAX_REFTABLE_BYTES};
use super::image::{Image, R};
use super::overlap::OverlapChecks;
use crate::{BdevError, DmaBuf, IoStatus, IoType};
use futures::future::LocalBoxFuture;

impl Image {
    /// Refcount of host cluster `c`; the metadata lock is held.
    pub(crate) async fn refcount(&self, c: u64) -> R<u64> {
        let (ti, bi) = self.rf.split(c);
        let off = self
            .reftable
            .borrow()
            .get(ti as usize)
            .copied()
            .unwrap_or(0);
        if off == 0 {
            return Ok(0);
        }
        self.load(false, off).await?;
        Ok(self.rb.with(off, |b| self.rf.get(b, bi)).unwrap_or(0))
    }

    /// Adds `delta` to the refcount of host cluster `c`; the metadata lock is held.
    pub(crate) fn update_refcount(&self, c: u64, delta: i64) -> LocalBoxFuture<'_, R<u64>> {
        Box::pin(async move {
            let (ti, bi) = self.rf.split(c);
            let off = self.ensure_refblock(ti).await?;
            self.load(false, off).await?;
            let rf = self.rf;
            let res = self
                .rb
                .with_mut(off, |b| {
                    let cur = rf.get(b, bi);
                    let new = cur as i128 + delta as i128;
                    if new < 0 || new > rf.max() as i128 {
                        return Err(FormatError::Corrupt(format!(
                            "refcount of cluster {c} would go from {cur} to {new}"
                        )));
                    }
                    rf.set(b, bi, new as u64).map(|_| new as u64)
                })
                .ok_or_else(|| {
                    BdevError::Corrupt("refcount block vanished from the cache".into())
                })?;
            let new = res.map_err(BdevError::from)?;
            if new == 0 && c < self.free_hint.get() {
                self.free_hint.set(c);
            }
            Ok(new)
        })
    }

    /// The host offset of refcount block `ti`, allocating it (and growing the
    /// refcount table) when missing; the metadata lock is held.
    async fn ensure_refblock(&self, ti: u64) -> R<u64> {
        loop {
            let (len, off) = {
                let t = self.reftable.borrow();
                (t.len() as u64, t.get(ti as usize).copied().unwrap_or(0))
            };
            if ti >= len {
                self.grow_reftable(ti).await?;
                continue;
            }
            if off != 0 {
                return Ok(off);
            }
            let c = self.find_free(1).await?;
            let boff = c * self.cs;
            let ready = async {
                self.reserve_meta_cluster(boff).await?;
                self.make_room(false).await
            };
            if let Err(e) = ready.await {
                // Nothing took `c`: let the next search find it again (the hint
                // would otherwise march past free clusters on every failure).
                self.lower_free_hint(c);
                return Err(e);
            }
            if self.reftable.borrow()[ti as usize] != 0 {
                continue; // a nested allocation created it meanwhile
            }
            self.rb.insert(boff, vec![0u8; self.cs as usize], true);
            self.reftable.borrow_mut()[ti as usize] = boff;
            self.note_meta_cluster(false, boff);
            self.reftable_dirty.borrow_mut().insert(ti * 8 / self.align);
            self.reserved.borrow_mut().push(c);
            let r = self.update_refcount(c, 1).await;
            self.reserved.borrow_mut().retain(|&x| x != c);
            if let Err(e) = r {
                // The table now names a block whose own cluster is not counted:
                // a later allocation could hand it out as data. Refuse writes
                // rather than risk it (reopening rebuilds a consistent state).
                tracing::error!(image = %self.name, block = boff, error = %e, "refcount block allocation failed half-way; image now refuses writes");
                self.broken.set(true);
                return Err(e);
            }
            return Ok(boff);
        }
    }

    /// Finds `n` contiguous free host clusters; the metadata lock is held.
    pub(crate) async fn find_free(&self, n: u64) -> R<u64> {
        let start = self.free_hint.get();
        let mut c = start;
        'outer: loop {
            if (c + n) * self.cs > self.capacity.get() {
                return Err(BdevError::Io(IoStatus::Enospc));
            }
            for i in 0..n {
                let k = c + i;
                if self.reserved.borrow().contains(&k)
                    || self.is_metadata(k * self.cs, self.cs)
                    || self.refcount(k).await? != 0
                {
                    c = k + 1;
                    continue 'outer;
                }
            }
            if self.free_hint.get() >= start {
                self.free_hint.set(c + n);
            }
            return Ok(c);
        }
    }

    /// Allocates one host cluster (refcount 1); the metadata lock is held.
    pub(crate) async fn alloc_cluster(&self) -> R<u64> {
        Ok(self.alloc_cluster_fresh().await?.0)
    }

    /// Allocates one cluster; also says whether it is fresh (never written
    /// since the open, reads as zeroes). It is not fresh from now on.
    pub(crate) async fn alloc_cluster_fresh(&self) -> R<(u64, bool)> {
        let c = self.find_free(1).await?;
        let fresh = c * self.cs >= self.fresh_from.get();
        self.not_fresh(c * self.cs, self.cs);
        self.reserved.borrow_mut().push(c);
        let r = self.update_refcount(c, 1).await;
        self.reserved.borrow_mut().retain(|&x| x != c);
        if let Err(e) = r {
            self.lower_free_hint(c);
            return Err(e);
        }
        Ok((c * self.cs, fresh))
    }

    /// Lets the free-cluster search start at `c` again (a cluster it found was
    /// not taken after all).
    fn lower_free_hint(&self, c: u64) {
        if c < self.free_hint.get() {
            self.free_hint.set(c);
        }
    }

    /// Gives a new metadata cluster (an L2 table, a refcount block) its storage
    /// now by writing it (zeroes), as QEMU writes a new L2 table at once; its
    /// contents go out from the cache later. Image files are extended
    /// sparsely, so without this the space is only taken at write-back, and a
    /// disk that filled up meanwhile (with guest data) fails that write-back:
    /// every write acknowledged since the last flush would be lost and the
    /// image refuse writes. This way the request that needs the new table fails
    /// with ENOSPC instead, before anything is acknowledged. The metadata lock
    /// is held.
    async fn reserve_meta_cluster(&self, off: u64) -> R<()> {
        self.pre_write_check(OverlapChecks::NONE, off, self.cs)
            .await?;
        self.not_fresh(off, self.cs);
        crate::write_at(&self.ch, off, DmaBuf::new(self.cs as usize)?).await?;
        Ok(())
    }

    /// Writes `table` as the refcount table at cluster `p` (`t` clusters), makes
    /// it (and the refcount blocks written before) durable, then points the
    /// header at it; with `clear_dirty` the header also drops the dirty bit.
    pub(super) async fn install_reftable(
        &self,
        p: u64,
        t: u64,
        table: Vec<u64>,
        clear_dirty: bool,
    ) -> R<()> {
        let cs = self.cs;
        let mut tb = vec![0u8; (t * cs) as usize];
        for (i, &v) in table.iter().enumerate() {
            put64(&mut tb, i * 8, v);
        }
        self.write_meta(
            OverlapChecks::REFCOUNT_TABLE,
            p * cs,
            DmaBuf::from_slice(&tb)?,
        )
        .await?;
        self.flush_base().await?;
        {
            let mut h = self.hdr.borrow_mut();
            h.refcount_table_offset = p * cs;
            h.refcount_table_clusters = t as u32;
            if clear_dirty {
                h.incompatible &= !INCOMPAT_DIRTY;
            }
        }
        self.write_header().await?;
        *self.reftable.borrow_mut() = table;
        self.reftable_dirty.borrow_mut().clear();
        self.refresh_meta_map();
        Ok(())
    }

    /// Replaces the refcount table with a larger one covering index `need`.
    async fn grow_reftable(&self, need: u64) -> R<()> {
        self.write_refblocks().await?;
        let cs = self.cs;
        let e = self.rf.block_entries();
        let (old_off, old_clusters) = {
            let h = self.hdr.borrow();
            (h.refcount_table_offset, h.refcount_table_clusters as u64)
        };
        let old_len = self.reftable.borrow().len() as u64;
        let p = self.free_hint.get().max(old_len * e);
        let mut t = ((need + 1) * 8 * 3 / 2).div_ceil(cs).max(old_clusters + 1);
        let mut b = 1u64;
        let first_ti = p / e;
        loop {
            let last_ti = (p + t + b - 1) / e;
            let nb = last_ti - first_ti + 1;
            let nt = t.max(((last_ti + 1) * 8).div_ceil(cs));
            if nb == b && nt == t {
                break;
            }
            b = nb;
            t = nt;
        }
        if t * cs > MAX_REFTABLE_BYTES || (p + t + b) * cs > self.capacity.get() {
            return Err(BdevError::Io(IoStatus::Enospc));
        }
        tracing::debug!(image = %self.name, from = old_clusters, to = t, "growing the refcount table");
        let mut table = self.reftable.borrow().clone();
        table.resize((t * cs / 8) as usize, 0);
        for j in 0..b {
            table[(first_ti + j) as usize] = (p + t + j) * cs;
        }
        for j in 0..b {
            let mut blk = vec![0u8; cs as usize];
            for k in p..p + t + b {
                if k / e == first_ti + j {
                    self.rf.set(&mut blk, k % e, 1).map_err(BdevError::from)?;
                }
            }
            self.write_meta(
                OverlapChecks::REFCOUNT_BLOCK,
                (p + t + j) * cs,
                DmaBuf::from_slice(&blk)?,
            )
            .await?;
        }
        self.install_reftable(p, t, table, false).await?;
        self.frees.borrow_mut().push((old_off, old_clusters * cs));
        if self.free_hint.get() == p {
            self.free_hint.set(p + t + b);
        }
        Ok(())
    }

    /// Points guest cluster `gc` at `val` (a raw L2 entry), allocating its L2
    /// table if needed; the metadata lock is held.
    pub(crate) async fn set_entry(&self, gc: u64, val: u64) -> R<()> {
        let l1i = gc / self.l2_entries;
        if l1i >= self.hdr.borrow().l1_size as u64 {
            return Err(BdevError::Io(IoStatus::Einval));
        }
        let mut l2off = L1Entry(self.l1.borrow()[l1i as usize]).l2_offset();
        if l2off == 0 {
            if val == 0 {
                return Ok(());
            }
            l2off = self.alloc_cluster().await?;
            let ready = async {
                self.reserve_meta_cluster(l2off).await?;
                self.make_room(true).await
            };
            if let Err(e) = ready.await {
                // Nothing points at the new table yet: give its cluster back.
                let _ = self.update_refcount(l2off / self.cs, -1).await;
                return Err(e);
            }
            self.l2.insert(l2off, vec![0u8; self.cs as usize], true);
            self.l1.borrow_mut()[l1i as usize] = l2off | COPIED;
            self.note_meta_cluster(true, l2off);
            self.l1_dirty.borrow_mut().insert(l1i * 8 / self.align);
        } else {
            self.load(true, l2off).await?;
        }
        let idx = ((gc % self.l2_entries) * 8) as usize;
        self.l2
            .with_mut(l2off, |t| put64(t, idx, val))
            .ok_or_else(|| BdevError::Corrupt("L2 table vanished from the cache".into()))
    }

    /// Writes every dirty refcount block (no flush). Returns whether it wrote.
    pub(crate) async fn write_refblocks(&self) -> R<bool> {
        self.write_cache(false).await
    }

    async fn write_cache(&self, l2: bool) -> R<bool> {
        let dirty = self.cache(l2).dirty();
        if dirty.is_empty() {
            return Ok(false);
        }
        let kind = if l2 {
            OverlapChecks::ACTIVE_L2
        } else {
            OverlapChecks::REFCOUNT_BLOCK
        };
        let mut futs = Vec::with_capacity(dirty.len());
        for (off, data) in &dirty {
            let buf = DmaBuf::from_slice(data)?;
            futs.push(self.write_meta(kind, *off, buf));
        }
        for r in futures::future::join_all(futs).await {
            r?;
        }
        for (off, data) in &dirty {
            self.cache(l2).mark_clean(*off, data);
        }
        Ok(true)
    }

    /// Writes the dirty chunks of the L1 table (`l1`) or the refcount table.
    async fn write_table_chunks(&self, l1: bool) -> R<bool> {
        let chunks: Vec<u64> = {
            let set = if l1 {
                &self.l1_dirty
            } else {
                &self.reftable_dirty
            };
            std::mem::take(&mut *set.borrow_mut()).into_iter().collect()
        };
        if chunks.is_empty() {
            return Ok(false);
        }
        let base = if l1 {
            self.hdr.borrow().l1_table_offset
        } else {
            self.hdr.borrow().refcount_table_offset
        };
        let kind = if l1 {
            OverlapChecks::ACTIVE_L1
        } else {
            OverlapChecks::REFCOUNT_TABLE
        };
        let per = (self.align / 8) as usize;
        for (n, &k) in chunks.iter().enumerate() {
            let mut b = vec![0u8; self.align as usize];
            {
                let t = if l1 {
                    self.l1.borrow()
                } else {
                    self.reftable.borrow()
                };
                for i in 0..per {
                    let v = t.get(k as usize * per + i).copied().unwrap_or(0);
                    put64(&mut b, i * 8, v);
                }
            }
            let r = match DmaBuf::from_slice(&b) {
                Ok(buf) => self.write_meta(kind, base + k * self.align, buf).await,
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                // The chunks not written stay dirty: a later sync writes them
                // (dropped, a later flush would succeed without them).
                let set = if l1 {
                    &self.l1_dirty
                } else {
                    &self.reftable_dirty
                };
                set.borrow_mut().extend(chunks[n..].iter().copied());
                return Err(e);
            }
        }
        Ok(true)
    }

    /// Writes all dirty metadata in crash-safe order, then applies deferred
    /// refcount decrements. With `flush`, always ends with a base flush (a guest
    /// flush); the metadata lock is held.
    pub(crate) fn sync_locked(&self, flush: bool) -> LocalBoxFuture<'_, R<()>> {
        Box::pin(async move {
            if self.read_only.get() {
                return if flush {
                    self.flush_base().await
                } else {
                    Ok(())
                };
            }
            let l2_pending = self.l2.any_dirty() || !self.l1_dirty.borrow().is_empty();
            let rc = self.write_refcounts().await?;
            // The L2 entries about to be written may point at new clusters
            // whose data (a copy-on-write fill, a populate) completed after
            // the last base flush was issued: a flush first, even when no
            // refcount was written now (an earlier sync wrote them), or a
            // power loss can keep the entry and lose the data it points at.
            if l2_pending {
                self.flush_base().await?;
            }
            let l2w = self.write_cache(true).await?;
            let l1_pending = !self.l1_dirty.borrow().is_empty();
            if l2w && l1_pending {
                self.flush_base().await?;
            }
            let l1w = self.write_table_chunks(true).await?;
            let mut need_flush = rc || l2w || l1w;
            if !self.frees.borrow().is_empty() {
                // The L2 entries that dropped these clusters must be durable first.
                self.flush_base().await?;
                self.drain.drain().await;
                let list = std::mem::take(&mut *self.frees.borrow_mut());
                *self.zcache.borrow_mut() = None;
                let mut released = Vec::new();
                for (off, len) in list {
                    let first = off / self.cs;
                    let last = (off + len.max(1) - 1) / self.cs;
                    for c in first..=last {
                        match self.update_refcount(c, -1).await {
                            Ok(0) => released.push(c),
                            Ok(_) => {}
                            // Leaking is safe; failing the flush over it is not useful.
                            Err(e) => {
                                tracing::warn!(image = %self.name, cluster = c, error = %e, "cannot release cluster; leaking it")
                            }
                        }
                    }
                }
                self.discard_released(released).await;
                need_flush = self.write_refcounts().await?;
            }
            if need_flush || flush {
                self.flush_base().await?;
            }
            Ok(())
        })
    }

    /// Writes the dirty refcount blocks, then the dirty chunks of the refcount
    /// table, with a base flush between when both were dirty: a table entry
    /// may name a new block, which must be durable before the entry (else a
    /// power loss leaves the table naming a block of zeroes, and the clusters
    /// it covers, itself among them, counted free). Returns whether it wrote.
    async fn write_refcounts(&self) -> R<bool> {
        let blocks = self.write_refblocks().await?;
        if blocks && !self.reftable_dirty.borrow().is_empty() {
            self.flush_base().await?;
        }
        Ok(self.write_table_chunks(false).await? | blocks)
    }

    /// Writes all dirty metadata, refcount blocks before L2 tables before the L1
    /// table, each level complete before the next starts, without flushing: the
    /// file as the kernel holds it is a consistent image at every moment, so a
    /// killed process leaves one (a power loss may not). The metadata lock is held.
    pub(crate) async fn write_metadata_in_order(&self) -> R<()> {
        self.write_refblocks().await?;
        self.write_table_chunks(false).await?;
        self.write_cache(true).await?;
        self.write_table_chunks(true).await?;
        Ok(())
    }

    /// Gives the space of host clusters nothing references any more back to the
    /// base (an unmap: a punched hole in a file), in runs of consecutive
    /// clusters. Their L2 entries are durable and reads of them drained, so
    /// nothing reads them; a crash before their refcount reaches the disk
    /// leaves a leak that reads as zeroes. A base without unmap keeps them.
    async fn discard_released(&self, mut clusters: Vec<u64>) {
        if clusters.is_empty() || !self.discard_on_base.get() {
            return;
        }
        clusters.sort_unstable();
        clusters.dedup();
        let mut i = 0;
        while i < clusters.len() {
            let mut j = i + 1;
            while j < clusters.len() && clusters[j] == clusters[j - 1] + 1 {
                j += 1;
            }
            let (off, len) = (clusters[i] * self.cs, (j - i) as u64 * self.cs);
            let len = len.min(self.capacity.get().saturating_sub(off));
            if len > 0 {
                let st = crate::simple_io(&self.ch, IoType::Unmap, off, len).await;
                if !st.is_ok() {
                    tracing::debug!(image = %self.name, offset = off, len, status = ?st, "base refused to unmap freed clusters; keeping their space");
                    self.discard_on_base.set(false);
                    return;
                }
            }
            i = j;
        }
    }

    /// A guest flush: everything written before it becomes durable.
    ///
    /// Flushes that wait together share one (group commit, as QEMU's
    /// `bdrv_co_flush` does): a flush that *started* after this call began
    /// covers every request completed before it, so a caller that finds such
    /// a flush completed successfully by the time it holds the metadata lock
    /// returns at once. N concurrent FUA writes cost two flushes, not N.
    pub(crate) async fn flush(&self) -> R<()> {
        let need = self.flushes_started.get() + 1;
        let _g = self.meta.lock().await;
        if self.flushes_ok.get() >= need {
            return Ok(());
        }
        let seq = self.flushes_started.get() + 1;
        self.flushes_started.set(seq);
        self.sync_locked(true).await?;
        if seq > self.flushes_ok.get() {
            self.flushes_ok.set(seq);
        }
        Ok(())
    }
}
