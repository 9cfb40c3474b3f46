//! A connection to a RADOS cluster (`rados_t`), and the named connections
//! SPDK's `bdev_rbd_register_cluster` keeps for bdevs to share.
//!
//! Connecting blocks (monitors, authentication): call [`Cluster::connect`]
//! off the reactors (an RPC connection thread, a helper thread). A
//! connection is shut down when the last user lets it go, on a thread of its
//! own (so never on a reactor, nor on librbd's callback threads).

use crate::error::RbdError;
use crate::ffi;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// How to connect: SPDK's `bdev_rbd_register_cluster` parameters, which
/// also carry a `blockdev-add` node's (`conf`, `user`, options).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterOptions {
    /// Ceph user without `client.`.
    pub user: Option<String>,
    /// Configuration file (`None`: librados' default search, and none found is fine).
    pub config_file: Option<String>,
    /// Keyring file.
    pub key_file: Option<String>,
    /// `rados_conf_set` options, applied in order after the file.
    pub config: Vec<(String, String)>,
}

/// One connected `rados_t`.
pub struct Cluster {
    handle: ffi::rados_t,
    opts: ClusterOptions,
    /// A refresh of the OSD map is under way ([`Cluster::refresh_osd_map`]).
    refreshing: AtomicBool,
}

// SAFETY: a connected rados_t is used from any thread (librados is
// thread-safe); sluice never mutates its configuration after connecting.
unsafe impl Send for Cluster {}
// SAFETY: as for Send: librados serialises concurrent calls itself.
unsafe impl Sync for Cluster {}

fn cstr(what: &str, s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Invalid(format!("{what}: contains a NUL byte")))
}

impl Cluster {
    /// Connects (blocks: call off the reactors).
    pub fn connect(opts: &ClusterOptions) -> Result<Arc<Cluster>, RbdError> {
        if !crate::available() {
            return Err(RbdError::Unavailable);
        }
        let user = opts.user.as_deref().map(|u| cstr("user", u)).transpose()?;
        let mut h: ffi::rados_t = std::ptr::null_mut();
        // SAFETY: h is a valid out-pointer; user is NUL-terminated or null.
        let r = unsafe {
            ffi::rados_create(
                &mut h,
                user.as_ref().map_or(std::ptr::null(), |u| u.as_ptr()),
            )
        };
        if r < 0 {
            return Err(RbdError::ceph("error initializing", r));
        }
        // From here on, `c` shuts the handle down if anything fails.
        let c = Cluster {
            handle: h,
            opts: opts.clone(),
            refreshing: AtomicBool::new(false),
        };
        c.set("client_mount_timeout", "10")?;
        match &opts.config_file {
            Some(f) => {
                let p = cstr("config_file", f)?;
                // SAFETY: handle is a created, unconnected rados_t; p is NUL-terminated.
                let r = unsafe { ffi::rados_conf_read_file(c.handle, p.as_ptr()) };
                if r < 0 {
                    return Err(RbdError::ceph(format!("error reading conf file {f}"), r));
                }
            }
            None => {
                // QEMU's way: the default search path, a missing file is fine.
                // SAFETY: handle is a created rados_t; a null path means the default search.
                unsafe { ffi::rados_conf_read_file(c.handle, std::ptr::null()) };
            }
        }
        if let Some(k) = &opts.key_file {
            c.set("keyring", k)?;
        }
        for (k, v) in &opts.config {
            c.set(k, v)?;
        }
        // Writes are acknowledged once the OSDs have them: FUA and flush
        // cost nothing more, and nothing acknowledged lives only in this
        // process's memory.
        c.set("rbd_cache", "false")?;
        // SAFETY: handle is a created, configured rados_t.
        let r = unsafe { ffi::rados_connect(c.handle) };
        if r < 0 {
            return Err(RbdError::ceph("error connecting", r));
        }
        Ok(Arc::new(c))
    }

    fn set(&self, k: &str, v: &str) -> Result<(), RbdError> {
        let ck = cstr("config key", k)?;
        let cv = cstr(k, v)?;
        // SAFETY: handle is a created rados_t; both strings are NUL-terminated.
        let r = unsafe { ffi::rados_conf_set(self.handle, ck.as_ptr(), cv.as_ptr()) };
        if r < 0 {
            return Err(RbdError::ceph(format!("invalid conf option {k}"), r));
        }
        Ok(())
    }

    /// The raw handle, for opening pools.
    pub(crate) fn handle(&self) -> ffi::rados_t {
        self.handle
    }

    /// How it was connected.
    pub fn options(&self) -> &ClusterOptions {
        &self.opts
    }

    /// Fetches the newest OSD map, on a thread of its own (one at a time),
    /// after a request timed out (`rados_osd_op_timeout`). librados asks the
    /// monitor for a newer map only for requests outstanding longer than
    /// `objecter_timeout` (10 s); one that times out sooner leaves the map
    /// as it was, so an OSD restarted at a new address would never be
    /// reached again and every retry would time out in turn. Never blocks
    /// the caller (a librbd callback thread or a reactor).
    pub(crate) fn refresh_osd_map(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        let run = move || {
            // SAFETY: the handle is connected and kept alive by `me`.
            let r = unsafe { ffi::rados_wait_for_latest_osdmap(me.handle) };
            if r < 0 {
                tracing::warn!(errno = -r, "rbd: could not refresh the OSD map");
            }
            me.refreshing.store(false, Ordering::Release);
        };
        if std::thread::Builder::new()
            .name("rbd-osdmap".into())
            .spawn(run)
            .is_err()
        {
            self.refreshing.store(false, Ordering::Release);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let h = SendPtr(self.handle);
        let shut = move || {
            let h = h;
            // SAFETY: the last reference is gone: nothing else uses the handle.
            unsafe { ffi::rados_shutdown(h.0) };
        };
        // Never on a reactor or a librbd callback thread: shutting down waits.
        crate::image::spawn_closer("rbd-shutdown", shut);
    }
}

/// A raw pointer moved to another thread that alone uses it from then on.
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: only ever moved to the one thread that then uses the pointer.
unsafe impl<T> Send for SendPtr<T> {}

/// The named clusters of a service (SPDK's `bdev_rbd_register_cluster`).
#[derive(Default)]
pub struct Clusters {
    map: Mutex<BTreeMap<String, Arc<Cluster>>>,
}

impl Clusters {
    /// Connects and registers `name` (blocks: call off the reactors).
    pub fn register(&self, name: &str, opts: ClusterOptions) -> Result<(), RbdError> {
        if name.is_empty() {
            return Err(RbdError::Invalid("name: must not be empty".into()));
        }
        if self.lock().contains_key(name) {
            return Err(RbdError::ClusterExists(name.into()));
        }
        let c = Cluster::connect(&opts)?;
        let mut m = self.lock();
        if m.contains_key(name) {
            return Err(RbdError::ClusterExists(name.into()));
        }
        m.insert(name.into(), c);
        Ok(())
    }

    /// Unregisters `name`; refused while bdevs use it.
    pub fn unregister(&self, name: &str) -> Result<(), RbdError> {
        let mut m = self.lock();
        let c = m
            .get(name)
            .ok_or_else(|| RbdError::NoCluster(name.into()))?;
        let users = Arc::strong_count(c) - 1;
        if users > 0 {
            return Err(RbdError::ClusterBusy {
                name: name.into(),
                users,
            });
        }
        m.remove(name);
        Ok(())
    }

    /// The connection `name`, for a bdev to hold.
    pub fn get(&self, name: &str) -> Result<Arc<Cluster>, RbdError> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| RbdError::NoCluster(name.into()))
    }

    /// SPDK's `bdev_rbd_get_clusters_info`: one cluster's object, or all of them.
    pub fn info(&self, name: Option<&str>) -> Result<Value, RbdError> {
        let m = self.lock();
        let one = |n: &str, c: &Cluster| {
            let o = c.options();
            let mut v = json!({ "cluster_name": n });
            if let Some(u) = &o.user {
                v["user_id"] = json!(u);
            }
            if !o.config.is_empty() {
                let cp: serde_json::Map<String, Value> = o
                    .config
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::from(v.clone())))
                    .collect();
                v["config_param"] = Value::Object(cp);
            }
            if let Some(f) = &o.config_file {
                v["config_file"] = json!(f);
            }
            if let Some(f) = &o.key_file {
                v["key_file"] = json!(f);
            }
            v
        };
        match name {
            Some(n) => {
                let c = m.get(n).ok_or_else(|| RbdError::NoCluster(n.into()))?;
                Ok(one(n, c))
            }
            None => Ok(Value::Array(m.iter().map(|(n, c)| one(n, c)).collect())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Cluster>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// QEMU's `BlockdevOptionsRbd` members that [`crate::RbdConfig::from_options`] reads.
pub const BLOCKDEV_OPTIONS: &[&str] = &[
    "pool",
    "namespace",
    "image",
    "snapshot",
    "conf",
    "user",
    "server",
    "auth-client-required",
];
