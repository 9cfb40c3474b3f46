//! Decoding the Identify Controller and Identify Namespace data structures.

use serde::Serialize;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches([' ', '\0'])
        .to_string()
}

fn u16_at(p: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([p[o], p[o + 1]])
}

fn u32_at(p: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]])
}

fn u64_at(p: &[u8], o: usize) -> u64 {
    u32_at(p, o) as u64 | (u32_at(p, o + 4) as u64) << 32
}

/// What the driver uses of Identify Controller (CNS 01h).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CtrlrData {
    /// PCI vendor id.
    pub vid: u16,
    /// Serial number.
    pub sn: String,
    /// Model number.
    pub mn: String,
    /// Firmware revision.
    pub fr: String,
    /// Controller id.
    pub cntlid: u16,
    /// Maximum data transfer size (log2 of units of the minimum page size; 0: no limit).
    pub mdts: u8,
    /// Number of namespaces.
    pub nn: u32,
    /// Optional NVM command support (bit 2: dataset management, bit 3: write zeroes).
    pub oncs: u16,
    /// Volatile write cache present.
    pub vwc: bool,
}

impl CtrlrData {
    /// Decodes the 4096-byte page.
    pub fn parse(p: &[u8; 4096]) -> Self {
        Self {
            vid: u16_at(p, 0),
            sn: text(&p[4..24]),
            mn: text(&p[24..64]),
            fr: text(&p[64..72]),
            mdts: p[77],
            cntlid: u16_at(p, 78),
            nn: u32_at(p, 516),
            oncs: u16_at(p, 520),
            vwc: p[525] & 1 == 1,
        }
    }
    /// Whether Dataset Management (deallocate) is supported.
    pub fn supports_dsm(&self) -> bool {
        self.oncs & (1 << 2) != 0
    }
    /// Whether Write Zeroes is supported.
    pub fn supports_write_zeroes(&self) -> bool {
        self.oncs & (1 << 3) != 0
    }
}

/// An LBA format of a namespace.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct LbaFormat {
    /// Metadata bytes per block.
    pub ms: u16,
    /// log2 of the data block size.
    pub lbads: u8,
}

/// What the driver uses of Identify Namespace (CNS 00h).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NsData {
    /// Namespace id.
    pub nsid: u32,
    /// Size in blocks.
    pub nsze: u64,
    /// Capacity in blocks.
    pub ncap: u64,
    /// Index of the format in use.
    pub flbas: u8,
    /// Every LBA format the namespace supports.
    pub lbafs: Vec<LbaFormat>,
}

impl NsData {
    /// Decodes the 4096-byte page of namespace `nsid`.
    pub fn parse(nsid: u32, p: &[u8; 4096]) -> Self {
        let nlbaf = p[25] as usize + 1;
        let lbafs = (0..nlbaf.min(64))
            .map(|i| {
                let v = u32_at(p, 128 + 4 * i);
                LbaFormat {
                    ms: v as u16,
                    lbads: (v >> 16) as u8,
                }
            })
            .collect();
        let flbas = (p[26] & 0xf) | ((p[26] >> 5) & 3) << 4;
        Self {
            nsid,
            nsze: u64_at(p, 0),
            ncap: u64_at(p, 8),
            flbas,
            lbafs,
        }
    }
    /// The format in use.
    pub fn format(&self) -> Option<LbaFormat> {
        self.lbafs.get(self.flbas as usize).copied()
    }
}

/// Active namespace ids from an Identify CNS 02h page.
pub fn active_ns_list(p: &[u8; 4096]) -> Vec<u32> {
    (0..1024)
        .map(|i| u32_at(p, i * 4))
        .take_while(|&id| id != 0)
        .collect()
}
