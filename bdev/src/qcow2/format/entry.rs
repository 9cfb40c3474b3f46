//! L1 and L2 table entries.

use super::error::FormatError;

/// Bit 63 of L1/L2 entries: the cluster's refcount is exactly 1 (may be rewritten in place).
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: the cluster is compressed.
pub const L2_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries (v3): the cluster reads as zeroes.
pub const L2_ZERO: u64 = 1;
/// Bits 9..=55: a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a standard L2 entry (1..=8 and 56..=61).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of an L1 entry (0..=8 and 56..=62).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;

/// An L1 entry: where the L2 table of a range lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// Offset of the L2 table (0 = none).
    pub fn l2_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }
    /// Whether the L2 table's refcount is 1.
    pub fn copied(self) -> bool {
        self.0 & COPIED != 0
    }
    /// Checks reserved bits and alignment.
    pub fn validate(self, cluster_size: u64) -> Result<(), FormatError> {
        if self.0 & L1_RESERVED != 0 {
            return Err(FormatError::Corrupt(format!(
                "L1 entry {:#018x} has reserved bits set",
                self.0
            )));
        }
        if !self.l2_offset().is_multiple_of(cluster_size) {
            return Err(FormatError::Corrupt(format!(
                "L2 table offset {:#x} is not cluster-aligned",
                self.l2_offset()
            )));
        }
        Ok(())
    }
}

/// What an L2 entry says about one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterKind {
    /// Not allocated here: read from the backing file (or zeroes).
    Unallocated,
    /// Reads as zeroes (v3 zero flag); `host` is a preallocated cluster or 0.
    Zero {
        /// Preallocated host cluster kept by the entry (0 if none).
        host: u64,
    },
    /// Plain data at `host`.
    Normal {
        /// Host offset of the cluster.
        host: u64,
        /// Refcount is 1: may be rewritten in place.
        copied: bool,
    },
    /// Compressed data: `len` bytes starting at `host` (may cross clusters).
    Compressed {
        /// Host byte offset of the compressed stream.
        host: u64,
        /// Upper bound of the compressed length in bytes.
        len: u64,
    },
}

/// An L2 entry (standard, 64-bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Entry(pub u64);

impl L2Entry {
    /// Decodes the entry for an image of `version` and `cluster_bits`.
    pub fn decode(self, version: u32, cluster_bits: u32) -> Result<ClusterKind, FormatError> {
        let e = self.0;
        if e & L2_COMPRESSED != 0 {
            let shift = 62 - (cluster_bits - 8);
            let host = e & ((1u64 << shift) - 1);
            let sectors = ((e >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
            let len = sectors * 512 - (host & 511);
            return Ok(ClusterKind::Compressed { host, len });
        }
        if e & L2_RESERVED != 0 {
            return Err(FormatError::Corrupt(format!(
                "L2 entry {e:#018x} has reserved bits set"
            )));
        }
        let host = e & OFFSET_MASK;
        if !host.is_multiple_of(1u64 << cluster_bits) {
            return Err(FormatError::Corrupt(format!(
                "cluster offset {host:#x} is not cluster-aligned"
            )));
        }
        if e & L2_ZERO != 0 {
            if version < 3 {
                return Err(FormatError::Corrupt(
                    "zero flag in a version 2 image".into(),
                ));
            }
            return Ok(ClusterKind::Zero { host });
        }
        if host == 0 {
            return Ok(ClusterKind::Unallocated);
        }
        Ok(ClusterKind::Normal {
            host,
            copied: e & COPIED != 0,
        })
    }

    /// A plain allocated entry with refcount 1.
    pub fn normal(host: u64) -> Self {
        L2Entry(host | COPIED)
    }

    /// A zero entry without allocation.
    pub fn zero() -> Self {
        L2Entry(L2_ZERO)
    }

    /// An entry describing compressed data (for tests and tools).
    pub fn compressed(host: u64, len: u64, cluster_bits: u32) -> Self {
        let shift = 62 - (cluster_bits - 8);
        let sectors = ((host & 511) + len).div_ceil(512).max(1) - 1;
        L2Entry(L2_COMPRESSED | (sectors << shift) | host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_kinds() {
        assert_eq!(L2Entry(0).decode(3, 16).unwrap(), ClusterKind::Unallocated);
        assert_eq!(
            L2Entry(1).decode(3, 16).unwrap(),
            ClusterKind::Zero { host: 0 }
        );
        assert!(L2Entry(1).decode(2, 16).is_err());
        assert_eq!(
            L2Entry(0x50000 | COPIED).decode(3, 16).unwrap(),
            ClusterKind::Normal {
                host: 0x50000,
                copied: true
            }
        );
        assert!(L2Entry(0x50200).decode(3, 16).is_err());
        assert!(L2Entry(0x50000 | 4).decode(3, 16).is_err());
        let c = L2Entry::compressed(0x12345, 1000, 16);
        match c.decode(3, 16).unwrap() {
            ClusterKind::Compressed { host, len } => {
                assert_eq!(host, 0x12345);
                assert!((1000..1000 + 512).contains(&len));
            }
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn every_entry_decodes_without_panic() {
        for bits in 9..=21 {
            for e in [
                u64::MAX,
                1 << 62,
                (1 << 62) | 1,
                0xdead_beef_dead_beef,
                1 << 63,
            ] {
                let _ = L2Entry(e).decode(3, bits);
                let _ = L1Entry(e).validate(1 << bits);
            }
        }
    }
}
