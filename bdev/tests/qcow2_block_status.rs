//! Block status through a chain answers as `qemu-img map` does, and answers
//! whole unallocated regions at once: walked extent by extent from offset 0,
//! sluice's answers (allocated in the top, allocated anywhere, reads as
//! zeroes) merged into runs equal qemu-img's map of the same chain, on
//! images whose metadata has many empty L1 entries, partly filled L2 tables,
//! zero clusters and discarded ones; and a 4 TiB image holding three
//! extents is walked in a handful of questions (the count is asserted: the
//! cost follows the metadata, not the virtual size).

mod qcow2_common;

use bdev::qcow2::OpenOptions;
use bdev::Bdev;
use qcow2_common::*;
use std::path::Path;

/// (start, end, allocated here, allocated anywhere, zero), adjacent equal runs merged.
type Runs = Vec<(u64, u64, bool, bool, bool)>;

fn push(v: &mut Runs, s: u64, e: u64, f: (bool, bool, bool)) {
    if let Some(last) = v.last_mut() {
        if last.1 == s && (last.2, last.3, last.4) == f {
            last.1 = e;
            return;
        }
    }
    v.push((s, e, f.0, f.1, f.2));
}

fn qemu_map(img: &Path) -> Runs {
    let out = run(
        "qemu-img",
        &["map", "--output=json", "-U", img.to_str().unwrap()],
    );
    let map: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map json");
    let mut v = Runs::new();
    for e in map.as_array().unwrap() {
        let s = e["start"].as_u64().unwrap();
        let n = e["length"].as_u64().unwrap();
        let present = e["present"].as_bool().unwrap();
        let here = present && e["depth"].as_u64() == Some(0);
        push(
            &mut v,
            s,
            s + n,
            (here, present, e["zero"].as_bool().unwrap()),
        );
    }
    v
}

/// sluice's walk, and how many block-status questions it took.
fn sluice_map(tag: &str, img: &Path) -> (Runs, u64) {
    let rt = runtime(1);
    let h = rt.handle();
    let q = open(
        &h,
        tag,
        img,
        OpenOptions {
            read_only: true,
            ..opts()
        },
    )
    .expect("open");
    let size = q.size();
    let r = h
        .spawn_on(0, move || async move {
            let mut v = Runs::new();
            let (mut off, mut asked) = (0u64, 0u64);
            while off < size {
                let s = q.block_status(off, size - off, None).await.expect("status");
                asked += 1;
                assert!(s.len > 0 && off + s.len <= size, "bad run {s:?} at {off}");
                push(
                    &mut v,
                    off,
                    off + s.len,
                    (s.allocated_here, s.allocated_above_base, s.zero),
                );
                off += s.len;
            }
            (v, asked)
        })
        .block()
        .expect("join");
    drop(rt);
    r
}

#[test]
fn walk_matches_qemu_img_map_on_a_sparse_chain() {
    let d = scratch("bstatus");
    let base = d.join("base.qcow2");
    let top = d.join("top.qcow2");
    // 4 KiB clusters: one L2 table maps 2 MiB, so 64 GiB has 32768 L1 entries.
    qemu_img_create(&base, "64G", &["-o", "cluster_size=4096"]);
    qemu_io(
        &base,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x12 3G 64k",
            "write -P 0x13 10G 2M",
            "write -z 10G 8k",
            "write -P 0x14 40G 12k",
            "write -P 0x15 68719472640 4k",
        ],
    );
    qemu_img_create(
        &top,
        "64G",
        &[
            "-o",
            "cluster_size=4096",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "qcow2",
        ],
    );
    qemu_io(
        &top,
        &[
            "write -P 0x21 512k 1M",
            "write -z 3G 4k",
            "write -P 0x22 10738466816 8k",
            "write -P 0x23 20G 4k",
            "discard 20G 4k",
            "write -P 0x24 33G 6M",
            "write -z 35435577344 1M",
            "write -P 0x25 63G 4k",
        ],
    );
    for img in [&base, &top] {
        let want = qemu_map(img);
        let (got, asked) = sluice_map("bs", img);
        assert_eq!(
            got,
            want,
            "{}: block status differs from qemu-img map",
            img.display()
        );
        eprintln!(
            "{}: {} runs in {asked} questions",
            img.display(),
            want.len()
        );
    }
}

#[test]
fn four_tib_with_three_extents_is_walked_one_question_per_run() {
    let d = scratch("bstatus4t");
    let base = d.join("base.qcow2");
    let top = d.join("top.qcow2");
    qemu_img_create(&base, "4T", &[]);
    qemu_io(
        &base,
        &[
            "write -P 0x31 1T 1M",
            "write -P 0x32 3T 2M",
            "write -P 0x33 4398046445568 64k",
        ],
    );
    qemu_img_create(&top, "4T", &["-b", base.to_str().unwrap(), "-F", "qcow2"]);
    qemu_io(&top, &["write -P 0x41 2T 1M"]);
    let want = qemu_map(&top);
    let t = std::time::Instant::now();
    let (got, asked) = sluice_map("bs4t", &top);
    eprintln!(
        "4 TiB chain: {} runs in {asked} questions, {:?}",
        got.len(),
        t.elapsed()
    );
    assert_eq!(got, want, "block status differs from qemu-img map");
    // One question per run boundary (a run ends where the status changes,
    // or where a lower layer's answer does): 9 runs here.
    assert!(
        asked <= 2 * want.len() as u64,
        "{asked} questions for {} runs: the walk does not skip empty metadata",
        want.len()
    );
}
