//! `sluice rpc`: prints the result as JSON; on an error, exits non-zero with the
//! message on stderr.

use serde_json::{json, Value};
use sluice_tests::{sluice_bin, Daemon, TempDir};
use std::process::Command;

fn stdout_json(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn calls_print_json_and_errors_exit_non_zero() {
    let d = Daemon::start(&[]);
    let v = stdout_json(&d.cli(&["spdk_get_version"]));
    assert!(v["version"].as_str().unwrap().starts_with("sluice v"));

    // key=value: numbers and booleans are JSON, the rest strings.
    let v = stdout_json(&d.cli(&[
        "bdev_malloc_create",
        "name=M0",
        "num_blocks=64",
        "block_size=512",
    ]));
    assert_eq!(v, json!("M0"));
    // --params, merged under key=value.
    let v = stdout_json(&d.cli(&[
        "bdev_null_create",
        "--params",
        r#"{"name": "N0", "num_blocks": 8, "block_size": 4096}"#,
        "num_blocks=16",
    ]));
    assert_eq!(v, json!("N0"));
    let v = stdout_json(&d.cli(&["bdev_get_bdevs", "name=N0"]));
    assert_eq!(v[0]["num_blocks"], 16);
    assert_eq!(v[0]["block_size"], 4096);

    let out = d.cli(&[
        "bdev_malloc_create",
        "name=M0",
        "num_blocks=64",
        "block_size=512",
    ]);
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "stdout on error: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already exists") && err.contains("-17"),
        "{err}"
    );

    let out = d.cli(&["no_such_method"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("-32601"));

    let out = d.cli(&["bdev_get_bdevs", "novalue"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEY=VALUE"));
}

#[test]
fn unreachable_server_is_a_clear_error() {
    let dir = TempDir::new("cli");
    let sock = dir.join("none.sock");
    let out = Command::new(sluice_bin())
        .arg("rpc")
        .arg("-s")
        .arg(&sock)
        .arg("spdk_get_version")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect") && err.contains("none.sock"),
        "{err}"
    );
}
