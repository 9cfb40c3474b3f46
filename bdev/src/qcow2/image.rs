//! The open image's state on its owner reactor: header, L1 and refcount tables,
//! metadata caches, locks; loading and lookups.

use super::cache::TableCache;
use super::format::{
    be64, FormatError, Header, L1Entry, RefcountFormat, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
};
use super::overlap::{MetaMap, OverlapChecks};
use super::sync::{ClusterLocks, Drain};
use crate::{channel, read_at, write_at, Bdev, BdevError, DmaBuf, IoChannel, IoType};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::Arc;

/// Result of engine operations.
pub(crate) type R<T> = Result<T, BdevError>;

/// How an image is opened (engine level).
pub(crate) struct LoadOptions {
    pub(crate) read_only: bool,
    pub(crate) cache: super::CacheOptions,
    /// Metadata overlap checks before writes.
    pub(crate) overlap_checks: OverlapChecks,
    /// The image's own length when the base was extended past it before the
    /// open (a file grown for a writable open): the header and tables are
    /// checked against it, as a read-only open would.
    pub(crate) valid_len: Option<u64>,
}

/// One open qcow2 image. Lives on (and is only touched by) its owner reactor.
pub(crate) struct Image {
    pub(crate) name: String,
    pub(crate) ch: Rc<IoChannel>,
    pub(crate) hdr: RefCell<Header>,
    pub(crate) cs: u64,
    pub(crate) cluster_bits: u32,
    pub(crate) l2_entries: u64,
    pub(crate) rf: RefcountFormat,
    pub(crate) version: u32,
    pub(crate) size: Cell<u64>,
    pub(crate) read_only: std::cell::Cell<bool>,
    /// Base block size: the unit of every metadata write.
    pub(crate) align: u64,
    /// Base size: allocation beyond it fails with ENOSPC.
    pub(crate) capacity: Cell<u64>,
    pub(crate) l1: RefCell<Vec<u64>>,
    pub(crate) l1_dirty: RefCell<BTreeSet<u64>>,
    pub(crate) reftable: RefCell<Vec<u64>>,
    pub(crate) reftable_dirty: RefCell<BTreeSet<u64>>,
    pub(crate) l2: TableCache,
    pub(crate) rb: TableCache,
    /// What the two caches hold (read from any thread).
    pub(crate) usage: Arc<super::cache::CacheUsage>,
    pub(crate) meta: futures::lock::Mutex<()>,
    pub(crate) locks: Rc<ClusterLocks>,
    pub(crate) drain: Rc<Drain>,
    /// Host byte ranges to unreference once the L2 tables that dropped them are durable.
    pub(crate) frees: RefCell<Vec<(u64, u64)>>,
    pub(crate) free_hint: Cell<u64>,
    /// Clusters chosen by an allocation whose refcount is not set yet.
    pub(crate) reserved: RefCell<Vec<u64>>,
    pub(crate) backing: RefCell<Option<Arc<dyn Bdev>>>,
    /// Last decompressed cluster: its raw L2 entry and data.
    pub(crate) zcache: RefCell<Option<(u64, Rc<Vec<u8>>)>>,
    /// Set after a metadata write failed: writes are refused from then on.
    pub(crate) broken: Cell<bool>,
    /// Whether new clusters whose old contents read as zeroes are filled with
    /// base write-zeroes (cleared when the base turns out not to support them).
    pub(crate) zeroes_on_base: Cell<bool>,
    /// Host offsets from here on were never written since the image was opened
    /// and read as zeroes (the sparse growth of an image file); `u64::MAX`: unknown.
    pub(crate) fresh_from: Cell<u64>,
    /// Whether freed clusters are unmapped on the base (cleared when it refuses).
    pub(crate) discard_on_base: Cell<bool>,
    /// Metadata writes ([`Image::write_meta`]) started, completed, and
    /// completed before a base flush that then succeeded: with nothing dirty
    /// in memory, all three equal means every mapping is durable
    /// ([`Image::metadata_durable`]).
    pub(crate) meta_started: Cell<u64>,
    pub(crate) meta_done: Cell<u64>,
    pub(crate) meta_flushed: Cell<u64>,
    /// Guest flushes started, and the last of them that completed
    /// successfully ([`Image::flush`] shares one among waiters).
    pub(crate) flushes_started: Cell<u64>,
    /// The base's FUA is cheap ([`crate::Bdev::fua_is_cheap`]): a FUA write
    /// to a mapped cluster goes down with the flag; else it is written plain
    /// and the image's flush (shared among waiters) makes it durable.
    pub(crate) native_fua: bool,
    pub(crate) flushes_ok: Cell<u64>,
    /// Which metadata writes are checked against (`overlap.rs`).
    pub(crate) overlap_checks: OverlapChecks,
    /// Where the L2 tables and refcount blocks are.
    pub(crate) meta_map: RefCell<MetaMap>,
    /// Set once the image was found corrupt (and marked so).
    pub(crate) corrupt: Cell<bool>,
}

impl Image {
    /// Reads and checks the header and tables of the image on `base`.
    pub(crate) async fn open_image(
        name: &str,
        base: &Arc<dyn Bdev>,
        opts: &LoadOptions,
    ) -> R<Rc<Image>> {
        let ch = channel(base)?;
        let align = (base.block_size() as u64).max(512);
        let capacity = base.size();
        let first = read_meta(&ch, capacity, 0, 512).await?;
        if super::format::be32(&first, 0) != super::format::MAGIC {
            return Err(FormatError::BadMagic.into());
        }
        let bits = super::format::be32(&first, 20);
        if !(9..=21).contains(&bits) {
            return Err(
                FormatError::BadHeader(format!("cluster_bits {bits} outside 9..=21")).into(),
            );
        }
        let cs = 1u64 << bits;
        // A file may end inside its last block (QEMU writes a small L1 table as a few
        // bytes): the image's extent is the base rounded up to a cluster, and bytes
        // past the base read as zeroes.
        let valid = opts.valid_len.map_or(capacity, |v| v.min(capacity));
        let extent = (valid + 1).next_multiple_of(cs);
        let hbuf = read_meta(&ch, capacity, 0, cs).await?;
        let hdr = Header::parse(&hbuf, extent)?;
        if cs < align {
            return Err(BdevError::Unsupported(format!(
                "cluster size {cs} is smaller than the base device's block size {align}"
            )));
        }
        let mut read_only = opts.read_only || base.read_only();
        if hdr.incompatible & INCOMPAT_CORRUPT != 0 {
            if !read_only {
                tracing::warn!(image = name, "image is marked corrupt: opening read-only");
            }
            read_only = true;
        }
        if !read_only && hdr.nb_snapshots > 0 {
            return Err(BdevError::Unsupported(format!(
                "writing images with internal snapshots ({} here); open read-only",
                hdr.nb_snapshots
            )));
        }
        let rf = RefcountFormat {
            order: hdr.refcount_order,
            cluster_bits: bits,
        };
        let l1_bytes = hdr.l1_size as u64 * 8;
        let l1_clusters = l1_bytes.div_ceil(cs);
        let mut l1 = vec![0u64; (l1_clusters * cs / 8) as usize];
        if l1_bytes > 0 {
            let b = read_meta(&ch, capacity, hdr.l1_table_offset, l1_bytes).await?;
            for (i, e) in l1.iter_mut().enumerate().take(hdr.l1_size as usize) {
                *e = be64(&b, i * 8);
            }
        }
        let rt_bytes = hdr.refcount_table_clusters as u64 * cs;
        let rtb = read_meta(&ch, capacity, hdr.refcount_table_offset, rt_bytes).await?;
        let reftable: Vec<u64> = (0..(rt_bytes / 8) as usize)
            .map(|i| be64(&rtb, i * 8))
            .collect();
        let sizes = opts
            .cache
            .resolve(cs, hdr.size)
            .map_err(BdevError::BadOption)?;
        let usage = Arc::new(super::cache::CacheUsage::default());
        let img = Image {
            name: name.to_string(),
            ch,
            cs,
            cluster_bits: bits,
            l2_entries: cs / 8,
            rf,
            version: hdr.version,
            size: Cell::new(hdr.size),
            read_only: Cell::new(read_only),
            align,
            capacity: Cell::new(capacity),
            l1: RefCell::new(l1),
            l1_dirty: RefCell::new(BTreeSet::new()),
            reftable: RefCell::new(reftable),
            reftable_dirty: RefCell::new(BTreeSet::new()),
            l2: TableCache::new(sizes.l2_tables, usage.clone(), true),
            rb: TableCache::new(sizes.refcount_blocks, usage.clone(), false),
            usage,
            meta: futures::lock::Mutex::new(()),
            locks: Rc::new(ClusterLocks::default()),
            drain: Rc::new(Drain::default()),
            frees: RefCell::new(Vec::new()),
            free_hint: Cell::new(0),
            reserved: RefCell::new(Vec::new()),
            backing: RefCell::new(None),
            zcache: RefCell::new(None),
            broken: Cell::new(false),
            zeroes_on_base: Cell::new(base.io_type_supported(IoType::WriteZeroes)),
            fresh_from: Cell::new(u64::MAX),
            discard_on_base: Cell::new(base.io_type_supported(IoType::Unmap)),
            meta_started: Cell::new(0),
            meta_done: Cell::new(0),
            meta_flushed: Cell::new(0),
            flushes_started: Cell::new(0),
            native_fua: base.fua_is_cheap(),
            flushes_ok: Cell::new(0),
            overlap_checks: opts.overlap_checks,
            meta_map: RefCell::new(MetaMap::default()),
            corrupt: Cell::new(false),
            hdr: RefCell::new(hdr),
        };
        check_tables(
            &img.hdr.borrow(),
            &img.l1.borrow(),
            &img.reftable.borrow(),
            valid,
            !read_only,
        )?;
        img.refresh_meta_map();
        let img = Rc::new(img);
        if sizes.clean_interval > 0 {
            img.start_cleaner(sizes.clean_interval);
        }
        if !img.read_only.get() {
            let (dirty, autoclear) = {
                let h = img.hdr.borrow();
                (h.incompatible & INCOMPAT_DIRTY != 0, h.autoclear)
            };
            if dirty {
                tracing::warn!(
                    image = name,
                    "image has the dirty bit set: rebuilding refcounts"
                );
                img.rebuild_refcounts().await?;
            } else if let Some(refs) = img.uncovered_references().await? {
                tracing::warn!(
                    image = name,
                    "refcounts do not cover the clusters in use (a damaged image): rebuilding them"
                );
                img.repair_refcounts(refs).await?;
            }
            if autoclear != 0 {
                // We maintain none of the autoclear features (bitmaps included): clear them
                // so that a later reader knows their data may be stale.
                img.hdr.borrow_mut().autoclear = 0;
                img.write_header().await?;
            }
        }
        Ok(img)
    }

    /// The raw L2 entry of guest cluster `gc` when its table is cached (no I/O).
    pub(crate) fn entry_cached(&self, gc: u64) -> Option<u64> {
        let l1i = (gc / self.l2_entries) as usize;
        let l1e = self.l1.borrow().get(l1i).copied().unwrap_or(0);
        let off = L1Entry(l1e).l2_offset();
        if off == 0 {
            return Some(0);
        }
        self.l2
            .with(off, |t| be64(t, ((gc % self.l2_entries) * 8) as usize))
    }

    /// The raw L2 entry of guest cluster `gc`.
    pub(crate) async fn entry(&self, gc: u64) -> R<u64> {
        if let Some(e) = self.entry_cached(gc) {
            return Ok(e);
        }
        let _g = self.meta.lock().await;
        self.entry_locked(gc).await
    }

    /// The raw L2 entry of guest cluster `gc`; the metadata lock is held.
    pub(crate) async fn entry_locked(&self, gc: u64) -> R<u64> {
        let l1i = (gc / self.l2_entries) as usize;
        let l1e = self.l1.borrow().get(l1i).copied().unwrap_or(0);
        let off = L1Entry(l1e).l2_offset();
        if off == 0 {
            return Ok(0);
        }
        self.load(true, off).await?;
        Ok(self
            .l2
            .with(off, |t| be64(t, ((gc % self.l2_entries) * 8) as usize))
            .unwrap_or(0))
    }

    /// The cache of L2 tables (`true`) or refcount blocks (`false`).
    pub(crate) fn cache(&self, l2: bool) -> &TableCache {
        if l2 {
            &self.l2
        } else {
            &self.rb
        }
    }

    /// Makes room in a cache, writing metadata out first when the victim is dirty.
    pub(crate) async fn make_room(&self, l2: bool) -> R<()> {
        while self.cache(l2).full() {
            let Some((off, dirty)) = self.cache(l2).victim() else {
                break;
            };
            if dirty {
                self.sync_locked(false).await?;
            }
            // A sync may leave the victim dirty again only if it was re-dirtied; re-check.
            if self.cache(l2).victim().is_some_and(|(o, d)| o == off && !d) || !dirty {
                self.cache(l2).remove(off);
            }
        }
        Ok(())
    }

    /// Loads a metadata cluster into its cache; the metadata lock is held.
    pub(crate) async fn load(&self, l2: bool, off: u64) -> R<()> {
        if self.cache(l2).contains(off) {
            return Ok(());
        }
        if off >= self.capacity.get() {
            return Err(FormatError::Corrupt(format!(
                "metadata cluster {off:#x} lies past the end of the image"
            ))
            .into());
        }
        self.make_room(l2).await?;
        let b = read_meta(&self.ch, self.capacity.get(), off, self.cs).await?;
        if !self.cache(l2).contains(off) {
            self.cache(l2).insert(off, b, false);
        }
        Ok(())
    }

    /// Writes the header and flushes: every crash state holds the old
    /// header or the new one, never a torn mix (see [`Image::write_header_unflushed`]).
    pub(crate) async fn write_header(&self) -> R<()> {
        self.write_header_unflushed().await?;
        self.flush_base().await
    }

    /// Writes the header, without the final flush that makes it durable, in
    /// the steps of [`super::format::plan_update`]: what the new header uses
    /// past the first sector goes to bytes the old one does not read, is
    /// flushed, and only then the first sector (which names it) is written,
    /// so a power loss never leaves a torn header (a backing name of the new
    /// header under the old one's first sector). A change of the extensions
    /// past the first sector is one whole-cluster write, as in QEMU.
    pub(crate) async fn write_header_unflushed(&self) -> R<()> {
        let unit = (self.align as usize).max(512);
        let old = read_meta(&self.ch, self.capacity.get(), 0, self.cs).await?;
        let plan =
            super::format::plan_update(&old, &self.hdr.borrow(), unit).map_err(BdevError::from)?;
        if let Some((off, tail)) = plan.tail {
            let buf = DmaBuf::from_slice(&tail)?;
            let res = match self.write_meta(OverlapChecks::MAIN_HEADER, off, buf).await {
                Ok(()) => self.flush_base().await,
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                // The header in memory is the new one already: refuse writes
                // (as a failed write at offset 0 does).
                self.broken.set(true);
                return Err(e);
            }
        }
        let buf = DmaBuf::from_slice(&plan.head)?;
        self.write_meta(OverlapChecks::MAIN_HEADER, 0, buf).await
    }

    /// Writes a metadata buffer; a failure marks the image broken (no more
    /// writes), except ENOSPC outside the header cluster: the caches and
    /// dirty table chunks stay dirty (a later sync writes them again, in the
    /// same order) and new tables are only switched to after they are written,
    /// so the image on disk is consistent and the image works again once there
    /// is space, as QEMU's does. A header write changes the header in memory
    /// first, so its failure still breaks the image.
    /// `kind`: what the buffer is (the overlap check ignores that kind).
    pub(crate) async fn write_meta(&self, kind: OverlapChecks, off: u64, buf: DmaBuf) -> R<()> {
        if self.read_only.get() {
            return Err(BdevError::Io(crate::IoStatus::ReadOnly));
        }
        self.pre_write_check(kind, off, buf.len() as u64).await?;
        self.not_fresh(off, buf.len() as u64);
        self.meta_started.set(self.meta_started.get() + 1);
        let res = write_at(&self.ch, off, buf).await;
        self.meta_done.set(self.meta_done.get() + 1);
        match res {
            Ok(_) => Ok(()),
            Err(e @ BdevError::Io(crate::IoStatus::Enospc)) if off != 0 => {
                tracing::warn!(image = %self.name, offset = off, "metadata write failed: no space left; it is written again by the next flush");
                Err(e)
            }
            Err(e) => {
                tracing::error!(image = %self.name, offset = off, error = %e, "metadata write failed; image now refuses writes");
                self.broken.set(true);
                Err(e)
            }
        }
    }

    /// Notes that `[off, off+len)` on the host is written: it is no longer fresh.
    pub(crate) fn not_fresh(&self, off: u64, len: u64) {
        let end = (off + len).next_multiple_of(self.cs);
        if end > self.fresh_from.get() {
            self.fresh_from.set(end);
        }
    }

    /// Flushes the base device.
    pub(crate) async fn flush_base(&self) -> R<()> {
        // Metadata writes completed by now are covered once the flush succeeds.
        let covered = self.meta_done.get();
        let st = crate::simple_io(&self.ch, IoType::Flush, 0, 0).await;
        if st.is_ok() || st == crate::IoStatus::Unsupported {
            if covered > self.meta_flushed.get() {
                self.meta_flushed.set(covered);
            }
            Ok(())
        } else {
            Err(BdevError::Io(st))
        }
    }

    /// Whether every piece of metadata is durable: nothing dirty in the caches
    /// or tables, no metadata write in flight, and every completed one covered
    /// by a completed base flush. Then a write to a mapped cluster made durable
    /// on the base (FUA) is durable with its mapping, and needs no image flush.
    pub(crate) fn metadata_durable(&self) -> bool {
        let done = self.meta_done.get();
        self.meta_started.get() == done
            && self.meta_flushed.get() == done
            && self.l1_dirty.borrow().is_empty()
            && self.reftable_dirty.borrow().is_empty()
            && !self.l2.any_dirty()
            && !self.rb.any_dirty()
    }

    /// Whether `[host, host+len)` overlaps the header, the L1 table or the refcount table.
    pub(crate) fn overlaps_metadata(&self, host: u64, len: u64) -> bool {
        let h = self.hdr.borrow();
        let ranges = [
            (0, self.cs),
            (
                h.l1_table_offset,
                (h.l1_size as u64 * 8).next_multiple_of(self.cs),
            ),
            (
                h.refcount_table_offset,
                h.refcount_table_clusters as u64 * self.cs,
            ),
        ];
        ranges
            .iter()
            .any(|&(a, l)| l > 0 && host < a + l && a < host + len)
    }
}

/// Validates the L1 and refcount table entries against the image geometry:
/// every L2 table and refcount block cluster-aligned, past the header, inside
/// the image's `len` bytes and off the L1 and refcount tables; for a writable
/// open (`writable`) also none used twice (writes through one guest cluster
/// would change another). The checks of every open, and of a file before
/// anything is written to it.
pub(crate) fn check_tables(
    h: &Header,
    l1: &[u64],
    reftable: &[u64],
    len: u64,
    writable: bool,
) -> R<()> {
    let cs = h.cluster_size();
    let l1_range = (
        h.l1_table_offset,
        h.l1_table_offset + (h.l1_size as u64 * 8).next_multiple_of(cs),
    );
    let rt_range = (
        h.refcount_table_offset,
        h.refcount_table_offset + h.refcount_table_clusters as u64 * cs,
    );
    let check = |what: &str, off: u64| -> R<()> {
        if !off.is_multiple_of(cs) || off < cs || off >= len {
            return Err(FormatError::Corrupt(format!(
                "{what} at {off:#x} is outside the image or misaligned"
            ))
            .into());
        }
        for (n, (a, b)) in [("L1 table", l1_range), ("refcount table", rt_range)] {
            if off >= a && off < b {
                return Err(
                    FormatError::Corrupt(format!("{what} at {off:#x} overlaps the {n}")).into(),
                );
            }
        }
        Ok(())
    };
    // Each L2 table and refcount block is used once: a shared one would make
    // guest clusters (or refcounts) alias each other.
    let mut seen: HashMap<u64, String> = HashMap::new();
    let mut once = |what: String, off: u64| -> R<()> {
        if !writable {
            return Ok(());
        }
        match seen.insert(off, what.clone()) {
            Some(other) => {
                Err(FormatError::Corrupt(format!("{what} at {off:#x} is also {other}")).into())
            }
            None => Ok(()),
        }
    };
    for (i, &e) in l1.iter().enumerate().take(h.l1_size as usize) {
        let l1e = L1Entry(e);
        l1e.validate(cs).map_err(BdevError::from)?;
        if l1e.l2_offset() != 0 {
            check(&format!("L2 table {i}"), l1e.l2_offset())?;
            once(format!("L2 table {i}"), l1e.l2_offset())?;
        }
    }
    for (i, &e) in reftable.iter().enumerate() {
        if e & 0x1ff != 0 {
            return Err(FormatError::Corrupt(format!(
                "refcount table entry {i} has reserved bits set"
            ))
            .into());
        }
        if e != 0 {
            check(&format!("refcount block {i}"), e)?;
            once(format!("refcount block {i}"), e)?;
        }
    }
    Ok(())
}

/// Reads `len` bytes at `off` from the base, in whole blocks; bytes past the
/// base's end read as zeroes.
pub(crate) async fn read_meta(ch: &IoChannel, capacity: u64, off: u64, len: u64) -> R<Vec<u8>> {
    let mut out = vec![0u8; len as usize];
    if off >= capacity {
        return Ok(out);
    }
    let align = (ch.bdev().block_size() as u64).max(1);
    let a0 = off / align * align;
    let a1 = (off + len).next_multiple_of(align).min(capacity);
    if a1 <= a0 {
        return Ok(out);
    }
    let b = read_at(ch, a0, (a1 - a0) as usize).await?;
    let skip = (off - a0) as usize;
    let n = (b.len() - skip).min(out.len());
    out[..n].copy_from_slice(&b.as_slice()[skip..skip + n]);
    Ok(out)
}

impl Image {
    /// Frees idle cache entries every `secs` seconds (QEMU's
    /// `cache-clean-interval`), from a timed poller on the owner reactor;
    /// the poller removes itself at its first run after the image is gone.
    fn start_cleaner(self: &Rc<Self>, secs: u64) {
        let me = Rc::downgrade(self);
        let handle: Rc<RefCell<Option<reactor::PollerHandle>>> = Rc::default();
        let own = handle.clone();
        let h = reactor::register_timed_poller(
            "qcow2-cache-clean",
            std::time::Duration::from_secs(secs),
            move || match me.upgrade() {
                Some(img) => {
                    let n = img.l2.clean_unused() + img.rb.clean_unused();
                    if n > 0 {
                        tracing::debug!(image = %img.name, freed = n, "idle cache entries freed");
                    }
                    reactor::PollStatus::Busy
                }
                None => {
                    if let Some(h) = own.borrow_mut().take() {
                        h.unregister();
                    }
                    reactor::PollStatus::Idle
                }
            },
        );
        *handle.borrow_mut() = Some(h);
    }
}
