//! `bdev_perf_run`: the `sluice perf` engine on the daemon's own reactors,
//! against its bdevs and devices (SPDK's `bdevperf -z` + `perform_tests`).
//! The handler's RPC thread waits for the jobs; no reactor ever blocks.

use crate::error::RpcError;
use crate::perf::engine::{self, Claimed};
use crate::perf::{PerfError, RunOptions};
use crate::service::Service;
use crate::table::{MethodTable, Params};
use serde_json::Value;

/// Registers the method.
pub fn register(t: &mut MethodTable) {
    t.add(crate::perf::remote::METHOD, bdev_perf_run);
}

fn bdev_perf_run(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let opts: RunOptions = p.parse()?;
    tracing::info!(workload = opts.workload.name(), bdevs = ?opts.bdevs, time = opts.time_in_sec, "perf run");
    let out =
        engine::run(svc.graph.nodes(), &svc.rt, &opts, Claimed::RefuseWrites).map_err(rpc_error)?;
    if !out.ok {
        tracing::warn!(errors = %out.json["errors"], "perf run failed");
    }
    Ok(out.json)
}

fn rpc_error(e: PerfError) -> RpcError {
    match e {
        PerfError::Args(m) => RpcError::invalid_params(m),
        PerfError::Bdev(e) => e.into(),
        PerfError::Reactor(e) => e.into(),
        PerfError::Config(e) => e.into(),
        e @ (PerfError::Job { .. } | PerfError::Remote(_)) => {
            RpcError::errno(libc::EIO, e.to_string())
        }
    }
}
