//! Reactor micro-benchmarks (issue 2): message throughput and round trip between
//! two reactors, loop iterations with idle pollers, wake-up latency of a parked
//! reactor, and CPU used by an idle two-reactor runtime.
//!
//! Run: `cargo bench -p reactor` (add `-- --quick` for a short run).

use reactor::{register_poller, ticks, ticks_to_ns, CoreSet, PollStatus, Runtime, RuntimeConfig};
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn start(cores: &str, idle_before_park: Duration) -> Runtime {
    let mut cfg = RuntimeConfig::new(CoreSet::from_list(cores).expect("cores"));
    cfg.idle_before_park = idle_before_park;
    Runtime::start(cfg).expect("runtime")
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn cpu_seconds() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc_rusage::Rusage>::uninit();
    libc_rusage::get(&mut ru)
}

mod libc_rusage {
    //! getrusage(RUSAGE_SELF) through /proc (no unsafe here).
    pub struct Rusage;
    pub fn get(_: &mut std::mem::MaybeUninit<Rusage>) -> f64 {
        let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let after = s.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let utime: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let stime: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        (utime + stime) / 100.0
    }
}

/// Messages per second from reactor 0 to reactor 1 (reactor 0 sends in batches
/// from a poller, keeping at most `window` in flight).
fn message_throughput(secs: f64) {
    let rt = start("0,1", Duration::from_millis(1));
    let h = rt.handle();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (r2, s2) = (received.clone(), stop.clone());
    h.call_on(0, move || {
        let h = reactor::handle().unwrap();
        let sent = Rc::new(Cell::new(0u64));
        register_poller("sender", move || {
            if s2.load(Ordering::Relaxed) {
                return PollStatus::Idle;
            }
            // Keep up to 4096 messages in flight.
            let inflight = sent.get() - r2.load(Ordering::Relaxed);
            let n = 4096u64.saturating_sub(inflight).min(256);
            for _ in 0..n {
                let r = r2.clone();
                let _ = h.send(1, move || {
                    r.fetch_add(1, Ordering::Relaxed);
                });
            }
            sent.set(sent.get() + n);
            PollStatus::Busy
        });
    })
    .block()
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let r0 = received.load(Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let r1 = received.load(Ordering::Relaxed);
    let dt = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    println!(
        "messages reactor0 -> reactor1: {:.2} M/s",
        (r1 - r0) as f64 / dt / 1e6
    );
    rt.shutdown();
}

/// Round trip: reactor 0 sends to reactor 1, which answers; one at a time.
fn message_round_trip(n: usize, parked: bool) {
    let park = if parked {
        Duration::from_micros(50)
    } else {
        Duration::from_secs(3600)
    };
    let rt = start("0,1", park);
    let h = rt.handle();
    let lats = h
        .spawn_on(0, move || async move {
            let h = reactor::handle().unwrap();
            let mut lats = Vec::with_capacity(n);
            for _ in 0..n {
                if parked {
                    // Let the other reactor park first.
                    reactor::sleep(Duration::from_micros(300)).await;
                }
                let t0 = ticks();
                h.call_on(1, || ()).await.unwrap();
                lats.push(ticks_to_ns(ticks() - t0));
            }
            lats
        })
        .block()
        .unwrap();
    let mut l = lats;
    let what = if parked {
        "round trip to a parked reactor"
    } else {
        "round trip (polling)"
    };
    println!(
        "{what}: median {:.1} us, p99 {:.1} us",
        pct(&mut l, 0.5) as f64 / 1e3,
        pct(&mut l, 0.99) as f64 / 1e3
    );
    rt.shutdown();
}

/// Wake-up latency of a parked reactor: a plain thread sends a message that
/// records when it ran.
fn wake_latency(n: usize) {
    let rt = start("1", Duration::from_micros(50));
    let h = rt.handle();
    let mut lats = Vec::with_capacity(n);
    for _ in 0..n {
        std::thread::sleep(Duration::from_millis(2));
        let t0 = ticks();
        let ran = h.call_on(0, ticks).block().unwrap();
        lats.push(ticks_to_ns(ran.saturating_sub(t0)));
    }
    println!(
        "wake-up of a parked reactor (send -> closure runs): median {:.1} us, p99 {:.1} us (goal p99 < 50 us)",
        pct(&mut lats, 0.5) as f64 / 1e3,
        pct(&mut lats, 0.99) as f64 / 1e3
    );
    rt.shutdown();
}

/// Loop iterations per second with `n` idle pollers (the reactor never parks).
fn iterations(n: usize, secs: f64) {
    let rt = start("0", Duration::from_secs(3600));
    let h = rt.handle();
    h.call_on(0, move || {
        for i in 0..n {
            let name = format!("idle{i}");
            register_poller(&name, || PollStatus::Idle);
        }
    })
    .block()
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let s0 = futures::executor::block_on(h.stats());
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let s1 = futures::executor::block_on(h.stats());
    let dt = t0.elapsed().as_secs_f64();
    let it = (s1[0].iterations - s0[0].iterations) as f64 / dt;
    println!(
        "iterations with {n:>2} idle pollers: {:.2} M/s ({:.0} ns per iteration)",
        it / 1e6,
        1e9 / it
    );
    rt.shutdown();
}

/// CPU used by an idle two-reactor runtime over `secs`.
fn idle_cpu(secs: f64) {
    let rt = start(
        "0,1",
        RuntimeConfig::new(CoreSet::from_list("0").unwrap()).idle_before_park,
    );
    std::thread::sleep(Duration::from_millis(200));
    let c0 = cpu_seconds();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let used = cpu_seconds() - c0;
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "idle runtime, 2 reactors, {dt:.0} s: {:.2}% of one core in total (goal < 2%)",
        used / dt * 100.0
    );
    rt.shutdown();
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let secs = if quick { 0.5 } else { 2.0 };
    println!(
        "reactor benchmarks ({} cores available)",
        CoreSet::all_available().len()
    );
    message_throughput(secs);
    message_round_trip(if quick { 2000 } else { 20000 }, false);
    message_round_trip(if quick { 200 } else { 1000 }, true);
    wake_latency(if quick { 200 } else { 1000 });
    for n in [1, 8, 64] {
        iterations(n, secs);
    }
    idle_cpu(if quick { 2.0 } else { 10.0 });
}
