//! [`Qcow2Bdev`]: the qcow2 image as a [`Bdev`]. Its metadata lives on the owner
//! reactor (the one that opened it); channels on other reactors forward each
//! request there through a ring and complete it back on the submitting reactor
//! (`remote.rs`).

use super::fast::FastPath;
use super::image::Image;
use super::remote::RemoteChannel;
use crate::claim::{Claim, Holder};
use crate::{Bdev, BdevError, BdevIo, Channel, DmaBuf, IoType, RangeStatus, RangeStatusFuture};
use reactor::RuntimeHandle;
use serde_json::{json, Value};
use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

thread_local! {
    /// The images owned by this reactor, by id.
    static ENGINES: RefCell<HashMap<u64, Rc<Image>>> = RefCell::new(HashMap::new());
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The images whose file [`super::open_file`] extended, for
/// [`Qcow2Bdev::close_grown_files`] (entries of dropped images are skipped).
static GROWN: Mutex<Vec<Weak<Qcow2Bdev>>> = Mutex::new(Vec::new());

/// Notes that `open_file` extended `q`'s file: [`Qcow2Bdev::close`] trims it
/// and [`Qcow2Bdev::close_grown_files`] will close it.
pub(crate) fn track_grown(q: &Arc<Qcow2Bdev>, keep: u64) {
    {
        let mut i = q.info();
        i.grown = true;
        i.keep_len = keep;
    }
    let mut g = GROWN.lock().unwrap_or_else(|p| p.into_inner());
    g.retain(|w| w.strong_count() > 0);
    g.push(Arc::downgrade(q));
}

pub(crate) fn engine(id: u64) -> Option<Rc<Image>> {
    ENGINES.with(|m| m.borrow().get(&id).cloned())
}

pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

pub(crate) fn install_engine(id: u64, img: Rc<Image>) {
    ENGINES.with(|m| m.borrow_mut().insert(id, img));
}

/// Allocation status of a range of a qcow2 image and its backing chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Allocated in this image (data, compressed or a zero cluster).
    pub allocated_here: bool,
    /// Allocated in some image from this one down to, not including, `base`
    /// (or anywhere in the chain when no base is given).
    pub allocated_above_base: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Bytes from the queried offset over which this answer holds (> 0).
    pub len: u64,
}

/// Mutable, shared-across-reactors facts about an open image.
#[derive(Default)]
pub(crate) struct Info {
    pub(crate) filename: Option<PathBuf>,
    pub(crate) backing: Option<Arc<dyn Bdev>>,
    pub(crate) backing_file: Option<String>,
    pub(crate) backing_format: Option<String>,
    /// Registry names this image claimed (released on drop).
    pub(crate) claims: Vec<String>,
    /// The registry those claims live in.
    pub(crate) nodes: Option<Arc<crate::registry::Registry>>,
    /// [`super::open_file`] extended the image file (at `filename`) so the
    /// image can grow: [`Qcow2Bdev::close`] trims it back.
    pub(crate) grown: bool,
    /// The file is never trimmed below this length (past the image's end it
    /// held data at open that no refcount accounts for).
    pub(crate) keep_len: u64,
    /// The header's features at open.
    pub(crate) features: Qcow2Features,
}

/// What an image's header says of its format, as QEMU's `qemu-img info`
/// shows it (`ImageInfoSpecificQCow2`): read at open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Qcow2Features {
    /// 2 or 3.
    pub version: u32,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// zstd compression (else deflate).
    pub zstd: bool,
    /// The lazy-refcounts compatible feature.
    pub lazy_refcounts: bool,
    /// The extended-L2 incompatible feature.
    pub extended_l2: bool,
    /// The corrupt bit.
    pub corrupt: bool,
}

/// A qcow2 image over a base bdev, with an optional backing chain.
pub struct Qcow2Bdev {
    pub(crate) me: Weak<Qcow2Bdev>,
    pub(crate) name: String,
    pub(crate) id: u64,
    pub(crate) owner: usize,
    pub(crate) rt: RuntimeHandle,
    pub(crate) size: AtomicU64,
    pub(crate) block_size: u32,
    pub(crate) alignment: u32,
    pub(crate) read_only: std::sync::atomic::AtomicBool,
    pub(crate) cluster_size: u64,
    pub(crate) version: u32,
    pub(crate) base: Arc<dyn Bdev>,
    pub(crate) overlap_checks: super::OverlapChecks,
    pub(crate) info: Mutex<Info>,
    /// How full the metadata caches are (`driver_specific`'s `cache`).
    pub(crate) cache_usage: Arc<super::cache::CacheUsage>,
}

impl Qcow2Bdev {
    pub(crate) fn info(&self) -> std::sync::MutexGuard<'_, Info> {
        self.info.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bdev the image is stored on.
    pub fn base(&self) -> &Arc<dyn Bdev> {
        &self.base
    }
    /// The base when it is a uring bdev (a file).
    fn uring_base(&self) -> Option<&crate::uring::UringBdev> {
        self.base.as_any().downcast_ref::<crate::uring::UringBdev>()
    }
    /// The backing bdev (a raw leaf or another [`Qcow2Bdev`]), if any.
    pub fn backing(&self) -> Option<Arc<dyn Bdev>> {
        self.info().backing.clone()
    }
    /// The backing file name recorded in the header.
    pub fn backing_file(&self) -> Option<String> {
        self.info().backing_file.clone()
    }
    /// The backing format recorded in the header.
    pub fn backing_format(&self) -> Option<String> {
        self.info().backing_format.clone()
    }
    /// The image file's path, when opened from a file.
    pub fn filename(&self) -> Option<PathBuf> {
        self.info().filename.clone()
    }
    /// Always `"qcow2"`.
    pub fn format(&self) -> &'static str {
        "qcow2"
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }
    /// qcow2 version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }
    /// The metadata overlap checks every write passes (QEMU's `overlap-check`).
    pub fn overlap_checks(&self) -> super::OverlapChecks {
        self.overlap_checks
    }
    /// The header's features at open.
    pub fn features(&self) -> Qcow2Features {
        self.info().features
    }

    /// Index of the reactor owning the image's metadata.
    pub fn owner(&self) -> usize {
        self.owner
    }

    /// Runs `f` with the engine on the owner reactor (directly when already there).
    pub(crate) async fn on_owner<T, F, Fut>(&self, f: F) -> Result<T, BdevError>
    where
        T: Send + 'static,
        F: FnOnce(Rc<Image>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, BdevError>> + 'static,
    {
        let id = self.id;
        let gone = || BdevError::NotFound(format!("qcow2 image {} is closed", self.name));
        if reactor::current_index() == Some(self.owner) {
            let img = engine(id).ok_or_else(gone)?;
            return f(img).await;
        }
        let name = self.name.clone();
        self.rt
            .spawn_on(self.owner, move || async move {
                match engine(id) {
                    Some(img) => f(img).await,
                    None => Err(BdevError::NotFound(format!("qcow2 image {name} is closed"))),
                }
            })
            .await
            .map_err(|e| BdevError::Runtime(e.to_string()))?
    }

    /// This layer's own status at `offset`: `(Some(zero) | None, run length)`.
    async fn layer_status(&self, offset: u64, len: u64) -> Result<(Option<bool>, u64), BdevError> {
        self.on_owner(move |img| async move { img.layer_status(offset, len).await })
            .await
    }

    /// Block status of `[offset, offset+len)`, answered for the start of the range.
    /// `base`: a bdev of the backing chain where "above base" stops (excluded).
    /// Call on any reactor.
    pub async fn block_status(
        &self,
        offset: u64,
        len: u64,
        base: Option<&Arc<dyn Bdev>>,
    ) -> Result<BlockStatus, BdevError> {
        if offset >= self.size.load(Ordering::Relaxed) || len == 0 {
            return Err(BdevError::InvalidParam(format!(
                "block_status: range {offset}+{len} outside the image"
            )));
        }
        let base_key = base.map(|b| Arc::as_ptr(b) as *const () as usize);
        let mut run = len.min(self.size.load(Ordering::Relaxed) - offset);
        let (here, r) = self.layer_status(offset, run).await?;
        run = run.min(r).max(1);
        // (zero, below_or_at_base) of the first layer that allocates the range.
        let mut first: Option<(bool, bool)> = here.map(|z| (z, false));
        let mut next = self.backing();
        let mut at_or_below_base = false;
        let mut depth = 0usize;
        while first.is_none() {
            let Some(b) = next.take() else { break };
            depth += 1;
            if depth > 4096 {
                return Err(BdevError::Corrupt("backing chain too long (loop?)".into()));
            }
            if base_key == Some(Arc::as_ptr(&b) as *const () as usize) {
                at_or_below_base = true;
            }
            if offset >= b.size() {
                break;
            }
            run = run.min(b.size() - offset);
            if let Some(q) = b.as_any().downcast_ref::<Qcow2Bdev>() {
                let (h, r) = q.layer_status(offset, run).await?;
                run = run.min(r).max(1);
                if let Some(z) = h {
                    first = Some((z, at_or_below_base));
                }
                next = q.backing();
            } else {
                match b.range_status(offset, run) {
                    Some(fut) => {
                        let rs = fut.await?;
                        run = run.min(rs.len).max(1);
                        if rs.allocated {
                            first = Some((rs.zero, at_or_below_base));
                        }
                    }
                    None => first = Some((false, at_or_below_base)),
                }
            }
        }
        Ok(BlockStatus {
            allocated_here: here.is_some(),
            allocated_above_base: first.is_some_and(|(_, below)| !below),
            zero: first.is_none_or(|(z, _)| z),
            len: run,
        })
    }

    /// Writes one whole cluster at `offset` (cluster-aligned; `data` is the
    /// cluster size, or shorter for the image's last cluster) only if the cluster
    /// is still unallocated in this image. Serialised with guest writes to that
    /// cluster: a guest write always wins. Returns whether it wrote.
    pub async fn populate_if_unallocated(
        &self,
        offset: u64,
        data: DmaBuf,
    ) -> Result<bool, BdevError> {
        self.on_owner(move |img| async move { img.populate(offset, data).await })
            .await
    }

    /// Like [`Qcow2Bdev::populate_if_unallocated`] for several clusters at once:
    /// `data` covers whole clusters from the cluster-aligned `offset` (the last
    /// may be shorter at the image's end); the clusters still unallocated in
    /// this image are written (one write per run of new host clusters that lie
    /// consecutively), the others are left alone. Returns the buffer, for reuse,
    /// and how many clusters were written. `write_behind`: the writes ask a
    /// buffered file to start writeback at once ([`crate::BdevIo::write_behind`];
    /// for a copy that ends with a flush).
    pub async fn populate_range_if_unallocated(
        &self,
        offset: u64,
        data: DmaBuf,
        write_behind: bool,
    ) -> Result<(DmaBuf, u64), BdevError> {
        self.on_owner(move |img| async move { img.populate_many(offset, data, write_behind).await })
            .await
    }

    /// Makes the clusters of `[offset, offset+len)` (cluster-aligned, whole
    /// clusters but at the image's end) that are still unallocated in this image
    /// read as zeroes without writing data: v3 zero clusters, which hide the
    /// backing file. Returns how many clusters it changed. v2 images have no
    /// zero clusters: `Unsupported` (write zero data with
    /// [`Qcow2Bdev::populate_range_if_unallocated`] instead).
    pub async fn populate_zero_if_unallocated(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<u64, BdevError> {
        self.on_owner(move |img| async move { img.populate_zero(offset, len).await })
            .await
    }

    /// Rewrites the header's backing file name and format (`None`: no backing
    /// file) after making all earlier writes durable. Does not change which bdev
    /// reads fall through to; see [`Qcow2Bdev::set_backing_bdev`].
    pub async fn set_backing_file(
        &self,
        name: Option<&str>,
        format: Option<&str>,
    ) -> Result<(), BdevError> {
        self.set_backing_file_with(name, format, true).await
    }

    /// [`Qcow2Bdev::set_backing_file`], with the flush before the header write
    /// only when `durable`; without it all metadata is still written first, in
    /// order, so a killed process leaves a consistent image (a power loss may not).
    pub async fn set_backing_file_with(
        &self,
        name: Option<&str>,
        format: Option<&str>,
        durable: bool,
    ) -> Result<(), BdevError> {
        let (n, f) = (name.map(str::to_string), format.map(str::to_string));
        let (n2, f2) = (n.clone(), f.clone());
        self.on_owner(move |img| async move {
            img.set_backing_file(n.as_deref(), f.as_deref(), durable)
                .await
        })
        .await?;
        let mut i = self.info();
        i.backing_file = n2.clone();
        i.backing_format = if n2.is_some() { f2 } else { None };
        Ok(())
    }

    /// Changes the bdev unallocated reads fall through to (`None`: read zeroes).
    ///
    /// Registry claims follow the link: a claim this image holds on the old
    /// backing (made at open, or by whoever opened the chain, under this
    /// image's name) is released, and the new backing, when it is registered,
    /// is claimed by this image (released again when the image is dropped).
    pub async fn set_backing_bdev(&self, backing: Option<Arc<dyn Bdev>>) -> Result<(), BdevError> {
        let b2 = backing.clone();
        self.on_owner(move |img| async move {
            *img.backing.borrow_mut() = b2;
            Ok(())
        })
        .await?;
        let old = std::mem::replace(&mut self.info().backing, backing.clone());
        let same = |a: &Arc<dyn Bdev>, b: &Arc<dyn Bdev>| {
            std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
        };
        if let (Some(o), Some(n)) = (&old, &backing) {
            if same(o, n) {
                return Ok(());
            }
        }
        let Some(reg) = self.info().nodes.clone() else {
            return Ok(());
        };
        let me = Holder::Node(self.name.clone());
        if let Some(o) = old.as_ref().filter(|o| reg.holds(o)) {
            if reg.is_claimed_by(o.name(), &me) {
                reg.release(o.name(), &me);
            }
            let mut i = self.info();
            if let Some(k) = i.claims.iter().position(|c| c == o.name()) {
                i.claims.remove(k);
            }
        }
        if let Some(n) = backing.as_ref().filter(|n| reg.holds(n)) {
            reg.claim(n.name(), Claim::backing(me))?;
            self.info().claims.push(n.name().to_string());
        }
        Ok(())
    }

    /// After an open: the host bytes from `fresh` on (the image file's length
    /// before its sparse growth) read as zeroes and were never written, so a
    /// new cluster there needs only its new data; `zeroes_on_base`: whether other
    /// new clusters are zeroed by base write-zeroes (else a filled buffer).
    pub(crate) async fn set_fresh_from(
        &self,
        fresh: Option<u64>,
        zeroes_on_base: bool,
    ) -> Result<(), BdevError> {
        self.on_owner(move |img| async move {
            if !zeroes_on_base {
                img.zeroes_on_base.set(false);
            }
            if let Some(f) = fresh {
                // Whatever the open wrote (a refcount rebuild) is in use.
                let used = img.used_end().await?;
                img.fresh_from.set(f.next_multiple_of(img.cs).max(used));
            }
            Ok(())
        })
        .await
    }

    /// Makes every completed write durable (like a flush request).
    pub async fn flush(&self) -> Result<(), BdevError> {
        self.on_owner(move |img| async move { img.flush().await })
            .await
    }

    /// Flushes, and for an image whose file [`super::open_file`] extended trims
    /// the file to the end of the last cluster in use. The bdev stays usable;
    /// closing again does no harm.
    pub async fn close(&self) -> Result<(), BdevError> {
        self.flush().await?;
        self.trim_file().await
    }

    /// For an image whose file [`super::open_file`] extended, trims the file to
    /// the end of the last cluster in use (the clusters past it are in no use,
    /// flushed or not, so this needs no flush). The bdev stays usable.
    ///
    /// Trimming resizes the file: an image that holds a reader's lock (a
    /// backing file since a snapshot) takes a writer's for the trim and goes
    /// back to its reader's after it; when another process holds the file
    /// (so the writer's lock is refused) the file is left as it is (its next
    /// writable open trims it).
    pub async fn trim_file(&self) -> Result<(), BdevError> {
        use crate::lock::{Perms, PERM_RESIZE};
        let lowered = self.lock_perms().filter(|p| p.perm & PERM_RESIZE == 0);
        if let Some(p) = lowered.filter(|_| !self.ro()) {
            if let Err(e) = self.set_lock_perms(Perms::WRITER) {
                tracing::info!(image = %self.name, error = %e, "image file not trimmed");
                return Ok(());
            }
            let r = self.trim_file_locked().await;
            if let Err(e) = self.set_lock_perms(p) {
                tracing::warn!(image = %self.name, error = %e, "image lock not lowered again");
            }
            return r;
        }
        self.trim_file_locked().await
    }

    async fn trim_file_locked(&self) -> Result<(), BdevError> {
        let (path, keep) = {
            let i = self.info();
            (
                i.filename.clone().filter(|_| i.grown && !self.ro()),
                i.keep_len,
            )
        };
        let Some(p) = path else {
            return Ok(());
        };
        let name = self.name.clone();
        self.on_owner(move |img| async move {
            // The metadata lock keeps allocations out until the file is trimmed:
            // every cluster handed out before is below `end`.
            let _m = img.meta.lock().await;
            let end = img.used_end_locked().await?;
            if end == 0 {
                return Ok(());
            }
            let end = end.max(keep);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(|e| BdevError::os(format!("opening {}", p.display()), e))?;
            let len = f
                .metadata()
                .map_err(|e| BdevError::os(format!("reading {}", p.display()), e))?
                .len();
            if len > end {
                f.set_len(end)
                    .map_err(|e| BdevError::os(format!("trimming {}", p.display()), e))?;
                tracing::debug!(image = %name, from = len, to = end, "image file trimmed");
            }
            Ok(())
        })
        .await
    }

    /// Closes ([`Qcow2Bdev::close`]: flush, then trim the file) every image still
    /// open whose file [`super::open_file`] extended, each on its owner reactor,
    /// all at once; for a daemon's shutdown, before its reactors stop. Waits up to
    /// `timeout` in all. Failures are logged (such a file keeps its extended
    /// length until its next writable open trims it). Returns how many images
    /// were closed. Call from a thread that is not a reactor (it blocks).
    pub fn close_grown_files(rt: &RuntimeHandle, timeout: Duration) -> usize {
        let live: Vec<Arc<Qcow2Bdev>> = {
            let mut g = GROWN.lock().unwrap_or_else(|p| p.into_inner());
            g.retain(|w| w.strong_count() > 0);
            g.iter().filter_map(Weak::upgrade).collect()
        };
        if live.is_empty() {
            return 0;
        }
        let deadline = Instant::now() + timeout;
        let (tx, rx) = std::sync::mpsc::channel::<(String, Result<(), BdevError>)>();
        let n = live.len();
        for q in live {
            let tx = tx.clone();
            rt.spawn_on(q.owner, move || async move {
                let r = q.close().await;
                let _ = tx.send((q.name.clone(), r));
            })
            .detach();
        }
        drop(tx);
        let mut closed = 0;
        for answered in 0..n {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((name, Ok(()))) => {
                    closed += 1;
                    tracing::debug!(image = %name, "image closed at shutdown");
                }
                Ok((name, Err(e))) => {
                    tracing::error!(image = %name, error = %e, "closing the image at shutdown failed; its file stays extended until it is opened again");
                }
                Err(RecvTimeoutError::Timeout) => {
                    tracing::error!(
                        images = n - answered,
                        ?timeout,
                        "images still closing at shutdown; their files stay extended until they are opened again"
                    );
                    break;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    tracing::error!(
                        images = n - answered,
                        "the reactors stopped before these images were closed; their files stay extended until they are opened again"
                    );
                    break;
                }
            }
        }
        closed
    }
}

impl Drop for Qcow2Bdev {
    fn drop(&mut self) {
        // The lock its open took on its file ends with the image, however
        // long cached channels keep the file's bdev.
        if let Some(u) = self.uring_base().filter(|u| u.holds_image_lock()) {
            u.release_lock();
        }
        let id = self.id;
        if reactor::current_index() == Some(self.owner) {
            ENGINES.with(|m| m.borrow_mut().remove(&id));
        } else {
            let _ = self.rt.send_completion(self.owner, move || {
                ENGINES.with(|m| m.borrow_mut().remove(&id));
            });
        }
        let (claims, nodes, backing) = {
            let mut i = self.info();
            (
                std::mem::take(&mut i.claims),
                i.nodes.clone(),
                i.backing.clone(),
            )
        };
        // The file and a backing image no registry holds end with the image:
        // every reactor's cached channel to them goes (else each would keep
        // its file, and its reactor's ring, open for the life of the process).
        for b in std::iter::once(self.base.clone()).chain(backing) {
            if !nodes.as_ref().is_some_and(|r| r.holds(&b)) {
                crate::release_hidden(b, &self.rt);
            }
        }
        if let Some(reg) = nodes {
            let me = Holder::Node(self.name.clone());
            for c in claims {
                reg.release(&c, &me);
            }
        }
    }
}

impl Bdev for Qcow2Bdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "QCOW2 disk"
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.size
            .load(Ordering::Relaxed)
            .div_ceil(self.block_size as u64)
    }
    fn io_type_supported(&self, _t: IoType) -> bool {
        true
    }
    fn required_alignment(&self) -> u32 {
        self.alignment
    }
    fn read_only(&self) -> bool {
        self.ro()
    }
    fn create_channel(&self) -> Result<Box<dyn Channel>, BdevError> {
        let here = reactor::current_index()
            .ok_or_else(|| BdevError::Runtime("qcow2 channels are made on reactors".into()))?;
        if here == self.owner {
            let img = engine(self.id).ok_or_else(|| {
                BdevError::NotFound(format!("qcow2 image {} is closed", self.name))
            })?;
            let fast = FastPath::new(img.clone());
            return Ok(Box::new(LocalChannel { img, fast }));
        }
        Ok(Box::new(RemoteChannel::open(
            &self.rt, self.id, self.owner,
        )?))
    }
    fn driver_specific(&self) -> Value {
        let i = self.info();
        json!({ "qcow2": {
            "base_bdev": self.base.name(),
            "filename": i.filename.as_ref().map(|p| p.display().to_string()),
            "cluster_size": self.cluster_size,
            "version": self.version,
            "backing_file": i.backing_file,
            "backing_format": i.backing_format,
            "backing_bdev": i.backing.as_ref().map(|b| b.name().to_string()),
            "owner_reactor": self.owner,
            "cache": self.cache_json(),
        }})
    }
    /// See [`Qcow2Bdev::reopen`] (`reopen.rs`).
    fn reopen(&self, read_only: bool) -> Option<crate::ResizeFuture> {
        let me = self.me.upgrade()?;
        Some(Box::pin(async move { me.reopen(read_only).await }))
    }
    /// Grows the image on its owner reactor (`resize.rs`); the new size
    /// holds for every reactor's requests once their channels are refreshed.
    fn resize(&self, size: u64) -> Option<crate::ResizeFuture> {
        let me = self.me.upgrade()?;
        Some(Box::pin(async move {
            let base = me.base.clone();
            let old = me.size.load(Ordering::Relaxed);
            me.on_owner(move |img| async move { img.resize(&base, size).await })
                .await?;
            me.size.store(size, Ordering::Relaxed);
            // A backing file longer than the old size would show through
            // the new area: it reads as zeroes instead (QEMU's
            // bdrv_co_truncate writes zeroes there).
            let shown = me.backing().map_or(0, |b| b.size()).min(size);
            let bs = me.block_size as u64;
            let start = old.next_multiple_of(bs);
            if shown > start {
                crate::refresh_channel_sizes();
                let me_dyn: Arc<dyn Bdev> = me.clone();
                let ch = crate::channel(&me_dyn)?;
                let len = (shown - start).next_multiple_of(bs).min(size - start);
                let st = crate::simple_io(&ch, IoType::WriteZeroes, start, len).await;
                if !st.is_ok() {
                    return Err(BdevError::Io(st));
                }
            }
            Ok(())
        }))
    }
    fn range_status(&self, offset: u64, len: u64) -> Option<RangeStatusFuture> {
        let me = self.me.upgrade()?;
        Some(Box::pin(async move {
            let s = me.block_status(offset, len, None).await?;
            Ok(RangeStatus {
                len: s.len,
                allocated: s.allocated_above_base,
                zero: s.zero,
            })
        }))
    }
    /// The lock its open took on its file (carried by the file's bdev:
    /// [`crate::uring::UringFile::for_image`]), else its base's.
    fn lock_perms(&self) -> Option<crate::lock::Perms> {
        self.uring_base()
            .and_then(|u| u.image_lock_perms())
            .or_else(|| self.base.lock_perms())
    }
    /// The lock its open took on its file, else its base's.
    fn set_lock_perms(&self, perms: crate::lock::Perms) -> Result<bool, BdevError> {
        if let Some(u) = self.uring_base() {
            if u.set_image_lock_perms(perms)? {
                return Ok(true);
            }
        }
        self.base.set_lock_perms(perms)
    }
    fn on_delete(&self) {
        // Deleted: the file is free for others now, whoever still holds a
        // last reference on its way out. The lock its open took on its file
        // ends with the image; so does that of a uring bdev of the image's
        // own (a backing file opened from the header holds its lock there,
        // unregistered): a registered one's ends when it is deleted itself.
        if let Some(u) = self.uring_base() {
            let nodes = self.info().nodes.clone();
            if u.holds_image_lock() || !nodes.is_some_and(|r| r.holds(&self.base)) {
                u.release_lock();
            }
        }
    }
    /// A node opened over another registered bdev (`base_bdev`: an error
    /// injector, a recorder) is saved as such, with its backing node when
    /// that is saved too; a node over its own file comes back from its
    /// device's entry and the headers (none here). A device's root is saved
    /// by the device (`rpc` drops the root's own entry).
    fn config(&self) -> Option<Value> {
        if self.filename().is_some() {
            return None;
        }
        let mut params = json!({ "node_name": self.name, "base_bdev": self.base.name() });
        if self.ro() {
            params["read_only"] = json!(true);
        }
        if let Some(b) = self.backing().filter(|b| b.config().is_some()) {
            params["backing"] = json!(b.name());
        }
        Some(json!({ "method": "bdev_qcow2_open", "params": params }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The owner reactor's channel: the fast path when the request's clusters are
/// mapped, else one local task per request.
struct LocalChannel {
    img: Rc<Image>,
    fast: Rc<FastPath>,
}

impl Channel for LocalChannel {
    fn submit(&self, io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        let mut io = match self.fast.try_submit(io) {
            Ok(()) => return Ok(()),
            Err(io) => io,
        };
        let img = self.img.clone();
        reactor::spawn_local(async move {
            let st = img.execute(&mut io).await;
            io.complete(st);
        });
        Ok(())
    }

    /// The fast path's requests wait in the image file's channel: kick it.
    /// (The general path's tasks run at the reactor's next turn; a kick
    /// cannot hurry them.)
    fn kick(&self) {
        self.img.ch.kick();
    }
}

impl Qcow2Bdev {
    /// The metadata caches: entries held and allowed, in bytes, and
    /// entries freed as idle (sluice's `driver_specific.qcow2.cache`).
    fn cache_json(&self) -> Value {
        use std::sync::atomic::Ordering::Relaxed;
        let u = &self.cache_usage;
        let cs = self.cluster_size;
        json!({
            "l2_bytes": u.l2.load(Relaxed) as u64 * cs,
            "l2_max_bytes": u.l2_max.load(Relaxed) as u64 * cs,
            "refcount_bytes": u.refcount.load(Relaxed) as u64 * cs,
            "refcount_max_bytes": u.refcount_max.load(Relaxed) as u64 * cs,
            "cleaned_entries": u.cleaned.load(Relaxed),
        })
    }
}
