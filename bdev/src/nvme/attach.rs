//! The table of attached controllers: attach (VFIO or any register/DMA pair),
//! detach, reset and listing; each active namespace becomes a bdev.

use super::bdev::NvmeBdev;
use super::ctrlr::{Controller, CtrlrOpts, CtrlrState};
use super::error::NvmeError;
use super::mem::DmaSpace;
use super::regs::RegisterIo;
use crate::Registry;
use reactor::RuntimeHandle;
use serde::Serialize;
use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

fn table() -> &'static Mutex<BTreeMap<String, Arc<Controller>>> {
    static T: OnceLock<Mutex<BTreeMap<String, Arc<Controller>>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(BTreeMap::new()))
}

fn lock() -> std::sync::MutexGuard<'static, BTreeMap<String, Arc<Controller>>> {
    table().lock().unwrap_or_else(|p| p.into_inner())
}

/// Attaches the NVMe controller at PCI address `traddr` (bound to vfio-pci) as
/// `name`; returns the names of the namespace bdevs (`NAMEnN`). Blocks the
/// calling thread, which must not be a reactor.
pub fn attach_pcie(
    nodes: &Registry,
    rt: &RuntimeHandle,
    name: &str,
    traddr: &str,
    opts: CtrlrOpts,
) -> Result<Vec<String>, NvmeError> {
    check_name(name)?;
    let addr = super::pci::normalize(traddr)?;
    if let Some(c) = lock().values().find(|c| c.traddr() == addr) {
        return Err(NvmeError::InvalidParam(format!(
            "{addr} is already attached as {:?}",
            c.name()
        )));
    }
    let dev = super::vfio::VfioNvme::open(&addr)?;
    let (regs, dma) = (dev.regs(), dev.dma());
    attach_with(nodes, rt, name, &addr, regs, dma, opts, Some(Box::new(dev)))
}

fn check_name(name: &str) -> Result<(), NvmeError> {
    if name.is_empty() || name.contains(['/', ' ']) {
        return Err(NvmeError::InvalidParam(format!(
            "name {name:?}: must be non-empty, without '/' or spaces"
        )));
    }
    if lock().contains_key(name) {
        return Err(NvmeError::Exists(name.into()));
    }
    Ok(())
}

/// Attaches a controller reached through `regs` and `dma` (the VFIO path above,
/// or a software controller in tests), keeping `backend` alive until detach.
// The registry the namespaces join is handed in (no process-wide one).
#[allow(clippy::too_many_arguments)]
pub fn attach_with(
    nodes: &Registry,
    rt: &RuntimeHandle,
    name: &str,
    traddr: &str,
    regs: Arc<dyn RegisterIo>,
    dma: Arc<dyn DmaSpace>,
    opts: CtrlrOpts,
    backend: Option<Box<dyn Any + Send>>,
) -> Result<Vec<String>, NvmeError> {
    check_name(name)?;
    let ctrlr = Controller::init(name, traddr, regs, dma, rt, opts, backend)?;
    let mut names: Vec<String> = Vec::new();
    for (i, ns) in ctrlr.namespaces().iter().enumerate() {
        let b = Arc::new(NvmeBdev::new(ctrlr.clone(), ns.clone(), i == 0));
        let bname = crate::Bdev::name(b.as_ref()).to_string();
        if let Err(e) = nodes.register(b) {
            for n in &names {
                let _ = nodes.delete(n, rt);
            }
            ctrlr.shutdown();
            return Err(e.into());
        }
        names.push(bname);
    }
    let mut t = lock();
    if t.contains_key(name) {
        drop(t);
        for n in &names {
            let _ = nodes.delete(n, rt);
        }
        ctrlr.shutdown();
        return Err(NvmeError::Exists(name.into()));
    }
    t.insert(name.to_string(), ctrlr);
    tracing::info!(ctrlr = %name, %traddr, bdevs = ?names, "NVMe controller attached");
    Ok(names)
}

/// Detaches controller `name`: deletes its namespace bdevs (refused while a
/// layer above claims one), fails I/O still in flight with `Aborted`, shuts the
/// controller down and releases the device. Blocks the calling (non-reactor) thread.
pub fn detach(nodes: &Registry, rt: &RuntimeHandle, name: &str) -> Result<(), NvmeError> {
    let ctrlr = lock()
        .get(name)
        .cloned()
        .ok_or_else(|| NvmeError::NotFound(name.into()))?;
    let bdevs: Vec<String> = ctrlr
        .namespaces()
        .iter()
        .map(|n| format!("{}n{}", name, n.params.nsid))
        .collect();
    for b in &bdevs {
        let claims = nodes.claims(b);
        if !claims.is_empty() {
            return Err(NvmeError::Bdev(crate::BdevError::Claimed {
                name: b.clone(),
                by: claims.join(", "),
            }));
        }
    }
    for b in &bdevs {
        match nodes.delete(b, rt) {
            Ok(()) | Err(crate::BdevError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    ctrlr.shutdown();
    lock().remove(name);
    Ok(())
}

/// Resets controller `name` (queues rebuilt, in-flight I/O retried). Blocks.
pub fn reset(name: &str) -> Result<(), NvmeError> {
    let ctrlr = lock()
        .get(name)
        .cloned()
        .ok_or_else(|| NvmeError::NotFound(name.into()))?;
    ctrlr.reset()
}

/// The controller named `name`.
pub fn controller(name: &str) -> Option<Arc<Controller>> {
    lock().get(name).cloned()
}

/// What `bdev_nvme_get_controllers` reports of one controller.
#[derive(Debug, Clone, Serialize)]
pub struct ControllerInfo {
    /// Name.
    pub name: String,
    /// Transport id.
    pub trid: Trid,
    /// State ("enabled", "resetting", "failed", "deleting").
    pub state: &'static str,
    /// Model, serial, firmware.
    pub model_number: String,
    /// Serial number.
    pub serial_number: String,
    /// Firmware revision.
    pub firmware_revision: String,
    /// Namespace bdevs.
    pub bdevs: Vec<String>,
    /// Resets so far.
    pub resets: u64,
    /// Aborts sent so far.
    pub aborts: u64,
}

/// SPDK's transport id.
#[derive(Debug, Clone, Serialize)]
pub struct Trid {
    /// Always "PCIe".
    pub trtype: &'static str,
    /// PCI address.
    pub traddr: String,
}

/// Every attached controller (or only `name`).
pub fn controllers(name: Option<&str>) -> Result<Vec<ControllerInfo>, NvmeError> {
    let t = lock();
    if let Some(n) = name {
        if !t.contains_key(n) {
            return Err(NvmeError::NotFound(n.into()));
        }
    }
    Ok(t.values()
        .filter(|c| name.is_none_or(|n| n == c.name()))
        .map(|c| ControllerInfo {
            name: c.name().to_string(),
            trid: Trid {
                trtype: "PCIe",
                traddr: c.traddr().to_string(),
            },
            state: match c.state() {
                CtrlrState::Enabled => "enabled",
                CtrlrState::Resetting => "resetting",
                CtrlrState::Failed => "failed",
                CtrlrState::Detached => "deleting",
            },
            model_number: c.data().mn.clone(),
            serial_number: c.data().sn.clone(),
            firmware_revision: c.data().fr.clone(),
            bdevs: c
                .namespaces()
                .iter()
                .map(|n| format!("{}n{}", c.name(), n.params.nsid))
                .collect(),
            resets: c.reset_count(),
            aborts: c.abort_count(),
        })
        .collect())
}
