//! The one method table both dialects (JSON-RPC and QMP) dispatch through.

use crate::error::RpcError;
use crate::service::Service;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;

/// A method's parameters (`params` of JSON-RPC, `arguments` of QMP).
pub struct Params(pub Option<Value>);

impl Params {
    /// Decodes the parameters into `T` (use `#[serde(deny_unknown_fields)]` on
    /// `T`); the error names the offending parameter. Absent params decode as `{}`.
    pub fn parse<T: DeserializeOwned>(self) -> Result<T, RpcError> {
        let v = match self.0 {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(v) => v,
        };
        if !v.is_object() {
            return Err(RpcError::invalid_params("params must be an object"));
        }
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            if path == "." || path.is_empty() {
                RpcError::invalid_params(format!("invalid parameters: {inner}"))
            } else {
                RpcError::invalid_params(format!("invalid parameter '{path}': {inner}"))
            }
        })
    }

    /// Fails unless there are no parameters.
    pub fn none(self) -> Result<(), RpcError> {
        match self.0 {
            None | Some(Value::Null) => Ok(()),
            Some(Value::Object(m)) if m.is_empty() => Ok(()),
            Some(Value::Object(m)) => {
                let k = m.keys().next().cloned().unwrap_or_default();
                Err(RpcError::invalid_params(format!("parameter '{k}' is unexpected")))
            }
            Some(_) => Err(RpcError::invalid_params("params must be an object")),
        }
    }
}

/// A method handler. Runs on an RPC connection thread (never on a reactor); it may
/// block on reactor work (`JoinHandle::block`).
pub type Handler = Box<dyn Fn(&Service, Params) -> Result<Value, RpcError> + Send + Sync>;

/// Where a method may be called from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Both sockets.
    Both,
    /// Only QMP (e.g. `qmp_capabilities`, handled by the QMP server itself).
    QmpOnly,
}

struct Entry {
    handler: Handler,
    dialect: Dialect,
}

/// Name → handler.
#[derive(Default)]
pub struct MethodTable {
    methods: BTreeMap<String, Entry>,
}

impl MethodTable {
    /// Adds a method callable from both sockets.
    pub fn add(&mut self, name: &str, h: impl Fn(&Service, Params) -> Result<Value, RpcError> + Send + Sync + 'static) {
        self.methods.insert(name.to_string(), Entry { handler: Box::new(h), dialect: Dialect::Both });
    }

    /// Adds a method with an explicit dialect.
    pub fn add_in(&mut self, name: &str, dialect: Dialect, h: impl Fn(&Service, Params) -> Result<Value, RpcError> + Send + Sync + 'static) {
        self.methods.insert(name.to_string(), Entry { handler: Box::new(h), dialect });
    }

    /// Calls `name`.
    pub fn call(&self, svc: &Service, name: &str, params: Params, qmp: bool) -> Result<Value, RpcError> {
        match self.methods.get(name) {
            Some(e) if qmp || e.dialect == Dialect::Both => (e.handler)(svc, params),
            _ => Err(RpcError::method_not_found(name)),
        }
    }

    /// Whether `name` exists (for the given dialect).
    pub fn contains(&self, name: &str, qmp: bool) -> bool {
        self.methods.get(name).is_some_and(|e| qmp || e.dialect == Dialect::Both)
    }

    /// Every method name, sorted.
    pub fn names(&self, qmp: bool) -> Vec<String> {
        self.methods.iter().filter(|(_, e)| qmp || e.dialect == Dialect::Both).map(|(n, _)| n.clone()).collect()
    }
}
