//! QEMU's `object-add` and `object-del` for the object types sluice has:
//! `tls-creds-x509` (`dir`, `endpoint` server|client (default client),
//! `verify-peer` (default true); loaded and checked when added) and
//! `authz-simple` (`identity`); `throttle-group` (read in
//! `crate::objects::throttle`, kept in the graph's throttle table). Arguments and errors are QEMU's (compared
//! with qemu-storage-daemon in `tests/tests/nbd_tls.rs`).

use crate::error::RpcError;
use crate::objects::Object;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use nbd::tls::{AuthzSimple, Endpoint, TlsCreds};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::Arc;

/// Registers the methods.
pub fn register(t: &mut MethodTable) {
    t.add("object-add", object_add);
    t.add("object-del", |svc, p| {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Del {
            id: String,
        }
        let d: Del = p.parse_qapi()?;
        if let Some(r) = crate::objects::throttle::del(svc, &d.id) {
            r?;
            return Ok(json!({}));
        }
        svc.objects.del(&d.id).map_err(RpcError::invalid_params)?;
        Ok(json!({}))
    });
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct X509 {
    dir: String,
    endpoint: Option<String>,
    verify_peer: Option<bool>,
    /// GnuTLS priority strings have no meaning for rustls; accepted when absent only.
    priority: Option<String>,
    /// Checked when loading either way.
    #[allow(dead_code)]
    sanity_check: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Simple {
    identity: String,
}

fn object_add(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let mut m: Map<String, Value> = match p.0 {
        Some(Value::Object(m)) => m,
        None | Some(Value::Null) => Map::new(),
        Some(_) => return Err(RpcError::invalid_params("params must be an object")),
    };
    let qom_type = match m.remove("qom-type") {
        Some(Value::String(s)) => s,
        None => return Err(RpcError::invalid_params("Parameter 'qom-type' is missing")),
        Some(_) => {
            return Err(RpcError::invalid_params(
                "Invalid parameter type for 'qom-type', expected: string",
            ))
        }
    };
    let id = match m.remove("id") {
        Some(Value::String(s)) => s,
        None => return Err(RpcError::invalid_params("Parameter 'id' is missing")),
        Some(_) => {
            return Err(RpcError::invalid_params(
                "Invalid parameter type for 'id', expected: string",
            ))
        }
    };
    // QEMU's legacy form: the properties under "props".
    if let Some(Value::Object(props)) = m.remove("props") {
        m.extend(props);
    }
    if !crate::objects::throttle::id_wellformed(&id) {
        return Err(RpcError::invalid_params(
            "Parameter 'id' expects an identifier",
        ));
    }
    if svc.objects.contains(&id) || crate::objects::throttle::exists(svc, &id) {
        return Err(RpcError::invalid_params(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        )));
    }
    if qom_type == "throttle-group" {
        crate::objects::throttle::add(svc, &id, m)?;
        return Ok(json!({}));
    }
    let rest = Params(Some(Value::Object(m)));
    let obj = match qom_type.as_str() {
        "tls-creds-x509" => {
            let a: X509 = rest.parse_qapi()?;
            let endpoint = match a.endpoint.as_deref() {
                None | Some("client") => Endpoint::Client,
                Some("server") => Endpoint::Server,
                Some(o) => {
                    return Err(RpcError::invalid_params(format!(
                        "Parameter 'endpoint' does not accept value '{o}'"
                    )))
                }
            };
            if a.priority.is_some() {
                return Err(RpcError::invalid_params(
                    "Parameter 'priority' is not supported: GnuTLS priority strings have no rustls equivalent",
                ));
            }
            let c = TlsCreds::load(
                &id,
                Path::new(&a.dir),
                endpoint,
                a.verify_peer.unwrap_or(true),
            )
            .map_err(RpcError::invalid_params)?;
            Object::TlsCredsX509(Arc::new(c))
        }
        "authz-simple" => {
            let a: Simple = rest.parse_qapi()?;
            Object::AuthzSimple(Arc::new(AuthzSimple {
                id: id.clone(),
                identity: a.identity,
            }))
        }
        other => {
            return Err(RpcError::invalid_params(format!(
                "Parameter 'qom-type' does not accept value '{other}'"
            )))
        }
    };
    svc.objects
        .add(&id, obj)
        .map_err(RpcError::invalid_params)?;
    Ok(json!({}))
}
