//! `bdev_perf_run`: the `sluice perf` engine on the daemon's own reactors,
//! against its bdevs and devices (SPDK's `bdevperf -z` + `perform_tests`).
//! The handler's RPC thread waits for the jobs; no reactor ever blocks.

use crate::error::RpcError;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use perf::engine::{self, Claimed};
use perf::RunOptions;
use serde_json::Value;

/// The method that runs the engine in the daemon (`sluice perf -s` calls it).
pub const METHOD: &str = "bdev_perf_run";

/// Registers the method.
pub fn register(t: &mut MethodTable) {
    t.add(METHOD, bdev_perf_run);
}

fn bdev_perf_run(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let opts: RunOptions = p.parse()?;
    tracing::info!(workload = opts.workload.name(), bdevs = ?opts.bdevs, time = opts.time_in_sec, "perf run");
    let out = engine::run(svc.graph.nodes(), &svc.rt, &opts, Claimed::RefuseWrites)?;
    if !out.ok {
        tracing::warn!(errors = %out.json["errors"], "perf run failed");
    }
    Ok(out.json)
}
