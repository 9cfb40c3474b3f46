//! The framework's side of a job's life: create it, start it, run its driver
//! on a reactor and take it through QEMU's completion (`job_completed`):
//! waiting, pending, finalize, prepare, commit or abort, clean, concluded.

use super::control::{Job, JobSpec};
use super::driver::JobDriver;
use super::manager::{JobError, JobManager};
use reactor::RuntimeHandle;
use std::sync::Arc;

/// Creates the job for `spec` (checking its id and nodes), sets its length
/// (`len`: known before the command returns, so a query right after sees
/// it), starts it (running by the time this returns, as in QEMU) and spawns
/// its driver on reactor `owner`. Returns at once.
pub fn start<D: JobDriver>(
    mgr: &JobManager,
    rt: &RuntimeHandle,
    spec: JobSpec,
    owner: usize,
    len: Option<u64>,
    driver: D,
) -> Result<Arc<Job>, JobError> {
    let job = mgr.create(spec)?;
    if let Some(len) = len {
        job.set_len(len);
    }
    job.start();
    let j = job.clone();
    drop(rt.spawn_on(owner, move || drive(j, driver)));
    Ok(job)
}

/// Runs `driver` for the running `job` to its end. Returns the job's final
/// error (None on success or cancel).
pub async fn drive<D: JobDriver>(job: Arc<Job>, mut driver: D) -> Option<String> {
    let t0 = std::time::Instant::now();
    let run = driver.run(&job).await;
    let run_s = t0.elapsed().as_secs_f64();
    // A run that failed keeps its error even when cancelled meanwhile (the
    // job then completes with it rather than being cancelled).
    let mut error = run.err();
    let mut ok = error.is_none() && !job.is_cancelled();
    if ok {
        job.wait_finalized().await;
        ok = !job.is_cancelled();
    }
    if ok {
        match driver.prepare(&job).await {
            Ok(()) => driver.commit(&job).await,
            Err(e) => {
                ok = false;
                error = Some(e);
                driver.abort(&job).await;
            }
        }
    } else {
        driver.abort(&job).await;
    }
    driver.clean(&job).await;
    job.conclude(ok, error.clone());
    let total_s = t0.elapsed().as_secs_f64();
    let ty = job.spec().kind.as_str();
    match &error {
        Some(e) => tracing::warn!(job = %job.id(), ty, error = %e, run_s, total_s, "job failed"),
        None => tracing::info!(job = %job.id(), ty, cancelled = !ok, run_s, total_s, "job ended"),
    }
    error
}
