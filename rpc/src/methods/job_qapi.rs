//! Jobs as QEMU's monitor shows them: each [`JobEvent`] rendered as its QMP
//! event(s) on the service's bus (QEMU's `JOB_STATUS_CHANGE`, `BLOCK_JOB_*`,
//! and for jobs started through the 2011 API `BLOCK_STREAM_COMPLETED`), and a
//! job's state as QAPI `JobInfo` / `BlockJobInfo`. The jobs crate hands over
//! data; only this file knows the JSON.

use graph::events::EventBus;
use jobs::drivers::stream2011::StreamInfo;
use jobs::job::{EventSink, JobEvent, JobInfo, JobSnapshot};
use serde_json::{json, Value};
use std::sync::Arc;

/// The sink that publishes every job event on `bus` as QMP events.
pub fn sink(bus: EventBus) -> EventSink {
    Arc::new(move |e: &JobEvent| publish(&bus, e))
}

fn block_job_end(j: &JobSnapshot, error: Option<&String>) -> Value {
    let mut d = json!({
        "type": j.spec.kind.as_str(),
        "device": j.spec.id,
        "len": j.len,
        "offset": j.offset,
        "speed": j.speed,
    });
    if let Some(e) = error {
        d["error"] = json!(e);
    }
    d
}

fn publish(bus: &EventBus, e: &JobEvent) {
    match e {
        JobEvent::StatusChange { id, status } => {
            bus.publish(
                "JOB_STATUS_CHANGE",
                json!({"id": id, "status": status.as_str()}),
            );
        }
        JobEvent::IoError {
            job,
            operation,
            action,
        } => {
            bus.publish(
                "BLOCK_JOB_ERROR",
                json!({"device": job.spec.id, "operation": operation.as_str(), "action": action.as_str()}),
            );
        }
        JobEvent::Pending { job } => {
            bus.publish(
                "BLOCK_JOB_PENDING",
                json!({"type": job.spec.kind.as_str(), "id": job.spec.id}),
            );
        }
        JobEvent::Ready { job } => {
            bus.publish("BLOCK_JOB_READY", block_job_end(job, None));
        }
        JobEvent::Cancelled { job } => {
            bus.publish("BLOCK_JOB_CANCELLED", block_job_end(job, None));
        }
        JobEvent::Completed { job, error } => {
            bus.publish("BLOCK_JOB_COMPLETED", block_job_end(job, error.as_ref()));
            if job.spec.legacy {
                let mut d =
                    json!({"device": job.spec.device, "len": job.len, "offset": job.offset});
                if let Some(e) = error {
                    d["error"] = json!(e);
                }
                bus.publish("BLOCK_STREAM_COMPLETED", d);
            }
        }
    }
}

/// The `query-block-jobs` entry (QAPI `BlockJobInfo`).
pub fn block_job_info(i: &JobInfo) -> Value {
    let mut v = json!({
        "type": i.spec.kind.as_str(),
        "device": i.spec.id,
        "len": i.len,
        "offset": i.offset,
        "busy": i.busy,
        "paused": i.paused,
        "speed": i.speed,
        "io-status": i.io_status,
        "ready": i.ready,
        "status": i.status.as_str(),
        "auto-finalize": i.spec.auto_finalize,
        "auto-dismiss": i.spec.auto_dismiss,
    });
    if let Some(e) = &i.error {
        v["error"] = json!(e);
    }
    if i.spec.kind == jobs::drivers::mirror::KIND {
        // QAPI `BlockJobInfoMirror`.
        v["actively-synced"] = json!(i.actively_synced);
    }
    v
}

/// The `query-jobs` entry (QAPI `JobInfo`).
pub fn job_info(i: &JobInfo) -> Value {
    let mut v = json!({
        "id": i.spec.id,
        "type": i.spec.kind.as_str(),
        "status": i.status.as_str(),
        "current-progress": i.offset,
        "total-progress": i.len,
    });
    if let Some(e) = &i.error {
        v["error"] = json!(e);
    }
    v
}

/// The `query-block-stream` entry (the 2011 API).
pub fn stream_info(s: &StreamInfo) -> Value {
    json!({"device": s.device, "len": s.len, "offset": s.offset})
}
