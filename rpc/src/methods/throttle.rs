//! I/O limits in both dialects, over one engine (`bdev::throttle`):
//!
//! - SPDK's `bdev_set_qos_limit {name, rw_ios_per_sec, rw_mbytes_per_sec,
//!   r_mbytes_per_sec, w_mbytes_per_sec}`: limits of any bdev (a device,
//!   or a node: an NBD export of it goes through a hidden device, which
//!   applies them). SPDK's rules: a limit left out keeps its value, 0 lifts
//!   it, I/O limits are multiples of 1000, no limit at all is refused.
//!   Shown in `bdev_get_bdevs`' `assigned_rate_limits`.
//! - QEMU's `block_set_io_throttle`: limits of a device (sluice's devices are
//!   QEMU's named BlockBackends; a node without one is "not found", as in
//!   QEMU), QEMU's checks and words (`throttle_is_valid`, `qmp_get_blk`);
//!   `group` joins (or makes) a group; all zero lifts them. Shown in
//!   `query-block`'s `inserted` as QEMU shows them.
//! - Groups made with `object-add qom-type: throttle-group` (the one
//!   `object-add` is `methods/objects.rs`; the group's properties are read in
//!   `crate::objects::throttle`) are shared by devices
//!   (`block_set_io_throttle group`), throttle filter nodes
//!   (`blockdev-add driver: throttle`) and jobs (`x-throttle-group`).

use crate::error::{ErrorClass, RpcError};
use crate::service::Service;
use crate::table::{MethodTable, Params};
use bdev::throttle::{BucketKind, Membership, ThrottleConfig, THROTTLE_VALUE_MAX};
use serde::Deserialize;
use serde_json::{json, Value};

/// Registers the methods.
pub fn register(t: &mut MethodTable) {
    t.add("bdev_set_qos_limit", bdev_set_qos_limit);
    t.add("block_set_io_throttle", block_set_io_throttle);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QosLimit {
    name: String,
    rw_ios_per_sec: Option<u64>,
    rw_mbytes_per_sec: Option<u64>,
    r_mbytes_per_sec: Option<u64>,
    w_mbytes_per_sec: Option<u64>,
}

fn bdev_set_qos_limit(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let q: QosLimit = p.parse()?;
    let given = [
        q.rw_ios_per_sec,
        q.rw_mbytes_per_sec,
        q.r_mbytes_per_sec,
        q.w_mbytes_per_sec,
    ];
    if given.iter().all(Option::is_none) {
        return Err(RpcError::invalid_params("No rate limits specified"));
    }
    let _g = svc.graph.change();
    if svc.graph.nodes().get(&q.name).is_err() {
        return Err(RpcError::errno(libc::ENODEV, "No such device"));
    }
    let bad = || RpcError::invalid_params("Failed to configure rate limit: Invalid argument");
    if q.rw_ios_per_sec
        .is_some_and(|v| v % 1000 != 0 || v > THROTTLE_VALUE_MAX)
    {
        return Err(bad());
    }
    let mib = |v: Option<u64>| -> Result<Option<u64>, RpcError> {
        v.map(|m| {
            m.checked_mul(1 << 20)
                .filter(|b| *b <= THROTTLE_VALUE_MAX)
                .ok_or_else(bad)
        })
        .transpose()
    };
    let (rw, r, w) = (
        mib(q.rw_mbytes_per_sec)?,
        mib(q.r_mbytes_per_sec)?,
        mib(q.w_mbytes_per_sec)?,
    );
    let table = svc.graph.nodes().throttles();
    let mut cfg = table.of(&q.name).map(|g| g.config()).unwrap_or_default();
    let mut set = |k: BucketKind, v: Option<u64>| {
        if let Some(v) = v {
            cfg.get_mut(k).avg = v;
            if v == 0 {
                *cfg.get_mut(k) = Default::default();
            }
        }
    };
    set(BucketKind::OpsTotal, q.rw_ios_per_sec);
    set(BucketKind::BpsTotal, rw);
    set(BucketKind::BpsRead, r);
    set(BucketKind::BpsWrite, w);
    if cfg.enabled() {
        table.join(&q.name, &q.name, cfg, Membership::Spdk);
    } else {
        table.leave(&q.name);
    }
    Ok(Value::Bool(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IoThrottle {
    device: Option<String>,
    id: Option<String>,
    bps: i64,
    bps_rd: i64,
    bps_wr: i64,
    iops: i64,
    iops_rd: i64,
    iops_wr: i64,
    bps_max: Option<i64>,
    bps_rd_max: Option<i64>,
    bps_wr_max: Option<i64>,
    iops_max: Option<i64>,
    iops_rd_max: Option<i64>,
    iops_wr_max: Option<i64>,
    bps_max_length: Option<i64>,
    bps_rd_max_length: Option<i64>,
    bps_wr_max_length: Option<i64>,
    iops_max_length: Option<i64>,
    iops_rd_max_length: Option<i64>,
    iops_wr_max_length: Option<i64>,
    iops_size: Option<i64>,
    group: Option<String>,
}

fn block_set_io_throttle(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: IoThrottle = p.parse_qapi()?;
    let device = match (&a.device, &a.id) {
        (Some(d), None) => d.clone(),
        (None, Some(_)) => {
            return Err(RpcError::invalid_params(
                "qdev IDs/QOM paths exist only in the system emulator",
            ))
        }
        _ => {
            return Err(RpcError::invalid_params(
                "Need exactly one of 'device' and 'id'",
            ))
        }
    };
    let _g = svc.graph.change();
    let nodes = svc.graph.nodes();
    let is_device = nodes
        .get(&device)
        .ok()
        .is_some_and(|b| bdev::device::Device::from_bdev(&b).is_some_and(|d| !d.is_hidden()));
    if !is_device {
        return Err(
            RpcError::invalid_params(format!("Device '{device}' not found"))
                .with_class(ErrorClass::DeviceNotFound),
        );
    }
    // QEMU converts the QAPI int64 members to its unsigned buckets: a
    // negative value is out of range there too.
    let u = |v: i64| v as u64;
    let mut cfg = ThrottleConfig::default();
    use BucketKind::*;
    for (k, avg, max, len) in [
        (BpsTotal, a.bps, a.bps_max, a.bps_max_length),
        (BpsRead, a.bps_rd, a.bps_rd_max, a.bps_rd_max_length),
        (BpsWrite, a.bps_wr, a.bps_wr_max, a.bps_wr_max_length),
        (OpsTotal, a.iops, a.iops_max, a.iops_max_length),
        (OpsRead, a.iops_rd, a.iops_rd_max, a.iops_rd_max_length),
        (OpsWrite, a.iops_wr, a.iops_wr_max, a.iops_wr_max_length),
    ] {
        let b = cfg.get_mut(k);
        b.avg = u(avg);
        if let Some(m) = max {
            b.max = u(m);
        }
        if let Some(l) = len {
            b.burst_length = u(l);
        }
    }
    if let Some(s) = a.iops_size {
        cfg.op_size = u(s);
    }
    cfg.check().map_err(RpcError::invalid_params)?;
    let table = nodes.throttles();
    if cfg.enabled() {
        // QEMU: a device keeps its group unless `group` names another.
        let group = match (&a.group, table.of(&device)) {
            (Some(g), _) => g.clone(),
            (None, Some(cur)) => cur.name().to_string(),
            (None, None) => device.clone(),
        };
        table.join(&device, &group, cfg, Membership::Qemu);
    } else {
        table.leave(&device);
    }
    Ok(json!({}))
}
