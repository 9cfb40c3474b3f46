//! The recording bdev (`bdev::record`, issue #17): `bdev_record_create`
//! puts a pass-through over `base_bdev_name` that logs every write (with
//! its data), FUA, flush, discard and write-zeroes to `log_path`;
//! `bdev_record_mark` writes a named mark into the log (a job's end, for the
//! crash-state checker) and returns its seq; `bdev_record_delete` writes
//! the log out and removes the recorder. A test tool: a recorder is never
//! saved in `save_config` (its log would restart empty).

use crate::error::RpcError;
use crate::methods::common::{delete_typed, register_bdev};
use crate::service::Service;
use crate::table::{MethodTable, Params};
use bdev::record::{RecordBdev, RecordOptions};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;

pub(super) fn register(t: &mut MethodTable) {
    t.add("bdev_record_create", bdev_record_create);
    t.add("bdev_record_mark", bdev_record_mark);
    t.add("bdev_record_delete", |svc, p| {
        let a: ByName = p.parse()?;
        if let Ok(b) = svc.graph.nodes().get(&a.name) {
            if let Some(r) = b.as_any().downcast_ref::<RecordBdev>() {
                r.sync_log()?;
            }
        }
        delete_typed::<RecordBdev>(svc, &a.name, "record")
    });
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ByName {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    base_bdev_name: String,
    log_path: PathBuf,
}

fn bdev_record_create(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: Create = p.parse()?;
    if a.name.is_empty() {
        return Err(RpcError::errno(libc::EINVAL, "name: must not be empty"));
    }
    let _g = svc.graph.change();
    let opts = RecordOptions {
        log_path: Some(a.log_path),
        ..RecordOptions::default()
    };
    let r = RecordBdev::new(svc.graph.nodes(), &a.name, &a.base_bdev_name, opts)?;
    Ok(Value::String(register_bdev(svc, r)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Mark {
    name: String,
    label: String,
}

fn bdev_record_mark(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: Mark = p.parse()?;
    let b = svc.graph.nodes().get(&a.name)?;
    let r = b.as_any().downcast_ref::<RecordBdev>().ok_or_else(|| {
        RpcError::errno(
            libc::ENODEV,
            format!("bdev {:?} is not a record bdev", a.name),
        )
    })?;
    let seq = r.mark(&a.label);
    r.sync_log()?;
    Ok(json!({ "seq": seq }))
}
