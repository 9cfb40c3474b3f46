//! `save_config` also restores qcow2 devices: a restart with `--json` reopens the
//! device over its top image with the chain from the headers, and the data is there.

use serde_json::{json, Value};
use sluice_tests::{qemu_img, qemu_io, Daemon, TempDir};

fn device_chain(d: &mut Daemon, device: &str) -> Vec<String> {
    let blocks = d.call("query-block", Value::Null);
    let dev = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["device"] == device)
        .unwrap_or_else(|| panic!("{device} not in query-block: {blocks}"))
        .clone();
    let mut names = Vec::new();
    let mut img = dev["inserted"]["image"].clone();
    while img.is_object() {
        names.push(img["filename"].as_str().unwrap_or_default().to_string());
        img = img["backing-image"].clone();
    }
    names
}

#[test]
fn qcow2_devices_survive_save_config_and_a_restart() {
    let work = TempDir::new("cfgq");
    let base = work.join("base.qcow2");
    let top = work.join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", b, "8M"]);
    qemu_io(&["-c", "write -P 0x5a 0 1M", b]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t]);
    let cfg = work.join("sluice.json");

    let mut d = Daemon::start(&[]);
    d.call(
        "bdev_qcow2_open",
        json!({"name": "vm0", "filename": t, "direct": false}),
    );
    let chain_before = device_chain(&mut d, "vm0");
    assert_eq!(chain_before.len(), 2, "{chain_before:?}");
    d.call("save_config", json!({"filename": cfg.to_str().unwrap()}));
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    let entries = saved["subsystems"][0]["config"].as_array().unwrap();
    let opens: Vec<&Value> = entries
        .iter()
        .filter(|e| e["method"] == "bdev_qcow2_open")
        .collect();
    assert_eq!(
        opens.len(),
        1,
        "exactly the device is saved, its chain comes from the headers: {entries:?}"
    );
    assert_eq!(opens[0]["params"]["name"], "vm0");
    assert_eq!(d.stop(), Some(0));

    let mut d = Daemon::start(&["--json", cfg.to_str().unwrap()]);
    assert_eq!(device_chain(&mut d, "vm0"), chain_before);
    let again = d.call("save_config", Value::Null);
    assert_eq!(again, saved, "a second save_config is identical");
    assert_eq!(d.stop(), Some(0));
    // Nothing was lost or damaged across the two daemons.
    qemu_img(&["check", "-q", t]);
    qemu_io(&["-c", "read -P 0x5a 0 1M", t]);
}

/// A backing node opened over another bdev (here an error injector over the
/// base's file) is saved with the device naming it: the restart opens the
/// same graph instead of the header's file a second time (which failed on
/// the image lock the base's file bdev holds).
#[test]
fn a_backing_node_over_another_bdev_survives_save_config_and_a_restart() {
    let work = TempDir::new("cfgee");
    let base = work.join("base.qcow2");
    let top = work.join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", b, "8M"]);
    qemu_io(&["-c", "write -P 0x5a 0 1M", b]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t]);
    let cfg = work.join("sluice.json");
    let mut d = Daemon::start(&[]);
    d.call("bdev_uring_create", json!({"name": "bf0", "filename": b}));
    d.call("bdev_error_create", json!({"base_name": "bf0"}));
    d.call(
        "bdev_qcow2_open",
        json!({"node_name": "base0", "base_bdev": "EE_bf0"}),
    );
    d.call(
        "bdev_qcow2_open",
        json!({"name": "vm0", "node_name": "top0", "filename": t, "backing": "base0"}),
    );
    d.call("save_config", json!({"filename": cfg.to_str().unwrap()}));
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    assert_eq!(d.stop(), Some(0));
    let mut d = Daemon::start(&["--json", cfg.to_str().unwrap()]);
    let b0 = d.call("bdev_get_bdevs", json!({"name": "base0"}));
    assert_eq!(
        b0[0]["driver_specific"]["qcow2"]["base_bdev"], "EE_bf0",
        "{b0}"
    );
    let v = d.call("bdev_get_bdevs", json!({"name": "top0"}));
    assert_eq!(
        v[0]["driver_specific"]["qcow2"]["backing_bdev"], "base0",
        "{v}"
    );
    assert_eq!(d.call("save_config", Value::Null), saved);
    assert_eq!(d.stop(), Some(0));
    qemu_io(&["-c", "read -P 0x5a 0 1M", t]);
}
