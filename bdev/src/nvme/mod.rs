//! A userspace NVMe driver over VFIO, in SPDK's manner.
//!
//! Layers, bottom up:
//! - [`spec`]: register offsets, command and completion layouts, status codes.
//! - [`regs::RegisterIo`] and [`mem::DmaSpace`]: the seams to the hardware
//!   (a mapped BAR and the IOMMU through [`vfio`], or plain memory and identity
//!   addresses for the software controller in `fake`, a test device built only
//!   with the `test-fake` feature: tests and examples enable it, the production
//!   library does not contain it).
//! - [`queue::QueuePair`]: rings, command building, PRP lists, splitting by MDTS,
//!   bounce buffers, phase-bit completions, doorbell batching, timeouts.
//! - [`ctrlr::Controller`]: enable/reset/shutdown, admin queue, identify,
//!   one I/O queue pair per reactor, abort and reset on timeouts.
//! - `host` (per reactor) and [`bdev::NvmeBdev`]: the lock-free per-reactor
//!   channel and poller, and each namespace as a bdev `NAMEnN`.
//! - [`attach`]: the table of controllers behind the `bdev_nvme_*` RPCs
//!   ([`NvmeControllers`], owned by the service and passed explicitly).

pub mod attach;
pub mod bdev;
pub mod ctrlr;
pub mod error;
#[cfg(feature = "test-fake")]
pub mod fake;
mod host;
pub mod identify;
pub mod mem;
pub mod pci;
pub mod queue;
pub mod regs;
pub mod spec;
pub mod vfio;

pub use attach::{ControllerInfo, NvmeControllers};
pub use ctrlr::{Controller, CtrlrOpts, CtrlrState};
pub use error::NvmeError;
