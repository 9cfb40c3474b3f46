//! Snapshots of plain nodes (nodes that are no device's root: made by
//! `blockdev-add`, say), as qemu-storage-daemon takes them:
//! `blockdev-snapshot-sync {node-name}` creates a qcow2 overlay over the node
//! and adds it as `blockdev-add` would (the monitor owns it);
//! `blockdev-snapshot {node, overlay}` links an overlay the user added.
//!
//! Then, as QEMU's `bdrv_append` moves the node's parents onto the overlay,
//! every NBD export of the node (a hidden device over it) is moved onto the
//! overlay with a quiesced root swap: clients stay connected and their next
//! requests land in the overlay. Other users of the node (another node's
//! backing link, a device's root) cannot be moved by sluice, so the snapshot
//! is refused while they exist.

use super::create::{self, add};
use super::state::{self, backing_user};
use crate::error::RpcError;
use crate::service::Service;
use bdev::device::Device;
use bdev::qcow2::{self, CreateOptions};
use bdev::Bdev;
use graph::node;
use graph::snapshot::SnapshotUndo;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;

/// The claims on `node` that a snapshot cannot move onto an overlay: all
/// but the monitor's and those of the hidden devices (exports) over it.
fn check_movable(svc: &Service, node: &str) -> Result<(), RpcError> {
    let movable: Vec<String> = Device::hidden_by_root(svc.graph.nodes(), node)
        .iter()
        .map(|b| b.name().to_string())
        .collect();
    let mut others = state::user_claims(&svc.graph, node);
    others.retain(|c| !movable.contains(c));
    if others.is_empty() {
        return Ok(());
    }
    // QEMU's op blocker on a backing node, in its words.
    let backing_of = backing_user(svc, node);
    if let Some(user) = backing_of {
        return Err(RpcError::errno(
            libc::EBUSY,
            format!("Node '{node}' is busy: node is used as backing hd of '{user}'"),
        ));
    }
    Err(RpcError::errno(
        libc::EBUSY,
        format!(
            "Node '{node}' is in use by {}: sluice moves only the node's exports onto a new overlay, not its other users; take the snapshot before those use the node",
            others.join(", ")
        ),
    ))
}

/// The reactor owning the image's metadata (0 for other nodes).
fn owner_of(b: &Arc<dyn Bdev>) -> usize {
    node::image(b).map(|i| i.owner()).unwrap_or(0)
}

/// Moves the exports of `node` onto `overlay` (quiesced swaps).
fn move_exports(svc: &Service, node: &str, overlay: &str) -> Result<(), RpcError> {
    let ov = svc.graph.nodes().get(overlay)?;
    let rt = svc.rt.clone();
    let node = node.to_string();
    let g = svc.graph.clone();
    let moved = svc
        .rt
        .spawn_on(owner_of(&ov), move || async move {
            graph::snapshot::move_hidden(&g, &rt, &node, &ov).await
        })
        .block()??;
    tracing::debug!(overlay, moved, "exports moved onto the overlay");
    Ok(())
}

/// Takes the snapshot of the plain node `node` into `file` (created unless
/// `existing`) and moves its exports onto it, under the caller's
/// [`graph::Graph::change`]; returns what [`undo_plain`] needs to undo it.
pub(crate) fn snapshot_plain_node(
    svc: &Service,
    _change: &graph::ChangeGuard<'_>,
    node: &str,
    file: &str,
    node_name: Option<String>,
    existing: bool,
) -> Result<SnapshotUndo, RpcError> {
    let b = svc
        .graph
        .nodes()
        .get(node)
        .map_err(|_| create::not_found(node))?;
    check_movable(svc, node)?;
    let name = match node_name {
        Some(n) => n,
        None => (0..)
            .map(|i| format!("{node}-snap{i}"))
            .find(|n| !svc.graph.nodes().contains(n))
            .unwrap_or_default(),
    };
    create::check_new_name(svc, &name, false)?;
    if !existing {
        let opts = CreateOptions {
            backing_file: Some(node::filename_of(&b)),
            backing_format: Some(node::format_of(&b)),
            ..CreateOptions::new(b.size())
        };
        let path = PathBuf::from(file);
        graph::snapshot::check_outside_chain(&b, &path)?;
        svc.rt
            .spawn_on(owner_of(&b), move || async move {
                qcow2::create_file(&path, &opts).await
            })
            .block()??;
    }
    let args = json!({
        "driver": "qcow2",
        "node-name": name,
        "file": {"driver": "file", "filename": file},
        "backing": node,
    });
    let name = add(svc, &args)?;
    let overlay = svc.graph.nodes().get(&name)?;
    let undo = SnapshotUndo::new(b.clone(), overlay, None, false);
    if let Err(e) = move_exports(svc, node, &name) {
        // Those moved go back; the overlay goes.
        let _ = undo_plain(svc, &undo);
        return Err(e);
    }
    // QEMU's external_snapshot_commit reopens the old top read-only.
    graph::snapshot::lower_to_backing(&b);
    Ok(undo)
}

/// Undoes [`snapshot_plain_node`] or [`snapshot_existing_plain`] (a failed
/// `transaction`): the exports move back onto the old top, its lock gets its
/// permissions back; a created overlay is deleted as `blockdev-del` deletes
/// it (its file stays, as QEMU leaves it), an existing one unlinked. Under
/// the caller's [`graph::Graph::change`].
pub(crate) fn undo_plain(svc: &Service, u: &SnapshotUndo) -> Result<(), RpcError> {
    let g = svc.graph.clone();
    let u2 = u.clone();
    svc.rt
        .spawn_on(owner_of(&u.overlay), move || async move {
            graph::snapshot::undo(&g, &u2).await
        })
        .block()??;
    let overlay = u.overlay.name();
    if u.existing {
        let before = u.backing_arg.clone();
        svc.graph.monitor().restore_backing(overlay, before);
        Ok(())
    } else {
        super::delete::delete_monitor_node(svc, overlay)
    }
}

/// `blockdev-snapshot {node, overlay}` on the plain node `node`: `overlay`
/// (an image node added with `backing: null`) gets `node` as its backing
/// (in its header too) and the node's exports move onto it.
pub(crate) fn snapshot_existing_plain(
    svc: &Service,
    _change: &graph::ChangeGuard<'_>,
    node: &str,
    overlay: &str,
) -> Result<SnapshotUndo, RpcError> {
    let ov = svc
        .graph
        .nodes()
        .get(overlay)
        .map_err(|_| create::not_found(overlay))?;
    check_movable(svc, node)?;
    // QEMU: an overlay with a BlockBackend (an export, a device) is refused.
    if !state::user_claims(&svc.graph, overlay).is_empty() || Device::from_bdev(&ov).is_some() {
        return Err(RpcError::invalid_params("The overlay is already in use"));
    }
    let old = svc.graph.nodes().get(node)?;
    let mut undo = SnapshotUndo::new(old, ov.clone(), None, true);
    undo.backing_arg =
        state::record(&svc.graph, overlay).and_then(|r| r.args.get("backing").cloned());
    let (n, o) = (node.to_string(), overlay.to_string());
    let g = svc.graph.clone();
    svc.rt
        .spawn_on(owner_of(&ov), move || async move {
            graph::snapshot::snapshot_existing_plain(&g, &n, &o).await
        })
        .block()??;
    // save_config re-adds the overlay over its new backing.
    state::set_backing(&svc.graph, overlay, node);
    Ok(undo)
}
