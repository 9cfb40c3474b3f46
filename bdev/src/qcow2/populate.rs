//! Multi-cluster "populate if still unallocated" for block jobs: one buffer
//! covering several clusters goes down in as few writes as the host layout
//! allows (one per run of consecutive new host clusters) and is handed back;
//! zero populate points unallocated clusters at v3 zero clusters.
//!
//! Both take the cluster locks of the whole range (ascending, so two populates
//! cannot deadlock; guest writes take one lock at a time), so a guest write to
//! any of those clusters either happened before (the cluster is skipped) or
//! waits until the populate is done (and then overwrites it): a guest write
//! always wins. New clusters get their refcounts (in the cache) before their L2
//! entries, and the metadata write-out keeps that order on disk.

use super::format::{ClusterKind, L2Entry};
use super::image::{Image, R};
use super::overlap::OverlapChecks;
use super::sync::ClusterGuard;
use crate::{submit_wait, BdevError, BdevIo, DmaBuf, IoStatus, IoType};
use std::rc::Rc;

impl Image {
    /// Validates a populate range: cluster-aligned start, whole clusters except
    /// for the image's last one. Returns the number of clusters.
    fn populate_range(&self, offset: u64, len: u64) -> R<u64> {
        let cs = self.cs;
        let end = offset.saturating_add(len);
        if !offset.is_multiple_of(cs)
            || len == 0
            || end > self.size.get().next_multiple_of(cs)
            || (!len.is_multiple_of(cs) && end < self.size.get())
        {
            return Err(BdevError::InvalidParam(format!(
                "populate: {offset}+{len} must be whole clusters of {cs} bytes inside the image"
            )));
        }
        Ok(len.div_ceil(cs))
    }

    /// Takes the cluster locks of `n` clusters from `gc0`, in ascending order.
    async fn lock_run(self: &Rc<Self>, gc0: u64, n: u64) -> Vec<ClusterGuard> {
        let mut guards = Vec::with_capacity(n as usize);
        for gc in gc0..gc0 + n {
            guards.push(self.locks.lock(gc).await);
        }
        guards
    }

    /// Writes the clusters of `data` (starting at guest `offset`, cluster-aligned,
    /// whole clusters except at the image's end) that are still unallocated in
    /// this image; allocated ones are left alone. Returns the buffer and how many
    /// clusters were written.
    pub(crate) async fn populate_many(
        self: &Rc<Self>,
        offset: u64,
        data: DmaBuf,
        write_behind: bool,
    ) -> R<(DmaBuf, u64)> {
        if self.read_only.get() || self.broken.get() {
            return Err(BdevError::Io(IoStatus::ReadOnly));
        }
        let cs = self.cs;
        let len = data.len() as u64;
        let n = self.populate_range(offset, len)?;
        let gc0 = offset / cs;
        let _locks = self.lock_run(gc0, n).await;
        // Which clusters to write (index in the run).
        let mut todo = Vec::with_capacity(n as usize);
        for i in 0..n {
            if self.kind(self.entry(gc0 + i).await?)? == ClusterKind::Unallocated {
                todo.push(i);
            }
        }
        if todo.is_empty() {
            return Ok((data, 0));
        }
        let hosts = {
            let _m = self.meta.lock().await;
            let mut hosts = Vec::with_capacity(todo.len());
            for _ in &todo {
                match self.alloc_cluster().await {
                    Ok(h) => hosts.push(h),
                    Err(e) => {
                        for h in hosts {
                            let _ = self.update_refcount(h / cs, -1).await;
                        }
                        return Err(e);
                    }
                }
            }
            hosts
        };
        // One write per run of clusters consecutive both in the guest and on the host.
        let parent = BdevIo::new(IoType::Write, 0, len, Some(data), None);
        let mut writes = Vec::new();
        let mut k = 0;
        while k < todo.len() {
            let mut j = k + 1;
            while j < todo.len() && todo[j] == todo[j - 1] + 1 && hosts[j] == hosts[j - 1] + cs {
                j += 1;
            }
            let start = todo[k] * cs;
            let end = ((todo[j - 1] + 1) * cs).min(len);
            writes.push(self.write_piece(&parent, start, end - start, hosts[k], write_behind));
            k = j;
        }
        let results = futures::future::join_all(writes).await;
        let mut parent = parent;
        let data = parent
            .take_buf()
            .ok_or_else(|| BdevError::InvalidParam("populate: buffer lost".into()))?;
        let _m = self.meta.lock().await;
        if let Some(e) = results.into_iter().find_map(Result::err) {
            for h in &hosts {
                let _ = self.update_refcount(h / cs, -1).await;
            }
            return Err(e);
        }
        for (k, (i, h)) in todo.iter().zip(&hosts).enumerate() {
            if let Err(e) = self.set_entry(gc0 + i, L2Entry::normal(*h).0).await {
                // The clusters entered so far are populated; the others
                // (no L2 entry points at them) are given back, not leaked.
                for h in &hosts[k..] {
                    let _ = self.update_refcount(h / cs, -1).await;
                }
                return Err(e);
            }
        }
        Ok((data, todo.len() as u64))
    }

    /// Writes `[start, start+n)` of the parent's buffer at host offset `host`.
    /// A piece ending in the image's last, partial cluster is padded to the
    /// cluster's end (with zeroes) so the whole host cluster is initialised.
    async fn write_piece(
        &self,
        parent: &BdevIo,
        start: u64,
        n: u64,
        host: u64,
        write_behind: bool,
    ) -> R<()> {
        let cs = self.cs;
        self.pre_write_check(OverlapChecks::NONE, host, n.next_multiple_of(cs))
            .await?;
        let whole = n / cs * cs;
        if whole > 0 {
            // SAFETY: `parent` owns its buffer and outlives this sub-request: the
            // caller awaits every piece before taking the buffer back.
            let mut sub =
                unsafe { BdevIo::sub_io(parent, start, whole, IoType::Write, host, None) };
            sub.write_behind = write_behind;
            let st = submit_wait(&self.ch, sub).await.status;
            if !st.is_ok() {
                return Err(BdevError::Io(st));
            }
        }
        let rest = n - whole;
        if rest > 0 {
            let mut b = DmaBuf::new(cs as usize)?;
            parent.copy_out(
                (start + whole) as usize,
                &mut b.as_mut_slice()[..rest as usize],
            );
            crate::write_at(&self.ch, host + whole, b).await?;
        }
        Ok(())
    }

    /// Points the clusters of `[offset, offset+len)` (cluster-aligned, whole
    /// clusters except at the image's end) that are still unallocated in this
    /// image at v3 zero clusters (no data written). Returns how many it changed.
    /// v2 images have no zero clusters: refused with `Unsupported`.
    pub(crate) async fn populate_zero(self: &Rc<Self>, offset: u64, len: u64) -> R<u64> {
        if self.read_only.get() || self.broken.get() {
            return Err(BdevError::Io(IoStatus::ReadOnly));
        }
        if self.version < 3 {
            return Err(BdevError::Unsupported(
                "zero clusters need a qcow2 v3 image".into(),
            ));
        }
        let n = self.populate_range(offset, len)?;
        let gc0 = offset / self.cs;
        let _locks = self.lock_run(gc0, n).await;
        let _m = self.meta.lock().await;
        let mut changed = 0;
        for gc in gc0..gc0 + n {
            let e = self.entry_locked(gc).await?;
            if self.kind(e)? == ClusterKind::Unallocated {
                self.set_entry(gc, L2Entry::zero().0).await?;
                changed += 1;
            }
        }
        Ok(changed)
    }
}
