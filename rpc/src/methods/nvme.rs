//! The NVMe methods in SPDK's dialect: `bdev_nvme_attach_controller` (PCIe
//! through VFIO; one bdev `NAMEnN` per active namespace),
//! `bdev_nvme_detach_controller`, `bdev_nvme_get_controllers`,
//! `bdev_nvme_reset_controller` and `bdev_nvme_set_options` (command timeouts
//! and queue sizes for later attaches).

use crate::error::{ErrorClass, RpcError};
use crate::service::Service;
use crate::table::{MethodTable, Params};
use bdev::nvme::NvmeError;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

/// Registers the NVMe methods.
pub fn register(t: &mut MethodTable) {
    t.add("bdev_nvme_attach_controller", attach);
    t.add("bdev_nvme_detach_controller", detach);
    t.add("bdev_nvme_get_controllers", get_controllers);
    t.add("bdev_nvme_reset_controller", reset);
    t.add("bdev_nvme_set_options", set_options);
}

impl From<NvmeError> for RpcError {
    fn from(e: NvmeError) -> Self {
        let class = match &e {
            NvmeError::NotFound(_) | NvmeError::NoDevice(_) => ErrorClass::DeviceNotFound,
            _ => ErrorClass::GenericError,
        };
        match e {
            NvmeError::Bdev(b) => b.into(),
            e => RpcError::errno(e.errno(), e.to_string()).with_class(class),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Attach {
    name: String,
    trtype: String,
    traddr: String,
    // Fabrics and multipath parameters of SPDK: only their neutral values make sense for PCIe.
    adrfam: Option<String>,
    trsvcid: Option<String>,
    subnqn: Option<String>,
    hostnqn: Option<String>,
    hostaddr: Option<String>,
    hostsvcid: Option<String>,
    multipath: Option<String>,
    prchk_reftag: Option<bool>,
    prchk_guard: Option<bool>,
    hdgst: Option<bool>,
    ddgst: Option<bool>,
}

fn attach(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: Attach = p.parse()?;
    if !a.trtype.eq_ignore_ascii_case("pcie") {
        return Err(RpcError::errno(
            libc::ENOTSUP,
            format!("trtype {:?} is not supported (only PCIe)", a.trtype),
        ));
    }
    let fabric = [
        &a.adrfam,
        &a.trsvcid,
        &a.subnqn,
        &a.hostnqn,
        &a.hostaddr,
        &a.hostsvcid,
    ];
    if fabric.iter().any(|v| v.is_some()) {
        return Err(RpcError::invalid_params(
            "adrfam, trsvcid, subnqn, hostnqn, hostaddr and hostsvcid are for fabrics, not PCIe",
        ));
    }
    if a.multipath.as_deref().is_some_and(|m| m != "disable") {
        return Err(RpcError::errno(libc::ENOTSUP, "multipath is not supported"));
    }
    if [a.prchk_reftag, a.prchk_guard, a.hdgst, a.ddgst].contains(&Some(true)) {
        return Err(RpcError::errno(
            libc::ENOTSUP,
            "protection information checks and digests are not supported",
        ));
    }
    let _g = svc.graph.change();
    let names = svc
        .nvme
        .attach_pcie(svc.graph.nodes(), &a.name, &a.traddr, svc.nvme.options())?;
    svc.graph.registered_by_driver(&names);
    Ok(json!(names))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Detach {
    name: String,
    trtype: Option<String>,
    traddr: Option<String>,
    adrfam: Option<String>,
    trsvcid: Option<String>,
    subnqn: Option<String>,
    hostaddr: Option<String>,
    hostsvcid: Option<String>,
}

fn detach(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let d: Detach = p.parse()?;
    let c = svc
        .nvme
        .controller(&d.name)
        .ok_or_else(|| RpcError::from(NvmeError::NotFound(d.name.clone())))?;
    if let Some(t) = &d.traddr {
        if bdev::nvme::pci::normalize(t).ok().as_deref() != Some(c.traddr()) {
            return Err(RpcError::errno(
                libc::ENODEV,
                format!("controller {:?} has no path {t}", d.name),
            ));
        }
    }
    let _ = (
        &d.trtype,
        &d.adrfam,
        &d.trsvcid,
        &d.subnqn,
        &d.hostaddr,
        &d.hostsvcid,
    );
    let bdevs: Vec<String> = c
        .namespaces()
        .iter()
        .map(|n| format!("{}n{}", d.name, n.params.nsid))
        .collect();
    let _g = svc.graph.change();
    svc.nvme.detach(svc.graph.nodes(), &d.name)?;
    svc.graph.unregistered_by_driver(&bdevs);
    Ok(Value::Bool(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ByOptName {
    name: Option<String>,
}

fn get_controllers(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let q: ByOptName = p.parse()?;
    let list = svc.nvme.controllers(q.name.as_deref())?;
    Ok(Value::Array(
        list.into_iter()
            .map(|c| {
                let cntlid = svc
                    .nvme
                    .controller(&c.name)
                    .map(|x| x.data().cntlid)
                    .unwrap_or(0);
                json!({
                    "name": c.name,
                    "ctrlrs": [{
                        "state": c.state,
                        "trid": c.trid,
                        "cntlid": cntlid,
                        "model_number": c.model_number,
                        "serial_number": c.serial_number,
                        "firmware_revision": c.firmware_revision,
                        "bdevs": c.bdevs,
                        "resets": c.resets,
                        "aborts": c.aborts,
                    }]
                })
            })
            .collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ByName {
    name: String,
}

fn reset(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let r: ByName = p.parse()?;
    svc.nvme.reset(&r.name)?;
    Ok(Value::Bool(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetOptions {
    /// I/O command timeout in microseconds (0: none).
    timeout_us: Option<u64>,
    /// Admin command timeout in microseconds.
    timeout_admin_us: Option<u64>,
    /// "none" disables the timeout action; "abort" and "reset" both abort first
    /// and reset when the abort does not bring the command back.
    action_on_timeout: Option<String>,
    /// Entries per I/O queue.
    io_queue_requests: Option<u32>,
}

fn set_options(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let s: SetOptions = p.parse()?;
    let mut o = svc.nvme.options();
    if let Some(t) = s.timeout_us {
        o.io_timeout = Duration::from_micros(t);
    }
    if let Some(t) = s.timeout_admin_us {
        if t == 0 {
            return Err(RpcError::invalid_params(
                "timeout_admin_us must be positive",
            ));
        }
        o.admin_timeout = Duration::from_micros(t);
    }
    match s.action_on_timeout.as_deref() {
        None | Some("abort") | Some("reset") => {}
        Some("none") => o.io_timeout = Duration::ZERO,
        Some(x) => {
            return Err(RpcError::invalid_params(format!(
                "action_on_timeout {x:?}: expected none, reset or abort"
            )))
        }
    }
    if let Some(n) = s.io_queue_requests {
        if !(2..=65535).contains(&n) {
            return Err(RpcError::invalid_params(
                "io_queue_requests must be within 2..=65535",
            ));
        }
        o.io_queue_entries = n as u16;
    }
    svc.nvme.set_options(o);
    Ok(Value::Bool(true))
}
