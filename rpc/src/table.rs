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

    /// [`Params::parse`] with QEMU's QAPI error texts ("Parameter 'X' is
    /// missing", "Parameter 'X' is unexpected", "Invalid parameter type for
    /// 'X', expected: integer"), for QMP commands QEMU also serves.
    pub fn parse_qapi<T: DeserializeOwned>(self) -> Result<T, RpcError> {
        self.parse_qapi_at("")
    }

    /// [`Params::parse_qapi`] of a member nested at `prefix` (QEMU's
    /// `actions[0].data`): error texts name the member's full path.
    pub fn parse_qapi_at<T: DeserializeOwned>(self, prefix: &str) -> Result<T, RpcError> {
        let v = match self.0 {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(v) => v,
        };
        if !v.is_object() {
            return Err(RpcError::invalid_params(if prefix.is_empty() {
                "params must be an object".to_string()
            } else {
                format!("Invalid parameter type for '{prefix}', expected: object")
            }));
        }
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = match (prefix, e.path().to_string()) {
                ("", p) => p,
                (pre, p) if p == "." || p.is_empty() => pre.to_string(),
                (pre, p) => format!("{pre}.{p}"),
            };
            let inner = e.into_inner().to_string();
            let at = |name: &str| match path.as_str() {
                "." | "" => name.to_string(),
                p => format!("{p}.{name}"),
            };
            let quoted = |s: &str| s.split('`').nth(1).map(str::to_string);
            let msg = if inner.starts_with("missing field") {
                format!(
                    "Parameter '{}' is missing",
                    at(&quoted(&inner).unwrap_or_default())
                )
            } else if inner.starts_with("unknown field") {
                // The path already ends at the unknown member.
                format!("Parameter '{path}' is unexpected")
            } else if let Some((_, want)) = inner.split_once(", expected ") {
                let want = match want {
                    w if w.starts_with('i') || w.starts_with('u') => "integer",
                    w if w.contains("bool") => "boolean",
                    w if w.contains("string") => "string",
                    w if w.contains("sequence") => "array",
                    w if w.contains("map") || w.contains("struct") => "object",
                    w => w,
                };
                format!("Invalid parameter type for '{path}', expected: {want}")
            } else {
                format!("Parameter '{path}': {inner}")
            };
            RpcError::invalid_params(msg)
        })
    }

    /// Fails unless there are no parameters.
    pub fn none(self) -> Result<(), RpcError> {
        match self.0 {
            None | Some(Value::Null) => Ok(()),
            Some(Value::Object(m)) if m.is_empty() => Ok(()),
            Some(Value::Object(m)) => {
                let k = m.keys().next().cloned().unwrap_or_default();
                Err(RpcError::invalid_params(format!(
                    "parameter '{k}' is unexpected"
                )))
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

/// Produces one subsystem's part of `save_config`: the `{"method", "params"}`
/// calls that recreate its current state, in the order they must be replayed.
pub type SectionFn = Box<dyn Fn(&Service) -> Vec<Value> + Send + Sync>;

/// A subsystem's section of the saved configuration.
pub struct ConfigSection {
    /// The subsystem name (SPDK's `subsystem`, e.g. "bdev").
    pub name: String,
    /// Subsystems whose sections must be replayed before this one.
    pub depends_on: Vec<String>,
    /// Collects the section.
    pub collect: SectionFn,
}

/// Name → handler.
#[derive(Default)]
pub struct MethodTable {
    methods: BTreeMap<String, Entry>,
    sections: Vec<ConfigSection>,
}

impl MethodTable {
    /// Adds a method callable from both sockets.
    pub fn add(
        &mut self,
        name: &str,
        h: impl Fn(&Service, Params) -> Result<Value, RpcError> + Send + Sync + 'static,
    ) {
        self.methods.insert(
            name.to_string(),
            Entry {
                handler: Box::new(h),
                dialect: Dialect::Both,
            },
        );
    }

    /// Adds a method with an explicit dialect.
    pub fn add_in(
        &mut self,
        name: &str,
        dialect: Dialect,
        h: impl Fn(&Service, Params) -> Result<Value, RpcError> + Send + Sync + 'static,
    ) {
        self.methods.insert(
            name.to_string(),
            Entry {
                handler: Box::new(h),
                dialect,
            },
        );
    }

    /// Calls `name`.
    pub fn call(
        &self,
        svc: &Service,
        name: &str,
        params: Params,
        qmp: bool,
    ) -> Result<Value, RpcError> {
        match self.methods.get(name) {
            Some(e) if qmp || e.dialect == Dialect::Both => (e.handler)(svc, params),
            _ => Err(RpcError::method_not_found(name)),
        }
    }

    /// Whether `name` exists (for the given dialect).
    pub fn contains(&self, name: &str, qmp: bool) -> bool {
        self.methods
            .get(name)
            .is_some_and(|e| qmp || e.dialect == Dialect::Both)
    }

    /// Every method name, sorted.
    pub fn names(&self, qmp: bool) -> Vec<String> {
        self.methods
            .iter()
            .filter(|(_, e)| qmp || e.dialect == Dialect::Both)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Adds a subsystem section to `save_config` (replayed after `depends_on`).
    pub fn add_config_section(
        &mut self,
        name: &str,
        depends_on: &[&str],
        collect: impl Fn(&Service) -> Vec<Value> + Send + Sync + 'static,
    ) {
        self.sections.push(ConfigSection {
            name: name.to_string(),
            depends_on: depends_on.iter().map(|s| s.to_string()).collect(),
            collect: Box::new(collect),
        });
    }

    /// The config sections, each after the ones it depends on (otherwise in
    /// registration order).
    pub fn config_sections(&self) -> Vec<&ConfigSection> {
        let mut out: Vec<&ConfigSection> = Vec::with_capacity(self.sections.len());
        let mut left: Vec<&ConfigSection> = self.sections.iter().collect();
        while !left.is_empty() {
            let ready = left.iter().position(|s| {
                s.depends_on
                    .iter()
                    .all(|d| out.iter().any(|o| &o.name == d) || !left.iter().any(|l| &l.name == d))
            });
            // A dependency cycle cannot be ordered: keep registration order.
            let i = ready.unwrap_or(0);
            out.push(left.remove(i));
        }
        out
    }
}
