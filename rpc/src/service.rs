//! The state every RPC handler reaches: the runtime, the event bus, the method
//! table, and each subsystem's state (added by the subsystems). It is the one
//! context handed down to handlers and start-up code: nothing a handler
//! drives lives in a process-wide static, so two services can live in one
//! process.

use crate::table::MethodTable;
use graph::events::EventBus;
use reactor::RuntimeHandle;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock};

/// Why the service is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGINT / SIGTERM.
    Signal(i32),
    /// `spdk_kill_instance` or QMP `quit`.
    Rpc,
}

/// Shared service state.
pub struct Service {
    /// The reactors.
    pub rt: RuntimeHandle,
    /// Events for QMP and `notify_get_notifications`.
    pub events: EventBus,
    /// Runtime files (pid file, default sockets).
    pub runtime_dir: PathBuf,
    /// The method table (set once at start-up).
    pub table: OnceLock<Arc<MethodTable>>,
    /// The block graph: every node, its claims, the monitor's records, the
    /// serialisation of graph changes (publishes on `events`).
    pub graph: Arc<graph::Graph>,
    /// Block jobs (they publish on `events`).
    pub jobs: jobs::job::JobManager,
    /// The NBD server (`nbd-server-start`, `block-export-add`, `--nbd-listen`).
    pub nbd: nbd::NbdServer,
    /// The vhost-user-blk exports (`block-export-add` type `vhost-user-blk`,
    /// SPDK's `vhost_*_controller`).
    pub vhost: vublk::VhostServer,
    /// Attached NVMe controllers and the options for the next attaches.
    pub nvme: bdev::nvme::NvmeControllers,
    /// How copying jobs copy: read from the environment once, at start-up.
    pub tuning: jobs::copy::Tuning,
    /// SPDK's named RADOS clusters (`bdev_rbd_register_cluster`).
    pub rbd: rbd::Clusters,
    /// User-created objects (`object-add`: TLS credentials, authorization).
    pub objects: crate::objects::Objects,
    stop: Mutex<Option<Sender<StopReason>>>,
}

impl Service {
    /// A service over running reactors.
    pub fn new(rt: RuntimeHandle, runtime_dir: PathBuf, stop: Sender<StopReason>) -> Arc<Self> {
        let events = EventBus::default();
        let graph = graph::Graph::new(rt.clone(), events.clone());
        publish_corruption(&graph);
        nbd::client::register_backing_protocol();
        nbd::client::piece_from_env(|k| std::env::var(k).ok());
        rbd::register_backing_protocol();
        let weak = Arc::downgrade(&graph);
        graph::qemu_name::register_describer(Arc::new(move |b| {
            weak.upgrade()
                .and_then(|g| crate::methods::blockdev::describe_node(&g, b))
        }));
        Arc::new(Self {
            nvme: bdev::nvme::NvmeControllers::new(rt.clone()),
            graph,
            rt,
            jobs: jobs::job::JobManager::new(crate::methods::job_qapi::sink(events.clone())),
            tuning: jobs::copy::Tuning::from_env(|k| std::env::var(k).ok()),
            objects: Default::default(),
            nbd: nbd::NbdServer::default(),
            rbd: rbd::Clusters::default(),
            vhost: vublk::VhostServer::default(),
            events,
            runtime_dir,
            table: OnceLock::new(),
            stop: Mutex::new(Some(stop)),
        })
    }

    /// Asks the daemon to stop.
    pub fn request_stop(&self, why: StopReason) {
        if let Some(tx) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(why);
        }
    }

    /// The method table.
    pub fn table(&self) -> Arc<MethodTable> {
        self.table.get().cloned().unwrap_or_default()
    }
}

/// Publishes QEMU's `BLOCK_IMAGE_CORRUPTED` on `events` for every qcow2 image
/// found corrupt (`device`: the device whose root the image is, else `""`).
fn publish_corruption(g: &Arc<graph::Graph>) {
    let events = g.events().clone();
    let nodes = g.nodes().clone();
    bdev::qcow2::on_corruption(move |c| {
        let device = bdev::device::Device::find_by_root(&nodes, &c.node)
            .map(|d| d.name().to_string())
            .unwrap_or_default();
        let mut data = serde_json::json!({
            "device": device,
            "node-name": c.node,
            "msg": c.msg,
            "fatal": c.fatal,
        });
        if let (Some(o), Some(s)) = (c.offset, c.size) {
            data["offset"] = o.into();
            data["size"] = s.into();
        }
        events.publish("BLOCK_IMAGE_CORRUPTED", data);
    });
}
