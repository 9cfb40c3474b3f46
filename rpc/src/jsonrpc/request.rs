//! JSON-RPC 2.0 requests in SPDK's dialect: validation, dispatch through the
//! method table, batches, notifications, and the reply text.

use crate::error::{codes, RpcError};
use crate::service::Service;
use crate::table::Params;
use serde_json::{Map, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The members a request may have (SPDK rejects any other).
const MEMBERS: [&str; 4] = ["jsonrpc", "method", "params", "id"];

/// A success reply (without the trailing newline).
pub fn result_reply(id: &Value, result: &Value) -> String {
    format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{result}}}")
}

/// An error reply (without the trailing newline).
pub fn error_reply(id: &Value, code: i32, message: &str) -> String {
    let e = serde_json::json!({"code": code, "message": message});
    format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"error\":{e}}}")
}

fn invalid(id: &Value, why: &str) -> Option<String> {
    Some(error_reply(
        id,
        codes::INVALID_REQUEST,
        &format!("Invalid request: {why}"),
    ))
}

/// Handles one complete JSON text from the stream: a request or a batch.
/// Returns the reply line, or `None` when nothing is to be sent (notifications).
pub fn handle_text(svc: &Service, bytes: &[u8]) -> Option<String> {
    let v: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            return Some(error_reply(
                &Value::Null,
                codes::PARSE_ERROR,
                &format!("Parse error: {e}"),
            ))
        }
    };
    match v {
        Value::Array(items) => {
            if items.is_empty() {
                return invalid(&Value::Null, "empty batch");
            }
            let replies: Vec<String> = items
                .into_iter()
                .filter_map(|r| handle_request(svc, r))
                .collect();
            if replies.is_empty() {
                None
            } else {
                Some(format!("[{}]", replies.join(",")))
            }
        }
        v => handle_request(svc, v),
    }
}

/// Handles one request object.
pub fn handle_request(svc: &Service, v: Value) -> Option<String> {
    let Value::Object(mut obj) = v else {
        return invalid(&Value::Null, "a request must be an object");
    };
    // The id, if usable, is echoed even in the errors about the rest.
    let id = match obj.get("id") {
        None => None,
        Some(id @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(id.clone()),
        Some(_) => return invalid(&Value::Null, "'id' must be a string, a number or null"),
    };
    let reply_id = id.clone().unwrap_or(Value::Null);
    if let Err(why) = check_members(&obj) {
        return invalid(&reply_id, &why);
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        Some(_) => return invalid(&reply_id, "'method' must be a string"),
        None => return invalid(&reply_id, "'method' is missing"),
    };
    let params = match obj.remove("params") {
        None | Some(Value::Null) => None,
        Some(p @ (Value::Object(_) | Value::Array(_))) => Some(p),
        Some(_) => return invalid(&reply_id, "'params' must be an object or an array"),
    };
    let res = call(svc, &method, params);
    let id = id?;
    Some(match res {
        Ok(r) => result_reply(&id, &r),
        Err(e) => error_reply(&id, e.code, &e.message),
    })
}

fn check_members(obj: &Map<String, Value>) -> Result<(), String> {
    if let Some(k) = obj.keys().find(|k| !MEMBERS.contains(&k.as_str())) {
        return Err(format!("unexpected member '{k}'"));
    }
    match obj.get("jsonrpc") {
        Some(Value::String(s)) if s == "2.0" => Ok(()),
        Some(_) => Err("'jsonrpc' must be \"2.0\"".into()),
        None => Err("'jsonrpc' is missing".into()),
    }
}

/// Calls a method of the table; a panicking handler becomes an internal error.
pub fn call(svc: &Service, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    tracing::debug!(method, "JSON-RPC call");
    let table = svc.table();
    match catch_unwind(AssertUnwindSafe(|| {
        table.call(svc, method, Params(params), false)
    })) {
        Ok(r) => {
            if let Err(e) = &r {
                tracing::debug!(method, code = e.code, error = %e.message, "JSON-RPC call failed");
            }
            r
        }
        Err(_) => {
            tracing::error!(method, "RPC handler panicked");
            Err(RpcError::internal(format!("internal error in {method}")))
        }
    }
}
