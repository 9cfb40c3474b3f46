//! qcow2 cache options through the real binary: QEMU's rules and words on
//! `blockdev-add` (QSD side by side, `tests/py/qcow2_cache.py`), the cap
//! they set, and `cache-clean-interval` freeing idle L2 tables (the cache
//! stat in `bdev_get_bdevs` drops to nothing after reads filled it).

mod nbd_common;

use nbd_common::*;
use serde_json::{json, Value};
use sluice_tests::{qemu_img, qemu_io, Daemon, TempDir};

#[test]
fn cache_options_match_qsd() {
    let d = Daemon::start(&[]);
    println!("{}", d.run_case("qcow2_cache.py", "qsd"));
}

fn cache(d: &mut Daemon, node: &str) -> Value {
    d.call("bdev_get_bdevs", json!({"name": node}))[0]["driver_specific"]["qcow2"]["cache"].clone()
}

/// Eight L2 tables read through an NBD export fill the cache (capped by
/// `l2-cache-size`); with `cache-clean-interval: 1` they are freed once idle
/// for a whole interval, and the data still reads right afterwards.
#[test]
fn cache_clean_interval_frees_idle_tables() {
    let dir = TempDir::new("cc");
    let img = dir.join("big.qcow2");
    let img = img.to_str().unwrap();
    qemu_img(&["create", "-f", "qcow2", img, "8G"]);
    // One cluster written in each 512 MiB (one L2 table apiece).
    let writes: Vec<String> = (0..16u64)
        .flat_map(|i| {
            [
                "-c".to_string(),
                format!("write -P {} {}M 64k", 0x20 + i, i * 512),
            ]
        })
        .collect();
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    args.extend(writes.iter().map(String::as_str));
    args.push(img);
    qemu_io(&args);
    let mut n = NbdDaemon::start(&["-m", "0x1"], &[]);
    n.d.call(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "l2-cache-size": 8 << 16,
               "cache-clean-interval": 1,
               "file": {"driver": "file", "filename": img}}),
    );
    n.export("q", false);
    let c = cache(&mut n.d, "q");
    assert_eq!(c["l2_max_bytes"], 8 << 16, "{c}");
    let reads: Vec<String> = (0..16u64)
        .flat_map(|i| {
            [
                "-c".to_string(),
                format!("read -P {} {}M 64k", 0x20 + i, i * 512),
            ]
        })
        .collect();
    let uri = n.uri("q");
    let mut args: Vec<&str> = vec!["-r", "-f", "raw"];
    args.extend(reads.iter().map(String::as_str));
    args.push(&uri);
    let out = qemu_io(&args);
    assert!(!out.contains("fail"), "{out}");
    let c = cache(&mut n.d, "q");
    // Sixteen tables read, eight kept (the cap); possibly some freed already.
    let held = c["l2_bytes"].as_u64().unwrap();
    assert!(held <= 8 << 16, "over the cap: {c}");
    let t0 = std::time::Instant::now();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let c = cache(&mut n.d, "q");
        if c["l2_bytes"] == 0 && c["cleaned_entries"].as_u64().unwrap() >= 1 {
            break;
        }
        assert!(t0.elapsed().as_secs() < 10, "idle tables never freed: {c}");
    }
    let out = qemu_io(&args);
    assert!(!out.contains("fail"), "{out}");
}
