//! The layout of a freshly created image, as `qemu-img create -f qcow2` makes it:
//! header cluster, refcount table, refcount blocks, then the L1 table.

use super::error::FormatError;
use super::header::{
    Header, COMPRESSION_ZSTD, INCOMPAT_COMPRESSION, MAX_BACKING_NAME, MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
};
use super::refcount::RefcountFormat;

/// Where everything of a new image goes.
#[derive(Debug, Clone)]
pub struct CreateLayout {
    /// The header to write into cluster 0.
    pub header: Header,
    /// Host offsets of the refcount blocks (in refcount table order).
    pub refblocks: Vec<u64>,
    /// Clusters used by the new image (all with refcount 1), from cluster 0.
    pub clusters: u64,
}

impl CreateLayout {
    /// Bytes the new image occupies.
    pub fn image_len(&self) -> u64 {
        self.clusters << self.header.cluster_bits
    }
}

/// Plans a new image. `version` 2 or 3; `refcount_order` 0..=6 (v2 needs 4).
pub fn plan_create(
    size: u64,
    cluster_bits: u32,
    version: u32,
    refcount_order: u32,
    compression_type: u8,
    backing_file: Option<&str>,
    backing_format: Option<&str>,
) -> Result<CreateLayout, FormatError> {
    let bad = |m: &str| FormatError::BadHeader(m.to_string());
    if !(9..=21).contains(&cluster_bits) {
        return Err(bad(
            "cluster size must be a power of two between 512 B and 2 MiB",
        ));
    }
    if version != 2 && version != 3 {
        return Err(FormatError::BadVersion(version));
    }
    if refcount_order > 6 || (version == 2 && refcount_order != 4) {
        return Err(bad("refcount width must be 1..64 bits (16 for version 2)"));
    }
    if compression_type == COMPRESSION_ZSTD && version == 2 {
        return Err(bad("zstd compression needs version 3"));
    }
    if backing_file.is_some_and(|b| b.len() > MAX_BACKING_NAME || b.is_empty()) {
        return Err(bad("backing file name must be 1..1023 bytes"));
    }
    if backing_format.is_some() && backing_file.is_none() {
        return Err(bad("a backing format needs a backing file"));
    }
    let cs = 1u64 << cluster_bits;
    let l1_entries = Header::l1_entries_for(size, cluster_bits);
    if l1_entries * 8 > MAX_L1_BYTES {
        return Err(bad("image too large for this cluster size"));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let rf = RefcountFormat {
        order: refcount_order,
        cluster_bits,
    };
    let mut t = 1u64;
    let mut b = 1u64;
    loop {
        let total = 1 + t + b + l1_clusters;
        let nb = total.div_ceil(rf.block_entries());
        let nt = (nb * 8).div_ceil(cs);
        if nb == b && nt == t {
            break;
        }
        b = nb.max(1);
        t = nt.max(1);
    }
    if t * cs > MAX_REFTABLE_BYTES {
        return Err(bad("refcount table would be too large"));
    }
    let reftable = cs;
    let refblocks: Vec<u64> = (0..b).map(|i| (1 + t + i) * cs).collect();
    let l1_off = (1 + t + b) * cs;
    let header = Header {
        version,
        cluster_bits,
        size,
        l1_size: l1_entries as u32,
        l1_table_offset: if l1_entries > 0 { l1_off } else { 0 },
        refcount_table_offset: reftable,
        refcount_table_clusters: t as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: if compression_type == COMPRESSION_ZSTD {
            INCOMPAT_COMPRESSION
        } else {
            0
        },
        compatible: 0,
        autoclear: 0,
        refcount_order,
        header_length: if version == 3 { 112 } else { 72 },
        compression_type,
        backing_file: backing_file.map(str::to_string),
        backing_format: backing_format.map(str::to_string),
        extensions: vec![Header::qemu_feature_table()],
    };
    let mut header = header;
    if header.to_cluster().is_err() {
        // The feature name table is informative: small clusters leave no room for it
        // next to a backing file name.
        header.extensions.clear();
    }
    header.to_cluster()?;
    Ok(CreateLayout {
        header,
        refblocks,
        clusters: 1 + t + b + l1_clusters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_matches_qemu_img() {
        let l = plan_create(1 << 30, 16, 3, 4, 0, None, None).unwrap();
        assert_eq!(l.header.refcount_table_offset, 0x10000);
        assert_eq!(l.refblocks, vec![0x20000]);
        assert_eq!(l.header.l1_table_offset, 0x30000);
        assert_eq!(l.header.l1_size, 2);
        assert_eq!(l.clusters, 4);
        let b = l.header.to_cluster().unwrap();
        assert_eq!(Header::parse(&b, l.image_len()).unwrap(), l.header);
    }

    #[test]
    fn small_clusters_need_many_refblocks() {
        let l = plan_create(1 << 30, 9, 3, 4, 0, Some("b.qcow2"), Some("qcow2")).unwrap();
        let rf = RefcountFormat {
            order: 4,
            cluster_bits: 9,
        };
        assert!(l.refblocks.len() as u64 * rf.block_entries() >= l.clusters);
        assert!(l.header.refcount_table_clusters as u64 * 64 >= l.refblocks.len() as u64);
        let b = l.header.to_cluster().unwrap();
        assert_eq!(
            Header::parse(&b, l.image_len())
                .unwrap()
                .backing_file
                .as_deref(),
            Some("b.qcow2")
        );
    }

    #[test]
    fn refuses_absurd() {
        assert!(plan_create(u64::MAX, 9, 3, 4, 0, None, None).is_err());
        assert!(plan_create(1 << 20, 8, 3, 4, 0, None, None).is_err());
        assert!(plan_create(1 << 20, 16, 2, 3, 0, None, None).is_err());
    }
}
