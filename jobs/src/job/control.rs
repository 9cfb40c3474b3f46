//! A job's control block: what the RPC threads set (pause, resume, cancel,
//! speed, finalize) and what the running task reports (status, progress,
//! errors), with QEMU's events on every change.

use super::state::{can_transition, verb_allowed, verb_refused_message, JobStatus, JobVerb};
use crate::ratelimit::RateLimiter;
use graph::events::EventBus;
use serde_json::{json, Value};
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Poll, Waker};

/// The kinds of jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobType {
    /// Image streaming.
    Stream,
    /// Image creation (`blockdev-create`): a job, not a block job.
    Create,
}

impl JobType {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::Stream => "stream",
            JobType::Create => "create",
        }
    }

    /// Whether jobs of this type are block jobs: listed by
    /// `query-block-jobs`, addressed by `block-job-*`, announced with
    /// `BLOCK_JOB_*` events.
    pub fn is_block_job(self) -> bool {
        match self {
            JobType::Stream => true,
            JobType::Create => false,
        }
    }
}

/// What to do when an I/O of the job fails (QAPI `BlockdevOnError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Fail the job.
    Report,
    /// Note the error, go on; the job ends with the error.
    Ignore,
    /// Pause the job (resume retries).
    Stop,
    /// Stop on ENOSPC, report anything else.
    Enospc,
}

impl OnError {
    /// Parses the QAPI name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "report" => OnError::Report,
            "ignore" => OnError::Ignore,
            "stop" => OnError::Stop,
            "enospc" => OnError::Enospc,
            _ => return None,
        })
    }
}

/// Whether a failed I/O was a read or a write (QAPI `IoOperationType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOperation {
    /// Reading the source.
    Read,
    /// Writing the target.
    Write,
}

/// What the job does about one failed I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// End the job with the error.
    Report,
    /// Go on (the job still ends with the error).
    Ignore,
    /// Pause; retry the request after resume.
    Stop,
}

/// How a job is created.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Job id.
    pub id: String,
    /// Type.
    pub job_type: JobType,
    /// The device (or node) name the job works on.
    pub device: String,
    /// Initial speed in bytes/s (0: unlimited).
    pub speed: u64,
    /// Error policy.
    pub on_error: OnError,
    /// Finalize without `job-finalize`.
    pub auto_finalize: bool,
    /// Dismiss without `job-dismiss`.
    pub auto_dismiss: bool,
    /// Started through the 2011 API (`block_stream`): also emit `BLOCK_STREAM_COMPLETED`.
    pub legacy: bool,
    /// Nodes the job uses; other jobs on them are refused.
    pub nodes: Vec<String>,
}

#[derive(Debug)]
struct Ctl {
    status: JobStatus,
    user_paused: bool,
    cancelled: bool,
    finalize_requested: bool,
    io_status: &'static str,
    error: Option<String>,
    limiter: RateLimiter,
    waker: Option<Waker>,
    busy: bool,
    kicked: bool,
    stopped_waiters: Vec<futures::channel::oneshot::Sender<()>>,
}

/// A job's control block.
pub struct Job {
    spec: JobSpec,
    events: EventBus,
    ctl: Mutex<Ctl>,
    offset: AtomicU64,
    len: AtomicU64,
    started: AtomicBool,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.spec.id)
            .field("status", &self.status())
            .finish()
    }
}

fn now_ns() -> u64 {
    reactor::ticks_to_ns(reactor::ticks())
}

impl Job {
    /// A job in status `created` (the `JOB_STATUS_CHANGE` is published).
    pub fn new(spec: JobSpec, events: EventBus) -> Job {
        let j = Job {
            ctl: Mutex::new(Ctl {
                status: JobStatus::Undefined,
                user_paused: false,
                cancelled: false,
                finalize_requested: false,
                io_status: "ok",
                error: None,
                limiter: RateLimiter::new(spec.speed, now_ns()),
                waker: None,
                busy: false,
                kicked: false,
                stopped_waiters: Vec::new(),
            }),
            spec,
            events,
            offset: AtomicU64::new(0),
            len: AtomicU64::new(0),
            started: AtomicBool::new(false),
        };
        let mut c = j.lock();
        j.transition(&mut c, JobStatus::Created);
        drop(c);
        j
    }

    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn transition(&self, c: &mut Ctl, to: JobStatus) {
        if !can_transition(c.status, to) {
            tracing::error!(job = %self.spec.id, from = %c.status, to = %to, "illegal job transition refused");
            return;
        }
        c.status = to;
        tracing::debug!(job = %self.spec.id, status = %to, "job status");
        self.events.publish(
            "JOB_STATUS_CHANGE",
            json!({"id": self.spec.id, "status": to.as_str()}),
        );
    }

    fn wake(c: &mut Ctl) {
        c.kicked = true;
        if let Some(w) = c.waker.take() {
            w.wake();
        }
    }

    /// The job id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }
    /// The job's creation parameters.
    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }
    /// Current status.
    pub fn status(&self) -> JobStatus {
        self.lock().status
    }
    /// Current speed (bytes/s, 0 = unlimited).
    pub fn speed(&self) -> u64 {
        self.lock().limiter.speed()
    }
    /// Progress: (offset, len).
    pub fn progress(&self) -> (u64, u64) {
        (
            self.offset.load(Ordering::Relaxed),
            self.len.load(Ordering::Relaxed),
        )
    }
    /// Sets the total amount of work.
    pub fn set_len(&self, len: u64) {
        self.len.store(len, Ordering::Relaxed);
    }
    /// Adds done work.
    pub fn add_progress(&self, n: u64) {
        self.offset.fetch_add(n, Ordering::Relaxed);
    }
    /// Whether cancel was requested.
    pub fn is_cancelled(&self) -> bool {
        self.lock().cancelled
    }
    /// Whether the job must reach a pause point and wait (user pause or error stop).
    pub fn pause_requested(&self) -> bool {
        self.lock().user_paused
    }

    /// Checks a verb against the current status, with QEMU's message.
    pub fn check_verb(&self, verb: JobVerb) -> Result<(), String> {
        let st = self.lock().status;
        if verb_allowed(verb, st) {
            Ok(())
        } else {
            Err(verb_refused_message(&self.spec.id, st, verb))
        }
    }

    // ---- commands (RPC threads) ----

    /// `job-pause`.
    pub fn pause(&self) -> Result<(), String> {
        let mut c = self.lock();
        if !verb_allowed(JobVerb::Pause, c.status) {
            return Err(verb_refused_message(
                &self.spec.id,
                c.status,
                JobVerb::Pause,
            ));
        }
        if c.user_paused {
            return Err("Job is already paused".into());
        }
        c.user_paused = true;
        Self::wake(&mut c);
        Ok(())
    }

    /// `job-resume`: also clears an error stop (io-status back to ok).
    pub fn resume(&self) -> Result<(), String> {
        let mut c = self.lock();
        if !verb_allowed(JobVerb::Resume, c.status) {
            return Err(verb_refused_message(
                &self.spec.id,
                c.status,
                JobVerb::Resume,
            ));
        }
        if !c.user_paused {
            return Err("Can't resume a job that was not paused".into());
        }
        c.user_paused = false;
        c.io_status = "ok";
        Self::wake(&mut c);
        Ok(())
    }

    /// `block-job-set-speed` (the caller has refused negative values).
    pub fn set_speed(&self, speed: u64) -> Result<(), String> {
        let mut c = self.lock();
        if !verb_allowed(JobVerb::SetSpeed, c.status) {
            return Err(verb_refused_message(
                &self.spec.id,
                c.status,
                JobVerb::SetSpeed,
            ));
        }
        c.limiter.set_speed(speed, now_ns());
        Self::wake(&mut c);
        Ok(())
    }

    /// `job-cancel`: the job stops at its next pause point (a paused job is
    /// woken to do so). The receiver resolves once the job has stopped.
    pub fn cancel(&self) -> Result<futures::channel::oneshot::Receiver<()>, String> {
        let mut c = self.lock();
        if !verb_allowed(JobVerb::Cancel, c.status) {
            return Err(verb_refused_message(
                &self.spec.id,
                c.status,
                JobVerb::Cancel,
            ));
        }
        let (tx, rx) = futures::channel::oneshot::channel();
        c.stopped_waiters.push(tx);
        c.cancelled = true;
        c.user_paused = false;
        Self::wake(&mut c);
        Ok(rx)
    }

    /// `job-finalize`.
    pub fn finalize(&self) -> Result<(), String> {
        let mut c = self.lock();
        if !verb_allowed(JobVerb::Finalize, c.status) {
            return Err(verb_refused_message(
                &self.spec.id,
                c.status,
                JobVerb::Finalize,
            ));
        }
        c.finalize_requested = true;
        Self::wake(&mut c);
        Ok(())
    }

    /// `job-dismiss`: concluded -> null.
    pub fn dismiss(&self) -> Result<(), String> {
        let mut c = self.lock();
        if !verb_allowed(JobVerb::Dismiss, c.status) {
            return Err(verb_refused_message(
                &self.spec.id,
                c.status,
                JobVerb::Dismiss,
            ));
        }
        self.transition(&mut c, JobStatus::Null);
        Ok(())
    }

    // ---- the running task (reactor) ----

    /// created -> running.
    pub fn start(&self) {
        self.started.store(true, Ordering::Relaxed);
        let mut c = self.lock();
        c.busy = true;
        self.transition(&mut c, JobStatus::Running);
    }

    /// Takes `n` bytes from the rate limit: `None` to go on, `Some(ns)` to wait.
    pub fn rate_delay(&self, n: u64) -> Option<u64> {
        self.lock().limiter.try_acquire(n, now_ns())
    }

    /// Resolves at the next command (pause, resume, cancel, speed, finalize)
    /// or [`Job::kick`].
    pub async fn wait_kick(&self) {
        poll_fn(|cx| {
            let mut c = self.lock();
            if c.kicked {
                c.kicked = false;
                Poll::Ready(())
            } else {
                c.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Wakes [`Job::wait_kick`] (from the job's own sub-tasks).
    pub fn kick(&self) {
        Self::wake(&mut self.lock());
    }

    /// A pause point, reached with nothing in flight. While a pause is
    /// requested the job is `paused` and not busy; returns `false` when
    /// cancelled.
    pub async fn pause_point(&self) -> bool {
        {
            let mut c = self.lock();
            if c.cancelled {
                return false;
            }
            if !c.user_paused {
                return true;
            }
            c.busy = false;
            if c.status == JobStatus::Running {
                self.transition(&mut c, JobStatus::Paused);
            }
        }
        loop {
            self.wait_kick().await;
            let mut c = self.lock();
            if c.cancelled || !c.user_paused {
                c.busy = true;
                if c.status == JobStatus::Paused {
                    self.transition(&mut c, JobStatus::Running);
                }
                return !c.cancelled;
            }
        }
    }

    /// Decides about a failed I/O per the error policy, publishing
    /// `BLOCK_JOB_ERROR`; `Stop` also pauses the job (io-status failed / nospace).
    pub fn io_error(&self, op: IoOperation, errno: i32) -> Verdict {
        let nospace = errno == libc::ENOSPC;
        let verdict = match self.spec.on_error {
            OnError::Report => Verdict::Report,
            OnError::Ignore => Verdict::Ignore,
            OnError::Stop => Verdict::Stop,
            OnError::Enospc if nospace => Verdict::Stop,
            OnError::Enospc => Verdict::Report,
        };
        let action = match verdict {
            Verdict::Report => "report",
            Verdict::Ignore => "ignore",
            Verdict::Stop => "stop",
        };
        let operation = match op {
            IoOperation::Read => "read",
            IoOperation::Write => "write",
        };
        let mut c = self.lock();
        if verdict == Verdict::Stop {
            c.user_paused = true;
            c.io_status = if nospace { "nospace" } else { "failed" };
        }
        drop(c);
        self.events.publish(
            "BLOCK_JOB_ERROR",
            json!({"device": self.spec.id, "operation": operation, "action": action}),
        );
        verdict
    }

    /// The work is done (`error`: why it failed). Runs QEMU's completion:
    /// waiting -> pending (-> wait for finalize) -> `prepare` -> concluded, or
    /// aborting -> concluded on error or cancel; then null when auto-dismissed.
    /// Returns the final error (None on success or cancel).
    pub async fn complete<F, Fut>(&self, error: Option<String>, prepare: F) -> Option<String>
    where
        F: FnOnce(bool) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let mut error = error;
        let cancelled = self.is_cancelled();
        let mut ok = error.is_none() && !cancelled;
        if ok {
            {
                let mut c = self.lock();
                c.busy = false;
                self.transition(&mut c, JobStatus::Waiting);
                self.transition(&mut c, JobStatus::Pending);
            }
            if !self.spec.auto_finalize {
                if self.spec.job_type.is_block_job() {
                    self.events.publish(
                        "BLOCK_JOB_PENDING",
                        json!({"type": self.spec.job_type.as_str(), "id": self.spec.id}),
                    );
                }
                loop {
                    {
                        let c = self.lock();
                        if c.finalize_requested || c.cancelled {
                            break;
                        }
                    }
                    self.wait_kick().await;
                }
            }
            if self.is_cancelled() {
                ok = false;
            }
        }
        // prepare(true) commits the graph change; prepare(false) is the abort path.
        if let Err(e) = prepare(ok).await {
            if ok {
                ok = false;
                error = Some(e);
            }
        }
        let cancelled = !ok && error.is_none();
        // Events and the final transitions happen under the lock, so a client
        // that saw BLOCK_JOB_COMPLETED and queries finds the job concluded
        // (or gone), as with QEMU's single-threaded monitor.
        let mut c = self.lock();
        c.busy = false;
        if !ok {
            self.transition(&mut c, JobStatus::Aborting);
        }
        c.error.clone_from(&error);
        let (offset, len) = self.progress();
        let speed = c.limiter.speed();
        let ty = self.spec.job_type.as_str();
        let mut d = json!({"type": ty, "device": self.spec.id, "len": len, "offset": offset, "speed": speed});
        // Other jobs (create) are told about by JOB_STATUS_CHANGE only.
        if self.spec.job_type.is_block_job() {
            if cancelled {
                self.events.publish("BLOCK_JOB_CANCELLED", d);
            } else {
                if let Some(e) = &error {
                    d["error"] = json!(e);
                }
                self.events.publish("BLOCK_JOB_COMPLETED", d);
                if self.spec.legacy {
                    let mut d = json!({"device": self.spec.device, "len": len, "offset": offset});
                    if let Some(e) = &error {
                        d["error"] = json!(e);
                    }
                    self.events.publish("BLOCK_STREAM_COMPLETED", d);
                }
            }
        }
        self.transition(&mut c, JobStatus::Concluded);
        if self.spec.auto_dismiss {
            self.transition(&mut c, JobStatus::Null);
        }
        for w in c.stopped_waiters.drain(..) {
            let _ = w.send(());
        }
        error
    }

    /// The `query-block-jobs` entry (QAPI `BlockJobInfo`).
    pub fn block_job_info(&self) -> Value {
        let c = self.lock();
        let (offset, len) = self.progress();
        let mut v = json!({
            "type": self.spec.job_type.as_str(),
            "device": self.spec.id,
            "len": len,
            "offset": offset,
            "busy": c.busy,
            "paused": c.user_paused,
            "speed": c.limiter.speed(),
            "io-status": c.io_status,
            "ready": false,
            "status": c.status.as_str(),
            "auto-finalize": self.spec.auto_finalize,
            "auto-dismiss": self.spec.auto_dismiss,
        });
        if let Some(e) = &c.error {
            v["error"] = json!(e);
        }
        v
    }

    /// The `query-jobs` entry (QAPI `JobInfo`).
    pub fn job_info(&self) -> Value {
        let c = self.lock();
        let (offset, len) = self.progress();
        let mut v = json!({
            "id": self.spec.id,
            "type": self.spec.job_type.as_str(),
            "status": c.status.as_str(),
            "current-progress": offset,
            "total-progress": len,
        });
        if let Some(e) = &c.error {
            v["error"] = json!(e);
        }
        v
    }
}
