//! Power-loss crash states (issue #17). A killed process leaves its writes in
//! the page cache, so a kill test cannot tell durable from not durable; here
//! a recording bdev ([`bdev::record`]) sits between a qcow2 image and its
//! file and logs every write, FUA write, flush, discard and write-zeroes
//! with its data, and the replayer builds the states a power loss could
//! leave (for each durability point: everything durable plus prefixes and
//! random, possibly torn, subsets of what was in flight or issued before the
//! next one). On each: `qemu-img check` finds no corruption, the image opens
//! in sluice and qemu-img and reads the same (every few states), every write
//! acknowledged before a completed flush (or with FUA) reads back, and once
//! a stream was reported complete, its data is there without the backing
//! file, whose name is gone from the header.
//!
//! Workloads: random allocating writes, overwrites, discards, write-zeroes
//! and FUA writes into an empty image and over a backing file; L2-table and
//! refcount-block growth (512-byte clusters); the refcount table replaced by
//! a larger one (64-bit refcounts); an ENOSPC in the middle (a
//! file too small for the image); a stream to completion with guest writes
//! beside it. Each test prints its counts ("crash states: ..."); the
//! default run checks more than 500 states, `SLUICE_SOAK=1` more than 10,000.
//!
//! The checker is shown to fail: a device that ignores flushes, a replay
//! that loses what one flush made durable, and a stream whose final header
//! change skips its flush (`durable: false`) are each caught.

mod qcow2_common;

use bdev::qcow2::{BackingSpec, OpenOptions, Qcow2Bdev};
use bdev::record::check::{check_state, Expect, Tally};
use bdev::record::oracle::{sector_pattern, Oracle};
use bdev::record::replay::{self, Plan};
use bdev::record::{RecordBdev, RecordOptions};
use bdev::uring::{UringBdev, UringOptions};
use bdev::{channel, submit_wait, Bdev, BdevIo, DmaBuf, IoStatus, IoType};
use qcow2_common::{run, runtime, scratch, soak, Rng};
use reactor::Runtime;
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

/// The guest's requests.
#[derive(Debug, Clone, Copy)]
struct Mix {
    /// Weights of write, FUA write, write-zeroes, discard.
    write: u64,
    fua: u64,
    zeroes: u64,
    discard: u64,
    /// The largest request (bytes, a multiple of 4096, at most a slot).
    max_len: u64,
}

const SLOT: u64 = 64 << 10;

struct Setup {
    dir: PathBuf,
    img: PathBuf,
    /// The file before the recording began.
    initial: Vec<u8>,
    rt: Runtime,
    rec: Arc<RecordBdev>,
    q: Arc<Qcow2Bdev>,
    oracle: Oracle,
}

/// A qcow2 image of `vsize` bytes (`qemu-img create -o create_opts`), over a raw
/// backing file full of a pattern when `backing`, in a file of `file_size`
/// bytes, opened through a recorder.
fn setup(
    tag: &str,
    vsize: u64,
    create_opts: &str,
    backing: bool,
    file_size: u64,
    ropts: RecordOptions,
) -> Setup {
    setup_with(tag, vsize, create_opts, backing, file_size, ropts, &[])
}

/// [`setup`], with `qemu-io` commands run on the image before the recording
/// (data the guest's disk starts with).
fn setup_with(
    tag: &str,
    vsize: u64,
    create_opts: &str,
    backing: bool,
    file_size: u64,
    ropts: RecordOptions,
    prefill: &[&str],
) -> Setup {
    let dir = scratch(&format!("crash-{tag}"));
    let img = dir.join("img.qcow2");
    let mut guest_initial = vec![0u8; vsize as usize];
    let mut args = vec!["-o", create_opts];
    if backing {
        for (i, c) in guest_initial.chunks_mut(512).enumerate() {
            sector_pattern(u64::MAX - 1, i as u64, c);
        }
        std::fs::write(dir.join("base.raw"), &guest_initial).unwrap();
        args.extend_from_slice(&["-b", "base.raw", "-F", "raw"]);
    }
    qemu_img_create(&img, vsize, &args);
    if !prefill.is_empty() {
        let mut a = vec!["-f", "qcow2"];
        for c in prefill {
            a.extend_from_slice(&["-c", c]);
        }
        a.push(img.to_str().unwrap());
        run("qemu-io", &a);
        let raw = dir.join("prefill.raw");
        run(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                img.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        guest_initial = std::fs::read(&raw).unwrap();
    }
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(file_size).unwrap();
    drop(f);
    let initial = std::fs::read(&img).unwrap();
    let rt = runtime(1);
    let h = rt.handle();
    let file = UringBdev::open(
        &format!("crash-file-{tag}"),
        &img,
        UringOptions {
            direct: false,
            locking: bdev::lock::LockMode::Off,
            ..UringOptions::default()
        },
    )
    .expect("file bdev");
    let rec = RecordBdev::over(&format!("crash-rec-{tag}"), file, ropts).expect("recorder");
    let (r2, p2, name) = (rec.clone(), img.clone(), format!("crash-q-{tag}"));
    let q = h
        .spawn_on(0, move || async move {
            let opts = OpenOptions {
                filename: Some(p2),
                direct: false,
                locking: bdev::lock::LockMode::Off,
                backing: BackingSpec::FromHeader,
                ..OpenOptions::default()
            };
            Qcow2Bdev::open(&name, r2, opts).await
        })
        .block()
        .expect("join")
        .expect("open image");
    Setup {
        dir,
        img,
        initial,
        rt,
        rec,
        q,
        oracle: Oracle::new(guest_initial),
    }
}

fn qemu_img_create(img: &std::path::Path, vsize: u64, extra: &[&str]) {
    let size = vsize.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[img.to_str().unwrap(), size.as_str()]);
    // The backing file is named relative to the image's directory.
    let out = std::process::Command::new("qemu-img")
        .args(&args)
        .current_dir(img.parent().unwrap())
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One guest request; returns its status.
async fn guest_io(
    q: &Arc<dyn Bdev>,
    rec: &RecordBdev,
    o: &RefCell<Oracle>,
    t: IoType,
    off: u64,
    len: u64,
    fua: bool,
) -> IoStatus {
    let ch = channel(q).expect("channel");
    let seq = rec.seq_now();
    let (gen, buf) = match t {
        IoType::Write => {
            let g = o.borrow_mut().submit_write(off, len, seq);
            (
                g,
                Some(DmaBuf::from_slice(&Oracle::data(g, off, len)).unwrap()),
            )
        }
        _ => (o.borrow_mut().submit_zeroes(off, len, seq), None),
    };
    let mut io = BdevIo::new(t, off, len, buf, None);
    io.fua = fua;
    let st = submit_wait(&ch, io).await.status;
    if st.is_ok() {
        o.borrow_mut().acked(gen, fua, rec.seq_now());
    }
    st
}

async fn guest_flush(q: &Arc<dyn Bdev>, rec: &RecordBdev, o: &RefCell<Oracle>) -> IoStatus {
    let ch = channel(q).expect("channel");
    let t = o.borrow_mut().flush_submitted();
    let st = submit_wait(&ch, BdevIo::new(IoType::Flush, 0, 0, None, None))
        .await
        .status;
    if st.is_ok() {
        o.borrow_mut().flushed(t, rec.seq_now());
    }
    st
}

/// `rounds` rounds of up to 6 concurrent guest requests in distinct 64 KiB
/// slots of `[0, span)`, sometimes with a flush in flight beside them,
/// sometimes a flush after them. Returns how many requests failed with ENOSPC.
async fn guest_rounds(
    q: Arc<dyn Bdev>,
    rec: Arc<RecordBdev>,
    o: Rc<RefCell<Oracle>>,
    rounds: u64,
    seed: u64,
    mix: Mix,
    span: u64,
) -> u64 {
    let mut rng = Rng(seed | 1);
    let slots = span / SLOT;
    let total = mix.write + mix.fua + mix.zeroes + mix.discard;
    let mut enospc = 0;
    for _ in 0..rounds {
        let k = 1 + rng.below(6);
        let mut used = Vec::new();
        let mut reqs = Vec::new();
        for _ in 0..k {
            let s = rng.below(slots);
            if used.contains(&s) {
                continue;
            }
            used.push(s);
            let pick = rng.below(total);
            let (t, fua) = if pick < mix.write {
                (IoType::Write, false)
            } else if pick < mix.write + mix.fua {
                (IoType::Write, true)
            } else if pick < mix.write + mix.fua + mix.zeroes {
                (IoType::WriteZeroes, false)
            } else {
                (IoType::Unmap, false)
            };
            let blocks = mix.max_len / 4096;
            let len = 4096 * (1 + rng.below(blocks));
            let off = s * SLOT + 4096 * rng.below((SLOT - len) / 4096 + 1);
            reqs.push((t, off, len, fua));
        }
        let flush_beside = rng.below(3) == 0;
        let mut futs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = IoStatus>>>> =
            Vec::new();
        for (t, off, len, fua) in reqs {
            let (q, rec, o) = (q.clone(), rec.clone(), o.clone());
            futs.push(Box::pin(async move {
                guest_io(&q, &rec, &o, t, off, len, fua).await
            }));
        }
        if flush_beside {
            let (q, rec, o) = (q.clone(), rec.clone(), o.clone());
            futs.push(Box::pin(async move { guest_flush(&q, &rec, &o).await }));
        }
        for st in futures::future::join_all(futs).await {
            match st {
                IoStatus::Success => {}
                IoStatus::Enospc => enospc += 1,
                other => panic!("guest request failed: {other}"),
            }
        }
        if rng.below(2) == 0 {
            let st = guest_flush(&q, &rec, &o).await;
            assert!(st.is_ok() || st == IoStatus::Enospc, "flush: {st}");
        }
    }
    enospc
}

/// Runs `work` on the image's reactor with the oracle, then checks the
/// recording against the file and replays it. Returns the tally.
fn record_and_replay<F, Fut>(s: Setup, plan: &Plan, compare_every: u64, work: F) -> Run
where
    F: FnOnce(Arc<Qcow2Bdev>, Arc<RecordBdev>, Rc<RefCell<Oracle>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = (u64, Option<u64>)> + 'static,
{
    let h = s.rt.handle();
    let (q, rec) = (s.q.clone(), s.rec.clone());
    let oracle = s.oracle;
    let (oracle, enospc, result_after) = h
        .spawn_on(0, move || async move {
            let o = Rc::new(RefCell::new(oracle));
            let (enospc, result_after) = work(q, rec, o.clone()).await;
            let o = Rc::try_unwrap(o)
                .ok()
                .expect("oracle still shared")
                .into_inner();
            (o, enospc, result_after)
        })
        .block()
        .expect("join");
    let log = s.rec.log();
    // The recording is complete: every logged request landing in order gives
    // the file as it is.
    let end = replay::final_contents(&log, &s.initial, &s.dir.join("final.img")).unwrap();
    let now = std::fs::read(&s.img).unwrap();
    assert!(
        end == now,
        "replaying the whole log does not give the file (recorder lost a write)"
    );
    let mut tally = Tally::default();
    let mut shown = 0;
    let x = Expect {
        oracle: &oracle,
        result_after,
        oracle_before_result: true,
        compare_every,
    };
    let out = replay::replay(&log, &s.initial, &s.dir.join("state.qcow2"), plan, |st| {
        tally.states += 1;
        let r = check_state(&h, st, &x);
        match &r {
            Ok(true) => tally.compared += 1,
            Ok(false) => {}
            Err(f) => {
                tally.count(f);
                // SLUICE_CRASH_KEEP=DIR keeps the failing states for a look.
                if let Some(k) = std::env::var_os("SLUICE_CRASH_KEEP") {
                    let to = PathBuf::from(k).join(format!("state-{}.qcow2", st.index));
                    let _ = std::fs::copy(&st.path, to);
                }
                if shown < 3 {
                    shown += 1;
                    eprintln!("state {st:?}: {f}");
                }
            }
        }
        r.map(|_| ())
    })
    .unwrap();
    assert_eq!(out.states, tally.states);
    let _ = std::fs::remove_dir_all(&s.dir);
    Run {
        tally,
        enospc,
        refcount_table_clusters: u32::from_be_bytes(now[56..60].try_into().unwrap()),
    }
}

/// What a recorded run gave.
struct Run {
    tally: Tally,
    /// Guest requests that failed with ENOSPC.
    enospc: u64,
    /// The final image's refcount table size (header), in clusters.
    refcount_table_clusters: u32,
}

fn plan(seed: u64) -> Plan {
    Plan {
        max_prefixes: 4,
        random: 2,
        torn: true,
        seed,
        lose_point: None,
    }
}

fn report(what: &str, t: &Tally, min_states: u64) {
    println!("crash states [{what}]: {t}");
    assert!(t.clean(), "{what}: {t}");
    assert!(
        t.states >= min_states,
        "{what}: only {} states (want {min_states})",
        t.states
    );
}

/// What a workload returns: guest requests that failed with ENOSPC, and
/// the seq from which a job's result is due.
type WorkFuture = std::pin::Pin<Box<dyn std::future::Future<Output = (u64, Option<u64>)>>>;

fn rounds_work(
    rounds: u64,
    seed: u64,
    mix: Mix,
    span: u64,
) -> impl FnOnce(Arc<Qcow2Bdev>, Arc<RecordBdev>, Rc<RefCell<Oracle>>) -> WorkFuture + Send + 'static
{
    move |q, rec, o| {
        Box::pin(async move {
            let b: Arc<dyn Bdev> = q;
            let n = guest_rounds(b.clone(), rec.clone(), o.clone(), rounds, seed, mix, span).await;
            guest_flush(&b, &rec, &o).await;
            (n, None)
        })
    }
}

const MIXED: Mix = Mix {
    write: 6,
    fua: 1,
    zeroes: 1,
    discard: 1,
    max_len: 16 << 10,
};

/// Allocating writes into empty space, overwrites, discards, write-zeroes
/// and FUA writes on an image with 64 KiB clusters, no backing file.
#[test]
fn crash_states_allocate_overwrite_discard() {
    let s = setup(
        "alloc",
        2 << 20,
        "cluster_size=65536",
        false,
        8 << 20,
        RecordOptions::default(),
    );
    let work = rounds_work(soak(40), 11, MIXED, 2 << 20);
    let t = record_and_replay(s, &plan(1), 10, work).tally;
    report("allocate, overwrite, discard, zeroes, FUA", &t, 100);
}

/// The same over a backing file: copy-on-write of partial clusters from the
/// backing, discards that must hide it (zero clusters).
#[test]
fn crash_states_over_backing_file() {
    let s = setup(
        "backing",
        2 << 20,
        "cluster_size=65536",
        true,
        8 << 20,
        RecordOptions::default(),
    );
    let work = rounds_work(soak(40), 12, MIXED, 2 << 20);
    let t = record_and_replay(s, &plan(2), 10, work).tally;
    report("writes over a backing file", &t, 100);
}

/// 512-byte clusters: every few writes allocate an L2 table, and the
/// refcount blocks (256 clusters each) and the refcount table grow.
#[test]
fn crash_states_l2_and_refcount_growth() {
    let mix = Mix {
        write: 8,
        fua: 1,
        zeroes: 1,
        discard: 1,
        max_len: 8 << 10,
    };
    let s = setup(
        "growth",
        2 << 20,
        "cluster_size=512",
        false,
        8 << 20,
        RecordOptions::default(),
    );
    let work = rounds_work(soak(20), 13, mix, 2 << 20);
    let t = record_and_replay(s, &plan(3), 10, work).tally;
    report("L2 and refcount growth (512-byte clusters)", &t, 100);
}

/// 512-byte clusters with 64-bit refcounts: a refcount block covers 64
/// clusters and the first refcount table 2 MiB of file, so the table itself
/// is replaced by a larger one (new table, flush, header) mid-run.
#[test]
fn crash_states_refcount_table_growth() {
    let mix = Mix {
        write: 8,
        fua: 1,
        zeroes: 0,
        discard: 1,
        max_len: 64 << 10,
    };
    // 1.75 MiB of data already there: the guest's writes take the file
    // past the 2 MiB the first table covers.
    let s = setup_with(
        "reftable",
        4 << 20,
        "cluster_size=512,refcount_bits=64",
        false,
        16 << 20,
        RecordOptions::default(),
        &["write -P 0x5a 2M 1792k"],
    );
    let work = rounds_work(soak(16), 19, mix, 2 << 20);
    let r = record_and_replay(s, &plan(7), 10, work);
    assert!(
        r.refcount_table_clusters > 1,
        "the refcount table never grew ({} cluster)",
        r.refcount_table_clusters
    );
    report("refcount table growth (64-bit refcounts)", &r.tally, 100);
}

/// A file too small for what the guest writes: allocations start failing
/// with ENOSPC in the middle; overwrites of what is allocated go on.
#[test]
fn crash_states_enospc_in_the_middle() {
    let mix = Mix {
        write: 1,
        fua: 0,
        zeroes: 0,
        discard: 0,
        max_len: 64 << 10,
    };
    // Header, tables and 12 data clusters fit; the guest writes 64.
    let s = setup(
        "enospc",
        4 << 20,
        "cluster_size=65536",
        false,
        1 << 20,
        RecordOptions::default(),
    );
    let work = rounds_work(soak(30), 14, mix, 4 << 20);
    let r = record_and_replay(s, &plan(4), 10, work);
    println!("enospc: {} guest requests failed with ENOSPC", r.enospc);
    assert!(r.enospc > 0, "the file never filled up");
    let t = r.tally;
    report("ENOSPC in the middle", &t, 50);
}

/// A stream as the stream job runs it over the image (every cluster the
/// image lacks copied from the backing file with `populate_range_*`, then
/// the backing file dropped from the header with `durable`), with guest
/// writes beside it; its completion is reported at a mark. Returns the
/// tally.
fn stream_run(tag: &str, durable: bool, seed: u64, rounds: u64) -> Tally {
    let vsize = 2u64 << 20;
    let s = setup(
        tag,
        vsize,
        "cluster_size=65536",
        true,
        8 << 20,
        RecordOptions::default(),
    );
    let work = move |q: Arc<Qcow2Bdev>, rec: Arc<RecordBdev>, o: Rc<RefCell<Oracle>>| async move {
        let b: Arc<dyn Bdev> = q.clone();
        // Guest writes before and while the copy runs.
        let guest = guest_rounds(
            b.clone(),
            rec.clone(),
            o.clone(),
            rounds,
            seed,
            MIXED,
            vsize,
        );
        let copy = async {
            let ch = channel(&b).expect("channel");
            let backing = q.backing().expect("backing");
            let bch = channel(&backing).expect("backing channel");
            let chunk = 256u64 << 10;
            let mut off = 0;
            while off < vsize {
                let data = bdev::read_at(&bch, off, chunk as usize)
                    .await
                    .expect("read");
                q.populate_range_if_unallocated(off, data, true)
                    .await
                    .expect("populate");
                off += chunk;
            }
            drop(ch);
        };
        let (n, ()) = futures::future::join(guest, copy).await;
        q.set_backing_file_with(None, None, durable)
            .await
            .expect("header");
        q.set_backing_bdev(None).await.expect("unlink");
        let done = rec.mark("stream complete");
        // From here the guest's acknowledged writes are owed too (the stream
        // made everything durable before its header change).
        if durable {
            o.borrow_mut().all_durable(done);
        }
        (n, Some(done))
    };
    record_and_replay(s, &plan(seed), 10, work).tally
}

/// A stream to completion (durable, the default): once reported, the
/// image holds all the data and names no backing file in every state.
#[test]
fn crash_states_stream_to_completion() {
    let t = stream_run("stream", true, 15, soak(20));
    report("stream to completion", &t, 100);
}

/// Header changes under guest writes: the backing name alternates between
/// a short one and a long one naming the same file (past the first sector
/// of the header cluster), each change durable. Torn at every sector (the
/// replayer tears the header too), every state names one of the two whole:
/// a header written in one piece (as QEMU does) leaves states whose first
/// sector and backing name disagree (a name of NUL bytes, or a prefix of
/// the long one), which open nowhere.
#[test]
fn crash_states_header_changes_torn() {
    let vsize = 1u64 << 20;
    let s = setup(
        "header",
        vsize,
        "cluster_size=65536",
        true,
        8 << 20,
        RecordOptions::default(),
    );
    let changes = soak(12);
    let work = move |q: Arc<Qcow2Bdev>, rec: Arc<RecordBdev>, o: Rc<RefCell<Oracle>>| async move {
        let b: Arc<dyn Bdev> = q.clone();
        let long = format!("{}base.raw", "./".repeat(120));
        let mut n = 0;
        for i in 0..changes {
            n += guest_rounds(b.clone(), rec.clone(), o.clone(), 2, 40 + i, MIXED, vsize).await;
            let name = if i % 2 == 0 {
                long.as_str()
            } else {
                "base.raw"
            };
            q.set_backing_file_with(Some(name), Some("raw"), true)
                .await
                .expect("header change");
        }
        guest_flush(&b, &rec, &o).await;
        (n, None)
    };
    let p = Plan {
        random: 12,
        ..plan(21)
    };
    let t = record_and_replay(s, &p, 10, work).tally;
    report("header changes, torn", &t, 150);
}

/// The checker can fail (1): a stream whose header change skips its flush
/// (`durable: false`, fine for a killed process, not for a power loss) is
/// caught: states after the reported completion still name the backing
/// file or lack its data.
#[test]
fn crash_checker_catches_stream_without_flush() {
    let t = stream_run("stream-nodurable", false, 16, 4);
    println!("crash states [stream without its final flush]: {t}");
    assert!(t.job > 0, "a non-durable stream passed: {t}");
}

/// The checker can fail (2): a device that ignores flushes loses writes
/// the guest was told were durable.
#[test]
fn crash_checker_catches_device_ignoring_flushes() {
    let s = setup(
        "liar",
        2 << 20,
        "cluster_size=65536",
        false,
        8 << 20,
        RecordOptions {
            lie_about_flushes: true,
            ..RecordOptions::default()
        },
    );
    let work = rounds_work(10, 17, MIXED, 2 << 20);
    let t = record_and_replay(s, &plan(5), 0, work).tally;
    println!("crash states [device ignoring flushes]: {t}");
    assert!(t.lost + t.corruptions > 0, "lying device passed: {t}");
}

/// The checker can fail (3): a replay that loses what one flush made
/// durable is caught.
#[test]
fn crash_checker_catches_replay_dropping_flushed_writes() {
    let s = setup(
        "drop",
        2 << 20,
        "cluster_size=65536",
        false,
        8 << 20,
        RecordOptions::default(),
    );
    let work = rounds_work(10, 18, MIXED, 2 << 20);
    let mut p = plan(6);
    p.lose_point = Some(3);
    let t = record_and_replay(s, &p, 0, work).tally;
    println!("crash states [replay dropping a flush's writes]: {t}");
    assert!(t.lost + t.corruptions > 0, "lossy replay passed: {t}");
}

#[test]
fn qemu_img_is_there() {
    // The checker needs it; a missing tool fails rather than skips.
    run("qemu-img", &["--version"]);
}

/// The recorder itself: requests from two reactors at once (writes, FUA
/// writes, write-zeroes, discards, flushes) over a malloc bdev, the log
/// streamed to a file. The file parses, numbers every event once, completes
/// every request, and replaying all of it gives the base's contents.
#[test]
fn recorder_logs_every_request_from_two_reactors() {
    use bdev::malloc::MallocBdev;
    let rt = runtime(2);
    let h = rt.handle();
    let dir = scratch("crash-recorder");
    let path = dir.join("rec.log");
    let m: Arc<dyn Bdev> = MallocBdev::new("crash-rec-m", 2048, 512, None).unwrap();
    let rec = RecordBdev::over(
        "crash-rec-r",
        m.clone(),
        RecordOptions {
            log_path: Some(path.clone()),
            ..RecordOptions::default()
        },
    )
    .unwrap();
    let joins: Vec<_> = (0..2usize)
        .map(|r| {
            let b: Arc<dyn Bdev> = rec.clone();
            h.spawn_on(r, move || async move {
                let ch = channel(&b).unwrap();
                let mut rng = Rng(0x1234 + r as u64);
                let mut futs = Vec::new();
                for i in 0..200u64 {
                    // Each reactor in its own half: no overlap in flight.
                    let off = (r as u64 * 512 + rng.below(500)) * 1024;
                    let t = match i % 7 {
                        5 => IoType::WriteZeroes,
                        6 => IoType::Unmap,
                        _ => IoType::Write,
                    };
                    let buf = (t == IoType::Write).then(|| {
                        DmaBuf::from_slice(&[(i as u8) ^ (r as u8 * 0x80); 1024]).unwrap()
                    });
                    let mut io = BdevIo::new(t, off, 1024, buf, None);
                    io.fua = i % 11 == 0;
                    futs.push(submit_wait(&ch, io));
                    if i % 16 == 15 {
                        for io in futures::future::join_all(std::mem::take(&mut futs)).await {
                            assert!(io.status.is_ok());
                        }
                        let f = BdevIo::new(IoType::Flush, 0, 0, None, None);
                        assert!(submit_wait(&ch, f).await.status.is_ok());
                    }
                }
                for io in futures::future::join_all(futs).await {
                    assert!(io.status.is_ok());
                }
            })
        })
        .collect();
    for j in joins {
        j.block().expect("join");
    }
    rec.sync_log().unwrap();
    let log = bdev::record::Log::read(&path).expect("log parses");
    let ops = replay::ops(&log);
    assert_eq!(ops.len(), 2 * (200 + 12), "{} requests logged", ops.len());
    assert!(ops.iter().all(|o| o.cmp.is_some() && o.errno == 0));
    for (i, e) in log.events.iter().enumerate() {
        assert_eq!(e.seq(), i as u64 + 1);
    }
    let end = replay::final_contents(&log, &[], &dir.join("final.img")).unwrap();
    let m2 = m.clone();
    let now = h
        .spawn_on(0, move || async move {
            let ch = channel(&m2).unwrap();
            bdev::read_at(&ch, 0, 1 << 20)
                .await
                .unwrap()
                .as_slice()
                .to_vec()
        })
        .block()
        .unwrap();
    assert!(end == now, "replaying the log does not give the base");
    let pts = replay::points(&ops);
    assert!(pts.len() > 20, "{} durability points", pts.len());
    let _ = std::fs::remove_dir_all(&dir);
}
