//! The mirror core (QEMU's `block/mirror.c`), shared by `blockdev-mirror`
//! / `drive-mirror` and the active commit: copy what a [`DirtyMap`] holds
//! from `source` to `target`, pipelined (up to `buf-size` bytes in flight,
//! in runs of at most one chunk), keep copying what clients write through
//! the devices over the source (the map is attached to them before the job
//! starts), become `ready` once nothing is dirty, and at the pivot quiesce
//! the devices, copy what is left, make the target durable and move the
//! devices onto it.
//!
//! - Progress is QEMU's: `len` is what was copied plus what is dirty now.
//! - Errors: a failed read applies `on-source-error`, a failed write
//!   `on-target-error`; the range is marked dirty again (ignore: copied
//!   again later; stop: after resume).
//! - Write-blocking mode ([`ActiveSync`], enabled at start or by
//!   `block-job-change`): writes through the devices reach the target
//!   before they complete; the job's copies hold their ranges busy so that
//!   an overlapping write marks its range dirty again.

use crate::copy::strerror;
use crate::job::{IoOperation, Job, OnError, Verdict};
use bdev::device::{ActiveSync, Device, DirtyMap, SyncedWrites, WriteTracking};
use bdev::{submit_wait, Bdev, BdevIo, DmaBuf, IoChannel, IoType};
use futures::stream::{FuturesUnordered, StreamExt};
use graph::node;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the job sleeps when nothing is dirty before looking again.
const IDLE: Duration = Duration::from_millis(2);

/// The longest sleep for the speed limit between looks at commands.
const SLICE: Duration = Duration::from_millis(10);

/// What the dirty map starts with (QEMU's `mirror_dirty_init`).
pub enum Init {
    /// Everything (a full mirror onto a target that must be zeroed).
    All,
    /// What the source's chain holds above `base` (`None`: the whole chain).
    Above(Option<Arc<dyn Bdev>>),
    /// Nothing (`sync: none`).
    Nothing,
}

/// The copy mode shared with the control plane (`block-job-change`).
pub struct CopyMode {
    write_blocking: AtomicBool,
    sync: Arc<ActiveSync>,
}

impl CopyMode {
    /// Whether the mirror is in write-blocking mode.
    pub fn write_blocking(&self) -> bool {
        self.write_blocking.load(Ordering::SeqCst)
    }

    /// Switches to write-blocking (the only change QEMU implements).
    pub fn set_write_blocking(&self) {
        self.sync.enable();
        self.write_blocking.store(true, Ordering::SeqCst);
    }
}

/// The mirror's state on its reactor.
pub struct Mirror {
    /// The node read (the devices' root).
    pub source: Arc<dyn Bdev>,
    /// The node written.
    pub target: Arc<dyn Bdev>,
    /// The devices over the source: tracked, and moved at the pivot.
    pub devices: Vec<Arc<dyn Bdev>>,
    map: Arc<DirtyMap>,
    tracking: Vec<WriteTracking>,
    synced: Vec<SyncedWrites>,
    mode: Arc<CopyMode>,
    chunk: u64,
    max_inflight: usize,
    on_source: OnError,
    on_target: OnError,
}

/// How a mirror is set up.
pub struct Setup {
    /// Granularity of the dirty map (a power of two).
    pub granularity: u64,
    /// Bytes in flight at most (QEMU's `buf-size`).
    pub buf_size: u64,
    /// Largest run copied at once.
    pub chunk: u64,
    /// `on-source-error`, `on-target-error`.
    pub on_source: OnError,
    /// See `on_source`.
    pub on_target: OnError,
    /// Start in write-blocking mode.
    pub write_blocking: bool,
}

impl Mirror {
    /// Attaches a dirty map (and the write-blocking hook) to every device
    /// over the source at once, on the caller's thread, so that no write
    /// after the command is missed.
    pub fn new(
        source: Arc<dyn Bdev>,
        target: Arc<dyn Bdev>,
        devices: Vec<Arc<dyn Bdev>>,
        s: &Setup,
    ) -> Mirror {
        let size = source.size();
        let map = Arc::new(DirtyMap::new(size, s.granularity));
        let sync = ActiveSync::new(target.clone(), map.clone(), size);
        if s.write_blocking {
            sync.enable();
        }
        let devs = || devices.iter().filter_map(Device::from_bdev);
        let tracking = devs().map(|d| d.track_writes(map.clone())).collect();
        let synced = devs().map(|d| d.sync_writes(sync.clone())).collect();
        let gran = map.granularity();
        let chunk = s.chunk.max(gran) / gran * gran;
        let max_inflight = (s.buf_size / chunk).clamp(1, 64) as usize;
        Mirror {
            source,
            target,
            devices,
            map,
            tracking,
            synced,
            mode: Arc::new(CopyMode {
                write_blocking: AtomicBool::new(s.write_blocking),
                sync,
            }),
            chunk,
            max_inflight,
            on_source: s.on_source,
            on_target: s.on_target,
        }
    }

    /// The copy mode, for the control plane.
    pub fn mode(&self) -> Arc<CopyMode> {
        self.mode.clone()
    }

    /// Marks what the copy starts with.
    pub async fn init(&self, init: &Init) -> Result<(), String> {
        let size = self.source.size();
        match init {
            Init::Nothing => Ok(()),
            Init::All => {
                self.map.mark(0, size);
                Ok(())
            }
            Init::Above(base) => {
                let Some(img) = node::image(&self.source) else {
                    self.map.mark(0, size);
                    return Ok(());
                };
                let mut off = 0;
                while off < size {
                    let s = img
                        .block_status(off, size - off, base.as_ref())
                        .await
                        .map_err(|e| strerror(e.errno()))?;
                    if s.allocated_above_base {
                        self.map.mark(off, s.len);
                    }
                    off += s.len.max(1);
                }
                Ok(())
            }
        }
    }

    /// Bytes dirty now.
    pub fn dirty_bytes(&self) -> u64 {
        self.map.dirty_bytes()
    }

    fn account(&self, job: &Job, done: u64) {
        job.add_progress(done);
        let (offset, _) = job.progress();
        job.set_len(offset + self.map.dirty_bytes());
    }

    /// The loop: copies what is dirty until cancelled, or (once ready)
    /// until `block-job-complete` or a cancel without force.
    pub async fn run(&self, job: &Arc<Job>) -> Result<(), String> {
        let io = Io::new(self)?;
        job.set_len(self.map.dirty_bytes());
        let mut inflight = FuturesUnordered::new();
        let mut cursor = 0;
        let mut ready = false;
        // The speed limit: no new copy before this instant.
        let mut hold: Option<Instant> = None;
        loop {
            let stop = job.is_cancelled() || job.soft_cancel_requested();
            let pause = job.pause_requested();
            if hold.is_some_and(|h| Instant::now() >= h) {
                hold = None;
            }
            if !stop && !pause && hold.is_none() {
                while inflight.len() < self.max_inflight {
                    let Some((off, len)) = self.map.take(cursor, self.chunk) else {
                        break;
                    };
                    cursor = off + len;
                    inflight.push(io.copy(off, len));
                    if let Some(ns) = job.rate_delay(len) {
                        hold = Some(Instant::now() + Duration::from_nanos(ns));
                        break;
                    }
                }
            }
            if inflight.is_empty() {
                if let Some(h) = hold {
                    if !stop && !pause {
                        // In slices, so that commands are seen meanwhile.
                        let left = h.saturating_duration_since(Instant::now());
                        reactor::sleep(left.min(SLICE)).await;
                        continue;
                    }
                }
            }
            if let Some(r) = inflight.next().await {
                if let Err(e) = self.done(job, r) {
                    // What is in flight completes before the job fails.
                    while inflight.next().await.is_some() {}
                    return Err(e);
                }
                continue;
            }
            // Nothing in flight: a pause point.
            if !job.pause_point().await || job.soft_cancel_requested() {
                return Ok(());
            }
            if self.map.dirty_bytes() > 0 {
                continue;
            }
            job.set_actively_synced(self.mode.write_blocking());
            if !ready {
                // The target is made durable before READY (QEMU's
                // `mirror_flush`): a failed flush is a target error.
                if let Err(errno) = flush_errno(&self.target).await {
                    match job.io_error_with(self.on_target, IoOperation::Write, errno) {
                        Verdict::Report => return Err(strerror(errno)),
                        _ => continue,
                    }
                }
                ready = true;
                job.set_ready();
            } else if job.complete_requested() {
                return Ok(());
            } else {
                reactor::sleep(IDLE).await;
            }
        }
    }

    /// One finished copy: progress, or the error policy.
    fn done(&self, job: &Job, r: CopyResult) -> Result<(), String> {
        match r {
            Ok(len) => {
                self.account(job, len);
                Ok(())
            }
            Err((op, errno, off, len)) => {
                self.map.mark(off, len);
                let policy = match op {
                    IoOperation::Read => self.on_source,
                    IoOperation::Write => self.on_target,
                };
                match job.io_error_with(policy, op, errno) {
                    Verdict::Report => Err(strerror(errno)),
                    _ => Ok(()),
                }
            }
        }
    }

    /// Checks whether a device opened on the source during the job (its
    /// writes untracked) stands in the way of the pivot.
    pub fn untracked_user(&self, g: &graph::Graph) -> Option<String> {
        let src = self.source.name();
        let mut now = Device::hidden_by_root(g.nodes(), src);
        now.extend(Device::find_by_root(g.nodes(), src));
        now.iter()
            .find(|d| !self.devices.iter().any(|t| node::same(t, d)))
            .map(|d| d.name().to_string())
    }

    /// The pivot: devices quiesced, what is still dirty copied, the target
    /// made durable, the devices moved onto it (write-blocking stopped
    /// before they resume), then resumed.
    pub async fn pivot(&mut self, job: &Job) -> Result<(), String> {
        self.converge(job, true).await
    }

    /// The end of a mirror cancelled once ready without force: as the
    /// pivot, without the switch (the target is a consistent copy of the
    /// moment the devices were quiesced; QEMU drains likewise).
    pub async fn finish_copy(&mut self, job: &Job) -> Result<(), String> {
        self.converge(job, false).await
    }

    async fn converge(&mut self, job: &Job, switch: bool) -> Result<(), String> {
        let rt = reactor::handle().ok_or_else(|| "not on a reactor".to_string())?;
        let devs: Vec<Arc<dyn Bdev>> = self.devices.clone();
        let devs: Vec<&Device> = devs.iter().filter_map(Device::from_bdev).collect();
        let mut quiesced = 0;
        let mut r = Ok(());
        for d in &devs {
            if let Err(e) = d.quiesce(&rt).await {
                r = Err(e.to_string());
                break;
            }
            quiesced += 1;
        }
        if r.is_ok() {
            r = self.drain_and_switch(job, &rt, &devs, switch).await;
        }
        if r.is_ok() {
            self.detach();
        }
        for d in &devs[..quiesced] {
            d.resume(&rt).await;
        }
        r
    }

    async fn drain_and_switch(
        &self,
        job: &Job,
        rt: &reactor::RuntimeHandle,
        devs: &[&Device],
        switch: bool,
    ) -> Result<(), String> {
        let io = Io::new(self)?;
        let t0 = Instant::now();
        let mut drained = 0;
        while let Some((off, len)) = self.map.take(0, self.chunk) {
            let n = io.copy(off, len).await.map_err(|(_, e, off, len)| {
                self.map.mark(off, len);
                strerror(e)
            })?;
            self.account(job, n);
            drained += n;
        }
        let t1 = Instant::now();
        flush(&self.target).await?;
        tracing::info!(
            target = self.target.name(),
            drained,
            drain_ms = (t1 - t0).as_millis() as u64,
            flush_ms = t1.elapsed().as_millis() as u64,
            "mirror converged with the devices quiesced"
        );
        if !switch {
            return Ok(());
        }
        for d in devs {
            d.swap_root(rt, self.target.clone())
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Stops tracking and mirroring the devices' writes.
    pub fn detach(&mut self) {
        self.synced.clear();
        self.tracking.clear();
    }
}

/// Bytes copied, or (operation, errno, offset, len).
type CopyResult = Result<u64, (IoOperation, i32, u64, u64)>;

/// The channels a copy uses.
struct Io {
    src: Rc<IoChannel>,
    dst: Rc<IoChannel>,
    sync: Arc<ActiveSync>,
    zeroes: bool,
}

impl Io {
    fn new(m: &Mirror) -> Result<Io, String> {
        Ok(Io {
            src: bdev::channel(&m.source).map_err(|e| e.to_string())?,
            dst: bdev::channel(&m.target).map_err(|e| e.to_string())?,
            sync: m.mode.sync.clone(),
            zeroes: m.target.io_type_supported(IoType::WriteZeroes),
        })
    }

    /// Reads `[off, off+len)` through the source, writes it to the target
    /// (as zeroes where it reads as zeroes), holding the range busy.
    async fn copy(&self, off: u64, len: u64) -> CopyResult {
        self.sync.acquire(off, len);
        let r = self.copy_held(off, len).await;
        self.sync.release(off, len);
        r
    }

    async fn copy_held(&self, off: u64, len: u64) -> CopyResult {
        let err = |op, e| Err((op, e, off, len));
        let Ok(buf) = DmaBuf::new_dirty(len as usize) else {
            return err(IoOperation::Read, libc::ENOMEM);
        };
        let mut io = submit_wait(&self.src, BdevIo::read(off, buf, None)).await;
        if !io.status.is_ok() {
            return err(IoOperation::Read, io.status.errno());
        }
        let Some(buf) = io.take_buf() else {
            return err(IoOperation::Read, libc::EIO);
        };
        // (No write-behind hint: in the page cache it made the copy wait on
        // the disk without making the final flush shorter; bench/mirror.sh.)
        let w = if self.zeroes && is_zero(buf.as_slice()) {
            BdevIo::new(IoType::WriteZeroes, off, len, None, None)
        } else {
            BdevIo::write(off, buf, None)
        };
        let io = submit_wait(&self.dst, w).await;
        if !io.status.is_ok() {
            return err(IoOperation::Write, io.status.errno());
        }
        Ok(len)
    }
}

fn is_zero(b: &[u8]) -> bool {
    let words = b.chunks_exact(16);
    let rest = words.remainder();
    words
        .map(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])))
        .all(|w| w == 0)
        && rest.iter().all(|&x| x == 0)
}

/// Flushes `b` (durable before the pivot).
pub async fn flush(b: &Arc<dyn Bdev>) -> Result<(), String> {
    flush_errno(b).await.map_err(strerror)
}

/// Flushes `b`; the errno of a failure.
async fn flush_errno(b: &Arc<dyn Bdev>) -> Result<(), i32> {
    let ch = bdev::channel(b).map_err(|_| libc::ENODEV)?;
    let io = submit_wait(&ch, BdevIo::new(IoType::Flush, 0, 0, None, None)).await;
    if io.status.is_ok() {
        Ok(())
    } else {
        Err(io.status.errno())
    }
}
