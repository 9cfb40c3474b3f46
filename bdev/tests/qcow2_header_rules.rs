//! Header rules and bad images: feature bits, dirty-bit rebuild, corrupt bit,
//! autoclear bits, kept extensions; broken tables give a clear error, never a
//! panic and never a write.

mod qcow2_common;

use bdev::qcow2::format::Header;
use bdev::{Bdev, BdevError};
use qcow2_common::*;
use std::path::Path;
use std::sync::Arc;

fn or_byte(path: &Path, off: usize, bits: u8) {
    let mut d = std::fs::read(path).unwrap();
    d[off] |= bits;
    std::fs::write(path, d).unwrap();
}

fn header_of(path: &Path) -> Header {
    let d = std::fs::read(path).unwrap();
    Header::parse(&d[..65536.min(d.len())], d.len() as u64 + 65536).unwrap()
}

fn new_image(d: &Path, name: &str, opts: &str) -> std::path::PathBuf {
    let p = d.join(name);
    qemu_img_create(&p, "4M", &["-o", opts]);
    p
}

#[test]
fn unknown_incompatible_bits_are_named_and_refused() {
    let rt = runtime(1);
    let h = rt.handle();
    let d = scratch("incompat");
    let img = new_image(&d, "a.qcow2", "cluster_size=65536");
    or_byte(&img, 78, 0x04); // incompatible bit 10
    let e = open(&h, "a", &img, opts()).err().expect("must refuse");
    assert!(e.to_string().contains("bit 10 (unknown)"), "{e}");
    let img = new_image(&d, "x.qcow2", "extended_l2=on");
    let e = open(&h, "x", &img, opts())
        .err()
        .expect("extended L2 refused");
    assert!(e.to_string().contains("extended L2 entries"), "{e}");
    assert!(matches!(e, BdevError::Unsupported(_)), "{e:?}");
}

#[test]
fn corrupt_bit_opens_read_only() {
    let rt = runtime(1);
    let h = rt.handle();
    let d = scratch("corrupt");
    let img = new_image(&d, "c.qcow2", "cluster_size=65536");
    qemu_io(&img, &["write -P 0x3c 0 64k"]);
    or_byte(&img, 79, 0x02);
    let before = std::fs::read(&img).unwrap();
    let q = open(&h, "c", &img, opts()).expect("open");
    assert!(q.read_only());
    let b: Arc<dyn Bdev> = q.clone();
    assert!(read_all(&h, 0, &b, 65536)[..65536]
        .iter()
        .all(|&x| x == 0x3c));
    let b2 = b.clone();
    let st = h
        .spawn_on(0, move || async move {
            let ch = bdev::channel(&b2).unwrap();
            bdev::write_at(&ch, 0, bdev::DmaBuf::new(4096).unwrap())
                .await
                .err()
        })
        .block()
        .unwrap();
    assert!(
        matches!(st, Some(BdevError::Io(bdev::IoStatus::ReadOnly))),
        "{st:?}"
    );
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a read-only open must not write"
    );
}

#[test]
fn dirty_bit_rebuilds_refcounts() {
    let rt = runtime(1);
    let h = rt.handle();
    let d = scratch("dirty");
    let img = new_image(&d, "l.qcow2", "lazy_refcounts=on,cluster_size=4096");
    // qemu-io aborts without closing: the dirty bit stays, refcounts are stale.
    let _ = run_status(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5d 0 300k",
            "-c",
            "write -P 0x5e 1m 64k",
            "-c",
            "abort",
            img.to_str().unwrap(),
        ],
    );
    assert!(header_of(&img).incompatible & 1 != 0, "dirty bit expected");
    let (code, _) = qemu_check(&img);
    assert_ne!(code, 0, "stale refcounts expected before the rebuild");
    let q = open(&h, "l", &img, opts()).expect("open");
    let b: Arc<dyn Bdev> = q.clone();
    write(&h, 0, &b, 2 << 20, vec![0x77; 8192]);
    let got = read_all(&h, 0, &b, 1 << 20);
    assert!(got[..300 << 10].iter().all(|&x| x == 0x5d));
    assert!(got[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0x5e));
    close(&h, &q);
    assert_eq!(header_of(&img).incompatible & 1, 0, "dirty bit cleared");
    let (code, out) = qemu_check(&img);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn autoclear_cleared_and_extensions_kept() {
    let rt = runtime(1);
    let h = rt.handle();
    let d = scratch("autoclear");
    let img = new_image(&d, "b.qcow2", "cluster_size=65536");
    run(
        "qemu-img",
        &["bitmap", "--add", img.to_str().unwrap(), "bm0"],
    );
    let h0 = header_of(&img);
    assert_eq!(h0.autoclear & 1, 1);
    assert!(
        h0.extensions.iter().any(|e| e.kind == 0x2385_2875),
        "bitmaps extension"
    );
    or_byte(&img, 95, 0x20); // unknown autoclear bit 5
    let q = open(&h, "b", &img, opts()).expect("open");
    let b: Arc<dyn Bdev> = q.clone();
    write(&h, 0, &b, 0, vec![1; 4096]);
    close(&h, &q);
    let h1 = header_of(&img);
    assert_eq!(
        h1.autoclear, 0,
        "autoclear bits cleared on a read-write open"
    );
    assert_eq!(h1.extensions, h0.extensions, "every extension kept");
}

/// A way to damage an image file's bytes.
type Damage = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn bad_images_give_errors_without_writes() {
    let rt = runtime(1);
    let h = rt.handle();
    let d = scratch("bad");
    let base = new_image(&d, "base.qcow2", "cluster_size=65536");
    qemu_io(&base, &["write -P 0x11 0 128k"]);
    let good = std::fs::read(&base).unwrap();
    let cases: Vec<(&str, Damage)> = vec![
        ("truncated", Box::new(|v: &mut Vec<u8>| v.truncate(100))),
        (
            "l1 past end",
            Box::new(|v: &mut Vec<u8>| v[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes())),
        ),
        (
            "l1 in header",
            Box::new(|v: &mut Vec<u8>| v[40..48].copy_from_slice(&0u64.to_be_bytes())),
        ),
        (
            "reftable overlaps l1",
            Box::new(|v: &mut Vec<u8>| {
                let l1 = v[40..48].to_vec();
                v[48..56].copy_from_slice(&l1)
            }),
        ),
        (
            "absurd size",
            Box::new(|v: &mut Vec<u8>| v[24..32].copy_from_slice(&(1u64 << 62).to_be_bytes())),
        ),
        (
            "absurd l1_size",
            Box::new(|v: &mut Vec<u8>| v[36..40].copy_from_slice(&u32::MAX.to_be_bytes())),
        ),
        (
            "cluster bits",
            Box::new(|v: &mut Vec<u8>| v[20..24].copy_from_slice(&40u32.to_be_bytes())),
        ),
        (
            "huge reftable",
            Box::new(|v: &mut Vec<u8>| v[56..60].copy_from_slice(&u32::MAX.to_be_bytes())),
        ),
        (
            "l2 past end",
            Box::new(|v: &mut Vec<u8>| {
                v[0x30000..0x30008].copy_from_slice(&((1u64 << 63) | (1 << 40)).to_be_bytes())
            }),
        ),
        (
            "l2 on header",
            Box::new(|v: &mut Vec<u8>| {
                v[0x30000..0x30008].copy_from_slice(&((1u64 << 63) | 0x10000).to_be_bytes())
            }),
        ),
        (
            "refblock past end",
            Box::new(|v: &mut Vec<u8>| {
                v[0x10000..0x10008].copy_from_slice(&(1u64 << 40).to_be_bytes())
            }),
        ),
        ("bad magic", Box::new(|v: &mut Vec<u8>| v[0] = b'X')),
    ];
    for (what, f) in cases {
        let p = d.join(format!("{}.qcow2", what.replace(' ', "_")));
        let mut v = good.clone();
        f(&mut v);
        std::fs::write(&p, &v).unwrap();
        match open(&h, what, &p, opts()) {
            Ok(_) => panic!("{what}: opened"),
            Err(e) => assert!(!e.to_string().is_empty(), "{what}"),
        }
        assert!(
            std::fs::read(&p).unwrap() == v,
            "{what}: the file was modified"
        );
    }
    // An L2 entry pointing into the L1 table: reads and writes of that cluster fail, nothing is written.
    let l2 = {
        let mut a = [0u8; 8];
        a.copy_from_slice(&good[0x30000..0x30008]);
        u64::from_be_bytes(a) & 0x00ff_ffff_ffff_fe00
    } as usize;
    let p = d.join("data_on_l1.qcow2");
    let mut v = good.clone();
    v[l2..l2 + 8].copy_from_slice(&((1u64 << 63) | 0x30000).to_be_bytes());
    std::fs::write(&p, &v).unwrap();
    let q = open(&h, "dl1", &p, opts()).expect("tables are fine");
    let b: Arc<dyn Bdev> = q.clone();
    let b2 = b.clone();
    let (r, w) = h
        .spawn_on(0, move || async move {
            let ch = bdev::channel(&b2).unwrap();
            let r = bdev::read_at(&ch, 0, 4096).await.err();
            let w = bdev::write_at(&ch, 0, bdev::DmaBuf::new(4096).unwrap())
                .await
                .err();
            (r, w)
        })
        .block()
        .unwrap();
    assert!(r.is_some() && w.is_some(), "{r:?} {w:?}");
    close(&h, &q);
    // The refused write marked the image corrupt (the header's corrupt bit, as
    // QEMU does); nothing else was written.
    let after = std::fs::read(&p).unwrap();
    assert!(
        after[0x10000..v.len()] == v[0x10000..],
        "nothing written over the bad entry's target"
    );
    assert_eq!(after[79] & 2, 2, "the corrupt bit is set");
    assert!(after[..72] == v[..72], "the rest of the header is kept");
}
