//! QEMU's block-job API: `block-stream`, `query-block-jobs`, `query-jobs`,
//! `block-job-*`, `job-*` and `change-backing-file`.

use super::job_qapi;
use crate::error::RpcError;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use jobs::drivers::stream::{self, StreamParams};
use jobs::job::{Job, JobError, OnError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

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
        let a: Cancel = p.parse()?;
        let job = svc.jobs.block_job(&a.device)?;
        let stopped = if a.force == Some(true) {
            job.cancel()
        } else {
            job.cancel_unforced()
        };
        drop(stopped.map_err(JobError::Refused)?);
        Ok(json!({}))
    });
    t.add("block-job-set-speed", |svc, p| {
        let a: SetSpeed = p.parse()?;
        let job = svc.jobs.block_job(&a.device)?;
        job.check_verb(jobs::job::JobVerb::SetSpeed)
            .map_err(JobError::Refused)?;
        if a.speed < 0 {
            return Err(RpcError::invalid_params(
                "Parameter 'speed' expects a non-negative value",
            ));
        }
        job.set_speed(a.speed as u64).map_err(JobError::Refused)?;
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ByDevice {
    device: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ById {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Cancel {
    device: String,
    /// Only meaningful for jobs that became ready (without it, they complete
    /// without their pivot); others cancel the same way.
    force: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetSpeed {
    device: String,
    speed: i64,
}

fn block_verb(t: &mut MethodTable, name: &str, f: fn(&Job) -> Result<(), String>) {
    t.add(name, move |svc, p| {
        let a: ByDevice = p.parse()?;
        let job = svc.jobs.block_job(&a.device)?;
        f(&job).map_err(JobError::Refused)?;
        Ok(json!({}))
    });
}

fn id_verb(t: &mut MethodTable, name: &str, block: bool, f: fn(&Job) -> Result<(), String>) {
    t.add(name, move |svc, p| {
        let a: ById = p.parse()?;
        let job: Arc<Job> = if block {
            svc.jobs.block_job(&a.id)?
        } else {
            svc.jobs.job(&a.id)?
        };
        f(&job).map_err(JobError::Refused)?;
        Ok(json!({}))
    });
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BlockStream {
    job_id: Option<String>,
    device: String,
    base: Option<String>,
    base_node: Option<String>,
    bottom: Option<String>,
    backing_file: Option<String>,
    backing_mask_protocol: Option<bool>,
    speed: Option<i64>,
    on_error: Option<String>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
    /// sluice's extension: `false` skips the flush before the header drops the
    /// backing file (QEMU's behaviour; still safe against a killed process).
    x_durable: Option<bool>,
}

fn parse_on_error(v: Option<String>) -> Result<Option<OnError>, RpcError> {
    match v {
        None => Ok(None),
        Some(s) => OnError::parse(&s).map(Some).ok_or_else(|| {
            RpcError::invalid_params(format!("Parameter 'on-error' does not accept value '{s}'"))
        }),
    }
}

fn block_stream(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: BlockStream = p.parse()?;
    let sp = StreamParams {
        job_id: a.job_id,
        device: a.device,
        base: a.base,
        base_node: a.base_node,
        bottom: a.bottom,
        backing_file: a.backing_file,
        backing_mask_protocol: a.backing_mask_protocol.unwrap_or(false),
        speed: a.speed.unwrap_or(0),
        on_error: parse_on_error(a.on_error)?,
        auto_finalize: a.auto_finalize,
        auto_dismiss: a.auto_dismiss,
        legacy: false,
        no_flush_on_complete: a.x_durable == Some(false),
    };
    stream::start(&svc.graph, &svc.jobs, &svc.rt, sp, svc.tuning)?;
    Ok(json!({}))
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
