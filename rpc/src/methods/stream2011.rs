//! The 2011 streaming API: `block_stream`, `block_stream_cancel`,
//! `query-block-stream` (the event `BLOCK_STREAM_COMPLETED` is rendered by `job_qapi`).

use super::job_qapi;
use crate::error::RpcError;
use crate::table::MethodTable;
use jobs::drivers::stream2011 as legacy;
use serde::Deserialize;
use serde_json::{json, Value};

/// Registers the methods.
pub fn register(t: &mut MethodTable) {
    t.add("block_stream", |svc, p| {
        let a: Stream = p.parse()?;
        legacy::block_stream(
            &svc.graph, &svc.jobs, &svc.rt, &a.device, a.base, svc.tuning,
        )?;
        Ok(json!({}))
    });
    t.add("block_stream_cancel", |svc, p| {
        let a: Device = p.parse()?;
        let stopped = legacy::block_stream_cancel(&svc.graph, &svc.jobs, &a.device)?;
        // Returns once the job has stopped (its task always answers; a dropped
        // sender means the runtime is going away, which also ends the job).
        let _ = futures::executor::block_on(stopped);
        Ok(json!({}))
    });
    t.add("query-block-stream", |svc, p| -> Result<Value, RpcError> {
        p.none()?;
        Ok(Value::Array(
            legacy::query_block_stream(&svc.jobs)
                .iter()
                .map(job_qapi::stream_info)
                .collect(),
        ))
    });
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Stream {
    device: String,
    base: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Device {
    device: String,
}
