//! Reading `blockdev-add` arguments (and `block-stream`'s and the job
//! verbs', `methods/jobs.rs`) the way QEMU's QAPI visitor does, with its
//! error texts: "Parameter 'X' is missing", "Invalid parameter type for 'X',
//! expected: T", "Parameter 'X' does not accept value 'V'" and "Parameter 'X'
//! is unexpected".

use crate::error::RpcError;
use serde_json::{Map, Value};
use std::collections::BTreeSet;

/// One QAPI object of the arguments (the top level, `file`, `cache`), with the
/// members read so far.
pub(crate) struct Args<'a> {
    map: &'a Map<String, Value>,
    prefix: String,
    used: BTreeSet<String>,
}

/// `"Parameter 'X' is missing"`.
pub(crate) fn missing(path: &str) -> RpcError {
    RpcError::invalid_params(format!("Parameter '{path}' is missing"))
}

/// `"Invalid parameter type for 'X', expected: T"`.
pub(crate) fn bad_type(path: &str, expected: &str) -> RpcError {
    RpcError::invalid_params(format!(
        "Invalid parameter type for '{path}', expected: {expected}"
    ))
}

/// `"Parameter 'X' does not accept value 'V'"`.
pub(crate) fn bad_value(path: &str, v: &str) -> RpcError {
    RpcError::invalid_params(format!("Parameter '{path}' does not accept value '{v}'"))
}

impl<'a> Args<'a> {
    /// The object `v` found at `prefix` (`""` for the top level, else ending in `.`).
    pub fn new(v: &'a Value, prefix: &str) -> Result<Self, RpcError> {
        let map = v.as_object().ok_or_else(|| {
            if prefix.is_empty() {
                RpcError::invalid_params("params must be an object")
            } else {
                bad_type(prefix.trim_end_matches('.'), "object")
            }
        })?;
        Ok(Self {
            map,
            prefix: prefix.to_string(),
            used: BTreeSet::new(),
        })
    }

    /// The full name of member `k` (`file.filename`).
    pub fn path(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    /// Member `k` as it is, if present.
    pub fn any(&mut self, k: &str) -> Option<&'a Value> {
        self.used.insert(k.to_string());
        self.map.get(k)
    }

    /// An optional string member.
    pub fn str(&mut self, k: &str) -> Result<Option<String>, RpcError> {
        match self.any(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad_type(&self.path(k), "string")),
        }
    }

    /// A required string member.
    pub fn req_str(&mut self, k: &str) -> Result<String, RpcError> {
        self.str(k)?.ok_or_else(|| missing(&self.path(k)))
    }

    /// An optional boolean member.
    pub fn bool(&mut self, k: &str) -> Result<Option<bool>, RpcError> {
        match self.any(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(bad_type(&self.path(k), "boolean")),
        }
    }

    /// An optional integer member that must not be negative.
    pub fn uint(&mut self, k: &str) -> Result<Option<u64>, RpcError> {
        match self.any(k) {
            None => Ok(None),
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => Ok(Some(u)),
                (None, Some(_)) => Err(RpcError::invalid_params(format!(
                    "Parameter '{}' expects a non-negative value",
                    self.path(k)
                ))),
                _ => Err(bad_type(&self.path(k), "integer")),
            },
            Some(_) => Err(bad_type(&self.path(k), "integer")),
        }
    }

    /// An optional integer member of either sign.
    pub fn int(&mut self, k: &str) -> Result<Option<i64>, RpcError> {
        match self.any(k) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| bad_type(&self.path(k), "integer")),
            Some(_) => Err(bad_type(&self.path(k), "integer")),
        }
    }

    /// An optional enum member (a string among `values`).
    pub fn enumeration(&mut self, k: &str, values: &[&str]) -> Result<Option<String>, RpcError> {
        match self.str(k)? {
            Some(s) if !values.contains(&s.as_str()) => Err(bad_value(&self.path(k), &s)),
            r => Ok(r),
        }
    }

    /// Fails on a member not read: QEMU's "unexpected" for names outside the
    /// schema, and a sluice message for QEMU options listed in `unsupported`
    /// that sluice cannot honour.
    pub fn finish(&self, unsupported: &[&str]) -> Result<(), RpcError> {
        for k in self.map.keys() {
            if self.used.contains(k) {
                continue;
            }
            let p = self.path(k);
            if unsupported.contains(&k.as_str()) {
                return Err(RpcError::errno(
                    libc::ENOTSUP,
                    format!("Parameter '{p}' is not supported by sluice"),
                ));
            }
            return Err(RpcError::invalid_params(format!(
                "Parameter '{p}' is unexpected"
            )));
        }
        Ok(())
    }
}

/// QEMU's node-name rules (`bdrv_assign_node_name`), after the duplicate
/// check the caller makes.
pub(crate) fn check_node_name(name: &str) -> Result<(), RpcError> {
    if !jobs::job::id_wellformed(name) {
        return Err(RpcError::invalid_params(format!(
            "Invalid node-name: '{name}'"
        )));
    }
    Ok(())
}

/// QEMU keeps node names in 32 bytes with the terminating NUL.
pub(crate) fn check_node_name_len(name: &str) -> Result<(), RpcError> {
    if name.len() >= 32 {
        return Err(RpcError::invalid_params("Node name too long"));
    }
    Ok(())
}
