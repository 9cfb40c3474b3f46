//! Snapshots: `snapshot_blkdev` (2011), `blockdev-snapshot-sync` and
//! `blockdev-snapshot` (QEMU). The device moves onto a new qcow2 overlay whose
//! backing file is its current image; the target may be a file or a registered
//! bdev (malloc, NVMe) formatted as qcow2, which with a stream is a live copy.
//!
//! Each snapshot is an action that returns what undoes it
//! ([`SnapshotUndo`]), so that `transaction` (`transaction.rs`) runs several
//! under one [`graph::Graph::change`] and undoes the done ones when a later
//! one fails.

mod transaction;

use crate::error::RpcError;
use crate::methods::blockdev::snapshot::{
    snapshot_existing_plain, snapshot_plain_node, undo_plain,
};
use crate::service::Service;
use crate::table::{MethodTable, Params};
use crate::ErrorClass;
use graph::snapshot::{self, SnapshotMode, SnapshotRequest, SnapshotUndo};
use graph::ChangeGuard;
use serde::Deserialize;
use serde_json::{json, Value};

/// Registers the methods.
pub fn register(t: &mut MethodTable) {
    t.add("snapshot_blkdev", snapshot_blkdev);
    t.add("blockdev-snapshot-sync", blockdev_snapshot_sync);
    t.add("blockdev-snapshot", blockdev_snapshot);
    t.add("transaction", transaction::transaction);
}

/// A snapshot of a device under the caller's change lock.
fn run_locked(
    svc: &Service,
    _change: &ChangeGuard<'_>,
    req: SnapshotRequest,
) -> Result<SnapshotUndo, RpcError> {
    let (dev, owner) = snapshot::device_and_owner(&svc.graph, &req.device)?;
    let old = bdev::device::Device::from_bdev(&dev)
        .map(|d| d.root())
        .ok_or_else(|| snapshot::SnapshotError::DeviceNotFound(req.device.clone()))?;
    let perms = old.lock_perms();
    let device = req.device.clone();
    let g = svc.graph.clone();
    let name = svc
        .rt
        .spawn_on(
            owner,
            move || async move { snapshot::snapshot(&g, req).await },
        )
        .block()??;
    let overlay = svc.graph.nodes().get(&name)?;
    let mut u = SnapshotUndo::new(old, overlay, Some(device), false);
    u.perms = perms;
    Ok(u)
}

fn run(svc: &Service, req: SnapshotRequest) -> Result<(), RpcError> {
    let g = svc.graph.change();
    run_locked(svc, &g, req).map(|_| ())
}

/// Undoes one snapshot (a failed transaction), under the change lock.
fn undo(svc: &Service, u: &SnapshotUndo) -> Result<(), RpcError> {
    if u.device.is_none() {
        return undo_plain(svc, u);
    }
    let owner = graph::node::image(&u.overlay)
        .map(|i| i.owner())
        .unwrap_or(0);
    let g = svc.graph.clone();
    let u2 = u.clone();
    svc.rt
        .spawn_on(owner, move || async move { snapshot::undo(&g, &u2).await })
        .block()??;
    Ok(())
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
    let g = svc.graph.change();
    sync_locked(svc, &g, a)?;
    Ok(json!({}))
}

/// `blockdev-snapshot-sync` under the caller's change lock.
fn sync_locked(svc: &Service, g: &ChangeGuard<'_>, a: Sync) -> Result<SnapshotUndo, RpcError> {
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
                return snapshot_plain_node(
                    svc,
                    g,
                    &n,
                    &a.snapshot_file,
                    a.snapshot_node_name,
                    mode == SnapshotMode::Existing,
                );
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
    run_locked(
        svc,
        g,
        SnapshotRequest {
            device,
            target: a.snapshot_file,
            node_name: a.snapshot_node_name,
            mode,
            direct: true,
        },
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Existing {
    node: String,
    overlay: String,
}

fn blockdev_snapshot(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: Existing = p.parse()?;
    let g = svc.graph.change();
    existing_locked(svc, &g, a)?;
    Ok(json!({}))
}

/// `blockdev-snapshot` under the caller's change lock.
fn existing_locked(
    svc: &Service,
    g: &ChangeGuard<'_>,
    a: Existing,
) -> Result<SnapshotUndo, RpcError> {
    use bdev::device::Device;
    // A plain node (blockdev-add's): the overlay is linked over it and its
    // exports move onto the overlay.
    let nodes = svc.graph.nodes();
    // QEMU looks the node up, then the overlay (`bdrv_lookup_bs`).
    for n in [&a.node, &a.overlay] {
        if !nodes.contains(n) {
            return Err(RpcError::errno(
                libc::ENODEV,
                format!("Cannot find device='{n}' nor node-name='{n}'"),
            ));
        }
    }
    if let Ok(b) = nodes.get(&a.node) {
        if Device::from_bdev(&b).is_none() && Device::find_by_root(nodes, &a.node).is_none() {
            return snapshot_existing_plain(svc, g, &a.node, &a.overlay);
        }
    }
    let ov = nodes.get(&a.overlay).ok();
    let owner = ov
        .as_ref()
        .and_then(graph::node::image)
        .map(|i| i.owner())
        .unwrap_or(0);
    // What undoes it, read before the link (the device and its root).
    let dev = nodes
        .get(&a.node)
        .ok()
        .and_then(|b| match Device::from_bdev(&b) {
            Some(_) => Some(b),
            None => Device::find_by_root(nodes, &a.node),
        });
    let undo = match (&dev, &ov) {
        (Some(d), Some(ov)) => Device::from_bdev(d)
            .map(|dv| SnapshotUndo::new(dv.root(), ov.clone(), Some(d.name().to_string()), true)),
        _ => None,
    };
    let gr = svc.graph.clone();
    let (node, overlay) = (a.node.clone(), a.overlay.clone());
    svc.rt
        .spawn_on(owner, move || async move {
            snapshot::snapshot_existing_node(&gr, &node, &overlay).await
        })
        .block()??;
    undo.ok_or_else(|| RpcError::internal("snapshot taken without its device"))
}
