//! The error-injection bdev: `bdev_error_create`, `bdev_error_delete` and
//! `bdev_error_inject_error` (SPDK's parameters, plus a byte range).

use crate::error::RpcError;
use crate::methods::common::{delete_typed, register_bdev, ByName};
use crate::service::Service;
use crate::table::{MethodTable, Params};
use bdev::error_bdev::{ErrorBdev, InjectParams};

use serde::Deserialize;
use serde_json::Value;

pub(super) fn register(t: &mut MethodTable) {
    t.add("bdev_error_create", bdev_error_create);
    t.add("bdev_error_delete", |svc, p| {
        delete_typed::<ErrorBdev>(svc, &p.parse::<ByName>()?.name, "error")
    });
    t.add("bdev_error_inject_error", bdev_error_inject_error);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorCreate {
    base_name: String,
    uuid: Option<String>,
}

fn bdev_error_create(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: ErrorCreate = p.parse()?;
    if a.uuid.is_some() {
        return Err(RpcError::errno(
            libc::ENOTSUP,
            "uuid: the error bdev has no UUID of its own",
        ));
    }
    let _g = svc.graph.change();
    register_bdev(svc, ErrorBdev::new(svc.graph.nodes(), &a.base_name)?)?;
    Ok(Value::Bool(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Inject {
    name: String,
    io_type: String,
    error_type: String,
    /// How many requests; SPDK's default is 1, 0 means until cleared.
    #[serde(default = "one")]
    num: u32,
    queue_depth: Option<u32>,
    corrupt_offset: Option<u64>,
    corrupt_value: Option<u8>,
    nvme_sct: Option<u32>,
    nvme_sc: Option<u32>,
    /// sluice: start of the byte range the rule applies to.
    #[serde(default)]
    offset: u64,
    /// sluice: length of the byte range (default: to the end).
    length: Option<u64>,
}

fn one() -> u32 {
    1
}

fn bdev_error_inject_error(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: Inject = p.parse()?;
    for (n, v) in [
        ("queue_depth", a.queue_depth),
        ("nvme_sct", a.nvme_sct),
        ("nvme_sc", a.nvme_sc),
    ] {
        if v.is_some_and(|v| v != 0) {
            return Err(RpcError::errno(
                libc::ENOTSUP,
                format!("{n}: not supported by sluice's error bdev"),
            ));
        }
    }
    let b = svc.graph.nodes().get(&a.name)?;
    let eb = b.as_any().downcast_ref::<ErrorBdev>().ok_or_else(|| {
        RpcError::errno(
            libc::ENODEV,
            format!("bdev {:?} is not an error bdev", a.name),
        )
    })?;
    let params = InjectParams {
        io_type: a.io_type,
        error_type: a.error_type,
        num: a.num,
        offset: a.offset,
        length: a.length,
        corrupt_offset: a.corrupt_offset.unwrap_or(0),
        corrupt_value: a.corrupt_value.unwrap_or(0),
    };
    eb.inject_with(&params)?;
    Ok(Value::Bool(true))
}
