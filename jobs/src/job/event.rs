//! What the framework tells the world about a job, as data.
//!
//! Every change of a job is one [`JobEvent`], handed to the [`EventSink`] the
//! [`super::JobManager`] was made with, synchronously and under the job's
//! control lock (so a client that saw an event and then queries finds the job
//! in the state the event announced). The jobs crate renders nothing: the
//! control plane turns events into QMP events (`JOB_STATUS_CHANGE`,
//! `BLOCK_JOB_*`, the 2011 API's `BLOCK_STREAM_COMPLETED`) or anything else.

use super::control::{IoOperation, JobSpec, Verdict};
use super::state::JobStatus;
use std::sync::Arc;

/// One change of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// The status changed (QEMU's `JOB_STATUS_CHANGE`).
    StatusChange {
        /// Job id.
        id: String,
        /// The new status.
        status: JobStatus,
    },
    /// An I/O failed and the error policy decided (`BLOCK_JOB_ERROR`).
    IoError {
        /// The job.
        job: JobSnapshot,
        /// Read or write.
        operation: IoOperation,
        /// What the policy decided.
        action: Verdict,
    },
    /// The job is waiting for `job-finalize` (`BLOCK_JOB_PENDING`).
    Pending {
        /// The job.
        job: JobSnapshot,
    },
    /// The job converged and waits for `job-complete` (`BLOCK_JOB_READY`).
    Ready {
        /// The job.
        job: JobSnapshot,
    },
    /// The job ended, with `error` or successfully (`BLOCK_JOB_COMPLETED`).
    Completed {
        /// The job at its end.
        job: JobSnapshot,
        /// Why it failed.
        error: Option<String>,
    },
    /// The job was cancelled (`BLOCK_JOB_CANCELLED`).
    Cancelled {
        /// The job at its end.
        job: JobSnapshot,
    },
}

/// What an event says about its job: the creation parameters and the
/// progress and speed at the moment of the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSnapshot {
    /// The job's creation parameters.
    pub spec: Arc<JobSpec>,
    /// Work done.
    pub offset: u64,
    /// Total work.
    pub len: u64,
    /// Bytes/s (0: unlimited).
    pub speed: u64,
}

/// Receives every job event (see the module doc for when).
pub type EventSink = Arc<dyn Fn(&JobEvent) + Send + Sync>;

/// A sink that drops every event (tests that only look at job state).
pub fn discard() -> EventSink {
    Arc::new(|_| {})
}
