//! The stream driver (walk, copy, final backing change, error policy) run by
//! the job framework on a real reactor against an in-memory image node: the
//! chain's data is a malloc bdev behind an error bdev (injectable read
//! errors), the top's allocation and populated data live in the test node
//! (injectable write errors).

use bdev::error_bdev::ErrorBdev;
use bdev::malloc::MallocBdev;
use bdev::{write_at, Bdev, BdevError, DmaBuf};
use graph::node::{ChainStatus, ImageNode, NodeFuture};
use jobs::copy::Tuning;
use jobs::drivers::stream::{StreamDriver, StreamPlan, KIND};
use jobs::job::{self, JobEvent, JobManager, JobSpec, JobStatus, OnError};
use reactor::{CoreSet, Runtime, RuntimeConfig, RuntimeHandle};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const CS: u64 = 64 << 10;
const CLUSTERS: usize = 24;

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

/// The test's block graph (one per process, on the test runtime).
fn graph() -> &'static Arc<graph::Graph> {
    static G: OnceLock<Arc<graph::Graph>> = OnceLock::new();
    G.get_or_init(|| graph::Graph::new(rt().clone(), graph::events::EventBus::default()))
}

#[derive(Clone, Debug, PartialEq)]
enum Alloc {
    /// Allocated in the top, with this data.
    Here(Vec<u8>),
    /// Allocated in the backing chain (above base).
    Above,
    /// Nowhere (reads as zeroes).
    Nothing,
}

#[derive(Default)]
struct NodeState {
    alloc: Vec<Alloc>,
    fail_write: VecDeque<(usize, i32)>,
    backing_file_calls: Vec<(Option<String>, Option<String>)>,
    backing_bdev_calls: usize,
    /// A client writes this cluster while the job copies it (populate must lose).
    client_race: Option<usize>,
    /// Populates asked for clusters the top already had (wasted copies).
    wasted: usize,
}

struct TestNode {
    bdev: Arc<dyn Bdev>,
    st: Arc<Mutex<NodeState>>,
}

fn pattern(cluster: usize) -> Vec<u8> {
    (0..CS as usize)
        .map(|i| (cluster as u8).wrapping_mul(31) ^ (i as u8))
        .collect()
}

impl ImageNode for TestNode {
    fn bdev(&self) -> Arc<dyn Bdev> {
        self.bdev.clone()
    }
    fn format(&self) -> &'static str {
        "test"
    }
    fn cluster_size(&self) -> u64 {
        CS
    }
    fn owner(&self) -> usize {
        0
    }
    fn filename(&self) -> Option<String> {
        None
    }
    fn backing(&self) -> Option<Arc<dyn Bdev>> {
        None
    }
    fn backing_file(&self) -> Option<String> {
        Some("base.img".into())
    }
    fn block_status<'a>(
        &'a self,
        offset: u64,
        _len: u64,
        _base: Option<&'a Arc<dyn Bdev>>,
    ) -> NodeFuture<'a, ChainStatus> {
        Box::pin(async move {
            let s = self.st.lock().unwrap();
            let c = (offset / CS) as usize;
            let class = |a: &Alloc| match a {
                Alloc::Here(_) => 0,
                Alloc::Above => 1,
                Alloc::Nothing => 2,
            };
            let k = class(&s.alloc[c]);
            let n = s.alloc[c..].iter().take_while(|a| class(a) == k).count() as u64;
            Ok(ChainStatus {
                allocated_here: k == 0,
                allocated_above_base: k <= 1,
                zero: k == 2,
                len: n * CS - offset % CS,
            })
        })
    }
    fn populate_if_unallocated(&self, offset: u64, data: DmaBuf) -> NodeFuture<'_, bool> {
        Box::pin(async move {
            let mut s = self.st.lock().unwrap();
            let c = (offset / CS) as usize;
            if let Some(i) = s.fail_write.iter().position(|f| f.0 == c) {
                let (_, errno) = s.fail_write.remove(i).unwrap();
                return Err(BdevError::Os {
                    what: "populate".into(),
                    source: std::io::Error::from_raw_os_error(errno),
                });
            }
            if s.client_race == Some(c) {
                s.alloc[c] = Alloc::Here(vec![0xcc; CS as usize]);
            } else if matches!(s.alloc[c], Alloc::Here(_)) {
                s.wasted += 1;
            }
            if matches!(s.alloc[c], Alloc::Here(_)) {
                return Ok(false);
            }
            s.alloc[c] = Alloc::Here(data.as_slice().to_vec());
            Ok(true)
        })
    }
    fn set_backing_file<'a>(
        &'a self,
        file: Option<&'a str>,
        format: Option<&'a str>,
        _durable: bool,
    ) -> NodeFuture<'a, ()> {
        let mut s = self.st.lock().unwrap();
        s.backing_file_calls
            .push((file.map(String::from), format.map(String::from)));
        Box::pin(async { Ok(()) })
    }
    fn set_backing_bdev(&self, _backing: Option<Arc<dyn Bdev>>) -> NodeFuture<'_, ()> {
        self.st.lock().unwrap().backing_bdev_calls += 1;
        Box::pin(async { Ok(()) })
    }
}

/// Prepares the node and the chain's error bdev before the job starts.
type Prep = Box<dyn FnOnce(&mut NodeState, &ErrorBdev)>;

struct Setup {
    name: &'static str,
    alloc: Vec<Alloc>,
    on_error: OnError,
    prep: Prep,
}

struct Run {
    job: Arc<job::Job>,
    st: Arc<Mutex<NodeState>>,
    events: Arc<Mutex<Vec<JobEvent>>>,
}

/// The chain's data: cluster i holds `pattern(i)`.
fn start(s: Setup) -> Run {
    let base = format!("sd_{}", s.name);
    let m = MallocBdev::new(&base, CLUSTERS as u64 * CS / 512, 512, None).unwrap();
    graph().register(m).unwrap();
    let e = ErrorBdev::new(graph().nodes(), &base).unwrap();
    graph().register(e.clone()).unwrap();
    let top: Arc<dyn Bdev> = e.clone();
    let t2 = top.clone();
    rt().spawn_on(0, move || async move {
        let ch = bdev::channel(&t2).unwrap();
        for c in 0..CLUSTERS {
            let buf = DmaBuf::from_slice(&pattern(c)).unwrap();
            write_at(&ch, c as u64 * CS, buf).await.unwrap();
        }
    })
    .block()
    .unwrap();
    let mut state = NodeState {
        alloc: s.alloc,
        ..Default::default()
    };
    (s.prep)(&mut state, &e);
    let st = Arc::new(Mutex::new(state));
    let node: Arc<dyn ImageNode> = Arc::new(TestNode {
        bdev: top.clone(),
        st: st.clone(),
    });
    let plan = StreamPlan {
        top: Some(node),
        top_bdev: top,
        base: None,
        backing_file: None,
        backing_format: None,
        intermediates: vec![],
        noop: false,
        owner: 0,
        device: None,
        durable: false,
        writer: None,
        graph: graph().clone(),
    };
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev2 = events.clone();
    let mgr = JobManager::new(Arc::new(move |e: &JobEvent| {
        ev2.lock().unwrap().push(e.clone());
    }));
    let spec = JobSpec {
        id: s.name.into(),
        kind: KIND,
        device: s.name.into(),
        speed: 0,
        on_error: s.on_error,
        auto_finalize: true,
        auto_dismiss: false,
        legacy: false,
        nodes: vec![],
        throttle: None,
    };
    let tuning = Tuning {
        chunk: 4 * CS,
        max_inflight: 4,
        reactor_inflight: 1024,
        slow_start: false,
        yield_to_clients: false,
        sample: Duration::from_millis(1),
    };
    let size = CLUSTERS as u64 * CS;
    let driver = StreamDriver::new(plan, tuning);
    let job = job::start(&mgr, rt(), spec, 0, Some(size), driver).unwrap();
    Run { job, st, events }
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn layout() -> Vec<Alloc> {
    let mut v = vec![Alloc::Above; CLUSTERS];
    v[3] = Alloc::Here(vec![7; CS as usize]);
    v[4] = Alloc::Nothing;
    v[10] = Alloc::Here(vec![8; CS as usize]);
    v[11] = Alloc::Here(vec![9; CS as usize]);
    v[20] = Alloc::Nothing;
    v
}

impl Run {
    fn concluded(&self) -> JobEvent {
        wait_for("conclusion", || self.job.status() == JobStatus::Concluded);
        self.events
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|e| matches!(e, JobEvent::Completed { .. } | JobEvent::Cancelled { .. }))
            .cloned()
            .unwrap()
    }

    /// Every cluster the chain had is now the top's with the chain's data;
    /// what the top had (or a client wrote) is untouched.
    fn assert_streamed(&self, before: &[Alloc]) {
        let s = self.st.lock().unwrap();
        for (c, (now, was)) in s.alloc.iter().zip(before).enumerate() {
            match was {
                Alloc::Above if s.client_race == Some(c) => {
                    assert_eq!(now, &Alloc::Here(vec![0xcc; CS as usize]), "cluster {c}")
                }
                Alloc::Above => assert!(
                    *now == Alloc::Here(pattern(c)),
                    "cluster {c} was not streamed"
                ),
                other => assert_eq!(now, other, "cluster {c} changed"),
            }
        }
    }
}

#[test]
fn streams_the_chain_into_the_top_then_drops_the_backing() {
    let r = start(Setup {
        name: "full",
        alloc: layout(),
        on_error: OnError::Report,
        prep: Box::new(|s, _| s.client_race = Some(14)),
    });
    match r.concluded() {
        JobEvent::Completed { error: None, job } => assert_eq!(job.offset, job.len),
        e => panic!("{e:?}"),
    }
    r.assert_streamed(&layout());
    let s = r.st.lock().unwrap();
    assert_eq!(s.backing_file_calls, [(None, None)]);
    assert_eq!(s.backing_bdev_calls, 1);
    assert_eq!(s.wasted, 0, "copied clusters the top already had");
}

#[test]
fn read_error_with_stop_pauses_and_resume_retries() {
    let r = start(Setup {
        name: "readstop",
        alloc: layout(),
        on_error: OnError::Stop,
        prep: Box::new(|_, e| e.inject("read", "failure", 1).unwrap()),
    });
    wait_for("the error stop", || r.job.status() == JobStatus::Paused);
    assert_eq!(r.job.info().io_status, "failed");
    assert!(r.st.lock().unwrap().backing_file_calls.is_empty());
    r.job.resume().unwrap();
    match r.concluded() {
        JobEvent::Completed { error: None, .. } => {}
        e => panic!("{e:?}"),
    }
    r.assert_streamed(&layout());
}

#[test]
fn enospc_on_populate_stops_then_completes_and_eio_reports() {
    let r = start(Setup {
        name: "nospc",
        alloc: layout(),
        on_error: OnError::Enospc,
        prep: Box::new(|s, _| s.fail_write.push_back((17, libc::ENOSPC))),
    });
    wait_for("the error stop", || r.job.status() == JobStatus::Paused);
    assert_eq!(r.job.info().io_status, "nospace");
    r.job.resume().unwrap();
    match r.concluded() {
        JobEvent::Completed { error: None, .. } => {}
        e => panic!("{e:?}"),
    }
    r.assert_streamed(&layout());

    let r = start(Setup {
        name: "eio",
        alloc: layout(),
        on_error: OnError::Enospc,
        prep: Box::new(|s, _| s.fail_write.push_back((17, libc::EIO))),
    });
    match r.concluded() {
        JobEvent::Completed { error, .. } => {
            assert_eq!(error.as_deref(), Some("Input/output error"))
        }
        e => panic!("{e:?}"),
    }
    // A failed stream keeps its backing file.
    let s = r.st.lock().unwrap();
    assert!(s.backing_file_calls.is_empty() && s.backing_bdev_calls == 0);
}

#[test]
fn cancel_keeps_the_backing_file() {
    let r = start(Setup {
        name: "cancel",
        alloc: layout(),
        on_error: OnError::Report,
        prep: Box::new(|_, e| {
            // A read failure (reported) races with the cancel: either way
            // the stream ends without changing the backing file.
            e.inject("read", "failure", 1).unwrap()
        }),
    });
    drop(r.job.cancel().unwrap());
    match r.concluded() {
        JobEvent::Cancelled { .. } => {}
        // The injected failure may come first: a reported error.
        JobEvent::Completed { error: Some(_), .. } => {}
        e => panic!("{e:?}"),
    }
    let s = r.st.lock().unwrap();
    assert!(s.backing_file_calls.is_empty() && s.backing_bdev_calls == 0);
}
