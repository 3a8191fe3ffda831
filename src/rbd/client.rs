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
use super::image::{HeaderCheck, HeaderObject, ImageSpec, ImageStatus};
use super::ioctx::IoCtx;

/// Slack on top of Ceph's own timeout before tokio gives up on a call: Ceph's bound should
/// fire first and give the better error.
const MARGIN: Duration = Duration::from_secs(2);

/// OSD calls (image headers, ledger objects) running at once on blocking threads, at most.
/// Each blocks its thread for an OSD round trip; a burst of a thousand fences would otherwise
/// pin hundreds of threads (memory and context switches) for no more throughput.
pub const OSD_CALLS_AT_ONCE: usize = 32;

/// Header objects located, kept at most (the map is emptied when it is full): a few hundred
/// bytes each, whatever the number of images ever seen.
const HEADER_CACHE_MAX: usize = 4096;

/// Where each image's header object was last found. Only a hint: every read checks it again.
type HeaderCache = Mutex<HashMap<ImageSpec, HeaderObject>>;

/// A Ceph call starting, or ending with its result.
#[derive(Debug, Clone, Copy)]
pub enum CallEvent<'a> {
    Started,
    Finished(Result<(), &'a CephError>),
    /// Its caller stopped waiting (the work may still run on its blocking thread).
    Abandoned,
}

/// Told when every Ceph call starts and ends (metrics hook).
pub type CallObserver = Arc<dyn Fn(Op, CallEvent<'_>) + Send + Sync>;

/// A connected cluster, cheap to clone, safe to share between tasks.
#[derive(Clone)]
pub struct Ceph {
    rados: Arc<Rados>,
    pools: Arc<IoCtxs>,
    /// The one `rados_wait_for_latest_osdmap` in flight, and when it started.
    osdmap_wait: Arc<Mutex<Option<(Instant, OsdmapWait)>>>,
    headers: Arc<HeaderCache>,
    osd_slots: Arc<tokio::sync::Semaphore>,
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
            headers: Arc::default(),
            osd_slots: Arc::new(tokio::sync::Semaphore::new(OSD_CALLS_AT_ONCE)),
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
        let slots = op.is_osd().then(|| self.osd_slots.clone());
        let work = blocking(op, target.clone(), slots, move || f(&rados));
        self.observed(op, target, work).await
    }

    /// Watchers and lock owners of one image, read live from its header object with librados
    /// (the image is not opened: no watch, nothing kept per image).
    ///
    /// Finding the header object takes a read of `rbd_id.<image>`. When the image was looked
    /// at before, that read runs at the same time as the listings on the header found then
    /// (one round trip), and the answer stands only if the name still leads to that header;
    /// otherwise (the image was removed, replaced or renamed over) the header is looked up
    /// again and read. So an answer never rests on an earlier lookup.
    pub async fn image_status(&self, spec: &ImageSpec) -> Result<ImageStatus, CephError> {
        let known = self
            .headers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(spec)
            .cloned();
        if let Some(known) = known {
            let checked = match self
                .observed(Op::ReadHeader, spec.to_string(), known.read(true))
                .await
            {
                Ok((status, HeaderCheck::Same)) => Some(status),
                // Renamed over, replaced or removed: look it up again below.
                Ok(_) => None,
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(e),
            };
            if let Some(status) = checked {
                return Ok(status);
            }
        }
        let header = self.locate(spec).await?;
        self.observed(Op::ReadHeader, spec.to_string(), header.read(false))
            .await
            .map(|(status, _)| status)
    }

    /// Runs one call, bounded by the call bound and told to the observer: started, then
    /// finished with its result, or abandoned when the caller gives up.
    async fn observed<T>(
        &self,
        op: Op,
        target: String,
        fut: impl std::future::Future<Output = Result<T, CephError>>,
    ) -> Result<T, CephError> {
        if let Some(obs) = &self.observer {
            obs(op, CallEvent::Started);
        }
        let finish = self.observer.as_ref().map(|obs| FinishGuard {
            obs: obs.clone(),
            op,
            done: false,
        });
        let r = tokio::time::timeout(self.bound, fut)
            .await
            .unwrap_or_else(|_| Err(timed_out(op, target, self.bound)));
        if let Some(mut g) = finish {
            g.done = true;
            (g.obs)(op, CallEvent::Finished(r.as_ref().map(|_| ())));
        }
        r
    }

    /// The header object of `spec`, looked up afresh (and remembered for the next read).
    async fn locate(&self, spec: &ImageSpec) -> Result<HeaderObject, CephError> {
        let (pools, headers, spec) = (self.pools.clone(), self.headers.clone(), spec.clone());
        self.call(Op::LocateImage, spec.to_string(), move |rados| {
            let ioctx = ioctx_for(&pools, rados, &spec.pool, &spec.namespace)?;
            let header = HeaderObject::locate(ioctx, &spec.image)?;
            let mut map = headers.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() >= HEADER_CACHE_MAX {
                map.clear();
            }
            map.insert(spec, header.clone());
            Ok(header)
        })
        .await
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

    /// What this user may do with the blocklist (see [`Rados::blocklist_rights`]).
    pub async fn blocklist_rights(&self) -> Result<crate::rbd::BlocklistRights, CephError> {
        self.call(Op::BlocklistProbe, String::new(), |r| r.blocklist_rights())
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

/// Ends a call for the observer if its caller is dropped before the call ends.
struct FinishGuard {
    obs: CallObserver,
    op: Op,
    done: bool,
}

impl Drop for FinishGuard {
    fn drop(&mut self) {
        if !self.done {
            (self.obs)(self.op, CallEvent::Abandoned);
        }
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
    tokio::time::timeout(bound, blocking(op, target.clone(), None, f))
        .await
        .unwrap_or_else(|_| Err(timed_out(op, target, bound)))
}

/// A blocking Ceph call on the blocking pool, first taking one of `slots` (the wait counts
/// toward the caller's bound); the slot is freed when the blocking work ends, even if the
/// caller gave up before.
async fn blocking<T, F>(
    op: Op,
    target: String,
    slots: Option<Arc<tokio::sync::Semaphore>>,
    f: F,
) -> Result<T, CephError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, CephError> + Send + 'static,
{
    let permit = match slots {
        Some(s) => s.acquire_owned().await.ok(),
        None => None,
    };
    tokio::task::spawn_blocking(move || {
        let _slot = permit;
        f()
    })
    .await
    .unwrap_or_else(|join| {
        Err(CephError::new(
            op,
            target,
            libc::EIO,
            format!("worker thread failed: {join}"),
        ))
    })
}

fn timed_out(op: Op, target: String, bound: Duration) -> CephError {
    CephError::new(
        op,
        target,
        libc::ETIMEDOUT,
        format!("no answer from Ceph within {:.1} s", bound.as_secs_f64()),
    )
}
