//! L1 and L2 entries and refcount blocks from outside bytes
//! (`bdev::qcow2::format`): decoding never panics; a refcount written with
//! `set` reads back with `get` and leaves the other entries alone.
#![no_main]

use bdev::qcow2::format::{L1Entry, L2Entry, RefcountFormat};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let cluster_bits = 9 + (data[0] as u32 % 13);
    let version = 2 + (data[0] as u32 >> 7);
    let order = data[1] as u32 % 7;
    let rest = &data[2..];
    for w in rest.chunks_exact(8) {
        let v = u64::from_be_bytes(w.try_into().unwrap());
        let _ = L1Entry(v).validate(1 << cluster_bits);
        let _ = L1Entry(v).l2_offset();
        let _ = L2Entry(v).decode(version, cluster_bits);
    }
    let f = RefcountFormat {
        order,
        cluster_bits,
    };
    let cs = 1u64 << cluster_bits;
    let mut block = rest.to_vec();
    block.resize(cs as usize, 0);
    let n = f.block_entries();
    let _ = f.split(u64::from_be_bytes(block[..8].try_into().unwrap()));
    let before: Vec<u64> = (0..n.min(64)).map(|i| f.get(&block, i)).collect();
    let i = (rest.len() as u64 * 7) % n;
    let v = rest.first().copied().unwrap_or(1) as u64 & f.max();
    if f.set(&mut block, i, v).is_ok() {
        assert_eq!(f.get(&block, i), v, "refcount {i} does not read back");
        for (j, b) in before.iter().enumerate() {
            if j as u64 != i {
                assert_eq!(f.get(&block, j as u64), *b, "set({i}) changed entry {j}");
            }
        }
    }
});
