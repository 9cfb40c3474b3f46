//! Snapshots: `snapshot_blkdev` (2011), `blockdev-snapshot-sync` and
//! `blockdev-snapshot` (QEMU). The device moves onto a new qcow2 overlay whose
//! backing file is its current image; the target may be a file or a registered
//! bdev (malloc, NVMe) formatted as qcow2, which with a stream is a live copy.

use crate::error::RpcError;
use crate::methods::blockdev::snapshot::{snapshot_existing_plain, snapshot_plain_node};
use crate::service::Service;
use crate::table::{MethodTable, Params};
use crate::ErrorClass;
use graph::snapshot::{self, SnapshotMode, SnapshotRequest};
use serde::Deserialize;
use serde_json::{json, Value};

/// Registers the methods.
pub fn register(t: &mut MethodTable) {
    t.add("snapshot_blkdev", snapshot_blkdev);
    t.add("blockdev-snapshot-sync", blockdev_snapshot_sync);
    t.add("blockdev-snapshot", blockdev_snapshot);
}

fn run(svc: &Service, req: SnapshotRequest) -> Result<String, RpcError> {
    let _g = svc.graph.change();
    let (_, owner) = snapshot::device_and_owner(&svc.graph, &req.device)?;
    let g = svc.graph.clone();
    Ok(svc
        .rt
        .spawn_on(
            owner,
            move || async move { snapshot::snapshot(&g, req).await },
        )
        .block()??)
}

fn check_format(format: &Option<String>, class: ErrorClass) -> Result<(), RpcError> {
    match format.as_deref() {
        None | Some("qcow2") => Ok(()),
        Some(f) => Err(RpcError::errno(
            libc::ENOTSUP,
            format!("snapshot format '{f}' is not supported (only qcow2)"),
        )
        .with_class(class)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Blkdev {
    device: String,
    snapshot_file: String,
    format: Option<String>,
}

fn snapshot_blkdev(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: Blkdev = p.parse()?;
    check_format(&a.format, ErrorClass::NotSupported)?;
    run(
        svc,
        SnapshotRequest {
            device: a.device,
            target: a.snapshot_file,
            direct: true,
            ..Default::default()
        },
    )?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Sync {
    device: Option<String>,
    node_name: Option<String>,
    snapshot_file: String,
    snapshot_node_name: Option<String>,
    format: Option<String>,
    mode: Option<String>,
}

fn blockdev_snapshot_sync(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: Sync = p.parse()?;
    check_format(&a.format, ErrorClass::GenericError)?;
    let mode = match a.mode.as_deref() {
        None | Some("absolute-paths") => SnapshotMode::Create,
        Some("existing") => SnapshotMode::Existing,
        Some(m) => {
            return Err(RpcError::invalid_params(format!(
                "Parameter 'mode' does not accept value '{m}'"
            )))
        }
    };
    // A node name designates the device whose root it is.
    let device = match (a.device, a.node_name) {
        (Some(d), _) => d,
        (None, Some(n)) => match bdev::device::Device::find_by_root(svc.graph.nodes(), &n) {
            Some(d) => d.name().to_string(),
            // A plain node (blockdev-add's): the overlay becomes a node over it.
            None if svc.graph.nodes().contains(&n)
                && bdev::device::Device::from_bdev(&svc.graph.nodes().get(&n)?).is_none() =>
            {
                snapshot_plain_node(
                    svc,
                    &n,
                    &a.snapshot_file,
                    a.snapshot_node_name,
                    mode == SnapshotMode::Existing,
                )?;
                return Ok(json!({}));
            }
            None if svc.graph.nodes().contains(&n) => {
                return Err(RpcError::invalid_params(format!(
                    "Node '{n}' is not the root of a device"
                )))
            }
            None => {
                return Err(RpcError::errno(
                    libc::ENODEV,
                    format!("Cannot find device='' nor node-name='{n}'"),
                ))
            }
        },
        (None, None) => {
            return Err(RpcError::invalid_params(
                "Cannot find device='' nor node-name=''",
            ))
        }
    };
    run(
        svc,
        SnapshotRequest {
            device,
            target: a.snapshot_file,
            node_name: a.snapshot_node_name,
            mode,
            direct: true,
        },
    )?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Existing {
    node: String,
    overlay: String,
}

fn blockdev_snapshot(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: Existing = p.parse()?;
    // A plain node (blockdev-add's): the overlay is linked over it and its
    // exports move onto the overlay.
    if let Ok(b) = svc.graph.nodes().get(&a.node) {
        if bdev::device::Device::from_bdev(&b).is_none()
            && bdev::device::Device::find_by_root(svc.graph.nodes(), &a.node).is_none()
        {
            snapshot_existing_plain(svc, &a.node, &a.overlay)?;
            return Ok(json!({}));
        }
    }
    let owner = svc
        .graph
        .nodes()
        .get(&a.overlay)
        .ok()
        .and_then(|b| graph::node::image(&b))
        .map(|i| i.owner())
        .unwrap_or(0);
    let g = svc.graph.clone();
    let _c = svc.graph.change();
    svc.rt
        .spawn_on(owner, move || async move {
            snapshot::snapshot_existing_node(&g, &a.node, &a.overlay).await
        })
        .block()??;
    Ok(json!({}))
}
