//! Errors of the NVMe driver's control path.

use thiserror::Error;

/// What went wrong attaching, resetting or talking to a controller.
#[derive(Debug, Error)]
pub enum NvmeError {
    /// No PCI device at the address.
    #[error("no PCI device at {0} (see `lspci -D`)")]
    NoDevice(String),
    /// The device is not an NVMe controller.
    #[error("PCI device {addr} is not an NVMe controller (class {class:#08x}, expected 0x010802)")]
    NotNvme { addr: String, class: u32 },
    /// The device is not bound to vfio-pci.
    #[error("PCI device {addr} is bound to {driver:?}, not vfio-pci: run `scripts/setup.sh` (PCI_ALLOWED={addr})")]
    NotVfio { addr: String, driver: String },
    /// VFIO is not usable (no IOMMU, module missing).
    #[error("VFIO unavailable: {0}")]
    Vfio(String),
    /// A malformed transport address.
    #[error("invalid PCI address {0:?} (expected DDDD:BB:DD.F)")]
    BadAddress(String),
    /// DMA memory could not be allocated or mapped.
    #[error("DMA memory: {0}")]
    Dma(String),
    /// The controller did not reach the expected state in time.
    #[error("controller timeout: {0}")]
    Timeout(String),
    /// The controller reported a fatal status or an unusable configuration.
    #[error("controller error: {0}")]
    Controller(String),
    /// An admin command failed with this status (SCT << 8 | SC).
    #[error("admin command {opc:#04x} failed with status {status:#05x}")]
    Command { opc: u8, status: u16 },
    /// A parameter is wrong.
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    /// A controller of that name exists already.
    #[error("an NVMe controller named {0:?} already exists")]
    Exists(String),
    /// No controller of that name.
    #[error("no NVMe controller named {0:?}")]
    NotFound(String),
    /// The controller is being reset or detached.
    #[error("controller {0} is resetting or detached")]
    Busy(String),
    /// A bdev-layer error (registering namespaces).
    #[error(transparent)]
    Bdev(#[from] crate::BdevError),
}

impl NvmeError {
    /// The positive errno of this error (SPDK's RPC answers its negative).
    pub fn errno(&self) -> i32 {
        match self {
            NvmeError::NoDevice(_) | NvmeError::NotFound(_) => libc::ENODEV,
            NvmeError::NotNvme { .. } | NvmeError::BadAddress(_) | NvmeError::InvalidParam(_) => {
                libc::EINVAL
            }
            NvmeError::NotVfio { .. } | NvmeError::Busy(_) => libc::EBUSY,
            NvmeError::Vfio(_) => libc::ENXIO,
            NvmeError::Dma(_) => libc::ENOMEM,
            NvmeError::Timeout(_) => libc::ETIMEDOUT,
            NvmeError::Controller(_) | NvmeError::Command { .. } => libc::EIO,
            NvmeError::Exists(_) => libc::EEXIST,
            NvmeError::Bdev(e) => e.errno(),
        }
    }
}
