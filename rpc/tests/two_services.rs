//! Two services in one process: each has its own NBD server, driven through
//! its own method table calls (the same export id on both), and a real
//! client (`nbdinfo`) sees each server's exports only. (With a process-wide
//! NBD server the second `nbd-server-start` fails: "NBD server already
//! running".)

use reactor::{CoreSet, Runtime, RuntimeConfig};
use rpc::{Params, RpcError, Service};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn tmpdir(tag: &str) -> PathBuf {
    let p = PathBuf::from(format!("/tmp/sl-2svc-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).expect("temp dir");
    p
}

fn service(rt: &Runtime, dir: &Path) -> Arc<Service> {
    let (tx, _rx) = std::sync::mpsc::channel();
    let svc = Service::new(rt.handle(), dir.to_path_buf(), tx);
    let _ = svc.table.set(Arc::new(rpc::methods::build_table()));
    svc
}

fn call(svc: &Arc<Service>, method: &str, params: Value) -> Result<Value, RpcError> {
    svc.table().call(svc, method, Params(Some(params)), true)
}

fn must(svc: &Arc<Service>, method: &str, params: Value) -> Value {
    call(svc, method, params.clone())
        .unwrap_or_else(|e| panic!("{method} {params}: {} ({})", e.message, e.code))
}

/// `nbdinfo --size` of export `name` on the server at `sock`.
fn nbd_size(sock: &Path, name: &str) -> u64 {
    let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
    let out = Command::new("nbdinfo")
        .args(["--size", &uri])
        .output()
        .expect("run nbdinfo");
    let so = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        panic!(
            "nbdinfo --size {uri} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    so.trim()
        .parse()
        .unwrap_or_else(|e| panic!("nbdinfo --size {uri}: {so:?}: {e}"))
}

fn export_ids(svc: &Arc<Service>) -> Vec<(String, String)> {
    must(svc, "query-block-exports", json!({}))
        .as_array()
        .expect("an array")
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap_or_default().to_string(),
                e["node-name"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn two_services_have_their_own_nbd_servers() {
    let have_nbdinfo = Command::new("nbdinfo").arg("--version").output().is_ok();
    if !have_nbdinfo && std::env::var("CI").as_deref() == Ok("true") {
        panic!("nbdinfo missing under CI=true (apt-get install libnbd-bin)");
    }
    let mut cfg = RuntimeConfig::new(CoreSet::from_list("0").expect("cores"));
    cfg.pin = false;
    let rt = Runtime::start(cfg).expect("runtime");
    let dir = tmpdir("nbd");
    let (a, b) = (service(&rt, &dir.join("a")), service(&rt, &dir.join("b")));
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let (node_a, node_b) = ("twosvc_a", "twosvc_b");
    must(
        &a,
        "bdev_null_create",
        json!({"name": node_a, "num_blocks": 8192, "block_size": 512}),
    );
    must(
        &b,
        "bdev_null_create",
        json!({"name": node_b, "num_blocks": 16384, "block_size": 512}),
    );
    let start = |sock: &Path| json!({"addr": {"type": "unix", "path": sock}});
    must(&a, "nbd-server-start", start(&sock_a));
    // The second service's server is its own: it starts too.
    must(&b, "nbd-server-start", start(&sock_b));
    // The same export id on both: each server has its own table of exports.
    must(
        &a,
        "block-export-add",
        json!({"type": "nbd", "id": "disk", "node-name": node_a}),
    );
    must(
        &b,
        "block-export-add",
        json!({"type": "nbd", "id": "disk", "node-name": node_b}),
    );
    assert_eq!(export_ids(&a), vec![("disk".into(), node_a.into())]);
    assert_eq!(export_ids(&b), vec![("disk".into(), node_b.into())]);
    if have_nbdinfo {
        assert_eq!(nbd_size(&sock_a, node_a), 8192 * 512);
        assert_eq!(nbd_size(&sock_b, node_b), 16384 * 512);
    } else {
        eprintln!("nbdinfo missing (apt-get install libnbd-bin); skipping the client checks");
    }
    // Stopping one leaves the other serving.
    must(&b, "nbd-server-stop", json!({}));
    assert!(export_ids(&b).is_empty());
    let again = call(&b, "nbd-server-stop", json!({})).expect_err("stopped twice");
    assert!(again.message.contains("not running"), "{}", again.message);
    assert_eq!(export_ids(&a), vec![("disk".into(), node_a.into())]);
    if have_nbdinfo {
        assert_eq!(nbd_size(&sock_a, node_a), 8192 * 512);
    }
    must(&a, "nbd-server-stop", json!({}));
    // Exports close once their connections are gone; then the bdevs go.
    let t0 = std::time::Instant::now();
    for (svc, node, method) in [
        (&a, node_a, "bdev_null_delete"),
        (&b, node_b, "bdev_null_delete"),
    ] {
        loop {
            match call(svc, method, json!({"name": node})) {
                Ok(_) => break,
                Err(_) if t0.elapsed().as_secs() < 10 => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{method} {node}: {}", e.message),
            }
        }
    }
    drop((a, b));
    rt.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
