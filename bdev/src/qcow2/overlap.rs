//! Metadata overlap checks (QEMU's `overlap-check`) and corruption signalling.
//!
//! # Contract
//!
//! - Before every write to the image's base (guest data, new clusters, L2
//!   tables, refcount blocks, the L1 and refcount tables, the header), the
//!   host range is checked against the image's metadata of the kinds the
//!   image's [`OverlapChecks`] select, less the kind being written (a write of
//!   an L2 table does not overlap "an active L2 table"). QEMU's sets:
//!   `constant` = main header, active L1, refcount table, snapshot table,
//!   bitmap directory; `cached` (the default) = `constant` + active L2 tables,
//!   refcount blocks, inactive L1 tables; `all` = `cached` + inactive L2
//!   tables; `none`. The offsets of L2 tables and refcount blocks come from the
//!   L1 and refcount tables held in memory (a map kept in step with them), so
//!   no check does I/O.
//! - Images with internal snapshots never open writable and the bitmaps
//!   extension is dropped on a writable open (its autoclear bit cleared), so
//!   the snapshot table, inactive L1/L2 tables and the bitmap directory are
//!   never near a write; their flags are accepted and have nothing to check.
//! - On an overlap the write is not issued: the image is marked corrupt (the
//!   header's corrupt bit, written and flushed; a v2 header has no such bit),
//!   refuses every write from then on (EIO) while reads go on, and one
//!   [`Corruption`] (QEMU's `BLOCK_IMAGE_CORRUPTED`, `fatal: true`) goes to the
//!   listeners registered with [`on_corruption`]. The write fails with EIO.
//! - New clusters are never taken from known metadata, whatever the mode
//!   (refcounts of a damaged image may say such a cluster is free).

use super::format::INCOMPAT_CORRUPT;
use super::image::{Image, R};
use crate::{write_at, BdevError, DmaBuf, IoStatus};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A set of metadata kinds to check writes against (QEMU's `QCOW2_OL_*` bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlapChecks(u16);

impl OverlapChecks {
    /// The header cluster.
    pub const MAIN_HEADER: Self = Self(1 << 0);
    /// The active L1 table.
    pub const ACTIVE_L1: Self = Self(1 << 1);
    /// The L2 tables the active L1 table points at.
    pub const ACTIVE_L2: Self = Self(1 << 2);
    /// The refcount table.
    pub const REFCOUNT_TABLE: Self = Self(1 << 3);
    /// The refcount blocks.
    pub const REFCOUNT_BLOCK: Self = Self(1 << 4);
    /// The snapshot table.
    pub const SNAPSHOT_TABLE: Self = Self(1 << 5);
    /// The snapshots' L1 tables.
    pub const INACTIVE_L1: Self = Self(1 << 6);
    /// The snapshots' L2 tables.
    pub const INACTIVE_L2: Self = Self(1 << 7);
    /// The persistent bitmaps' directory.
    pub const BITMAP_DIRECTORY: Self = Self(1 << 8);
    /// No checks.
    pub const NONE: Self = Self(0);
    /// QEMU's `constant`: the checks that cost nothing.
    pub const CONSTANT: Self = Self(
        Self::MAIN_HEADER.0
            | Self::ACTIVE_L1.0
            | Self::REFCOUNT_TABLE.0
            | Self::SNAPSHOT_TABLE.0
            | Self::BITMAP_DIRECTORY.0,
    );
    /// QEMU's `cached` (the default): no check reads the disk.
    pub const CACHED: Self =
        Self(Self::CONSTANT.0 | Self::ACTIVE_L2.0 | Self::REFCOUNT_BLOCK.0 | Self::INACTIVE_L1.0);
    /// QEMU's `all`.
    pub const ALL: Self = Self(Self::CACHED.0 | Self::INACTIVE_L2.0);

    /// Each flag: its option name (QEMU's `Qcow2OverlapCheckFlags` member),
    /// the flag, and how QEMU names the metadata in its messages.
    pub const FLAGS: [(&'static str, Self, &'static str); 9] = [
        ("main-header", Self::MAIN_HEADER, "qcow2_header"),
        ("active-l1", Self::ACTIVE_L1, "active L1 table"),
        ("active-l2", Self::ACTIVE_L2, "active L2 table"),
        ("refcount-table", Self::REFCOUNT_TABLE, "refcount table"),
        ("refcount-block", Self::REFCOUNT_BLOCK, "refcount block"),
        ("snapshot-table", Self::SNAPSHOT_TABLE, "snapshot table"),
        ("inactive-l1", Self::INACTIVE_L1, "inactive L1 table"),
        ("inactive-l2", Self::INACTIVE_L2, "inactive L2 table"),
        (
            "bitmap-directory",
            Self::BITMAP_DIRECTORY,
            "bitmap directory",
        ),
    ];

    /// The set of a mode name (`none`, `constant`, `cached`, `all`); the error
    /// is QEMU's text.
    pub fn from_mode(mode: &str) -> Result<Self, String> {
        match mode {
            "none" => Ok(Self::NONE),
            "constant" => Ok(Self::CONSTANT),
            "cached" => Ok(Self::CACHED),
            "all" => Ok(Self::ALL),
            _ => Err(format!(
                "Unsupported value '{mode}' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all"
            )),
        }
    }

    /// The mode name of this set, if it is one of QEMU's four.
    pub fn mode(self) -> Option<&'static str> {
        [
            ("none", Self::NONE),
            ("constant", Self::CONSTANT),
            ("cached", Self::CACHED),
            ("all", Self::ALL),
        ]
        .into_iter()
        .find(|(_, s)| *s == self)
        .map(|(n, _)| n)
    }

    /// This set with `flag` turned on or off.
    pub fn with(self, flag: Self, on: bool) -> Self {
        if on {
            Self(self.0 | flag.0)
        } else {
            Self(self.0 & !flag.0)
        }
    }

    /// Whether every flag of `other` is in this set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    /// Whether any flag is set.
    pub fn contains_any(self) -> bool {
        self.0 != 0
    }

    /// How QEMU names the (first) metadata kind of this set.
    pub fn describe(self) -> &'static str {
        Self::FLAGS
            .iter()
            .find(|(_, f, _)| self.0 & f.0 != 0)
            .map_or("metadata", |(_, _, n)| n)
    }
}

impl Default for OverlapChecks {
    fn default() -> Self {
        Self::CACHED
    }
}

/// An image found corrupt (QEMU's `BLOCK_IMAGE_CORRUPTED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    /// The image's bdev (node) name.
    pub node: String,
    /// What happened, in QEMU's words.
    pub msg: String,
    /// Host offset of the refused access.
    pub offset: Option<u64>,
    /// Its length.
    pub size: Option<u64>,
    /// Whether the image was made unusable for writes.
    pub fatal: bool,
}

type Listener = Arc<dyn Fn(&Corruption) + Send + Sync>;

static LISTENERS: Mutex<Vec<Listener>> = Mutex::new(Vec::new());

/// Calls `f` (on the image's owner reactor: it must not block) for every
/// image found corrupt from now on.
pub fn on_corruption(f: impl Fn(&Corruption) + Send + Sync + 'static) {
    LISTENERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Arc::new(f));
}

fn notify(c: &Corruption) {
    let ls: Vec<Listener> = LISTENERS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for l in ls {
        l(c);
    }
}

/// Host offsets of the L2 tables and refcount blocks the in-memory L1 and
/// refcount tables point at (with how many entries point at each).
#[derive(Default)]
pub(crate) struct MetaMap {
    l2: BTreeMap<u64, u32>,
    rb: BTreeMap<u64, u32>,
}

impl MetaMap {
    fn hits(m: &BTreeMap<u64, u32>, cs: u64, off: u64, len: u64) -> bool {
        // Entries are cluster-aligned and a cluster long.
        let lo = (off + 1).saturating_sub(cs);
        m.range(lo..off.saturating_add(len)).next().is_some()
    }
}

impl Image {
    /// Rebuilds the map of L2 tables and refcount blocks from the tables.
    pub(crate) fn refresh_meta_map(&self) {
        let l1_size = self.hdr.borrow().l1_size as usize;
        let mut m = MetaMap::default();
        for &e in self.l1.borrow().iter().take(l1_size) {
            let off = super::format::L1Entry(e).l2_offset();
            if off != 0 {
                *m.l2.entry(off).or_default() += 1;
            }
        }
        for &off in self.reftable.borrow().iter() {
            if off != 0 {
                *m.rb.entry(off).or_default() += 1;
            }
        }
        *self.meta_map.borrow_mut() = m;
    }

    /// Notes a new L2 table (`l2`) or refcount block at `off`.
    pub(crate) fn note_meta_cluster(&self, l2: bool, off: u64) {
        let mut m = self.meta_map.borrow_mut();
        let map = if l2 { &mut m.l2 } else { &mut m.rb };
        *map.entry(off).or_default() += 1;
    }

    /// The metadata kinds among `checks` that `[off, off+len)` overlaps.
    pub(crate) fn overlaps(&self, checks: OverlapChecks, off: u64, len: u64) -> OverlapChecks {
        let mut hit = OverlapChecks::NONE;
        if checks.0 == 0 || len == 0 {
            return hit;
        }
        let cs = self.cs;
        let inside = |a: u64, l: u64| l > 0 && off < a.saturating_add(l) && a < off + len;
        {
            let h = self.hdr.borrow();
            let fixed = [
                (OverlapChecks::MAIN_HEADER, 0, cs),
                (
                    OverlapChecks::ACTIVE_L1,
                    h.l1_table_offset,
                    (h.l1_size as u64 * 8).next_multiple_of(cs),
                ),
                (
                    OverlapChecks::REFCOUNT_TABLE,
                    h.refcount_table_offset,
                    h.refcount_table_clusters as u64 * cs,
                ),
            ];
            for (k, a, l) in fixed {
                if checks.contains(k) && inside(a, l) {
                    hit = hit.with(k, true);
                }
            }
        }
        let m = self.meta_map.borrow();
        if checks.contains(OverlapChecks::ACTIVE_L2) && MetaMap::hits(&m.l2, cs, off, len) {
            hit = hit.with(OverlapChecks::ACTIVE_L2, true);
        }
        if checks.contains(OverlapChecks::REFCOUNT_BLOCK) && MetaMap::hits(&m.rb, cs, off, len) {
            hit = hit.with(OverlapChecks::REFCOUNT_BLOCK, true);
        }
        hit
    }

    /// Whether `[off, off+len)` holds any known metadata (every kind, whatever
    /// the image's checks): such clusters are never allocated.
    pub(crate) fn is_metadata(&self, off: u64, len: u64) -> bool {
        self.overlaps(OverlapChecks::ALL, off, len).contains_any()
    }

    /// The check before a write of `[off, off+len)` that stores metadata of
    /// kind `ign` (`NONE`: guest data or a new cluster). Without an overlap it
    /// does nothing; with one the image is marked corrupt and the write is to
    /// fail with EIO.
    pub(crate) async fn pre_write_check(&self, ign: OverlapChecks, off: u64, len: u64) -> R<()> {
        let checks = OverlapChecks(self.overlap_checks.0 & !ign.0);
        let hit = self.overlaps(checks, off, len);
        if hit.0 == 0 {
            return Ok(());
        }
        let msg = format!(
            "Preventing invalid write on metadata (overlaps with {})",
            hit.describe()
        );
        self.signal_corruption(&msg, off, len).await;
        Err(BdevError::Io(IoStatus::Eio))
    }

    /// Marks the image corrupt (QEMU's `qcow2_signal_corruption` with `fatal`):
    /// writes are refused from now on, the header gets the corrupt bit
    /// (durably), listeners hear of it. Only the first call does anything.
    pub(crate) async fn signal_corruption(&self, msg: &str, off: u64, len: u64) {
        self.broken.set(true);
        if self.corrupt.replace(true) {
            return;
        }
        tracing::error!(image = %self.name, offset = off, size = len, "qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed");
        notify(&Corruption {
            node: self.name.clone(),
            msg: msg.to_string(),
            offset: Some(off),
            size: Some(len),
            fatal: true,
        });
        if self.read_only.get() {
            return;
        }
        let bytes = {
            let mut h = self.hdr.borrow_mut();
            h.incompatible |= INCOMPAT_CORRUPT;
            h.to_cluster()
        };
        let written = async {
            let bytes = bytes.map_err(BdevError::from)?;
            self.not_fresh(0, bytes.len() as u64);
            write_at(&self.ch, 0, DmaBuf::from_slice(&bytes)?).await?;
            self.flush_base().await
        };
        if let Err(e) = written.await {
            tracing::error!(image = %self.name, error = %e, "cannot set the corrupt bit in the header");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_qemus_sets() {
        assert_eq!(
            OverlapChecks::from_mode("cached"),
            Ok(OverlapChecks::CACHED)
        );
        assert_eq!(OverlapChecks::default(), OverlapChecks::CACHED);
        assert!(OverlapChecks::ALL.contains(OverlapChecks::INACTIVE_L2));
        assert!(!OverlapChecks::CACHED.contains(OverlapChecks::INACTIVE_L2));
        assert!(!OverlapChecks::CONSTANT.contains(OverlapChecks::ACTIVE_L2));
        assert!(!OverlapChecks::NONE.contains(OverlapChecks::MAIN_HEADER));
        let e = OverlapChecks::from_mode("some").unwrap_err();
        assert!(e.contains("Unsupported value 'some'"), "{e}");
        assert_eq!(OverlapChecks::ACTIVE_L2.describe(), "active L2 table");
        for m in ["none", "constant", "cached", "all"] {
            assert_eq!(OverlapChecks::from_mode(m).unwrap().mode(), Some(m));
        }
        assert_eq!(
            OverlapChecks::CACHED
                .with(OverlapChecks::ACTIVE_L2, false)
                .mode(),
            None
        );
    }
}
