//! Crash states from a record of what reached the disk (issue #17), as
//! dm-log-writes and CrashMonkey build them.
//!
//! - [`RecordBdev`] (`bdev.rs`): a pass-through bdev that can sit under any
//!   image and logs every write (with its data), FUA write, flush, discard
//!   and write-zeroes at submission and at completion, in one order across
//!   reactors, in memory or streamed to a file ([`log`]: a versioned binary
//!   format whose reader trusts no size). Reads pass through unlogged.
//!   Marks ([`RecordBdev::mark`]) name points of the log (a job reported
//!   complete); [`RecordBdev::seq_now`] tells a user where the log is.
//! - [`replay`]: the crash states of a log: for each durability point
//!   (a completed flush, a completed FUA write), everything durable then
//!   plus prefixes and random subsets, possibly torn, of what was in flight
//!   or issued before the next point, materialised in one scratch file by
//!   deltas. The model is stated there.
//! - [`oracle`]: what the guest wrote and was told; judges a state's
//!   contents (no acknowledged-and-durable write lost).
//! - [`check`]: the checker run on each state of a qcow2 image (`qemu-img
//!   check` finds no corruption, sluice and qemu-img open it and read the
//!   same, the oracle, a completed job's result).
//!
//! A broken device for proving the checker fails:
//! [`RecordOptions::lie_about_flushes`]; a broken replay:
//! [`replay::Plan::lose_point`].

mod bdev;
pub mod check;
pub mod log;
pub mod oracle;
pub mod replay;

pub use bdev::{RecordBdev, RecordOptions};
pub use log::{Event, Log};
