//! An open RBD image (`rbd_image_t` in its pool's `rados_ioctx_t`) and its
//! blocking calls: open, size, resize, allocation (`rbd_diff_iterate2`),
//! close. Every one of these blocks on the cluster: they run off the
//! reactors ([`off_reactor`]). The data path's `rbd_aio_*` calls, which do
//! not block, are in [`crate::bdev`].

use crate::cluster::{Cluster, SendPtr};
use crate::config::RbdConfig;
use crate::error::RbdError;
use crate::ffi;
use crate::status::StatusCache;
use std::ffi::CString;
use std::sync::Arc;

/// An open image; closed (on a thread of its own) when the last reference goes.
pub struct Image {
    pub(crate) h: ffi::rbd_image_t,
    /// The eventfd librbd signals completions on, when it does
    /// ([`Image::set_notification`]); closed after the image.
    pub(crate) efd: Option<std::os::fd::OwnedFd>,
    /// The last allocation answer, and what makes it stale.
    pub(crate) status: StatusCache,
    io: ffi::rados_ioctx_t,
    // Keeps the connection up while the image is open (taken by the close).
    cluster: Option<Arc<Cluster>>,
}

// SAFETY: librbd takes calls on one open image from any thread at once.
unsafe impl Send for Image {}
// SAFETY: as for Send; the handle's state is librbd's, behind its own locks.
unsafe impl Sync for Image {}

fn cstr(what: &str, s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Invalid(format!("{what}: contains a NUL byte")))
}

impl Image {
    /// Opens `cfg`'s image over `cluster` (blocks). A snapshot is opened
    /// read-only whatever `read_only` says.
    pub fn open(
        cluster: Arc<Cluster>,
        cfg: &RbdConfig,
        read_only: bool,
    ) -> Result<Image, RbdError> {
        let pool = cstr("pool", &cfg.pool)?;
        let mut io: ffi::rados_ioctx_t = std::ptr::null_mut();
        // SAFETY: the cluster is connected; pool is NUL-terminated; io an out-pointer.
        let r = unsafe { ffi::rados_ioctx_create(cluster.handle(), pool.as_ptr(), &mut io) };
        if r < 0 {
            return Err(RbdError::ceph(
                format!("error opening pool {}", cfg.pool),
                r,
            ));
        }
        let destroy = |io| {
            // SAFETY: io was created above and nothing else holds it.
            unsafe { ffi::rados_ioctx_destroy(io) }
        };
        if let Some(ns) = &cfg.namespace {
            let n = match cstr("namespace", ns) {
                Ok(n) => n,
                Err(e) => {
                    destroy(io);
                    return Err(e);
                }
            };
            // SAFETY: io is a live ioctx; n is NUL-terminated (librados copies it).
            unsafe { ffi::rados_ioctx_set_namespace(io, n.as_ptr()) };
        }
        let name = cstr("image", &cfg.image);
        let snap = cfg
            .snapshot
            .as_deref()
            .map(|s| cstr("snapshot", s))
            .transpose();
        let (name, snap) = match (name, snap) {
            (Ok(n), Ok(s)) => (n, s),
            (Err(e), _) | (_, Err(e)) => {
                destroy(io);
                return Err(e);
            }
        };
        let snap_ptr = snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut h: ffi::rbd_image_t = std::ptr::null_mut();
        let r = if read_only || cfg.snapshot.is_some() {
            // SAFETY: io is live; name and snap are NUL-terminated or null; h an out-pointer.
            unsafe { ffi::rbd_open_read_only(io, name.as_ptr(), &mut h, snap_ptr) }
        } else {
            // SAFETY: as above.
            unsafe { ffi::rbd_open(io, name.as_ptr(), &mut h, snap_ptr) }
        };
        if r < 0 {
            destroy(io);
            return Err(RbdError::ceph(
                format!("error reading header from {}", cfg.image),
                r,
            ));
        }
        Ok(Image {
            h,
            io,
            efd: None,
            status: StatusCache::default(),
            cluster: Some(cluster),
        })
    }

    /// After a request timed out: see [`Cluster::refresh_osd_map`].
    pub(crate) fn refresh_osd_map(&self) {
        if let Some(c) = &self.cluster {
            c.refresh_osd_map();
        }
    }

    /// Size in bytes (cheap: librbd's cached header).
    pub fn size(&self) -> Result<u64, RbdError> {
        let mut s = 0u64;
        // SAFETY: h is open; s an out-pointer.
        let r = unsafe { ffi::rbd_get_size(self.h, &mut s) };
        if r < 0 {
            return Err(RbdError::ceph("error getting image size", r));
        }
        Ok(s)
    }

    /// Resizes (blocks).
    pub fn resize(&self, size: u64) -> Result<(), RbdError> {
        self.status.invalidate();
        // SAFETY: h is open.
        let r = unsafe { ffi::rbd_resize(self.h, size) };
        self.status.invalidate();
        if r < 0 {
            return Err(RbdError::ceph("failed to resize rbd image", r));
        }
        Ok(())
    }

    /// The allocated extents in `[off, off + len)` at whole-object
    /// granularity, parent included, clipped to the range, in order (blocks).
    pub fn allocated(&self, off: u64, len: u64) -> Result<Vec<(u64, u64)>, RbdError> {
        struct Acc {
            lo: u64,
            hi: u64,
            out: Vec<(u64, u64)>,
        }
        extern "C" fn cb(
            o: u64,
            l: libc::size_t,
            exists: libc::c_int,
            arg: *mut libc::c_void,
        ) -> libc::c_int {
            // SAFETY: arg is the &mut Acc passed below, alive for the whole call.
            let acc = unsafe { &mut *(arg as *mut Acc) };
            if exists != 0 {
                let s = o.max(acc.lo);
                let e = (o + l as u64).min(acc.hi);
                if s < e {
                    match acc.out.last_mut() {
                        Some(last) if last.0 + last.1 == s => last.1 += e - s,
                        _ => acc.out.push((s, e - s)),
                    }
                }
            }
            0
        }
        let mut acc = Acc {
            lo: off,
            hi: off + len,
            out: Vec::new(),
        };
        // SAFETY: h is open; cb only touches acc, which outlives the call.
        let r = unsafe {
            ffi::rbd_diff_iterate2(
                self.h,
                std::ptr::null(),
                off,
                len,
                1,
                1,
                cb,
                &mut acc as *mut Acc as *mut libc::c_void,
            )
        };
        if r < 0 {
            return Err(RbdError::ceph("error reading allocation", r));
        }
        acc.out.sort_unstable();
        Ok(acc.out)
    }

    /// Has librbd queue completed requests on the image and signal a new
    /// non-blocking eventfd (kept with the image) for each
    /// (`rbd_set_image_notification`); `rbd_poll_io_events` takes them.
    pub fn set_notification(&mut self) -> Result<(), RbdError> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: eventfd has no memory arguments.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(RbdError::ceph(
                "eventfd",
                -std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO),
            ));
        }
        // SAFETY: fd was just created and is owned by nothing else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: h is open; the fd outlives the image (closed after it in Drop).
        let r = unsafe {
            ffi::rbd_set_image_notification(self.h, owned.as_raw_fd(), ffi::EVENT_TYPE_EVENTFD)
        };
        if r < 0 {
            return Err(RbdError::ceph("rbd_set_image_notification", r));
        }
        self.efd = Some(owned);
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let h = SendPtr(self.h);
        let io = SendPtr(self.io);
        let cluster = self.cluster.take();
        let efd = self.efd.take();
        let close = move || {
            let (h, io) = (h, io);
            // SAFETY: the last reference is gone and every request completed
            // (each held a reference): nothing else uses either handle.
            unsafe {
                ffi::rbd_close(h.0);
                ffi::rados_ioctx_destroy(io.0);
            }
            // The eventfd and the connection go after the image they served.
            drop(efd);
            drop(cluster);
        };
        spawn_closer("rbd-close", close);
    }
}

/// Closes in flight ([`spawn_closer`]), and the condition their end signals.
static CLOSING: (std::sync::Mutex<usize>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

/// Runs `close` (an image's close, a connection's shutdown: they block) on
/// a thread of its own, counted so that [`wait_for_closes`] can wait for it.
pub(crate) fn spawn_closer(name: &str, close: impl FnOnce() + Send + 'static) {
    let (m, cv) = &CLOSING;
    *m.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    let run = move || {
        close();
        let (m, cv) = &CLOSING;
        *m.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        cv.notify_all();
    };
    if std::thread::Builder::new()
        .name(name.into())
        .spawn(run)
        .is_err()
    {
        *m.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        cv.notify_all();
        tracing::warn!("could not start a thread to close an RBD image or connection");
    }
}

/// Waits (at most `limit`) until every image closed and every connection
/// shut down so far has finished: called before the process exits, so that
/// image locks are released and librados is not torn down under a close.
pub fn wait_for_closes(limit: std::time::Duration) {
    let (m, cv) = &CLOSING;
    let deadline = std::time::Instant::now() + limit;
    let mut n = m.lock().unwrap_or_else(|p| p.into_inner());
    while *n > 0 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            tracing::warn!(pending = *n, "RBD images still closing at exit");
            return;
        }
        n = cv
            .wait_timeout(n, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// Runs blocking `f` on a thread of its own and awaits its result (a
/// reactor never blocks on librbd).
pub async fn off_reactor<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RbdError> + Send + 'static,
) -> Result<T, RbdError> {
    let (tx, rx) = futures::channel::oneshot::channel();
    std::thread::Builder::new()
        .name("rbd-helper".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| RbdError::Invalid(format!("cannot start a helper thread: {e}")))?;
    rx.await
        .map_err(|_| RbdError::Invalid("the helper thread died".into()))?
}
