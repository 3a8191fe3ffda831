//! The fence ledger: every decision with its evidence, recorded before the reply is sent.
//!
//! Backends:
//! - **RADOS** (the default; `[ledger] pool`, `namespace`): one object per decision,
//!   `fence.<fence_id>` (the record as JSON), and one per `request_id`, `request.<request_id>`
//!   (the fence id that answered it, created exclusively, so an id is answered once even
//!   across instances and restarts; requests that joined another's fence get one too). Shared
//!   by every instance and as durable as the pool.
//! - a JSON-lines **file** (`fence.ledger`), appended and synced, for a single instance;
//! - **memory** only (tests and the one-shot CLI without either).
//!
//! Every write is bounded by [`WRITE_TIMEOUT`]. The most recent [`MEMORY_LIMIT`] records this
//! process made are also kept in memory.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::link::CephLink;
use super::record::{FenceRecord, UnfenceRecord};
use crate::rbd::CephError;

/// Records kept in memory.
pub const MEMORY_LIMIT: usize = 10_000;
/// How long one durable write may take before it counts as failed: a hung file system or
/// pool must not wedge a fence.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

const FENCE_PREFIX: &str = "fence.";
const REQUEST_PREFIX: &str = "request.";
/// `unfence.<host>:<unfence_id>`: `:` is not allowed in host ids, so the prefix of one host
/// never matches another's.
const UNFENCE_PREFIX: &str = "unfence.";
/// `key.<digest>`: the latest fence of one request shape (VM, hosts, volumes).
const KEY_PREFIX: &str = "key.";
/// `lease.<host>`: the object whose lock one instance holds while it fences that host.
const LEASE_PREFIX: &str = "lease.";
const LEASE_LOCK: &str = "fence";

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ledger in RADOS ({pool}/{namespace}): {source}")]
    Rados {
        pool: String,
        namespace: String,
        source: CephError,
    },
    #[error("ledger in RADOS ({pool}/{namespace}): {what}")]
    Invalid {
        pool: String,
        namespace: String,
        what: String,
    },
}

/// Where the RADOS ledger lives, and the connection it uses.
#[derive(Clone)]
pub struct RadosStore {
    pub link: Arc<CephLink>,
    pub pool: String,
    pub namespace: String,
}

impl RadosStore {
    fn err(&self, source: CephError) -> LedgerError {
        LedgerError::Rados {
            pool: self.pool.clone(),
            namespace: self.namespace.clone(),
            source,
        }
    }

    fn invalid(&self, what: String) -> LedgerError {
        LedgerError::Invalid {
            pool: self.pool.clone(),
            namespace: self.namespace.clone(),
            what,
        }
    }

    fn ceph(&self) -> Result<crate::rbd::Ceph, LedgerError> {
        self.link.ceph().map_err(|e| self.err(e))
    }

    async fn write(&self, record: &FenceRecord) -> Result<(), LedgerError> {
        let json = serde_json::to_vec(record).map_err(|e| self.invalid(e.to_string()))?;
        let ceph = self.ceph()?;
        let oid = format!("{FENCE_PREFIX}{}", record.reply.fence_id);
        ceph.object_write(&self.pool, &self.namespace, &oid, json)
            .await
            .map_err(|e| self.err(e))?;
        if let Some(id) = &record.request_id {
            self.alias(id, &record.reply.fence_id).await?;
        }
        Ok(())
    }

    /// `request.<id>` → `fence_id`, unless the id is answered already (the first answer stays).
    async fn alias(&self, request_id: &str, fence_id: &str) -> Result<(), LedgerError> {
        let ceph = self.ceph()?;
        let oid = format!("{REQUEST_PREFIX}{request_id}");
        ceph.object_create_exclusive(
            &self.pool,
            &self.namespace,
            &oid,
            fence_id.as_bytes().to_vec(),
        )
        .await
        .map(|_| ())
        .map_err(|e| self.err(e))
    }

    async fn get(&self, fence_id: &str) -> Result<Option<FenceRecord>, LedgerError> {
        let ceph = self.ceph()?;
        let oid = format!("{FENCE_PREFIX}{fence_id}");
        let Some(data) = ceph
            .object_read(&self.pool, &self.namespace, &oid)
            .await
            .map_err(|e| self.err(e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| self.invalid(format!("{oid} is not a fence record: {e}")))
    }

    async fn fence_of_request(&self, request_id: &str) -> Result<Option<String>, LedgerError> {
        let ceph = self.ceph()?;
        let oid = format!("{REQUEST_PREFIX}{request_id}");
        let data = ceph
            .object_read(&self.pool, &self.namespace, &oid)
            .await
            .map_err(|e| self.err(e))?;
        Ok(data.map(|d| String::from_utf8_lossy(&d).into_owned()))
    }

    async fn write_unfence(&self, u: &UnfenceRecord) -> Result<(), LedgerError> {
        let json = serde_json::to_vec(u).map_err(|e| self.invalid(e.to_string()))?;
        let oid = format!("{UNFENCE_PREFIX}{}:{}", u.host, u.unfence_id);
        self.ceph()?
            .object_write(&self.pool, &self.namespace, &oid, json)
            .await
            .map_err(|e| self.err(e))
    }

    async fn unfences(&self, host: Option<&str>) -> Result<Vec<UnfenceRecord>, LedgerError> {
        let ceph = self.ceph()?;
        let prefix = match host {
            Some(h) => format!("{UNFENCE_PREFIX}{h}:"),
            None => UNFENCE_PREFIX.to_string(),
        };
        let mut out = Vec::new();
        for oid in ceph
            .object_list(&self.pool, &self.namespace, &prefix)
            .await
            .map_err(|e| self.err(e))?
        {
            let Some(data) = ceph
                .object_read(&self.pool, &self.namespace, &oid)
                .await
                .map_err(|e| self.err(e))?
            else {
                continue;
            };
            out.push(
                serde_json::from_slice(&data)
                    .map_err(|e| self.invalid(format!("{oid} is not an unfence record: {e}")))?,
            );
        }
        Ok(out)
    }

    async fn write_key(&self, digest: &str, fence_id: &str) -> Result<(), LedgerError> {
        self.ceph()?
            .object_write(
                &self.pool,
                &self.namespace,
                &format!("{KEY_PREFIX}{digest}"),
                fence_id.as_bytes().to_vec(),
            )
            .await
            .map_err(|e| self.err(e))
    }

    async fn read_key(&self, digest: &str) -> Result<Option<String>, LedgerError> {
        let data = self
            .ceph()?
            .object_read(
                &self.pool,
                &self.namespace,
                &format!("{KEY_PREFIX}{digest}"),
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(data.map(|d| String::from_utf8_lossy(&d).into_owned()))
    }

    async fn lease(
        &self,
        host: &str,
        holder: &str,
        lease: std::time::Duration,
    ) -> Result<bool, LedgerError> {
        self.ceph()?
            .object_lock(
                &self.pool,
                &self.namespace,
                &format!("{LEASE_PREFIX}{host}"),
                LEASE_LOCK,
                holder,
                lease,
            )
            .await
            .map_err(|e| self.err(e))
    }

    async fn release(&self, host: &str, holder: &str) -> Result<(), LedgerError> {
        self.ceph()?
            .object_unlock(
                &self.pool,
                &self.namespace,
                &format!("{LEASE_PREFIX}{host}"),
                LEASE_LOCK,
                holder,
            )
            .await
            .map_err(|e| self.err(e))
    }

    async fn recent(&self, limit: usize) -> Result<Vec<FenceRecord>, LedgerError> {
        let ceph = self.ceph()?;
        let mut ids: Vec<String> = ceph
            .object_list(&self.pool, &self.namespace, FENCE_PREFIX)
            .await
            .map_err(|e| self.err(e))?
            .into_iter()
            .map(|o| o[FENCE_PREFIX.len()..].to_string())
            .collect();
        ids.sort_by_key(|id| std::cmp::Reverse(fence_id_order(id)));
        let mut out = Vec::new();
        for id in ids.into_iter().take(limit) {
            if let Some(r) = self.get(&id).await? {
                out.push(r);
            }
        }
        Ok(out)
    }
}

/// Fence ids are `f-<ms since the epoch>-<pid>-<sequence>` in hex: newest first sorts by time,
/// then sequence (ids of another shape sort last).
fn fence_id_order(id: &str) -> (u64, u64, u64, String) {
    let mut parts = id.strip_prefix("f-").unwrap_or("").split('-');
    let mut hex = || {
        parts
            .next()
            .and_then(|p| u64::from_str_radix(p, 16).ok())
            .unwrap_or(0)
    };
    let (ms, pid, seq) = (hex(), hex(), hex());
    (ms, seq, pid, id.to_string())
}

async fn bounded<T>(
    fut: impl std::future::Future<Output = Result<T, LedgerError>>,
    store: &RadosStore,
) -> Result<T, LedgerError> {
    match tokio::time::timeout(WRITE_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(store.invalid(format!("no answer within {WRITE_TIMEOUT:?}"))),
    }
}

#[derive(Clone, Default)]
pub struct Ledger {
    file: Option<PathBuf>,
    rados: Option<RadosStore>,
    records: Arc<Mutex<VecDeque<FenceRecord>>>,
    /// request_id → fence_id for requests that joined another request's fence (also in RADOS
    /// when that is the backend).
    aliases: Arc<Mutex<HashMap<String, String>>>,
    /// Unfences recorded by this process (in RADOS too when that is the backend).
    unfences: Arc<Mutex<Vec<UnfenceRecord>>>,
}

impl Ledger {
    /// A ledger in memory only.
    pub fn in_memory() -> Ledger {
        Ledger::default()
    }

    /// The ledger in RADOS: pool `pool`, namespace `namespace`, over `link`.
    pub fn in_rados(link: Arc<CephLink>, pool: String, namespace: String) -> Ledger {
        Ledger {
            rados: Some(RadosStore {
                link,
                pool,
                namespace,
            }),
            ..Ledger::default()
        }
    }

    /// A ledger backed by `path` (created if missing); loads the records already there.
    pub fn open(path: PathBuf) -> Result<Ledger, LedgerError> {
        let err = |source| LedgerError::File {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut records = VecDeque::new();
        match std::fs::File::open(&path) {
            Ok(f) => {
                for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
                    let line = line.map_err(err)?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<FenceRecord>(&line) {
                        Ok(r) => push_bounded(&mut records, r),
                        Err(e) => {
                            tracing::warn!(path = %path.display(), line = n + 1, error = %e, "skipping unreadable ledger line")
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        Ok(Ledger {
            file: Some(path),
            records: Arc::new(Mutex::new(records)),
            ..Ledger::default()
        })
    }

    /// Records one decision: appended and synced to the file first (when there is one), then
    /// kept in memory. Blocking file I/O runs off the async threads, bounded by
    /// [`WRITE_TIMEOUT`] (a write still hanging then is left to its thread and counts as failed).
    pub async fn record(&self, record: FenceRecord) -> Result<(), LedgerError> {
        if let Some(store) = &self.rados {
            bounded(store.write(&record), store).await?;
        }
        if let Some(path) = self.file.clone() {
            let line = serde_json::to_string(&record).map_err(|e| LedgerError::File {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
            let p = path.clone();
            let write = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)?;
                f.write_all(format!("{line}\n").as_bytes())?;
                f.sync_data()
            });
            let written = match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                Ok(joined) => joined.unwrap_or_else(|e| Err(std::io::Error::other(e.to_string()))),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no write within {WRITE_TIMEOUT:?}"),
                )),
            };
            written.map_err(|source| LedgerError::File { path, source })?;
        }
        push_bounded(&mut self.lock(), record);
        Ok(())
    }

    /// Records a deny that must not be lost although the ledger may be failing (a
    /// `ledger-failed` or `internal-error` deny): durably if the ledger takes it, else at least
    /// in memory (so a replay of its `request_id` does not act again) and in the error log.
    pub async fn record_deny(&self, record: FenceRecord) {
        if let Err(e) = self.record(record.clone()).await {
            tracing::error!(
                fence_id = %record.reply.fence_id,
                error = %e,
                record = %serde_json::to_string(&record).unwrap_or_default(),
                "the ledger cannot record this deny; kept in memory only"
            );
            push_bounded(&mut self.lock(), record);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<FenceRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `record` again (the lifecycle added renewed entries to it).
    pub async fn rewrite(&self, record: FenceRecord) -> Result<(), LedgerError> {
        if let Some(store) = &self.rados {
            bounded(store.write(&record), store).await?;
        }
        let mut mem = self.lock();
        if let Some(r) = mem
            .iter_mut()
            .find(|r| r.reply.fence_id == record.reply.fence_id)
        {
            *r = record;
        }
        Ok(())
    }

    /// Records an unfence, before its reply is sent.
    pub async fn record_unfence(&self, u: UnfenceRecord) -> Result<(), LedgerError> {
        if let Some(store) = &self.rados {
            bounded(store.write_unfence(&u), store).await?;
        }
        self.unfences
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(u);
        Ok(())
    }

    /// The unfences of `host` (every host's when `None`).
    pub async fn unfences(&self, host: Option<&str>) -> Result<Vec<UnfenceRecord>, LedgerError> {
        if let Some(store) = &self.rados {
            return bounded(store.unfences(host), store).await;
        }
        Ok(self
            .unfences
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|u| host.is_none_or(|h| u.host == h))
            .cloned()
            .collect())
    }

    /// Whether the ledger is shared between instances (in RADOS): only then do fences take the
    /// host's lease.
    pub fn shared(&self) -> bool {
        self.rados.is_some()
    }

    /// Remembers `fence_id` as the latest fence of the request shape `digest`.
    pub async fn record_key(&self, digest: &str, fence_id: &str) -> Result<(), LedgerError> {
        match &self.rados {
            Some(store) => bounded(store.write_key(digest, fence_id), store).await,
            None => Ok(()),
        }
    }

    /// The id of the latest fence of the request shape `digest`, if any instance recorded one.
    pub async fn key_fence(&self, digest: &str) -> Result<Option<String>, LedgerError> {
        match &self.rados {
            Some(store) => bounded(store.read_key(digest), store).await,
            None => Ok(None),
        }
    }

    /// Takes or renews `holder`'s lease on fencing `host` (`Ok(false)`: another holds it).
    pub async fn lease(
        &self,
        host: &str,
        holder: &str,
        lease: std::time::Duration,
    ) -> Result<bool, LedgerError> {
        match &self.rados {
            Some(store) => bounded(store.lease(host, holder, lease), store).await,
            None => Ok(true),
        }
    }

    /// Gives the lease on `host` back.
    pub async fn release(&self, host: &str, holder: &str) -> Result<(), LedgerError> {
        match &self.rados {
            Some(store) => bounded(store.release(host, holder), store).await,
            None => Ok(()),
        }
    }

    /// Records that `request_id` joined fence `fence_id` (it gets that answer on a replay).
    pub async fn record_alias(&self, request_id: &str, fence_id: &str) {
        self.aliases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(request_id.to_string(), fence_id.to_string());
        if let Some(store) = &self.rados
            && let Err(e) = bounded(store.alias(request_id, fence_id), store).await
        {
            tracing::error!(request_id, fence_id, error = %e, "cannot record a joined request_id in the ledger");
        }
    }

    /// The most recent records, newest first.
    pub async fn recent(&self, limit: usize) -> Result<Vec<FenceRecord>, LedgerError> {
        if let Some(store) = &self.rados {
            return bounded(store.recent(limit), store).await;
        }
        Ok(self.lock().iter().rev().take(limit).cloned().collect())
    }

    pub async fn get(&self, fence_id: &str) -> Result<Option<FenceRecord>, LedgerError> {
        let mine = self
            .lock()
            .iter()
            .rev()
            .find(|r| r.reply.fence_id == fence_id)
            .cloned();
        match (mine, &self.rados) {
            (Some(r), _) => Ok(Some(r)),
            (None, Some(store)) => bounded(store.get(fence_id), store).await,
            (None, None) => Ok(None),
        }
    }

    /// The recorded answer to an earlier request with this `request_id` (its own fence, or
    /// the fence it joined).
    pub async fn by_request_id(
        &self,
        request_id: &str,
    ) -> Result<Option<FenceRecord>, LedgerError> {
        let mine = self
            .lock()
            .iter()
            .rev()
            .find(|r| r.request_id.as_deref() == Some(request_id))
            .cloned();
        if let Some(r) = mine {
            return Ok(Some(r));
        }
        let alias = self
            .aliases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(request_id)
            .cloned();
        if let Some(fence_id) = alias {
            return self.get(&fence_id).await;
        }
        let Some(store) = &self.rados else {
            return Ok(None);
        };
        match bounded(store.fence_of_request(request_id), store).await? {
            Some(fence_id) => bounded(store.get(&fence_id), store).await,
            None => Ok(None),
        }
    }
}

fn push_bounded(records: &mut VecDeque<FenceRecord>, r: FenceRecord) {
    if records.len() >= MEMORY_LIMIT {
        records.pop_front();
    }
    records.push_back(r);
}
