//! The table of attached controllers: attach (VFIO or any register/DMA pair),
//! detach, reset and listing; each active namespace becomes a bdev.
//!
//! The table is a value, [`NvmeControllers`], that its owner (the RPC service)
//! passes where it is needed; it also holds the options `bdev_nvme_set_options`
//! sets for later attaches. No process-wide state: two services in one process
//! each have their own controllers, whose namespace bdevs join the registry
//! handed to `attach_*`.

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
use std::sync::{Arc, Mutex, MutexGuard};

/// The attached controllers of one runtime by name, and the options for the
/// next attaches.
pub struct NvmeControllers {
    rt: RuntimeHandle,
    table: Mutex<BTreeMap<String, Arc<Controller>>>,
    opts: Mutex<CtrlrOpts>,
}

impl std::fmt::Debug for NvmeControllers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeControllers")
            .field("controllers", &self.lock().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl NvmeControllers {
    /// No controller yet, default options; controllers attached later run
    /// their queue pairs on `rt`'s reactors.
    pub fn new(rt: RuntimeHandle) -> Self {
        Self {
            rt,
            table: Mutex::default(),
            opts: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Controller>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The options for controllers attached from now on (`bdev_nvme_set_options`).
    pub fn options(&self) -> CtrlrOpts {
        self.opts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the options for controllers attached from now on.
    pub fn set_options(&self, opts: CtrlrOpts) {
        *self.opts.lock().unwrap_or_else(|p| p.into_inner()) = opts;
    }

    /// Attaches the NVMe controller at PCI address `traddr` (bound to vfio-pci) as
    /// `name`; returns the names of the namespace bdevs (`NAMEnN`). Blocks the
    /// calling thread, which must not be a reactor.
    pub fn attach_pcie(
        &self,
        nodes: &Registry,
        name: &str,
        traddr: &str,
        opts: CtrlrOpts,
    ) -> Result<Vec<String>, NvmeError> {
        self.check_name(name)?;
        let addr = super::pci::normalize(traddr)?;
        if let Some(c) = self.lock().values().find(|c| c.traddr() == addr) {
            return Err(NvmeError::InvalidParam(format!(
                "{addr} is already attached as {:?}",
                c.name()
            )));
        }
        let dev = super::vfio::VfioNvme::open(&addr)?;
        let (regs, dma) = (dev.regs(), dev.dma());
        self.attach_with(nodes, name, &addr, regs, dma, opts, Some(Box::new(dev)))
    }

    fn check_name(&self, name: &str) -> Result<(), NvmeError> {
        if name.is_empty() || name.contains(['/', ' ']) {
            return Err(NvmeError::InvalidParam(format!(
                "name {name:?}: must be non-empty, without '/' or spaces"
            )));
        }
        if self.lock().contains_key(name) {
            return Err(NvmeError::Exists(name.into()));
        }
        Ok(())
    }

    /// Attaches a controller reached through `regs` and `dma` (the VFIO path above,
    /// or a software controller in tests), keeping `backend` alive until detach.
    // The registry the namespaces join is handed in (no process-wide one).
    #[allow(clippy::too_many_arguments)]
    pub fn attach_with(
        &self,
        nodes: &Registry,
        name: &str,
        traddr: &str,
        regs: Arc<dyn RegisterIo>,
        dma: Arc<dyn DmaSpace>,
        opts: CtrlrOpts,
        backend: Option<Box<dyn Any + Send>>,
    ) -> Result<Vec<String>, NvmeError> {
        self.check_name(name)?;
        let ctrlr = Controller::init(name, traddr, regs, dma, &self.rt, opts, backend)?;
        let mut names: Vec<String> = Vec::new();
        for (i, ns) in ctrlr.namespaces().iter().enumerate() {
            let b = Arc::new(NvmeBdev::new(ctrlr.clone(), ns.clone(), i == 0));
            let bname = crate::Bdev::name(b.as_ref()).to_string();
            if let Err(e) = nodes.register(b) {
                for n in &names {
                    let _ = nodes.delete(n, &self.rt);
                }
                ctrlr.shutdown();
                return Err(e.into());
            }
            names.push(bname);
        }
        let mut t = self.lock();
        if t.contains_key(name) {
            drop(t);
            for n in &names {
                let _ = nodes.delete(n, &self.rt);
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
    pub fn detach(&self, nodes: &Registry, name: &str) -> Result<(), NvmeError> {
        let ctrlr = self
            .lock()
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
            match nodes.delete(b, &self.rt) {
                Ok(()) | Err(crate::BdevError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        ctrlr.shutdown();
        self.lock().remove(name);
        Ok(())
    }

    /// Resets controller `name` (queues rebuilt, in-flight I/O retried). Blocks.
    pub fn reset(&self, name: &str) -> Result<(), NvmeError> {
        let ctrlr = self
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| NvmeError::NotFound(name.into()))?;
        ctrlr.reset()
    }

    /// The controller named `name`.
    pub fn controller(&self, name: &str) -> Option<Arc<Controller>> {
        self.lock().get(name).cloned()
    }

    /// Every attached controller (or only `name`).
    pub fn controllers(&self, name: Option<&str>) -> Result<Vec<ControllerInfo>, NvmeError> {
        let t = self.lock();
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
