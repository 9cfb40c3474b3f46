//! Refcount widths (1 to 64 bits) and refcount block arithmetic.

use super::error::FormatError;

/// The refcount geometry of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefcountFormat {
    /// log2 of the refcount width in bits.
    pub order: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
}

impl RefcountFormat {
    /// Width of one refcount in bits.
    pub fn bits(self) -> u32 {
        1 << self.order
    }
    /// Largest refcount value.
    pub fn max(self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << self.bits()) - 1
        }
    }
    /// Refcounts in one refcount block.
    pub fn block_entries(self) -> u64 {
        (1u64 << (self.cluster_bits + 3)) >> self.order
    }
    /// Bytes covered (as guest-visible clusters) by one refcount block.
    pub fn block_coverage(self) -> u64 {
        self.block_entries() << self.cluster_bits
    }
    /// Refcount table index and index within the block for a cluster index.
    pub fn split(self, cluster: u64) -> (u64, u64) {
        (
            cluster / self.block_entries(),
            cluster % self.block_entries(),
        )
    }

    /// Reads refcount `i` of a block.
    pub fn get(self, block: &[u8], i: u64) -> u64 {
        let bits = self.bits() as u64;
        if bits >= 8 {
            let w = (bits / 8) as usize;
            let p = i as usize * w;
            block[p..p + w]
                .iter()
                .fold(0u64, |a, &b| (a << 8) | b as u64)
        } else {
            let bitpos = i * bits;
            let byte = block[(bitpos / 8) as usize];
            ((byte >> (bitpos % 8)) as u64) & ((1 << bits) - 1)
        }
    }

    /// Writes refcount `i` of a block (the value must fit).
    pub fn set(self, block: &mut [u8], i: u64, v: u64) -> Result<(), FormatError> {
        if v > self.max() {
            return Err(FormatError::Corrupt(format!(
                "refcount {v} overflows {} bits",
                self.bits()
            )));
        }
        let bits = self.bits() as u64;
        if bits >= 8 {
            let w = (bits / 8) as usize;
            let p = i as usize * w;
            let be = v.to_be_bytes();
            block[p..p + w].copy_from_slice(&be[8 - w..]);
        } else {
            let bitpos = i * bits;
            let idx = (bitpos / 8) as usize;
            let sh = bitpos % 8;
            let mask = (((1u16 << bits) - 1) as u8) << sh;
            block[idx] = (block[idx] & !mask) | (((v as u8) << sh) & mask);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_widths_roundtrip() {
        for order in 0..=6 {
            let f = RefcountFormat {
                order,
                cluster_bits: 9,
            };
            let mut blk = vec![0u8; 512];
            assert_eq!(f.block_entries(), 4096 >> order);
            for i in 0..f.block_entries() {
                f.set(&mut blk, i, (i * 7 + 1) & f.max()).unwrap();
            }
            for i in 0..f.block_entries() {
                assert_eq!(f.get(&blk, i), (i * 7 + 1) & f.max(), "order {order} i {i}");
            }
            if order < 6 {
                assert!(f.set(&mut blk, 0, f.max() + 1).is_err());
            }
        }
    }

    #[test]
    fn sixteen_bit_layout_is_big_endian() {
        let f = RefcountFormat {
            order: 4,
            cluster_bits: 16,
        };
        let mut blk = vec![0u8; 65536];
        f.set(&mut blk, 1, 0x0102).unwrap();
        assert_eq!(&blk[2..4], &[1, 2]);
    }

    #[test]
    fn sub_byte_widths_fill_from_the_low_bits() {
        // qcow2.txt: bit order within a byte is from the least significant bit.
        let f = RefcountFormat {
            order: 0,
            cluster_bits: 9,
        };
        let mut blk = vec![0u8; 512];
        f.set(&mut blk, 0, 1).unwrap();
        f.set(&mut blk, 3, 1).unwrap();
        assert_eq!(blk[0], 0b1001);
    }
}
