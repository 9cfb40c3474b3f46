//! Images made by qemu-img and filled by qemu-io read back identically through sluice.

mod qcow2_common;

use bdev::qcow2::OpenOptions;
use bdev::Bdev;
use qcow2_common::*;
use std::sync::Arc;

fn check_same(tag: &str, create: &[&str], size: &str, fill: &[&str]) {
    let rt = runtime(2);
    let h = rt.handle();
    let d = scratch(tag);
    let img = d.join("t.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(create);
    args.push(img.to_str().unwrap());
    args.push(size);
    run("qemu-img", &args);
    qemu_io(&img, fill);
    let want = qemu_contents(&img);
    let q = open(
        &h,
        tag,
        &img,
        OpenOptions {
            read_only: true,
            ..opts()
        },
    )
    .expect("open");
    let b: Arc<dyn Bdev> = q;
    assert_eq!(b.size(), want.len() as u64);
    // Owner reactor, and the other reactor (forwarded), with different request sizes.
    let got0 = read_all(&h, 0, &b, 128 << 10);
    assert!(
        got0 == want,
        "{tag}: contents differ from qemu-img's (owner reactor)"
    );
    let got1 = read_all(&h, 1, &b, 12 << 10);
    assert!(
        got1 == want,
        "{tag}: contents differ from qemu-img's (forwarded)"
    );
}

const FILL: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 100k 3k",
    "write -P 0x33 1m 1m",
    "write -z 1200k 128k",
    "write -P 0x44 5000k 17k",
    "discard 1500k 64k",
    "write -P 0x55 8380416 8192",
];

#[test]
fn default_v3() {
    check_same("v3", &[], "8M", FILL);
}

#[test]
fn version2() {
    check_same("v2", &["-o", "compat=0.10"], "8M", &FILL[..3]);
}

#[test]
fn cluster_sizes() {
    for cs in ["512", "4096", "2M"] {
        check_same(
            &format!("cs{cs}"),
            &["-o", &format!("cluster_size={cs}")],
            "8M",
            FILL,
        );
    }
}

#[test]
fn refcount_widths() {
    for bits in ["1", "2", "8", "32", "64"] {
        check_same(
            &format!("rc{bits}"),
            &["-o", &format!("refcount_bits={bits},cluster_size=4096")],
            "8M",
            FILL,
        );
    }
}

#[test]
fn compressed_zlib_and_zstd() {
    for ct in ["zlib", "zstd"] {
        let rt = runtime(1);
        let h = rt.handle();
        let d = scratch(&format!("z{ct}"));
        let src = d.join("src.qcow2");
        qemu_img_create(&src, "4M", &[]);
        qemu_io(
            &src,
            &[
                "write -P 0x61 0 1m",
                "write -P 0x62 1500k 300k",
                "write -P 0x63 3m 4k",
            ],
        );
        let img = d.join("c.qcow2");
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ct}"),
                src.to_str().unwrap(),
                img.to_str().unwrap(),
            ],
        );
        let info = run("qemu-img", &["info", img.to_str().unwrap()]);
        assert!(info.contains(&format!("compression type: {ct}")), "{info}");
        let want = qemu_contents(&img);
        let q = open(
            &h,
            "c",
            &img,
            OpenOptions {
                read_only: true,
                ..opts()
            },
        )
        .expect("open");
        let b: Arc<dyn Bdev> = q;
        assert!(
            read_all(&h, 0, &b, 64 << 10) == want,
            "{ct}: compressed contents differ"
        );
    }
}

#[test]
fn backing_chain_relative_names_and_short_backing() {
    let rt = runtime(1);
    let h = rt.handle();
    let d = scratch("chain");
    let raw = d.join("base.raw");
    std::fs::write(&raw, vec![0x5au8; 3 << 20]).unwrap();
    let mid = d.join("mid.qcow2");
    qemu_img_create(&mid, "6M", &["-b", "base.raw", "-F", "raw"]);
    qemu_io(&mid, &["write -P 0x01 1m 64k", "write -z 2m 64k"]);
    let top = d.join("top.qcow2");
    qemu_img_create(&top, "8M", &["-b", "mid.qcow2", "-F", "qcow2"]);
    qemu_io(&top, &["write -P 0x02 1056k 4k", "write -P 0x03 7m 8k"]);
    let want = qemu_contents(&top);
    let q = open(
        &h,
        "top",
        &top,
        OpenOptions {
            read_only: true,
            ..opts()
        },
    )
    .expect("open");
    assert_eq!(q.backing_file().as_deref(), Some("mid.qcow2"));
    let mid_b = q.backing().expect("backing");
    assert_eq!(mid_b.size(), 6 << 20);
    let b: Arc<dyn Bdev> = q;
    assert!(
        read_all(&h, 0, &b, 96 << 10) == want,
        "chain contents differ"
    );
}

#[test]
fn backing_loop_is_an_error() {
    let rt = runtime(1);
    let h = rt.handle();
    let d = scratch("loop");
    let a = d.join("a.qcow2");
    let b = d.join("b.qcow2");
    qemu_img_create(&a, "1M", &[]);
    qemu_img_create(&b, "1M", &["-b", "a.qcow2", "-F", "qcow2"]);
    // Point a at b without qemu-img's own loop check.
    run(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            a.to_str().unwrap(),
        ],
    );
    let e = open(
        &h,
        "b",
        &b,
        OpenOptions {
            read_only: true,
            ..opts()
        },
    )
    .err()
    .expect("loop must fail");
    assert!(e.to_string().contains("loop"), "{e}");
}
