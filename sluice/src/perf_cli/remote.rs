//! `sluice perf -s SOCK`: the run happens inside a running `sluice serve`
//! (SPDK's `bdevperf -z` + `perform_tests`), on its bdevs and devices and its
//! reactors, through the `bdev_perf_run` method; this process only sends the
//! options and receives the JSON document.

use super::RunError;
use crate::client;
use perf::{Outcome, PerfArgs, PerfError};
use rpc::methods::perf::METHOD;
use serde_json::Value;
use std::time::Duration;

/// Seconds to wait for the reply beyond the run time (setup, draining, teardown).
const SLACK_S: f64 = 120.0;

/// Sends the run to the daemon at `sock` and waits for its results.
pub fn execute(args: &PerfArgs, sock: &str) -> Result<Outcome, RunError> {
    args.validate()?;
    let opts = args.options();
    let params = serde_json::to_value(&opts).map_err(|e| PerfError::Args(e.to_string()))?;
    if !args.json {
        println!("Running I/O for {} seconds...", args.time);
    }
    let timeout = Duration::from_secs_f64(args.time + SLACK_S);
    let json = client::call(sock, METHOD, Some(params), timeout)
        .map_err(|e| RunError::Remote(e.to_string()))?;
    let ok = json
        .get("ok")
        .and_then(Value::as_bool)
        .ok_or_else(|| RunError::Remote(format!("{METHOD} answered without \"ok\": {json}")))?;
    Ok(Outcome {
        results: Vec::new(),
        json,
        ok,
    })
}
