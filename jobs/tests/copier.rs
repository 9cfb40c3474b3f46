//! The pipelined copier (`jobs::copy`) driven by the job framework on a real
//! reactor, against an in-memory source/target with injectable extent
//! layout, delays, errors and client activity: window growth and shrink,
//! retries, each `on-error` policy, the speed limit, progress (never ahead
//! of the work done, exactly the length at the end), and pause and cancel at
//! every chunk boundary.

use jobs::copy::{copy_all, Chunk, CopyError, CopyOps, Extent, Tuning};
use jobs::job::{
    self, IoOperation, Job, JobDriver, JobEvent, JobKind, JobManager, JobSpec, JobStatus, OnError,
    Step, Verdict,
};
use reactor::{CoreSet, Runtime, RuntimeConfig, RuntimeHandle};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const G: u64 = 64 << 10;

fn rt() -> &'static RuntimeHandle {
    static R: OnceLock<RuntimeHandle> = OnceLock::new();
    R.get_or_init(|| {
        let r = Runtime::start(RuntimeConfig {
            pin: false,
            ..RuntimeConfig::new(CoreSet::from_list("0").unwrap())
        })
        .unwrap();
        let h = r.handle();
        // The runtime lives as long as the test process.
        std::mem::forget(r);
        h
    })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Nothing to copy.
    Skip,
    /// Data to copy.
    Copy,
    /// Zeroes to copy.
    Zero,
}

/// A hook run when a chunk's copy starts (k = how many started before).
type Hook = Box<dyn Fn(usize, &Chunk, &Arc<Job>) + Send>;

#[derive(Default)]
struct State {
    map: Vec<Kind>,
    /// Successful copies per granule.
    copied: Vec<u32>,
    inflight: usize,
    max_inflight: usize,
    started: usize,
    /// Every chunk started, in order.
    log: Vec<Chunk>,
    /// Copy time per chunk, by the index of its first granule.
    delay: Option<fn(u64) -> Duration>,
    /// Fail the copy of the chunk holding this granule, once each.
    fail_copy: VecDeque<(u64, IoOperation, i32)>,
    /// Fail the extent query at this granule, once each.
    fail_extent: VecDeque<(u64, i32)>,
    /// Progress checks that found more progress than work done: (progress, granules done).
    progress_violations: Vec<(u64, u64)>,
    job: Option<Arc<Job>>,
    hook: Option<Hook>,
    /// Every settle: (chunks in flight, the job's offset) at the time.
    settles: Vec<(usize, u64)>,
}

struct Model {
    st: Arc<Mutex<State>>,
    clients: Arc<AtomicU64>,
    watch_clients: bool,
}

impl Model {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap()
    }
}

impl CopyOps for Model {
    fn size(&self) -> u64 {
        self.lock().map.len() as u64 * G
    }

    fn granularity(&self) -> u64 {
        G
    }

    fn extent(
        &self,
        offset: u64,
        _len: u64,
    ) -> impl std::future::Future<Output = Result<Extent, i32>> {
        Box::pin(async move {
            let mut s = self.lock();
            let g = offset / G;
            if s.fail_extent.front().is_some_and(|f| f.0 == g) {
                let (_, errno) = s.fail_extent.pop_front().unwrap();
                return Err(errno);
            }
            let k = s.map[g as usize];
            let n = s.map[g as usize..].iter().take_while(|&&x| x == k).count() as u64;
            Ok(Extent {
                len: n * G - offset % G,
                copy: k != Kind::Skip,
                zero: k == Kind::Zero,
            })
        })
    }

    fn copy(&self, c: Chunk) -> impl std::future::Future<Output = Result<(), CopyError>> {
        Box::pin(async move {
            let (delay, hook_k, job) = {
                let mut s = self.lock();
                s.inflight += 1;
                s.max_inflight = s.max_inflight.max(s.inflight);
                s.log.push(c);
                let k = s.started;
                s.started += 1;
                // Progress never counts a copy before it is done: at most
                // what was copied plus what needs no copy.
                if let Some(j) = &s.job {
                    let p = j.progress().0;
                    let done = s
                        .map
                        .iter()
                        .zip(&s.copied)
                        .filter(|(k, n)| **k == Kind::Skip || **n > 0)
                        .count() as u64;
                    if p > done * G {
                        s.progress_violations.push((p, done));
                    }
                }
                (s.delay.map(|d| d(c.offset / G)), k, s.job.clone())
            };
            let hook = self.lock().hook.take();
            if let (Some(h), Some(j)) = (hook, job) {
                h(hook_k, &c, &j);
                self.lock().hook = Some(h);
            }
            if let Some(d) = delay {
                reactor::sleep(d).await;
            }
            let mut s = self.lock();
            s.inflight -= 1;
            let first = c.offset / G;
            let last = (c.offset + c.len).div_ceil(G);
            if let Some(i) = s
                .fail_copy
                .iter()
                .position(|f| (first..last).contains(&f.0))
            {
                let (_, op, errno) = s.fail_copy.remove(i).unwrap();
                return Err(CopyError { op, errno });
            }
            for g in first..last {
                s.copied[g as usize] += 1;
            }
            Ok(())
        })
    }

    fn settle(&self) -> impl std::future::Future<Output = ()> {
        let mut s = self.lock();
        let at = (s.inflight, s.job.as_ref().map_or(0, |j| j.progress().0));
        s.settles.push(at);
        async {}
    }

    /// While the test says clients are busy (`clients` odd), every look
    /// finds new client requests.
    fn client_ops(&self) -> Option<u64> {
        if !self.watch_clients {
            return None;
        }
        let n = self.clients.load(Ordering::Relaxed);
        if n % 2 == 1 {
            self.clients.fetch_add(2, Ordering::Relaxed);
        }
        Some(n)
    }
}

/// A driver that only copies.
struct CopyDriver {
    st: Arc<Mutex<State>>,
    clients: Arc<AtomicU64>,
    watch_clients: bool,
    tuning: Tuning,
}

impl JobDriver for CopyDriver {
    fn run<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        Box::pin(async move {
            self.st.lock().unwrap().job = Some(job.clone());
            let m = Model {
                st: self.st.clone(),
                clients: self.clients.clone(),
                watch_clients: self.watch_clients,
            };
            copy_all(job, Rc::new(m), &self.tuning).await
        })
    }
}

struct Run {
    job: Arc<Job>,
    st: Arc<Mutex<State>>,
    events: Arc<Mutex<Vec<JobEvent>>>,
    clients: Arc<AtomicU64>,
}

struct Setup {
    map: Vec<Kind>,
    on_error: OnError,
    speed: u64,
    tuning: Tuning,
    watch_clients: bool,
    prep: Box<dyn FnOnce(&mut State)>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            map: vec![Kind::Copy; 32],
            on_error: OnError::Report,
            speed: 0,
            tuning: Tuning {
                chunk: 4 * G,
                max_inflight: 4,
                // The tests run at once on one reactor: each keeps its own
                // window from the start (the fair share and the slow start
                // are tested on a reactor of their own, copy_fairness.rs).
                reactor_inflight: 1024,
                slow_start: false,
                yield_to_clients: false,
                sample: Duration::from_millis(1),
            },
            watch_clients: false,
            prep: Box::new(|_| {}),
        }
    }
}

fn start(name: &str, s: Setup) -> Run {
    let n = s.map.len();
    let mut state = State {
        map: s.map,
        copied: vec![0; n],
        ..Default::default()
    };
    (s.prep)(&mut state);
    let st = Arc::new(Mutex::new(state));
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev2 = events.clone();
    let mgr = JobManager::new(Arc::new(move |e: &JobEvent| {
        ev2.lock().unwrap().push(e.clone());
    }));
    let spec = JobSpec {
        id: name.into(),
        kind: JobKind {
            name: "copy-test",
            block_job: true,
        },
        device: name.into(),
        speed: s.speed,
        on_error: s.on_error,
        auto_finalize: true,
        auto_dismiss: false,
        legacy: false,
        nodes: vec![],
        throttle: None,
    };
    let clients = Arc::new(AtomicU64::new(0));
    let driver = CopyDriver {
        st: st.clone(),
        clients: clients.clone(),
        watch_clients: s.watch_clients,
        tuning: s.tuning,
    };
    let job = job::start(&mgr, rt(), spec, 0, Some(n as u64 * G), driver).unwrap();
    Run {
        job,
        st,
        events,
        clients,
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() > Duration::from_secs(20) {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Run {
    fn wait_concluded(&self) {
        wait_for("the job to conclude", || {
            self.job.status() == JobStatus::Concluded
        });
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap()
    }

    /// The copied counts of granules that must be copied.
    fn assert_all_copied_once(&self) {
        let s = self.st();
        for (g, k) in s.map.iter().enumerate() {
            let want = u32::from(*k != Kind::Skip);
            assert_eq!(
                s.copied[g], want,
                "granule {g} ({k:?}) copied {} times",
                s.copied[g]
            );
        }
        assert!(
            s.progress_violations.is_empty(),
            "progress ahead of the work done: {:?}",
            s.progress_violations
        );
    }

    fn end_event(&self) -> JobEvent {
        self.events
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|e| matches!(e, JobEvent::Completed { .. } | JobEvent::Cancelled { .. }))
            .cloned()
            .expect("no end event")
    }

    fn io_errors(&self) -> Vec<(IoOperation, Verdict)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                JobEvent::IoError {
                    operation, action, ..
                } => Some((*operation, *action)),
                _ => None,
            })
            .collect()
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
}

fn completed_error(e: &JobEvent) -> Option<String> {
    match e {
        JobEvent::Completed { error, job } => {
            assert_eq!(job.offset, job.len, "completed short of the end");
            error.clone()
        }
        other => panic!("expected Completed, got {other:?}"),
    }
}

/// A mixed layout with skips, zeroes and data, completing out of order.
fn mixed() -> Vec<Kind> {
    use Kind::*;
    let mut v = vec![Copy; 9];
    v.extend([Skip, Skip, Zero, Zero, Zero, Copy, Skip]);
    v.extend(vec![Copy; 13]);
    v.extend([Skip, Zero, Copy]);
    v
}

/// Later chunks finish first: completions come back out of order.
fn reverse_delay(g: u64) -> Duration {
    Duration::from_micros(3000u64.saturating_sub(g * 90).max(100))
}

#[test]
fn copies_what_it_must_once_and_progress_counts_only_work_done() {
    let r = start(
        "c-mixed",
        Setup {
            map: mixed(),
            prep: Box::new(|s| s.delay = Some(reverse_delay)),
            ..Default::default()
        },
    );
    r.wait_concluded();
    r.assert_all_copied_once();
    assert_eq!(completed_error(&r.end_event()), None);
    let s = r.st();
    assert!(s.max_inflight > 1, "chunks were not pipelined");
    assert!(s.max_inflight <= 4, "window exceeded: {}", s.max_inflight);
    // Chunks are aligned, at most 4 granules, and zero only inside zero extents.
    for c in &s.log {
        assert_eq!(c.offset % G, 0);
        assert!(c.len <= 4 * G && c.len > 0);
        if c.zero {
            let g = c.offset / G;
            assert!((g..(c.offset + c.len) / G).all(|g| s.map[g as usize] == Kind::Zero));
        }
    }
    assert_eq!(
        r.statuses(),
        [
            JobStatus::Created,
            JobStatus::Running,
            JobStatus::Waiting,
            JobStatus::Pending,
            JobStatus::Concluded
        ]
    );
}

#[test]
fn window_shrinks_while_clients_are_busy_and_grows_back() {
    let r = start(
        "c-window",
        Setup {
            map: vec![Kind::Copy; 400],
            tuning: Tuning {
                chunk: 4 * G,
                max_inflight: 4,
                reactor_inflight: 1024,
                slow_start: false,
                yield_to_clients: true,
                sample: Duration::from_millis(1),
            },
            watch_clients: true,
            prep: Box::new(|s| s.delay = Some(|_| Duration::from_micros(1500))),
            ..Default::default()
        },
    );
    // Busy clients for a while: the window (and the chunk) shrinks to one.
    r.clients.store(1, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(150));
    let busy_log = r.st().log.len();
    r.clients.store(0, Ordering::Relaxed);
    r.wait_concluded();
    r.assert_all_copied_once();
    let s = r.st();
    let busy = &s.log[busy_log / 2..busy_log];
    assert!(
        !busy.is_empty() && busy.iter().all(|c| c.len == G),
        "chunks while busy: {:?}",
        busy.iter().map(|c| c.len / G).collect::<Vec<_>>()
    );
    // Idle again: back to full chunks and a full window.
    let tail = &s.log[s.log.len().saturating_sub(10)..s.log.len() - 1];
    assert!(
        tail.iter().any(|c| c.len == 4 * G),
        "chunks after the clients stopped: {:?}",
        tail.iter().map(|c| c.len / G).collect::<Vec<_>>()
    );
    assert_eq!(s.max_inflight, 4);
}

#[test]
fn on_error_report_ends_the_job_with_the_error() {
    for op in [IoOperation::Read, IoOperation::Write] {
        let r = start(
            &format!("c-report-{}", op.as_str()),
            Setup {
                prep: Box::new(move |s| s.fail_copy.push_back((9, op, libc::EIO))),
                ..Default::default()
            },
        );
        r.wait_concluded();
        match r.end_event() {
            JobEvent::Completed { error, job } => {
                assert_eq!(error.as_deref(), Some("Input/output error"));
                // The failed chunk (granules 8..12) never counts.
                assert!(job.offset <= 28 * G, "failed chunk counted: {}", job.offset);
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(r.io_errors(), [(op, Verdict::Report)]);
        assert_eq!(r.job.info().error.as_deref(), Some("Input/output error"));
        // Nothing started after the failure but what was already in the window.
        assert!(r.st().started <= 3 + 4, "started {}", r.st().started);
        assert!(r.statuses().contains(&JobStatus::Aborting));
    }
}

#[test]
fn on_error_ignore_goes_on_and_fails_at_the_end() {
    let r = start(
        "c-ignore",
        Setup {
            // An extent starts at 20: its query fails.
            map: [vec![Kind::Copy; 20], vec![Kind::Zero; 12]].concat(),
            on_error: OnError::Ignore,
            prep: Box::new(|s| {
                s.fail_copy.push_back((5, IoOperation::Write, libc::EIO));
                s.fail_extent.push_back((20, libc::EIO));
            }),
            ..Default::default()
        },
    );
    r.wait_concluded();
    assert_eq!(
        completed_error(&r.end_event()).as_deref(),
        Some("Input/output error")
    );
    assert_eq!(
        r.io_errors(),
        [
            (IoOperation::Write, Verdict::Ignore),
            (IoOperation::Read, Verdict::Ignore)
        ]
    );
    let s = r.st();
    // The failed chunk (granules 4..8) and the unknown granule 20 are skipped;
    // everything else is copied.
    for g in 0..32 {
        let want = u32::from(!(4..8).contains(&g) && g != 20);
        assert_eq!(s.copied[g], want, "granule {g}");
    }
}

/// The offset an error reports is the end of the done prefix (QEMU copies
/// in order: everything before the offset is done), even when chunks beyond
/// the failed one completed first.
#[test]
fn offset_on_error_is_the_done_prefix() {
    for on_error in [OnError::Stop, OnError::Report] {
        let r = start(
            &format!("c-prefix-{on_error:?}"),
            Setup {
                prep: Box::new(|s| {
                    // Chunk 0 (granules 0..4) is the slowest and fails.
                    s.delay = Some(reverse_delay);
                    s.fail_copy.push_back((1, IoOperation::Write, libc::ENOSPC));
                }),
                on_error,
                ..Default::default()
            },
        );
        wait_for("the error", || !r.io_errors().is_empty());
        let err_offset = r
            .events
            .lock()
            .unwrap()
            .iter()
            .find_map(|e| match e {
                JobEvent::IoError { job, .. } => Some(job.offset),
                _ => None,
            })
            .unwrap();
        assert_eq!(err_offset, 0, "{on_error:?}: BLOCK_JOB_ERROR offset");
        if on_error == OnError::Stop {
            wait_for("the error stop", || r.job.status() == JobStatus::Paused);
            assert_eq!(r.job.info().offset, 0, "paused on the error");
            assert!(
                r.st().copied[4..16].iter().all(|&n| n == 1),
                "later chunks ran"
            );
            r.job.resume().unwrap();
            r.wait_concluded();
            assert_eq!(completed_error(&r.end_event()), None);
            r.assert_all_copied_once();
        } else {
            r.wait_concluded();
            match r.end_event() {
                JobEvent::Completed { error, job } => {
                    assert!(error.is_some());
                    assert_eq!(job.offset, 0, "BLOCK_JOB_COMPLETED offset");
                }
                e => panic!("{e:?}"),
            }
        }
    }
}

fn stop_then_retry(name: &str, on_error: OnError, errno: i32, io_status: &str) {
    let r = start(
        name,
        Setup {
            // An extent starts at 26: its query fails.
            map: [vec![Kind::Copy; 26], vec![Kind::Zero; 6]].concat(),
            on_error,
            prep: Box::new(move |s| {
                s.fail_copy.push_back((13, IoOperation::Write, errno));
                s.fail_extent.push_back((26, errno));
            }),
            ..Default::default()
        },
    );
    for round in 0..2 {
        wait_for("the error stop", || {
            r.io_errors().len() > round && r.job.status() == JobStatus::Paused
        });
        let i = r.job.info();
        assert_eq!(i.io_status, io_status, "round {round}");
        assert!(i.paused && !i.busy);
        assert_eq!(r.st().inflight, 0, "paused with I/O in flight");
        // The target settled once before this pause, with nothing in
        // flight, at the offset the paused job reports.
        let settles = r.st().settles.clone();
        assert_eq!(settles.len(), round + 1, "round {round}: {settles:?}");
        assert_eq!(settles[round], (0, i.offset), "round {round}");
        r.job.resume().unwrap();
    }
    r.wait_concluded();
    assert_eq!(completed_error(&r.end_event()), None, "retried: no error");
    assert_eq!(r.job.info().io_status, "ok");
    r.assert_all_copied_once();
    assert_eq!(
        r.io_errors(),
        [
            (IoOperation::Write, Verdict::Stop),
            (IoOperation::Read, Verdict::Stop)
        ]
    );
}

#[test]
fn on_error_stop_pauses_and_retries_after_resume() {
    stop_then_retry("c-stop", OnError::Stop, libc::EIO, "failed");
}

#[test]
fn on_error_enospc_stops_on_enospc_and_reports_the_rest() {
    stop_then_retry("c-enospc", OnError::Enospc, libc::ENOSPC, "nospace");
    let r = start(
        "c-enospc-eio",
        Setup {
            on_error: OnError::Enospc,
            prep: Box::new(|s| s.fail_copy.push_back((2, IoOperation::Read, libc::EIO))),
            ..Default::default()
        },
    );
    r.wait_concluded();
    assert_eq!(
        completed_error(&r.end_event_or_report()).as_deref(),
        Some("Input/output error")
    );
    assert_eq!(r.io_errors(), [(IoOperation::Read, Verdict::Report)]);
}

impl Run {
    /// The end event, with the offset check relaxed (a reported error ends early).
    fn end_event_or_report(&self) -> JobEvent {
        match self.end_event() {
            JobEvent::Completed { error, mut job } => {
                job.offset = job.len;
                JobEvent::Completed { error, job }
            }
            e => e,
        }
    }
}

#[test]
fn speed_limit_bounds_the_rate_and_changes_at_once() {
    // 2 MiB at 4 MiB/s: at least ~0.45 s (one burst of 100 ms is free).
    let speed = 4 << 20;
    let t0 = Instant::now();
    let r = start(
        "c-speed",
        Setup {
            speed,
            ..Default::default()
        },
    );
    // Sampled progress never runs ahead of burst + speed * t.
    let mut worst = 0i128;
    while r.job.status() != JobStatus::Concluded {
        let t = t0.elapsed().as_secs_f64();
        let allowed = (speed as f64 * (0.1 + t)) as i128 + 4 * G as i128;
        worst = worst.max(r.job.progress().0 as i128 - allowed);
        std::thread::sleep(Duration::from_millis(5));
    }
    let el = t0.elapsed();
    assert!(worst <= 0, "progress ahead of the limit by {worst} bytes");
    assert!(
        el >= Duration::from_millis(400),
        "2 MiB at 4 MiB/s took {el:?}"
    );
    assert!(el < Duration::from_secs(3), "took {el:?}");
    r.assert_all_copied_once();

    // Unlimited mid-way: the rest goes at once.
    let r = start(
        "c-speed-change",
        Setup {
            speed: 256 << 10,
            map: vec![Kind::Copy; 64],
            ..Default::default()
        },
    );
    std::thread::sleep(Duration::from_millis(200));
    let early = r.job.progress().0;
    assert!(early < 32 * G, "256 KiB/s copied {early} bytes in 0.2 s");
    let t1 = Instant::now();
    r.job.set_speed(0).unwrap();
    r.wait_concluded();
    assert!(t1.elapsed() < Duration::from_secs(2), "{:?}", t1.elapsed());
    match r.end_event() {
        JobEvent::Completed { job, error } => {
            assert_eq!(error, None);
            assert_eq!(job.speed, 0);
        }
        e => panic!("{e:?}"),
    }
}

/// Pauses (from inside the k-th chunk's copy) at every chunk boundary:
/// the job reaches `paused` with nothing in flight, progress holds still,
/// and after resume everything is copied exactly once.
#[test]
fn pause_at_every_chunk_boundary() {
    // The mixed layout is 11 chunks; one more round pauses nowhere.
    for k in 0..12 {
        let r = start(
            &format!("c-pause-{k}"),
            Setup {
                map: mixed(),
                prep: Box::new(move |s| {
                    s.delay = Some(reverse_delay);
                    s.hook = Some(Box::new(move |i, _, j| {
                        if i == k {
                            j.pause().unwrap();
                        }
                    }));
                }),
                ..Default::default()
            },
        );
        let paused = {
            let t0 = Instant::now();
            loop {
                let st = r.job.status();
                if st == JobStatus::Paused || st == JobStatus::Concluded {
                    break st == JobStatus::Paused;
                }
                assert!(t0.elapsed() < Duration::from_secs(20), "k={k}: no pause");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        if paused {
            assert_eq!(r.st().inflight, 0, "k={k}: paused with I/O in flight");
            let p = r.job.progress().0;
            let n = r.st().started;
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(r.job.progress().0, p, "k={k}: progress while paused");
            assert_eq!(r.st().started, n, "k={k}: copies started while paused");
            assert!(!r.job.info().busy);
            r.job.resume().unwrap();
        } else {
            // Past the last chunk: the hook never ran.
            assert!(r.st().started <= k, "k={k}: the pause was lost");
        }
        r.wait_concluded();
        r.assert_all_copied_once();
        assert_eq!(completed_error(&r.end_event()), None);
    }
}

/// Cancels (from inside the k-th chunk's copy) at every chunk boundary: the
/// job ends cancelled, nothing starts after the cancel, and no granule was
/// copied twice.
#[test]
fn cancel_at_every_chunk_boundary() {
    let mut boundaries = 0;
    for k in 0.. {
        let r = start(
            &format!("c-cancel-{k}"),
            Setup {
                map: mixed(),
                prep: Box::new(move |s| {
                    s.delay = Some(reverse_delay);
                    s.hook = Some(Box::new(move |i, _, j| {
                        if i == k {
                            drop(j.cancel().unwrap());
                        }
                    }));
                }),
                ..Default::default()
            },
        );
        r.wait_concluded();
        let s = r.st();
        assert!(s.copied.iter().all(|&n| n <= 1), "k={k}: copied twice");
        assert!(s.progress_violations.is_empty());
        drop(s);
        match r.end_event() {
            JobEvent::Cancelled { job } => {
                // (A cancel during the last chunk may find everything copied.)
                assert!(job.offset <= job.len);
                // Nothing started after the cancel but what the window
                // had already spawned.
                assert!(r.st().started <= k + 4, "k={k}: started {}", r.st().started);
                boundaries += 1;
            }
            // The last chunk's cancel may come after the copy finished.
            JobEvent::Completed { error: None, .. } => break,
            e => panic!("k={k}: {e:?}"),
        }
        assert!(r
            .statuses()
            .ends_with(&[JobStatus::Aborting, JobStatus::Concluded]));
    }
    assert!(boundaries >= 8, "only {boundaries} boundaries");
}
