//! The bdevperf engine behind `sluice perf` and `bdev_perf_run`: SPDK
//! bdevperf's job. One job per reactor per bdev (each on its own share of the
//! bdev) keeps `-q` requests in flight for `-t` seconds, callback-driven with
//! preallocated requests; the results come back as bdevperf's JSON document,
//! and [`report::table`] prints them as bdevperf does.
//!
//! The engine runs on reactors it is handed ([`engine::run`]) against bdevs
//! already in the registry; who starts the reactors and makes the bdevs (the
//! `sluice perf` command in its own process, or a running daemon for
//! `bdev_perf_run`) is the caller's business.

pub mod args;
pub mod engine;
pub mod hist;
pub mod job;
pub mod options;
pub mod pattern;
pub mod report;

pub use args::{PerfArgs, Workload};
pub use engine::Outcome;
pub use options::RunOptions;

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
    /// A job failed to start.
    #[error("job on {bdev}: {msg}")]
    Job {
        /// The bdev.
        bdev: String,
        /// What went wrong.
        msg: String,
    },
}
