//! The Graph is a value, not a process-wide registry: two services' graphs
//! live side by side in one process, each with its own nodes, claims and
//! notifications; register and delete are the only places that announce.

use bdev::null::NullBdev;
use bdev::{BdevError, Claim, Holder, Perm};
use graph::events::EventBus;
use graph::{Graph, BDEV_REGISTER, BDEV_UNREGISTER};
use reactor::{CoreSet, Runtime, RuntimeConfig};

fn runtime() -> Runtime {
    Runtime::start(RuntimeConfig {
        pin: false,
        ..RuntimeConfig::new(CoreSet::from_list("0").unwrap())
    })
    .unwrap()
}

fn names(ev: &EventBus) -> Vec<(String, String)> {
    ev.since(0, usize::MAX)
        .into_iter()
        .map(|e| {
            (
                e.name,
                e.data["name"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn two_graphs_in_one_process_do_not_share_nodes() {
    let rt = runtime();
    let (ea, eb) = (EventBus::default(), EventBus::default());
    let a = Graph::new(rt.handle(), ea.clone());
    let b = Graph::new(rt.handle(), eb.clone());
    a.register(NullBdev::new("n0", 8, 512, None).unwrap())
        .unwrap();
    b.register(NullBdev::new("n0", 8, 512, None).unwrap())
        .unwrap();
    let ee = bdev::error_bdev::ErrorBdev::new(a.nodes(), "n0").unwrap();
    a.register(ee).unwrap();
    assert_eq!(a.nodes().claims("n0"), vec!["EE_n0".to_string()]);
    assert!(b.nodes().claims("n0").is_empty(), "a's claim leaked into b");
    // b's n0 is free; a's is claimed.
    b.delete("n0").unwrap();
    assert!(matches!(a.delete("n0"), Err(BdevError::Claimed { .. })));
    assert!(a.nodes().contains("n0") && !b.nodes().contains("n0"));
    a.delete("EE_n0").unwrap();
    a.delete("n0").unwrap();
    let reg = |n: &str| (BDEV_REGISTER.to_string(), n.to_string());
    let unreg = |n: &str| (BDEV_UNREGISTER.to_string(), n.to_string());
    // A refused delete announces nothing.
    assert_eq!(
        names(&ea),
        vec![reg("n0"), reg("EE_n0"), unreg("EE_n0"), unreg("n0")]
    );
    assert_eq!(names(&eb), vec![reg("n0"), unreg("n0")]);
}

#[test]
fn a_conflicting_claim_is_refused_in_qemus_words_and_recorded_nowhere() {
    let rt = runtime();
    let g = Graph::new(rt.handle(), EventBus::default());
    g.register(NullBdev::new("base", 8, 512, None).unwrap())
        .unwrap();
    g.nodes()
        .claim("base", Claim::backing(Holder::Node("top".into())))
        .unwrap();
    let resize = Claim {
        holder: Holder::Job("j0".into()),
        role: "root",
        perm: Perm::RESIZE,
        shared: Perm::ALL,
    };
    let Err(e) = g.nodes().claim("base", resize) else {
        panic!("a resize of a backing file was allowed");
    };
    assert!(matches!(e, BdevError::PermissionConflict(_)));
    assert_eq!(
        e.to_string(),
        "Conflicts with use by top as 'backing', which does not allow 'resize' on base"
    );
    // The other way round: a user that shares nothing but reads.
    let exclusive = Claim {
        holder: Holder::Node("x".into()),
        role: "file",
        perm: Perm::CONSISTENT_READ,
        shared: Perm::CONSISTENT_READ,
    };
    g.nodes()
        .claim("base", Claim::root(Holder::Device("d0".into()), true))
        .unwrap();
    let Err(e) = g.nodes().claim("base", exclusive) else {
        panic!("an exclusive reader was let in next to a writer");
    };
    assert_eq!(
        e.to_string(),
        "Conflicts with use by device d0 as 'root', which uses 'write' on base"
    );
    assert_eq!(
        g.nodes().claims("base"),
        vec!["top".to_string(), "device d0".to_string()]
    );
}
