//! Behaviour of the reactor runtime: pollers, messages, tasks, timers, stats,
//! parking and shutdown.

use reactor::{
    interval, register_poller, register_timed_poller, sleep, spawn_local, CoreSet, JoinError,
    PollStatus, PollerHandle, ReactorError, Runtime, RuntimeConfig,
};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn runtime(n: usize) -> Runtime {
    // Up to n reactors, as many as this machine has (CI has 2 cores).
    let set = CoreSet::from_cores(&(0..n).collect::<Vec<_>>()).unwrap();
    let set = if set.validate().is_ok() {
        set
    } else {
        CoreSet::from_list("0").unwrap()
    };
    let mut cfg = RuntimeConfig::new(set);
    cfg.pin = false;
    Runtime::start(cfg).expect("start runtime")
}

#[test]
fn active_poller_runs_and_unregisters_itself() {
    let rt = runtime(1);
    let h = rt.handle();
    let runs = h
        .spawn_on(0, || async {
            let count = Rc::new(Cell::new(0u32));
            let slot: Rc<RefCell<Option<PollerHandle>>> = Rc::new(RefCell::new(None));
            let (c, s) = (count.clone(), slot.clone());
            let p = register_poller("count_to_10", move || {
                c.set(c.get() + 1);
                if c.get() == 10 {
                    // Unregister from inside the poll.
                    if let Some(p) = s.borrow().as_ref() {
                        p.unregister();
                    }
                }
                PollStatus::Busy
            });
            *slot.borrow_mut() = Some(p);
            sleep(Duration::from_millis(20)).await;
            count.get()
        })
        .block()
        .unwrap();
    assert_eq!(
        runs, 10,
        "the poller must stop exactly when it unregisters itself"
    );
}

#[test]
fn paused_poller_does_not_run() {
    let rt = runtime(1);
    let (before, after) = rt
        .handle()
        .spawn_on(0, || async {
            let count = Rc::new(Cell::new(0u64));
            let c = count.clone();
            let p = register_poller("p", move || {
                c.set(c.get() + 1);
                PollStatus::Idle
            });
            sleep(Duration::from_millis(5)).await;
            p.pause();
            let before = count.get();
            sleep(Duration::from_millis(10)).await;
            let mid = count.get();
            assert_eq!(before, mid, "paused poller ran");
            p.resume();
            sleep(Duration::from_millis(5)).await;
            (before, count.get())
        })
        .block()
        .unwrap();
    assert!(before > 0 && after > before);
}

#[test]
fn timed_poller_honours_its_period() {
    let rt = runtime(1);
    let stamps = rt
        .handle()
        .spawn_on(0, || async {
            let stamps = Rc::new(RefCell::new(Vec::new()));
            let s = stamps.clone();
            let p = register_timed_poller("every_10ms", Duration::from_millis(10), move || {
                s.borrow_mut().push(Instant::now());
                PollStatus::Busy
            });
            sleep(Duration::from_millis(205)).await;
            p.unregister();
            let v = stamps.borrow().clone();
            v
        })
        .block()
        .unwrap();
    // 200 ms at 10 ms: about 20 runs. A loaded 2-core machine (a build beside
    // the tests) may lose many; never more than 21, never closer than the period.
    assert!((3..=21).contains(&stamps.len()), "runs: {}", stamps.len());
    for w in stamps.windows(2) {
        let d = w[1] - w[0];
        assert!(d >= Duration::from_micros(9_500), "period too short: {d:?}");
    }
}

#[test]
fn messages_from_one_sender_keep_their_order() {
    let rt = runtime(2);
    let h = rt.handle();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let n = 10_000u32;
    let target = h.num_reactors() - 1;
    for i in 0..n {
        let s = seen.clone();
        h.send(target, move || s.lock().unwrap().push(i)).unwrap();
    }
    h.call_on(target, || ()).block().unwrap();
    let v = seen.lock().unwrap();
    assert_eq!(v.len(), n as usize);
    assert!(v.windows(2).all(|w| w[0] < w[1]), "messages were reordered");
}

#[test]
fn messages_between_reactors_keep_order() {
    let rt = runtime(2);
    let h = rt.handle();
    if h.num_reactors() < 2 {
        return;
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    h.spawn_on(0, move || async move {
        let h = reactor::handle().unwrap();
        for i in 0..1000u32 {
            let s = s2.clone();
            h.send(1, move || s.lock().unwrap().push(i)).unwrap();
        }
    })
    .block()
    .unwrap();
    h.call_on(1, || ()).block().unwrap();
    let v = seen.lock().unwrap();
    assert_eq!(*v, (0..1000).collect::<Vec<_>>());
}

#[test]
fn tasks_spawned_across_reactors_are_awaited() {
    let rt = runtime(2);
    let h = rt.handle();
    let last = h.num_reactors() - 1;
    let total = h
        .spawn_on(0, move || async move {
            let h = reactor::handle().unwrap();
            let mut sum = 0u64;
            for i in 0..50u64 {
                // Each task runs on the other reactor and reports where it ran.
                let r = h.spawn_on(last, move || async move {
                    sleep(Duration::from_micros(100)).await;
                    (i, reactor::current_index().unwrap())
                });
                let (v, idx) = r.await.unwrap();
                assert_eq!(idx, last);
                sum += v;
            }
            // Local tasks too.
            let a = spawn_local(async { 40 });
            let b = spawn_local(async { 2 });
            sum + a.await.unwrap() + b.await.unwrap()
        })
        .block()
        .unwrap();
    assert_eq!(total, (0..50).sum::<u64>() + 42);
}

#[test]
fn timers_sleep_and_interval() {
    let rt = runtime(1);
    let (slept, ticks) = rt
        .handle()
        .spawn_on(0, || async {
            let t0 = Instant::now();
            sleep(Duration::from_millis(30)).await;
            let slept = t0.elapsed();
            // t1 before the interval: its first tick is one period after
            // its creation.
            let t1 = Instant::now();
            let mut iv = interval(Duration::from_millis(5));
            for _ in 0..10 {
                iv.tick().await;
            }
            (slept, t1.elapsed())
        })
        .block()
        .unwrap();
    // The timers run on the TSC, calibrated against the OS clock: allow
    // their rates to differ by 1%.
    assert!(
        slept >= Duration::from_micros(29_700) && slept < Duration::from_millis(200),
        "{slept:?}"
    );
    assert!(
        ticks >= Duration::from_micros(49_500) && ticks < Duration::from_millis(400),
        "{ticks:?}"
    );
}

#[test]
fn stats_add_up() {
    let rt = runtime(1);
    let h = rt.handle();
    h.spawn_on(0, || async {
        let mut n = 0;
        register_poller("busy_100", move || {
            n += 1;
            if n <= 100 {
                PollStatus::Busy
            } else {
                PollStatus::Idle
            }
        });
        sleep(Duration::from_millis(50)).await;
    })
    .block()
    .unwrap();
    let stats = futures_block(h.stats());
    assert_eq!(stats.len(), 1);
    let s = &stats[0];
    let p = s
        .pollers
        .iter()
        .find(|p| p.name == "busy_100")
        .expect("poller in stats");
    assert_eq!(p.busy_count, 100);
    assert!(p.run_count >= 100);
    assert!(s.busy_ticks > 0 && s.idle_ticks > 0);
    assert!(
        s.iterations >= p.run_count,
        "every poller run is one iteration at most"
    );
    // busy + idle covers (most of) the wall time the reactor existed.
    let total_s = (s.busy_ticks + s.idle_ticks) as f64 / s.tick_rate as f64;
    assert!(total_s > 0.04 && total_s < 30.0, "{total_s}");
}

fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

#[test]
fn idle_reactor_parks_and_wakes_on_message() {
    let rt = runtime(1);
    let h = rt.handle();
    std::thread::sleep(Duration::from_millis(50));
    let s0 = futures_block(h.stats());
    std::thread::sleep(Duration::from_millis(200));
    let s1 = futures_block(h.stats());
    // Parked: a few iterations at most per stats message, not millions.
    let iters = s1[0].iterations - s0[0].iterations;
    assert!(
        iters < 10_000,
        "an idle reactor spun {iters} iterations in 200 ms"
    );
    assert!(s1[0].parks > s0[0].parks);
    // And it still answers at once.
    let t = Instant::now();
    h.call_on(0, || ()).block().unwrap();
    assert!(t.elapsed() < Duration::from_millis(100));
}

#[test]
fn shutdown_lets_in_flight_work_finish() {
    let rt = runtime(1);
    let h = rt.handle();
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    h.spawn_on(0, move || async move {
        sleep(Duration::from_millis(100)).await;
        d.fetch_add(1, Ordering::SeqCst);
    })
    .detach();
    std::thread::sleep(Duration::from_millis(10));
    let t = Instant::now();
    rt.shutdown();
    assert_eq!(
        done.load(Ordering::SeqCst),
        1,
        "the in-flight task was dropped"
    );
    assert!(t.elapsed() < Duration::from_secs(1));
    // New work is refused after shutdown began.
    assert!(matches!(h.send(0, || ()), Err(ReactorError::ShuttingDown)));
}

#[test]
fn shutdown_is_bounded_by_the_drain_timeout() {
    let rt = runtime(1);
    let h = rt.handle();
    h.spawn_on(0, || async {
        // Never finishes on its own.
        loop {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .detach();
    std::thread::sleep(Duration::from_millis(10));
    let t = Instant::now();
    rt.shutdown();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[test]
fn bad_core_sets_are_clear_errors() {
    let e = CoreSet::from_list("0,0").unwrap_err();
    assert_eq!(e.to_string(), "core 0 is given twice");
    let set = CoreSet::from_mask("0x8000").unwrap();
    let e = Runtime::start(RuntimeConfig::new(set))
        .err()
        .expect("core 15 must not exist here");
    assert!(e.to_string().contains("core 15"), "{e}");
    assert!(CoreSet::from_mask("zz").is_err());
}

#[test]
fn wakes_from_many_threads_are_not_lost() {
    let rt = runtime(1);
    let h = rt.handle();
    let count = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let h = h.clone();
            let c = count.clone();
            std::thread::spawn(move || {
                for i in 0..2000 {
                    let c = c.clone();
                    h.send(0, move || {
                        c.fetch_add(1, Ordering::Relaxed);
                    })
                    .unwrap();
                    if i % 100 == 0 {
                        // Let the reactor go idle and park now and then.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    h.call_on(0, || ()).block().unwrap();
    assert_eq!(count.load(Ordering::Relaxed), 8000);
}

#[test]
fn broadcast_runs_once_on_every_reactor_and_answers_in_order() {
    let rt = runtime(2);
    let h = rt.handle();
    let n = h.num_reactors();
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    // From a plain thread: one answer per reactor, in reactor order, each
    // computed on that reactor.
    let got = h
        .broadcast(move || {
            r2.fetch_add(1, Ordering::SeqCst);
            (reactor::current_index(), reactor::current_core())
        })
        .block();
    assert_eq!(runs.load(Ordering::SeqCst), n, "ran once per reactor");
    let cores = h.cores();
    let want: Vec<_> = (0..n).map(|i| (Some(i), Some(cores[i]))).collect();
    let got: Vec<_> = got.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(got, want);
    // Awaited on a reactor, including that reactor itself: no deadlock.
    let h2 = h.clone();
    let from_task = h
        .spawn_on(n - 1, move || async move {
            h2.broadcast(|| reactor::current_index().unwrap())
                .await
                .into_iter()
                .map(|r| r.unwrap())
                .collect::<Vec<_>>()
        })
        .block()
        .unwrap();
    assert_eq!(from_task, (0..n).collect::<Vec<_>>());
}

#[test]
fn broadcast_spawn_runs_local_futures_everywhere_in_parallel() {
    let rt = runtime(2);
    let h = rt.handle();
    let n = h.num_reactors();
    // Every reactor's task waits (up to 2 s) until all have started: only a
    // broadcast that sends every message before waiting for any answer lets
    // each of them see all the others.
    let started = Arc::new(AtomicUsize::new(0));
    let s2 = started.clone();
    let got = h
        .broadcast_spawn(move || {
            let s = s2.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                let t0 = Instant::now();
                while s.load(Ordering::SeqCst) < n && t0.elapsed() < Duration::from_secs(2) {
                    sleep(Duration::from_millis(1)).await;
                }
                (
                    reactor::current_index().unwrap() * 10,
                    s.load(Ordering::SeqCst),
                )
            }
        })
        .block();
    let got: Vec<_> = got.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(got, (0..n).map(|i| (i * 10, n)).collect::<Vec<_>>());
}

#[test]
fn broadcast_after_shutdown_answers_an_error_per_reactor() {
    let rt = runtime(2);
    let h = rt.handle();
    let n = h.num_reactors();
    rt.shutdown();
    let got = h.broadcast(|| 1u32).block();
    assert_eq!(got.len(), n);
    for r in got {
        assert_eq!(r, Err(JoinError::ShuttingDown));
    }
    let got = h.broadcast_spawn(|| async { 1u32 }).block();
    assert!(got.iter().all(|r| r.is_err()), "{got:?}");
}
