//! A job's control block: what the control plane commands (pause, resume,
//! cancel, speed, complete, finalize, dismiss: each checked against the verb
//! table in one place, [`Job::command`]) and what the running driver reports
//! (progress, I/O errors, ready), with a [`JobEvent`] for every change.
//!
//! Commands come from any thread; the driver's side runs on the job's
//! reactor. Progress is two relaxed atomics (no lock per chunk); everything
//! else is under one mutex, which commands and status changes take briefly.
//!
//! As in QEMU, the status a query sees right after a verb's reply is the one
//! the verb leads to: a verb on a job parked at its pause point changes the
//! status itself (resume: paused -> running at once), and the control plane
//! waits, bounded, with [`Job::settle`] for what only the job's reactor can
//! do (reach the pause point after `pause`, stop after `cancel`, leave
//! pending after `finalize`).

use super::event::{EventSink, JobEvent, JobSnapshot};
use super::kind::JobKind;
use super::state::{can_transition, verb_allowed, verb_refused_message, JobStatus, JobVerb};
use crate::ratelimit::RateLimiter;
use std::any::Any;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::task::{Poll, Waker};
use std::time::Duration;

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
            // QEMU's block jobs treat `auto` as `enospc` (`block_job_error_action`).
            "auto" => OnError::Enospc,
            _ => return None,
        })
    }

    /// What the policy decides about a failure with `errno` (positive).
    pub fn verdict(self, errno: i32) -> Verdict {
        match self {
            OnError::Report => Verdict::Report,
            OnError::Ignore => Verdict::Ignore,
            OnError::Stop => Verdict::Stop,
            OnError::Enospc if errno.abs() == libc::ENOSPC => Verdict::Stop,
            OnError::Enospc => Verdict::Report,
        }
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

impl IoOperation {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            IoOperation::Read => "read",
            IoOperation::Write => "write",
        }
    }
}

/// What the job does about one failed I/O (QAPI `BlockErrorAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// End the job with the error.
    Report,
    /// Go on (the job still ends with the error).
    Ignore,
    /// Pause; retry the request after resume.
    Stop,
}

impl Verdict {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Report => "report",
            Verdict::Ignore => "ignore",
            Verdict::Stop => "stop",
        }
    }
}

/// How a job is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    /// Job id.
    pub id: String,
    /// Type, as the driver declares it.
    pub kind: JobKind,
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
    /// Started through the 2011 API (`block_stream`): the control plane
    /// also announces its end the 2011 way.
    pub legacy: bool,
    /// Nodes the job uses; other jobs on them are refused.
    pub nodes: Vec<String>,
    /// A throttle group the job's copying shares (`x-throttle-group`).
    pub throttle: Option<SharedLimit>,
}

/// A throttle group a job's copying is limited by, with every other member
/// of the group (see `bdev::throttle`). Equal when it is the same use.
#[derive(Debug, Clone)]
pub struct SharedLimit(pub Arc<bdev::throttle::GroupUse>);

impl PartialEq for SharedLimit {
    fn eq(&self, o: &Self) -> bool {
        Arc::ptr_eq(&self.0, &o.0)
    }
}
impl Eq for SharedLimit {}

impl SharedLimit {
    /// Reserves `bytes` of copying: the nanoseconds to wait before starting.
    pub fn reserve(&self, bytes: u64) -> u64 {
        self.0.group().reserve(true, bytes)
    }
}

/// A job's state at one moment, for `query-jobs` / `query-block-jobs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// The creation parameters.
    pub spec: Arc<JobSpec>,
    /// Status.
    pub status: JobStatus,
    /// Work done.
    pub offset: u64,
    /// Total work.
    pub len: u64,
    /// Doing work now (not paused, not waiting for finalize).
    pub busy: bool,
    /// A pause was requested (by the user or by an error stop).
    pub paused: bool,
    /// Bytes/s.
    pub speed: u64,
    /// `ok`, `failed` or `nospace` (QAPI `BlockDeviceIoStatus`).
    pub io_status: &'static str,
    /// Converged, waiting for `job-complete`.
    pub ready: bool,
    /// Why it failed, once concluded.
    pub error: Option<String>,
    /// A mirror in write-blocking mode with nothing dirty (QEMU's
    /// `actively-synced`).
    pub actively_synced: bool,
}

#[derive(Debug)]
pub(super) struct Ctl {
    pub(super) status: JobStatus,
    user_paused: bool,
    cancelled: bool,
    soft_cancelled: bool,
    finalize_requested: bool,
    complete_requested: bool,
    io_status: &'static str,
    error: Option<String>,
    limiter: RateLimiter,
    waker: Option<Waker>,
    pub(super) busy: bool,
    kicked: bool,
    /// The driver waits in [`Job::pause_point`] (nothing in flight).
    parked: bool,
    stopped_waiters: Vec<futures::channel::oneshot::Sender<()>>,
}

/// A job's control block.
pub struct Job {
    spec: Arc<JobSpec>,
    sink: EventSink,
    ctl: Mutex<Ctl>,
    /// Notified on every status change and when the job parks.
    changed: Condvar,
    offset: AtomicU64,
    len: AtomicU64,
    actively_synced: AtomicBool,
    /// The driver's state the control plane may reach (a mirror's copy
    /// mode, for `block-job-change`), set once by the driver's start.
    ext: OnceLock<Arc<dyn Any + Send + Sync>>,
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
    /// A job in status `created` (the status change is published).
    pub fn new(spec: JobSpec, sink: EventSink) -> Job {
        let j = Job {
            ctl: Mutex::new(Ctl {
                status: JobStatus::Undefined,
                user_paused: false,
                cancelled: false,
                soft_cancelled: false,
                finalize_requested: false,
                complete_requested: false,
                io_status: "ok",
                error: None,
                limiter: RateLimiter::new(spec.speed, now_ns()),
                waker: None,
                busy: false,
                kicked: false,
                parked: false,
                stopped_waiters: Vec::new(),
            }),
            changed: Condvar::new(),
            spec: Arc::new(spec),
            sink,
            offset: AtomicU64::new(0),
            len: AtomicU64::new(0),
            actively_synced: AtomicBool::new(false),
            ext: OnceLock::new(),
        };
        let mut c = j.lock();
        j.transition(&mut c, JobStatus::Created);
        drop(c);
        j
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves to `to` if the state machine allows it, publishing the change.
    pub(super) fn transition(&self, c: &mut Ctl, to: JobStatus) {
        if !can_transition(c.status, to) {
            tracing::error!(job = %self.spec.id, from = %c.status, to = %to, "illegal job transition refused");
            return;
        }
        c.status = to;
        self.changed.notify_all();
        tracing::debug!(job = %self.spec.id, status = %to, "job status");
        self.publish(&JobEvent::StatusChange {
            id: self.spec.id.clone(),
            status: to,
        });
    }

    pub(super) fn publish(&self, e: &JobEvent) {
        (self.sink)(e)
    }

    pub(super) fn snapshot(&self, c: &Ctl) -> JobSnapshot {
        let (offset, len) = self.progress();
        JobSnapshot {
            spec: self.spec.clone(),
            offset,
            len,
            speed: c.limiter.speed(),
        }
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
    /// Adds done work (from the job's reactor only: a load and a store).
    pub fn add_progress(&self, n: u64) {
        let o = self.offset.load(Ordering::Relaxed);
        self.offset.store(o + n, Ordering::Relaxed);
    }
    /// Whether cancel was requested.
    pub fn is_cancelled(&self) -> bool {
        self.lock().cancelled
    }
    /// Whether the job must reach a pause point and wait (user pause or error stop).
    pub fn pause_requested(&self) -> bool {
        self.lock().user_paused
    }
    /// Whether `job-complete` was accepted (jobs that became ready).
    pub fn complete_requested(&self) -> bool {
        self.lock().complete_requested
    }

    /// The job's state now.
    pub fn info(&self) -> JobInfo {
        let c = self.lock();
        let (offset, len) = self.progress();
        JobInfo {
            spec: self.spec.clone(),
            status: c.status,
            offset,
            len,
            busy: c.busy,
            paused: c.user_paused,
            speed: c.limiter.speed(),
            io_status: c.io_status,
            ready: matches!(c.status, JobStatus::Ready | JobStatus::Standby),
            error: c.error.clone(),
            actively_synced: self.actively_synced.load(Ordering::Relaxed),
        }
    }

    /// A job created but refused before it started (QEMU's `job_create`
    /// followed by a failed setting, such as a negative speed): created ->
    /// null, which the table forgets.
    pub fn abandon(&self) {
        let mut c = self.lock();
        self.transition(&mut c, JobStatus::Null);
    }

    /// Records whether a mirror is actively synced (see [`JobInfo`]).
    pub fn set_actively_synced(&self, v: bool) {
        self.actively_synced.store(v, Ordering::Relaxed);
    }

    /// Attaches the driver's state for the control plane (once; a second
    /// call is ignored).
    pub fn set_ext(&self, ext: Arc<dyn Any + Send + Sync>) {
        let _ = self.ext.set(ext);
    }

    /// The driver's state, if it is a `T`.
    pub fn ext<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.ext.get()?.clone().downcast::<T>().ok()
    }

    // ---- commands (control plane) ----

    /// Runs `verb`: refused with QEMU's message unless the verb table allows
    /// it in the current status, then `f` decides under the lock and the
    /// job is woken. The one place verbs are checked.
    fn command<T>(
        &self,
        verb: JobVerb,
        f: impl FnOnce(&Job, &mut Ctl) -> Result<T, String>,
    ) -> Result<T, String> {
        let mut c = self.lock();
        if !verb_allowed(verb, c.status) {
            return Err(verb_refused_message(&self.spec.id, c.status, verb));
        }
        let r = f(self, &mut c)?;
        self.reconcile_parked(&mut c);
        Self::wake(&mut c);
        Ok(r)
    }

    /// A job parked at its pause point takes the status the commands ask
    /// for at once (QEMU enters the job's coroutine from the command): paused
    /// or standby while a pause is requested, running or ready otherwise.
    fn reconcile_parked(&self, c: &mut Ctl) {
        if !c.parked {
            return;
        }
        let pause = c.user_paused && !c.cancelled;
        c.busy = !pause;
        let to = match (c.status, pause) {
            (JobStatus::Running, true) => JobStatus::Paused,
            (JobStatus::Ready, true) => JobStatus::Standby,
            (JobStatus::Paused, false) => JobStatus::Running,
            (JobStatus::Standby, false) => JobStatus::Ready,
            _ => return,
        };
        self.transition(c, to);
    }

    /// Waits (at most `timeout`) until the job's reactor has acted on `verb`:
    /// a pause has reached the pause point, a cancel has concluded the job, a
    /// finalize has left pending. For the control plane's threads, never a
    /// reactor's. Returns whether the job got there in time (a job whose I/O
    /// hangs still answers; its status then lags).
    /// Jobs other than block jobs (`blockdev-create`) have no pause points
    /// while they work: a pause does not wait for them.
    pub fn settle(&self, verb: JobVerb, timeout: Duration) -> bool {
        if verb == JobVerb::Pause && !self.spec.kind.is_block_job() {
            return true;
        }
        let c = self.lock();
        let (_c, t) = self
            .changed
            .wait_timeout_while(c, timeout, |c| match verb {
                JobVerb::Pause => {
                    c.user_paused
                        && !c.cancelled
                        && matches!(c.status, JobStatus::Running | JobStatus::Ready)
                }
                JobVerb::Cancel => !matches!(c.status, JobStatus::Concluded | JobStatus::Null),
                JobVerb::Finalize => c.status == JobStatus::Pending,
                _ => false,
            })
            .unwrap_or_else(|p| p.into_inner());
        !t.timed_out()
    }

    /// Checks a verb against the current status, with QEMU's message
    /// (for commands that validate their arguments after the verb).
    pub fn check_verb(&self, verb: JobVerb) -> Result<(), String> {
        let st = self.lock().status;
        if verb_allowed(verb, st) {
            Ok(())
        } else {
            Err(verb_refused_message(&self.spec.id, st, verb))
        }
    }

    /// `job-pause`.
    pub fn pause(&self) -> Result<(), String> {
        self.command(JobVerb::Pause, |_, c| {
            if c.user_paused {
                return Err("Job is already paused".into());
            }
            c.user_paused = true;
            Ok(())
        })
    }

    /// `job-resume`: also clears an error stop (io-status back to ok).
    pub fn resume(&self) -> Result<(), String> {
        self.command(JobVerb::Resume, |_, c| {
            if !c.user_paused {
                return Err("Can't resume a job that was not paused".into());
            }
            c.user_paused = false;
            c.io_status = "ok";
            Ok(())
        })
    }

    /// `block-job-set-speed` (the caller has refused negative values).
    pub fn set_speed(&self, speed: u64) -> Result<(), String> {
        self.command(JobVerb::SetSpeed, |_, c| {
            c.limiter.set_speed(speed, now_ns());
            Ok(())
        })
    }

    /// `job-cancel`: the job stops at its next pause point (a paused job is
    /// woken to do so). The receiver resolves once the job has stopped.
    pub fn cancel(&self) -> Result<futures::channel::oneshot::Receiver<()>, String> {
        self.command(JobVerb::Cancel, |_, c| {
            let (tx, rx) = futures::channel::oneshot::channel();
            c.stopped_waiters.push(tx);
            c.cancelled = true;
            c.user_paused = false;
            Ok(rx)
        })
    }

    /// `block-job-cancel` without `force`: a ready job (QEMU's mirror)
    /// completes without its pivot ([`Job::soft_cancel_requested`]); any
    /// other is cancelled as by [`Job::cancel`].
    pub fn cancel_unforced(&self) -> Result<futures::channel::oneshot::Receiver<()>, String> {
        self.command(JobVerb::Cancel, |_, c| {
            let (tx, rx) = futures::channel::oneshot::channel();
            c.stopped_waiters.push(tx);
            if matches!(c.status, JobStatus::Ready | JobStatus::Standby) {
                c.soft_cancelled = true;
            } else {
                c.cancelled = true;
            }
            c.user_paused = false;
            Ok(rx)
        })
    }

    /// Whether a ready job was cancelled without `force`: it ends its run
    /// and completes, skipping its pivot.
    pub fn soft_cancel_requested(&self) -> bool {
        self.lock().soft_cancelled
    }

    /// `job-complete`: a ready job pivots (the verb table refuses it otherwise).
    pub fn complete(&self) -> Result<(), String> {
        self.command(JobVerb::Complete, |_, c| {
            c.complete_requested = true;
            Ok(())
        })
    }

    /// `job-finalize`.
    pub fn finalize(&self) -> Result<(), String> {
        self.command(JobVerb::Finalize, |_, c| {
            c.finalize_requested = true;
            Ok(())
        })
    }

    /// `job-dismiss`: concluded -> null.
    pub fn dismiss(&self) -> Result<(), String> {
        self.command(JobVerb::Dismiss, |j, c| {
            j.transition(c, JobStatus::Null);
            Ok(())
        })
    }

    // ---- the driver's side (the job's reactor) ----

    /// created -> running.
    pub(super) fn start(&self) {
        let mut c = self.lock();
        c.busy = true;
        self.transition(&mut c, JobStatus::Running);
    }

    /// Takes `n` bytes from the speed limit: `None` to go on, `Some(ns)` to wait.
    pub fn rate_delay(&self, n: u64) -> Option<u64> {
        self.lock().limiter.try_acquire(n, now_ns())
    }

    /// Resolves at the next command (pause, resume, cancel, speed, complete,
    /// finalize) or [`Job::kick`].
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
    /// requested the job is `paused` (`standby` when ready) and not busy;
    /// returns `false` when cancelled.
    pub async fn pause_point(&self) -> bool {
        {
            let mut c = self.lock();
            if c.cancelled {
                return false;
            }
            if !c.user_paused {
                return true;
            }
            c.parked = true;
            self.reconcile_parked(&mut c);
            self.changed.notify_all();
        }
        loop {
            self.wait_kick().await;
            let mut c = self.lock();
            // Commands meanwhile have set the status already.
            self.reconcile_parked(&mut c);
            if c.cancelled || !c.user_paused {
                c.parked = false;
                // Commands that came with the resume (complete, speed) woke
                // this wait only: the driver's next wait_kick returns at
                // once so that it looks at them.
                c.kicked = true;
                return !c.cancelled;
            }
        }
    }

    /// The job converged (running -> ready, `BLOCK_JOB_READY` for block jobs).
    pub fn set_ready(&self) {
        let mut c = self.lock();
        self.transition(&mut c, JobStatus::Ready);
        if self.spec.kind.is_block_job() {
            let job = self.snapshot(&c);
            self.publish(&JobEvent::Ready { job });
        }
    }

    /// Decides about a failed I/O (`errno` of either sign) per the error
    /// policy, publishing it; `Stop` also pauses the job (io-status failed
    /// or nospace) and the driver retries the I/O after resume.
    pub fn io_error(&self, op: IoOperation, errno: i32) -> Verdict {
        self.io_error_with(self.spec.on_error, op, errno)
    }

    /// [`Job::io_error`] under another policy than the job's (a mirror's
    /// `on-source-error` / `on-target-error`).
    pub fn io_error_with(&self, policy: OnError, op: IoOperation, errno: i32) -> Verdict {
        let verdict = policy.verdict(errno);
        let mut c = self.lock();
        if verdict == Verdict::Stop {
            c.user_paused = true;
            c.io_status = if errno.abs() == libc::ENOSPC {
                "nospace"
            } else {
                "failed"
            };
        }
        let job = self.snapshot(&c);
        drop(c);
        self.publish(&JobEvent::IoError {
            job,
            operation: op,
            action: verdict,
        });
        verdict
    }

    // ---- completion (the framework, `super::run`) ----

    /// running -> waiting -> pending; publishes `Pending` when the job
    /// waits for `job-finalize`. Returns once finalized (or cancelled).
    pub(super) async fn wait_finalized(&self) {
        {
            let mut c = self.lock();
            c.busy = false;
            self.transition(&mut c, JobStatus::Waiting);
            self.transition(&mut c, JobStatus::Pending);
            if !self.spec.auto_finalize && self.spec.kind.is_block_job() {
                let job = self.snapshot(&c);
                self.publish(&JobEvent::Pending { job });
            }
        }
        if self.spec.auto_finalize {
            return;
        }
        loop {
            {
                let c = self.lock();
                if c.finalize_requested || c.cancelled {
                    return;
                }
            }
            self.wait_kick().await;
        }
    }

    /// Publishes the end (`Completed` / `Cancelled` for block jobs),
    /// concludes (and with auto-dismiss removes) the job and wakes whoever
    /// waits for a cancel, all under the lock, so a client that saw the
    /// event finds the job concluded (or gone), as with QEMU's monitor.
    pub(super) fn conclude(&self, ok: bool, error: Option<String>) {
        let cancelled = !ok && error.is_none();
        let mut c = self.lock();
        c.busy = false;
        if !ok {
            self.transition(&mut c, JobStatus::Aborting);
        }
        c.error.clone_from(&error);
        // Other jobs (create) are told about by status changes only.
        if self.spec.kind.is_block_job() {
            let job = self.snapshot(&c);
            if cancelled {
                self.publish(&JobEvent::Cancelled { job });
            } else {
                self.publish(&JobEvent::Completed { job, error });
            }
        }
        self.transition(&mut c, JobStatus::Concluded);
        if self.spec.auto_dismiss {
            self.transition(&mut c, JobStatus::Null);
        }
        for w in c.stopped_waiters.drain(..) {
            let _ = w.send(());
        }
    }
}
