//! The optimised data paths: reads spanning clusters merged into one base I/O
//! (general path and owner-reactor fast path), reads of every mix of cluster
//! kinds at odd offsets and lengths against qemu-img, and partial first writes
//! into reused host clusters (the rest of the cluster zeroed by the base).

mod qcow2_common;

use bdev::qcow2::Qcow2Bdev;
use bdev::{channel, local_stats, read_at, simple_io, Bdev, IoType};
use qcow2_common::*;
use reactor::RuntimeHandle;
use std::sync::Arc;

/// Reads `[off, off+len)` on reactor `r`.
fn read(rt: &RuntimeHandle, r: usize, b: &Arc<dyn Bdev>, off: u64, len: usize) -> Vec<u8> {
    let b = b.clone();
    rt.spawn_on(r, move || async move {
        let ch = channel(&b).expect("channel");
        read_at(&ch, off, len)
            .await
            .unwrap_or_else(|e| panic!("read {off}+{len}: {e}"))
            .as_slice()
            .to_vec()
    })
    .block()
    .expect("join")
}

/// Base read requests issued so far on reactor 0 by the image.
fn base_reads(rt: &RuntimeHandle, q: &Arc<Qcow2Bdev>) -> u64 {
    let base = q.base().clone();
    rt.spawn_on(0, move || async move {
        local_stats(&base).map_or(0, |s| s.num_read_ops)
    })
    .block()
    .expect("join")
}

#[test]
fn adjacent_clusters_are_one_base_read() {
    let rt = runtime(1);
    let h = rt.handle();
    let d = scratch("merge");
    let img = d.join("t.qcow2");
    qemu_img_create(&img, "4M", &[]);
    // One 256 KiB write: four host clusters in a row. Then four clusters
    // written last-first: in reverse order on the host.
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 256k",
            "write -P 0x24 1216k 64k",
            "write -P 0x23 1152k 64k",
            "write -P 0x22 1088k 64k",
            "write -P 0x21 1024k 64k",
        ],
    );
    let want = qemu_contents(&img);
    let q = open(&h, "merge", &img, opts()).expect("open");
    let b: Arc<dyn Bdev> = q.clone();

    // Cold cache (general path): one L2 table read, then one data read.
    let n0 = base_reads(&h, &q);
    assert_eq!(read(&h, 0, &b, 0, 256 << 10), want[..256 << 10]);
    assert_eq!(base_reads(&h, &q) - n0, 2, "cold 4-cluster read");
    // Warm (fast path): one data read, also from the middle of a cluster.
    let n1 = base_reads(&h, &q);
    assert_eq!(read(&h, 0, &b, 0, 256 << 10), want[..256 << 10]);
    assert_eq!(
        read(&h, 0, &b, 40 << 10, 150 << 10),
        want[40 << 10..190 << 10]
    );
    assert_eq!(base_reads(&h, &q) - n1, 2, "two warm reads");
    // Reversed clusters cannot merge: one read each, data still right.
    let n2 = base_reads(&h, &q);
    assert_eq!(
        read(&h, 0, &b, 1024 << 10, 256 << 10),
        want[1024 << 10..1280 << 10]
    );
    assert_eq!(base_reads(&h, &q) - n2, 4, "non-adjacent clusters");
    // A fresh open, a read spanning the reversed clusters from the middle.
    // The old image is deleted as the registry deletes it (its cached
    // channels may outlive it a moment): that ends its image lock.
    b.on_delete();
    drop(b);
    drop(q);
    let q = open(&h, "merge2", &img, opts()).expect("reopen");
    let b: Arc<dyn Bdev> = q.clone();
    assert_eq!(
        read(&h, 0, &b, 1050 << 10, 200 << 10),
        want[1050 << 10..1250 << 10]
    );
}

/// Every kind of cluster (data in and out of host order, zero, discarded,
/// compressed, unallocated over a backing file and past its end), read at
/// random offsets and lengths, cold and warm, on the owner and forwarded.
#[test]
fn random_spans_match_qemu() {
    for cs in ["4096", "65536"] {
        let rt = runtime(2);
        let h = rt.handle();
        let d = scratch(&format!("spans{cs}"));
        let base = d.join("base.qcow2");
        let img = d.join("t.qcow2");
        let (bp, ip) = (base.to_str().unwrap(), img.to_str().unwrap());
        let co = format!("cluster_size={cs}");
        qemu_img_create(bp, "3M", &["-o", &co]);
        qemu_io(&base, &["write -P 0x5a 0 3M"]);
        let src = d.join("src.qcow2");
        let sp = src.to_str().unwrap();
        qemu_img_create(sp, "4M", &["-o", &co]);
        qemu_io(&src, &["write -P 0x77 2M 512k"]);
        let conv = [
            "convert", "-c", "-O", "qcow2", "-o", &co, "-B", bp, "-F", "qcow2", sp, ip,
        ];
        run("qemu-img", &conv);
        qemu_io(
            &img,
            &[
                "write -P 0x11 0 200k",
                "write -P 0x13 520k 10k",
                "write -P 0x12 500k 12k",
                "write -z 700k 96k",
                "discard 900k 64k",
                "write -P 0x14 1M 300k",
                "write -P 0x15 3500k 100k",
            ],
        );
        let want = qemu_contents(&img);
        let q = open(&h, &format!("spans{cs}"), &img, opts()).expect("open");
        let b: Arc<dyn Bdev> = q.clone();
        let size = want.len() as u64;
        let mut rng = Rng(0x9e3779b97f4a7c15 ^ cs.len() as u64);
        for pass in 0..3 {
            for _ in 0..150 {
                let off = rng.below(size / 512) * 512;
                let len = ((rng.below(400) + 1) * 512).min(size - off) as usize;
                let r = if pass == 2 { 1 } else { 0 };
                let got = read(&h, r, &b, off, len);
                assert!(
                    got == want[off as usize..off as usize + len],
                    "cs {cs} pass {pass}: {off}+{len} differs from qemu-img"
                );
            }
        }
    }
}

#[test]
fn partial_first_writes_into_reused_clusters_read_zeroes_around() {
    let rt = runtime(1);
    let h = rt.handle();
    let d = scratch("reuse");
    let img = d.join("t.qcow2");
    qemu_img_create(&img, "8M", &[]);
    let q = open(&h, "reuse", &img, opts()).expect("open");
    let b: Arc<dyn Bdev> = q.clone();
    // Eight whole clusters of 0xaa, then discarded: after a flush their host
    // clusters are free again, still holding 0xaa.
    write(&h, 0, &b, 0, vec![0xaa; 512 << 10]);
    let mut model = vec![0u8; 8 << 20];
    // (A partial first write into a fresh cluster at the end of the file needs
    // no zeroing at all.)
    model[(6 << 20) + 512..(6 << 20) + 1024].fill(0x77);
    write(&h, 0, &b, (6 << 20) + 512, vec![0x77; 512]);
    let base = q.base().clone();
    let zeroes_before = h
        .spawn_on(0, move || async move {
            local_stats(&base).map_or(0, |s| s.num_write_zeroes_ops)
        })
        .block()
        .expect("join");
    assert_eq!(zeroes_before, 0, "a fresh cluster was zeroed");
    let q2 = q.clone();
    let b2 = b.clone();
    h.spawn_on(0, move || async move {
        q2.flush().await.expect("flush");
        let ch = channel(&b2).expect("channel");
        let st = simple_io(&ch, IoType::Unmap, 0, 512 << 10).await;
        assert!(st.is_ok(), "discard: {st:?}");
        q2.flush().await.expect("flush");
    })
    .block()
    .expect("join");
    // Partial first writes into other guest clusters reuse those host clusters.
    for i in 0..8u64 {
        let off = (2 << 20) + i * (64 << 10) + (i * 7 % 16) * 4096;
        let data = vec![0x30 + i as u8; 4096 + (i as usize % 3) * 512];
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        write(&h, 0, &b, off, data);
    }
    assert!(
        read(&h, 0, &b, 0, 8 << 20) == model,
        "sluice reads back something else"
    );
    let base = q.base().clone();
    let zeroes = h
        .spawn_on(0, move || async move {
            local_stats(&base).map_or(0, |s| s.num_write_zeroes_ops)
        })
        .block()
        .expect("join");
    assert!(
        zeroes >= 8,
        "{zeroes} base write-zeroes: the rest was not zeroed by the base"
    );
    close(&h, &q);
    drop(b);
    drop(q);
    let (code, out) = qemu_check(&img);
    assert_eq!(code, 0, "qemu-img check: {out}");
    assert!(
        qemu_contents(&img) == model,
        "qemu-img reads back something else"
    );
    // The new clusters really reused the old ones: the file did not grow past
    // header, L1, refcount table and block, one L2 table and nine data clusters.
    let len = std::fs::metadata(&img).expect("stat").len();
    assert!(
        len <= 14 * (64 << 10),
        "file is {len} bytes: clusters not reused"
    );
}
