//! SPDK's vhost-user-blk controllers: `vhost_create_blk_controller`,
//! `vhost_delete_controller`, `vhost_get_controllers`,
//! `vhost_controller_set_coalescing` (any export's id is a controller name
//! for it, whichever dialect added the export). A controller is a
//! vhost-user-blk export (`vublk`) whose socket is `<runtime dir>/<ctrlr>`, as
//! SPDK puts it in its `-S` directory. QMP's `block-export-add` type
//! `vhost-user-blk` is in `nbd.rs`, beside the other export types.

use crate::error::RpcError;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use serde::Deserialize;
use serde_json::{json, Value};

/// Registers the vhost methods.
pub fn register(t: &mut MethodTable) {
    t.add("vhost_create_blk_controller", create);
    t.add("vhost_delete_controller", delete);
    t.add("vhost_get_controllers", list);
    t.add("vhost_controller_set_coalescing", set_coalescing);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateParams {
    ctrlr: String,
    dev_name: String,
    /// Queues spread over every reactor; the mask is accepted and unused.
    #[allow(dead_code)]
    cpumask: Option<String>,
    readonly: Option<bool>,
    packed_ring: Option<bool>,
    transport: Option<String>,
}

fn create(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let p: CreateParams = p.parse()?;
    if p.packed_ring == Some(true) {
        return Err(RpcError::invalid_params("packed rings are not supported"));
    }
    if let Some(t) = p.transport.as_deref().filter(|t| *t != "vhost_user_blk") {
        return Err(RpcError::invalid_params(format!(
            "unknown transport '{t}' (only 'vhost_user_blk')"
        )));
    }
    if p.ctrlr.is_empty() || p.ctrlr.contains('/') || p.ctrlr.starts_with('.') {
        return Err(RpcError::invalid_params(format!(
            "invalid controller name '{}'",
            p.ctrlr
        )));
    }
    let cfg = vublk::ExportConfig {
        path: svc.runtime_dir.join(&p.ctrlr),
        id: p.ctrlr,
        node: p.dev_name,
        writable: !p.readonly.unwrap_or(false),
        num_queues: u16::try_from(svc.rt.num_reactors()).unwrap_or(1).max(1),
        logical_block_size: 512,
        writethrough: false,
        spdk: true,
    };
    let _g = svc.graph.change();
    svc.vhost
        .add(&svc.rt, svc.graph.nodes(), Some(svc.events.clone()), cfg)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteParams {
    ctrlr: String,
}

fn delete(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let p: DeleteParams = p.parse()?;
    svc.vhost.del(&p.ctrlr, false)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    name: Option<String>,
}

fn list(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let p: ListParams = p.parse()?;
    let all = svc.vhost.exports();
    if let Some(n) = &p.name {
        if !all.iter().any(|e| &e.cfg.id == n) {
            return Err(RpcError::errno(
                libc::ENODEV,
                format!("vhost controller '{n}' does not exist"),
            ));
        }
    }
    Ok(Value::Array(
        all.iter()
            .filter(|e| p.name.as_ref().is_none_or(|n| &e.cfg.id == n))
            .map(|e| e.to_spdk())
            .collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CoalescingParams {
    ctrlr: String,
    delay_base_us: u32,
    iops_threshold: u32,
}

fn set_coalescing(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let p: CoalescingParams = p.parse()?;
    svc.vhost
        .set_coalescing(&p.ctrlr, p.delay_base_us, p.iops_threshold)
        .map_err(|e| match e {
            vublk::VublkError::NoSuchExport(_) => RpcError::errno(
                libc::ENODEV,
                format!("vhost controller '{}' does not exist", p.ctrlr),
            ),
            e => e.into(),
        })?;
    Ok(json!(true))
}
