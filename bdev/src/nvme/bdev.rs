//! A namespace as a bdev (`NAMEnN`, SPDK's naming).

use super::ctrlr::{Controller, Namespace};
use super::host::NvmeChannel;
use crate::bdev::{Bdev, Channel};
use crate::error::BdevError;
use crate::io::IoType;
use serde_json::{json, Value};
use std::any::Any;
use std::sync::Arc;

/// One namespace of an attached controller.
pub struct NvmeBdev {
    name: String,
    ctrlr: Arc<Controller>,
    ns: Namespace,
    primary: bool,
}

impl NvmeBdev {
    /// The bdev of namespace `ns`; `primary` makes it carry the controller's
    /// `save_config` entry (one per controller).
    pub(crate) fn new(ctrlr: Arc<Controller>, ns: Namespace, primary: bool) -> Self {
        Self {
            name: format!("{}n{}", ctrlr.name(), ns.params.nsid),
            ctrlr,
            ns,
            primary,
        }
    }

    /// The controller.
    pub fn controller(&self) -> &Arc<Controller> {
        &self.ctrlr
    }
    /// Namespace id.
    pub fn nsid(&self) -> u32 {
        self.ns.params.nsid
    }
}

impl Bdev for NvmeBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "NVMe disk"
    }
    fn block_size(&self) -> u32 {
        self.ns.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.ns.data.nsze
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        match t {
            IoType::Read | IoType::Write | IoType::Flush => true,
            IoType::Unmap => self.ctrlr.data().supports_dsm(),
            IoType::WriteZeroes => self.ctrlr.data().supports_write_zeroes(),
        }
    }
    fn create_channel(&self) -> Result<Box<dyn Channel>, BdevError> {
        Ok(Box::new(NvmeChannel::new(self.ctrlr.id(), self.ns.params)?))
    }
    fn filename(&self) -> Option<String> {
        Some(format!(
            "nvme://{}/{}",
            self.ctrlr.traddr(),
            self.ns.params.nsid
        ))
    }
    fn driver_specific(&self) -> Value {
        let d = self.ctrlr.data();
        json!({
            "nvme": [{
                "trid": {"trtype": "PCIe", "traddr": self.ctrlr.traddr()},
                "ctrlr_data": {
                    "vendor_id": format!("{:#06x}", d.vid),
                    "serial_number": d.sn,
                    "model_number": d.mn,
                    "firmware_revision": d.fr,
                    "cntlid": d.cntlid,
                    "oacs": {},
                },
                "ns_data": {"id": self.ns.params.nsid, "lba_formats": self.ns.data.lbafs, "flbas": self.ns.data.flbas},
                "max_transfer_bytes": self.ctrlr.max_xfer(),
            }]
        })
    }
    fn config(&self) -> Option<Value> {
        self.primary.then(|| {
            json!({
                "method": "bdev_nvme_attach_controller",
                "params": {"name": self.ctrlr.name(), "trtype": "PCIe", "traddr": self.ctrlr.traddr()}
            })
        })
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
