//! The block device trait and its per-reactor channel.

use crate::error::BdevError;
use crate::io::{BdevIo, IoType};
use serde_json::Value;
use std::any::Any;
use std::future::Future;
use std::pin::Pin;

/// Allocation status of the start of a range (NBD `base:allocation`, `qemu-img map`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeStatus {
    /// Bytes from the queried offset over which this status holds (> 0).
    pub len: u64,
    /// Whether the data is allocated (in this bdev or anywhere in its chain).
    pub allocated: bool,
    /// Whether the range reads as zeroes.
    pub zero: bool,
}

/// A local future of a range-status query.
pub type RangeStatusFuture = Pin<Box<dyn Future<Output = Result<RangeStatus, BdevError>>>>;

/// A local future of a resize ([`Bdev::resize`]).
pub type ResizeFuture = Pin<Box<dyn Future<Output = Result<(), BdevError>>>>;

/// A named block device. Shared across reactors (`Send + Sync`); I/O goes through
/// per-reactor [`Channel`]s made by [`Bdev::create_channel`].
///
/// # Force unit access
///
/// Every bdev honours [`BdevIo::fua`](crate::BdevIo::fua): a write,
/// write-zeroes or discard submitted with it completes only once it is durable
/// with all the metadata it depends on. How each one does it:
///
/// - uring (files): writes with `RWF_DSYNC` (the kernel writes the data and
///   the file's allocation, and on `O_DIRECT` flushes the disk's cache);
///   write-zeroes and discards (`fallocate`) are followed by `fdatasync`.
/// - NVMe: the FUA bit on Write and Write Zeroes commands; a discard (Dataset
///   Management) has no FUA bit and is followed by a Flush command.
/// - malloc, null: nothing volatile: completing is enough.
/// - qcow2: a write to clusters already mapped goes down with the flag while
///   all the image's metadata is durable; anything else is done first, then
///   the image is flushed (metadata written in order, base flushed) before
///   the request completes, as QEMU's block layer emulates FUA.
/// - error bdev, device: pass the flag down with the request.
pub trait Bdev: Send + Sync + 'static {
    /// Unique name.
    fn name(&self) -> &str;
    /// SPDK's `product_name` (e.g. "Malloc disk").
    fn product_name(&self) -> &str;
    /// Logical block size in bytes.
    fn block_size(&self) -> u32;
    /// Number of blocks.
    fn num_blocks(&self) -> u64;
    /// Size in bytes.
    fn size(&self) -> u64 {
        self.num_blocks() * self.block_size() as u64
    }
    /// Whether an I/O type is supported.
    fn io_type_supported(&self, t: IoType) -> bool;
    /// Required buffer alignment in bytes (1 = any).
    fn required_alignment(&self) -> u32 {
        1
    }
    /// Whether writes are refused.
    fn read_only(&self) -> bool {
        false
    }
    /// A UUID string, if the bdev has one.
    fn uuid(&self) -> Option<String> {
        None
    }
    /// Creates this reactor's channel. Called on the reactor that will use it.
    fn create_channel(&self) -> Result<Box<dyn Channel>, BdevError>;
    /// What the node reads and writes, as QEMU names a protocol node's
    /// file (a path, `nvme://TRADDR/NSID`); `None` for nodes without one
    /// (RAM, null, layers over other nodes). Never parsed out of
    /// [`Bdev::driver_specific`] or [`Bdev::config`].
    fn filename(&self) -> Option<String> {
        None
    }
    /// `driver_specific` of `bdev_get_bdevs`.
    fn driver_specific(&self) -> Value {
        Value::Null
    }
    /// The `{"method", "params"}` that recreates this bdev (for `save_config`), if any.
    fn config(&self) -> Option<Value> {
        None
    }
    /// Called once when the bdev is deleted from the registry.
    fn on_delete(&self) {}
    /// Whether a FUA write costs about what a plain write does (RAM, a device
    /// with its own FUA, a file opened `O_DIRECT`): `false` where FUA means
    /// syncing a page cache (a buffered file), so that a layer above does
    /// better with plain writes and one flush shared by many of them.
    fn fua_is_cheap(&self) -> bool {
        true
    }
    /// The permissions of the image lock that stands for this bdev (its
    /// file's, [`crate::lock`]), if it holds one.
    fn lock_perms(&self) -> Option<crate::lock::Perms> {
        None
    }
    /// Changes that lock's permissions in place
    /// ([`crate::lock::ImageLock::set_perms`]); `Ok(false)` when there is none
    /// (locking off, storage without locks).
    fn set_lock_perms(&self, _perms: crate::lock::Perms) -> Result<bool, BdevError> {
        Ok(false)
    }
    /// Allocation status at `offset` (at most `len` bytes), if the bdev knows it;
    /// `None` means "all data, allocated". Call on a reactor.
    fn range_status(&self, _offset: u64, _len: u64) -> Option<RangeStatusFuture> {
        None
    }
    /// Changes the size to `size` bytes, if the bdev can (`None`: it cannot,
    /// QEMU's "Image format driver does not support resize"). Call on a
    /// reactor; the caller then refreshes every reactor's cached channels
    /// ([`crate::refresh_channel_sizes`]) so that requests are checked against
    /// the new size. Callers check QEMU's permissions (no claim that does not
    /// share `resize`) first.
    fn resize(&self, _size: u64) -> Option<ResizeFuture> {
        None
    }
    /// Reopens the bdev read-only (`true`) or read-write in place, if it
    /// can (`None`: it cannot; QEMU's `bdrv_reopen_set_read_only`): a file
    /// is opened again with the new mode, an image's engine starts or stops
    /// writing (with its file). The name, claims and channels stay; the
    /// caller then refreshes every reactor's cached channels
    /// ([`crate::refresh_channel_sizes`]) so that writes are checked against
    /// the new mode. Going read-only, the caller has stopped its writers.
    /// Call on a reactor.
    fn reopen(&self, _read_only: bool) -> Option<ResizeFuture> {
        None
    }
    /// For downcasting to the concrete bdev (qcow2 block status, error injection).
    fn as_any(&self) -> &dyn Any;
}

/// One reactor's path to a bdev. Not `Send`: used only on the reactor that made it.
pub trait Channel {
    /// Takes the request. `Ok`: it will complete later on this reactor through its
    /// `IoDone`, never inside this call. `Err(io)`: the queue is full; the request
    /// is handed back untouched, retry after [`Channel::wait_for_space`].
    fn submit(&self, io: Box<BdevIo>) -> Result<(), Box<BdevIo>>;

    /// Calls `f` once on this reactor when a submission may succeed again.
    /// The default retries on the next reactor iteration.
    fn wait_for_space(&self, f: Box<dyn FnOnce()>) {
        reactor::spawn_local(async move { f() });
    }

    /// Starts what is queued now rather than at the channel's next poll, and
    /// completes what has finished already: for a caller that has just
    /// submitted a batch and would otherwise wait a reactor iteration for the
    /// channel's poller (and another for its own, to see the completions).
    /// Unlike [`Channel::submit`], requests may complete inside this call, so
    /// call it with nothing borrowed that their completions need. The default
    /// does nothing: the channel's poller does it all.
    fn kick(&self) {}

    /// The bdev's file was reopened behind the same descriptor
    /// ([`Bdev::reopen`]): a channel holding its own reference to the old
    /// open file (an io_uring's registered file) takes the new one. Called by
    /// [`crate::refresh_channel_sizes`] when the bdev's mode changed.
    fn file_reopened(&self) {}
}
