//! The DMA arena: aligned zeroed buffers inside advertised regions, reuse,
//! growth with listeners, and the fallback to ordinary pages without hugepages.

use bdev::dma::{self, DmaBuf, DMA_ALIGN};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

fn free_hugepages() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("HugePages_Free:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0)
}

#[test]
fn buffers_are_aligned_zeroed_and_inside_regions() {
    let mut bufs = Vec::new();
    for len in [1usize, 512, 4096, 5000, 65536, 1 << 20, (3 << 20) + 17] {
        let mut b = DmaBuf::new(len).unwrap();
        assert_eq!(b.len(), len);
        assert!(b.capacity() >= len);
        assert_eq!(b.as_ptr() as usize % DMA_ALIGN, 0, "aligned");
        assert!(b.as_slice().iter().all(|&x| x == 0), "zeroed");
        assert!(
            dma::contains(b.as_ptr(), b.capacity()),
            "inside an advertised region"
        );
        b.as_mut_slice().fill(0x5a);
        bufs.push(b);
    }
    // Buffers do not overlap.
    let mut spans: Vec<(usize, usize)> = bufs
        .iter()
        .map(|b| (b.as_ptr() as usize, b.capacity()))
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "overlap");
    }
    let used = dma::stats().used_bytes;
    drop(bufs);
    assert!(dma::stats().used_bytes < used, "freed memory is accounted");
    // Reused memory comes back zeroed from new() (not from new_dirty()).
    let b = DmaBuf::new(4096).unwrap();
    assert!(b.as_slice().iter().all(|&x| x == 0));
    assert!(!dma::regions().is_empty());
}

#[test]
fn growth_is_announced_to_listeners() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    dma::subscribe_fn(move |a, l| s2.lock().unwrap().push((a, l)));
    let before = seen.lock().unwrap().len();
    assert_eq!(
        before,
        dma::regions().len(),
        "existing regions are replayed"
    );
    // More than the initial region: the arena must grow.
    let big = DmaBuf::new_dirty(dma::stats().total_bytes + (8 << 20)).unwrap();
    let after = seen.lock().unwrap().clone();
    assert!(after.len() > before, "a new region was announced");
    let (a, l) = *after.last().unwrap();
    assert!(big.as_ptr() as usize >= a && big.as_ptr() as usize + big.len() <= a + l);
    drop(big);
}

#[test]
fn concurrent_alloc_free() {
    let n = Arc::new(AtomicUsize::new(0));
    let ts: Vec<_> = (0..4)
        .map(|t| {
            let n = n.clone();
            std::thread::spawn(move || {
                for i in 0..2000 {
                    let mut b = DmaBuf::new_dirty(4096 << (i % 4)).unwrap();
                    b.as_mut_slice()[0] = t;
                    assert_eq!(b.as_slice()[0], t);
                    n.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in ts {
        t.join().unwrap();
    }
    assert_eq!(n.load(Ordering::Relaxed), 8000);
}

/// Run in a child process (fresh arena) by `fallback_without_hugepages`.
#[test]
#[ignore]
fn child_report_arena() {
    let b = DmaBuf::new(4096).unwrap();
    let st = dma::stats();
    println!(
        "ARENA huge={} regions={} ptr_ok={}",
        st.hugepages,
        st.regions,
        dma::contains(b.as_ptr(), 4096)
    );
}

fn run_child(env: &[(&str, &str)]) -> (String, String) {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--ignored", "--exact", "child_report_arena", "--nocapture"])
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn fallback_without_hugepages() {
    let (out, _) = run_child(&[("SLUICE_NO_HUGE", "1")]);
    assert!(
        out.contains("ARENA huge=false regions=1 ptr_ok=true"),
        "{out}"
    );
    // With the machine's own setting: hugepages if enough are reserved and free.
    let (out, _) = run_child(&[]);
    if free_hugepages() >= 16 {
        assert!(out.contains("ARENA huge=true"), "{out}");
    } else {
        assert!(out.contains("ARENA huge=false"), "{out}");
    }
}
