//! Crash safety: a writer process (examples/qcow2_crash_writer.rs) is killed
//! with SIGKILL in the middle of writes, many times over the same image. After
//! every kill, `qemu-img check` reports no corruption (leaks are allowed) and
//! every write acknowledged before a completed flush reads back (through qemu-img).

mod qcow2_common;

use qcow2_common::crash_gen::blocks_of;
use qcow2_common::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn writer_binary() -> std::path::PathBuf {
    // Build the example once (cargo test does not build examples of other names).
    let st = Command::new(env!("CARGO"))
        .args([
            "build",
            "-q",
            "-p",
            "bdev",
            "--example",
            "qcow2_crash_writer",
        ])
        .status()
        .expect("cargo build");
    assert!(st.success());
    let mut p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    p.pop();
    p.join("target/debug/examples/qcow2_crash_writer")
}

fn crash_cycles(tag: &str, cluster_size: &str, cycles: u64) {
    let bin = writer_binary();
    let d = scratch(tag);
    let img = d.join("crash.qcow2");
    let size = 32u64 << 20;
    qemu_img_create(
        &img,
        &size.to_string(),
        &["-o", &format!("cluster_size={cluster_size}")],
    );
    let nblocks = size / 4096;
    // Per block: generation currently on disk (0 = never written).
    let mut state: HashMap<u64, u64> = HashMap::new();
    // Blocks left torn by a write that was in flight at a kill (a guest block
    // spanning several clusters is written in pieces; an unacknowledged write
    // may land in part), until a flushed generation rewrites them.
    let mut torn: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let mut gen = 1u64;
    let mut rng = Rng(0x5eed ^ cluster_size.len() as u64);
    for cycle in 0..cycles {
        let seed = rng.next();
        let first = gen;
        let mut child = Command::new(&bin)
            .args([img.to_str().unwrap(), &seed.to_string(), &first.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn writer");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(g) = line
                    .strip_prefix("flushed ")
                    .and_then(|s| s.parse::<u64>().ok())
                {
                    let _ = tx.send(g);
                }
            }
        });
        // Let it get going (at least one flush), then kill it at a random moment.
        let start = Instant::now();
        let mut flushed = None;
        while flushed.is_none() && start.elapsed() < Duration::from_secs(60) {
            if let Ok(g) = rx.recv_timeout(Duration::from_millis(20)) {
                flushed = Some(g);
            }
            if let Ok(Some(st)) = child.try_wait() {
                let mut e = String::new();
                use std::io::Read;
                child.stderr.take().unwrap().read_to_string(&mut e).ok();
                panic!("writer exited early: {st}: {e}");
            }
        }
        std::thread::sleep(Duration::from_millis(rng.below(150)));
        // SIGKILL.
        child.kill().expect("kill");
        child.wait().expect("wait");
        // Every line the writer printed before it died must be counted: the
        // reader may still be behind in the pipe (a loaded machine), so wait
        // for it to reach the end of the pipe before draining.
        reader.join().expect("stdout reader");
        while let Ok(g) = rx.try_recv() {
            flushed = Some(flushed.map_or(g, |f: u64| f.max(g)));
        }
        let flushed = flushed.expect("the writer never completed a flush");
        // Generations that may have started: up to flushed + 1 (the one in flight).
        let last_started = flushed + 1;
        let (code, out) = qemu_check(&img);
        assert!(
            code == 0 || code == 3,
            "cycle {cycle}: qemu-img check found corruption (exit {code}):\n{out}"
        );
        assert!(!out.contains("ERROR"), "cycle {cycle}: {out}");
        let data = qemu_contents(&img);
        // Expected: each block holds its last generation <= flushed, or a later one that was in flight.
        let mut hist: HashMap<u64, Vec<u64>> = HashMap::new();
        for g in first..=last_started {
            for b in blocks_of(seed, g, nblocks) {
                hist.entry(b).or_default().push(g);
            }
        }
        for b in 0..nblocks {
            let blk = &data[(b * 4096) as usize..((b + 1) * 4096) as usize];
            let prev = state.get(&b).copied().unwrap_or(0);
            let gens = hist.get(&b).cloned().unwrap_or_default();
            let must = gens
                .iter()
                .copied()
                .filter(|&g| g <= flushed)
                .max()
                .unwrap_or(prev);
            let rewritten = gens.iter().any(|&g| g <= flushed);
            if torn.contains(&b) && !rewritten && !gens.iter().any(|&g| g > flushed) {
                continue; // still the torn leftover of an earlier kill
            }
            torn.remove(&b);
            let intact = |blk: &[u8]| -> Option<u64> {
                if &blk[..8] != b"SLUICEv1" {
                    return None;
                }
                let idx = u64::from_le_bytes(blk[8..16].try_into().unwrap());
                let g = u64::from_le_bytes(blk[16..24].try_into().unwrap());
                let fill = ((b * 31 + g * 7) % 251) as u8 | 1;
                (idx == b && blk[24..].iter().all(|&x| x == fill)).then_some(g)
            };
            let on_disk = if blk.iter().all(|&x| x == 0) {
                0
            } else if let Some(g) = intact(blk) {
                g
            } else {
                // Torn or foreign: only an unacknowledged (in-flight) write may do that.
                assert!(
                    gens.iter().any(|&g| g > flushed),
                    "cycle {cycle}: block {b} torn or garbage without a write in flight (writes {gens:?}, flushed {flushed})"
                );
                torn.insert(b);
                state.remove(&b);
                continue;
            };
            assert!(
                on_disk == must || (on_disk > must && gens.contains(&on_disk)),
                "cycle {cycle}: block {b}: on disk gen {on_disk}, flushed {flushed}, must be at least {must} (writes {gens:?})"
            );
            if on_disk != 0 {
                state.insert(b, on_disk);
            }
        }
        gen = last_started + 1;
    }
    // Finally sluice itself reads the crashed image identically.
    let rt = runtime(1);
    let h = rt.handle();
    let q = open(
        &h,
        "crash-final",
        &img,
        bdev::qcow2::OpenOptions {
            read_only: true,
            ..opts()
        },
    )
    .expect("open");
    let b: std::sync::Arc<dyn bdev::Bdev> = q;
    assert!(
        read_all(&h, 0, &b, 1 << 20) == qemu_contents(&img),
        "sluice and qemu-img disagree after the crashes"
    );
}

#[test]
fn sigkill_during_writes_64k_clusters() {
    crash_cycles("crash64k", "65536", soak(12));
}

#[test]
fn sigkill_during_writes_512_clusters() {
    crash_cycles("crash512", "512", soak(8));
}
