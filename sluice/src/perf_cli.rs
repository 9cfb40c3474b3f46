//! `sluice perf`: SPDK bdevperf's job (the engine is the `perf` crate). Bdevs
//! come from flags or from an SPDK JSON config; the results are printed as
//! bdevperf prints them, or as JSON.
//!
//! Without `-s` the run happens in this process ([`local`]: its own reactors
//! and bdevs); with `-s SOCK` it happens inside a running `sluice serve`
//! ([`remote`]: the `bdev_perf_run` method, SPDK's `bdevperf -z` +
//! `perform_tests`), and this process prints its results.

mod local;
mod remote;

use perf::{report, PerfArgs, PerfError};
use serde_json::Value;
use std::process::ExitCode;
use thiserror::Error;

/// Why `sluice perf` could not set up or carry out its run.
#[derive(Debug, Error)]
pub enum RunError {
    /// The engine, its options, the reactors or a bdev.
    #[error(transparent)]
    Perf(#[from] PerfError),
    /// The JSON config could not be replayed.
    #[error("config: {0}")]
    Config(#[from] rpc::config::ConfigError),
    /// The daemon refused or failed the run (`-s`).
    #[error("{0}")]
    Remote(String),
}

impl From<reactor::ReactorError> for RunError {
    fn from(e: reactor::ReactorError) -> Self {
        RunError::Perf(e.into())
    }
}

impl From<bdev::BdevError> for RunError {
    fn from(e: bdev::BdevError) -> Self {
        RunError::Perf(e.into())
    }
}

/// Runs `sluice perf`; the exit code is 0 when every job finished cleanly, 1
/// when a verify mismatch or (without `-f`) an I/O error happened, 2 when the
/// run could not be set up. Local and daemon (`-s`) runs print alike.
pub fn run(args: PerfArgs) -> ExitCode {
    let res = match &args.rpc {
        Some(sock) => remote::execute(&args, sock),
        None => local::execute(&args),
    };
    match res {
        Ok(outcome) => {
            print(&outcome.json, args.json);
            if outcome.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("sluice perf: {e}");
            ExitCode::from(2)
        }
    }
}

/// Prints the document as JSON, or as the table with its problems on stderr.
fn print(doc: &Value, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(doc).unwrap_or_default());
        return;
    }
    print!("{}", report::table(doc));
    for p in doc["errors"].as_array().into_iter().flatten() {
        if let Some(p) = p.as_str() {
            eprintln!("sluice perf: {p}");
        }
    }
}
