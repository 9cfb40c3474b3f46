//! The part of librados' and librbd's stable C API that the driver calls,
//! declared by hand from `rados/librados.h` and `rbd/librbd.h` (Ceph 16.2;
//! these signatures have not changed since the calls appeared). Without the
//! libraries (`cfg(not(sluice_librbd))`, see `build.rs`) the same names are
//! Rust functions that fail with `-ENOSYS`, so the callers have one shape.
//!
//! Handles are opaque pointers. Thread safety, as librbd documents it: an
//! open image takes `rbd_aio_*` calls from any thread at once; a
//! completion's callback runs on one of librbd's threads and must not call
//! back into a blocking librbd function.

#![allow(non_camel_case_types)]

use libc::{c_char, c_int, c_void, iovec, size_t, ssize_t};

pub type rados_t = *mut c_void;
pub type rados_ioctx_t = *mut c_void;
pub type rbd_image_t = *mut c_void;
pub type rbd_completion_t = *mut c_void;
pub type rbd_callback_t = extern "C" fn(rbd_completion_t, *mut c_void);
pub type diff_cb_t = extern "C" fn(u64, size_t, c_int, *mut c_void) -> c_int;

/// `rbd_set_image_notification`'s `type` for an eventfd.
pub const EVENT_TYPE_EVENTFD: c_int = 2;

#[cfg(sluice_librbd)]
extern "C" {
    pub fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
    pub fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_connect(cluster: rados_t) -> c_int;
    pub fn rados_shutdown(cluster: rados_t);
    pub fn rados_wait_for_latest_osdmap(cluster: rados_t) -> c_int;
    pub fn rados_ioctx_create(
        cluster: rados_t,
        pool_name: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    pub fn rados_ioctx_destroy(io: rados_ioctx_t);
    pub fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);

    pub fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: rbd_image_t) -> c_int;
    pub fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    pub fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;
    pub fn rbd_diff_iterate2(
        image: rbd_image_t,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: diff_cb_t,
        arg: *mut c_void,
    ) -> c_int;
    pub fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: rbd_callback_t,
        c: *mut rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_get_return_value(c: rbd_completion_t) -> ssize_t;
    pub fn rbd_aio_get_arg(c: rbd_completion_t) -> *mut c_void;
    pub fn rbd_aio_release(c: rbd_completion_t);
    pub fn rbd_aio_readv(
        image: rbd_image_t,
        iov: *const iovec,
        iovcnt: c_int,
        off: u64,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_writev(
        image: rbd_image_t,
        iov: *const iovec,
        iovcnt: c_int,
        off: u64,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_flush(image: rbd_image_t, c: rbd_completion_t) -> c_int;
    pub fn rbd_aio_discard(image: rbd_image_t, off: u64, len: u64, c: rbd_completion_t) -> c_int;
    pub fn rbd_aio_write_zeroes(
        image: rbd_image_t,
        off: u64,
        len: size_t,
        c: rbd_completion_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
    pub fn rbd_set_image_notification(image: rbd_image_t, fd: c_int, kind: c_int) -> c_int;
    pub fn rbd_poll_io_events(image: rbd_image_t, comps: *mut rbd_completion_t, n: c_int) -> c_int;
}

#[cfg(not(sluice_librbd))]
pub use absent::*;

/// What a build without librbd links instead: every call fails with
/// `-ENOSYS` (never reached in practice: [`crate::available`] is checked
/// before any connection is made).
#[cfg(not(sluice_librbd))]
#[allow(clippy::missing_safety_doc, clippy::too_many_arguments)]
mod absent {
    use super::*;
    const NO: c_int = -libc::ENOSYS;
    pub unsafe fn rados_create(_: *mut rados_t, _: *const c_char) -> c_int {
        NO
    }
    pub unsafe fn rados_conf_read_file(_: rados_t, _: *const c_char) -> c_int {
        NO
    }
    pub unsafe fn rados_conf_set(_: rados_t, _: *const c_char, _: *const c_char) -> c_int {
        NO
    }
    pub unsafe fn rados_connect(_: rados_t) -> c_int {
        NO
    }
    pub unsafe fn rados_shutdown(_: rados_t) {}
    pub unsafe fn rados_wait_for_latest_osdmap(_: rados_t) -> c_int {
        NO
    }
    pub unsafe fn rados_ioctx_create(_: rados_t, _: *const c_char, _: *mut rados_ioctx_t) -> c_int {
        NO
    }
    pub unsafe fn rados_ioctx_destroy(_: rados_ioctx_t) {}
    pub unsafe fn rados_ioctx_set_namespace(_: rados_ioctx_t, _: *const c_char) {}
    pub unsafe fn rbd_open(
        _: rados_ioctx_t,
        _: *const c_char,
        _: *mut rbd_image_t,
        _: *const c_char,
    ) -> c_int {
        NO
    }
    pub unsafe fn rbd_open_read_only(
        _: rados_ioctx_t,
        _: *const c_char,
        _: *mut rbd_image_t,
        _: *const c_char,
    ) -> c_int {
        NO
    }
    pub unsafe fn rbd_close(_: rbd_image_t) -> c_int {
        NO
    }
    pub unsafe fn rbd_get_size(_: rbd_image_t, _: *mut u64) -> c_int {
        NO
    }
    pub unsafe fn rbd_resize(_: rbd_image_t, _: u64) -> c_int {
        NO
    }
    pub unsafe fn rbd_diff_iterate2(
        _: rbd_image_t,
        _: *const c_char,
        _: u64,
        _: u64,
        _: u8,
        _: u8,
        _: diff_cb_t,
        _: *mut c_void,
    ) -> c_int {
        NO
    }
    pub unsafe fn rbd_aio_create_completion(
        _: *mut c_void,
        _: rbd_callback_t,
        _: *mut rbd_completion_t,
    ) -> c_int {
        NO
    }
    pub unsafe fn rbd_aio_get_return_value(_: rbd_completion_t) -> ssize_t {
        NO as ssize_t
    }
    pub unsafe fn rbd_aio_get_arg(_: rbd_completion_t) -> *mut c_void {
        std::ptr::null_mut()
    }
    pub unsafe fn rbd_aio_release(_: rbd_completion_t) {}
    pub unsafe fn rbd_aio_readv(
        _: rbd_image_t,
        _: *const iovec,
        _: c_int,
        _: u64,
        _: rbd_completion_t,
    ) -> c_int {
        NO
    }
    pub unsafe fn rbd_aio_writev(
        _: rbd_image_t,
        _: *const iovec,
        _: c_int,
        _: u64,
        _: rbd_completion_t,
    ) -> c_int {
        NO
    }
    pub unsafe fn rbd_aio_flush(_: rbd_image_t, _: rbd_completion_t) -> c_int {
        NO
    }
    pub unsafe fn rbd_aio_discard(_: rbd_image_t, _: u64, _: u64, _: rbd_completion_t) -> c_int {
        NO
    }
    pub unsafe fn rbd_aio_write_zeroes(
        _: rbd_image_t,
        _: u64,
        _: size_t,
        _: rbd_completion_t,
        _: c_int,
        _: c_int,
    ) -> c_int {
        NO
    }
    pub unsafe fn rbd_set_image_notification(_: rbd_image_t, _: c_int, _: c_int) -> c_int {
        NO
    }
    pub unsafe fn rbd_poll_io_events(_: rbd_image_t, _: *mut rbd_completion_t, _: c_int) -> c_int {
        NO
    }
}
