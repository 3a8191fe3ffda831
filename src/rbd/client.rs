//! [`Ceph`]: the async face of the native layer, shared by the CLI and the service.
//!
//! Every call runs on tokio's blocking pool (librados calls block) and is bounded twice:
//! by Ceph's own timeouts, set before connecting, and by a tokio timeout a little longer,
//! so a wedged library call can never hang a caller.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};

use super::addr::{BlocklistEntry, EntityAddr};
use super::blocklist::BlocklistItem;
use super::cluster::{ConnectOptions, Rados};
use super::error::{CephError, Op};
use super::image::{HeaderObject, Image, ImageSpec, ImageStatus};
use super::ioctx::IoCtx;

/// Slack on top of Ceph's own timeout before tokio gives up on a call: Ceph's bound should
/// fire first and give the better error.
const MARGIN: Duration = Duration::from_secs(2);

/// How long an image stays open read-only for repeated observation. Watchers and lock owners
/// are read live from the header object on every call; the bound only limits how long a
/// renamed image keeps answering under its old name.
const IMAGE_CACHE_TTL: Duration = Duration::from_secs(30);
/// Images kept open at most (the cache is emptied when it is full).
const IMAGE_CACHE_MAX: usize = 4096;

/// An observed image: its read-only handle and (format 2) its header object.
#[derive(Clone)]
struct CachedImage {
    image: Arc<Mutex<Image>>,
    header: Option<HeaderObject>,
}

type ImageCache = Mutex<HashMap<ImageSpec, (CachedImage, Instant)>>;

fn cache_get(images: &ImageCache, spec: &ImageSpec) -> Option<CachedImage> {
    let mut map = images.lock().unwrap_or_else(|p| p.into_inner());
    match map.get(spec) {
        Some((img, at)) if at.elapsed() < IMAGE_CACHE_TTL => Some(img.clone()),
        Some(_) => {
            map.remove(spec);
            None
        }
        None => None,
    }
}

/// Told of every Ceph call's result (metrics hook).
pub type CallObserver = Arc<dyn Fn(Op, Result<(), &CephError>) + Send + Sync>;

/// A connected cluster, cheap to clone, safe to share between tasks.
#[derive(Clone)]
pub struct Ceph {
    rados: Arc<Rados>,
    pools: Arc<IoCtxs>,
    /// The one `rados_wait_for_latest_osdmap` in flight, and when it started.
    osdmap_wait: Arc<Mutex<Option<(Instant, OsdmapWait)>>>,
    images: Arc<ImageCache>,
    bound: Duration,
    observer: Option<CallObserver>,
}

impl Ceph {
    /// Connects, bounded by the mount timeout plus a margin.
    pub async fn connect(opts: ConnectOptions) -> Result<Ceph, CephError> {
        let bound = opts.timeouts.op.max(opts.timeouts.mount) + MARGIN;
        let mount_bound = opts.timeouts.mount + MARGIN;
        let target = format!("client.{}", opts.id);
        let rados = bounded(Op::Connect, target, mount_bound, move || {
            Rados::connect(&opts)
        })
        .await?;
        Ok(Ceph {
            rados: Arc::new(rados),
            pools: Arc::default(),
            osdmap_wait: Arc::default(),
            images: Arc::default(),
            bound,
            observer: None,
        })
    }

    /// Reports every call's result to `observer`.
    pub fn with_observer(mut self, observer: CallObserver) -> Ceph {
        self.observer = Some(observer);
        self
    }

    /// How long one call may take before it fails with ETIMEDOUT.
    pub fn call_bound(&self) -> Duration {
        self.bound
    }

    async fn call<T, F>(&self, op: Op, target: String, f: F) -> Result<T, CephError>
    where
        T: Send + 'static,
        F: FnOnce(&Arc<Rados>) -> Result<T, CephError> + Send + 'static,
    {
        let rados = self.rados.clone();
        let r = bounded(op, target, self.bound, move || f(&rados)).await;
        if let Some(obs) = &self.observer {
            obs(op, r.as_ref().map(|_| ()));
        }
        r
    }

    /// Watchers and lock owners of one image, from a read-only open (which adds no watcher).
    /// The open image is kept for a while: both lists are read live from the header object
    /// on every call (one OSD op each, run concurrently); an image that was removed (or
    /// replaced) since is reopened once.
    pub async fn image_status(&self, spec: &ImageSpec) -> Result<ImageStatus, CephError> {
        let (image, cached) = self.open_cached(spec).await?;
        match self.status_of(spec, image).await {
            Err(e) if cached && e.is_not_found() => {
                self.images
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(spec);
                let (image, _) = self.open_cached(spec).await?;
                self.status_of(spec, image).await
            }
            other => other,
        }
    }

    /// The cached read-only handle of `spec` (no I/O), or a new one opened on the blocking
    /// pool; `true` when it came from the cache.
    async fn open_cached(&self, spec: &ImageSpec) -> Result<(CachedImage, bool), CephError> {
        if let Some(hit) = cache_get(&self.images, spec) {
            return Ok((hit, true));
        }
        let (pools, images, spec) = (self.pools.clone(), self.images.clone(), spec.clone());
        let opened = self
            .call(Op::OpenImage, spec.to_string(), move |rados| {
                let ioctx = ioctx_for(&pools, rados, &spec.pool, &spec.namespace)?;
                let image = Image::open_read_only(ioctx, &spec.image)?;
                let entry = CachedImage {
                    header: image.header(),
                    image: Arc::new(Mutex::new(image)),
                };
                let mut map = images.lock().unwrap_or_else(|p| p.into_inner());
                if map.len() >= IMAGE_CACHE_MAX {
                    map.clear();
                }
                map.insert(spec.clone(), (entry.clone(), Instant::now()));
                Ok(entry)
            })
            .await?;
        Ok((opened, false))
    }

    /// Watchers (on the image handle) and lock owners (on the header object) at once.
    async fn status_of(
        &self,
        spec: &ImageSpec,
        image: CachedImage,
    ) -> Result<ImageStatus, CephError> {
        let handle = image.image.clone();
        let watchers = self.call(Op::ListWatchers, spec.to_string(), move |_| {
            handle.lock().unwrap_or_else(|p| p.into_inner()).watchers()
        });
        let lock_owners = self.call(Op::ListLockers, spec.to_string(), move |_| {
            match &image.header {
                Some(h) => h.lock_owners(),
                None => image
                    .image
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .lock_owners(),
            }
        });
        let (watchers, lock_owners) = tokio::join!(watchers, lock_owners);
        // Watchers first: a missing image shows there (ENOENT), while a header with no lock
        // answers an empty owner list.
        Ok(ImageStatus {
            watchers: watchers?,
            lock_owners: lock_owners?,
        })
    }

    pub async fn blocklist_add(
        &self,
        entry: BlocklistEntry,
        expire: Option<Duration>,
    ) -> Result<(), CephError> {
        self.call(Op::BlocklistAdd, entry.to_string(), move |r| {
            r.blocklist_add(&entry, expire)
        })
        .await
    }

    pub async fn blocklist_rm(&self, entry: BlocklistEntry) -> Result<(), CephError> {
        self.call(Op::BlocklistRm, entry.to_string(), move |r| {
            r.blocklist_rm(&entry)
        })
        .await
    }

    pub async fn blocklist_ls(&self) -> Result<Vec<BlocklistItem>, CephError> {
        self.call(Op::BlocklistLs, String::new(), |r| r.blocklist_ls())
            .await
    }

    /// Waits until this client has the latest osdmap the monitors know of.
    ///
    /// librados bounds this call by nothing (unlike most mon calls, it ignores
    /// `rados_mon_op_timeout`), so a hung monitor pins the blocking thread running it. Callers
    /// therefore share one wait at a time: a caller joins the wait in flight if it started after
    /// the caller arrived (its "latest" then includes everything the caller committed before);
    /// otherwise it waits, bounded, for that one to end and starts the next. At most one thread
    /// is ever pinned per connection.
    pub async fn wait_for_latest_osdmap(&self) -> Result<(), CephError> {
        let arrived = Instant::now();
        let deadline = arrived + self.bound;
        loop {
            let (fut, joined) = {
                let mut slot = self.osdmap_wait.lock().unwrap_or_else(|p| p.into_inner());
                match slot.as_ref() {
                    Some((started, f)) if f.peek().is_none() => (f.clone(), *started >= arrived),
                    _ => {
                        let this = self.clone();
                        let f = async move {
                            this.call(Op::WaitForLatestOsdmap, String::new(), |r| {
                                r.wait_for_latest_osdmap()
                            })
                            .await
                        }
                        .boxed()
                        .shared();
                        *slot = Some((Instant::now(), f.clone()));
                        (f, true)
                    }
                }
            };
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, fut).await {
                Ok(r) if joined => return r,
                // An earlier wait ended: start (or join) one that began after we arrived.
                Ok(_) => continue,
                Err(_) => {
                    return Err(CephError::new(
                        Op::WaitForLatestOsdmap,
                        "",
                        libc::ETIMEDOUT,
                        format!(
                            "no answer from Ceph within {:.1} s",
                            self.bound.as_secs_f64()
                        ),
                    ));
                }
            }
        }
    }

    pub async fn osdmap_epoch(&self) -> Result<u64, CephError> {
        self.call(Op::OsdmapEpoch, String::new(), |r| r.osdmap_epoch())
            .await
    }

    /// This client's own addresses (never to be fenced by it).
    pub async fn client_addrs(&self) -> Result<Vec<EntityAddr>, CephError> {
        self.call(Op::GetAddrs, String::new(), |r| r.addrs()).await
    }

    /// The blocking handle, for callers already on a blocking thread (benchmarks).
    pub fn rados(&self) -> &Arc<Rados> {
        &self.rados
    }

    /// Runs `f` on the IoCtx of `pool`/`namespace` on the blocking pool, bounded.
    async fn on_ioctx<T, F>(
        &self,
        op: Op,
        target: &str,
        pool: &str,
        namespace: &str,
        f: F,
    ) -> Result<T, CephError>
    where
        T: Send + 'static,
        F: FnOnce(&IoCtx) -> Result<T, CephError> + Send + 'static,
    {
        let (pools, pool, ns) = (self.pools.clone(), pool.to_string(), namespace.to_string());
        self.call(op, target.to_string(), move |rados| {
            f(ioctx_for(&pools, rados, &pool, &ns)?.as_ref())
        })
        .await
    }

    /// Replaces object `oid` of `pool`/`namespace` with `data`.
    pub async fn object_write(
        &self,
        pool: &str,
        namespace: &str,
        oid: &str,
        data: Vec<u8>,
    ) -> Result<(), CephError> {
        let o = oid.to_string();
        self.on_ioctx(Op::ObjectWrite, oid, pool, namespace, move |io| {
            io.write_full(&o, &data)
        })
        .await
    }

    /// Creates object `oid` with `data` unless it exists: `Ok(false)` when it does.
    pub async fn object_create_exclusive(
        &self,
        pool: &str,
        namespace: &str,
        oid: &str,
        data: Vec<u8>,
    ) -> Result<bool, CephError> {
        let o = oid.to_string();
        self.on_ioctx(Op::ObjectWrite, oid, pool, namespace, move |io| {
            io.create_exclusive(&o, &data)
        })
        .await
    }

    /// Object `oid`'s data, `None` when it does not exist.
    pub async fn object_read(
        &self,
        pool: &str,
        namespace: &str,
        oid: &str,
    ) -> Result<Option<Vec<u8>>, CephError> {
        let o = oid.to_string();
        self.on_ioctx(Op::ObjectRead, oid, pool, namespace, move |io| {
            io.read_full(&o)
        })
        .await
    }

    /// The names of the objects of `pool`/`namespace` that start with `prefix`.
    pub async fn object_list(
        &self,
        pool: &str,
        namespace: &str,
        prefix: &str,
    ) -> Result<Vec<String>, CephError> {
        let p = prefix.to_string();
        self.on_ioctx(Op::ObjectList, prefix, pool, namespace, move |io| {
            io.list(&p)
        })
        .await
    }

    /// Takes or renews the exclusive lock `name` on `oid` for `lease`; `Ok(false)` when another
    /// holder has it.
    pub async fn object_lock(
        &self,
        pool: &str,
        namespace: &str,
        oid: &str,
        name: &str,
        cookie: &str,
        lease: Duration,
    ) -> Result<bool, CephError> {
        let (o, n, c) = (oid.to_string(), name.to_string(), cookie.to_string());
        self.on_ioctx(Op::ObjectLock, oid, pool, namespace, move |io| {
            io.lock_exclusive(&o, &n, &c, lease)
        })
        .await
    }

    /// Releases the lock `name` on `oid` if `cookie` holds it.
    pub async fn object_unlock(
        &self,
        pool: &str,
        namespace: &str,
        oid: &str,
        name: &str,
        cookie: &str,
    ) -> Result<(), CephError> {
        let (o, n, c) = (oid.to_string(), name.to_string(), cookie.to_string());
        self.on_ioctx(Op::ObjectLock, oid, pool, namespace, move |io| {
            io.unlock(&o, &n, &c)
        })
        .await
    }

    /// Opens (or reuses) the pool's IoCtx; for callers on a blocking thread.
    pub fn ioctx(&self, pool: &str) -> Result<Arc<IoCtx>, CephError> {
        ioctx_for(&self.pools, &self.rados, pool, "")
    }
}

/// A shared `rados_wait_for_latest_osdmap`.
type OsdmapWait = Shared<BoxFuture<'static, Result<(), CephError>>>;

/// One IoCtx per (pool, namespace).
type IoCtxs = Mutex<HashMap<(String, String), Arc<IoCtx>>>;

/// One IoCtx per pool and namespace for the life of the connection: creating one is a round
/// trip for the pool id, and a fence looks at several images of the same pool.
fn ioctx_for(
    pools: &IoCtxs,
    rados: &Arc<Rados>,
    pool: &str,
    namespace: &str,
) -> Result<Arc<IoCtx>, CephError> {
    let mut map = pools
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let key = (pool.to_string(), namespace.to_string());
    if let Some(io) = map.get(&key) {
        return Ok(io.clone());
    }
    let io = Arc::new(IoCtx::new(rados.clone(), pool, namespace)?);
    map.insert(key, io.clone());
    Ok(io)
}

/// Runs a blocking Ceph call on the blocking pool, failing with ETIMEDOUT after `bound`.
async fn bounded<T, F>(op: Op, target: String, bound: Duration, f: F) -> Result<T, CephError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, CephError> + Send + 'static,
{
    match tokio::time::timeout(bound, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(CephError::new(
            op,
            target,
            libc::EIO,
            format!("worker thread failed: {join}"),
        )),
        Err(_) => Err(CephError::new(
            op,
            target,
            libc::ETIMEDOUT,
            format!("no answer from Ceph within {:.1} s", bound.as_secs_f64()),
        )),
    }
}
