//! The job framework: a job's control block (status, progress, speed, pause,
//! cancel, error policy, events) shared between the RPC threads that command it
//! and the reactor task that runs it, and the table of jobs.

mod control;
mod manager;
pub mod state;

pub use control::{IoOperation, Job, JobSpec, JobType, OnError, Verdict};
pub use manager::{id_wellformed, JobError, JobManager};
pub use state::{JobStatus, JobVerb};
