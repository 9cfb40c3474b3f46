//! `block_resize {device | node-name, size}`: QEMU's live resize of a node.
//!
//! The node is found as QEMU's `bdrv_lookup_bs` finds it (a device's root,
//! else a node name); a node a job uses is refused (QEMU's op blocker); the
//! resize needs QEMU's `resize` permission, which a
//! backing or file link (a node above it), an export and a job do not
//! share: such a node is refused in QEMU's words. A qcow2 image grows (a new
//! L1 table when needed; the new area zeroed where a longer backing file
//! would show through) or shrinks as QEMU's does (`bdev/src/qcow2/resize.rs`),
//! a file is extended or truncated, other nodes (null, malloc, NVMe) refuse as QEMU's drivers
//! without `bdrv_co_truncate` do. Afterwards every reactor's channels check
//! requests against the new size: a device over the node and the exports
//! of either see it (an NBD client at its next connection).

use crate::error::RpcError;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use bdev::device::Device;
use bdev::{Bdev, BdevError, Holder, Perm};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Registers the method.
pub fn register(t: &mut MethodTable) {
    t.add("block_resize", block_resize);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Resize {
    device: Option<String>,
    node_name: Option<String>,
    size: i64,
}

/// The node `block_resize` names, as `bdrv_lookup_bs` finds it.
fn lookup(svc: &Service, device: Option<&str>, node: Option<&str>) -> Option<Arc<dyn Bdev>> {
    let nodes = svc.graph.nodes();
    if let Some(d) = device {
        if let Ok(b) = nodes.get(d) {
            if let Some(dev) = Device::from_bdev(&b) {
                return Some(dev.root());
            }
        }
    }
    let n = node?;
    let b = nodes.get(n).ok()?;
    let root = Device::from_bdev(&b).map(|d| d.root());
    Some(root.unwrap_or(b))
}

/// How QEMU names the user behind a claim in a permission conflict.
fn user(h: &Holder) -> String {
    match h {
        Holder::Node(n) => format!("node '{n}'"),
        Holder::Job(j) => format!("block job '{j}'"),
        _ => "an unnamed block device".into(),
    }
}

/// QEMU's refusal when a user of `node` does not share `resize` (the
/// monitor's temporary block backend asks for it).
fn check_perm(svc: &Service, node: &str) -> Result<(), RpcError> {
    // QEMU's op blockers, the most recent first: a job's, then a backing
    // link's.
    if let Some(j) = svc.jobs.job_on_node(node) {
        return Err(RpcError::errno(
            libc::EBUSY,
            format!(
                "Node '{node}' is busy: block device is in use by block job: {}",
                j.spec().kind.as_str()
            ),
        ));
    }
    let claims = svc.graph.nodes().claims_of(node);
    for c in &claims {
        if let (Holder::Node(user), "backing") = (&c.holder, c.role) {
            return Err(RpcError::errno(
                libc::EBUSY,
                format!("Node '{node}' is busy: node is used as backing hd of '{user}'"),
            ));
        }
    }
    for c in claims {
        let exported = matches!(c.holder, Holder::Export(_));
        if exported || c.shared.minus(Perm::RESIZE) == c.shared {
            return Err(RpcError::invalid_params(format!(
                "Permission conflict on node '{node}': permissions 'resize' are both required by an unnamed block device (uses node '{node}' as 'root' child) and unshared by {} (uses node '{node}' as '{}' child).",
                user(&c.holder),
                if exported { "root" } else { c.role }
            )));
        }
    }
    Ok(())
}

fn block_resize(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: Resize = p.parse_qapi()?;
    let _g = svc.graph.change();
    let b = lookup(svc, a.device.as_deref(), a.node_name.as_deref()).ok_or_else(|| {
        RpcError::errno(
            libc::ENODEV,
            format!(
                "Cannot find device='{}' nor node-name='{}'",
                a.device.as_deref().unwrap_or(""),
                a.node_name.as_deref().unwrap_or("")
            ),
        )
    })?;
    let size = u64::try_from(a.size)
        .map_err(|_| RpcError::invalid_params("Parameter 'size' expects a >0 size"))?;
    check_perm(svc, b.name())?;
    // QEMU's BDRV_MAX_LENGTH (bdrv_co_truncate checks it before read-only).
    const MAX: u64 = (i64::MAX as u64) & !((1 << 30) - 1);
    if size > MAX {
        return Err(RpcError::invalid_params(format!(
            "offset({size}) exceeds maximum({MAX})"
        )));
    }
    if b.read_only() {
        return Err(RpcError::errno(libc::EACCES, "Image is read-only"));
    }
    let b2 = b.clone();
    let r = svc
        .rt
        .spawn_on(0, move || async move {
            match b2.resize(size) {
                Some(f) => f.await.map(|()| true),
                None => Ok(false),
            }
        })
        .block()?;
    // Whatever happened, requests are checked against the size there is now.
    let _ = svc.rt.broadcast(bdev::refresh_channel_sizes).block();
    match r {
        Ok(true) => Ok(json!({})),
        Ok(false) => Err(RpcError::errno(
            libc::ENOTSUP,
            "Image format driver does not support resize",
        )),
        Err(BdevError::InvalidParam(m)) | Err(BdevError::Unsupported(m)) => {
            Err(RpcError::invalid_params(m))
        }
        Err(e) => Err(e.into()),
    }
}
