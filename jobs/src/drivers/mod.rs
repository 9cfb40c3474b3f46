//! The job drivers, one file each: `stream` (QEMU's `block-stream`),
//! `stream2011` (the 2011 streaming API over the stream driver) and `create`
//! (`blockdev-create`).

pub mod create;
pub mod stream;
pub mod stream2011;
