//! How QEMU names the nodes `blockdev-add` made ([`graph::qemu_name`]): a
//! file node by its path and driver (`file`, `host_device`), a raw node by
//! its file, a null node by the options it was given (so that its `json:`
//! name is QEMU's, `null-co://` when it was given none).

use super::spec::Driver;
use super::state;
use bdev::device::Device;
use bdev::uring::UringBdev;
use bdev::Bdev;
use graph::qemu_name::{self, QemuNode};
use serde_json::Value;
use std::sync::Arc;

/// The describer installed for [`graph::qemu_name`]; `None` for bdevs that
/// are not `blockdev-add` nodes, and for qcow2 nodes (described as images).
pub fn describe(g: &graph::Graph, b: &Arc<dyn Bdev>) -> Option<QemuNode> {
    let driver = state::driver_of(g, b.name())?;
    let args = state::args_of(g, b.name()).unwrap_or(Value::Null);
    match driver {
        Driver::File | Driver::HostDevice => {
            let filename = args
                .get("filename")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| {
                    let u = b.as_any().downcast_ref::<UringBdev>()?;
                    Some(u.path().display().to_string())
                })?;
            Some(qemu_name::protocol(driver.as_str(), filename))
        }
        Driver::Raw => {
            let root = Device::from_bdev(b)?.root();
            Some(QemuNode::Format {
                driver: "raw".into(),
                file: Box::new(qemu_name::describe_file_child(&root)),
            })
        }
        Driver::NullCo => {
            // QEMU's null-co keeps the strong options it was given.
            let opts = ["size", "read-zeroes"]
                .into_iter()
                .filter_map(|k| Some((k, args.get(k)?.clone())));
            Some(qemu_name::options("null-co", opts))
        }
        Driver::Nbd => Some(qemu_name::protocol("nbd", b.filename()?)),
        Driver::Rbd => Some(qemu_name::protocol("rbd", b.filename()?)),
        Driver::Throttle => {
            let t = b.as_any().downcast_ref::<bdev::throttle::ThrottleBdev>()?;
            Some(QemuNode::Format {
                driver: "throttle".into(),
                file: Box::new(qemu_name::describe_file_child(t.child())),
            })
        }
        Driver::Qcow2 => None,
    }
}
