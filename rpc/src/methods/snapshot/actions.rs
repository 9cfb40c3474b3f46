//! The snapshot actions, each under the caller's [`graph::Graph::change`]
//! and returning what undoes it ([`SnapshotUndo`]): shared by the snapshot
//! commands (`snapshot.rs`) and `transaction` (`transaction.rs`).

use crate::error::RpcError;
use crate::methods::blockdev::snapshot::{
    snapshot_existing_plain, snapshot_plain_node, undo_plain,
};
use crate::service::Service;
use crate::ErrorClass;
use graph::snapshot::{self, SnapshotMode, SnapshotRequest, SnapshotUndo};
use graph::ChangeGuard;
use serde::Deserialize;

/// A snapshot of a device under the caller's change lock.
pub(super) fn run_locked(
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

pub(super) fn run(svc: &Service, req: SnapshotRequest) -> Result<(), RpcError> {
    let g = svc.graph.change();
    run_locked(svc, &g, req).map(|_| ())
}

/// Undoes one snapshot (a failed transaction), under the change lock.
pub(super) fn undo(svc: &Service, u: &SnapshotUndo) -> Result<(), RpcError> {
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

pub(super) fn check_format(format: &Option<String>, class: ErrorClass) -> Result<(), RpcError> {
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
pub(super) struct Sync {
    pub(super) device: Option<String>,
    pub(super) node_name: Option<String>,
    pub(super) snapshot_file: String,
    pub(super) snapshot_node_name: Option<String>,
    pub(super) format: Option<String>,
    pub(super) mode: Option<String>,
}

/// `blockdev-snapshot-sync` under the caller's change lock.
pub(super) fn sync_locked(
    svc: &Service,
    g: &ChangeGuard<'_>,
    a: Sync,
) -> Result<SnapshotUndo, RpcError> {
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
pub(super) struct Existing {
    pub(super) node: String,
    pub(super) overlay: String,
}

/// `blockdev-snapshot` under the caller's change lock.
pub(super) fn existing_locked(
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
