//! [`RbdBdev`]: the bdev contract over an open RBD image.
//!
//! Data path: a channel hands each request to librbd's asynchronous API
//! (`rbd_aio_readv`, `rbd_aio_writev`, `rbd_aio_flush`, `rbd_aio_discard`,
//! `rbd_aio_write_zeroes`), which never blocks; the request's memory, owned
//! by the request, is handed to librbd as it is (no copy). Completions come
//! back to the submitting reactor one of two ways ([`Completion`]):
//!
//! - `message` (the default): librbd calls the completion on one of its own
//!   threads; the callback only reads the result and sends the request back
//!   to the submitting reactor as a message
//!   ([`reactor::RuntimeHandle::send_completion`], also during shutdown);
//! - `eventfd`: librbd queues finished requests on the image and signals an
//!   eventfd (`rbd_set_image_notification`) that wakes a parked reactor; a
//!   poller on each reactor with a channel takes them
//!   (`rbd_poll_io_events`), completing its own and sending the others'
//!   back to their reactors.
//!
//! Either way a request completes on its reactor and never inside `submit`;
//! errors at submission complete it on a later iteration. BENCHMARKS.md has
//! the cost of each per request (`SLUICE_RBD_COMPLETION=message|eventfd`
//! chooses, read when the image is opened).
//!
//! Durability: the connection runs with `rbd_cache=false` (see
//! [`crate::cluster`]), so an acknowledged write is on the OSDs: FUA needs
//! nothing more, and a flush is librbd's (cheap) `rbd_aio_flush`.
//!
//! Control path: opening, resizing, allocation queries and closing block on
//! the cluster, so they run on helper threads ([`crate::image::off_reactor`]);
//! allocation comes from `rbd_diff_iterate2` at whole-object granularity
//! (the parent's included), holes read as zeroes; each answer covers up to
//! 1 GiB and answers the next queries inside it while no write
//! went through the image ([`crate::status`]).

use crate::cluster::{Cluster, ClusterOptions, SendPtr};
use crate::config::RbdConfig;
use crate::error::RbdError;
use crate::ffi;
use crate::image::{off_reactor, Image};
use crate::status::Answer;
use bdev::{
    complete_deferred, Bdev, BdevError, BdevIo, Channel, IoStatus, IoType, RangeStatusFuture,
    ResizeFuture,
};
use reactor::PollStatus;
use reactor::RuntimeHandle;
use serde_json::{json, Value};
use smallvec::SmallVec;
use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The most one allocation query asks librbd about (a stream asks again
/// where the answer ends; the queries before that are answered from it).
const STATUS_WINDOW: u64 = 1 << 30;

/// How completions come back to the reactors (see the module's doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// librbd's callback sends a message to the submitting reactor.
    Message,
    /// librbd signals an eventfd; reactors poll `rbd_poll_io_events`.
    Eventfd,
}

impl Completion {
    /// `SLUICE_RBD_COMPLETION` (`message`, the default, or `eventfd`).
    pub fn from_env() -> Completion {
        match std::env::var("SLUICE_RBD_COMPLETION").as_deref() {
            Ok("eventfd") => Completion::Eventfd,
            _ => Completion::Message,
        }
    }
}

/// How an RBD bdev was made.
#[derive(Debug, Clone)]
pub struct RbdOpen {
    /// The image and its connection options.
    pub config: RbdConfig,
    /// Opened read-only.
    pub read_only: bool,
    /// Logical block size (SPDK's `block_size`; QEMU's 512).
    pub block_size: u32,
    /// SPDK's named cluster it connects through (`None`: its own connection).
    pub cluster_name: Option<String>,
    /// Its UUID (`None`: a random one).
    pub uuid: Option<String>,
}

/// A bdev over an RBD image.
pub struct RbdBdev {
    name: String,
    how: RbdOpen,
    image: Arc<Image>,
    size: AtomicU64,
    uuid: String,
}

impl RbdBdev {
    /// Opens `how`'s image as bdev `name` over `cluster` (or a connection of
    /// its own). Blocks on the cluster: call off the reactors, or use
    /// [`RbdBdev::open_async`].
    pub fn open(
        name: &str,
        how: RbdOpen,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<Arc<RbdBdev>, RbdError> {
        if name.is_empty() {
            return Err(RbdError::Invalid("name: must not be empty".into()));
        }
        if !(512..=65536).contains(&how.block_size) || !how.block_size.is_power_of_two() {
            return Err(RbdError::Invalid(format!(
                "block_size: {} is not a power of two between 512 and 65536",
                how.block_size
            )));
        }
        let cluster = match cluster {
            Some(c) => c,
            None => Cluster::connect(&ClusterOptions {
                user: how.config.user.clone(),
                config_file: how.config.conf.clone(),
                key_file: None,
                config: how.config.options.clone(),
            })?,
        };
        let mut image = Image::open(cluster, &how.config, how.read_only)?;
        if Completion::from_env() == Completion::Eventfd {
            image.set_notification()?;
        }
        let size = image.size()?;
        let uuid = match &how.uuid {
            Some(u) => u.clone(),
            None => random_uuid(),
        };
        Ok(Arc::new(RbdBdev {
            name: name.into(),
            how,
            image: Arc::new(image),
            size: AtomicU64::new(size),
            uuid,
        }))
    }

    /// [`RbdBdev::open`] on a helper thread, awaited (for reactors).
    pub async fn open_async(
        name: String,
        how: RbdOpen,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<Arc<RbdBdev>, RbdError> {
        off_reactor(move || RbdBdev::open(&name, how, cluster)).await
    }

    /// How it was opened.
    pub fn how(&self) -> &RbdOpen {
        &self.how
    }
}

fn random_uuid() -> String {
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = t.to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Bdev for RbdBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "Ceph Rbd Disk"
    }
    fn block_size(&self) -> u32 {
        self.how.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.size.load(Ordering::Acquire) / self.how.block_size as u64
    }
    fn io_type_supported(&self, _t: IoType) -> bool {
        true
    }
    fn read_only(&self) -> bool {
        self.how.read_only || self.how.config.snapshot.is_some()
    }
    fn uuid(&self) -> Option<String> {
        Some(self.uuid.clone())
    }
    fn create_channel(&self) -> Result<Box<dyn Channel>, BdevError> {
        let rt = reactor::handle()
            .ok_or_else(|| BdevError::Runtime("rbd channels live on reactors".into()))?;
        let idx = reactor::current_index()
            .ok_or_else(|| BdevError::Runtime("rbd channels live on reactors".into()))?;
        let route = Arc::new(Route {
            image: self.image.clone(),
            rt,
            idx,
        });
        let poller = match &self.image.efd {
            None => None,
            Some(efd) => {
                use std::os::fd::AsRawFd;
                let fd = efd.as_raw_fd();
                reactor::register_fd(fd).map_err(|e| BdevError::os("rbd eventfd", e))?;
                let image = self.image.clone();
                Some((
                    reactor::register_poller("rbd_completions", move || poll_events(&image, idx)),
                    fd,
                ))
            }
        };
        Ok(Box::new(RbdChannel { route, poller }))
    }
    fn filename(&self) -> Option<String> {
        Some(self.how.config.filename())
    }
    fn driver_specific(&self) -> Value {
        let c = &self.how.config;
        let mut v = json!({
            "pool_name": c.pool,
            "rbd_name": c.image,
        });
        if let Some(ns) = &c.namespace {
            v["namespace"] = json!(ns);
        }
        if let Some(s) = &c.snapshot {
            v["snapshot"] = json!(s);
        }
        if let Some(u) = &c.user {
            v["user_id"] = json!(u);
        }
        if let Some(f) = &c.conf {
            v["config_file"] = json!(f);
        }
        if !c.options.is_empty() {
            v["config"] = Value::Object(
                c.options
                    .iter()
                    .map(|(k, x)| (k.clone(), Value::from(x.clone())))
                    .collect(),
            );
        }
        if let Some(n) = &self.how.cluster_name {
            v["cluster_name"] = json!(n);
        }
        json!({ "rbd": v })
    }
    fn config(&self) -> Option<Value> {
        let c = &self.how.config;
        // SPDK's bdev_rbd_create has no configuration file of its own: a
        // node opened with one is recreated through its named cluster only.
        if c.conf.is_some() && self.how.cluster_name.is_none() {
            return None;
        }
        let mut p = json!({
            "name": self.name,
            "pool_name": c.pool,
            "rbd_name": c.image,
            "block_size": self.how.block_size,
            "uuid": self.uuid,
            "read_only": self.how.read_only,
        });
        if let Some(u) = &c.user {
            p["user_id"] = json!(u);
        }
        if !c.options.is_empty() {
            p["config"] = self.driver_specific()["rbd"]["config"].clone();
        }
        if let Some(n) = &self.how.cluster_name {
            p["cluster_name"] = json!(n);
        }
        Some(json!({ "method": "bdev_rbd_create", "params": p }))
    }
    fn fua_is_cheap(&self) -> bool {
        true
    }
    fn range_status(&self, offset: u64, len: u64) -> Option<RangeStatusFuture> {
        let image = self.image.clone();
        let end = self.size.load(Ordering::Acquire);
        Some(Box::pin(async move {
            let len = len.min(STATUS_WINDOW).min(end.saturating_sub(offset));
            if len == 0 {
                return Err(BdevError::InvalidParam(format!(
                    "offset {offset} is at or beyond the end of the image"
                )));
            }
            if let Some(s) = image.status.lookup(offset, len, Instant::now()) {
                return Ok(s);
            }
            let (generation, at) = (image.status.generation(), Instant::now());
            let img = image.clone();
            let extents = off_reactor(move || img.allocated(offset, len)).await?;
            let answer = Answer {
                lo: offset,
                hi: offset + len,
                extents,
            };
            let s = answer.at(offset, len);
            image.status.store(answer, generation, at);
            Ok(s)
        }))
    }
    fn resize(&self, size: u64) -> Option<ResizeFuture> {
        if self.read_only() {
            return Some(Box::pin(async {
                Err(BdevError::InvalidParam("the image is read-only".into()))
            }));
        }
        let image = self.image.clone();
        // The bdev outlives the future: the caller holds it across the resize.
        let size_cell = SizeCell(&self.size as *const AtomicU64);
        let bs = self.how.block_size as u64;
        Some(Box::pin(async move {
            if size == 0 || !size.is_multiple_of(bs) {
                return Err(BdevError::InvalidParam(format!(
                    "size: {size} is not a positive multiple of the block size {bs}"
                )));
            }
            let img = image.clone();
            let now = off_reactor(move || {
                img.resize(size)?;
                img.size()
            })
            .await?;
            // SAFETY: the caller keeps the bdev (and so the atomic) alive
            // until this future completes (Bdev::resize's contract).
            unsafe { &*size_cell.0 }.store(now, Ordering::Release);
            Ok(())
        }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The size cell of a bdev a resize future updates.
struct SizeCell(*const AtomicU64);

/// What a channel's requests need on librbd's threads.
struct Route {
    image: Arc<Image>,
    rt: RuntimeHandle,
    idx: usize,
}

struct RbdChannel {
    route: Arc<Route>,
    /// `eventfd` completions: this reactor's poller and the fd it wakes on.
    poller: Option<(reactor::PollerHandle, libc::c_int)>,
}

impl Drop for RbdChannel {
    fn drop(&mut self) {
        if let Some((p, fd)) = self.poller.take() {
            p.unregister();
            if reactor::is_reactor_thread() {
                let _ = reactor::unregister_fd(fd);
            }
        }
    }
}

/// The `eventfd` path's poller: takes finished requests off the image and
/// completes them (here) or sends them to their reactors.
fn poll_events(image: &Image, here: usize) -> PollStatus {
    const BATCH: usize = 32;
    let mut comps: [ffi::rbd_completion_t; BATCH] = [std::ptr::null_mut(); BATCH];
    let mut total = 0;
    loop {
        // SAFETY: h is open; comps has room for BATCH completions.
        let n =
            unsafe { ffi::rbd_poll_io_events(image.h, comps.as_mut_ptr(), BATCH as libc::c_int) };
        if n <= 0 {
            break;
        }
        for &c in &comps[..n as usize] {
            // SAFETY: a completion librbd handed back, ours to read and release once.
            let (arg, ret) = unsafe { (ffi::rbd_aio_get_arg(c), ffi::rbd_aio_get_return_value(c)) };
            // SAFETY: as above.
            unsafe { ffi::rbd_aio_release(c) };
            // SAFETY: arg is the Box<Pending> leaked at submission, given back once.
            let p = unsafe { Box::from_raw(arg as *mut Pending) };
            finish(*p, ret, Some(here));
        }
        total += n as usize;
        if (n as usize) < BATCH {
            break;
        }
    }
    if total == 0 {
        return PollStatus::Idle;
    }
    if let Some(efd) = &image.efd {
        use std::os::fd::AsRawFd;
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into v from a non-blocking eventfd (EAGAIN is fine).
        unsafe { libc::read(efd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
    }
    PollStatus::Busy
}

/// Completes a finished request: here if it is this reactor's (`here`),
/// else by a message to its reactor.
fn finish(p: Pending, ret: isize, here: Option<usize>) {
    if ret == -(libc::ETIMEDOUT as isize) {
        // The OSD may have moved: fetch the map before anyone retries.
        p.route.image.refresh_osd_map();
    }
    let status = if ret < 0 {
        IoStatus::from_errno(ret as i32)
    } else {
        IoStatus::Success
    };
    let Pending {
        io,
        route,
        _iov,
        modifies,
    } = p;
    drop(_iov);
    if modifies {
        route.image.status.invalidate();
    }
    if here == Some(route.idx) {
        // SAFETY: the request left this reactor as this pointer and comes
        // back to it here, once.
        let io = unsafe { Box::from_raw(io.0) };
        drop(route);
        io.complete(status);
        return;
    }
    let rt = route.rt.clone();
    let idx = route.idx;
    let sent = rt.send_completion(idx, move || {
        let io = io;
        // SAFETY: the request left its reactor as this pointer and comes back
        // to it here, once; nothing touched it in between.
        let io = unsafe { Box::from_raw(io.0) };
        drop(route);
        io.complete(status);
    });
    if sent.is_err() {
        // The reactor is gone (the process is ending): the request cannot
        // be completed where it belongs, and is left.
        tracing::warn!("rbd completion after its reactor stopped");
    }
}

/// A request in librbd's hands.
struct Pending {
    io: SendPtr<BdevIo>,
    route: Arc<Route>,
    // Alive until the completion: librbd keeps the vector for reads.
    _iov: SmallVec<[libc::iovec; 4]>,
    /// A write, discard or write-zeroes: may change the allocation.
    modifies: bool,
}

extern "C" fn on_complete(c: ffi::rbd_completion_t, arg: *mut libc::c_void) {
    // SAFETY: arg is the Box<Pending> leaked at submission, given back once.
    let p = unsafe { Box::from_raw(arg as *mut Pending) };
    // SAFETY: c is the completion this callback was registered on, not yet released.
    let ret = unsafe { ffi::rbd_aio_get_return_value(c) };
    // SAFETY: as above; released once, here.
    unsafe { ffi::rbd_aio_release(c) };
    finish(*p, ret, None);
}

/// The `eventfd` path's callback: librbd queues the request on the image
/// for [`poll_events`]; nothing to do here.
extern "C" fn on_complete_queued(_c: ffi::rbd_completion_t, _arg: *mut libc::c_void) {}

impl Channel for RbdChannel {
    fn submit(&self, io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        let h = self.route.image.h;
        let (ty, off, len) = (io.io_type, io.offset, io.len);
        let iov: SmallVec<[libc::iovec; 4]> = io
            .iovs()
            .iter()
            .map(|v| libc::iovec {
                iov_base: v.as_ptr() as *mut libc::c_void,
                iov_len: v.len(),
            })
            .collect();
        let iov_ptr = iov.as_ptr();
        let iov_cnt = iov.len() as libc::c_int;
        let modifies = matches!(ty, IoType::Write | IoType::Unmap | IoType::WriteZeroes);
        if modifies {
            self.route.image.status.invalidate();
        }
        let raw = Box::into_raw(io);
        let p = Box::into_raw(Box::new(Pending {
            io: SendPtr(raw),
            route: self.route.clone(),
            _iov: iov,
            modifies,
        }));
        let mut c: ffi::rbd_completion_t = std::ptr::null_mut();
        let cb: ffi::rbd_callback_t = if self.poller.is_some() {
            on_complete_queued
        } else {
            on_complete
        };
        // SAFETY: p is a live allocation given back once (by the callback or
        // the poller); c is an out-pointer.
        let mut r = unsafe { ffi::rbd_aio_create_completion(p as *mut libc::c_void, cb, &mut c) };
        if r >= 0 {
            // SAFETY: h is open (the route holds the image); the iovecs point
            // into the request's own memory, which stays put until it
            // completes; c is a fresh completion that librbd now owns.
            r = unsafe {
                match ty {
                    IoType::Read => ffi::rbd_aio_readv(h, iov_ptr, iov_cnt, off, c),
                    IoType::Write => ffi::rbd_aio_writev(h, iov_ptr, iov_cnt, off, c),
                    IoType::Flush => ffi::rbd_aio_flush(h, c),
                    IoType::Unmap => ffi::rbd_aio_discard(h, off, len, c),
                    IoType::WriteZeroes => {
                        ffi::rbd_aio_write_zeroes(h, off, len as libc::size_t, c, 0, 0)
                    }
                }
            };
            if r < 0 {
                // SAFETY: the submission failed, so librbd never took c.
                unsafe { ffi::rbd_aio_release(c) };
            }
        }
        if r < 0 {
            // SAFETY: the submission failed: p and the request are ours again.
            let p = unsafe { Box::from_raw(p) };
            // SAFETY: raw came from Box::into_raw above and was not given away.
            let io = unsafe { Box::from_raw(p.io.0) };
            complete_deferred(io, IoStatus::from_errno(r));
        }
        Ok(())
    }
}
