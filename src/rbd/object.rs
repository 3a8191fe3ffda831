//! Whole RADOS objects in one pool and namespace: what the fence ledger is stored in.
//!
//! Every call is synchronous and bounded by `rados_osd_op_timeout` (set before connecting);
//! callers run them on the blocking pool (see `client.rs`).

use std::ffi::{CStr, CString, c_char};
use std::ptr;

use super::error::{CephError, Op};
use super::ffi;
use super::ioctx::IoCtx;

/// The largest object this layer reads: ledger records are a few KiB.
pub const MAX_OBJECT_BYTES: u64 = 4 * 1024 * 1024;

fn cname(op: Op, oid: &str) -> Result<CString, CephError> {
    CString::new(oid).map_err(|_| CephError::new(op, oid, libc::EINVAL, "contains a NUL byte"))
}

impl IoCtx {
    /// Replaces the object's data with `data` (creating the object if missing).
    ///
    /// Implements: `rados_write_full`.
    pub fn write_full(&self, oid: &str, data: &[u8]) -> Result<(), CephError> {
        let name = cname(Op::ObjectWrite, oid)?;
        // SAFETY: valid ioctx (kept alive by &self); `name` and `data` outlive the call, and
        // `data.len()` is the buffer's length.
        let r = unsafe {
            ffi::rados_write_full(
                self.as_ptr(),
                name.as_ptr(),
                data.as_ptr().cast::<c_char>(),
                data.len(),
            )
        };
        if r < 0 {
            return Err(CephError::from_code(Op::ObjectWrite, oid, r.into(), ""));
        }
        Ok(())
    }

    /// Creates the object with `data` only if it does not exist: `Ok(false)` when it exists
    /// already (nothing written). Atomic on the OSD, so of several writers exactly one wins.
    ///
    /// Implements: `rados_create_write_op`, `rados_write_op_create` (exclusive),
    /// `rados_write_op_write_full`, `rados_write_op_operate`, `rados_release_write_op`.
    pub fn create_exclusive(&self, oid: &str, data: &[u8]) -> Result<bool, CephError> {
        let name = cname(Op::ObjectWrite, oid)?;
        // SAFETY: no preconditions; a null return means allocation failed.
        let op = unsafe { ffi::rados_create_write_op() };
        if op.is_null() {
            return Err(CephError::new(
                Op::ObjectWrite,
                oid,
                libc::ENOMEM,
                "cannot create a write op",
            ));
        }
        // SAFETY: `op` is a live write op, released exactly once below; `data` and `name`
        // outlive `rados_write_op_operate`, which is the last use of the buffers; a null
        // category and a null mtime (now) are allowed.
        let r = unsafe {
            ffi::rados_write_op_create(op, 1, ptr::null());
            ffi::rados_write_op_write_full(op, data.as_ptr().cast::<c_char>(), data.len());
            let r =
                ffi::rados_write_op_operate(op, self.as_ptr(), name.as_ptr(), ptr::null_mut(), 0);
            ffi::rados_release_write_op(op);
            r
        };
        match r {
            0 => Ok(true),
            r if r == -libc::EEXIST => Ok(false),
            r => Err(CephError::from_code(Op::ObjectWrite, oid, r.into(), "")),
        }
    }

    /// The object's whole data, or `None` when it does not exist.
    ///
    /// Implements: `rados_stat`, `rados_read`.
    pub fn read_full(&self, oid: &str) -> Result<Option<Vec<u8>>, CephError> {
        let name = cname(Op::ObjectRead, oid)?;
        let mut size: u64 = 0;
        let mut mtime: libc::time_t = 0;
        // SAFETY: valid ioctx and name; the out-pointers are valid for the call.
        let r = unsafe { ffi::rados_stat(self.as_ptr(), name.as_ptr(), &mut size, &mut mtime) };
        if r == -libc::ENOENT {
            return Ok(None);
        }
        if r < 0 {
            return Err(CephError::from_code(Op::ObjectRead, oid, r.into(), ""));
        }
        if size > MAX_OBJECT_BYTES {
            return Err(CephError::new(
                Op::ObjectRead,
                oid,
                libc::EFBIG,
                format!("object of {size} bytes, more than a ledger record can be"),
            ));
        }
        // One byte more than its size: a read that fills it means the object grew meanwhile.
        let mut buf = vec![0u8; size as usize + 1];
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes for the call.
        let r = unsafe {
            ffi::rados_read(
                self.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast::<c_char>(),
                buf.len(),
                0,
            )
        };
        if r == -libc::ENOENT {
            return Ok(None);
        }
        if r < 0 {
            return Err(CephError::from_code(Op::ObjectRead, oid, r.into(), ""));
        }
        let n = r as usize;
        if n == buf.len() {
            return Err(CephError::new(
                Op::ObjectRead,
                oid,
                libc::EAGAIN,
                "the object grew while it was read",
            ));
        }
        buf.truncate(n);
        Ok(Some(buf))
    }

    /// The names of the objects of this ioctx's namespace that start with `prefix`.
    ///
    /// Implements: `rados_nobjects_list_open`, `rados_nobjects_list_next`,
    /// `rados_nobjects_list_close`.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, CephError> {
        let mut ctx: ffi::rados_list_ctx_t = ptr::null_mut();
        // SAFETY: valid ioctx; `ctx` is a valid out-pointer.
        let r = unsafe { ffi::rados_nobjects_list_open(self.as_ptr(), &mut ctx) };
        if r < 0 {
            return Err(CephError::from_code(Op::ObjectList, prefix, r.into(), ""));
        }
        let mut out = Vec::new();
        let result = loop {
            let mut entry: *const c_char = ptr::null();
            // SAFETY: `ctx` is open; key and namespace outputs may be null (not wanted).
            let r = unsafe {
                ffi::rados_nobjects_list_next(ctx, &mut entry, ptr::null_mut(), ptr::null_mut())
            };
            if r == -libc::ENOENT {
                break Ok(());
            }
            if r < 0 {
                break Err(CephError::from_code(Op::ObjectList, prefix, r.into(), ""));
            }
            if entry.is_null() {
                continue;
            }
            // SAFETY: librados returned a NUL-terminated name, valid until the next call.
            let name = unsafe { CStr::from_ptr(entry) }.to_string_lossy();
            if name.starts_with(prefix) {
                out.push(name.into_owned());
            }
        };
        // SAFETY: opened above, closed exactly once.
        unsafe { ffi::rados_nobjects_list_close(ctx) };
        result.map(|()| out)
    }
}

impl IoCtx {
    /// Takes (or, held by the same `cookie`, renews) the exclusive lock `name` on `oid` for
    /// `lease`: `Ok(false)` when another holder has it. The lock object is created if missing.
    ///
    /// Implements: `rados_lock_exclusive` (with `LIBRADOS_LOCK_FLAG_MAY_RENEW`).
    pub fn lock_exclusive(
        &self,
        oid: &str,
        name: &str,
        cookie: &str,
        lease: std::time::Duration,
    ) -> Result<bool, CephError> {
        let (o, n, c, d) = (
            cname(Op::ObjectLock, oid)?,
            cname(Op::ObjectLock, name)?,
            cname(Op::ObjectLock, cookie)?,
            cname(Op::ObjectLock, "rbdfence")?,
        );
        let mut duration = libc::timeval {
            tv_sec: lease.as_secs() as libc::time_t,
            tv_usec: lease.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: valid ioctx; every string outlives the call; `duration` is a valid timeval
        // that librados only reads. The bindgen timeval has the layout of libc's (checked by
        // scripts/check-abi.sh against <sys/time.h>).
        let r = unsafe {
            ffi::rados_lock_exclusive(
                self.as_ptr(),
                o.as_ptr(),
                n.as_ptr(),
                c.as_ptr(),
                d.as_ptr(),
                (&mut duration as *mut libc::timeval).cast(),
                ffi::RBDFENCE_LOCK_FLAG_MAY_RENEW as u8,
            )
        };
        match r {
            0 => Ok(true),
            r if r == -libc::EBUSY || r == -libc::EEXIST => Ok(false),
            r => Err(CephError::from_code(Op::ObjectLock, oid, r.into(), "")),
        }
    }

    /// Releases the lock if `cookie` holds it (a lock already lost is not an error).
    ///
    /// Implements: `rados_unlock`.
    pub fn unlock(&self, oid: &str, name: &str, cookie: &str) -> Result<(), CephError> {
        let (o, n, c) = (
            cname(Op::ObjectLock, oid)?,
            cname(Op::ObjectLock, name)?,
            cname(Op::ObjectLock, cookie)?,
        );
        // SAFETY: valid ioctx; the strings outlive the call.
        let r = unsafe { ffi::rados_unlock(self.as_ptr(), o.as_ptr(), n.as_ptr(), c.as_ptr()) };
        match r {
            r if r >= 0 || r == -libc::ENOENT => Ok(()),
            r => Err(CephError::from_code(Op::ObjectLock, oid, r.into(), "")),
        }
    }
}
