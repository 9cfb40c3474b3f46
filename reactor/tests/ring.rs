//! Rings into a reactor: order, wake-ups of a parked reactor, a full ring,
//! and the handler's end once the sender is gone.

use reactor::{current_index, CoreSet, Runtime, RuntimeConfig};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

fn runtime() -> Runtime {
    let mut cfg = RuntimeConfig::new(CoreSet::from_list("0").unwrap());
    cfg.pin = false;
    cfg.idle_before_park = Duration::from_micros(50);
    Runtime::start(cfg).expect("start runtime")
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(5), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn items_arrive_in_order_and_wake_a_parked_reactor() {
    let rt = runtime();
    let h = rt.handle();
    let seen = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicBool::new(false));
    let (s, b) = (seen.clone(), bad.clone());
    let mut tx = h
        .ring_to(0, 64, move || {
            assert_eq!(
                current_index(),
                Some(0),
                "the handler is made on the target"
            );
            move |i: u64| {
                if i != s.load(Ordering::Relaxed) {
                    b.store(true, Ordering::Relaxed);
                }
                s.store(i + 1, Ordering::Relaxed);
            }
        })
        .unwrap();
    for i in 0..5000u64 {
        let mut item = i;
        while let Err(back) = tx.push(item) {
            item = back;
            std::thread::yield_now();
        }
        if i % 250 == 0 {
            // Let the reactor go idle and park: only the push may wake it.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // No message follows: the last items are taken because the push woke it.
    wait_for("all items handled", || seen.load(Ordering::Relaxed) == 5000);
    assert!(!bad.load(Ordering::Relaxed), "items out of order");
    let parks = futures::executor::block_on(h.stats())[0].parks;
    assert!(
        parks > 0,
        "the reactor never parked, so wake-ups went untested"
    );
}

#[test]
fn a_full_ring_hands_the_item_back() {
    let rt = runtime();
    let h = rt.handle();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let mut tx = h
        .ring_to(0, 4, move || {
            // Holds the reactor until the test has filled the ring.
            go_rx.recv().ok();
            move |_: u32| {
                s.fetch_add(1, Ordering::Relaxed);
            }
        })
        .unwrap();
    let mut pushed = 0;
    while tx.push(7).is_ok() {
        pushed += 1;
        assert!(pushed <= 64, "a ring of 4 took {pushed} items");
    }
    assert!(pushed >= 4, "only {pushed} items fit a ring of 4");
    assert_eq!(tx.push(9), Err(9), "the refused item comes back");
    go_tx.send(()).unwrap();
    wait_for("the ring drained", || {
        seen.load(Ordering::Relaxed) == pushed
    });
    assert_eq!(tx.push(1), Ok(()), "room again once drained");
    wait_for("the last item", || {
        seen.load(Ordering::Relaxed) == pushed + 1
    });
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn dropping_the_sender_drains_then_drops_the_handler() {
    let rt = runtime();
    let h = rt.handle();
    let dropped = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicU64::new(0));
    let (d, s) = (dropped.clone(), seen.clone());
    let mut tx = h
        .ring_to(0, 16, move || {
            let guard = SetOnDrop(d);
            move |_: ()| {
                let _keep = &guard;
                s.fetch_add(1, Ordering::Relaxed);
            }
        })
        .unwrap();
    for _ in 0..10 {
        tx.push(()).unwrap();
    }
    drop(tx);
    wait_for("the handler dropped", || dropped.load(Ordering::Relaxed));
    assert_eq!(
        seen.load(Ordering::Relaxed),
        10,
        "items left were handled first"
    );
}

#[test]
fn a_stopping_reactor_empties_its_rings_then_refuses_items() {
    let rt = runtime();
    let h = rt.handle();
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let mut tx = h
        .ring_to(0, 1024, move || {
            move |_: u32| {
                s.fetch_add(1, Ordering::Relaxed);
            }
        })
        .unwrap();
    // Hold the reactor while 1000 items queue up (many poller batches), then stop.
    let (go_tx, go_rx) = mpsc::channel::<()>();
    h.send(0, move || {
        go_rx.recv().ok();
    })
    .unwrap();
    for _ in 0..1000 {
        tx.push(1).unwrap();
    }
    h.shutdown();
    go_tx.send(()).unwrap();
    rt.shutdown();
    assert_eq!(
        seen.load(Ordering::Relaxed),
        1000,
        "items left behind at shutdown"
    );
    assert_eq!(
        tx.push(2),
        Err(2),
        "a stopped reactor's ring takes no more items"
    );
}
