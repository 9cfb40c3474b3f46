//! `save_config` writes exactly what `serve --json` replays: a restart restores
//! every bdev; a bad config stops start-up with a message that names the entry.

use serde_json::{json, Value};
use sluice_tests::{sluice_bin, Daemon, TempDir};
use std::process::Command;

/// The fields a restart must preserve, by bdev name.
fn summary(d: &mut Daemon) -> Vec<Value> {
    let bdevs = d.call("bdev_get_bdevs", Value::Null);
    bdevs
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            json!({
                "name": b["name"], "uuid": b["uuid"], "block_size": b["block_size"],
                "num_blocks": b["num_blocks"], "product_name": b["product_name"], "claimed": b["claimed"],
            })
        })
        .collect()
}

#[test]
fn config_round_trip_through_save_config_and_a_restart() {
    let work = TempDir::new("cfg");
    let img = work.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let cfg = work.join("sluice.json");

    let mut d = Daemon::start(&[]);
    d.call("bdev_malloc_create", json!({"name": "M0", "num_blocks": 512, "block_size": 512, "uuid": "11111111-2222-4333-8444-555555555555"}));
    d.call(
        "bdev_malloc_create",
        json!({"num_blocks": 64, "block_size": 4096}),
    );
    d.call(
        "bdev_null_create",
        json!({"name": "N0", "num_blocks": 1 << 20, "block_size": 4096}),
    );
    d.call(
        "bdev_aio_create",
        json!({"name": "F0", "filename": img.to_str().unwrap()}),
    );
    d.call("bdev_error_create", json!({"base_name": "M0"}));
    // The error bdev is created on a base whose name sorts after it: order comes from claims, not names.
    d.call(
        "bdev_null_create",
        json!({"name": "ZZ", "num_blocks": 8, "block_size": 512}),
    );
    d.call("bdev_error_create", json!({"base_name": "ZZ"}));
    let before = summary(&mut d);
    assert_eq!(before.len(), 7);
    let saved = d.call("save_config", json!({"filename": cfg.to_str().unwrap()}));
    let on_disk: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    assert_eq!(saved, on_disk, "the file holds what save_config returned");
    let entries = on_disk["subsystems"][0]["config"].as_array().unwrap();
    let pos = |m: &str, key: &str, v: &str| {
        entries
            .iter()
            .position(|e| e["method"] == m && e["params"][key] == v)
            .unwrap()
    };
    assert!(
        pos("bdev_null_create", "name", "ZZ") < pos("bdev_error_create", "base_name", "ZZ"),
        "base after its user: {on_disk}"
    );
    assert!(pos("bdev_malloc_create", "name", "M0") < pos("bdev_error_create", "base_name", "M0"));
    assert_eq!(d.stop(), Some(0));

    let mut d = Daemon::start(&["--json", cfg.to_str().unwrap()]);
    // Everything exists as soon as the RPC socket accepts.
    assert_eq!(summary(&mut d), before);
    let again = d.call("save_config", Value::Null);
    assert_eq!(again, saved, "save_config after a restart differs");
    // The restored bdevs work: the error bdev still claims its base.
    assert_eq!(
        d.call_err("bdev_malloc_delete", json!({"name": "M0"}))["code"],
        -16
    );
}

#[test]
fn spdk_config_with_batches_and_examine_replays() {
    let work = TempDir::new("cfgspdk");
    let cfg = work.join("spdk.json");
    let text = json!({"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 32, "block_size": 512}},
            [
                {"method": "bdev_null_create", "params": {"name": "Null0", "num_blocks": 32, "block_size": 512}},
                {"method": "bdev_null_create", "params": {"name": "Null1", "num_blocks": 32, "block_size": 512}}
            ],
            {"method": "bdev_wait_for_examine"}
        ]},
        {"subsystem": "nbd", "config": null}
    ]});
    std::fs::write(&cfg, serde_json::to_string_pretty(&text).unwrap()).unwrap();
    let mut d = Daemon::start(&["--json", cfg.to_str().unwrap()]);
    let names: Vec<String> = d
        .call("bdev_get_bdevs", Value::Null)
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["Malloc0", "Null0", "Null1"]);
}

#[test]
fn a_bad_config_stops_start_up_with_a_clear_message() {
    let work = TempDir::new("cfgbad");
    for (cfg, want) in [
        (json!({"subsystems": [{"subsystem": "bdev", "config": [
            {"method": "bdev_null_create", "params": {"name": "N", "num_blocks": 8, "block_size": 512}},
            {"method": "bdev_frobnicate", "params": {}}]}]}).to_string(), "entry 1 (bdev_frobnicate)"),
        (json!({"subsystems": [{"subsystem": "bdev", "config": [
            {"method": "bdev_null_create", "params": {"name": "N", "num_blocks": "x", "block_size": 512}}]}]}).to_string(), "num_blocks"),
        ("{\"subsystems\": [".to_string(), "not valid JSON"),
        (json!({"bdevs": []}).to_string(), "subsystems"),
    ] {
        let path = work.join("bad.json");
        std::fs::write(&path, &cfg).unwrap();
        let out = Command::new(sluice_bin())
            .args(["serve", "--no-pin", "-m", "0x1", "--runtime-dir"])
            .arg(&work.0)
            .arg("--json")
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{cfg} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "for {cfg}: stderr lacks {want:?}: {err}");
        assert!(!work.join("sluice.sock").exists(), "socket left behind");
        assert!(!work.join("sluice.pid").exists(), "pid file left behind");
    }
    let missing = Command::new(sluice_bin())
        .args(["serve", "--no-pin", "-m", "0x1", "--runtime-dir"])
        .arg(&work.0)
        .args(["--json", "/nonexistent/sluice.json"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/sluice.json"));
}

/// `save_config filename=X` with X a character device, a FIFO, a symlink or a
/// directory is refused with a message naming X and what it is, and leaves X
/// (and a symlink's target) as it was; a regular file is replaced atomically
/// (no temporary file left behind) and keeps its permissions, and what it
/// holds replays.
#[test]
fn save_config_refuses_a_target_that_is_not_a_regular_file() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let work = TempDir::new("cfgtarget");
    let mut d = Daemon::start(&[]);
    d.call(
        "bdev_malloc_create",
        json!({"name": "M0", "num_blocks": 64, "block_size": 512}),
    );

    let chr = work.join("null-like");
    let mknod = Command::new("mknod")
        .arg(&chr)
        .args(["c", "1", "3"])
        .output()
        .unwrap();
    assert!(
        mknod.status.success(),
        "mknod (the tests run as root): {}",
        String::from_utf8_lossy(&mknod.stderr)
    );
    let fifo = work.join("fifo");
    let mk = Command::new("mkfifo").arg(&fifo).output().unwrap();
    assert!(mk.status.success());
    let target = work.join("precious.txt");
    std::fs::write(&target, "keep me\n").unwrap();
    let link = work.join("link.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let dir = work.join("adir");
    std::fs::create_dir(&dir).unwrap();

    for (path, kind) in [
        (&chr, "a character device"),
        (&fifo, "a FIFO"),
        (&link, "a symbolic link"),
        (&dir, "a directory"),
    ] {
        let e = d.call_err("save_config", json!({"filename": path.to_str().unwrap()}));
        let msg = e["message"].as_str().unwrap();
        assert_eq!(e["code"], -32602, "{e}");
        assert!(
            msg.contains(path.to_str().unwrap()) && msg.contains(kind),
            "message should name {} and {kind:?}: {msg}",
            path.display()
        );
    }
    let md = std::fs::symlink_metadata(&chr).unwrap();
    assert!(
        md.file_type().is_char_device(),
        "the device node was replaced"
    );
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me\n");
    assert!(std::fs::symlink_metadata(&dir).unwrap().is_dir());

    // A regular file is replaced; its mode stays; nothing else is left behind.
    let cfg = work.join("sluice.json");
    std::fs::write(&cfg, "old").unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let saved = d.call("save_config", json!({"filename": cfg.to_str().unwrap()}));
    let on_disk: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    assert_eq!(saved, on_disk);
    assert_eq!(
        std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let mut names: Vec<String> = std::fs::read_dir(&work.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "adir",
            "fifo",
            "link.json",
            "null-like",
            "precious.txt",
            "sluice.json"
        ]
    );
    assert_eq!(d.stop(), Some(0));
    let mut d = Daemon::start(&["--json", cfg.to_str().unwrap()]);
    assert_eq!(d.call("save_config", Value::Null), saved);
}
