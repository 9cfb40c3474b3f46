//! `throttle-group` objects (QEMU's `object-add qom-type: throttle-group`):
//! the `limits` object and the `x-*` properties (the latter winning, as in
//! QEMU) read into a `bdev::throttle::ThrottleConfig` checked with QEMU's
//! rules; the groups live in the graph's throttle table, where devices,
//! throttle nodes and jobs look them up. The one `object-add` /
//! `object-del` (`methods/objects.rs`) calls these for this type; ids share
//! one namespace with the other objects.

use crate::error::RpcError;
use crate::service::Service;
use bdev::throttle::{BucketKind, ThrottleConfig, ThrottleGroup};
use serde_json::{Map, Value};
use std::sync::Arc;

/// Whether a throttle group `id` exists.
pub fn exists(svc: &Service, id: &str) -> bool {
    svc.graph.nodes().throttles().has_object(id)
}

/// Adds the group `id` with the properties left in `m` (`qom-type` and `id`
/// already taken out).
pub fn add(svc: &Service, id: &str, mut m: Map<String, Value>) -> Result<(), RpcError> {
    let mut cfg = ThrottleConfig::default();
    if let Some(l) = m.remove("limits") {
        let Value::Object(l) = l else {
            return Err(RpcError::invalid_params(
                "Invalid parameter type for 'limits', expected: object",
            ));
        };
        for (k, v) in &l {
            set_property(&mut cfg, k, v, &format!("limits.{k}"))?;
        }
    }
    for (k, v) in &m {
        let name = k
            .strip_prefix("x-")
            .ok_or_else(|| RpcError::invalid_params(format!("Parameter '{k}' is unexpected")))?;
        set_property(&mut cfg, name, v, k)?;
    }
    cfg.check().map_err(RpcError::invalid_params)?;
    let table = svc.graph.nodes().throttles();
    if !table.add_object(Arc::new(ThrottleGroup::new(id, cfg))) {
        return Err(RpcError::invalid_params(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        )));
    }
    Ok(())
}

/// Deletes the group `id`; `None` when there is no such group.
pub fn del(svc: &Service, id: &str) -> Option<Result<(), RpcError>> {
    let _g = svc.graph.change();
    match svc.graph.nodes().throttles().remove_object(id) {
        Ok(()) => Some(Ok(())),
        Err(true) => Some(Err(RpcError::invalid_params(format!(
            "object '{id}' is in use, can not be deleted"
        )))),
        Err(false) => None,
    }
}

/// The `limits` / `x-*` property names, with the bucket and field each sets.
fn property(name: &str) -> Option<(Option<BucketKind>, u8)> {
    if name == "iops-size" {
        return Some((None, 0));
    }
    let kinds = [
        ("iops-total", BucketKind::OpsTotal),
        ("iops-read", BucketKind::OpsRead),
        ("iops-write", BucketKind::OpsWrite),
        ("bps-total", BucketKind::BpsTotal),
        ("bps-read", BucketKind::BpsRead),
        ("bps-write", BucketKind::BpsWrite),
    ];
    kinds.iter().find_map(|(base, k)| {
        let rest = name.strip_prefix(base)?;
        match rest {
            "" => Some((Some(*k), 0)),
            "-max" => Some((Some(*k), 1)),
            "-max-length" => Some((Some(*k), 2)),
            _ => None,
        }
    })
}

/// Sets one property; `path` names it in errors.
fn set_property(
    cfg: &mut ThrottleConfig,
    name: &str,
    v: &Value,
    path: &str,
) -> Result<(), RpcError> {
    let (k, field) = property(name)
        .ok_or_else(|| RpcError::invalid_params(format!("Parameter '{path}' is unexpected")))?;
    let n = v
        .as_i64()
        .map(|x| x as u64)
        .or_else(|| v.as_u64())
        .ok_or_else(|| {
            RpcError::invalid_params(format!(
                "Invalid parameter type for '{path}', expected: integer"
            ))
        })?;
    match k {
        None => cfg.op_size = n,
        Some(k) => {
            let b = cfg.get_mut(k);
            match field {
                0 => b.avg = n,
                1 => b.max = n,
                _ => b.burst_length = n,
            }
        }
    }
    Ok(())
}

/// QEMU's `id_wellformed`.
pub fn id_wellformed(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|x| x.is_ascii_alphanumeric() || "-._".contains(x))
}
