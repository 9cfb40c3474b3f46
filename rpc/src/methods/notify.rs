//! SPDK's notification methods over the event bus: JSON-RPC clients poll what
//! QMP clients get pushed.

use crate::error::RpcError;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use graph::events::Event;
use serde::Deserialize;
use serde_json::{json, Value};

/// `bdev_register` / `bdev_unregister` (`ctx`: the bdev's name), published
/// by the graph alone ([`graph::Graph::register`], [`graph::Graph::delete`]).
pub use graph::{BDEV_REGISTER, BDEV_UNREGISTER};

/// The notification types sluice publishes (others may appear as subsystems
/// publish them; `notify_get_types` lists those seen too).
const KNOWN_TYPES: &[&str] = &[
    BDEV_REGISTER,
    BDEV_UNREGISTER,
    "BLOCK_JOB_CANCELLED",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_ERROR",
    "BLOCK_JOB_PENDING",
    "BLOCK_JOB_READY",
    "BLOCK_STREAM_COMPLETED",
    "JOB_STATUS_CHANGE",
    "SHUTDOWN",
];

/// Registers the notification methods.
pub fn register(t: &mut MethodTable) {
    t.add("notify_get_types", notify_get_types);
    t.add("notify_get_notifications", notify_get_notifications);
}

fn notify_get_types(svc: &Service, p: Params) -> Result<Value, RpcError> {
    p.none()?;
    let mut types: Vec<String> = KNOWN_TYPES.iter().map(|s| s.to_string()).collect();
    for ev in svc.events.since(0, usize::MAX) {
        if !types.contains(&ev.name) {
            types.push(ev.name);
        }
    }
    Ok(json!(types))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetNotifications {
    /// The first notification id to return (SPDK's ids start at 0).
    #[serde(default)]
    id: u64,
    /// At most this many (0: no limit).
    #[serde(default)]
    max: u64,
}

/// The `ctx` of a notification: the bdev, device or job it is about.
fn ctx(ev: &Event) -> String {
    ["name", "device", "id", "node-name", "job-id"]
        .iter()
        .find_map(|k| ev.data.get(*k).and_then(Value::as_str))
        .map(str::to_string)
        .unwrap_or_else(|| match &ev.data {
            Value::Null => String::new(),
            d => d.to_string(),
        })
}

/// SPDK's form of an event, `{"type", "ctx", "id"}` with `id = seq - 1`, plus
/// `data`: the event's whole content as QMP pushes it (SPDK's clients ignore
/// the extra member; scripts read a stream's `error` or `offset` there).
pub fn to_notification(ev: &Event) -> Value {
    json!({"type": ev.name, "ctx": ctx(ev), "id": ev.seq - 1, "data": ev.data})
}

fn notify_get_notifications(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let GetNotifications { id, max } = p.parse()?;
    let max = if max == 0 {
        usize::MAX
    } else {
        usize::try_from(max).unwrap_or(usize::MAX)
    };
    // Notification `id` is event `seq - 1`: ids >= id are seqs > id.
    let evs = svc.events.since(id, max);
    Ok(Value::Array(evs.iter().map(to_notification).collect()))
}
