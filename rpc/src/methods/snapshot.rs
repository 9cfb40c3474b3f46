//! Snapshots: `snapshot_blkdev` (2011), `blockdev-snapshot-sync` and
//! `blockdev-snapshot` (QEMU). The device moves onto a new qcow2 overlay whose
//! backing file is its current image; the target may be a file or a registered
//! bdev (malloc, NVMe) formatted as qcow2, which with a stream is a live copy.
//!
//! Each snapshot is an action that returns what undoes it
//! ([`SnapshotUndo`]), so that `transaction` (`transaction.rs`) runs several
//! under one [`graph::Graph::change`] and undoes the done ones when a later
//! one fails.

mod actions;
mod transaction;

use crate::error::RpcError;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use crate::ErrorClass;
use actions::{check_format, existing_locked, run, sync_locked, Existing, Sync};
use graph::snapshot::SnapshotRequest;
use serde::Deserialize;
use serde_json::{json, Value};

/// Registers the methods.
pub fn register(t: &mut MethodTable) {
    t.add("snapshot_blkdev", snapshot_blkdev);
    t.add("blockdev-snapshot-sync", blockdev_snapshot_sync);
    t.add("blockdev-snapshot", blockdev_snapshot);
    t.add("transaction", transaction::transaction);
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

fn blockdev_snapshot_sync(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: Sync = p.parse()?;
    let g = svc.graph.change();
    sync_locked(svc, &g, a)?;
    Ok(json!({}))
}

fn blockdev_snapshot(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: Existing = p.parse()?;
    let g = svc.graph.change();
    existing_locked(svc, &g, a)?;
    Ok(json!({}))
}
