//! The qcow2 bdev: QEMU's image format (versions 2 and 3, as
//! `docs/interop/qcow2.txt` defines it) over any base bdev, with a backing chain.
//!
//! # API
//!
//! - [`create`] / [`create_file`]: write a new empty image ([`CreateOptions`]:
//!   size, cluster size 512 B..2 MiB, version, refcount width, backing file and
//!   format, compression type), laid out as `qemu-img create -f qcow2` does.
//! - [`Qcow2Bdev::open`] (on a reactor; that reactor becomes the image's *owner*)
//!   or [`open_file`]: returns an `Arc<Qcow2Bdev>`, which is a [`crate::Bdev`]
//!   (the graph registers it to name it). [`OpenOptions::backing`]
//!   says where unallocated clusters read from: the header's backing file
//!   (resolved against the image's directory, format from the backing-format
//!   extension or probed by magic; chains of any length; loops refused), no
//!   backing, or a given / registered bdev.
//! - Chain walking: [`Qcow2Bdev::backing`] (the backing bdev; downcast with
//!   `as_any()` to `Qcow2Bdev` for the next level), [`Qcow2Bdev::backing_file`],
//!   [`Qcow2Bdev::backing_format`], [`Qcow2Bdev::filename`], [`Qcow2Bdev::format`],
//!   [`Qcow2Bdev::cluster_size`].
//! - Streaming helpers (callable on any reactor; forwarded to the owner):
//!   [`Qcow2Bdev::block_status`] -> [`BlockStatus`] `{ allocated_here,
//!   allocated_above_base, zero, len }`; [`Qcow2Bdev::populate_if_unallocated`]
//!   (one whole cluster; a guest write to that cluster always wins);
//!   [`Qcow2Bdev::populate_range_if_unallocated`] (a buffer of several clusters,
//!   written in runs and handed back); [`Qcow2Bdev::populate_zero_if_unallocated`]
//!   (v3 zero clusters, no data); [`Qcow2Bdev::set_backing_file`] (header
//!   rewrite after a full flush) and [`Qcow2Bdev::set_backing_bdev`] (where
//!   reads fall through from now on; registry claims move with the link).
//! - [`crate::Bdev::resize`] (`block_resize`, `resize.rs`): grows (a new
//!   exact L1 table when needed; the new area zeroed where a longer backing
//!   file would show through) or shrinks (clusters past the end discarded,
//!   L2 tables past the new L1 size released) as QEMU's qcow2 does.
//! - [`Qcow2Bdev::flush`], [`Qcow2Bdev::close`] (flush and trim the file);
//!   [`Qcow2Bdev::close_grown_files`] closes every image whose file
//!   [`open_file`] extended (a daemon's shutdown).
//!
//! # Semantics
//!
//! - Reads: data, v3 zero clusters (zeroes), compressed clusters (deflate, zstd),
//!   unallocated clusters from the backing chain (zeroes past its end).
//! - Writes: in place for clusters with refcount 1 (COPIED); otherwise a new
//!   cluster is allocated under a per-cluster lock, filled copy-on-write from the
//!   old contents (backing, compressed, zero) and the L2 entry switched.
//! - Metadata is cached write-back and written in order on flush (and on cache
//!   eviction): refcount blocks, base flush (when the table names a new
//!   block), refcount table, base flush, L2 tables, base flush, L1 entries,
//!   base flush; clusters an L2 entry stopped using are unreferenced only
//!   after that, so a crash can only leak clusters. A completed flush makes every
//!   write completed before it durable.
//! - Write-zeroes: v3 zero clusters for whole clusters (v2 without backing:
//!   unallocated); discard: unallocated (zero clusters when there is a backing
//!   file); partial clusters get zero data. Both read back as zeroes.
//! - Header: unknown incompatible bits refuse the open, naming each (from the
//!   image's feature name table); the corrupt bit opens read-only; the dirty bit
//!   makes a read-write open rebuild the refcounts; autoclear bits are cleared on
//!   a read-write open (no autoclear feature is maintained); every header
//!   extension is kept.
//! - Damaged images (`overlap.rs`, `verify.rs`): every write is checked
//!   against the metadata QEMU's `overlap-check` mode selects
//!   ([`OverlapChecks`], default `cached`); an overlap fails the write (EIO),
//!   sets the header's corrupt bit, refuses writes from then on (reads go on)
//!   and reaches [`on_corruption`] listeners ([`Corruption`], QEMU's
//!   `BLOCK_IMAGE_CORRUPTED`). A writable open first checks the tables (L2
//!   tables and refcount blocks inside the image, off the L1 and refcount
//!   tables, none shared), and rebuilds refcounts that do not cover the
//!   clusters in use (COPIED cleared on shared clusters), so no cluster in use
//!   is handed out again and no shared cluster is written in place.
//! - Refused: extended L2 entries (subclusters), external data files,
//!   encryption, and writing to images with internal snapshots (they open read-only).
//! - The image grows inside its base bdev: allocation past the base's end fails
//!   with ENOSPC ([`open_file`] extends the file sparsely first, from the end
//!   of the image's data: a tail an unclean exit left is trimmed, never piled
//!   on; a file that fails the checks of a read-only open is never touched).

mod alloc;
mod backing_name;
mod bdev;
mod cache;
mod cache_opts;
mod compress;
mod create;
mod fast;
pub mod format;
mod image;
mod io;
mod open;
mod overlap;
mod populate;
mod rebuild;
mod remote;
mod reopen;
mod resize;
mod status;
mod sync;
mod verify;

pub use backing_name::{register_protocol, ProtocolOpener};
pub use bdev::{BlockStatus, Qcow2Bdev};
pub use cache_opts::{CacheOptions, CacheSizes};
pub use create::{create, create_file, create_file_locking, CreateOptions};
pub use open::{open_file, open_file_as, resolve_backing_path, BackingSpec, OpenOptions};
pub use overlap::{on_corruption, Corruption, OverlapChecks};
