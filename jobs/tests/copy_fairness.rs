//! Many copies at once on one reactor share its budget fairly (issue 19).
//!
//! The device is modelled as the kernel's block queue in front of a disk: a
//! few requests are served at once (the disk's slots, each a fixed time);
//! the rest wait in a queue that grants a freed slot to the first-polled
//! copy (the lowest index), as the fixed order in which a reactor submits
//! its rings' requests does. Each copy kept its whole window in flight, the
//! queue was deep and the first copies finished while the last had barely
//! begun. With the reactor's budget divided among the hungry copies, no more
//! than the disk's slots are in flight and every copy moves at the same pace.

use futures::channel::oneshot;
use jobs::copy::{copy_all, Chunk, CopyError, CopyOps, Extent, Tuning};
use jobs::job::{self, Job, JobDriver, JobKind, JobManager, JobSpec, JobStatus, OnError, Step};
use reactor::{CoreSet, Runtime, RuntimeConfig};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const G: u64 = 64 << 10;
/// Copies at once.
const JOBS: usize = 4;
/// Chunks each copy has to copy.
const CHUNKS: u64 = 40;
/// Requests the disk serves at once.
const SLOTS: usize = 4;
/// The disk's time per request.
const SERVICE: Duration = Duration::from_millis(4);

#[derive(Default)]
struct Disk {
    busy: usize,
    most_busy: usize,
    /// Requests waiting for a slot: (copy, wake-up).
    queue: Vec<(usize, oneshot::Sender<()>)>,
    /// Chunks done per copy.
    done: [u64; JOBS],
    /// `done` when the first copy finished its last chunk.
    at_first_end: Option<[u64; JOBS]>,
}

struct Ops {
    idx: usize,
    disk: Arc<Mutex<Disk>>,
}

impl CopyOps for Ops {
    fn size(&self) -> u64 {
        CHUNKS * G
    }

    fn granularity(&self) -> u64 {
        G
    }

    async fn extent(&self, offset: u64, _len: u64) -> Result<Extent, i32> {
        Ok(Extent {
            len: CHUNKS * G - offset,
            copy: true,
            zero: false,
        })
    }

    async fn copy(&self, _c: Chunk) -> Result<(), CopyError> {
        let wait = {
            let mut d = self.disk.lock().unwrap();
            if d.busy < SLOTS {
                d.busy += 1;
                d.most_busy = d.most_busy.max(d.busy);
                None
            } else {
                let (tx, rx) = oneshot::channel();
                d.queue.push((self.idx, tx));
                Some(rx)
            }
        };
        if let Some(rx) = wait {
            // The slot is handed over with `busy` unchanged.
            let _ = rx.await;
        }
        reactor::sleep(SERVICE).await;
        let mut d = self.disk.lock().unwrap();
        d.done[self.idx] += 1;
        if d.done[self.idx] == CHUNKS && d.at_first_end.is_none() {
            d.at_first_end = Some(d.done);
        }
        // The freed slot goes to the first-polled copy waiting.
        match (0..d.queue.len()).min_by_key(|&i| d.queue[i].0) {
            Some(i) => {
                let (_, tx) = d.queue.remove(i);
                let _ = tx.send(());
            }
            None => d.busy -= 1,
        }
        Ok(())
    }
}

struct Driver {
    idx: usize,
    disk: Arc<Mutex<Disk>>,
    tuning: Tuning,
}

impl JobDriver for Driver {
    fn run<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        Box::pin(async move {
            let ops = Ops {
                idx: self.idx,
                disk: self.disk.clone(),
            };
            copy_all(job, Rc::new(ops), &self.tuning).await
        })
    }
}

#[test]
fn copies_on_one_reactor_progress_at_the_same_pace() {
    let rt = Runtime::start(RuntimeConfig {
        pin: false,
        ..RuntimeConfig::new(CoreSet::from_list("0").unwrap())
    })
    .unwrap();
    let h = rt.handle();
    let disk = Arc::new(Mutex::new(Disk::default()));
    let mgr = JobManager::new(Arc::new(|_: &job::JobEvent| {}));
    let tuning = Tuning {
        chunk: G,
        max_inflight: 4,
        reactor_inflight: SLOTS,
        slow_start: true,
        yield_to_clients: false,
        sample: Duration::from_millis(1),
    };
    let jobs: Vec<_> = (0..JOBS)
        .map(|idx| {
            let spec = JobSpec {
                id: format!("fair{idx}"),
                kind: JobKind {
                    name: "copy-test",
                    block_job: true,
                },
                device: format!("fair{idx}"),
                speed: 0,
                on_error: OnError::Report,
                auto_finalize: true,
                auto_dismiss: false,
                legacy: false,
                nodes: vec![],
                throttle: None,
            };
            let driver = Driver {
                idx,
                disk: disk.clone(),
                tuning,
            };
            job::start(&mgr, &h, spec, 0, Some(CHUNKS * G), driver).unwrap()
        })
        .collect();
    let t0 = Instant::now();
    while !jobs.iter().all(|j| j.status() == JobStatus::Concluded) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the copies did not end"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let d = disk.lock().unwrap();
    assert_eq!(d.done, [CHUNKS; JOBS], "every chunk copied once");
    assert_eq!(d.most_busy, SLOTS, "the disk's slots were kept busy");
    // When the first copy ended, every other had done nearly as much (the
    // old behaviour: the first ended with the last at a few chunks).
    let at_end = d.at_first_end.expect("a copy ended");
    let least = *at_end.iter().min().unwrap();
    assert!(
        least >= CHUNKS * 3 / 4,
        "chunks done per copy when the first ended: {at_end:?} (of {CHUNKS})"
    );
    drop(d);
    drop(rt);
}
