//! `blockdev-snapshot-sync {node-name}` on a node that is not the root of a
//! device (a node made by `blockdev-add`, say): a new qcow2 overlay over it,
//! added as `blockdev-add` would add it, so the monitor owns it.
//!
//! QEMU moves the node's parents onto the overlay; sluice can move only a
//! device's users (`bdev_qcow2_open` with a name), so a node that is in use
//! (exported, a backing, a device's root) is refused: take the snapshot
//! before exporting the node, and export the overlay.

use super::{add, create, state};
use crate::error::RpcError;
use crate::service::Service;
use bdev::qcow2::{self, CreateOptions};
use bdev::registry;
use serde_json::json;
use std::path::PathBuf;
use stream::node;

/// Takes the snapshot of the plain node `node` into `file` (created unless
/// `existing`); returns the overlay's node name.
pub(crate) fn snapshot_plain_node(
    svc: &Service,
    node: &str,
    file: &str,
    node_name: Option<String>,
    existing: bool,
) -> Result<String, RpcError> {
    let _g = state::op_lock();
    let b = registry().get(node).map_err(|_| create::not_found(node))?;
    let claims = state::user_claims(node);
    if !claims.is_empty() {
        return Err(RpcError::errno(
            libc::EBUSY,
            format!(
                "Node '{node}' is in use by {}: sluice moves only a device's users onto a new overlay; take the snapshot before using the node, and use the overlay",
                claims.join(", ")
            ),
        ));
    }
    let name = match node_name {
        Some(n) => n,
        None => (0..)
            .map(|i| format!("{node}-snap{i}"))
            .find(|n| !registry().contains(n))
            .unwrap_or_default(),
    };
    create::check_new_name(&name, false)?;
    if !existing {
        let opts = CreateOptions {
            backing_file: Some(node::filename_of(&b)),
            backing_format: Some(node::format_of(&b).to_string()),
            ..CreateOptions::new(b.size())
        };
        let owner = node::image(&b).map(|i| i.owner()).unwrap_or(0);
        let path = PathBuf::from(file);
        svc.rt
            .spawn_on(owner, move || async move {
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
    add(svc, &args)
}
