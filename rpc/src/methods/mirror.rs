//! QEMU's mirror commands: `blockdev-mirror` (target a node) and
//! `block-job-change` (a mirror's copy mode) parsed with QEMU's QAPI
//! argument errors, then `jobs::drivers::mirror`. The job's events and
//! queries are rendered by `job_qapi` like every job's.

use super::blockdev::args::Args;
use crate::error::RpcError;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use jobs::drivers::mirror::{self, CopyMode, MirrorParams, SyncMode};
use jobs::job::{BlockJobArgs, JobError, OnError};
use serde_json::{json, Value};

/// Registers the methods.
pub fn register(t: &mut MethodTable) {
    t.add("blockdev-mirror", blockdev_mirror);
    t.add("block-job-change", block_job_change);
}

const SYNC: [&str; 5] = ["top", "full", "none", "incremental", "bitmap"];
const ON_ERROR: [&str; 5] = ["report", "ignore", "enospc", "stop", "auto"];
const COPY_MODE: [&str; 2] = ["background", "write-blocking"];

fn params(p: Params) -> Value {
    match p.0 {
        None | Some(Value::Null) => json!({}),
        Some(v) => v,
    }
}

fn on_error(a: &mut Args, k: &str) -> Result<Option<OnError>, RpcError> {
    Ok(a.enumeration(k, &ON_ERROR)?.and_then(|s| OnError::parse(&s)))
}

/// The members after `sync` common to both mirror commands, in schema
/// order from `speed` (`drive-mirror` reads `mode` before them).
fn common_tail(a: &mut Args, m: &mut MirrorParams) -> Result<(), RpcError> {
    m.job.speed = a.int("speed")?.unwrap_or(0);
    m.granularity = a.uint("granularity")?.unwrap_or(0);
    m.buf_size = a.int("buf-size")?.unwrap_or(0);
    Ok(())
}

fn blockdev_mirror(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let v = params(p);
    let mut a = Args::new(&v, "")?;
    let mut m = MirrorParams {
        job: BlockJobArgs {
            job_id: a.str("job-id")?,
            ..Default::default()
        },
        device: a.req_str("device")?,
        target: a.req_str("target")?,
        replaces: a.str("replaces")?,
        ..Default::default()
    };
    let sync = a
        .enumeration("sync", &SYNC)?
        .ok_or_else(|| super::blockdev::args::missing("sync"))?;
    m.sync = SyncMode::parse(&sync).unwrap_or_default();
    common_tail(&mut a, &mut m)?;
    m.on_source = on_error(&mut a, "on-source-error")?;
    m.on_target = on_error(&mut a, "on-target-error")?;
    // Accepted as QEMU does; sluice inserts no filter node.
    a.str("filter-node-name")?;
    m.write_blocking = a.enumeration("copy-mode", &COPY_MODE)?.as_deref() == Some("write-blocking");
    m.job.auto_finalize = a.bool("auto-finalize")?;
    m.job.auto_dismiss = a.bool("auto-dismiss")?;
    a.finish(&[])?;
    // QEMU's blockdev-mirror zeroes the target of a full mirror.
    m.zero_target = m.sync == SyncMode::Full;
    mirror::start(&svc.graph, &svc.jobs, &svc.rt, m, svc.tuning)?;
    Ok(json!({}))
}

/// `block-job-change`: `id`, `type` (the union's tag), and for `mirror`
/// its `copy-mode`. Only background -> write-blocking is implemented, as in
/// QEMU; like QEMU 10, a job is changed with the mirror's options whatever
/// `type` says.
fn block_job_change(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let v = params(p);
    let mut a = Args::new(&v, "")?;
    let id = a.req_str("id")?;
    let ty = a.req_str("type")?;
    let mode = if ty == "mirror" {
        Some(
            a.enumeration("copy-mode", &COPY_MODE)?
                .ok_or_else(|| super::blockdev::args::missing("copy-mode"))?,
        )
    } else {
        None
    };
    a.finish(&[])?;
    let job = svc.jobs.block_job(&id)?;
    let Some(cm) = job.ext::<CopyMode>() else {
        // Jobs without a change handler accept any change (QEMU's).
        return Ok(json!({}));
    };
    let want_blocking = mode.as_deref() == Some("write-blocking");
    if want_blocking {
        cm.set_write_blocking();
    } else if cm.write_blocking() {
        return Err(JobError::Refused(
            "Change to copy mode 'background' is not implemented".into(),
        )
        .into());
    }
    Ok(json!({}))
}
