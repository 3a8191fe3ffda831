//! RBD images (`rbd_image_t`), opened read-only to observe them: watchers and lockers.
//!
//! A read-only open registers no watch, so the observer never shows up among the watchers
//! it reports. (`rbd_lock_get_owners` needs a read-write open in Pacific, hence
//! `rbd_list_lockers`, which reads the exclusive lock's holder from the header object.)

use std::ffi::{CStr, CString, c_char, c_int};
use std::fmt;
use std::ptr;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::addr::EntityAddr;
use super::error::{CephError, Op};
use super::ffi;
use super::ioctx::IoCtx;

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

/// An image opened read-only. Closed in `Drop`; keeps its IoCtx (and cluster) alive.
pub struct Image {
    ptr: ffi::rbd_image_t,
    spec: String,
    /// `rbd_header.<id>` for format-2 images: lock owners are read from it live.
    header_oid: Option<CString>,
    ioctx: Arc<IoCtx>,
}

/// The lock librbd's exclusive-lock feature (and `rbd lock add`) takes on the header object.
const RBD_LOCK_NAME: &std::ffi::CStr = c"rbd_lock";

// SAFETY: librbd image handles may move between threads (librbd locks internally); `Image`
// is deliberately not `Sync`, so one thread at a time uses it.
unsafe impl Send for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open_read_only and closed once; the IoCtx is alive (we hold it).
        let _ = unsafe { ffi::rbd_close(self.ptr) };
    }
}

impl Image {
    /// Opens `image` of the IoCtx's pool read-only (at the head, no snapshot). A missing
    /// image is `ENOENT`.
    ///
    /// Implements: `rbd_open_read_only`.
    pub fn open_read_only(ioctx: Arc<IoCtx>, image: &str) -> Result<Image, CephError> {
        let spec = format!("{}/{}", ioctx.pool(), image);
        let name = CString::new(image).map_err(|_| {
            CephError::new(
                Op::OpenImage,
                &spec,
                libc::EINVAL,
                "image name contains a NUL byte",
            )
        })?;
        let mut ptr: ffi::rbd_image_t = ptr::null_mut();
        // SAFETY: valid ioctx kept alive by the Arc; `name` outlives the call; a null snapshot
        // name means the head; `ptr` is a valid out-pointer.
        let r = unsafe {
            ffi::rbd_open_read_only(ioctx.as_ptr(), name.as_ptr(), &mut ptr, ptr::null())
        };
        if r < 0 {
            let msg = if r == -libc::ENOENT {
                "no such image"
            } else {
                ""
            };
            return Err(CephError::from_code(Op::OpenImage, spec, r.into(), msg));
        }
        let mut img = Image {
            ptr,
            spec,
            header_oid: None,
            ioctx,
        };
        img.header_oid = img
            .id()
            .ok()
            .and_then(|id| CString::new(format!("rbd_header.{id}")).ok());
        Ok(img)
    }

    /// The image's id (format 2); an error for format-1 images.
    ///
    /// Implements: `rbd_get_id`.
    fn id(&self) -> Result<String, CephError> {
        let mut buf = vec![0 as c_char; 64];
        // SAFETY: `buf` is as long as the length passed; librbd writes a NUL-terminated id
        // within it or returns an error (ERANGE when too short).
        let r = unsafe { ffi::rbd_get_id(self.ptr, buf.as_mut_ptr(), buf.len()) };
        if r < 0 {
            return Err(CephError::from_code(
                Op::OpenImage,
                &self.spec,
                r.into(),
                "",
            ));
        }
        let bytes: Vec<u8> = buf
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The clients watching the image header, retrying while librbd says the array is too
    /// small (ERANGE, with the size it needs).
    ///
    /// Implements: `rbd_watchers_list`, `rbd_watchers_list_cleanup`.
    pub fn watchers(&self) -> Result<Vec<Watcher>, CephError> {
        let mut cap: usize = 8;
        for _ in 0..MAX_SIZING_ATTEMPTS {
            let mut buf: Vec<ffi::rbd_image_watcher_t> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: `buf` has room for `cap` entries and librbd writes at most `n` (= cap);
            // on success it sets `n` to the number written.
            let r = unsafe { ffi::rbd_watchers_list(self.ptr, buf.as_mut_ptr(), &mut n) };
            if r == -libc::ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            if r < 0 {
                return Err(CephError::from_code(
                    Op::ListWatchers,
                    &self.spec,
                    r.into(),
                    "",
                ));
            }
            let n = n.min(cap);
            // SAFETY: librbd initialised the first `n` entries.
            unsafe { buf.set_len(n) };
            let watchers = buf
                .iter()
                .map(|w| Watcher {
                    address: if w.addr.is_null() {
                        String::new()
                    } else {
                        // SAFETY: librbd fills `addr` with a NUL-terminated string it owns
                        // until rbd_watchers_list_cleanup.
                        unsafe { CStr::from_ptr(w.addr) }
                            .to_string_lossy()
                            .into_owned()
                    },
                    client: w.id,
                    cookie: w.cookie,
                })
                .collect();
            // SAFETY: frees the strings librbd allocated in these `n` entries, once.
            unsafe { ffi::rbd_watchers_list_cleanup(buf.as_mut_ptr(), n) };
            return Ok(watchers);
        }
        Err(CephError::new(
            Op::ListWatchers,
            &self.spec,
            libc::ERANGE,
            "watcher list kept growing",
        ))
    }

    /// The lockers of the image header: with the exclusive-lock feature, the current
    /// owner's address (tag `internal`). Empty when nobody holds a lock. For format-2 images
    /// read live from the header object, so a long-open handle never reports stale owners
    /// (librbd's own `rbd_list_lockers` answers from what the last header refresh saw).
    ///
    /// Implements: `rados_list_lockers` (format 2), `rbd_list_lockers` (format 1).
    pub fn lock_owners(&self) -> Result<Vec<LockOwner>, CephError> {
        if let Some(h) = self.header() {
            return h.lock_owners();
        }
        list_lockers(&self.spec, |ex, tag, tl, cl, cls, kl, kls, al, als| {
            // SAFETY: valid open image; each buffer is as long as the length passed with it.
            unsafe { ffi::rbd_list_lockers(self.ptr, ex, tag, tl, cl, cls, kl, kls, al, als) }
        })
    }

    /// The image's header object (format 2), for reading its lock owners without the image
    /// handle — concurrently with a watcher listing on the handle.
    pub fn header(&self) -> Option<HeaderObject> {
        self.header_oid.as_ref().map(|oid| HeaderObject {
            ioctx: self.ioctx.clone(),
            oid: oid.clone(),
            spec: self.spec.clone(),
        })
    }

    /// Watchers and lock owners in one go.
    pub fn status(&self) -> Result<ImageStatus, CephError> {
        Ok(ImageStatus {
            watchers: self.watchers()?,
            lock_owners: self.lock_owners()?,
        })
    }
}

/// A format-2 image's header object (`rbd_header.<id>`) in its pool.
#[derive(Clone)]
pub struct HeaderObject {
    ioctx: Arc<IoCtx>,
    oid: CString,
    spec: String,
}

impl HeaderObject {
    /// The holders of the image's lock (`rbd_lock`), read live from the object.
    ///
    /// Implements: `rados_list_lockers`.
    pub fn lock_owners(&self) -> Result<Vec<LockOwner>, CephError> {
        list_lockers(&self.spec, |ex, tag, tl, cl, cls, kl, kls, al, als| {
            // SAFETY: valid ioctx (kept alive by the Arc) and NUL-terminated object and lock
            // names; each buffer is as long as the length passed with it.
            unsafe {
                ffi::rados_list_lockers(
                    self.ioctx.as_ptr(),
                    self.oid.as_ptr(),
                    RBD_LOCK_NAME.as_ptr(),
                    ex,
                    tag,
                    tl,
                    cl,
                    cls,
                    kl,
                    kls,
                    al,
                    als,
                )
            }
        })
    }
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

/// The sizing loop around a locker listing: grows the buffers while it answers ERANGE.
fn list_lockers(
    spec: &str,
    mut call: impl FnMut(
        *mut c_int,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
    ) -> isize,
) -> Result<Vec<LockOwner>, CephError> {
    let (mut tag_cap, mut clients_cap, mut cookies_cap, mut addrs_cap) =
        (64usize, 256usize, 256usize, 256usize);
    for _ in 0..MAX_SIZING_ATTEMPTS {
        let mut tag = vec![0 as c_char; tag_cap];
        let mut clients = vec![0 as c_char; clients_cap];
        let mut cookies = vec![0 as c_char; cookies_cap];
        let mut addrs = vec![0 as c_char; addrs_cap];
        let (mut tl, mut cl, mut kl, mut al) = (tag_cap, clients_cap, cookies_cap, addrs_cap);
        let mut exclusive: c_int = 0;
        let r = call(
            &mut exclusive,
            tag.as_mut_ptr(),
            &mut tl,
            clients.as_mut_ptr(),
            &mut cl,
            cookies.as_mut_ptr(),
            &mut kl,
            addrs.as_mut_ptr(),
            &mut al,
        );
        if r == -(libc::ERANGE as isize) {
            // The library reports the lengths it needs; grow every buffer that was short.
            tag_cap = grow(tag_cap, tl);
            clients_cap = grow(clients_cap, cl);
            cookies_cap = grow(cookies_cap, kl);
            addrs_cap = grow(addrs_cap, al);
            continue;
        }
        if r == -(libc::ENOENT as isize) {
            // No lock was ever taken on this object: nobody holds one. (A missing image
            // fails earlier: `status` lists the watchers of the same object first.)
            return Ok(Vec::new());
        }
        if r < 0 {
            return Err(CephError::from_code(Op::ListLockers, spec, r as i64, ""));
        }
        let mode = if exclusive != 0 {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        };
        let addrs = split_nul_list(&addrs[..al.min(addrs_cap)]);
        return Ok(addrs
            .into_iter()
            .take(r as usize)
            .map(|address| LockOwner {
                mode,
                address: plain_addr(address),
            })
            .collect());
    }
    Err(CephError::new(
        Op::ListLockers,
        spec,
        libc::ERANGE,
        "locker list kept growing",
    ))
}

/// The next capacity of one of the buffers after ERANGE: what librbd asked for, or unchanged
/// when this one was long enough (librbd reports every length when any is short).
fn grow(cap: usize, needed: usize) -> usize {
    if needed > cap { needed } else { cap }
}

/// Splits librbd's packed list of NUL-terminated strings.
fn split_nul_list(buf: &[c_char]) -> Vec<String> {
    let bytes: Vec<u8> = buf.iter().map(|&c| c as u8).collect();
    bytes
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
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
    fn splits_packed_lists() {
        let raw: Vec<c_char> = b"a:0/1\0b:0/2\0\0\0".iter().map(|&b| b as c_char).collect();
        assert_eq!(
            split_nul_list(&raw),
            vec!["a:0/1".to_string(), "b:0/2".to_string()]
        );
    }
}
