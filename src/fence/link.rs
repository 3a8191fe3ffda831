//! [`CephLink`]: the service's one persistent Ceph connection, shared by every request.
//!
//! It connects at start-up; when that fails it keeps trying in the background. A health
//! check (one mon command) runs periodically and drives readiness and the
//! `rbdfence_ceph_connected` gauge. librados re-establishes its own sessions when the
//! cluster comes back; if the health check keeps failing (e.g. the cluster was rebuilt and
//! our session can never recover), a fresh connection is made and swapped in. Calls made
//! while there is no connection fail at once with the reason, so fences deny
//! (`ceph-unavailable`) instead of waiting.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::rbd::client::CallObserver;
use crate::rbd::{
    BlocklistEntry, BlocklistItem, BlocklistRights, Ceph, CephError, ConnectOptions, EntityAddr,
    ImageSpec, ImageStatus, Op,
};

use super::driver::CephPort;

/// Consecutive failed health checks before a fresh connection is tried.
const RECONNECT_AFTER_FAILURES: u32 = 3;

/// How often the blocklist rights are asked again while they are known to be complete (a
/// check that found them lacking or unknown asks again at the next health check).
const RIGHTS_RECHECK: Duration = Duration::from_secs(60);

/// Whether the service can do its job, and why not: `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    /// One line for operators.
    pub why: String,
}

struct Conn {
    ceph: Ceph,
    own_addrs: Vec<EntityAddr>,
}

pub struct CephLink {
    opts: ConnectOptions,
    observer: Option<CallObserver>,
    conn: RwLock<Option<Arc<Conn>>>,
    last_error: RwLock<Option<CephError>>,
    healthy: AtomicBool,
    /// What the user may do with the blocklist, as last asked, and when.
    rights: RwLock<Option<(Result<BlocklistRights, CephError>, std::time::Instant)>>,
    /// Told whenever `healthy` changes (metrics gauge).
    on_health: Option<Arc<dyn Fn(bool) + Send + Sync>>,
}

impl CephLink {
    /// Connects once; on failure the link starts disconnected (see [`CephLink::maintain`]).
    pub async fn connect(
        opts: ConnectOptions,
        observer: Option<CallObserver>,
        on_health: Option<Arc<dyn Fn(bool) + Send + Sync>>,
    ) -> Arc<CephLink> {
        let link = Arc::new(CephLink {
            opts,
            observer,
            conn: RwLock::new(None),
            last_error: RwLock::new(None),
            healthy: AtomicBool::new(false),
            rights: RwLock::new(None),
            on_health,
        });
        link.try_connect().await;
        link
    }

    async fn try_connect(&self) -> bool {
        let result = async {
            let mut ceph = Ceph::connect(self.opts.clone()).await?;
            if let Some(obs) = &self.observer {
                ceph = ceph.with_observer(obs.clone());
            }
            // Without our own addresses the self-fence guard cannot work: no connection then.
            let own_addrs = ceph.client_addrs().await?;
            Ok::<_, CephError>(Conn { ceph, own_addrs })
        }
        .await;
        if let Some(obs) = &self.observer {
            obs(
                Op::Connect,
                crate::rbd::client::CallEvent::Finished(result.as_ref().map(|_| ())),
            );
        }
        match result {
            Ok(conn) => {
                tracing::info!(id = %self.opts.id, conf = %self.opts.conf.display(), addrs = ?conn.own_addrs, "connected to Ceph");
                *self.conn.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(conn));
                *self.last_error.write().unwrap_or_else(|p| p.into_inner()) = None;
                self.set_healthy(true);
                self.ask_rights(true).await;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to Ceph");
                *self.last_error.write().unwrap_or_else(|p| p.into_inner()) = Some(e);
                self.set_healthy(false);
                false
            }
        }
    }

    fn set_healthy(&self, h: bool) {
        let was = self.healthy.swap(h, Ordering::SeqCst);
        if was != h
            && let Some(f) = &self.on_health
        {
            f(h);
        }
    }

    /// Connected and answering the last health check.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Asks the monitors what the user may do with the blocklist: always when `now`, else
    /// when the last answer was lacking, unknown, or older than [`RIGHTS_RECHECK`].
    async fn ask_rights(&self, now: bool) {
        let due = now
            || match &*self.rights.read().unwrap_or_else(|p| p.into_inner()) {
                Some((Ok(r), at)) => {
                    !(r.add && r.range_add && r.rm) || at.elapsed() >= RIGHTS_RECHECK
                }
                _ => true,
            };
        let Ok(conn) = self.current() else { return };
        if !due {
            return;
        }
        let answer = conn.ceph.blocklist_rights().await;
        match &answer {
            Ok(r) if r.add && r.range_add && r.rm => {}
            Ok(r) => {
                tracing::warn!(id = %self.opts.id, rights = ?r, "the Ceph user lacks blocklist rights")
            }
            Err(e) => {
                tracing::warn!(id = %self.opts.id, error = %e, "cannot tell the Ceph user's blocklist rights")
            }
        }
        *self.rights.write().unwrap_or_else(|p| p.into_inner()) =
            Some((answer, std::time::Instant::now()));
    }

    /// Ready: connected, answering, and the user may add blocklist entries and ranges (without
    /// them no storage fence is possible, and a service that can only kill over SSH must not
    /// look healthy). A user that may not lift entries is ready, and said to be lacking.
    pub fn readiness(&self) -> Readiness {
        let user = format!("client.{}", self.opts.id);
        if !self.is_healthy() {
            let why = match self.current() {
                Err(e) => format!("not connected to Ceph: {e}"),
                Ok(_) => "connected to Ceph, but it does not answer the health check".into(),
            };
            return Readiness { ready: false, why };
        }
        match &*self.rights.read().unwrap_or_else(|p| p.into_inner()) {
            None => Readiness {
                ready: false,
                why: format!("connected to Ceph as {user}; its blocklist rights are not known yet"),
            },
            Some((Err(e), _)) => Readiness {
                ready: false,
                why: format!(
                    "connected to Ceph as {user}, but cannot tell whether it may blocklist: {e}"
                ),
            },
            Some((Ok(r), _)) if !(r.add && r.range_add) => Readiness {
                ready: false,
                why: format!(
                    "connected to Ceph as {user}, but it may not add blocklist {} (the monitors answer EACCES): no storage fence is possible, so every fence an SSH scan cannot settle is a deny (blocklist-failed); give it the caps the README documents",
                    if r.add { "ranges" } else { "entries" }
                ),
            },
            Some((Ok(r), _)) if !r.rm => Readiness {
                ready: true,
                why: format!(
                    "connected to Ceph as {user}; it may add blocklist entries but not lift them (osd blocklist rm is refused): fences stay in force until they lapse"
                ),
            },
            Some((Ok(_), _)) => Readiness {
                ready: true,
                why: format!("connected to Ceph as {user}; it may add and lift blocklist entries"),
            },
        }
    }

    fn current(&self) -> Result<Arc<Conn>, CephError> {
        if let Some(c) = self.conn.read().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(c);
        }
        let why = self
            .last_error
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Err(why.unwrap_or_else(|| {
            CephError::new(Op::Connect, "", libc::ENOTCONN, "not connected to Ceph")
        }))
    }

    /// The connection, for read-only queries (`GET /v1/images/…`).
    pub fn ceph(&self) -> Result<Ceph, CephError> {
        self.current().map(|c| c.ceph.clone())
    }

    /// One health check: a mon command on the current connection (or a connect attempt when
    /// there is none). Returns whether Ceph answered.
    pub async fn check(&self) -> bool {
        match self.current() {
            Ok(c) => {
                let ok = c.ceph.osdmap_epoch().await.is_ok();
                self.set_healthy(ok);
                if ok {
                    self.ask_rights(false).await;
                }
                ok
            }
            Err(_) => self.try_connect().await,
        }
    }

    /// Health checks every `interval` until `shutdown` fires; a fresh connection after
    /// [`RECONNECT_AFTER_FAILURES`] failed checks in a row.
    pub async fn maintain(
        self: Arc<Self>,
        interval: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut failures = 0u32;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => return,
            }
            if self.check().await {
                failures = 0;
                continue;
            }
            failures += 1;
            if failures >= RECONNECT_AFTER_FAILURES && self.try_connect().await {
                failures = 0;
            }
        }
    }
}

impl CephPort for Arc<CephLink> {
    fn own_addrs(&self) -> Vec<EntityAddr> {
        self.current()
            .map(|c| c.own_addrs.clone())
            .unwrap_or_default()
    }
    async fn image_status(&self, spec: &ImageSpec) -> Result<ImageStatus, CephError> {
        self.current()?.ceph.image_status(spec).await
    }
    async fn blocklist_add(
        &self,
        entry: BlocklistEntry,
        expire: Duration,
    ) -> Result<(), CephError> {
        self.current()?
            .ceph
            .blocklist_add(entry, Some(expire))
            .await
    }
    async fn blocklist_rm(&self, entry: BlocklistEntry) -> Result<(), CephError> {
        self.current()?.ceph.blocklist_rm(entry).await
    }
    async fn wait_for_latest_osdmap(&self) -> Result<(), CephError> {
        self.current()?.ceph.wait_for_latest_osdmap().await
    }
    async fn blocklist_ls(&self) -> Result<Vec<BlocklistItem>, CephError> {
        self.current()?.ceph.blocklist_ls().await
    }
    async fn osdmap_epoch(&self) -> Result<u64, CephError> {
        self.current()?.ceph.osdmap_epoch().await
    }
}
