//! `sluice perf`: SPDK bdevperf's job. Bdevs come from flags or from an SPDK
//! JSON config; one job per reactor per bdev (each on its own share of the
//! bdev) keeps `-q` requests in flight for `-t` seconds; the results are
//! printed as bdevperf prints them, or as JSON.
//!
//! With `-s SOCK` the same engine runs inside a running `sluice serve`, on its
//! bdevs and devices (the `bdev_perf_run` method, SPDK's `bdevperf -z` +
//! `perform_tests`), and this process prints its results.

pub mod args;
pub mod engine;
pub mod hist;
pub mod job;
pub mod local;
pub mod options;
pub mod pattern;
pub mod remote;
pub mod report;

pub use args::{PerfArgs, Workload};
pub use engine::Outcome;
pub use options::RunOptions;

use serde_json::Value;
use std::process::ExitCode;
use thiserror::Error;

/// Why a perf run could not be set up or carried out.
#[derive(Debug, Error)]
pub enum PerfError {
    /// Bad options.
    #[error("{0}")]
    Args(String),
    /// The reactors could not start.
    #[error("reactors: {0}")]
    Reactor(#[from] reactor::ReactorError),
    /// A bdev could not be created or used.
    #[error("{0}")]
    Bdev(#[from] bdev::BdevError),
    /// The JSON config could not be replayed.
    #[error("config: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// A job failed to start.
    #[error("job on {bdev}: {msg}")]
    Job {
        /// The bdev.
        bdev: String,
        /// What went wrong.
        msg: String,
    },
    /// The daemon refused or failed the run (`-s`).
    #[error("{0}")]
    Remote(String),
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
