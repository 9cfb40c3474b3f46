//! Two services in one process: each handler reaches its state through the
//! `Service` it is given (the graph, the monitor's records, the event bus),
//! so the same node names live side by side and one service's changes are
//! invisible to the other.

use reactor::{CoreSet, Runtime, RuntimeConfig};
use rpc::{MethodTable, Params, Service};
use serde_json::{json, Value};
use std::sync::Arc;

fn service(rt: &Runtime, tag: &str) -> Arc<Service> {
    let (tx, _rx) = std::sync::mpsc::channel();
    let dir =
        std::env::temp_dir().join(format!("sluice-two-services-{tag}-{}", std::process::id()));
    let svc = Service::new(rt.handle(), dir, tx);
    let _ = svc.table.set(Arc::new(rpc::methods::build_table()));
    svc
}

fn call(svc: &Service, method: &str, params: Value) -> Result<Value, rpc::RpcError> {
    let t: Arc<MethodTable> = svc.table();
    t.call(svc, method, Params(Some(params)), true)
}

fn names(svc: &Service) -> Vec<String> {
    call(svc, "bdev_get_bdevs", json!({}))
        .expect("bdev_get_bdevs")
        .as_array()
        .expect("an array")
        .iter()
        .map(|b| b["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn two_services_keep_their_own_nodes_records_and_notifications() {
    let rt = Runtime::start(RuntimeConfig {
        pin: false,
        ..RuntimeConfig::new(CoreSet::from_list("0").unwrap())
    })
    .unwrap();
    let (a, b) = (service(&rt, "a"), service(&rt, "b"));
    for s in [&a, &b] {
        call(
            s,
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "n0", "size": 1048576}),
        )
        .expect("blockdev-add in each service");
    }
    call(
        &a,
        "bdev_malloc_create",
        json!({"name": "m0", "num_blocks": 8, "block_size": 512}),
    )
    .expect("malloc in a");
    assert_eq!(names(&a), vec!["m0".to_string(), "n0".to_string()]);
    assert_eq!(names(&b), vec!["n0".to_string()]);
    call(&a, "blockdev-del", json!({"node-name": "n0"})).expect("blockdev-del in a");
    assert_eq!(names(&a), vec!["m0".to_string()]);
    assert_eq!(names(&b), vec!["n0".to_string()], "a's delete reached b");
    // b still knows n0 as the monitor's node, with the options it was given.
    let nodes = call(&b, "query-named-block-nodes", Value::Null).expect("query");
    assert_eq!(nodes[0]["node-name"], "n0", "{nodes}");
    assert_eq!(nodes[0]["drv"], "null-co", "{nodes}");
    let e = call(&a, "blockdev-del", json!({"node-name": "n0"})).unwrap_err();
    assert!(e.message.contains("n0"), "{}", e.message);
    let kinds = |s: &Service| -> Vec<(String, String)> {
        call(s, "notify_get_notifications", json!({}))
            .expect("notifications")
            .as_array()
            .expect("an array")
            .iter()
            .map(|n| {
                (
                    n["type"].as_str().unwrap().into(),
                    n["ctx"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    let ev = |t: &str, n: &str| (t.to_string(), n.to_string());
    assert_eq!(
        kinds(&a),
        vec![
            ev("bdev_register", "n0"),
            ev("bdev_register", "m0"),
            ev("bdev_unregister", "n0")
        ]
    );
    assert_eq!(kinds(&b), vec![ev("bdev_register", "n0")]);
}
