//! sluice block devices.
//!
//! A [`Bdev`] is a named block device; I/O goes through a per-reactor
//! [`IoChannel`] (see [`channel`]), is described by a [`BdevIo`] that the caller
//! owns until submission and gets back on completion through its [`IoDone`], and
//! always completes on the reactor that submitted it, never inside `submit`.

mod async_io;
mod bdev;
mod channel;
pub mod claim;
mod deferred;
pub mod device;
pub mod dma;
mod error;
pub mod error_bdev;
pub mod filter;
mod io;
mod leaf;
pub mod lock;
pub mod malloc;
pub mod null;
pub mod nvme;
pub mod open_checked;
pub mod qcow2;
pub mod record;
mod registry;
mod stats;
pub mod throttle;
pub mod uring;

pub use async_io::{read_at, simple_io, submit_wait, write_at, IoResult};
pub use bdev::{Bdev, Channel, RangeStatus, RangeStatusFuture, ResizeFuture};
pub use channel::{
    channel, drop_cached_channels, local_stats, refresh_channel_sizes, release_hidden, IoChannel,
};
pub use claim::{Claim, Holder, Perm};
pub use deferred::complete_deferred;
pub use dma::DmaBuf;
pub use error::BdevError;
pub use io::{BdevIo, IoDone, IoStatus, IoType, IoVec};
pub use registry::{release_channels, Registry};
pub use stats::{IoStats, IoStatsSnapshot};
