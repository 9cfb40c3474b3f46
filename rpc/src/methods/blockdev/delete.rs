//! `blockdev-del`'s checks and deletion, in QEMU's order and words (also a
//! snapshot's overlay when its `transaction` fails).

use super::create;
use super::spec::Driver;
use super::state::{self, backing_user, is_raw_node, monitor_owned};
use crate::error::RpcError;
use crate::methods::common::delete_bdev;
use crate::methods::nodes::delete_node;
use crate::service::Service;
use bdev::device::Device;
use bdev::filter::{FilterBdev, FilterKind};
use bdev::{Bdev, Holder};
use std::sync::Arc;

pub(super) fn failed_to_find(name: &str) -> RpcError {
    RpcError::errno(
        libc::ENODEV,
        format!("Failed to find node with node-name='{name}'"),
    )
}

/// Why a job's filter node cannot be deleted while its job runs, in QEMU's
/// words: a copy-on-read node is the job's, a commit_top node the backing
/// of the image above the committed top, a mirror_top node blocked by the
/// job.
fn filter_busy(svc: &Service, name: &str, f: &FilterBdev) -> RpcError {
    let child = f.child().map(|c| c.name().to_string()).unwrap_or_default();
    let msg = match f.kind() {
        FilterKind::CopyOnRead => format!("Node {name} is in use"),
        FilterKind::CommitTop => match backing_user(svc, &child) {
            Some(user) => format!("Node '{name}' is busy: node is used as backing hd of '{user}'"),
            None => format!("Node {name} is in use"),
        },
        FilterKind::MirrorTop => match svc.jobs.job_on_node(&child) {
            Some(j) => format!(
                "Node '{name}' is busy: block device is in use by block job: {}",
                j.spec().kind.as_str()
            ),
            None => format!("Node {name} is in use"),
        },
    };
    RpcError::errno(libc::EBUSY, msg)
}

/// Why `name` cannot be deleted, in QEMU's order and words.
fn check_deletable(svc: &Service, name: &str) -> Result<Arc<dyn Bdev>, RpcError> {
    let b = svc
        .graph
        .nodes()
        .get(name)
        .map_err(|_| failed_to_find(name))?;
    if Device::from_bdev(&b).is_some() && !is_raw_node(svc, name) {
        // A device is QEMU's block backend, not a node.
        return Err(failed_to_find(name));
    }
    if let Some(f) = FilterBdev::from_bdev(&b) {
        return Err(filter_busy(svc, name, f));
    }
    let claims = state::users(&svc.graph, name);
    // QEMU's block backends: an export's, a device's (a raw node is a node).
    let backend = |h: &Holder| match h {
        Holder::Export(_) => true,
        Holder::Device(d) => !is_raw_node(svc, d),
        _ => false,
    };
    if claims.iter().any(backend) {
        return Err(RpcError::errno(
            libc::EBUSY,
            format!("Node {name} is in use"),
        ));
    }
    if let Some(j) = svc.jobs.job_on_node(name) {
        return Err(RpcError::errno(
            libc::EBUSY,
            format!(
                "Node '{name}' is busy: block device is in use by block job: {}",
                j.spec().kind.as_str()
            ),
        ));
    }
    // QEMU's op blocker on a backing node (checked before ownership).
    if let Some(user) = backing_user(svc, name) {
        return Err(RpcError::errno(
            libc::EBUSY,
            format!("Node '{name}' is busy: node is used as backing hd of '{user}'"),
        ));
    }
    if !monitor_owned(svc, name) {
        return Err(RpcError::errno(
            libc::EPERM,
            format!("Node {name} is not owned by the monitor"),
        ));
    }
    if !claims.is_empty() {
        return Err(RpcError::errno(
            libc::EBUSY,
            format!("Block device {name} is in use"),
        ));
    }
    Ok(b)
}

/// `blockdev-del` of `name` under the caller's [`graph::Graph::change`]
/// (also a snapshot's overlay when its `transaction` fails).
pub(crate) fn delete_monitor_node(svc: &Service, name: &str) -> Result<(), RpcError> {
    let name = name.to_string();
    let b = check_deletable(svc, &name)?;
    let rec = state::record(&svc.graph, &name).ok_or_else(|| failed_to_find(&name))?;
    svc.graph.nodes().release(&name, &bdev::Holder::Monitor);
    match rec.driver {
        // Flushed, the file trimmed, the chain from the header closed: the
        // path `bdev_qcow2_delete` takes.
        Driver::Qcow2 => delete_node(svc, b)?,
        _ => delete_bdev(svc, &name)?,
    }
    state::forget(&svc.graph, &name);
    for (c, _) in &rec.children {
        svc.graph.release_all(&bdev::Holder::Node(c.clone()));
        if svc.graph.nodes().contains(c) {
            if let Err(e) = delete_bdev(svc, c) {
                tracing::warn!(node = %c, "deleting the nested node: {e}");
            }
        }
    }
    if let Some(f) = &rec.file_ref {
        if let Some(frec) = state::record(&svc.graph, f) {
            if state::user_claims(&svc.graph, f).is_empty() {
                svc.graph.nodes().release(f, &bdev::Holder::Monitor);
                if let Err(e) = svc.graph.delete(f) {
                    tracing::warn!(node = %f, "closing the image's file: {e}");
                }
                create::restore_file_node(&svc.graph, &frec);
            }
        }
    }
    tracing::info!(node = %name, "blockdev-del");
    Ok(())
}
