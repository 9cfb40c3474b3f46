//! A corruption campaign: seeded, damaged variants of a small qcow2 image made
//! by qemu-img / qemu-io (bad header fields and bit flips, L1 and L2 entries
//! pointing at metadata, at each other, outside the file, refcount table and
//! block damage, truncations at many lengths), each opened writable through
//! the real file path ([`bdev::qcow2::open_file`]), written at several
//! offsets, read back, closed, and judged by `qemu-img check` and `qemu-io`.
//!
//! The rules: every acknowledged write reads back exactly (through sluice, and
//! through qemu-io after the close wherever QEMU opens the image); no image
//! has more `qemu-img check` errors after than before (leaks allowed); an open
//! that is refused leaves the file exactly as it was. `SLUICE_SOAK=1` runs 20
//! times the random variants.

mod qcow2_common;

use bdev::qcow2::Qcow2Bdev;
use bdev::{channel, read_at, write_at, Bdev, DmaBuf};
use qcow2_common::*;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

const CS: u64 = 4096;
const VSIZE: u64 = 4 << 20;

/// The writes made to every variant: disjoint (offset, length) ranges over
/// data, partial clusters, a zero cluster, unallocated space, the compressed
/// cluster, the second L2 table and the last cluster.
const WRITES: &[(u64, u64)] = &[
    (0, 4096),
    (4096 + 512, 1024),
    (64 << 10, 4096),
    ((1 << 20) + 4096, 8192),
    (2 << 20, 4096),
    (2560 << 10, 4096),
    (3 << 20, 4096),
    (VSIZE - 4096, 4096),
];

/// Where the template's structures are.
struct Layout {
    bytes: Vec<u8>,
    l1: u64,
    l1_entries: usize,
    reftable: u64,
    refblocks: Vec<u64>,
    l2: Vec<u64>,
    /// Host offsets of L2 entries that map something (entry position, entry).
    l2_used: Vec<(u64, u64)>,
    /// Host offsets of L2 entries that map nothing.
    l2_free: Vec<u64>,
    data: Vec<u64>,
}

fn be64(b: &[u8], p: u64) -> u64 {
    u64::from_be_bytes(b[p as usize..p as usize + 8].try_into().unwrap())
}

fn template(dir: &Path) -> Layout {
    let p = dir.join("t.qcow2");
    qemu_img_create(&p, "4M", &["-o", "cluster_size=4096"]);
    qemu_io(
        &p,
        &[
            "write -P 0x21 0 40k",
            "write -z 64k 8k",
            "write -P 0x22 1m 12k",
            "write -c -P 0x24 2560k 4k",
            "write -P 0x23 3m 8k",
        ],
    );
    let bytes = std::fs::read(&p).unwrap();
    let l1 = be64(&bytes, 40);
    let l1_entries = u32::from_be_bytes(bytes[36..40].try_into().unwrap()) as usize;
    let reftable = be64(&bytes, 48);
    let refblocks: Vec<u64> = (0..CS / 8)
        .map(|i| be64(&bytes, reftable + i * 8))
        .filter(|&e| e != 0)
        .collect();
    let mut l2 = Vec::new();
    let mut l2_used = Vec::new();
    let mut l2_free = Vec::new();
    let mut data = Vec::new();
    for i in 0..l1_entries as u64 {
        let t = be64(&bytes, l1 + i * 8) & 0x00ff_ffff_ffff_fe00;
        if t == 0 {
            continue;
        }
        l2.push(t);
        for j in 0..CS / 8 {
            let pos = t + j * 8;
            let e = be64(&bytes, pos);
            if e == 0 {
                l2_free.push(pos);
            } else {
                l2_used.push((pos, e));
                if e & (1 << 62) == 0 && e & 1 == 0 {
                    data.push(e & 0x00ff_ffff_ffff_fe00);
                }
            }
        }
    }
    assert!(l2.len() == 2 && !data.is_empty() && !refblocks.is_empty());
    Layout {
        bytes,
        l1,
        l1_entries,
        reftable,
        refblocks,
        l2,
        l2_used,
        l2_free,
        data,
    }
}

/// One damaged image: a name and its bytes.
struct Variant {
    name: String,
    bytes: Vec<u8>,
}

fn put(b: &mut Vec<u8>, pos: u64, v: &[u8]) {
    let end = pos as usize + v.len();
    if b.len() < end {
        b.resize(end, 0);
    }
    b[pos as usize..end].copy_from_slice(v);
}

/// Every variant of the campaign, in a fixed order from a fixed seed.
fn variants(t: &Layout, random_scale: u64) -> Vec<Variant> {
    let mut out = Vec::new();
    let mut add = |name: String, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = t.bytes.clone();
        f(&mut b);
        out.push(Variant { name, bytes: b });
    };
    let len = t.bytes.len() as u64;
    let last_data = *t.data.iter().max().unwrap();
    // Interesting host offsets: every structure, the end, past it, misaligned.
    let mut targets: Vec<(String, u64)> = vec![
        ("header".into(), 0),
        ("l1".into(), t.l1),
        ("reftable".into(), t.reftable),
        ("end".into(), len.next_multiple_of(CS)),
        ("past-end".into(), len.next_multiple_of(CS) + 64 * CS),
        ("far".into(), 1 << 40),
        ("unaligned".into(), t.data[0] + 512),
        ("last-data".into(), last_data),
    ];
    for (i, &r) in t.refblocks.iter().enumerate() {
        targets.push((format!("refblock{i}"), r));
    }
    for (i, &l) in t.l2.iter().enumerate() {
        targets.push((format!("l2-{i}"), l));
    }
    for (i, &d) in t.data.iter().enumerate().step_by(3) {
        targets.push((format!("data{i}"), d));
    }

    // Header fields: (offset, width, values).
    let fields: &[(&str, u64, usize, &[u64])] = &[
        ("version", 4, 4, &[0, 1, 2, 4, 0xffff_ffff]),
        (
            "backing_off",
            8,
            8,
            &[1, 0x10, 100, 4000, 4095, 4096, 1 << 40],
        ),
        ("backing_len", 16, 4, &[1, 8, 1023, 1024, 5000, 0xffff_ffff]),
        ("cluster_bits", 20, 4, &[0, 8, 9, 13, 16, 21, 22, 63]),
        (
            "size",
            24,
            8,
            &[0, 1, 512, VSIZE - 1, VSIZE + 1, 8 << 20, 1 << 50, u64::MAX],
        ),
        ("l1_size", 36, 4, &[0, 1, 3, 512, 1 << 22, 0xffff_ffff]),
        ("nb_snapshots", 60, 4, &[1, 2, 0xffff_ffff]),
        ("snapshots_off", 64, 8, &[0, 1, 4096, 1 << 40]),
        (
            "incompatible",
            72,
            8,
            &[1, 2, 4, 8, 16, 32, 1 << 63, u64::MAX],
        ),
        ("compatible", 80, 8, &[1, u64::MAX]),
        ("autoclear", 88, 8, &[1, 2, u64::MAX]),
        ("refcount_order", 96, 4, &[0, 1, 3, 5, 6, 7, 0xffff_ffff]),
        ("header_length", 100, 4, &[0, 72, 103, 105, 112, 4096, 4097]),
        ("refcount_clusters", 56, 4, &[0, 2, 3, 1 << 20]),
    ];
    for (name, off, w, vals) in fields {
        for &v in *vals {
            add(format!("header {name}={v:#x}"), &|b| {
                let bytes = v.to_be_bytes();
                put(b, *off, &bytes[8 - w..]);
            });
        }
    }
    for (what, off) in [("l1_offset", 40u64), ("reftable_offset", 48)] {
        for (n, tgt) in &targets {
            add(format!("header {what}={n}"), &|b| {
                put(b, off, &tgt.to_be_bytes())
            });
        }
    }
    // L1 entries.
    for i in 0..t.l1_entries as u64 {
        let pos = t.l1 + i * 8;
        for (n, tgt) in &targets {
            for copied in [true, false] {
                let v = tgt | if copied { 1 << 63 } else { 0 };
                add(format!("L1[{i}]={n} copied={copied}"), &|b| {
                    put(b, pos, &v.to_be_bytes())
                });
            }
        }
        add(format!("L1[{i}]=0"), &|b| put(b, pos, &[0; 8]));
        add(format!("L1[{i}] reserved bits"), &|b| {
            let v = be64(b, pos) | 0x7f00_0000_0000_0001;
            put(b, pos, &v.to_be_bytes())
        });
    }
    // L2 entries: used ones (data, zero, compressed) and free ones.
    let mut entries: Vec<u64> = t.l2_used.iter().map(|&(p, _)| p).step_by(2).collect();
    entries.extend(t.l2_free.iter().step_by(97).take(4));
    for &pos in &entries {
        for (n, tgt) in &targets {
            add(format!("L2@{pos:#x}={n}"), &|b| {
                put(b, pos, &((1u64 << 63) | tgt).to_be_bytes())
            });
        }
        for (what, v) in [
            ("0", 0u64),
            ("copied-cleared", be64(&t.bytes, pos) & !(1 << 63)),
            ("zero-flag", be64(&t.bytes, pos) | 1),
            ("reserved", be64(&t.bytes, pos) | 0x3f00_0000_0000_0000),
            ("compressed-garbage", (1 << 62) | 0x0123_4567_89ab_cdef),
            ("compressed-past-end", (1 << 62) | (len + (1 << 20))),
        ] {
            add(format!("L2@{pos:#x} {what}"), &|b| {
                put(b, pos, &v.to_be_bytes())
            });
        }
    }
    // Two L2 entries sharing one data cluster.
    for (k, &(pos, _)) in t.l2_used.iter().enumerate().skip(1).step_by(4) {
        let (_, other) = t.l2_used[k - 1];
        add(format!("L2@{pos:#x} shares the previous cluster"), &|b| {
            put(b, pos, &other.to_be_bytes())
        });
    }
    // Refcount table entries.
    for (n, tgt) in &targets {
        add(format!("reftable[0]={n}"), &|b| {
            put(b, t.reftable, &tgt.to_be_bytes())
        });
    }
    add("reftable[1]=refblock".into(), &|b| {
        put(b, t.reftable + 8, &t.refblocks[0].to_be_bytes())
    });
    // Refcount block entries (16-bit): every used cluster set to 0, 2, max.
    let rb = t.refblocks[0];
    let used = len.div_ceil(CS);
    for c in 0..used {
        for v in [0u16, 2, 0xffff] {
            add(format!("refcount[{c}]={v}"), &|b| {
                put(b, rb + c * 2, &v.to_be_bytes())
            });
        }
    }
    for c in [used, used + 1, used + 40] {
        add(format!("refcount[{c}]=1 (unused)"), &|b| {
            put(b, rb + c * 2, &1u16.to_be_bytes())
        });
    }
    // Truncations.
    let mut cuts: Vec<u64> = vec![0, 1, 4, 20, 71, 72, 103, 104, 511, 512, 4095, 4096, 8191];
    cuts.extend((8192..len).step_by(2048));
    cuts.extend([len - 1, len - 512]);
    for c in cuts {
        add(format!("truncated to {c}"), &|b| b.truncate(c as usize));
    }
    // Random damage, seeded.
    let mut rng = Rng(0x5eed_c0de_1234_5678);
    for k in 0..40 * random_scale {
        let (bit, pos) = (rng.below(8), rng.below(112));
        add(format!("header bit flip #{k} at {pos}.{bit}"), &|b| {
            b[pos as usize] ^= 1 << bit
        });
    }
    let meta: Vec<u64> = [t.l1, t.reftable]
        .into_iter()
        .chain(t.refblocks.iter().copied())
        .chain(t.l2.iter().copied())
        .collect();
    for k in 0..60 * random_scale {
        let m = meta[rng.below(meta.len() as u64) as usize];
        let word = m + rng.below(CS / 8) * 8;
        let v = match rng.below(4) {
            0 => rng.next(),
            1 => (1 << 63) | (rng.below(len.div_ceil(CS) + 8) * CS),
            2 => rng.below(len.div_ceil(CS) + 8) * CS,
            _ => be64(&t.bytes, word) ^ (1 << rng.below(64)),
        };
        add(format!("metadata word #{k} at {word:#x}={v:#x}"), &|b| {
            put(b, word, &v.to_be_bytes())
        });
    }
    out
}

/// `qemu-img check`'s errors (corruptions and check errors; leaks are not
/// errors), or `None` when it cannot check the image at all.
fn check_errors(p: &Path) -> Option<u64> {
    let (code, out) = run_status(
        "qemu-img",
        &["check", "--output=json", "-U", p.to_str().unwrap()],
    );
    if code == 1 || code == 63 {
        return None;
    }
    let start = out.find('{')?;
    let end = out.rfind('}')?;
    let v: Value = serde_json::from_str(&out[start..=end]).ok()?;
    Some(v["corruptions"].as_u64().unwrap_or(0) + v["check-errors"].as_u64().unwrap_or(0))
}

/// The pattern byte of write `i`.
fn pattern(i: usize) -> u8 {
    0x41 + i as u8
}

#[derive(Default, Debug)]
struct Counts {
    variants: u64,
    opened_writable: u64,
    opened_read_only: u64,
    refused: u64,
    writes_acked: u64,
    wrong_sluice: u64,
    wrong_qemu: u64,
    more_errors: u64,
    refused_but_changed: u64,
    qemu_checked_after: u64,
}

/// Opens, writes, reads back and closes one variant in sluice; returns the
/// acknowledged writes (index into [`WRITES`]) or `None` when the open was refused.
fn exercise(
    rt: &reactor::RuntimeHandle,
    p: &Path,
    failures: &mut Vec<String>,
    name: &str,
    c: &mut Counts,
) -> Option<Vec<usize>> {
    let q: Arc<Qcow2Bdev> = match open(rt, "camp", p, opts()) {
        Ok(q) => q,
        Err(_) => return None,
    };
    if q.read_only() {
        c.opened_read_only += 1;
        let b: Arc<dyn Bdev> = q.clone();
        rt.spawn_on(0, move || async move { bdev::drop_cached_channels(&b) })
            .block()
            .expect("join");
        return Some(Vec::new());
    }
    c.opened_writable += 1;
    let b: Arc<dyn Bdev> = q.clone();
    let q2 = q.clone();
    let (acked, wrong) = rt
        .spawn_on(0, move || async move {
            let ch = channel(&b).expect("channel");
            let mut acked = Vec::new();
            for (i, &(off, len)) in WRITES.iter().enumerate() {
                if off + len > b.size() {
                    continue;
                }
                let buf = DmaBuf::from_slice(&vec![pattern(i); len as usize]).unwrap();
                if write_at(&ch, off, buf).await.is_ok() {
                    acked.push(i);
                }
            }
            let mut wrong = Vec::new();
            for &i in &acked {
                let (off, len) = WRITES[i];
                match read_at(&ch, off, len as usize).await {
                    Ok(d) if d.as_slice().iter().all(|&x| x == pattern(i)) => {}
                    Ok(_) => wrong.push(format!("write {i} at {off} reads back different data")),
                    Err(e) => wrong.push(format!("write {i} at {off} cannot be read back: {e}")),
                }
            }
            let _ = q2.close().await;
            drop(ch);
            bdev::drop_cached_channels(&b);
            (acked, wrong)
        })
        .block()
        .expect("the engine task died");
    c.writes_acked += acked.len() as u64;
    c.wrong_sluice += wrong.len() as u64;
    for w in wrong {
        failures.push(format!("{name}: {w}"));
    }
    drop(q);
    Some(acked)
}

#[test]
fn corrupted_images_are_not_made_worse() {
    // Many small images, each flushed: on tmpfs when there is one.
    let dir = match std::fs::metadata("/dev/shm") {
        Ok(m) if m.is_dir() => {
            let d = std::path::PathBuf::from(format!(
                "/dev/shm/sluice-campaign-{}",
                std::process::id()
            ));
            std::fs::create_dir_all(&d).unwrap();
            d
        }
        _ => scratch("campaign"),
    };
    let t = template(&dir);
    let all = variants(&t, soak(1));
    let rt = runtime(1);
    let h = rt.handle();
    let p = dir.join("v.qcow2");
    let mut c = Counts::default();
    let mut failures = Vec::new();
    for v in &all {
        c.variants += 1;
        std::fs::write(&p, &v.bytes).unwrap();
        let before = check_errors(&p);
        let Some(acked) = exercise(&h, &p, &mut failures, &v.name, &mut c) else {
            c.refused += 1;
            if std::fs::read(&p).unwrap() != v.bytes {
                c.refused_but_changed += 1;
                failures.push(format!("{}: a refused open changed the file", v.name));
            }
            continue;
        };
        let after = check_errors(&p);
        if let Some(b) = before {
            c.qemu_checked_after += 1;
            match after {
                Some(a) if a <= b => {}
                a => {
                    c.more_errors += 1;
                    failures.push(format!(
                        "{}: qemu-img check: {b} errors before, {a:?} after",
                        v.name
                    ));
                }
            }
        }
        if acked.is_empty() {
            continue;
        }
        let mut args = vec!["-r".to_string(), "-f".into(), "qcow2".into()];
        for &i in &acked {
            let (off, len) = WRITES[i];
            args.push("-c".into());
            args.push(format!("read -P {:#x} {off} {len}", pattern(i)));
        }
        args.push(p.to_str().unwrap().into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out) = run_status("qemu-io", &args);
        if code == 0 && !out.contains("Could not open") {
            let bad = out.matches("Pattern verification failed").count()
                + out.matches("read failed").count();
            if bad > 0 {
                c.wrong_qemu += bad as u64;
                failures.push(format!(
                    "{}: qemu-io reads back {bad} writes wrong:\n{out}",
                    v.name
                ));
            }
        }
    }
    eprintln!("qcow2 campaign: {c:?}");
    assert!(c.variants >= 500, "{c:?}");
    assert!(
        c.opened_writable > 50 && c.writes_acked > 200,
        "the campaign exercised too little: {c:?}"
    );
    assert!(
        failures.is_empty(),
        "{} failures ({c:?}):\n{}",
        failures.len(),
        failures.join("\n")
    );
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A refcount block that says an L2 table's cluster is free: a new cluster is
/// never taken from there (the allocation skips known metadata), so the write
/// succeeds and the image is neither marked corrupt nor given more errors.
#[test]
fn allocation_skips_metadata_without_a_refcount() {
    let dir = scratch("alloc-meta");
    let t = template(&dir);
    let p = dir.join("v.qcow2");
    let mut b = t.bytes.clone();
    let l2c = t.l2[0] / CS;
    put(&mut b, t.refblocks[0] + l2c * 2, &0u16.to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    let before = check_errors(&p).expect("qemu-img checks it");
    assert!(before >= 1, "the patch is an error");
    let rt = runtime(1);
    let h = rt.handle();
    let q = open(&h, "am", &p, opts()).expect("opens writable");
    assert!(!q.read_only());
    let bd: Arc<dyn Bdev> = q.clone();
    write(&h, 0, &bd, 512 << 10, vec![0x77; 4096]);
    close(&h, &q);
    // Deleted, as the daemon deletes: the image lock goes with it.
    bd.on_delete();
    drop((q, bd));
    let after = check_errors(&p).expect("qemu-img checks it");
    assert!(after <= before, "{before} errors before, {after} after");
    let info = run("qemu-img", &["info", "--output=json", p.to_str().unwrap()]);
    assert!(!info.contains("\"corrupt\": true"), "{info}");
    let (code, out) = run_status(
        "qemu-io",
        &[
            "-r",
            "-c",
            "read -P 0x77 512k 4k",
            "-c",
            "read -P 0x21 0 40k",
            p.to_str().unwrap(),
        ],
    );
    assert!(code == 0 && !out.contains("failed"), "{out}");
}

/// Two L1 entries sharing one L2 table (guest ranges aliasing each other): a
/// writable open is refused, naming both, and leaves the file as it was; a
/// read-only open serves reads as QEMU does.
#[test]
fn shared_l2_table_is_refused_writable_and_read_read_only() {
    let dir = scratch("shared-l2");
    let t = template(&dir);
    let p = dir.join("v.qcow2");
    let mut b = t.bytes.clone();
    put(&mut b, t.l1 + 8, &((1u64 << 63) | t.l2[0]).to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    let rt = runtime(1);
    let h = rt.handle();
    let e = match open(&h, "sh", &p, opts()) {
        Ok(_) => panic!("a writable open of aliasing L2 tables succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("L2 table 1") && e.contains("also L2 table 0"),
        "{e}"
    );
    assert!(
        std::fs::read(&p).unwrap() == b,
        "the refused open changed the file"
    );
    let ro = bdev::qcow2::OpenOptions {
        read_only: true,
        ..opts()
    };
    let q = open(&h, "sh", &p, ro).expect("opens read-only");
    let bd: Arc<dyn Bdev> = q.clone();
    let all = read_all(&h, 0, &bd, 64 << 10);
    assert!(all[..40 << 10].iter().all(|&x| x == 0x21));
    assert!(
        all[(2 << 20)..(2 << 20) + (40 << 10)]
            .iter()
            .all(|&x| x == 0x21),
        "aliased range"
    );
}
