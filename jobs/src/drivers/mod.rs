//! The job drivers, one file each: `stream` (QEMU's `block-stream`),
//! `stream2011` (the 2011 streaming API over the stream driver), `commit`
//! (`block-commit`), `mirror` (`blockdev-mirror`, `drive-mirror`) and
//! `create` (`blockdev-create`).

pub mod commit;
pub mod create;
pub mod mirror;
pub mod stream;
pub mod stream2011;
