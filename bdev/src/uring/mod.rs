//! The uring bdev: a file or block device through io_uring, one ring per
//! reactor shared by every uring bdev's channel on it (SPDK's
//! `bdev_uring_create` and its group channel; see `group.rs`). O_DIRECT by default, with a buffered
//! option; the block size is detected (512 or 4096) or given.
//!
//! Unless `locking` is off, the bdev holds an image lock on its file for as
//! long as it lives ([`crate::lock`]), on the open file description its I/O
//! uses (one descriptor per bdev; a reopen moves the lock to the new
//! description, see [`UringBdev::set_read_only`]): a writable one holds consistent reads
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

/// A file opened as a uring bdev opens it, holding its image lock (unless
/// locking is off or the caller holds the lock): what a caller that must
/// hold the lock before it touches the file (a qcow2 open that extends it)
/// opens first, then makes a bdev of with [`UringBdev::from_file`]. The lock
/// is on this very open file description, which the bdev's I/O uses.
pub struct UringFile {
    path: PathBuf,
    opts: UringOptions,
    file: Arc<File>,
    lock: Option<ImageLock>,
    /// The lock is an image's above the bdev (see [`UringFile::for_image`]).
    image_lock: bool,
}

impl UringFile {
    /// Opens `path` as [`UringBdev::open`] would, taking `lock`'s
    /// permissions of its image lock on it (none when `None` or when
    /// `opts.locking` is off). Nothing is read or written.
    pub fn open(
        path: &Path,
        opts: UringOptions,
        lock: Option<Perms>,
    ) -> Result<UringFile, BdevError> {
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
        let file = Arc::new(file);
        let lock = match lock.filter(|_| opts.locking.enabled()) {
            Some(perms) => Some(ImageLock::on_file(file.clone(), path, perms)?),
            None => None,
        };
        Ok(UringFile {
            path: path.to_path_buf(),
            opts,
            file,
            lock,
            image_lock: false,
        })
    }

    /// Like [`UringFile::open`] with the image lock of a qcow2 image opened
    /// over the file (`qcow2::open_file`): the bdev carries the lock on its
    /// open file description for the image, whose permissions they are. The
    /// bdev's own [`Bdev::lock_perms`] and [`Bdev::set_lock_perms`] see no
    /// lock (the image's do, through [`UringBdev::image_lock_perms`] and
    /// [`UringBdev::set_image_lock_perms`]), and a reopen moves the lock to
    /// the new open file unchanged (the image's caller raises or lowers it).
    pub fn for_image(
        path: &Path,
        opts: UringOptions,
        perms: Perms,
    ) -> Result<UringFile, BdevError> {
        let mut f = Self::open(path, opts, Some(perms))?;
        f.image_lock = true;
        Ok(f)
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
    /// caller of [`UringBdev::open_under_lock`]), on `file`.
    lock: Mutex<Option<ImageLock>>,
    /// `lock` is the image's above ([`UringFile::for_image`]).
    image_lock: bool,
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

    /// The permissions of the lock an image above holds on this file
    /// ([`UringFile::for_image`]), if it does.
    pub fn image_lock_perms(&self) -> Option<Perms> {
        self.held_lock_perms().filter(|_| self.image_lock)
    }

    /// Changes the permissions of the lock an image above holds on this
    /// file in place ([`ImageLock::set_perms`]); `Ok(false)` when it holds none.
    pub fn set_image_lock_perms(&self, perms: Perms) -> Result<bool, BdevError> {
        if !self.image_lock {
            return Ok(false);
        }
        self.set_held_lock_perms(perms)
    }

    /// Whether the lock this bdev carries is an image's above it.
    pub fn holds_image_lock(&self) -> bool {
        self.image_lock && self.held_lock_perms().is_some()
    }

    fn held_lock_perms(&self) -> Option<Perms> {
        self.lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(ImageLock::perms)
    }

    fn set_held_lock_perms(&self, perms: Perms) -> Result<bool, BdevError> {
        match self.lock.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(l) => l.set_perms(perms).map(|()| true),
            None => Ok(false),
        }
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
        let f = UringFile::open(path, opts, lock)?;
        Self::from_file(name, f, Some(uuid), allow_empty)
    }

    /// The bdev `name` over `f` (holding its lock), with a given UUID (a
    /// random one when `None`); `allow_empty` as [`UringBdev::open_allow_empty`].
    /// The file's size is read now.
    pub fn from_file(
        name: &str,
        f: UringFile,
        uuid: Option<String>,
        allow_empty: bool,
    ) -> Result<Arc<UringBdev>, BdevError> {
        let UringFile {
            path,
            opts,
            file,
            lock,
            image_lock,
        } = f;
        let path = path.as_path();
        let uuid = uuid_or_random(uuid)?;
        if name.is_empty() {
            return Err(BdevError::InvalidParam("name: must not be empty".into()));
        }
        let g = probe::probe(&file, path)?;
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
            file,
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
            image_lock,
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
    /// which is closed then. The image lock this bdev holds (if any) moves
    /// to the new open file first ([`ImageLock::move_to`]: checked from the
    /// old one, taken on the new one, then the swap), with a reader's or a
    /// writer's permissions (an image's lock, [`UringFile::for_image`], with
    /// the ones it holds); a conflict is [`BdevError::Locked`] and nothing
    /// changes. The rings' registered copies of the file follow when the
    /// channels are refreshed ([`Channel::file_reopened`]). Cached channels check writes
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
        // The new open file takes the old one's place behind the descriptor
        // number; the old one closes once no request in flight holds it.
        let swap = || {
            nix::unistd::dup3(
                new.as_raw_fd(),
                self.file.as_raw_fd(),
                nix::fcntl::OFlag::O_CLOEXEC,
            )
            .map(drop)
            .map_err(|e| BdevError::os(what.clone(), std::io::Error::from(e)))
        };
        let mut lock = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        match lock.as_mut() {
            // The lock moves with the file: checked from the old one, taken
            // on the new one, then the swap (see `ImageLock::move_to`).
            Some(l) => {
                let perms = if self.image_lock {
                    l.perms()
                } else {
                    Perms::for_open(read_only)
                };
                l.move_to(&new, perms, swap)?
            }
            None => swap()?,
        }
        drop(lock);
        self.read_only.store(read_only, Ordering::Release);
        tracing::info!(bdev = %self.name, read_only, "file reopened");
        Ok(())
    }
}

impl Bdev for UringBdev {
    /// Changes the permissions of the image lock this bdev holds in place
    /// (see [`ImageLock::set_perms`]); `Ok(false)` when it holds none (or
    /// carries an image's: [`UringFile::for_image`]).
    fn set_lock_perms(&self, perms: Perms) -> Result<bool, BdevError> {
        if self.image_lock {
            return Ok(false);
        }
        self.set_held_lock_perms(perms)
    }

    /// The permissions of the image lock this bdev holds, if any (none when
    /// it carries an image's: [`UringFile::for_image`]).
    fn lock_perms(&self) -> Option<Perms> {
        self.held_lock_perms().filter(|_| !self.image_lock)
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
