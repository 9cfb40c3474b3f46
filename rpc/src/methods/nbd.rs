//! The NBD export's methods, in QEMU's names: `nbd-server-start`,
//! `nbd-server-stop`, `block-export-add` (type `nbd`), `block-export-del`,
//! `query-block-exports`.

use crate::error::RpcError;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use nbd::{ExportConfig, ListenAddr, StartOptions};
use serde::Deserialize;
use serde_json::{json, Value};

/// Registers the NBD methods.
pub fn register(t: &mut MethodTable) {
    t.add("nbd-server-start", nbd_server_start);
    t.add("nbd-server-stop", |svc, p| {
        p.none()?;
        svc.nbd.stop()?;
        Ok(json!({}))
    });
    t.add("block-export-add", block_export_add);
    t.add("block-export-del", block_export_del);
    t.add("query-block-exports", |svc, p| {
        p.none()?;
        let vhost = svc.vhost.exports().into_iter().filter(|e| !e.cfg.spdk);
        Ok(Value::Array(
            svc.nbd
                .exports()
                .iter()
                .map(|e| e.to_qmp())
                .chain(vhost.map(|e| e.to_qmp()))
                .collect(),
        ))
    });
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct StartParams {
    addr: Value,
    tls_creds: Option<String>,
    tls_authz: Option<String>,
    max_connections: Option<u32>,
}

fn nbd_server_start(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let p: StartParams = p.parse()?;
    let tls = p
        .tls_creds
        .as_deref()
        .map(|id| server_creds(svc, id))
        .transpose()?;
    let authz = match (&p.tls_authz, &tls) {
        (Some(_), None) => {
            return Err(RpcError::invalid_params(
                "'tls-authz' is supported only when 'tls-creds' is set",
            ))
        }
        (Some(id), Some(_)) => Some(svc.objects.authz(id).map_err(RpcError::invalid_params)?),
        (None, _) => None,
    };
    let addr = ListenAddr::from_qmp(&p.addr)?;
    let opts = StartOptions {
        max_connections: p.max_connections.unwrap_or(0),
        allow_remote: false,
        tls,
        authz,
    };
    svc.nbd
        .start(&svc.rt, Some(svc.events.clone()), &[addr], opts)?;
    Ok(json!({}))
}

/// The server credentials `id`, in QEMU's words when missing or made for a client.
fn server_creds(svc: &Service, id: &str) -> Result<std::sync::Arc<nbd::tls::TlsCreds>, RpcError> {
    let c = svc
        .objects
        .tls_creds(id)
        .map_err(RpcError::invalid_params)?;
    if c.endpoint != nbd::tls::Endpoint::Server {
        return Err(RpcError::invalid_params(
            c.wrong_endpoint(nbd::tls::Endpoint::Server),
        ));
    }
    Ok(c)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ExportAddParams {
    #[serde(rename = "type")]
    ty: String,
    id: String,
    node_name: Option<String>,
    /// Accepted as another spelling of `node-name`.
    device: Option<String>,
    name: Option<String>,
    description: Option<String>,
    writable: Option<bool>,
    /// Every write is durable before its reply (as if sent with FUA).
    writethrough: Option<bool>,
    bitmaps: Option<Vec<Value>>,
    allocation_depth: Option<bool>,
    /// Connections run on every reactor; the iothread choice is accepted and unused.
    #[allow(dead_code)]
    iothread: Option<String>,
    #[allow(dead_code)]
    fixed_iothread: Option<bool>,
}

fn block_export_add(svc: &Service, p: Params) -> Result<Value, RpcError> {
    if p.0.as_ref().and_then(|v| v.get("type")) == Some(&json!("vhost-user-blk")) {
        return vhost_export_add(svc, p);
    }
    let p: ExportAddParams = p.parse()?;
    if p.ty != "nbd" {
        return Err(RpcError::invalid_params(format!(
            "block export type '{}' is not supported (only 'nbd')",
            p.ty
        )));
    }
    let node = match (p.node_name, p.device) {
        (Some(n), None) | (None, Some(n)) => n,
        (Some(_), Some(_)) => {
            return Err(RpcError::invalid_params(
                "give 'node-name' or 'device', not both",
            ))
        }
        (None, None) => return Err(RpcError::invalid_params("parameter 'node-name' is missing")),
    };
    if p.bitmaps.is_some_and(|b| !b.is_empty()) {
        return Err(RpcError::invalid_params(
            "exporting dirty bitmaps is not supported",
        ));
    }
    if p.allocation_depth == Some(true) {
        return Err(RpcError::invalid_params(
            "the qemu:allocation-depth context is not supported",
        ));
    }
    let cfg = ExportConfig {
        id: p.id,
        name: p.name.unwrap_or_else(|| node.clone()),
        node,
        description: p.description.unwrap_or_default(),
        writable: p.writable.unwrap_or(false),
        writethrough: p.writethrough.unwrap_or(false),
    };
    // Not while a snapshot of a plain node moves that node's exports.
    let _g = svc.graph.change();
    svc.nbd.add_export(svc.graph.nodes(), cfg)?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportDelParams {
    id: String,
    mode: Option<String>,
}

fn block_export_del(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let p: ExportDelParams = p.parse()?;
    let vhost = svc.vhost.contains(&p.id);
    let hard = match p.mode.as_deref() {
        None | Some("safe") => false,
        Some("hard") => true,
        Some(m) => {
            return Err(RpcError::invalid_params(format!(
                "invalid parameter 'mode': '{m}' (use 'safe' or 'hard')"
            )))
        }
    };
    if vhost || !svc.nbd.is_running() {
        svc.vhost.del(&p.id, hard)?;
    } else {
        svc.nbd.del_export(&p.id, hard)?;
    }
    Ok(json!({}))
}

/// `block-export-add` of type `vhost-user-blk`, as qemu-storage-daemon takes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct VhostExportParams {
    #[serde(rename = "type")]
    _ty: String,
    id: String,
    node_name: String,
    addr: VhostAddr,
    writable: Option<bool>,
    writethrough: Option<bool>,
    num_queues: Option<u16>,
    logical_block_size: Option<u32>,
    /// Queues run on the reactors; the iothread choice is accepted and unused.
    #[allow(dead_code)]
    iothread: Option<Value>,
    #[allow(dead_code)]
    fixed_iothread: Option<bool>,
}

#[derive(Deserialize)]
struct VhostAddr {
    #[serde(rename = "type")]
    ty: String,
    path: Option<String>,
}

fn vhost_export_add(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let p: VhostExportParams = p.parse_qapi()?;
    let path = match (p.addr.ty.as_str(), p.addr.path) {
        ("unix", Some(path)) => path,
        ("unix", None) => return Err(RpcError::invalid_params("Parameter 'addr.path' is missing")),
        _ => {
            return Err(RpcError::invalid_params(
                "Only socket address type 'unix' is supported",
            ))
        }
    };
    let cfg = vublk::ExportConfig {
        id: p.id,
        node: p.node_name,
        path: path.into(),
        writable: p.writable.unwrap_or(false),
        num_queues: p.num_queues.unwrap_or(1),
        logical_block_size: p.logical_block_size.unwrap_or(512),
        writethrough: p.writethrough.unwrap_or(false),
        spdk: false,
    };
    let _g = svc.graph.change();
    svc.vhost
        .add(&svc.rt, svc.graph.nodes(), Some(svc.events.clone()), cfg)?;
    Ok(json!({}))
}
