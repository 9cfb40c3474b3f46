//! `bdev_get_bdevs` and `bdev_get_iostat`, in SPDK's output shapes.

use crate::error::RpcError;
use crate::methods::common::spdk_rate_limits;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use bdev::{local_stats, Bdev, IoStatsSnapshot, IoType};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) fn register(t: &mut MethodTable) {
    t.add("bdev_get_bdevs", bdev_get_bdevs);
    t.add("bdev_get_iostat", bdev_get_iostat);
}

/// One bdev as SPDK's `bdev_get_bdevs` describes it.
pub fn describe(svc: &Service, b: &Arc<dyn Bdev>) -> Value {
    let claims = svc.graph.nodes().claims(b.name());
    let sup = |t| b.io_type_supported(t);
    let mut v = json!({
        "name": b.name(),
        "aliases": [],
        "product_name": b.product_name(),
        "block_size": b.block_size(),
        "num_blocks": b.num_blocks(),
        "assigned_rate_limits": spdk_rate_limits(svc, b.name()),
        "claimed": !claims.is_empty(),
        "zoned": false,
        "supported_io_types": {
            "read": sup(IoType::Read),
            "write": sup(IoType::Write) && !b.read_only(),
            "unmap": sup(IoType::Unmap) && !b.read_only(),
            "flush": sup(IoType::Flush),
            "reset": false,
            "nvme_admin": false,
            "nvme_io": false,
            "write_zeroes": sup(IoType::WriteZeroes) && !b.read_only(),
            "compare": false,
            "compare_and_write": false,
            "abort": false,
            "seek_hole": false,
            "seek_data": false,
            "copy": false,
            "nvme_iov_md": false,
        },
        "driver_specific": match b.driver_specific() {
            Value::Null => json!({}),
            d => d,
        },
    });
    if let Some(u) = b.uuid() {
        v["uuid"] = json!(u);
    }
    if !claims.is_empty() {
        v["claim_type"] = json!("exclusive_write");
    }
    if b.required_alignment() > 1 {
        v["required_alignment"] = json!(b.required_alignment().trailing_zeros());
    }
    v
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBdevs {
    name: Option<String>,
    /// Milliseconds to wait for `name` to appear.
    #[serde(default)]
    timeout: u64,
}

fn bdev_get_bdevs(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let GetBdevs { name, timeout } = p.parse()?;
    let Some(name) = name else {
        return Ok(Value::Array(
            svc.graph
                .nodes()
                .list()
                .iter()
                .map(|b| describe(svc, b))
                .collect(),
        ));
    };
    let deadline = Instant::now() + Duration::from_millis(timeout.min(3_600_000));
    loop {
        match svc.graph.nodes().get(&name) {
            Ok(b) => return Ok(json!([describe(svc, &b)])),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            // The client hung up or the server is stopping: nobody waits any more.
            Err(e) if crate::transport::call::cancelled() => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetIostat {
    /// One bdev (SPDK's older parameter).
    name: Option<String>,
    /// Several bdevs.
    names: Option<Vec<String>>,
    /// One entry per reactor instead of the sum (needs exactly one bdev).
    #[serde(default)]
    per_channel: bool,
    /// Only "none": the counters cannot be reset.
    reset_mode: Option<String>,
}

/// Every reactor's counters for `bdevs`: `out[reactor][bdev]`.
fn per_reactor(
    svc: &Service,
    bdevs: &[Arc<dyn Bdev>],
) -> Result<Vec<Vec<Option<IoStatsSnapshot>>>, RpcError> {
    let list = bdevs.to_vec();
    let all = svc
        .rt
        .broadcast(move || list.iter().map(local_stats).collect::<Vec<_>>())
        .block();
    Ok(all.into_iter().collect::<Result<_, _>>()?)
}

fn stats_entry(name: &str, s: &IoStatsSnapshot) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or_else(|_| json!({}));
    v["name"] = json!(name);
    v
}

fn bdev_get_iostat(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: GetIostat = p.parse()?;
    if let Some(m) = a.reset_mode.as_deref().filter(|m| *m != "none") {
        return Err(RpcError::errno(
            libc::ENOTSUP,
            format!("reset_mode {m:?}: resetting I/O statistics is not supported"),
        ));
    }
    let mut names: Vec<String> = a.names.unwrap_or_default();
    names.extend(a.name);
    let bdevs: Vec<Arc<dyn Bdev>> = if names.is_empty() {
        svc.graph.nodes().list()
    } else {
        names
            .iter()
            .map(|n| svc.graph.nodes().get(n))
            .collect::<Result<_, _>>()?
    };
    let per = per_reactor(svc, &bdevs)?;
    let head = json!({"tick_rate": reactor::ticks_hz(), "ticks": reactor::ticks()});
    if a.per_channel {
        let [b] = bdevs.as_slice() else {
            return Err(RpcError::invalid_params(
                "per_channel: needs exactly one bdev in 'name' or 'names'",
            ));
        };
        let channels: Vec<Value> = per
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v[0].as_ref().map(|s| (i, s)))
            .map(|(i, s)| {
                let mut e = serde_json::to_value(s).unwrap_or_else(|_| json!({}));
                e["thread_id"] = json!(i + 1);
                e
            })
            .collect();
        let mut out = head;
        out["name"] = json!(b.name());
        out["channels"] = Value::Array(channels);
        return Ok(out);
    }
    let list: Vec<Value> = bdevs
        .iter()
        .enumerate()
        .map(|(j, b)| {
            let mut sum = IoStatsSnapshot::default();
            for s in per.iter().filter_map(|v| v[j].as_ref()) {
                sum.add(s);
            }
            stats_entry(b.name(), &sum)
        })
        .collect();
    let mut out = head;
    out["bdevs"] = Value::Array(list);
    Ok(out)
}
