//! QEMU's `block-commit`: parse with QEMU's argument errors, start the
//! commit job (`jobs::drivers::commit`), answer `{}`. The job's events and
//! queries are rendered by `job_qapi` like every job's.

use crate::error::RpcError;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use jobs::drivers::commit::{self, CommitParams};
use jobs::job::{BlockJobArgs, OnError};
use serde::Deserialize;
use serde_json::{json, Value};

/// Registers the method.
pub fn register(t: &mut MethodTable) {
    t.add("block-commit", block_commit);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BlockCommit {
    job_id: Option<String>,
    device: String,
    base_node: Option<String>,
    base: Option<String>,
    top_node: Option<String>,
    top: Option<String>,
    backing_file: Option<String>,
    backing_mask_protocol: Option<bool>,
    speed: Option<i64>,
    on_error: Option<String>,
    /// The commit_top (mirror_top for an active commit) node shown above
    /// top while the job runs.
    filter_node_name: Option<String>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
}

/// `block-commit`'s members in QAPI schema order, with their JSON types.
const MEMBERS: [(&str, Kind); 13] = [
    ("job-id", Kind::Str),
    ("device", Kind::Str),
    ("base-node", Kind::Str),
    ("base", Kind::Str),
    ("top-node", Kind::Str),
    ("top", Kind::Str),
    ("backing-file", Kind::Str),
    ("backing-mask-protocol", Kind::Bool),
    ("speed", Kind::Int),
    ("on-error", Kind::Str),
    ("filter-node-name", Kind::Str),
    ("auto-finalize", Kind::Bool),
    ("auto-dismiss", Kind::Bool),
];

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Bool,
    Int,
}

/// QEMU's QAPI input checks, in its order and words: members in schema
/// order (type), the one mandatory member, then members it does not know.
fn check_qapi(v: &Value) -> Result<(), RpcError> {
    let empty = serde_json::Map::new();
    let m = v.as_object().unwrap_or(&empty);
    for (k, kind) in MEMBERS {
        let Some(x) = m.get(k) else {
            if k == "device" {
                return Err(RpcError::invalid_params("Parameter 'device' is missing"));
            }
            continue;
        };
        let (ok, want) = match kind {
            Kind::Str => (x.is_string(), "string"),
            Kind::Bool => (x.is_boolean(), "boolean"),
            Kind::Int => (x.is_i64(), "integer"),
        };
        if !ok {
            return Err(RpcError::invalid_params(format!(
                "Invalid parameter type for '{k}', expected: {want}"
            )));
        }
    }
    match m.keys().find(|k| !MEMBERS.iter().any(|(n, _)| n == k)) {
        Some(k) => Err(RpcError::invalid_params(format!(
            "Parameter '{k}' is unexpected"
        ))),
        None => Ok(()),
    }
}

fn block_commit(svc: &Service, p: Params) -> Result<Value, RpcError> {
    if let Some(v) = &p.0 {
        if v.is_object() {
            check_qapi(v)?;
        }
    } else {
        check_qapi(&Value::Null)?;
    }
    let a: BlockCommit = p.parse()?;
    let on_error = match a.on_error {
        None => None,
        Some(s) => Some(OnError::parse(&s).ok_or_else(|| {
            RpcError::invalid_params(format!("Parameter 'on-error' does not accept value '{s}'"))
        })?),
    };
    let cp = CommitParams {
        job: BlockJobArgs {
            job_id: a.job_id,
            speed: a.speed.unwrap_or(0),
            on_error,
            auto_finalize: a.auto_finalize,
            auto_dismiss: a.auto_dismiss,
            throttle: None,
            filter_node_name: a.filter_node_name,
        },
        device: a.device,
        top_node: a.top_node,
        top: a.top,
        base_node: a.base_node,
        base: a.base,
        backing_file: a.backing_file,
        backing_mask_protocol: a.backing_mask_protocol.unwrap_or(false),
    };
    commit::start(&svc.graph, &svc.jobs, &svc.rt, cp, svc.tuning)?;
    Ok(json!({}))
}
