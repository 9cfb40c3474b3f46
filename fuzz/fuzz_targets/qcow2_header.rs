//! The qcow2 header and its extensions from outside bytes
//! (`bdev::qcow2::format::Header::parse`): never a panic; what parses writes
//! back (`to_cluster`) as bytes that parse to the same header; the plan of
//! a header change from these bytes as the old header
//! (`plan_update`) never panics, and its head is one sector or the cluster.
#![no_main]

use bdev::qcow2::format::{plan_update, used_ranges, Header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = used_ranges(data);
    // The first 8 bytes choose the extent (the file's length) the header is
    // checked against; the rest is the header cluster.
    if data.len() < 8 {
        return;
    }
    let extent = u64::from_le_bytes(data[..8].try_into().unwrap()) >> (data[0] & 31);
    let buf = &data[8..];
    let Ok(h) = Header::parse(buf, extent) else {
        return;
    };
    let Ok(cluster) = h.to_cluster() else {
        return;
    };
    let again = Header::parse(&cluster, extent).expect("a written header parses");
    assert_eq!(again.backing_file, h.backing_file);
    assert_eq!(again.backing_format, h.backing_format);
    assert_eq!(again.size, h.size);
    assert_eq!(again.l1_table_offset, h.l1_table_offset);
    assert_eq!(
        again.to_cluster().expect("again"),
        cluster,
        "a second write differs"
    );
    if buf.len() == cluster.len() {
        if let Ok(p) = plan_update(buf, &h, 512) {
            assert!(p.head.len() == 512 || p.head.len() == cluster.len());
        }
    }
});
