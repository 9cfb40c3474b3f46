//! sluice block jobs: the job framework and its drivers.
//!
//! # Contract
//!
//! - **The framework decides, a driver does the work.** A job type is a
//!   [`job::JobDriver`] (QEMU's `JobDriver`: `run`, `prepare`, `commit`,
//!   `abort`, `clean`; a job that converges calls [`job::Job::set_ready`]
//!   and pivots on [`job::Job::complete_requested`]) plus a
//!   [`job::JobKind`] (its QAPI type name, and whether it is a block job).
//!   [`job::start`] creates the job in the [`job::JobManager`] (id and node
//!   checks), makes it `running` before returning, and runs the driver as a
//!   task on the reactor the caller names; [`job::drive`] takes it through
//!   waiting, pending, finalize, prepare/commit or abort, clean, concluded
//!   and (auto-dismiss) null. A driver never sets a status.
//! - **One state machine.** Transitions and verbs follow QEMU's tables in
//!   `job/state.rs`, the only source of truth; every command
//!   (pause, resume, cancel, set-speed, complete, finalize, dismiss) is
//!   checked against them in one place and refused with QEMU's message.
//! - **Speed, progress, errors are the framework's.** The token bucket
//!   ([`ratelimit`]) is in the job, progress is the job's `(offset, len)`,
//!   the `on-error` policy is decided by [`job::Job::io_error`].
//! - **Events are data.** Each change is a [`job::JobEvent`] handed to the
//!   manager's sink, synchronously, under the job's lock; rendering them as
//!   QMP (`JOB_STATUS_CHANGE`, `BLOCK_JOB_*`, `BLOCK_STREAM_COMPLETED`) or
//!   answering `query-jobs` is the control plane's (the `rpc` crate).
//! - **Copying jobs share the copier.** [`copy::copy_all`] walks, windows,
//!   rate-limits, retries and reports progress for
//!   any [`copy::CopyOps`] (the stream's and the commit's). Jobs that
//!   converge on a moving source (the mirror, the active commit) share the
//!   mirror core ([`drivers::mirror::Mirror`]): a dirty map copied pipelined,
//!   ready when clean, the devices moved onto the target at the pivot.
//! - **Threads.** Commands come from any thread and take the job's lock
//!   briefly; the driver and the copier run on one reactor, with no lock,
//!   allocation or atomic read-modify-write per chunk in steady state.
//!
//! A new job type is one file in `drivers/` (its driver, kind and start
//! function) and one methods file in `rpc` (parse, call, render) registered
//! in the method table.

pub mod copy;
pub mod drivers;
pub mod job;
pub mod ratelimit;

/// The event bus, re-exported from the graph layer where it lives.
pub use graph::events;
