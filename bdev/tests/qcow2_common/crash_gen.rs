//! The block generator shared by the crash test and its writer
//! (`examples/qcow2_crash_writer.rs` includes this file by path).

/// Blocks written in generation `gen` of a run with `seed`: 16 distinct
/// block indexes below `nblocks`.
pub fn blocks_of(seed: u64, gen: u64, nblocks: u64) -> Vec<u64> {
    let mut x = seed ^ gen.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::new();
    while v.len() < 16 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x % nblocks;
        if !v.contains(&b) {
            v.push(b);
        }
    }
    v
}
