//! `transaction {actions, properties?}`: QEMU's all-or-nothing group of
//! actions, for the actions sluice serves: `abort`, `blockdev-snapshot` and
//! `blockdev-snapshot-sync` (libvirt takes even one disk's snapshot this way).
//!
//! As QEMU's `qmp_transaction`: the whole request is parsed first (every
//! action's `data` against its command's arguments, errors naming
//! `actions[i].data.X`); a `completion-mode` other than `individual` is
//! refused for these actions (only backup and bitmap actions, which sluice
//! does not serve, support `grouped`); then, under one
//! [`graph::Graph::change`], each action is done in order (QEMU's prepare:
//! the overlay opened and linked, the device or exports moved onto it), and
//! when one fails every done action is undone in reverse (QEMU's abort: the
//! device or exports back on the old top, its lock as before, a created
//! overlay node deleted; a created overlay *file* stays on disk, as QEMU
//! leaves it) and the failing action's error is the answer.

use super::actions::{existing_locked, sync_locked, undo, Existing, Sync};
use crate::error::RpcError;
use crate::service::Service;
use crate::table::Params;
use graph::snapshot::SnapshotUndo;
use serde_json::{json, Value};

/// QEMU 10's `TransactionActionKind`.
const KINDS: &[&str] = &[
    "abort",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-backup",
    "blockdev-snapshot",
    "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-sync",
    "drive-backup",
];

/// One parsed action.
enum Action {
    Abort,
    Snapshot(Existing),
    SnapshotSync(Sync),
}

impl Action {
    fn kind(&self) -> &'static str {
        match self {
            Action::Abort => "abort",
            Action::Snapshot(_) => "blockdev-snapshot",
            Action::SnapshotSync(_) => "blockdev-snapshot-sync",
        }
    }
}

fn bad_type(path: &str, want: &str) -> RpcError {
    RpcError::invalid_params(format!(
        "Invalid parameter type for '{path}', expected: {want}"
    ))
}

fn parse_action(i: usize, v: &Value) -> Result<Action, RpcError> {
    let at = format!("actions[{i}]");
    let o = v.as_object().ok_or_else(|| bad_type(&at, "object"))?;
    let ty = match o.get("type") {
        None => {
            return Err(RpcError::invalid_params(format!(
                "Parameter '{at}.type' is missing"
            )))
        }
        Some(Value::String(t)) => t.as_str(),
        Some(_) => return Err(bad_type(&format!("{at}.type"), "string")),
    };
    if !KINDS.contains(&ty) {
        return Err(RpcError::invalid_params(format!(
            "Parameter 'type' does not accept value '{ty}'"
        )));
    }
    if let Some(k) = o.keys().find(|k| *k != "type" && *k != "data") {
        return Err(RpcError::invalid_params(format!(
            "Parameter '{at}.{k}' is unexpected"
        )));
    }
    let data = o
        .get("data")
        .cloned()
        .ok_or_else(|| RpcError::invalid_params(format!("Parameter '{at}.data' is missing")))?;
    let data_at = format!("{at}.data");
    let p = Params(Some(data));
    match ty {
        "abort" => {
            p.parse_qapi_at::<Empty>(&data_at)?;
            Ok(Action::Abort)
        }
        "blockdev-snapshot" => Ok(Action::Snapshot(p.parse_qapi_at(&data_at)?)),
        "blockdev-snapshot-sync" => Ok(Action::SnapshotSync(p.parse_qapi_at(&data_at)?)),
        other => Err(RpcError::errno(
            libc::ENOTSUP,
            format!("Transaction action '{other}' is not supported by sluice"),
        )),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Properties {
    completion_mode: Option<String>,
}

/// The `transaction` command.
pub(super) fn transaction(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let v = match p.0 {
        None | Some(Value::Null) => json!({}),
        Some(v) => v,
    };
    let o = v
        .as_object()
        .ok_or_else(|| RpcError::invalid_params("params must be an object"))?;
    if let Some(k) = o.keys().find(|k| *k != "actions" && *k != "properties") {
        return Err(RpcError::invalid_params(format!(
            "Parameter '{k}' is unexpected"
        )));
    }
    let list = match o.get("actions") {
        None => return Err(RpcError::invalid_params("Parameter 'actions' is missing")),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad_type("actions", "array")),
    };
    let actions = list
        .iter()
        .enumerate()
        .map(|(i, a)| parse_action(i, a))
        .collect::<Result<Vec<_>, _>>()?;
    let mode = match o.get("properties") {
        None => None,
        Some(props @ Value::Object(_)) => {
            let pr: Properties = Params(Some(props.clone())).parse_qapi_at("properties")?;
            pr.completion_mode
        }
        Some(_) => return Err(bad_type("properties", "object")),
    };
    match mode.as_deref() {
        None | Some("individual") => {}
        Some("grouped") => {
            if let Some(a) = actions.first() {
                return Err(RpcError::invalid_params(format!(
                    "Action '{}' does not support transaction property completion-mode = grouped",
                    a.kind()
                )));
            }
        }
        Some(m) => {
            return Err(RpcError::invalid_params(format!(
                "Parameter 'completion-mode' does not accept value '{m}'"
            )))
        }
    }
    let g = svc.graph.change();
    let mut done: Vec<SnapshotUndo> = Vec::new();
    let mut failed = None;
    for a in actions {
        let r = match a {
            Action::Abort => Err(RpcError::invalid_params(
                "Transaction aborted using Abort action",
            )),
            Action::Snapshot(a) => existing_locked(svc, &g, a),
            Action::SnapshotSync(a) => sync_locked(svc, &g, a),
        };
        match r {
            Ok(u) => done.push(u),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let Some(e) = failed else {
        return Ok(json!({}));
    };
    for u in done.iter().rev() {
        if let Err(ue) = undo(svc, u) {
            tracing::error!(overlay = %u.overlay.name(), error = %ue.message, "transaction: undoing a snapshot failed");
        }
    }
    Err(e)
}
