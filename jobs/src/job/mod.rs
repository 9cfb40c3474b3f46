//! The job framework: QEMU's state machine and verbs (`state`), the
//! arguments every block job takes (`args`), a job's
//! control block (`control`), the driver interface (`driver`), events as
//! data (`event`), the open job type (`kind`), the table of jobs (`manager`)
//! and the life of a job from start to conclusion (`run`).

mod args;
mod control;
pub mod driver;
pub mod event;
pub mod filter;
mod kind;
mod manager;
mod run;
pub mod state;

pub use args::BlockJobArgs;
pub use control::{IoOperation, Job, JobInfo, JobSpec, OnError, SharedLimit, Verdict};
pub use driver::{JobDriver, Step};
pub use event::{EventSink, JobEvent, JobSnapshot};
pub use kind::JobKind;
pub use manager::{id_wellformed, JobError, JobManager};
pub use run::{drive, start};
pub use state::{JobStatus, JobVerb};
