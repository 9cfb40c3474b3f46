//! Random writes, zero writes and discards through sluice, concurrently from two
//! reactors, checked against an in-memory model, then by `qemu-img check` and
//! `qemu-img compare`.

mod qcow2_common;

use bdev::qcow2::{create_file, BackingSpec, CreateOptions, OpenOptions};
use bdev::{channel, simple_io, submit_wait, Bdev, BdevIo, DmaBuf, IoType};
use qcow2_common::*;
use reactor::RuntimeHandle;
use std::path::Path;
use std::sync::Arc;

/// This test process's registry (the graph hands one down in the service).
fn registry() -> &'static std::sync::Arc<bdev::Registry> {
    static R: std::sync::OnceLock<std::sync::Arc<bdev::Registry>> = std::sync::OnceLock::new();
    R.get_or_init(bdev::Registry::new)
}

#[derive(Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Discard(u64, u64),
}

/// Runs a batch of ops concurrently on reactor `r`.
fn run_batch(
    h: &RuntimeHandle,
    r: usize,
    b: &Arc<dyn Bdev>,
    ops: Vec<Op>,
) -> std::thread::JoinHandle<()> {
    let (h, b) = (h.clone(), b.clone());
    std::thread::spawn(move || {
        h.spawn_on(r, move || async move {
            let ch = channel(&b).expect("channel");
            let futs = ops.into_iter().map(|op| {
                let ch = ch.clone();
                async move {
                    let io = match op {
                        Op::Write(off, d) => {
                            BdevIo::write(off, DmaBuf::from_slice(&d).unwrap(), None)
                        }
                        Op::Zero(off, n) => BdevIo::new(IoType::WriteZeroes, off, n, None, None),
                        Op::Discard(off, n) => BdevIo::new(IoType::Unmap, off, n, None, None),
                    };
                    let (t, off) = (io.io_type, io.offset);
                    let st = submit_wait(&ch, io).await.status;
                    assert!(st.is_ok(), "{t:?} at {off}: {st}");
                }
            });
            futures::future::join_all(futs).await;
        })
        .block()
        .expect("join");
    })
}

fn flush(h: &RuntimeHandle, b: &Arc<dyn Bdev>) {
    let b = b.clone();
    let st = h
        .spawn_on(0, move || async move {
            simple_io(&channel(&b).unwrap(), IoType::Flush, 0, 0).await
        })
        .block()
        .unwrap();
    assert!(st.is_ok(), "flush: {st}");
}

fn apply(model: &mut [u8], op: &Op) {
    match op {
        Op::Write(off, d) => model[*off as usize..*off as usize + d.len()].copy_from_slice(d),
        Op::Zero(off, n) | Op::Discard(off, n) => {
            model[*off as usize..(*off + *n) as usize].fill(0)
        }
    }
}

/// Random ops in disjoint ranges (several may share a cluster).
fn random_batch(rng: &mut Rng, size: u64, cs: u64, count: usize) -> Vec<Op> {
    let mut taken: Vec<(u64, u64)> = Vec::new();
    let mut ops = Vec::new();
    let mut tries = 0;
    while ops.len() < count && tries < count * 20 {
        tries += 1;
        let kind = rng.below(10);
        let max_len = if rng.below(4) == 0 {
            3 * cs
        } else {
            cs.min(16 << 10)
        };
        let len = ((rng.below(max_len / 512) + 1) * 512).min(size);
        let mut off = rng.below((size - len) / 512 + 1) * 512;
        if rng.below(3) == 0 {
            off = off / cs * cs; // cluster-aligned: whole-cluster paths
        }
        let len = if kind >= 7 && rng.below(2) == 0 {
            cs.min(size - off).max(512) / 512 * 512
        } else {
            len.min(size - off)
        };
        if taken.iter().any(|&(a, l)| off < a + l && a < off + len) {
            continue;
        }
        taken.push((off, len));
        let op = match kind {
            0..=6 => {
                let seed = rng.next() as u8 | 1;
                Op::Write(
                    off,
                    (0..len)
                        .map(|i| seed.wrapping_add((i / 512) as u8))
                        .collect(),
                )
            }
            7 | 8 => Op::Zero(off, len),
            _ => Op::Discard(off, len),
        };
        ops.push(op);
    }
    ops
}

fn exercise(
    tag: &str,
    img: &Path,
    size: u64,
    cs: u64,
    backing: Option<Vec<u8>>,
    seed: u64,
    rounds: usize,
) {
    let rt = runtime(2);
    let h = rt.handle();
    let q = open(&h, tag, img, opts()).expect("open");
    let b: Arc<dyn Bdev> = q.clone();
    let mut model = backing.unwrap_or_else(|| vec![0u8; size as usize]);
    model.resize(size as usize, 0);
    let mut rng = Rng(seed);
    for round in 0..rounds {
        let ops = random_batch(&mut rng, size, cs, 24);
        for op in &ops {
            apply(&mut model, op);
        }
        let (a, c): (Vec<Op>, Vec<Op>) = ops
            .into_iter()
            .enumerate()
            .partition(|(i, _)| i % 2 == 0)
            .into_iter_pair();
        let t0 = run_batch(&h, 0, &b, a);
        let t1 = run_batch(&h, 1, &b, c);
        t0.join().expect("batch 0");
        t1.join().expect("batch 1");
        if round % 4 == 3 {
            flush(&h, &b);
        }
        if round % 8 == 7 || round == rounds - 1 {
            let got = read_all(&h, round % 2, &b, 256 << 10);
            if let Some(i) = (0..model.len()).find(|&i| got[i] != model[i]) {
                panic!(
                    "{tag}: round {round}: byte {i} is {:#x}, model {:#x}",
                    got[i], model[i]
                );
            }
        }
    }
    close(&h, &q);
    drop(b);
    drop(q);
    drop(rt);
    let (code, out) = qemu_check(img);
    assert_eq!(code, 0, "{tag}: qemu-img check: {out}");
    assert!(out.contains("No errors were found"), "{tag}: {out}");
    assert!(!out.contains("leaked"), "{tag}: {out}");
    let want = img.with_extension("model.raw");
    std::fs::write(&want, &model).unwrap();
    let (code, out) = run_status(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            want.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{tag}: qemu-img compare: {out}");
}

trait Pair {
    fn into_iter_pair(self) -> (Vec<Op>, Vec<Op>);
}
impl Pair for (Vec<(usize, Op)>, Vec<(usize, Op)>) {
    fn into_iter_pair(self) -> (Vec<Op>, Vec<Op>) {
        (
            self.0.into_iter().map(|x| x.1).collect(),
            self.1.into_iter().map(|x| x.1).collect(),
        )
    }
}

fn sluice_create(path: &Path, co: CreateOptions) {
    let rt = runtime(1);
    let p = path.to_path_buf();
    rt.handle()
        .spawn_on(0, move || async move { create_file(&p, &co).await })
        .block()
        .unwrap()
        .expect("create");
}

#[test]
fn sluice_created_images_match_qemu() {
    for (cs, version, rbits) in [
        (65536u64, 3u32, 16u32),
        (512, 3, 16),
        (4096, 2, 16),
        (4096, 3, 1),
        (16384, 3, 64),
        (2 << 20, 3, 16),
    ] {
        let tag = format!("w{cs}v{version}r{rbits}");
        let d = scratch(&tag);
        let img = d.join("w.qcow2");
        let size = if cs >= 1 << 20 { 24 << 20 } else { 6 << 20 };
        sluice_create(
            &img,
            CreateOptions {
                size,
                cluster_size: cs,
                version,
                refcount_bits: rbits,
                ..CreateOptions::default()
            },
        );
        let (code, out) = qemu_check(&img);
        assert_eq!(code, 0, "{tag}: fresh image: {out}");
        let info = run(
            "qemu-img",
            &["info", "--output=json", img.to_str().unwrap()],
        );
        assert!(info.contains(&format!("\"cluster-size\": {cs}")), "{info}");
        exercise(
            &tag,
            &img,
            size,
            cs,
            None,
            0x9e37_79b9 ^ cs,
            soak(16) as usize,
        );
    }
}

#[test]
fn qemu_created_image_with_backing_chain() {
    let d = scratch("wback");
    let base = d.join("base.qcow2");
    qemu_img_create(&base, "5M", &[]);
    qemu_io(&base, &["write -P 0x77 0 5M"]);
    let top = d.join("top.qcow2");
    qemu_img_create(
        &top,
        "6M",
        &["-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2"],
    );
    qemu_io(&top, &["write -P 0x12 64k 8k", "write -z 1m 4k"]);
    let backing = qemu_contents(&top);
    exercise(
        "wback",
        &top,
        6 << 20,
        4096,
        Some(backing),
        7,
        soak(16) as usize,
    );
}

#[test]
fn v2_image_with_backing_zeroes_by_data() {
    let d = scratch("wv2b");
    let base = d.join("base.raw");
    std::fs::write(&base, vec![0xabu8; 2 << 20]).unwrap();
    let top = d.join("top.qcow2");
    qemu_img_create(
        &top,
        "2M",
        &[
            "-o",
            "compat=0.10,cluster_size=4096",
            "-b",
            "base.raw",
            "-F",
            "raw",
        ],
    );
    exercise(
        "wv2b",
        &top,
        2 << 20,
        4096,
        Some(vec![0xabu8; 2 << 20]),
        11,
        8,
    );
}

#[test]
fn refcount_table_grows() {
    // 512-byte clusters, 16-bit refcounts: one refcount table cluster covers 64 blocks
    // of 256 clusters = 8 MiB; writing 12 MiB forces growth.
    let d = scratch("grow");
    let img = d.join("g.qcow2");
    let size = 16u64 << 20;
    sluice_create(
        &img,
        CreateOptions {
            size,
            cluster_size: 512,
            ..CreateOptions::default()
        },
    );
    let rt = runtime(1);
    let h = rt.handle();
    let q = open(&h, "grow", &img, opts()).expect("open");
    let b: Arc<dyn Bdev> = q.clone();
    let data: Vec<u8> = (0..(12u64 << 20))
        .map(|i| (i / 4096) as u8 ^ 0x5a)
        .collect();
    for (k, chunk) in data.chunks(1 << 20).enumerate() {
        write(&h, 0, &b, (k as u64) << 20, chunk.to_vec());
    }
    let got = read_all(&h, 0, &b, 1 << 20);
    assert!(got[..data.len()] == data[..], "contents after growth");
    close(&h, &q);
    drop((b, q, rt));
    let (code, out) = qemu_check(&img);
    assert_eq!(code, 0, "{out}");
    let mut model = data;
    model.resize(size as usize, 0);
    let want = img.with_extension("raw");
    std::fs::write(&want, &model).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            want.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
}

#[test]
fn bound_backing_bdev_and_streaming_helpers() {
    let d = scratch("stream");
    let base = d.join("base.raw");
    std::fs::write(&base, vec![0x42u8; 1 << 20]).unwrap();
    let top = d.join("top.qcow2");
    qemu_img_create(&top, "2M", &["-b", "base.raw", "-F", "raw"]);
    qemu_io(&top, &["write -P 0x01 0 64k", "write -z 128k 64k"]);
    let rt = runtime(2);
    let h = rt.handle();
    let q = open(&h, "s", &top, opts()).expect("open");
    let q2 = q.clone();
    let res = h
        .spawn_on(1, move || async move {
            let backing = q2.backing().unwrap();
            let s0 = q2.block_status(0, 1 << 20, None).await.unwrap();
            let s1 = q2.block_status(64 << 10, 1 << 20, None).await.unwrap();
            let s1b = q2
                .block_status(64 << 10, 1 << 20, Some(&backing))
                .await
                .unwrap();
            let s2 = q2.block_status(128 << 10, 1 << 20, None).await.unwrap();
            let s3 = q2.block_status(1 << 20, 1 << 20, None).await.unwrap();
            let mut cl = DmaBuf::new(65536).unwrap();
            cl.as_mut_slice().fill(0x99);
            let p_alloc = q2
                .populate_if_unallocated(0, DmaBuf::from_slice(cl.as_slice()).unwrap())
                .await
                .unwrap();
            let p_free = q2.populate_if_unallocated(256 << 10, cl).await.unwrap();
            (s0, s1, s1b, s2, s3, p_alloc, p_free)
        })
        .block()
        .unwrap();
    let (s0, s1, s1b, s2, s3, p_alloc, p_free) = res;
    assert!(
        s0.allocated_here && s0.allocated_above_base && !s0.zero && s0.len == 64 << 10,
        "{s0:?}"
    );
    assert!(
        !s1.allocated_here && s1.allocated_above_base && !s1.zero && s1.len == 64 << 10,
        "{s1:?}"
    );
    assert!(!s1b.allocated_here && !s1b.allocated_above_base, "{s1b:?}");
    assert!(s2.allocated_here && s2.zero && s2.len == 64 << 10, "{s2:?}");
    assert!(
        !s3.allocated_here && !s3.allocated_above_base && s3.zero && s3.len == 1 << 20,
        "past the backing's end: {s3:?}"
    );
    assert!(!p_alloc, "populate must not overwrite allocated data");
    assert!(p_free, "populate of an unallocated cluster");
    let q3 = q.clone();
    h.spawn_on(0, move || async move {
        q3.set_backing_file(None, None).await.unwrap();
        q3.set_backing_bdev(None).await.unwrap();
    })
    .block()
    .unwrap();
    close(&h, &q);
    let b: Arc<dyn Bdev> = q.clone();
    let got = read_all(&h, 0, &b, 1 << 20);
    assert!(got[..65536].iter().all(|&x| x == 1));
    assert!(got[256 << 10..320 << 10].iter().all(|&x| x == 0x99));
    assert!(
        got[320 << 10..].iter().all(|&x| x == 0),
        "no backing any more: zeroes"
    );
    drop((b, q, rt));
    let (code, out) = qemu_check(&top);
    assert_eq!(code, 0, "{out}");
    let info = run("qemu-img", &["info", top.to_str().unwrap()]);
    assert!(!info.contains("backing file"), "{info}");
    // A bound backing bdev (by name) instead of the header's file.
    let rt = runtime(1);
    let h = rt.handle();
    let top2 = d.join("top2.qcow2");
    qemu_img_create(&top2, "1M", &["-u", "-b", "nonexistent.raw", "-F", "raw"]);
    let leaf = bdev::malloc::MallocBdev::new("stream-base", 2048, 512, None).unwrap();
    registry().register(leaf.clone()).unwrap();
    let lb: Arc<dyn Bdev> = leaf;
    write(&h, 0, &lb, 0, vec![0x31; 1 << 20]);
    let q = open(
        &h,
        "s2",
        &top2,
        OpenOptions {
            backing: BackingSpec::Named("stream-base".into()),
            nodes: Some(registry().clone()),
            ..opts()
        },
    )
    .expect("open bound");
    assert_eq!(registry().claims("stream-base"), vec!["s2".to_string()]);
    let b: Arc<dyn Bdev> = q.clone();
    assert!(read_all(&h, 0, &b, 1 << 20).iter().all(|&x| x == 0x31));
    bdev::release_channels(&b, &h);
    drop((b, q));
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(registry().claims("stream-base").is_empty());
}
