//! An export: a named, optionally writable view of a bdev (or device) over NBD,
//! and the bookkeeping of the connections attached to it.

use bdev::device::Device;
use bdev::{Bdev, IoType};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use super::proto::{tflags, MAX_PAYLOAD};

/// A stop request for one connection, settable from any thread.
#[derive(Default)]
pub struct Kick {
    set: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Kick {
    /// Records the connection task's waker (once, at its start).
    pub fn set_waker(&self, w: &Waker) {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(w.clone());
    }
    /// Asks the connection to finish its in-flight requests and close.
    pub fn kick(&self) {
        self.set.store(true, Ordering::SeqCst);
        if let Some(w) = self
            .waker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            w.wake_by_ref();
        }
    }
    /// Whether a stop was asked for.
    #[inline]
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Relaxed)
    }
}

type OnGone = Box<dyn FnOnce() + Send>;

struct State {
    conns: usize,
    closing: bool,
    kicks: Vec<Weak<Kick>>,
    on_gone: Option<OnGone>,
}

/// What `block-export-add` asked for.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// Export id (QEMU's `id`).
    pub id: String,
    /// The bdev or device exported (QEMU's `node-name`).
    pub node: String,
    /// The name clients ask for (defaults to the node name).
    pub name: String,
    /// Free text shown by `nbdinfo`.
    pub description: String,
    /// Whether clients may write.
    pub writable: bool,
    /// Write-through (QEMU's `writethrough`: the export's write cache off):
    /// every write, write-zeroes and trim is done as if the client had set
    /// FUA, so it is durable, with its metadata, before the reply.
    pub writethrough: bool,
}

/// A live export.
pub struct Export {
    /// Its configuration.
    pub cfg: ExportConfig,
    /// The exported bdev: a device as it is (it keeps its identity across
    /// root switches), a plain node through a hidden device over it.
    pub bdev: Arc<dyn Bdev>,
    closing_flag: AtomicBool,
    state: Mutex<State>,
    /// Signalled whenever a connection detaches.
    detached: Condvar,
}

/// Keeps a connection counted on its export; dropping it detaches.
pub struct Attached {
    export: Arc<Export>,
    kick: Weak<Kick>,
}

impl Export {
    /// A new export; `on_gone` runs (on some thread) once it is closed and its last
    /// connection has gone.
    pub fn new(cfg: ExportConfig, bdev: Arc<dyn Bdev>, on_gone: OnGone) -> Arc<Export> {
        Arc::new(Export {
            cfg,
            bdev,
            closing_flag: AtomicBool::new(false),
            state: Mutex::new(State {
                conns: 0,
                closing: false,
                kicks: Vec::new(),
                on_gone: Some(on_gone),
            }),
            detached: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the export is being removed.
    pub fn is_closing(&self) -> bool {
        self.closing_flag.load(Ordering::SeqCst)
    }

    /// Connections attached now.
    pub fn connections(&self) -> usize {
        self.lock().conns
    }

    /// A safe close: waits up to `grace` for every connection to detach, then
    /// closes the export in the same critical section (no client can attach in
    /// between). Returns false, leaving the export open, if clients remain. A
    /// client that has just closed its socket is still counted until its
    /// reactor sees the end of stream, so callers give it this moment.
    pub fn close_when_idle(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        let gone = {
            let mut st = self.lock();
            while st.conns > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                st = self
                    .detached
                    .wait_timeout(st, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            st.closing = true;
            self.closing_flag.store(true, Ordering::SeqCst);
            st.on_gone.take()
        };
        if let Some(f) = gone {
            f();
        }
        true
    }

    /// Attaches a connection, unless the export is closing.
    pub fn attach(self: &Arc<Self>, kick: &Arc<Kick>) -> Option<Attached> {
        let mut st = self.lock();
        if st.closing {
            return None;
        }
        st.conns += 1;
        st.kicks.retain(|k| k.strong_count() > 0);
        st.kicks.push(Arc::downgrade(kick));
        Some(Attached {
            export: self.clone(),
            kick: Arc::downgrade(kick),
        })
    }

    /// Stops taking connections and asks every attached connection to finish
    /// what is in flight and close (a safe close is [`Export::close_when_idle`]).
    /// The export goes once none is left.
    pub fn close_hard(&self) {
        let gone = {
            let mut st = self.lock();
            if !st.closing {
                st.closing = true;
                self.closing_flag.store(true, Ordering::SeqCst);
            }
            for k in st.kicks.iter().filter_map(Weak::upgrade) {
                k.kick();
            }
            if st.conns == 0 {
                st.on_gone.take()
            } else {
                None
            }
        };
        if let Some(f) = gone {
            f();
        }
    }

    /// The node the export is attached to now: the current root of the
    /// hidden device of a plain node's export, else the exported bdev.
    pub fn node_name(&self) -> String {
        match Device::from_bdev(&self.bdev) {
            Some(d) if d.is_hidden() => d.root().name().to_string(),
            _ => self.cfg.node.clone(),
        }
    }

    /// The transmission flags for a connection.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = tflags::HAS_FLAGS
            | tflags::SEND_FLUSH
            | tflags::SEND_FUA
            | tflags::SEND_WRITE_ZEROES
            | tflags::SEND_CACHE
            | tflags::CAN_MULTI_CONN;
        if !self.cfg.writable {
            f |= tflags::READ_ONLY;
        }
        if self.bdev.io_type_supported(IoType::Unmap) {
            f |= tflags::SEND_TRIM;
        }
        if structured {
            f |= tflags::SEND_DF;
        }
        f
    }

    /// Minimum, preferred and maximum block sizes (`NBD_INFO_BLOCK_SIZE`).
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let min = self.bdev.block_size().clamp(1, 64 * 1024);
        let min = if min.is_power_of_two() { min } else { 512 };
        let pref = min.max(4096);
        let max = MAX_PAYLOAD / min * min;
        (min, pref, max)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let gone = {
            let mut st = self.export.lock();
            st.conns = st.conns.saturating_sub(1);
            let me = self.kick.as_ptr();
            st.kicks
                .retain(|k| k.strong_count() > 0 && k.as_ptr() != me);
            if st.closing && st.conns == 0 {
                st.on_gone.take()
            } else {
                None
            }
        };
        self.export.detached.notify_all();
        if let Some(f) = gone {
            f();
        }
    }
}

impl Attached {
    /// The export.
    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }
}
