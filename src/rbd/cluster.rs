//! The cluster handle (`rados_t`): create, configure, connect, mon commands, osdmap.

use std::ffi::{CStr, CString, c_char};
use std::path::PathBuf;
use std::ptr;
use std::time::Duration;

use super::addr::EntityAddr;
use super::error::{CephError, Op};
use super::ffi;

/// Ceph's own client-side bounds, set before connecting. Ceph's defaults are 0 = wait
/// forever, which would let a sick cluster hang a fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// `rados_osd_op_timeout` and `rados_mon_op_timeout`.
    pub op: Duration,
    /// `client_mount_timeout`: how long `connect` may take.
    pub mount: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            op: Duration::from_secs(10),
            mount: Duration::from_secs(10),
        }
    }
}

/// How to reach the cluster.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The Ceph config file (mon addresses, keyring).
    pub conf: PathBuf,
    /// The cephx user without `client.` (`admin`, `rbdfence`).
    pub id: String,
    pub timeouts: Timeouts,
}

/// Versions of the linked libraries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LibraryVersions {
    pub rados: (i32, i32, i32),
}

/// Reads the linked library's version.
///
/// Implements: `rados_version`.
pub fn library_versions() -> LibraryVersions {
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: rados_version only writes three ints through the valid pointers given.
    unsafe { ffi::rados_version(&mut a, &mut b, &mut c) };
    LibraryVersions { rados: (a, b, c) }
}

/// The linked librados must have the major version our declarations were written for and at
/// least their minor version, or the ABI we call may not be the ABI that is there.
fn check_library_versions() -> Result<(), CephError> {
    let have = library_versions().rados;
    let want = (
        ffi::RBDFENCE_LIBRADOS_MAJOR as i32,
        ffi::RBDFENCE_LIBRADOS_MINOR as i32,
    );
    if have.0 != want.0 || have.1 < want.1 {
        return Err(CephError::new(
            Op::LibraryVersion,
            "librados",
            libc::ENOTSUP,
            format!(
                "linked librados is {}.{}.{}; rbdfence's declarations need {}.x with x >= {}",
                have.0, have.1, have.2, want.0, want.1
            ),
        ));
    }
    Ok(())
}

/// A connected librados cluster handle. Shut down in `Drop`.
pub struct Rados {
    ptr: ffi::rados_t,
}

// SAFETY: a librados cluster handle is documented as safe to use from several threads at once
// (librados serialises internally); rbdfence never changes its configuration after `connect`.
unsafe impl Send for Rados {}
// SAFETY: see `Send`: every method takes `&self` and librados locks internally.
unsafe impl Sync for Rados {}

impl Drop for Rados {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from a successful rados_create and is shut down exactly once;
        // every IoCtx holds an Arc<Rados>, so none outlives this.
        unsafe { ffi::rados_shutdown(self.ptr) };
    }
}

fn cstring(op: Op, what: &str, s: &str) -> Result<CString, CephError> {
    CString::new(s).map_err(|_| CephError::new(op, what, libc::EINVAL, "contains a NUL byte"))
}

fn check(op: Op, target: &str, r: i32) -> Result<(), CephError> {
    if r < 0 {
        Err(CephError::from_code(op, target, r.into(), ""))
    } else {
        Ok(())
    }
}

/// Copies and frees a buffer allocated by librados.
///
/// # Safety
/// `buf` is null or a buffer of at least `len` bytes returned by librados, not freed yet.
unsafe fn take_buffer(buf: *mut c_char, len: usize) -> Vec<u8> {
    if buf.is_null() {
        return Vec::new();
    }
    // SAFETY: the caller promises `buf` holds `len` readable bytes.
    let v = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) }.to_vec();
    // SAFETY: `buf` was allocated by librados and is freed once, here.
    unsafe { ffi::rados_buffer_free(buf) };
    v
}

/// A mon command's reply: its output buffer and its status string.
#[derive(Debug, Clone, Default)]
pub struct MonReply {
    pub out: Vec<u8>,
    pub status: String,
}

impl Rados {
    /// Creates a handle for `client.<id>`, reads the conf file, sets Ceph's own timeouts and
    /// connects. Blocks for at most about `timeouts.mount`.
    ///
    /// Implements: `rados_create`, `rados_conf_read_file`, `rados_conf_set`, `rados_connect`.
    pub fn connect(opts: &ConnectOptions) -> Result<Rados, CephError> {
        check_library_versions()?;
        let id = cstring(Op::Create, "id", &opts.id)?;
        let conf_str = opts.conf.to_string_lossy().into_owned();
        let conf = cstring(Op::ConfReadFile, &conf_str, &conf_str)?;
        let mut ptr: ffi::rados_t = ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer and `id` a NUL-terminated string that lives
        // through the call.
        let r = unsafe { ffi::rados_create(&mut ptr, id.as_ptr()) };
        check(Op::Create, &format!("client.{}", opts.id), r)?;
        // From here on Drop shuts the handle down on every error path.
        let rados = Rados { ptr };
        // SAFETY: `rados.ptr` is a created, unconnected handle; `conf` lives through the call.
        let r = unsafe { ffi::rados_conf_read_file(rados.ptr, conf.as_ptr()) };
        check(Op::ConfReadFile, &conf_str, r)?;
        let op_secs = secs(opts.timeouts.op);
        let mount_secs = secs(opts.timeouts.mount);
        let settings = [
            ("rados_osd_op_timeout", op_secs.as_str()),
            ("rados_mon_op_timeout", op_secs.as_str()),
            ("client_mount_timeout", mount_secs.as_str()),
            // Our errors carry the errno and message; librados' own stderr chatter would
            // interleave with the CLI's output.
            ("log_to_stderr", "false"),
            ("err_to_stderr", "false"),
        ];
        for (key, value) in settings {
            rados.conf_set(key, value)?;
        }
        // SAFETY: `rados.ptr` is configured and not yet connected.
        let r = unsafe { ffi::rados_connect(rados.ptr) };
        check(
            Op::Connect,
            &format!("client.{} with {conf_str}", opts.id),
            r,
        )?;
        Ok(rados)
    }

    /// Implements: `rados_conf_set`.
    fn conf_set(&self, key: &str, value: &str) -> Result<(), CephError> {
        let k = cstring(Op::ConfSet, key, key)?;
        let v = cstring(Op::ConfSet, key, value)?;
        // SAFETY: valid handle; both strings are NUL-terminated and outlive the call.
        let r = unsafe { ffi::rados_conf_set(self.ptr, k.as_ptr(), v.as_ptr()) };
        check(Op::ConfSet, &format!("{key}={value}"), r)
    }

    /// The raw handle, for child handles created in this module.
    pub(super) fn as_ptr(&self) -> ffi::rados_t {
        self.ptr
    }

    /// Sends one JSON command to the monitors. A negative return keeps the mon's status
    /// string as the error message; `op` names the operation for the error.
    ///
    /// Implements: `rados_mon_command`.
    pub fn mon_command(
        &self,
        op: Op,
        target: &str,
        cmd: &serde_json::Value,
    ) -> Result<MonReply, CephError> {
        let text = cmd.to_string();
        let c = cstring(op, target, &text)?;
        let mut cmds = [c.as_ptr()];
        let (mut out, mut out_len) = (ptr::null_mut::<c_char>(), 0usize);
        let (mut outs, mut outs_len) = (ptr::null_mut::<c_char>(), 0usize);
        // SAFETY: valid handle; `cmds` holds one valid C string for the call's duration; an
        // empty input buffer is passed as (null, 0); the out-pointers are valid and librados
        // allocates what it writes there, which `take_buffer` frees.
        let r = unsafe {
            ffi::rados_mon_command(
                self.ptr,
                cmds.as_mut_ptr(),
                1,
                ptr::null(),
                0,
                &mut out,
                &mut out_len,
                &mut outs,
                &mut outs_len,
            )
        };
        // SAFETY: librados set each pointer to null or to a buffer of the given length.
        let out = unsafe { take_buffer(out, out_len) };
        // SAFETY: as above.
        let status = String::from_utf8_lossy(&unsafe { take_buffer(outs, outs_len) }).into_owned();
        if r < 0 {
            return Err(CephError::from_code(op, target, r.into(), status));
        }
        Ok(MonReply { out, status })
    }

    /// Blocks until this client has the latest osdmap the monitors have committed.
    ///
    /// Implements: `rados_wait_for_latest_osdmap`.
    pub fn wait_for_latest_osdmap(&self) -> Result<(), CephError> {
        // SAFETY: valid connected handle.
        let r = unsafe { ffi::rados_wait_for_latest_osdmap(self.ptr) };
        check(Op::WaitForLatestOsdmap, "", r)
    }

    /// This client's global id (the N of `client.N`).
    ///
    /// Implements: `rados_get_instance_id`.
    pub fn instance_id(&self) -> u64 {
        // SAFETY: valid connected handle.
        unsafe { ffi::rados_get_instance_id(self.ptr) }
    }

    /// This client's own entity addresses, as the OSDs see it.
    ///
    /// Implements: `rados_getaddrs`.
    pub fn addrs(&self) -> Result<Vec<EntityAddr>, CephError> {
        let mut buf: *mut c_char = ptr::null_mut();
        // SAFETY: valid connected handle; `buf` is a valid out-pointer.
        let r = unsafe { ffi::rados_getaddrs(self.ptr, &mut buf) };
        check(Op::GetAddrs, "", r)?;
        if buf.is_null() {
            return Err(CephError::new(
                Op::GetAddrs,
                "",
                libc::ENODATA,
                "librados returned no address",
            ));
        }
        // SAFETY: on success librados returns a NUL-terminated string it allocated.
        let text = unsafe { CStr::from_ptr(buf) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: allocated by librados, freed once.
        unsafe { ffi::rados_buffer_free(buf) };
        EntityAddr::parse_vec(&text)
            .map_err(|e| CephError::new(Op::GetAddrs, "", libc::EINVAL, e.to_string()))
    }
}

fn secs(d: Duration) -> String {
    // These are `secs` options: whole seconds. Keep at least 1 s so that 0 (= wait forever)
    // can never be configured by accident.
    d.as_secs().max(1).to_string()
}
