//! The job framework driving a driver through QEMU's life cycle on a real
//! reactor: the order of run / prepare / commit / abort / clean, ready and
//! complete for a pivoting job (standby while paused), manual finalize, and
//! verbs refused with QEMU's message.

use jobs::job::{
    self, Job, JobDriver, JobEvent, JobKind, JobManager, JobSpec, JobStatus, OnError, Step,
};
use reactor::{CoreSet, Runtime, RuntimeConfig, RuntimeHandle};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

fn rt() -> &'static RuntimeHandle {
    static R: OnceLock<RuntimeHandle> = OnceLock::new();
    R.get_or_init(|| {
        let r = Runtime::start(RuntimeConfig {
            pin: false,
            ..RuntimeConfig::new(CoreSet::from_list("0").unwrap())
        })
        .unwrap();
        let h = r.handle();
        std::mem::forget(r);
        h
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Finishes at once.
    Done,
    /// Fails its run.
    FailRun,
    /// Fails its prepare.
    FailPrepare,
    /// Becomes ready, then waits for `job-complete` (honouring pause/cancel).
    Pivot,
}

/// A driver that records the calls the framework makes.
struct Recorder {
    how: Behaviour,
    calls: Arc<Mutex<Vec<&'static str>>>,
}

impl Recorder {
    fn note(&self, s: &'static str) {
        self.calls.lock().unwrap().push(s);
    }
}

impl JobDriver for Recorder {
    fn run<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        Box::pin(async move {
            self.note("run");
            match self.how {
                Behaviour::Done | Behaviour::FailPrepare => Ok(()),
                Behaviour::FailRun => Err("run failed".into()),
                Behaviour::Pivot => {
                    job.set_len(1);
                    job.add_progress(1);
                    job.set_ready();
                    while !job.complete_requested() && !job.soft_cancel_requested() {
                        if !job.pause_point().await {
                            return Ok(());
                        }
                        job.wait_kick().await;
                    }
                    Ok(())
                }
            }
        })
    }
    fn prepare<'a>(&'a mut self, _job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        self.note("prepare");
        let fail = self.how == Behaviour::FailPrepare;
        Box::pin(async move {
            if fail {
                Err("prepare failed".into())
            } else {
                Ok(())
            }
        })
    }
    fn commit<'a>(&'a mut self, _job: &'a Arc<Job>) -> Step<'a, ()> {
        self.note("commit");
        Box::pin(async {})
    }
    fn abort<'a>(&'a mut self, _job: &'a Arc<Job>) -> Step<'a, ()> {
        self.note("abort");
        Box::pin(async {})
    }
    fn clean<'a>(&'a mut self, _job: &'a Arc<Job>) -> Step<'a, ()> {
        self.note("clean");
        Box::pin(async {})
    }
}

struct Run {
    job: Arc<Job>,
    calls: Arc<Mutex<Vec<&'static str>>>,
    events: Arc<Mutex<Vec<JobEvent>>>,
}

fn start(id: &str, how: Behaviour, auto_finalize: bool) -> Run {
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev2 = events.clone();
    let mgr = JobManager::new(Arc::new(move |e: &JobEvent| {
        ev2.lock().unwrap().push(e.clone());
    }));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let spec = JobSpec {
        id: id.into(),
        kind: JobKind {
            name: "recorder",
            block_job: true,
        },
        device: id.into(),
        speed: 0,
        on_error: OnError::Report,
        auto_finalize,
        auto_dismiss: false,
        legacy: false,
        nodes: vec![],
        throttle: None,
    };
    let d = Recorder {
        how,
        calls: calls.clone(),
    };
    let job = job::start(&mgr, rt(), spec, 0, None, d).unwrap();
    Run { job, calls, events }
}

fn wait_status(j: &Job, s: JobStatus) {
    let t0 = Instant::now();
    while j.status() != s {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "job {} stuck in {} waiting for {s}",
            j.id(),
            j.status()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Run {
    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }
    fn statuses(&self) -> Vec<JobStatus> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                JobEvent::StatusChange { status, .. } => Some(*status),
                _ => None,
            })
            .collect()
    }
    fn has(&self, f: impl Fn(&JobEvent) -> bool) -> bool {
        self.events.lock().unwrap().iter().any(f)
    }
}

use JobStatus::*;

#[test]
fn success_runs_prepare_commit_clean_in_order() {
    let r = start("f-ok", Behaviour::Done, true);
    wait_status(&r.job, Concluded);
    assert_eq!(r.calls(), ["run", "prepare", "commit", "clean"]);
    assert_eq!(
        r.statuses(),
        [Created, Running, Waiting, Pending, Concluded]
    );
    assert!(r.has(|e| matches!(e, JobEvent::Completed { error: None, .. })));
    r.job.dismiss().unwrap();
    assert_eq!(r.job.status(), Null);
}

#[test]
fn failures_abort_and_clean_with_the_error() {
    let r = start("f-run", Behaviour::FailRun, true);
    wait_status(&r.job, Concluded);
    assert_eq!(r.calls(), ["run", "abort", "clean"]);
    assert_eq!(r.job.info().error.as_deref(), Some("run failed"));
    assert_eq!(r.statuses(), [Created, Running, Aborting, Concluded]);

    let r = start("f-prep", Behaviour::FailPrepare, true);
    wait_status(&r.job, Concluded);
    assert_eq!(r.calls(), ["run", "prepare", "abort", "clean"]);
    assert_eq!(r.job.info().error.as_deref(), Some("prepare failed"));
    assert!(
        r.has(|e| matches!(e, JobEvent::Completed { error: Some(m), .. } if m == "prepare failed"))
    );
}

#[test]
fn manual_finalize_waits_in_pending() {
    let r = start("f-fin", Behaviour::Done, false);
    wait_status(&r.job, Pending);
    assert!(r.has(|e| matches!(e, JobEvent::Pending { .. })));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(r.calls(), ["run"], "prepared before job-finalize");
    assert_eq!(
        r.job.pause().unwrap_err(),
        "Job 'f-fin' in state 'pending' cannot accept command verb 'pause'"
    );
    r.job.finalize().unwrap();
    wait_status(&r.job, Concluded);
    assert_eq!(r.calls(), ["run", "prepare", "commit", "clean"]);
}

#[test]
fn a_pivoting_job_is_ready_standby_when_paused_and_completes_on_request() {
    let r = start("f-pivot", Behaviour::Pivot, true);
    wait_status(&r.job, Ready);
    assert!(r.has(|e| matches!(e, JobEvent::Ready { .. })));
    assert!(r.job.info().ready);
    r.job.pause().unwrap();
    wait_status(&r.job, Standby);
    r.job.resume().unwrap();
    wait_status(&r.job, Ready);
    r.job.complete().unwrap();
    wait_status(&r.job, Concluded);
    assert_eq!(r.calls(), ["run", "prepare", "commit", "clean"]);
    assert_eq!(
        r.statuses(),
        [Created, Running, Ready, Standby, Ready, Waiting, Pending, Concluded]
    );
    // Complete is refused where the verb table says so.
    let r = start("f-notready", Behaviour::Done, false);
    wait_status(&r.job, Pending);
    assert_eq!(
        r.job.complete().unwrap_err(),
        "Job 'f-notready' in state 'pending' cannot accept command verb 'complete'"
    );
    drop(r.job.cancel().unwrap());
    wait_status(&r.job, Concluded);
    assert_eq!(r.calls(), ["run", "abort", "clean"]);
    assert!(r.has(|e| matches!(e, JobEvent::Cancelled { .. })));
}

/// As with QEMU's monitor, the status a query sees right after a verb is the
/// one the verb leads to: resume leaves standby (paused) in the command
/// itself, pause and cancel settle before their reply.
#[test]
fn verbs_change_the_status_before_they_return() {
    use jobs::job::JobVerb;
    let wait = Duration::from_secs(5);
    let r = start("f-verbs", Behaviour::Pivot, true);
    wait_status(&r.job, JobStatus::Ready);
    for round in 0..20 {
        r.job.pause().unwrap();
        assert!(r.job.settle(JobVerb::Pause, wait), "round {round}");
        assert_eq!(r.job.status(), JobStatus::Standby, "round {round}");
        r.job.resume().unwrap();
        assert_eq!(
            r.job.status(),
            JobStatus::Ready,
            "round {round}: after resume"
        );
        assert!(!r.job.info().paused);
    }
    // A pause right after a resume, before the job's reactor saw either.
    r.job.pause().unwrap();
    assert!(r.job.settle(JobVerb::Pause, wait));
    r.job.resume().unwrap();
    r.job.pause().unwrap();
    assert!(r.job.settle(JobVerb::Pause, wait));
    assert_eq!(r.job.status(), JobStatus::Standby);
    drop(r.job.cancel().unwrap());
    assert!(r.job.settle(JobVerb::Cancel, wait));
    assert_eq!(r.job.status(), JobStatus::Concluded);
}

#[test]
fn an_unforced_cancel_completes_a_ready_job_and_cancels_others() {
    let r = start("f-soft", Behaviour::Pivot, true);
    wait_status(&r.job, Ready);
    drop(r.job.cancel_unforced().unwrap());
    wait_status(&r.job, Concluded);
    assert!(r.job.soft_cancel_requested());
    // QEMU's mirror: completed (the driver skips its pivot), not cancelled.
    assert_eq!(
        r.statuses(),
        [Created, Running, Ready, Waiting, Pending, Concluded]
    );
    assert!(r.has(|e| matches!(e, JobEvent::Completed { error: None, .. })));
    assert!(!r.has(|e| matches!(e, JobEvent::Cancelled { .. })));

    let r = start("f-soft2", Behaviour::Done, false);
    wait_status(&r.job, Pending);
    drop(r.job.cancel_unforced().unwrap());
    wait_status(&r.job, Concluded);
    assert!(!r.job.soft_cancel_requested());
    assert_eq!(r.calls(), ["run", "abort", "clean"]);
    assert!(r.has(|e| matches!(e, JobEvent::Cancelled { .. })));
}
