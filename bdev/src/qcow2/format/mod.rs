//! The qcow2 on-disk format, free of I/O: header and extensions, table entries,
//! refcount arithmetic, the layout of a new image and offset checks.
//!
//! Everything here follows QEMU's `docs/interop/qcow2.txt`; every parser takes
//! untrusted bytes and answers with a [`FormatError`], never a panic.

mod entry;
mod error;
mod header;
mod header_update;
mod layout;
mod refcount;

pub use entry::{ClusterKind, L1Entry, L2Entry, COPIED, L2_COMPRESSED, L2_ZERO};
pub use error::FormatError;
pub use header::{
    Extension, FeatureKind, Header, AUTOCLEAR_BITMAPS, AUTOCLEAR_RAW_DATA, COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZLIB, COMPRESSION_ZSTD, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTENDED_L2,
    INCOMPAT_EXTERNAL_DATA, MAGIC, MAX_BACKING_NAME, MAX_L1_BYTES, MAX_REFTABLE_BYTES,
};
pub use header_update::{plan_update, used_ranges, HeaderWrite};
pub use layout::{plan_create, CreateLayout};
pub use refcount::RefcountFormat;

/// Reads a big-endian u64 at `pos` (caller guarantees `pos + 8 <= b.len()`).
pub(crate) fn be64(b: &[u8], pos: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[pos..pos + 8]);
    u64::from_be_bytes(a)
}

/// Reads a big-endian u32 at `pos` (caller guarantees `pos + 4 <= b.len()`).
pub(crate) fn be32(b: &[u8], pos: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[pos..pos + 4]);
    u32::from_be_bytes(a)
}

/// Writes a big-endian u64 at `pos`.
pub(crate) fn put64(b: &mut [u8], pos: usize, v: u64) {
    b[pos..pos + 8].copy_from_slice(&v.to_be_bytes());
}

/// Writes a big-endian u32 at `pos`.
pub(crate) fn put32(b: &mut [u8], pos: usize, v: u32) {
    b[pos..pos + 4].copy_from_slice(&v.to_be_bytes());
}
