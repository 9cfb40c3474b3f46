//! The streaming hooks of the qcow2 bdev: multi-cluster populate (buffer handed
//! back, allocated clusters left alone), zero populate (v3 zero clusters) and
//! `set_backing_bdev` moving registry claims; qemu-img check / compare / map judge.

mod qcow2_common;

use bdev::qcow2::{BackingSpec, OpenOptions, Qcow2Bdev};
use bdev::{Bdev, BdevError, DmaBuf};
use qcow2_common::*;
use serde_json::Value;
use std::sync::Arc;

/// This test process's registry (the graph hands one down in the service).
fn registry() -> &'static std::sync::Arc<bdev::Registry> {
    static R: std::sync::OnceLock<std::sync::Arc<bdev::Registry>> = std::sync::OnceLock::new();
    R.get_or_init(bdev::Registry::new)
}

const K: u64 = 1024;
const CS: u64 = 64 * K;

fn filled(len: u64, b: u8) -> DmaBuf {
    let mut d = DmaBuf::new(len as usize).unwrap();
    d.as_mut_slice().fill(b);
    d
}

#[test]
fn multi_cluster_and_zero_populate() {
    let d = scratch("populate");
    let base = d.join("base.qcow2");
    let top = d.join("top.qcow2");
    let (bs, ts) = (base.to_str().unwrap(), top.to_str().unwrap());
    // 1 MiB + 32 KiB: the last cluster is partial.
    qemu_img_create(bs, "1056K", &[]);
    qemu_io(&base, &["write -P 0x11 0 1056K"]);
    qemu_img_create(ts, "1056K", &["-b", bs, "-F", "qcow2"]);
    // Client data the populates must not overwrite.
    qemu_io(
        &top,
        &[
            "write -P 0x01 64k 64k",
            "write -P 0x02 192k 64k",
            "write -P 0x03 576k 64k",
        ],
    );
    let rt = runtime(2);
    let h = rt.handle();
    let q = open(&h, "p", &top, opts()).expect("open");
    let q2 = q.clone();
    // From a non-owner reactor: forwarded to the owner.
    let (r1, r2, r3, z, bad_off, bad_len) = h
        .spawn_on(1, move || async move {
            let (buf, n1) = q2
                .populate_range_if_unallocated(0, filled(512 * K, 0x77), true)
                .await
                .unwrap();
            assert_eq!(buf.len() as u64, 512 * K, "the buffer comes back whole");
            assert!(buf.as_slice().iter().all(|&x| x == 0x77));
            let (_, n2) = q2
                .populate_range_if_unallocated(0, buf, true)
                .await
                .unwrap();
            let (_, n3) = q2
                .populate_range_if_unallocated(1 << 20, filled(32 * K, 0x88), true)
                .await
                .unwrap();
            let z = q2
                .populate_zero_if_unallocated(512 * K, 256 * K)
                .await
                .unwrap();
            let bad_off = q2
                .populate_range_if_unallocated(4096, filled(CS, 1), true)
                .await
                .map(|r| r.1);
            let bad_len = q2
                .populate_range_if_unallocated(0, filled(CS + 4096, 1), true)
                .await
                .map(|r| r.1);
            (n1, n2, n3, z, bad_off, bad_len)
        })
        .block()
        .unwrap();
    assert_eq!(r1, 6, "8 clusters, 2 of them client-written");
    assert_eq!(r2, 0, "a second populate writes nothing");
    assert_eq!(r3, 1, "the partial last cluster");
    assert_eq!(z, 3, "4 clusters, 1 of them client-written");
    assert!(
        matches!(bad_off, Err(BdevError::InvalidParam(_))),
        "{bad_off:?}"
    );
    assert!(
        matches!(bad_len, Err(BdevError::InvalidParam(_))),
        "{bad_len:?}"
    );
    // Drop the backing: what was populated must stand on its own.
    let q3 = q.clone();
    h.spawn_on(0, move || async move {
        q3.set_backing_file(None, None).await.unwrap();
        q3.set_backing_bdev(None).await.unwrap();
    })
    .block()
    .unwrap();
    close(&h, &q);
    drop((q, rt));
    let (code, out) = qemu_check(&top);
    assert_eq!(code, 0, "{out}");
    let mut want = vec![0x77u8; 1056 * K as usize];
    let mut fill = |a: u64, n: u64, b: u8| want[a as usize..(a + n) as usize].fill(b);
    fill(64 * K, CS, 0x01);
    fill(192 * K, CS, 0x02);
    fill(512 * K, 256 * K, 0);
    fill(576 * K, CS, 0x03);
    fill(768 * K, 256 * K, 0); // never populated, no backing any more
    fill(1 << 20, 32 * K, 0x88);
    let raw = d.join("want.raw");
    std::fs::write(&raw, &want).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            ts,
            raw.to_str().unwrap(),
        ],
    );
    // The zero populate made zero clusters (no data, allocated at depth 0).
    let map: Value = serde_json::from_str(&run("qemu-img", &["map", "--output=json", ts])).unwrap();
    let at = |off: u64| {
        map.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                let s = e["start"].as_u64().unwrap();
                s <= off && off < s + e["length"].as_u64().unwrap()
            })
            .cloned()
            .unwrap()
    };
    for off in [512 * K, 640 * K, 704 * K] {
        let e = at(off);
        assert_eq!(e["zero"], true, "{e}");
        assert_eq!(e["data"], false, "{e}");
    }
    assert_eq!(at(0)["data"], true);
}

#[test]
fn zero_populate_needs_v3() {
    let d = scratch("populate-v2");
    let p = d.join("v2.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img_create(ps, "1M", &["-o", "compat=0.10"]);
    let rt = runtime(1);
    let h = rt.handle();
    let q = open(&h, "v2", &p, opts()).expect("open");
    let q2 = q.clone();
    let r = h
        .spawn_on(0, move || async move {
            q2.populate_zero_if_unallocated(0, CS).await
        })
        .block()
        .unwrap();
    assert!(matches!(r, Err(BdevError::Unsupported(_))), "{r:?}");
    close(&h, &q);
    drop((q, rt));
    assert_eq!(qemu_check(&p).0, 0);
}

#[test]
fn set_backing_bdev_moves_claims() {
    let d = scratch("populate-claims");
    let p = d.join("top.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img_create(ps, "1M", &[]);
    let rt = runtime(1);
    let h = rt.handle();
    let mut leaves = Vec::new();
    for (name, b) in [("claims-a", 0xa1u8), ("claims-b", 0xb2u8)] {
        let l = bdev::malloc::MallocBdev::new(name, 2048, 512, None).unwrap();
        registry().register(l.clone()).unwrap();
        let l: Arc<dyn Bdev> = l;
        write(&h, 0, &l, 0, vec![b; 1 << 20]);
        leaves.push(l);
    }
    let q = open(
        &h,
        "claims-top",
        &p,
        OpenOptions {
            backing: BackingSpec::Named("claims-a".into()),
            nodes: Some(registry().clone()),
            ..opts()
        },
    )
    .expect("open");
    let me = vec!["claims-top".to_string()];
    assert_eq!(registry().claims("claims-a"), me);
    let b: Arc<dyn Bdev> = q.clone();
    assert!(read_all(&h, 0, &b, 1 << 20).iter().all(|&x| x == 0xa1));
    let (q2, nb) = (q.clone(), leaves[1].clone());
    h.spawn_on(
        0,
        move || async move { q2.set_backing_bdev(Some(nb)).await },
    )
    .block()
    .unwrap()
    .unwrap();
    assert!(registry().claims("claims-a").is_empty());
    assert_eq!(registry().claims("claims-b"), me);
    assert!(read_all(&h, 0, &b, 1 << 20).iter().all(|&x| x == 0xb2));
    // Setting the same backing again changes nothing.
    let (q2, nb) = (q.clone(), leaves[1].clone());
    h.spawn_on(
        0,
        move || async move { q2.set_backing_bdev(Some(nb)).await },
    )
    .block()
    .unwrap()
    .unwrap();
    assert_eq!(registry().claims("claims-b"), me);
    // The image's own claims go with it.
    bdev::release_channels(&b, &h);
    drop((b, q));
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(registry().claims("claims-b").is_empty());
    // Unlinking releases too.
    let q = open(
        &h,
        "claims-top2",
        &p,
        OpenOptions {
            backing: BackingSpec::Named("claims-a".into()),
            nodes: Some(registry().clone()),
            ..opts()
        },
    )
    .expect("reopen");
    let q2: Arc<Qcow2Bdev> = q.clone();
    h.spawn_on(0, move || async move { q2.set_backing_bdev(None).await })
        .block()
        .unwrap()
        .unwrap();
    assert!(registry().claims("claims-a").is_empty());
    close(&h, &q);
    drop((q, rt));
    assert_eq!(qemu_check(&p).0, 0);
}
