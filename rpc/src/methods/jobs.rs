//! QEMU's block-job API: `block-stream`, `query-block-jobs`, `query-jobs`,
//! `block-job-*`, `job-*` and `change-backing-file`.

use super::blockdev::args::{check_node_name, check_node_name_len, missing, Args};
use super::job_qapi;
use crate::error::RpcError;
use crate::methods::common::shared_limit;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use jobs::drivers::stream::{self, StreamParams};
use jobs::job::{BlockJobArgs, Job, JobError, JobVerb, OnError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Registers the methods.
pub fn register(t: &mut MethodTable) {
    t.add("block-stream", block_stream);
    t.add("query-block-jobs", |svc, p| {
        p.none()?;
        Ok(Value::Array(
            svc.jobs
                .list()
                .iter()
                .filter(|j| j.spec().kind.is_block_job())
                .map(|j| job_qapi::block_job_info(&j.info()))
                .collect(),
        ))
    });
    t.add("query-jobs", |svc, p| {
        p.none()?;
        Ok(Value::Array(
            svc.jobs
                .list()
                .iter()
                .map(|j| job_qapi::job_info(&j.info()))
                .collect(),
        ))
    });
    t.add("block-job-cancel", |svc, p| {
        let v = params(p);
        let mut a = Args::new(&v, "")?;
        let device = a.req_str("device")?;
        // Also cancels a paused job (and, for jobs that become ready, one
        // that converged, without its pivot).
        let force = a.bool("force")?.unwrap_or(false);
        a.finish(&[])?;
        let job = svc.jobs.block_job(&device)?;
        if job.info().paused && !force {
            return Err(JobError::Refused(format!(
                "The block job for device '{device}' is currently paused"
            ))
            .into());
        }
        let stopped = if force {
            job.cancel()
        } else {
            job.cancel_unforced()
        };
        drop(stopped.map_err(JobError::Refused)?);
        job.settle(JobVerb::Cancel, SETTLE);
        Ok(json!({}))
    });
    t.add("block-job-set-speed", |svc, p| {
        let v = params(p);
        let mut a = Args::new(&v, "")?;
        let device = a.req_str("device")?;
        let speed = a.int("speed")?.ok_or_else(|| missing("speed"))?;
        a.finish(&[])?;
        let job = svc.jobs.block_job(&device)?;
        job.check_verb(JobVerb::SetSpeed)
            .map_err(JobError::Refused)?;
        if speed < 0 {
            return Err(RpcError::invalid_params(
                "Parameter 'speed' expects a non-negative value",
            ));
        }
        job.set_speed(speed as u64).map_err(JobError::Refused)?;
        Ok(json!({}))
    });
    block_verb(t, "block-job-pause", Job::pause);
    block_verb(t, "block-job-resume", Job::resume);
    block_verb(t, "block-job-complete", Job::complete);
    id_verb(t, "block-job-finalize", true, Job::finalize);
    id_verb(t, "block-job-dismiss", true, Job::dismiss);
    id_verb(t, "job-pause", false, Job::pause);
    id_verb(t, "job-resume", false, Job::resume);
    id_verb(t, "job-complete", false, Job::complete);
    id_verb(t, "job-finalize", false, Job::finalize);
    id_verb(t, "job-dismiss", false, Job::dismiss);
    id_verb(t, "job-cancel", false, |j: &Job| j.cancel().map(|_| ()));
    t.add("change-backing-file", change_backing_file);
    t.add("x-query-job-events", query_job_events);
}

/// The block-job events in full (SPDK's notifications carry no data).
const JOB_EVENTS: [&str; 7] = [
    "JOB_STATUS_CHANGE",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_CANCELLED",
    "BLOCK_JOB_ERROR",
    "BLOCK_JOB_PENDING",
    "BLOCK_JOB_READY",
    "BLOCK_STREAM_COMPLETED",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct After {
    /// Only events with a larger sequence number.
    #[serde(default)]
    after: u64,
}

/// `x-query-job-events {after}`: `[{seq, event, data, timestamp}]` of the job
/// events still in the bus's history, for JSON-RPC clients (`sluice rpc --wait`).
fn query_job_events(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: After = p.parse()?;
    let v: Vec<Value> = svc
        .events
        .since(a.after, usize::MAX)
        .into_iter()
        .filter(|e| JOB_EVENTS.contains(&e.name.as_str()))
        .map(|e| {
            let mut q = e.to_qmp();
            q["seq"] = json!(e.seq);
            q
        })
        .collect();
    Ok(Value::Array(v))
}

/// The arguments as a JSON value (none: an empty object).
fn params(p: Params) -> Value {
    match p.0 {
        None | Some(Value::Null) => json!({}),
        Some(v) => v,
    }
}

/// The one string member `key` of a verb's arguments, read as QEMU's QAPI
/// visitor reads it (its error texts).
fn only_str(p: Params, key: &str) -> Result<String, RpcError> {
    let v = params(p);
    let mut a = Args::new(&v, "")?;
    let s = a.req_str(key)?;
    a.finish(&[])?;
    Ok(s)
}

/// How long a verb's reply waits for the job's reactor to act on it (a
/// job whose I/O hangs still gets its answer).
const SETTLE: Duration = Duration::from_secs(5);

/// The verb a method runs, for [`Job::settle`]: the reply comes once the
/// job is in the status the verb leads to, as with QEMU's monitor.
fn verb_of(name: &str) -> JobVerb {
    match name.rsplit('-').next() {
        Some("pause") => JobVerb::Pause,
        Some("cancel") => JobVerb::Cancel,
        Some("finalize") => JobVerb::Finalize,
        Some("resume") => JobVerb::Resume,
        Some("dismiss") => JobVerb::Dismiss,
        _ => JobVerb::Complete,
    }
}

fn block_verb(t: &mut MethodTable, name: &str, f: fn(&Job) -> Result<(), String>) {
    let verb = verb_of(name);
    t.add(name, move |svc, p| {
        let device = only_str(p, "device")?;
        let job = svc.jobs.block_job(&device)?;
        f(&job).map_err(JobError::Refused)?;
        job.settle(verb, SETTLE);
        Ok(json!({}))
    });
}

fn id_verb(t: &mut MethodTable, name: &str, block: bool, f: fn(&Job) -> Result<(), String>) {
    let verb = verb_of(name);
    t.add(name, move |svc, p| {
        let id = only_str(p, "id")?;
        let job: Arc<Job> = if block {
            svc.jobs.block_job(&id)?
        } else {
            svc.jobs.job(&id)?
        };
        f(&job).map_err(JobError::Refused)?;
        job.settle(verb, SETTLE);
        Ok(json!({}))
    });
}

/// QAPI `BlockdevOnError` as `block-stream` takes it.
const ON_ERROR: [&str; 5] = ["report", "ignore", "enospc", "stop", "auto"];

/// `block-stream`, its arguments read as QEMU's QAPI visitor reads them (its
/// error texts; `filter-node-name` must be a name QEMU could give a new node).
fn block_stream(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let v = params(p);
    let mut a = Args::new(&v, "")?;
    let job_id = a.str("job-id")?;
    let device = a.req_str("device")?;
    let base = a.str("base")?;
    let base_node = a.str("base-node")?;
    let backing_file = a.str("backing-file")?;
    let backing_mask_protocol = a.bool("backing-mask-protocol")?;
    let bottom = a.str("bottom")?;
    let speed = a.int("speed")?;
    let on_error = a.enumeration("on-error", &ON_ERROR)?;
    let filter_node_name = a.str("filter-node-name")?;
    let auto_finalize = a.bool("auto-finalize")?;
    let auto_dismiss = a.bool("auto-dismiss")?;
    // sluice's extension: `false` skips the flush before the header drops the
    // backing file (QEMU's behaviour; still safe against a killed process).
    let x_durable = a.bool("x-durable")?;
    // sluice's extension: a throttle group object the job's copying shares.
    let throttle = shared_limit(svc, a.str("x-throttle-group")?)?;
    a.finish(&[])?;
    if let Some(f) = &filter_node_name {
        check_filter_name(svc, f)?;
    }
    let sp = StreamParams {
        job: BlockJobArgs {
            job_id,
            speed: speed.unwrap_or(0),
            on_error: on_error.as_deref().and_then(OnError::parse),
            auto_finalize,
            auto_dismiss,
            throttle,
            filter_node_name,
        },
        device,
        base,
        base_node,
        bottom,
        backing_file,
        backing_mask_protocol: backing_mask_protocol.unwrap_or(false),
        legacy: false,
        no_flush_on_complete: x_durable == Some(false),
    };
    stream::start(&svc.graph, &svc.jobs, &svc.rt, sp, svc.tuning)?;
    Ok(json!({}))
}

/// QEMU names the copy-on-read filter it inserts `filter-node-name`: a
/// name that could not be given to a new node is refused as QEMU refuses it
/// (before the stream's own checks). sluice's stream needs no filter in the
/// data path (guest reads during the job are served through the chain, and
/// the copier populates the top): the node is only shown while the job runs
/// (`jobs::job::filter`).
fn check_filter_name(svc: &Service, name: &str) -> Result<(), RpcError> {
    let prefixed = |e: RpcError| RpcError {
        message: format!("Could not create node: {}", e.message),
        ..e
    };
    if svc.graph.nodes().contains(name) {
        return Err(RpcError::errno(
            libc::EEXIST,
            format!("Could not create node: Duplicate nodes with node-name='{name}'"),
        ));
    }
    check_node_name(name).map_err(prefixed)?;
    check_node_name_len(name).map_err(prefixed)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ChangeBackingFile {
    device: String,
    image_node_name: String,
    backing_file: String,
}

fn change_backing_file(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: ChangeBackingFile = p.parse()?;
    let dev = svc.graph.nodes().get(&a.device).map_err(|_| {
        RpcError::new(
            -libc::ENODEV,
            crate::ErrorClass::GenericError,
            format!(
                "Cannot find device='{}' nor node-name='{}'",
                a.device, a.device
            ),
        )
    })?;
    let top = bdev::device::Device::from_bdev(&dev)
        .map(|d| d.root())
        .unwrap_or(dev);
    let chain = graph::node::chain(&top);
    let node = chain
        .iter()
        .find(|b| b.name() == a.image_node_name)
        .cloned()
        .ok_or_else(|| {
            RpcError::invalid_params(format!("Node '{}' not found", a.image_node_name))
        })?;
    let img = graph::node::image(&node).ok_or_else(|| {
        RpcError::invalid_params(format!(
            "Node '{}' has no backing file to change",
            a.image_node_name
        ))
    })?;
    let Some(backing) = img.backing() else {
        return Err(RpcError::invalid_params(format!(
            "Node '{}' has no backing file to change",
            a.image_node_name
        )));
    };
    if node.read_only() {
        return Err(RpcError::errno(
            libc::EROFS,
            format!("Node '{}' is read-only", a.image_node_name),
        ));
    }
    let fmt = graph::node::format_of(&backing);
    let owner = img.owner();
    let file = a.backing_file;
    // A backing file holds a reader's lock: QEMU reopens it read-write for
    // the header write (a writer's lock), then read-only again.
    let writer = graph::lock::WriterLock::raise(&node)?;
    let r = svc
        .rt
        .spawn_on(owner, move || async move {
            img.set_backing_file(Some(&file), Some(&fmt), true).await
        })
        .block();
    drop(writer);
    r??;
    Ok(json!({}))
}
