//! Pool I/O context (`rados_ioctx_t`).

use std::ffi::CString;
use std::ptr;
use std::sync::Arc;

use super::cluster::Rados;
use super::error::{CephError, Op};
use super::ffi;

/// An I/O context on one pool (and one RADOS namespace). Holds its cluster alive; destroyed in
/// `Drop`.
pub struct IoCtx {
    ptr: ffi::rados_ioctx_t,
    pool: String,
    _cluster: Arc<Rados>,
}

// SAFETY: librados documents an ioctx as usable from several threads for I/O; the settings
// that are not thread-safe (namespace, snapshot context) are set only in `new`, before the
// value exists anywhere else, and never changed afterwards.
unsafe impl Send for IoCtx {}
// SAFETY: see `Send`; all methods take `&self` and only issue I/O.
unsafe impl Sync for IoCtx {}

impl IoCtx {
    /// Opens pool `pool` in RADOS namespace `namespace` (`""`: the default one). A missing
    /// pool is `ENOENT`.
    ///
    /// Implements: `rados_ioctx_create`, `rados_ioctx_set_namespace`.
    pub fn new(cluster: Arc<Rados>, pool: &str, namespace: &str) -> Result<IoCtx, CephError> {
        let ns = CString::new(namespace).map_err(|_| {
            CephError::new(
                Op::IoCtxCreate,
                pool,
                libc::EINVAL,
                "namespace contains a NUL byte",
            )
        })?;
        let name = CString::new(pool).map_err(|_| {
            CephError::new(
                Op::IoCtxCreate,
                pool,
                libc::EINVAL,
                "pool name contains a NUL byte",
            )
        })?;
        let mut ptr: ffi::rados_ioctx_t = ptr::null_mut();
        // SAFETY: `cluster` is a connected handle kept alive by the Arc; `name` outlives the
        // call; `ptr` is a valid out-pointer.
        let r = unsafe { ffi::rados_ioctx_create(cluster.as_ptr(), name.as_ptr(), &mut ptr) };
        if r < 0 {
            let msg = if r == -libc::ENOENT {
                "no such pool"
            } else {
                ""
            };
            return Err(CephError::from_code(Op::IoCtxCreate, pool, r.into(), msg));
        }
        // SAFETY: `ptr` was just created and is not shared yet (the call is not thread-safe);
        // `ns` outlives the call (librados copies the name).
        unsafe { ffi::rados_ioctx_set_namespace(ptr, ns.as_ptr()) };
        Ok(IoCtx {
            ptr,
            pool: pool.to_string(),
            _cluster: cluster,
        })
    }

    pub fn pool(&self) -> &str {
        &self.pool
    }

    pub(super) fn as_ptr(&self) -> ffi::rados_ioctx_t {
        self.ptr
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create and destroyed once; every Image holds an
        // Arc<IoCtx>, so none outlives it; the cluster is still alive (we hold its Arc).
        unsafe { ffi::rados_ioctx_destroy(self.ptr) };
    }
}
