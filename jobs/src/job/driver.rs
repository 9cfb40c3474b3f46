//! The driver interface, in the spirit of QEMU's `JobDriver`
//! (`include/qemu/job.h`): a driver does the work, the framework decides.
//!
//! The framework ([`super::start`]) calls, on the reactor the job was started
//! on and never concurrently:
//!
//! 1. [`JobDriver::run`] once, with the job `running`. It returns when the
//!    work is done (`Ok`), failed (`Err`: the job's error) or the job was
//!    cancelled ([`super::Job::is_cancelled`]; the result is then ignored).
//!    It honours pause and cancel at its pause points
//!    ([`super::Job::pause_point`]), the speed limit
//!    ([`super::Job::rate_delay`]) and reports progress
//!    ([`super::Job::add_progress`]) and I/O errors
//!    ([`super::Job::io_error`], which applies the `on-error` policy).
//!    A job that converges and waits for a pivot (mirror) calls
//!    [`super::Job::set_ready`] and goes on until
//!    [`super::Job::complete_requested`] (`job-complete`, accepted by the
//!    verb table only while the job is ready).
//! 2. After a successful run, once the job is finalized (at once with
//!    auto-finalize, else after `job-finalize`): [`JobDriver::prepare`]
//!    (the fallible part of the final graph change), then
//!    [`JobDriver::commit`] if it succeeded or [`JobDriver::abort`] if not.
//!    After a failed or cancelled run: [`JobDriver::abort`] only.
//! 3. [`JobDriver::clean`] always, last (give back what `start` took).
//!
//! Then the framework publishes the final events, concludes the job and
//! (with auto-dismiss) removes it. The driver never touches the status.

use super::control::Job;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A driver's step (runs on a reactor: need not be `Send`).
pub type Step<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// A job type's behaviour. The value is built where the job is started and
/// moved to the job's reactor (hence `Send`); its steps run there.
pub trait JobDriver: Send + 'static {
    /// Does the work (see the module doc).
    fn run<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>>;

    /// Makes the result visible; an error aborts the job with that error.
    fn prepare<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        let _ = job;
        Box::pin(async { Ok(()) })
    }

    /// The job succeeded (after a successful `prepare`).
    fn commit<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, ()> {
        let _ = job;
        Box::pin(async {})
    }

    /// The job failed or was cancelled (or `prepare` failed).
    fn abort<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, ()> {
        let _ = job;
        Box::pin(async {})
    }

    /// Always, after commit or abort.
    fn clean<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, ()> {
        let _ = job;
        Box::pin(async {})
    }
}
