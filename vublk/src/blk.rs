//! virtio-blk as the virtio 1.2 spec (section 5.2) defines it: feature bits,
//! the configuration space, request types and statuses. Pure data, no I/O.

/// Sector size of virtio-blk addresses and the capacity field.
pub const SECTOR: u64 = 512;

/// Feature bits (virtio 1.2 5.2.3, 6; vhost-user).
pub mod feature {
    /// Maximum number of segments in a request (`seg_max`).
    pub const SEG_MAX: u64 = 1 << 2;
    /// The device is read-only.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Flush is supported.
    pub const FLUSH: u64 = 1 << 9;
    /// Topology fields are valid.
    pub const TOPOLOGY: u64 = 1 << 10;
    /// The driver may switch the cache mode (`writeback`).
    pub const CONFIG_WCE: u64 = 1 << 11;
    /// Several queues (`num_queues`).
    pub const MQ: u64 = 1 << 12;
    /// Discard is supported.
    pub const DISCARD: u64 = 1 << 13;
    /// Write-zeroes is supported.
    pub const WRITE_ZEROES: u64 = 1 << 14;
    /// Indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// `used_event` / `avail_event` notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// vhost-user: protocol features may be negotiated.
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    /// virtio 1.0 (little-endian, modern).
    pub const VERSION_1: u64 = 1 << 32;
}

/// Request types (virtio 1.2 5.2.6).
pub mod req {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// The device's id string.
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Request statuses.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Failure.
    pub const IOERR: u8 = 1;
    /// Request type not supported.
    pub const UNSUPP: u8 = 2;
}

/// Length of the id `GET_ID` returns.
pub const ID_BYTES: usize = 20;
/// Largest discard / write-zeroes, in sectors (QEMU's limits).
pub const MAX_DISCARD_SECTORS: u32 = 32768;
/// Largest write-zeroes, in sectors.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 32768;
/// The largest queue the device takes (QEMU's `VIRTQUEUE_MAX_SIZE`).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most segments in one request (`seg_max`; qemu-storage-daemon's 128 - 2).
pub const SEG_MAX: u32 = 126;
/// Write-zeroes flag: the device may unmap.
pub const WZ_FLAG_UNMAP: u32 = 1;
/// Offset of `writeback` in the configuration space.
pub const CONFIG_WRITEBACK: usize = 32;
/// Size of the configuration space this device fills (through
/// `write_zeroes_may_unmap` and its padding); reads beyond return zeroes.
pub const CONFIG_LEN: usize = 60;

/// The features offered for an export.
pub fn device_features(writable: bool, discard: bool, write_zeroes: bool) -> u64 {
    use feature::*;
    let mut f = SEG_MAX
        | BLK_SIZE
        | FLUSH
        | TOPOLOGY
        | CONFIG_WCE
        | MQ
        | RING_INDIRECT_DESC
        | RING_EVENT_IDX
        | PROTOCOL_FEATURES
        | VERSION_1;
    if !writable {
        f |= RO;
    }
    if writable && discard {
        f |= DISCARD;
    }
    if writable && write_zeroes {
        f |= WRITE_ZEROES;
    }
    f
}

/// The configuration space (`struct virtio_blk_config`, little-endian).
pub fn config_space(
    size: u64,
    blk_size: u32,
    num_queues: u16,
    writeback: bool,
) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let put =
        |c: &mut [u8; CONFIG_LEN], at: usize, b: &[u8]| c[at..at + b.len()].copy_from_slice(b);
    put(&mut c, 0, &(size / SECTOR).to_le_bytes()); // capacity
    put(&mut c, 12, &SEG_MAX.to_le_bytes());
    put(&mut c, 20, &blk_size.to_le_bytes()); // blk_size
    put(&mut c, 26, &1u16.to_le_bytes()); // min_io_size
    put(&mut c, 28, &1u32.to_le_bytes()); // opt_io_size
    c[CONFIG_WRITEBACK] = u8::from(writeback);
    put(&mut c, 34, &num_queues.to_le_bytes());
    put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(&mut c, 40, &1u32.to_le_bytes()); // max_discard_seg
    put(&mut c, 44, &(blk_size / SECTOR as u32).max(1).to_le_bytes()); // discard_sector_alignment
    put(&mut c, 48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
    put(&mut c, 52, &1u32.to_le_bytes()); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_fields_sit_where_the_spec_puts_them() {
        let c = config_space(1 << 30, 4096, 3, true);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 3);
        assert_eq!(c[CONFIG_WRITEBACK], 1);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
    }

    #[test]
    fn read_only_exports_offer_ro_and_no_discard() {
        let f = device_features(false, true, true);
        assert_ne!(f & feature::RO, 0);
        assert_eq!(f & (feature::DISCARD | feature::WRITE_ZEROES), 0);
    }
}
