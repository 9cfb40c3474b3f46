//! JSON-RPC 2.0 requests in SPDK's dialect: validation, dispatch through the
//! method table, batches, notifications, and the reply text.
//!
//! A request's id is echoed verbatim: the reply carries the id's own text
//! from the request (`123456789012345678901234567890`, `-0` and `1e2` come
//! back as sent), not a re-serialisation of its parsed value.
//!
//! A batch holds at most [`MAX_BATCH`] requests (a longer one is refused
//! whole, nothing run), and its replies at most [`MAX_BATCH_REPLY`] bytes:
//! once they pass that, the requests left are not run and each gets an
//! error instead (notifications: nothing).

use crate::error::{codes, RpcError};
use crate::service::Service;
use crate::table::Params;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::fmt::Display;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The members a request may have (SPDK rejects any other).
const MEMBERS: [&str; 4] = ["jsonrpc", "method", "params", "id"];

/// Most requests in one batch.
pub const MAX_BATCH: usize = 128;

/// Most bytes of replies one batch may build before the rest is refused.
pub const MAX_BATCH_REPLY: usize = 16 << 20;

/// A success reply (without the trailing newline); `id` is JSON text.
pub fn result_reply(id: &(impl Display + ?Sized), result: &Value) -> String {
    format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{result}}}")
}

/// An error reply (without the trailing newline); `id` is JSON text.
pub fn error_reply(id: &(impl Display + ?Sized), code: i32, message: &str) -> String {
    let e = serde_json::json!({"code": code, "message": message});
    format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"error\":{e}}}")
}

/// The text of a request's `id` member as it came, when the request parses
/// as an object with one `id`.
#[derive(Deserialize)]
struct RawId<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
}

fn raw_id(item: &RawValue) -> Option<&str> {
    serde_json::from_str::<RawId>(item.get())
        .ok()
        .and_then(|r| r.id)
        .map(|r| r.get().trim())
}

fn invalid(id: &(impl Display + ?Sized), why: &str) -> Option<String> {
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
        Value::Array(items) => handle_batch(svc, bytes, items),
        v => {
            let raw: Option<&RawValue> = serde_json::from_slice(bytes).ok();
            handle_request(svc, v, raw.and_then(raw_id))
        }
    }
}

fn handle_batch(svc: &Service, bytes: &[u8], items: Vec<Value>) -> Option<String> {
    if items.is_empty() {
        return invalid(&Value::Null, "empty batch");
    }
    if items.len() > MAX_BATCH {
        return invalid(
            &Value::Null,
            &format!(
                "a batch of {} requests exceeds the limit of {MAX_BATCH}",
                items.len()
            ),
        );
    }
    let raws: Vec<&RawValue> = serde_json::from_slice(bytes).unwrap_or_default();
    let mut replies: Vec<String> = Vec::new();
    let mut size = 0usize;
    for (i, item) in items.into_iter().enumerate() {
        let raw = raws.get(i).copied().and_then(raw_id);
        let reply = if size > MAX_BATCH_REPLY {
            refuse_over_budget(&item, raw)
        } else {
            handle_request(svc, item, raw)
        };
        if let Some(r) = reply {
            size += r.len() + 1;
            replies.push(r);
        }
    }
    if replies.is_empty() {
        None
    } else {
        Some(format!("[{}]", replies.join(",")))
    }
}

/// The reply to a batch member left unrun because the batch's replies passed
/// [`MAX_BATCH_REPLY`]; none for a notification.
fn refuse_over_budget(item: &Value, raw: Option<&str>) -> Option<String> {
    let id = item.as_object().and_then(|o| o.get("id"))?;
    let text = raw.map(str::to_owned).unwrap_or_else(|| id.to_string());
    Some(error_reply(
        text.as_str(),
        codes::INVALID_REQUEST,
        &format!("Invalid request: not run, the batch's replies exceed {MAX_BATCH_REPLY} bytes"),
    ))
}

/// Handles one request object; `raw_id` is the text of its id as sent.
pub fn handle_request(svc: &Service, v: Value, raw_id: Option<&str>) -> Option<String> {
    let Value::Object(mut obj) = v else {
        return invalid(&Value::Null, "a request must be an object");
    };
    // The id, if usable, is echoed (verbatim) even in the errors about the rest.
    let id: Option<String> = match obj.get("id") {
        None => None,
        Some(id @ (Value::String(_) | Value::Number(_) | Value::Null)) => {
            Some(raw_id.map_or_else(|| id.to_string(), str::to_owned))
        }
        Some(_) => return invalid(&Value::Null, "'id' must be a string, a number or null"),
    };
    let reply_id = id.as_deref().unwrap_or("null");
    if let Err(why) = check_members(&obj) {
        return invalid(reply_id, &why);
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        Some(_) => return invalid(reply_id, "'method' must be a string"),
        None => return invalid(reply_id, "'method' is missing"),
    };
    let params = match obj.remove("params") {
        None | Some(Value::Null) => None,
        Some(p @ (Value::Object(_) | Value::Array(_))) => Some(p),
        Some(_) => return invalid(reply_id, "'params' must be an object or an array"),
    };
    let res = call(svc, &method, params);
    let id = id?;
    Some(match res {
        Ok(r) => result_reply(id.as_str(), &r),
        Err(e) => error_reply(id.as_str(), e.code, &e.message),
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
