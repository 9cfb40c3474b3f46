//! The image header, its feature bits and its extensions.

use super::error::FormatError;
use super::{be32, be64, put32, put64};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Incompatible bit 0: refcounts may be inconsistent (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible bit 1: the image is corrupt; open read-only.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible bit 2: guest data lives in an external data file.
pub const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
/// Incompatible bit 3: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Compatible bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is raw.
pub const AUTOCLEAR_RAW_DATA: u64 = 1 << 1;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Compression type 0: deflate (zlib, raw).
pub const COMPRESSION_ZLIB: u8 = 0;
/// Compression type 1: zstd.
pub const COMPRESSION_ZSTD: u8 = 1;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: usize = 1023;
/// Largest L1 table QEMU accepts (bytes).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts (bytes).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

/// Incompatible features this implementation handles.
const INCOMPAT_SUPPORTED: u64 = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;

/// Kind of a feature bit (feature name table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// Incompatible features.
    Incompatible,
    /// Compatible features.
    Compatible,
    /// Autoclear features.
    Autoclear,
}

/// A header extension kept as raw bytes (written back unchanged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type magic.
    pub kind: u32,
    /// Payload (without padding).
    pub data: Vec<u8>,
}

/// A parsed qcow2 header (version 2 or 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries of the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Length of the fixed header (72 for v2, >= 104 for v3).
    pub header_length: u32,
    /// Compression type (0 = deflate, 1 = zstd).
    pub compression_type: u8,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
    /// Backing file format (extension 0xe2792aca), if any.
    pub backing_format: Option<String>,
    /// Every other header extension, in image order.
    pub extensions: Vec<Extension>,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// L1 entries needed to map `size` bytes with clusters of `cluster_bits`.
    pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
        let per_l2 = 1u64 << (cluster_bits + cluster_bits - 3);
        size.div_ceil(per_l2)
    }

    /// The names of feature bits from the image's feature name table.
    pub fn feature_names(&self) -> Vec<(FeatureKind, u8, String)> {
        let mut out = Vec::new();
        for e in self
            .extensions
            .iter()
            .filter(|e| e.kind == EXT_FEATURE_TABLE)
        {
            for ch in e.data.chunks_exact(48) {
                let kind = match ch[0] {
                    0 => FeatureKind::Incompatible,
                    1 => FeatureKind::Compatible,
                    2 => FeatureKind::Autoclear,
                    _ => continue,
                };
                let raw = &ch[2..48];
                let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                out.push((
                    kind,
                    ch[1],
                    String::from_utf8_lossy(&raw[..end]).into_owned(),
                ));
            }
        }
        out
    }

    /// The name of an incompatible feature bit: the image's table first, then QEMU's names.
    pub fn incompatible_name(&self, bit: u8) -> String {
        if let Some((_, _, n)) = self
            .feature_names()
            .into_iter()
            .find(|(k, b, _)| *k == FeatureKind::Incompatible && *b == bit)
        {
            return n;
        }
        match bit {
            0 => "dirty bit".into(),
            1 => "corrupt bit".into(),
            2 => "external data file".into(),
            3 => "compression type".into(),
            4 => "extended L2 entries".into(),
            _ => "unknown".into(),
        }
    }

    /// Parses the header from the start of the image. `buf` must hold the whole
    /// first cluster (or the whole file if shorter); `file_len` is the image size
    /// in bytes (for offset checks).
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Self, FormatError> {
        let bad = |m: String| FormatError::BadHeader(m);
        if buf.len() < 72 {
            return Err(if buf.len() >= 4 && be32(buf, 0) != MAGIC {
                FormatError::BadMagic
            } else {
                bad("image shorter than a header".into())
            });
        }
        if be32(buf, 0) != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(FormatError::BadVersion(version));
        }
        let backing_file_offset = be64(buf, 8);
        let backing_file_size = be32(buf, 16);
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(format!("cluster_bits {cluster_bits} outside 9..=21")));
        }
        let cs = 1u64 << cluster_bits;
        let size = be64(buf, 24);
        let crypt = be32(buf, 32);
        let l1_size = be32(buf, 36);
        let l1_table_offset = be64(buf, 40);
        let refcount_table_offset = be64(buf, 48);
        let refcount_table_clusters = be32(buf, 56);
        let nb_snapshots = be32(buf, 60);
        let snapshots_offset = be64(buf, 64);
        let mut h = Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: COMPRESSION_ZLIB,
            backing_file: None,
            backing_format: None,
            extensions: Vec::new(),
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(bad("version 3 header truncated".into()));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 || h.header_length as u64 > cs.min(buf.len() as u64) {
                return Err(bad(format!("header_length {} invalid", h.header_length)));
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
            }
        }
        let hdr_len = h.header_length as usize;
        // Extensions come first so unknown feature bits can be named from the table.
        let ext_end = if backing_file_offset != 0 {
            backing_file_offset.min(cs) as usize
        } else {
            cs as usize
        };
        let ext_end = ext_end.min(buf.len());
        let mut pos = hdr_len.next_multiple_of(8).max(hdr_len);
        if version == 2 {
            pos = 72;
        }
        loop {
            if pos + 8 > ext_end {
                // No room for an end marker: tolerated only when nothing is there.
                break;
            }
            let kind = be32(buf, pos);
            let len = be32(buf, pos + 4) as usize;
            if kind == 0 {
                break;
            }
            let data_end = pos + 8 + len;
            if data_end > ext_end {
                return Err(bad(format!(
                    "header extension 0x{kind:08x} runs past the header area"
                )));
            }
            let data = buf[pos + 8..data_end].to_vec();
            if kind == EXT_BACKING_FORMAT {
                h.backing_format = Some(
                    String::from_utf8(data)
                        .map_err(|_| bad("backing format is not UTF-8".into()))?,
                );
            } else {
                h.extensions.push(Extension { kind, data });
            }
            pos = pos + 8 + len.next_multiple_of(8);
        }
        if crypt != 0 {
            return Err(FormatError::Unsupported(format!(
                "encryption (crypt_method {crypt})"
            )));
        }
        let unsupported = h.incompatible & !INCOMPAT_SUPPORTED;
        if unsupported != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|b| unsupported & (1u64 << b) != 0)
                .map(|b| format!("bit {b} ({})", h.incompatible_name(b)))
                .collect();
            return Err(FormatError::IncompatibleFeatures(names.join(", ")));
        }
        if h.refcount_order > 6 {
            return Err(bad(format!("refcount_order {} > 6", h.refcount_order)));
        }
        match (
            h.incompatible & INCOMPAT_COMPRESSION != 0,
            h.compression_type,
        ) {
            (false, COMPRESSION_ZLIB) | (true, COMPRESSION_ZSTD) => {}
            (true, COMPRESSION_ZLIB) => {
                return Err(bad("compression type bit set with zlib type".into()))
            }
            (false, t) => {
                return Err(bad(format!(
                    "compression type {t} without its incompatible bit"
                )))
            }
            (true, t) => return Err(FormatError::Unsupported(format!("compression type {t}"))),
        }
        if backing_file_offset != 0 {
            let end = backing_file_offset.checked_add(backing_file_size as u64);
            if backing_file_size as usize > MAX_BACKING_NAME
                || end.is_none_or(|e| e > cs || e > buf.len() as u64)
                || backing_file_offset < hdr_len as u64
            {
                return Err(bad(
                    "backing file name lies outside the header cluster or is too long".into(),
                ));
            }
            let raw = &buf[backing_file_offset as usize
                ..backing_file_offset as usize + backing_file_size as usize];
            let name = String::from_utf8(raw.to_vec())
                .map_err(|_| bad("backing file name is not UTF-8".into()))?;
            if !name.is_empty() {
                h.backing_file = Some(name);
            }
        }
        h.check_tables(file_len)?;
        Ok(h)
    }

    /// Range checks of the table pointers against each other and the image length.
    fn check_tables(&self, file_len: u64) -> Result<(), FormatError> {
        let cs = self.cluster_size();
        let bad = |m: String| FormatError::BadHeader(m);
        let need_l1 = Self::l1_entries_for(self.size, self.cluster_bits);
        if (self.l1_size as u64) < need_l1 {
            return Err(bad(format!(
                "l1_size {} too small for a {}-byte disk",
                self.l1_size, self.size
            )));
        }
        if self.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(bad(format!(
                "L1 table of {} entries is too large",
                self.l1_size
            )));
        }
        if self.refcount_table_clusters == 0
            || self.refcount_table_clusters as u64 * cs > MAX_REFTABLE_BYTES
        {
            return Err(bad(format!(
                "refcount table of {} clusters is invalid",
                self.refcount_table_clusters
            )));
        }
        let ranges = [
            ("L1 table", self.l1_table_offset, self.l1_size as u64 * 8),
            (
                "refcount table",
                self.refcount_table_offset,
                self.refcount_table_clusters as u64 * cs,
            ),
        ];
        for (what, off, len) in ranges {
            if len == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) {
                return Err(bad(format!(
                    "{what} offset {off:#x} is not cluster-aligned"
                )));
            }
            if off < cs {
                return Err(bad(format!("{what} overlaps the header")));
            }
            if off.checked_add(len).is_none_or(|e| e > file_len) {
                return Err(bad(format!(
                    "{what} at {off:#x} (+{len}) lies past the end of the image ({file_len} bytes)"
                )));
            }
        }
        let (a, al) = (self.l1_table_offset, self.l1_size as u64 * 8);
        let (b, bl) = (
            self.refcount_table_offset,
            self.refcount_table_clusters as u64 * cs,
        );
        if al > 0 && a < b + bl && b < a + al {
            return Err(bad("L1 table and refcount table overlap".into()));
        }
        if self.nb_snapshots > 0
            && (!self.snapshots_offset.is_multiple_of(cs)
                || self.snapshots_offset < cs
                || self.snapshots_offset >= file_len)
        {
            return Err(bad(format!(
                "snapshot table offset {:#x} invalid",
                self.snapshots_offset
            )));
        }
        Ok(())
    }

    /// Serialises the header, its extensions and the backing file name into one
    /// cluster-sized buffer (the whole header cluster).
    pub fn to_cluster(&self) -> Result<Vec<u8>, FormatError> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; cs];
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, 0);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        let mut pos = 72usize;
        if self.version == 3 {
            put64(&mut b, 72, self.incompatible);
            put64(&mut b, 80, self.compatible);
            put64(&mut b, 88, self.autoclear);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, self.header_length);
            if self.header_length > 104 {
                b[104] = self.compression_type;
            }
            pos = (self.header_length as usize).next_multiple_of(8);
        }
        let too_big = || {
            FormatError::BadHeader(
                "header, extensions and backing name do not fit in one cluster".into(),
            )
        };
        let put_ext =
            |b: &mut Vec<u8>, pos: &mut usize, kind: u32, data: &[u8]| -> Result<(), FormatError> {
                let end = *pos + 8 + data.len().next_multiple_of(8);
                if end + 8 > cs {
                    return Err(too_big());
                }
                put32(b, *pos, kind);
                put32(b, *pos + 4, data.len() as u32);
                b[*pos + 8..*pos + 8 + data.len()].copy_from_slice(data);
                *pos = end;
                Ok(())
            };
        if let Some(f) = &self.backing_format {
            put_ext(&mut b, &mut pos, EXT_BACKING_FORMAT, f.as_bytes())?;
        }
        for e in &self.extensions {
            put_ext(&mut b, &mut pos, e.kind, &e.data)?;
        }
        pos += 8; // end-of-extensions marker (zeroes)
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME || pos + name.len() > cs {
                return Err(too_big());
            }
            put64(&mut b, 8, pos as u64);
            put32(&mut b, 16, name.len() as u32);
            b[pos..pos + name.len()].copy_from_slice(name.as_bytes());
        }
        Ok(b)
    }

    /// Bytes of the header cluster that carry data (for writing only a prefix).
    pub fn used_len(&self) -> usize {
        let mut pos = if self.version == 3 {
            (self.header_length as usize).next_multiple_of(8)
        } else {
            72
        };
        if let Some(f) = &self.backing_format {
            pos += 8 + f.len().next_multiple_of(8);
        }
        for e in &self.extensions {
            pos += 8 + e.data.len().next_multiple_of(8);
        }
        pos + 8 + self.backing_file.as_ref().map_or(0, |n| n.len())
    }

    /// QEMU's feature name table extension for the features it defines.
    pub fn qemu_feature_table() -> Extension {
        let feats: [(u8, u8, &str); 7] = [
            (0, 0, "dirty bit"),
            (0, 1, "corrupt bit"),
            (0, 2, "external data file"),
            (0, 3, "compression type"),
            (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"),
            (2, 0, "bitmaps"),
        ];
        let mut data = Vec::with_capacity(feats.len() * 48 + 48);
        for (k, bit, name) in feats
            .iter()
            .chain(std::iter::once(&(2u8, 1u8, "raw external data")))
        {
            let mut e = [0u8; 48];
            e[0] = *k;
            e[1] = *bit;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
            data.extend_from_slice(&e);
        }
        Extension {
            kind: EXT_FEATURE_TABLE,
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: 0,
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            extensions: vec![
                Header::qemu_feature_table(),
                Extension {
                    kind: 0x1234_5678,
                    data: vec![1, 2, 3],
                },
            ],
        }
    }

    #[test]
    fn roundtrip() {
        let h = sample();
        let b = h.to_cluster().unwrap();
        let p = Header::parse(&b, 4 << 16).unwrap();
        assert_eq!(p, h);
        assert!(h.used_len() <= b.len());
        assert_eq!(&b[h.used_len() - 8..h.used_len()], b"base.raw");
    }

    #[test]
    fn unknown_incompatible_bit_is_named() {
        let mut h = sample();
        h.incompatible = 1 << 7 | INCOMPAT_EXTENDED_L2;
        let mut ext = [0u8; 48];
        ext[1] = 7;
        ext[2..8].copy_from_slice(b"warp-9");
        h.extensions.push(Extension {
            kind: EXT_FEATURE_TABLE,
            data: ext.to_vec(),
        });
        let e = Header::parse(&h.to_cluster().unwrap(), 4 << 16).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("bit 7 (warp-9)"), "{s}");
        assert!(s.contains("bit 4 (extended L2 entries)"), "{s}");
    }

    #[test]
    fn rejects_bad_tables() {
        let mut h = sample();
        h.l1_table_offset = 0;
        assert!(Header::parse(&h.to_cluster().unwrap(), 4 << 16).is_err());
        let mut h = sample();
        h.l1_table_offset = 100 << 16;
        assert!(Header::parse(&h.to_cluster().unwrap(), 4 << 16).is_err());
        let mut h = sample();
        h.l1_table_offset = h.refcount_table_offset;
        assert!(Header::parse(&h.to_cluster().unwrap(), 4 << 16).is_err());
        let mut h = sample();
        h.l1_size = 1;
        assert!(Header::parse(&h.to_cluster().unwrap(), 4 << 16).is_err());
        let mut h = sample();
        h.cluster_bits = 30;
        let mut b = sample().to_cluster().unwrap();
        put32(&mut b, 20, 30);
        assert!(Header::parse(&b, 4 << 16).is_err());
    }

    #[test]
    fn truncated_and_garbage_never_panic() {
        let b = sample().to_cluster().unwrap();
        for n in 0..200 {
            let _ = Header::parse(&b[..n], n as u64);
        }
        let mut g = b.clone();
        for i in 0..g.len().min(512) {
            g[i] ^= 0xff;
            let _ = Header::parse(&g, 4 << 16);
            g[i] ^= 0xff;
        }
    }
}
