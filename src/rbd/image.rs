//! RBD images observed through their header object with librados alone: watchers and lock
//! owners, the evidence of who uses an image. The image is never opened (no librbd), so the
//! observer registers no watch and holds nothing per image.

use std::ffi::{CStr, CString, c_char, c_int};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::addr::EntityAddr;
use super::error::{CephError, Op};
use super::ffi;
use super::ioctx::IoCtx;
use super::lock_info;

/// Retries of a sizing loop before giving up: the list can only grow between two calls if
/// clients keep arriving, and a bound keeps a pathological image from spinning forever.
const MAX_SIZING_ATTEMPTS: usize = 16;

/// `POOL/IMAGE` or `POOL/NAMESPACE/IMAGE` (an RBD namespace), validated: every part non-empty,
/// at most 255 bytes, no `/`, `@`, NUL, whitespace or control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageSpec {
    pub pool: String,
    /// The RBD (RADOS) namespace; empty for the pool's default namespace.
    pub namespace: String,
    pub image: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image {input:?}: {why} (expected POOL/IMAGE or POOL/NAMESPACE/IMAGE)")]
pub struct ImageSpecError {
    pub input: String,
    pub why: &'static str,
}

impl FromStr for ImageSpec {
    type Err = ImageSpecError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |why| ImageSpecError {
            input: input.to_string(),
            why,
        };
        let (pool, rest) = input.split_once('/').ok_or_else(|| err("missing '/'"))?;
        let (namespace, image) = match rest.split_once('/') {
            Some((ns, image)) => (ns, image),
            None => ("", rest),
        };
        let mut parts = vec![(pool, "pool"), (image, "image")];
        if rest.contains('/') {
            parts.push((namespace, "namespace"));
        }
        for (part, what) in parts {
            if part.is_empty() {
                return Err(err(match what {
                    "pool" => "empty pool name",
                    "namespace" => "empty namespace name",
                    _ => "empty image name",
                }));
            }
            if part.len() > 255 {
                return Err(err("name longer than 255 bytes"));
            }
            if part
                .chars()
                .any(|c| c == '/' || c == '@' || c.is_whitespace() || c.is_control())
            {
                return Err(err(
                    "names may not contain '/', '@', whitespace or control characters",
                ));
            }
        }
        Ok(ImageSpec {
            pool: pool.to_string(),
            namespace: namespace.to_string(),
            image: image.to_string(),
        })
    }
}

impl TryFrom<String> for ImageSpec {
    type Error = ImageSpecError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ImageSpec> for String {
    fn from(s: ImageSpec) -> String {
        s.to_string()
    }
}

impl fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.pool, self.image)
        } else {
            write!(f, "{}/{}/{}", self.pool, self.namespace, self.image)
        }
    }
}

/// A client watching the image header: keys as in `rbd status --format json`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Watcher {
    pub address: String,
    pub client: i64,
    pub cookie: u64,
}

impl Watcher {
    pub fn addr(&self) -> Result<EntityAddr, super::AddrError> {
        self.address.parse()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    Exclusive,
    Shared,
}

/// A holder of a lock on the image: the exclusive-lock feature's owner (librbd's managed
/// lock) or an advisory lock. The record outlives the holder's watch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LockOwner {
    pub mode: LockMode,
    pub address: String,
}

impl LockOwner {
    pub fn addr(&self) -> Result<EntityAddr, super::AddrError> {
        self.address.parse()
    }
}

/// What Ceph says about who uses an image.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ImageStatus {
    pub watchers: Vec<Watcher>,
    pub lock_owners: Vec<LockOwner>,
}

/// The lock librbd's exclusive-lock feature (and `rbd lock add`) takes on the header object,
/// as the lock class records it: an xattr of the object.
const RBD_LOCK_XATTR: &CStr = c"lock.rbd_lock";

/// The longest image id we accept from an `rbd_id.<name>` object (librbd makes them 10-20 hex
/// digits); a longer or odd one is refused rather than used in an object name.
const MAX_IMAGE_ID: usize = 64;

/// An image's header object: `rbd_header.<id>` (format 2) or `<name>.rbd` (format 1), in the
/// image's pool and namespace. Its watchers are the image's watchers (what `rbd status`
/// shows: every client that has the image open read-write), and the lock `rbd_lock` on it is
/// the exclusive lock (or an advisory one). Both are read live from the object, with
/// librados alone: the image is never opened, so observing it costs no librbd `ImageCtx`,
/// registers no watch and keeps nothing open.
#[derive(Clone)]
pub struct HeaderObject {
    ioctx: Arc<IoCtx>,
    oid: CString,
    /// `rbd_id.<name>`: where the image's id is read to check that this is still its header.
    id_oid: CString,
    /// The image id (format 2); `None` for a format-1 image, which has no `rbd_id` object.
    id: Option<String>,
    spec: String,
}

/// Whether the image's name still leads to the header a read looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderCheck {
    /// The read was not asked to check.
    NotChecked,
    /// `rbd_id.<name>` names this header (or, format 1, still does not exist).
    Same,
    /// The name now leads elsewhere, or nowhere: look the header up again.
    Changed,
}

impl HeaderObject {
    /// Finds the header object of `image`: reads the image's id from `rbd_id.<image>`
    /// (format 2), or else checks for `<image>.rbd` (format 1). A missing image is `ENOENT`.
    ///
    /// Implements: `rados_read`, `rados_stat`.
    pub fn locate(ioctx: Arc<IoCtx>, image: &str) -> Result<HeaderObject, CephError> {
        let spec = format!("{}/{}", ioctx.pool(), image);
        let id_oid = cstring(&spec, format!("rbd_id.{image}"))?;
        let mut buf = [0u8; ID_OBJECT_MAX];
        // SAFETY: valid ioctx (kept alive by the Arc) and NUL-terminated name; `buf` is valid
        // for `buf.len()` bytes of writes for the call.
        let r = unsafe {
            ffi::rados_read(
                ioctx.as_ptr(),
                id_oid.as_ptr(),
                buf.as_mut_ptr().cast::<c_char>(),
                buf.len(),
                0,
            )
        };
        let (oid, id) = if r >= 0 {
            let id = decode_image_id(&buf[..r as usize]).ok_or_else(|| {
                CephError::new(
                    Op::LocateImage,
                    &spec,
                    libc::EINVAL,
                    "rbd_id object does not hold an image id",
                )
            })?;
            (
                cstring(&spec, format!("rbd_header.{id}"))?,
                Some(id.to_string()),
            )
        } else if r == -libc::ENOENT {
            let v1 = cstring(&spec, format!("{image}.rbd"))?;
            let (mut size, mut mtime): (u64, libc::time_t) = (0, 0);
            // SAFETY: valid ioctx and name; the out-pointers are valid for the call.
            let r = unsafe { ffi::rados_stat(ioctx.as_ptr(), v1.as_ptr(), &mut size, &mut mtime) };
            if r < 0 {
                let msg = if r == -libc::ENOENT {
                    "no such image"
                } else {
                    ""
                };
                return Err(CephError::from_code(Op::LocateImage, spec, r.into(), msg));
            }
            (v1, None)
        } else {
            return Err(CephError::from_code(Op::LocateImage, spec, r.into(), ""));
        };
        Ok(HeaderObject {
            ioctx,
            oid,
            id_oid,
            id,
            spec,
        })
    }

    /// Watchers and lock owners, read live from the header object; with `check`, the image's
    /// id is read at the same time, to tell whether the name still leads here. One round
    /// trip, two OSD ops at once (the header's watchers and lock record in one compound op,
    /// and the `rbd_id` read), and no thread waits for them: the ops are started and the
    /// future waits for librados to call back. Dropping the future leaves the ops to end on
    /// their own; their memory is freed then. A removed header is `ENOENT`.
    ///
    /// Implements: `rbdfence_read_header_start`, `rbdfence_header_read_result`,
    /// `rbdfence_header_read_free`.
    pub async fn read(&self, check: bool) -> Result<(ImageStatus, HeaderCheck), CephError> {
        let (tx, rx) = tokio::sync::oneshot::channel::<ReadPtr>();
        // The callback's context: where to send the finished read, the ioctx (and so the
        // cluster handle) kept alive until the ops end, and the runtime that drops them when
        // nobody waits any more (never on librados' own thread: a last reference there would
        // shut the cluster handle down from inside its own callback).
        let ctx: *mut ReadContext = Box::into_raw(Box::new((
            tx,
            self.ioctx.clone(),
            tokio::runtime::Handle::current(),
        )));
        let id_oid = if check {
            self.id_oid.as_ptr()
        } else {
            std::ptr::null()
        };
        // SAFETY: valid ioctx and NUL-terminated names (the shim copies what it keeps);
        // `read_done` is called exactly once with `ctx` after a successful start, and never
        // after a failed one, which is when we take `ctx` back.
        let r = unsafe {
            ffi::rbdfence_read_header_start(
                self.ioctx.as_ptr(),
                self.oid.as_ptr(),
                RBD_LOCK_XATTR.as_ptr(),
                id_oid,
                ID_OBJECT_MAX,
                Some(read_done),
                ctx.cast(),
            )
        };
        if r < 0 {
            // SAFETY: the start failed, so the callback never runs: `ctx` is ours again.
            drop(unsafe { Box::from_raw(ctx) });
            return Err(CephError::from_code(
                Op::ReadHeader,
                &self.spec,
                r.into(),
                "",
            ));
        }
        let read: ReadPtr = rx.await.map_err(|_| {
            CephError::new(Op::ReadHeader, &self.spec, libc::EIO, "the read was lost")
        })?;
        let (mut wcap, mut lcap) = (8usize, 512usize);
        for _ in 0..MAX_SIZING_ATTEMPTS {
            let mut watchers: Vec<ffi::rbdfence_watcher> = Vec::with_capacity(wcap);
            let mut lock = vec![0u8; lcap];
            let (mut nw, mut nl) = (wcap, lcap);
            let mut lock_result: c_int = 0;
            let mut id = [0u8; ID_OBJECT_MAX];
            let mut id_len = id.len();
            let mut id_result: c_int = 0;
            // SAFETY: `read.read` is a finished read we own until it drops; the buffers
            // have the room the counts say.
            let r = unsafe {
                ffi::rbdfence_header_read_result(
                    read.read,
                    id.as_mut_ptr().cast::<c_char>(),
                    &mut id_len,
                    &mut id_result,
                    watchers.as_mut_ptr(),
                    &mut nw,
                    lock.as_mut_ptr().cast::<c_char>(),
                    &mut nl,
                    &mut lock_result,
                )
            };
            if r == -libc::ERANGE {
                wcap = nw.max(wcap);
                lcap = nl.max(lcap);
                continue;
            }
            if r < 0 {
                return Err(CephError::from_code(
                    Op::ReadHeader,
                    &self.spec,
                    r.into(),
                    "",
                ));
            }
            // SAFETY: the shim initialised the first `nw` (<= wcap) entries.
            unsafe { watchers.set_len(nw.min(wcap)) };
            let status = self.status_from(&watchers, &lock[..nl.min(lcap)], lock_result)?;
            let checked = self.check(check, id_result, &id[..id_len.min(id.len())]);
            return Ok((status, checked));
        }
        Err(CephError::new(
            Op::ReadHeader,
            &self.spec,
            libc::ERANGE,
            "watcher list or lock record kept growing",
        ))
    }

    /// Watchers and lock owners from what the shim copied out.
    fn status_from(
        &self,
        watchers: &[ffi::rbdfence_watcher],
        lock: &[u8],
        lock_result: c_int,
    ) -> Result<ImageStatus, CephError> {
        let lock_owners = match lock_result {
            0 => lock_info::decode(lock, unix_now())
                .map_err(|why| CephError::new(Op::ReadHeader, &self.spec, libc::EBADMSG, why))?,
            // No lock was ever taken on the header: nobody holds one.
            e if e == -libc::ENODATA || e == -libc::ENOENT => Vec::new(),
            e => {
                return Err(CephError::from_code(
                    Op::ReadHeader,
                    &self.spec,
                    e.into(),
                    "reading the lock record",
                ));
            }
        };
        Ok(ImageStatus {
            watchers: watchers
                .iter()
                .map(|w| Watcher {
                    address: plain_addr(c_addr(&w.addr)),
                    client: w.id,
                    cookie: w.cookie,
                })
                .collect(),
            lock_owners,
        })
    }

    /// Whether the id read with the header names this header.
    fn check(&self, check: bool, id_result: c_int, id: &[u8]) -> HeaderCheck {
        if !check {
            return HeaderCheck::NotChecked;
        }
        let fresh = match id_result {
            0 => decode_image_id(id).map(Some),
            e if e == -libc::ENOENT => Some(None),
            _ => None,
        };
        match fresh {
            Some(fresh) if fresh == self.id.as_deref() => HeaderCheck::Same,
            _ => HeaderCheck::Changed,
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A finished asynchronous read, freed when dropped; with the ioctx it was made on.
struct ReadPtr {
    read: *mut ffi::rbdfence_header_read,
    /// Dropped after the read is freed (fields drop after `Drop::drop`).
    _ioctx: Arc<IoCtx>,
}

// SAFETY: the shim's read state is plain data once finished (librados no longer touches it);
// it is only read and freed through this owner.
unsafe impl Send for ReadPtr {}

impl Drop for ReadPtr {
    fn drop(&mut self) {
        // SAFETY: a finished read, freed once.
        unsafe { ffi::rbdfence_header_read_free(self.read) };
    }
}

type ReadContext = (
    tokio::sync::oneshot::Sender<ReadPtr>,
    Arc<IoCtx>,
    tokio::runtime::Handle,
);

/// librados' callback when both ops ended: hands the read to the waiting future, or frees it
/// when nobody waits any more.
unsafe extern "C" fn read_done(arg: *mut std::ffi::c_void, read: *mut ffi::rbdfence_header_read) {
    // SAFETY: `arg` is the context boxed by `read`, given back exactly once.
    let ctx = unsafe { Box::from_raw(arg.cast::<ReadContext>()) };
    let (tx, ioctx, runtime) = *ctx;
    // A dropped receiver gives the read back: it is freed on the runtime's blocking pool.
    if let Err(unwanted) = tx.send(ReadPtr {
        read,
        _ioctx: ioctx,
    }) {
        runtime.spawn_blocking(move || drop(unwanted));
    }
}

/// The bytes of an `rbd_id` object we read: its length prefix and the longest id we accept.
const ID_OBJECT_MAX: usize = 4 + MAX_IMAGE_ID + 1;

/// A NUL-terminated address from one of the shim's fixed arrays (NUL-terminated by it).
fn c_addr(raw: &[c_char; 256]) -> String {
    let bytes = raw.map(|c| c as u8);
    CStr::from_bytes_until_nul(&bytes)
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn cstring(spec: &str, s: String) -> Result<CString, CephError> {
    CString::new(s).map_err(|_| {
        CephError::new(
            Op::LocateImage,
            spec,
            libc::EINVAL,
            "image name contains a NUL byte",
        )
    })
}

/// The id in an `rbd_id.<name>` object: a length-prefixed string (32-bit little-endian
/// length, then the bytes), as librbd encodes it. Only ASCII letters and digits are taken.
fn decode_image_id(data: &[u8]) -> Option<&str> {
    let len = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let id = data.get(4..4 + len)?;
    if id.is_empty() || len > MAX_IMAGE_ID || !id.iter().all(u8::is_ascii_alphanumeric) {
        return None;
    }
    std::str::from_utf8(id).ok()
}

/// `v1:IP:PORT/NONCE` (how librados prints a locker) → `IP:PORT/NONCE` (how librbd and
/// `rbd status` print addresses).
fn plain_addr(a: String) -> String {
    for prefix in ["v1:", "v2:", "any:"] {
        if let Some(rest) = a.strip_prefix(prefix) {
            return rest.to_string();
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_specs_are_validated() {
        let s: ImageSpec = "rbd/vm-root".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((s.pool.as_str(), s.image.as_str()), ("rbd", "vm-root"));
        assert_eq!(s.to_string(), "rbd/vm-root");
        let s: ImageSpec = "rbd/tenant1/vm-root"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (s.pool.as_str(), s.namespace.as_str(), s.image.as_str()),
            ("rbd", "tenant1", "vm-root")
        );
        assert_eq!(s.to_string(), "rbd/tenant1/vm-root");
        for bad in [
            "",
            "rbd",
            "/img",
            "rbd/",
            "rbd//b",
            "rbd/a/",
            "rbd/a/b/c",
            "rbd/img@snap",
            "rbd/a b",
            "rbd/a\nb",
            "rbd/a;b\0",
        ] {
            assert!(
                bad.parse::<ImageSpec>().is_err(),
                "{bad:?} should be rejected"
            );
        }
        let long = format!("rbd/{}", "x".repeat(256));
        assert!(long.parse::<ImageSpec>().is_err());
    }

    #[test]
    fn image_ids_are_decoded_and_checked() {
        assert_eq!(
            decode_image_id(b"\x0c\0\0\0abcdef012345"),
            Some("abcdef012345")
        );
        assert_eq!(
            decode_image_id(b"\x03\0\0\0abcXX"),
            Some("abc"),
            "trailing bytes are ignored"
        );
        for bad in [
            &b""[..],
            b"\x01\0",
            b"\0\0\0\0",
            b"\x05\0\0\0abc",
            b"\x03\0\0\0a/c",
            b"\x03\0\0\0a\0c",
            b"\xff\xff\xff\xffabc",
        ] {
            assert_eq!(decode_image_id(bad), None, "{bad:?}");
        }
        let long = [&70u32.to_le_bytes()[..], &[b'a'; 70][..]].concat();
        assert_eq!(decode_image_id(&long), None);
    }

    #[test]
    fn addresses_lose_their_protocol_prefix() {
        assert_eq!(plain_addr("v1:127.0.0.2:0/123".into()), "127.0.0.2:0/123");
        assert_eq!(plain_addr("127.0.0.2:0/123".into()), "127.0.0.2:0/123");
        let mut raw = [0 as c_char; 256];
        for (d, s) in raw.iter_mut().zip(b"v1:10.0.0.1:0/7") {
            *d = *s as c_char;
        }
        assert_eq!(plain_addr(c_addr(&raw)), "10.0.0.1:0/7");
    }
}
