//! The event bus: block jobs and devices publish events; QMP clients get them
//! pushed, JSON-RPC clients poll them (`notify_get_notifications`).

use serde_json::Value;
use std::collections::VecDeque;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// One event, as QMP sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Sequence number, from 1, unique per bus (SPDK's notification id is `seq - 1`).
    pub seq: u64,
    /// QMP event name, e.g. `BLOCK_JOB_COMPLETED`.
    pub name: String,
    /// The event's `data` member.
    pub data: Value,
    /// Seconds since the epoch.
    pub seconds: u64,
    /// Microseconds within the second.
    pub microseconds: u32,
}

impl Event {
    /// The QMP wire form: `{"event", "data", "timestamp": {"seconds", "microseconds"}}`.
    pub fn to_qmp(&self) -> Value {
        serde_json::json!({
            "event": self.name,
            "data": self.data,
            "timestamp": {"seconds": self.seconds, "microseconds": self.microseconds},
        })
    }
}

struct Inner {
    next_seq: u64,
    history: VecDeque<Event>,
    subscribers: Vec<Sender<Event>>,
}

/// A cloneable, thread-safe publish/subscribe bus with a bounded history.
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Mutex<Inner>>,
    capacity: usize,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new(4096)
    }
}

impl EventBus {
    /// A bus that remembers the last `capacity` events.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                next_seq: 1,
                history: VecDeque::new(),
                subscribers: Vec::new(),
            })),
            capacity,
        }
    }

    /// Publishes an event to every subscriber and the history.
    pub fn publish(&self, name: &str, data: Value) -> Event {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let ev = Event {
            seq: g.next_seq,
            name: name.to_string(),
            data,
            seconds: now.as_secs(),
            microseconds: now.subsec_micros(),
        };
        g.next_seq += 1;
        g.history.push_back(ev.clone());
        while g.history.len() > self.capacity {
            g.history.pop_front();
        }
        g.subscribers.retain(|s| s.send(ev.clone()).is_ok());
        tracing::debug!(event = name, "event published");
        ev
    }

    /// A receiver of every event published from now on.
    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = channel();
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .subscribers
            .push(tx);
        rx
    }

    /// Events with `seq > after`, at most `max` of them (oldest first).
    pub fn since(&self, after: u64, max: usize) -> Vec<Event> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.history
            .iter()
            .filter(|e| e.seq > after)
            .take(max)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_subscribe_history() {
        let bus = EventBus::new(2);
        let rx = bus.subscribe();
        bus.publish("A", serde_json::json!({"x": 1}));
        bus.publish("B", Value::Null);
        bus.publish("C", Value::Null);
        assert_eq!(
            rx.try_iter().map(|e| e.name).collect::<Vec<_>>(),
            ["A", "B", "C"]
        );
        let h = bus.since(0, 10);
        assert_eq!(h.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(bus.since(2, 10).len(), 1);
        assert_eq!(h[0].to_qmp()["event"], "B");
    }
}
