//! Verify patterns: every 512-byte sector carries its own byte offset, the
//! write's generation and a job seed, followed by bytes derived from all three,
//! so a read of stale, misplaced or corrupted data is caught and located.

/// Granularity of the pattern.
pub const SECTOR: usize = 512;

#[inline]
fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser: every input bit affects every output bit.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Fills `buf` (written at byte `offset` of the bdev) with the pattern of `gen`.
pub fn fill(buf: &mut [u8], offset: u64, gen: u64, seed: u64) {
    for (i, sector) in buf.chunks_mut(SECTOR).enumerate() {
        let off = offset + (i * SECTOR) as u64;
        fill_sector(sector, off, gen, seed);
    }
}

fn fill_sector(s: &mut [u8], off: u64, gen: u64, seed: u64) {
    let mut state = mix(off ^ mix(gen ^ mix(seed)));
    for (w, chunk) in s.chunks_mut(8).enumerate() {
        let v = match w {
            0 => off,
            1 => gen,
            2 => seed,
            _ => {
                state = mix(state.wrapping_add(0x9e37_79b9_7f4a_7c15));
                state
            }
        };
        let b = v.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// The first difference between `buf` (read at byte `offset`) and the pattern of `gen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Byte offset on the bdev of the first wrong byte.
    pub offset: u64,
    /// Up to 16 expected bytes from there.
    pub expected: Vec<u8>,
    /// The bytes read.
    pub actual: Vec<u8>,
}

/// Checks `buf` against the pattern; `scratch` is reused to avoid allocation.
pub fn check(
    buf: &[u8],
    offset: u64,
    gen: u64,
    seed: u64,
    scratch: &mut Vec<u8>,
) -> Option<Mismatch> {
    scratch.resize(SECTOR, 0);
    for (i, sector) in buf.chunks(SECTOR).enumerate() {
        let off = offset + (i * SECTOR) as u64;
        let want = &mut scratch[..sector.len()];
        fill_sector(want, off, gen, seed);
        if want != sector {
            let at = want
                .iter()
                .zip(sector)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let end = (at + 16).min(sector.len());
            return Some(Mismatch {
                offset: off + at as u64,
                expected: want[at..end].to_vec(),
                actual: sector[at..end].to_vec(),
            });
        }
    }
    None
}

/// Hex of a few bytes, space separated.
pub fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_detection() {
        let mut b = vec![0u8; 4096];
        fill(&mut b, 8192, 7, 1);
        let mut s = Vec::new();
        assert_eq!(check(&b, 8192, 7, 1, &mut s), None);
        assert!(check(&b, 8192, 8, 1, &mut s).is_some(), "other generation");
        let m = check(&b, 0, 7, 1, &mut s).unwrap();
        assert!(
            m.offset < 8,
            "misplaced data is caught in the offset header ({})",
            m.offset
        );
        b[1000] ^= 1;
        let m = check(&b, 8192, 7, 1, &mut s).unwrap();
        assert_eq!(m.offset, 8192 + 1000);
        assert_eq!(m.expected[0] ^ 1, m.actual[0]);
        let zero = vec![0u8; 512];
        assert!(check(&zero, 0, 1, 1, &mut s).is_some(), "zeroes never pass");
    }
}
