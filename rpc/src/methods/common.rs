//! Helpers the handlers share (a handler file imports these, never another
//! handler file): adding and removing bdevs with their `bdev_register` /
//! `bdev_unregister` notifications, and the delete methods' `{"name"}`
//! parameters.
//!
//! Bdevs are added and removed through the service's graph
//! ([`graph::Graph::register`], [`graph::Graph::delete`]), which publishes the
//! notifications; [`register_bdev`] and [`delete_bdev`] are its RPC-typed form.

use crate::error::RpcError;
use crate::service::Service;
use bdev::Bdev;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

/// `bdev_register` / `bdev_unregister` (`ctx`: the bdev's name), published
/// by the graph alone ([`graph::Graph::register`], [`graph::Graph::delete`]).
pub use graph::{BDEV_REGISTER, BDEV_UNREGISTER};

/// Adds a bdev to the registry and publishes `bdev_register`; returns its name.
pub fn register_bdev(svc: &Service, b: Arc<dyn Bdev>) -> Result<String, RpcError> {
    Ok(svc.graph.register(b)?)
}

/// Deletes a bdev (it must not be claimed) and publishes `bdev_unregister`.
pub fn delete_bdev(svc: &Service, name: &str) -> Result<(), RpcError> {
    Ok(svc.graph.delete(name)?)
}

/// Deletes `name` if it is a `T` (SPDK answers -ENODEV for a bdev of another module).
pub fn delete_typed<T: 'static>(svc: &Service, name: &str, kind: &str) -> Result<Value, RpcError> {
    let _g = svc.graph.change();
    let b = svc.graph.nodes().get(name)?;
    if !b.as_any().is::<T>() {
        return Err(RpcError::errno(
            libc::ENODEV,
            format!("bdev {name:?} is not a {kind} bdev"),
        ));
    }
    delete_bdev(svc, name)?;
    Ok(Value::Bool(true))
}

/// `{"name"}`: the delete methods' parameters.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ByName {
    pub name: String,
}

/// SPDK's `assigned_rate_limits` of a bdev (zeros when it has none).
pub fn spdk_rate_limits(svc: &Service, name: &str) -> Value {
    use bdev::throttle::BucketKind as K;
    let c = svc
        .graph
        .nodes()
        .throttles()
        .of(name)
        .map(|g| g.config())
        .unwrap_or_default();
    serde_json::json!({
        "rw_ios_per_sec": c.get(K::OpsTotal).avg,
        "rw_mbytes_per_sec": c.get(K::BpsTotal).avg >> 20,
        "r_mbytes_per_sec": c.get(K::BpsRead).avg >> 20,
        "w_mbytes_per_sec": c.get(K::BpsWrite).avg >> 20,
    })
}

/// Sets QEMU's I/O limit members of a device's `inserted` (`query-block`):
/// the six rates always, bursts, `iops_size` and `group` while limited.
pub fn qemu_io_limits(svc: &Service, device: &str, v: &mut Value) {
    use bdev::throttle::BucketKind;
    let Some(g) = svc.graph.nodes().throttles().of(device) else {
        return;
    };
    let c = g.config();
    for k in BucketKind::ALL {
        let b = c.get(k);
        let n = k.qemu_name();
        v[n] = serde_json::json!(b.avg);
        if b.max != 0 {
            v[format!("{n}_max")] = serde_json::json!(b.max);
            v[format!("{n}_max_length")] = serde_json::json!(b.burst_length);
        }
    }
    if c.op_size != 0 {
        v["iops_size"] = serde_json::json!(c.op_size);
    }
    v["group"] = serde_json::json!(g.name());
}

/// sluice's `x-throttle-group` on a job command: the group object taken for
/// the job (QEMU's words when there is none).
pub fn shared_limit(
    svc: &Service,
    name: Option<String>,
) -> Result<Option<Arc<bdev::throttle::GroupUse>>, RpcError> {
    let Some(g) = name else {
        return Ok(None);
    };
    bdev::throttle::GroupUse::new(svc.graph.nodes(), &g)
        .map(|u| Some(Arc::new(u)))
        .ok_or_else(|| RpcError::invalid_params(format!("Throttle group '{g}' does not exist")))
}
