//! One QMP connection: capabilities negotiation, command dispatch through the
//! shared method table, and the event stream pushed once negotiated.

use super::{json, writer};
use crate::error::{ErrorClass, RpcError};
use crate::service::Service;
use crate::table::Params;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The members a QMP command may have (we offer no out-of-band capability).
const MEMBERS: [&str; 3] = ["execute", "arguments", "id"];

/// The greeting, sent as soon as a client connects.
pub fn greeting() -> Value {
    json!({"QMP": {"version": version(), "capabilities": []}})
}

/// `query-version`'s answer: the QMP dialect level (QEMU 10.0's block-job API)
/// and sluice's own version as the package.
pub fn version() -> Value {
    json!({
        "qemu": {"major": 10, "minor": 0, "micro": 2},
        "package": format!("sluice {}", env!("CARGO_PKG_VERSION")),
    })
}

/// A success reply, with the id echoed when the command had one (as QEMU
/// echoes it: re-written from its parsed value, see [`super::writer`]).
pub fn return_reply(ret: &Value, id: Option<&Value>) -> String {
    let ret = writer::to_qemu(ret);
    match id {
        Some(id) => writer::members(&[("return", &ret), ("id", &writer::to_qemu(id))]),
        None => writer::members(&[("return", &ret)]),
    }
}

/// An error reply.
pub fn error_reply(class: ErrorClass, desc: &str, id: Option<&Value>) -> String {
    let mut d = String::new();
    writer::quote(&mut d, desc);
    let mut c = String::new();
    writer::quote(&mut c, class.as_str());
    let e = writer::members(&[("class", &c), ("desc", &d)]);
    match id {
        Some(id) => writer::members(&[("error", &e), ("id", &writer::to_qemu(id))]),
        None => writer::members(&[("error", &e)]),
    }
}

/// What the session asks its connection to do after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing more.
    None,
    /// Negotiation just completed: start pushing events.
    StartEvents,
}

/// The per-connection protocol state.
#[derive(Default)]
pub struct Session {
    negotiated: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CapabilitiesArgs {
    #[serde(default)]
    enable: Vec<String>,
}

impl Session {
    /// Whether `qmp_capabilities` succeeded.
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Handles one value (or parse error) read from the stream; returns the
    /// reply line and what to do next.
    pub fn handle_item(&mut self, svc: &Service, item: json::Item) -> (String, Effect) {
        match item.map(|q| q.to_value()) {
            Ok(Value::Object(obj)) => self.handle(svc, obj),
            Ok(_) => (
                error_reply(
                    ErrorClass::GenericError,
                    "QMP input must be a JSON object",
                    None,
                ),
                Effect::None,
            ),
            Err(desc) => (
                error_reply(ErrorClass::GenericError, &desc, None),
                Effect::None,
            ),
        }
    }

    /// Handles one command object.
    pub fn handle(&mut self, svc: &Service, mut obj: Map<String, Value>) -> (String, Effect) {
        let id = obj.remove("id");
        let id = id.as_ref();
        let err = |class, desc: &str| (error_reply(class, desc, id), Effect::None);
        if let Some(k) = obj.keys().find(|k| !MEMBERS.contains(&k.as_str())) {
            return err(
                ErrorClass::GenericError,
                &format!("QMP input member '{k}' is unexpected"),
            );
        }
        let cmd = match obj.remove("execute") {
            Some(Value::String(c)) => c,
            Some(_) => {
                return err(
                    ErrorClass::GenericError,
                    "QMP input member 'execute' must be a string",
                )
            }
            None => return err(ErrorClass::GenericError, "QMP input lacks member 'execute'"),
        };
        let args = match obj.remove("arguments") {
            None => None,
            Some(a @ Value::Object(_)) => Some(a),
            Some(_) => {
                return err(
                    ErrorClass::GenericError,
                    "QMP input member 'arguments' must be an object",
                )
            }
        };
        if cmd == "qmp_capabilities" {
            if self.negotiated {
                return err(
                    ErrorClass::CommandNotFound,
                    "Capabilities negotiation is already complete, command ignored",
                );
            }
            let a: CapabilitiesArgs = match Params(args).parse() {
                Ok(a) => a,
                Err(e) => return err(e.class, &e.message),
            };
            if let Some(c) = a.enable.first() {
                return err(
                    ErrorClass::GenericError,
                    &format!("Capability '{c}' not available"),
                );
            }
            self.negotiated = true;
            return (return_reply(&json!({}), id), Effect::StartEvents);
        }
        if !self.negotiated {
            return err(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            );
        }
        tracing::debug!(command = %cmd, "QMP command");
        let table = svc.table();
        let res = catch_unwind(AssertUnwindSafe(|| {
            table.call(svc, &cmd, Params(args), true)
        }))
        .unwrap_or_else(|_| {
            tracing::error!(command = %cmd, "QMP handler panicked");
            Err(RpcError::internal(format!("internal error in {cmd}")))
        });
        match res {
            Ok(r) => (return_reply(&r, id), Effect::None),
            Err(e) => {
                tracing::debug!(command = %cmd, class = e.class.as_str(), error = %e.message, "QMP command failed");
                err(e.class, &e.message)
            }
        }
    }
}
