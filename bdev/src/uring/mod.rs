//! The uring bdev: a file or block device through io_uring, one ring per
//! reactor shared by every uring bdev's channel on it (SPDK's
//! `bdev_uring_create` and its group channel; see `group.rs`). O_DIRECT by default, with a buffered
//! option; the block size is detected (512 or 4096) or given.
//!
//! Unless `locking` is off, the bdev holds an image lock on its file for as
//! long as it lives ([`crate::lock`]): a writable one holds consistent reads
//! and writes and shares neither writes nor resizes (an exclusive writer, as
//! a user of SPDK expects); a read-only one holds consistent reads and shares
//! no writes either, as QEMU's readers do. Deleting the bdev ends the lock.

mod channel;
mod group;
mod probe;

use crate::bdev::{Bdev, Channel};
use crate::error::BdevError;
use crate::io::IoType;
use crate::leaf::uuid_or_random;
use crate::lock::{ImageLock, LockMode, Perms};
use serde_json::{json, Value};
use std::any::Any;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// How to open the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringOptions {
    /// O_DIRECT: bypass the page cache (the default).
    pub direct: bool,
    /// Open read-only and refuse writes.
    pub read_only: bool,
    /// Logical block size; detected when `None`.
    pub block_size: Option<u32>,
    /// Image locks (QEMU's `locking` of a file node).
    pub locking: LockMode,
}

impl Default for UringOptions {
    fn default() -> Self {
        Self {
            direct: true,
            read_only: false,
            block_size: None,
            locking: LockMode::Auto,
        }
    }
}

/// A bdev over a file or block device.
pub struct UringBdev {
    name: String,
    path: PathBuf,
    file: Arc<File>,
    opts: UringOptions,
    block_size: u32,
    num_blocks: std::sync::atomic::AtomicU64,
    mem_align: u32,
    is_block_device: bool,
    memory_backed: bool,
    uuid: String,
    /// The image lock this bdev holds (`None`: locking off, or held by the
    /// caller of [`UringBdev::open_under_lock`]).
    lock: Mutex<Option<ImageLock>>,
    /// Writes refused; changed in place by [`UringBdev::set_read_only`].
    read_only: AtomicBool,
}

impl UringBdev {
    /// Opens `path` as bdev `name`. The caller registers it (see [`crate::registry`]).
    pub fn open(name: &str, path: &Path, opts: UringOptions) -> Result<Arc<UringBdev>, BdevError> {
        Self::open_with_uuid(name, path, opts, None)
    }

    /// Like [`UringBdev::open`] with a given UUID (a random one when `None`), so a
    /// config replay keeps the bdev's identity.
    pub fn open_with_uuid(
        name: &str,
        path: &Path,
        opts: UringOptions,
        uuid: Option<String>,
    ) -> Result<Arc<UringBdev>, BdevError> {
        let perms = Perms::for_open(opts.read_only);
        Self::open_inner(name, path, opts, uuid, false, Some(perms))
    }

    /// Like [`UringBdev::open_with_uuid`] (or [`UringBdev::open_allow_empty`]
    /// with `allow_empty`), holding `perms` of the file's lock instead of
    /// what `opts.read_only` implies (a `force-share` reader's
    /// [`Perms::SHARER`]).
    pub fn open_with_perms(
        name: &str,
        path: &Path,
        opts: UringOptions,
        uuid: Option<String>,
        allow_empty: bool,
        perms: Perms,
    ) -> Result<Arc<UringBdev>, BdevError> {
        Self::open_inner(name, path, opts, uuid, allow_empty, Some(perms))
    }

    /// Like [`UringBdev::open`], taking no lock of its own: the caller holds
    /// the file's lock already, for as long as it uses the bdev.
    pub fn open_under_lock(
        name: &str,
        path: &Path,
        opts: UringOptions,
    ) -> Result<Arc<UringBdev>, BdevError> {
        Self::open_inner(name, path, opts, None, false, None)
    }

    /// Ends the bdev's image lock now (it is deleted; a last reference may
    /// still be on its way out).
    pub fn release_lock(&self) {
        let l = self.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(l);
    }

    /// Like [`UringBdev::open_with_uuid`], also accepting a file shorter than
    /// one block (a bdev of size 0 that refuses every I/O): QEMU's file node
    /// over an empty file, which `blockdev-create` then writes an image into.
    pub fn open_allow_empty(
        name: &str,
        path: &Path,
        opts: UringOptions,
        uuid: Option<String>,
    ) -> Result<Arc<UringBdev>, BdevError> {
        let perms = Perms::for_open(opts.read_only);
        Self::open_inner(name, path, opts, uuid, true, Some(perms))
    }

    fn open_inner(
        name: &str,
        path: &Path,
        opts: UringOptions,
        uuid: Option<String>,
        allow_empty: bool,
        lock: Option<Perms>,
    ) -> Result<Arc<UringBdev>, BdevError> {
        let uuid = uuid_or_random(uuid)?;
        if name.is_empty() {
            return Err(BdevError::InvalidParam("name: must not be empty".into()));
        }
        if let Some(bs) = opts.block_size {
            if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
                return Err(BdevError::InvalidParam(format!(
                    "block_size: {bs} is not a power of two between 512 and 65536"
                )));
            }
        }
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        let mut flags = libc::O_CLOEXEC;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        // Never blocks (a FIFO is refused before it is opened): see `open_checked`.
        let file = crate::open_checked::open_checked(path, &mut oo, flags, "opening").map_err(
            |e| match e {
                BdevError::Os { source, .. }
                    if source.raw_os_error() == Some(libc::EINVAL) && opts.direct =>
                {
                    BdevError::os(format!("opening {} with O_DIRECT (the filesystem may not support it; try direct=false)", path.display()), source)
                }
                e => e,
            },
        )?;
        let g = probe::probe(&file, path)?;
        let lock = match lock {
            Some(perms) => ImageLock::take(path, opts.locking, perms)?,
            None => None,
        };
        let detected = if opts.direct {
            g.dio_block.clamp(512, 4096)
        } else {
            512
        };
        let block_size = match opts.block_size {
            Some(bs) if opts.direct && bs < g.dio_block => {
                return Err(BdevError::InvalidParam(format!(
                    "block_size: {bs} is smaller than the direct I/O block size {} of {}",
                    g.dio_block,
                    path.display()
                )))
            }
            Some(bs) => bs,
            None => detected,
        };
        let num_blocks = g.size / block_size as u64;
        if num_blocks == 0 && !allow_empty {
            return Err(BdevError::InvalidParam(format!(
                "filename: {} ({} bytes) is smaller than one block of {block_size} bytes",
                path.display(),
                g.size
            )));
        }
        if g.size % block_size as u64 != 0 {
            tracing::warn!(
                bdev = name,
                size = g.size,
                block_size,
                "file size is not a multiple of the block size; the tail is not used"
            );
        }
        tracing::info!(bdev = name, path = %path.display(), block_size, num_blocks, direct = opts.direct, "uring bdev opened");
        Ok(Arc::new(UringBdev {
            name: name.to_string(),
            path: path.to_path_buf(),
            file: Arc::new(file),
            opts,
            block_size,
            num_blocks: std::sync::atomic::AtomicU64::new(num_blocks),
            mem_align: if opts.direct {
                g.dio_mem_align.max(1)
            } else {
                1
            },
            is_block_device: g.is_block_device,
            memory_backed: g.memory_backed,
            uuid,
            lock: Mutex::new(lock),
            read_only: AtomicBool::new(opts.read_only),
        }))
    }

    /// The file or device path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it is a block device (else a regular file).
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// The options it was opened with (`read_only` as it is now).
    pub fn options(&self) -> UringOptions {
        UringOptions {
            read_only: self.read_only(),
            ..self.opts
        }
    }

    /// Reopens the file read-only or read-write in place (QEMU's
    /// `raw_reopen_prepare`/`commit`, as `bdrv_reopen_set_read_only` does it):
    /// the file is opened again with the new access mode and the same flags,
    /// and the new open file is put behind the bdev's descriptor number with
    /// `dup3`, so every reactor's channel (and a submission already queued on
    /// a ring) uses it from then on without a channel being rebuilt; a request
    /// the kernel already holds keeps the old open file until it completes,
    /// which is closed then. The image lock this bdev holds (if any) takes a
    /// reader's or a writer's permissions first. Cached channels check writes
    /// against the new mode once refreshed ([`crate::refresh_channel_sizes`]
    /// on every reactor). A file that cannot be opened for writing is refused
    /// with [`BdevError::Os`] ("Could not open '<path>'", QEMU's words) and
    /// nothing changes.
    pub fn set_read_only(&self, read_only: bool) -> Result<(), BdevError> {
        if read_only == self.read_only() {
            return Ok(());
        }
        let mut oo = OpenOptions::new();
        oo.read(true).write(!read_only);
        let mut flags = libc::O_CLOEXEC;
        if self.opts.direct {
            flags |= libc::O_DIRECT;
        }
        let what = format!("Could not open '{}'", self.path.display());
        // Never blocks (see `open_checked`); QEMU's words when it fails.
        let new = crate::open_checked::open_checked(&self.path, &mut oo, flags, "opening")
            .map_err(|e| match e {
                BdevError::Os { source, .. } => BdevError::os(what.clone(), source),
                e => e,
            })?;
        let mut lock = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let old_perms = lock.as_ref().map(ImageLock::perms);
        if let Some(l) = lock.as_mut() {
            l.set_perms(Perms::for_open(read_only))?;
        }
        if let Err(e) = nix::unistd::dup3(
            new.as_raw_fd(),
            self.file.as_raw_fd(),
            nix::fcntl::OFlag::O_CLOEXEC,
        ) {
            if let (Some(l), Some(p)) = (lock.as_mut(), old_perms) {
                let _ = l.set_perms(p);
            }
            return Err(BdevError::os(what, std::io::Error::from(e)));
        }
        self.read_only.store(read_only, Ordering::Release);
        tracing::info!(bdev = %self.name, read_only, "file reopened");
        Ok(())
    }
}

impl Bdev for UringBdev {
    /// Changes the permissions of the image lock this bdev holds in place
    /// (see [`ImageLock::set_perms`]); `Ok(false)` when it holds none.
    fn set_lock_perms(&self, perms: Perms) -> Result<bool, BdevError> {
        match self.lock.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(l) => l.set_perms(perms).map(|()| true),
            None => Ok(false),
        }
    }

    /// The permissions of the image lock this bdev holds, if any.
    fn lock_perms(&self) -> Option<Perms> {
        self.lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(ImageLock::perms)
    }

    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "URING bdev"
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// A regular file is truncated or extended to `size` (the blocks are
    /// the whole blocks of it, as at open); a block device cannot change.
    fn resize(&self, size: u64) -> Option<crate::ResizeFuture> {
        let r = if self.read_only() {
            Err(BdevError::Io(crate::IoStatus::ReadOnly))
        } else if self.is_block_device {
            Err(BdevError::Unsupported("Cannot resize device files".into()))
        } else {
            self.file
                .set_len(size)
                .map_err(|e| {
                    // QEMU's words ("Could not resize file: File too large").
                    let why = match e.raw_os_error() {
                        Some(libc::EFBIG) => "File too large".to_string(),
                        Some(libc::ENOSPC) => "No space left on device".to_string(),
                        _ => e.to_string(),
                    };
                    BdevError::Unsupported(format!("Could not resize file: {why}"))
                })
                .map(|()| {
                    self.num_blocks.store(
                        size / self.block_size as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    )
                })
        };
        Some(Box::pin(std::future::ready(r)))
    }
    fn fua_is_cheap(&self) -> bool {
        // RWF_DSYNC on a buffered file writes back and syncs per request.
        self.opts.direct || self.memory_backed
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        match t {
            IoType::Read | IoType::Write | IoType::Flush | IoType::WriteZeroes | IoType::Unmap => {
                true
            }
        }
    }
    fn required_alignment(&self) -> u32 {
        self.mem_align
    }
    fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }
    /// See [`UringBdev::set_read_only`].
    fn reopen(&self, read_only: bool) -> Option<crate::ResizeFuture> {
        Some(Box::pin(std::future::ready(self.set_read_only(read_only))))
    }
    fn uuid(&self) -> Option<String> {
        Some(self.uuid.clone())
    }
    fn create_channel(&self) -> Result<Box<dyn Channel>, BdevError> {
        let info = channel::FileInfo {
            fd: self.file.as_raw_fd(),
            direct: self.opts.direct,
            memory_backed: self.memory_backed,
            block: self.block_size,
            mem_align: self.mem_align,
        };
        let ch = channel::UringChannel::new(info, self.file.clone())
            .map_err(|e| BdevError::os(format!("creating an io_uring for {}", self.name), e))?;
        Ok(Box::new(ch))
    }
    fn filename(&self) -> Option<String> {
        Some(self.path.display().to_string())
    }
    fn driver_specific(&self) -> Value {
        json!({
            "uring": {
                "filename": self.path.display().to_string(),
                "direct": self.opts.direct,
                "block_device": self.is_block_device,
            }
        })
    }
    fn config(&self) -> Option<Value> {
        let mut params = json!({
            "name": self.name,
            "filename": self.path.display().to_string(),
            "block_size": self.block_size,
            "uuid": self.uuid,
        });
        if !self.opts.direct {
            params["direct"] = json!(false);
        }
        if self.read_only() {
            params["readonly"] = json!(true);
        }
        if self.opts.locking != LockMode::Auto {
            params["locking"] = json!(self.opts.locking.as_str());
        }
        Some(json!({ "method": "bdev_uring_create", "params": params }))
    }
    fn on_delete(&self) {
        self.release_lock();
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
