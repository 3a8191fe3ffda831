//! The service around the engine: identical requests share one fence while it runs,
//! `request_id` replays, fences that finish even when the caller goes away, and a graceful
//! shutdown that waits for them.
//!
//! A request joins another's fence only while that fence runs: the shared entry is removed by
//! the fence's own task when it ends, never by a caller (a caller may disconnect, or get the
//! 504), so a finished fence is never handed to a later request. Only a repeated `request_id`
//! gets a recorded answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio_util::task::TaskTracker;

use crate::app::RealEngine;
use crate::config::Config;
use crate::fence::decision::{Decision, DenyReason};
use crate::fence::driver::FenceRequest;
use crate::fence::inventory::Host;
use crate::fence::ledger::LedgerError;
use crate::fence::link::CephLink;
use crate::fence::record::{EntryExpiry, EvidenceReport, FenceRecord, FenceReply};
use crate::fence::unfence::{Trigger, unfence_host};
use crate::fence::vm::VmUuid;
use crate::metrics::Metrics;
use crate::rbd::{BlocklistEntry, EntityAddr};

type FenceFuture = Shared<BoxFuture<'static, Arc<FenceRecord>>>;

/// A fence in flight that identical requests may join.
struct InFlight {
    /// Tells this fence's entry from a later one under the same key.
    generation: u64,
    fut: FenceFuture,
    /// The `request_id`s of requests that joined it, aliased to its fence id when it ends.
    joined: Arc<Mutex<Vec<String>>>,
}

/// What makes two requests the same fence: the VM, its hosts, its volumes, and dry-run.
type FenceKey = (String, String, String, Vec<String>, bool);

fn fence_key(
    vm: String,
    failed: &str,
    target: &str,
    volumes: Vec<String>,
    dry_run: bool,
) -> FenceKey {
    let mut volumes = volumes;
    volumes.sort();
    volumes.dedup();
    (vm, failed.to_string(), target.to_string(), volumes, dry_run)
}

fn key_of(req: &FenceRequest) -> FenceKey {
    let volumes = req.volumes.iter().map(ToString::to_string).collect();
    fence_key(
        req.vm.to_string(),
        &req.failed_host,
        &req.target_host,
        volumes,
        req.dry_run,
    )
}

fn key_of_record(r: &FenceRecord) -> FenceKey {
    fence_key(
        r.vm_uuid.clone(),
        &r.failed_host,
        &r.target_host,
        r.volumes.clone(),
        r.dry_run,
    )
}

/// A `request_id` already answered for a different request.
#[derive(Debug, thiserror::Error)]
#[error("request_id {request_id:?} was already used for another request (fence {fence_id})")]
pub struct RequestIdReused {
    pub request_id: String,
    pub fence_id: String,
}

/// Why a request got no decision (nothing was done).
#[derive(Debug, thiserror::Error)]
pub enum PreInstantiateError {
    #[error(transparent)]
    Reused(#[from] RequestIdReused),
    /// The ledger could not be read to check for an earlier answer to this `request_id`.
    #[error("cannot check the ledger for an earlier answer: {0}")]
    Ledger(#[from] LedgerError),
}

pub struct Service {
    pub engine: Arc<RealEngine>,
    pub link: Arc<CephLink>,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    /// The bearer token every /v1 and /ha call needs, when configured.
    pub token: Option<String>,
    in_flight: Mutex<HashMap<FenceKey, InFlight>>,
    generation: AtomicU64,
    tracker: TaskTracker,
    /// Who this instance is, in the host leases it takes.
    instance: String,
    /// The host leases this instance holds (or is waiting for), by host.
    leases: Mutex<HashMap<String, HostLease>>,
    /// Within this instance, per host: fences read, an unfence or the lifecycle writes. The
    /// lease is shared by an instance's fences of a host, so without this an unfence could
    /// lift an entry that a fence of the same host has just confirmed and is about to approve on.
    host_locks: Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    /// Denied fences whose entries this instance is taking back now, by fence id.
    taking_back: Mutex<std::collections::HashSet<String>>,
}

/// The lease object of the lifecycle (`:` is in no host id, so it names no host).
const LIFECYCLE_LEASE: &str = ":lifecycle";

/// How long a host's lease lasts without renewal: a dead instance's lease runs out this soon.
pub const HOST_LEASE: Duration = Duration::from_secs(10);
const LEASE_RENEW: Duration = Duration::from_secs(3);
const LEASE_RETRY: Duration = Duration::from_millis(100);
/// First wait between rounds of taking a denied fence's entries back; doubles up to
/// [`TAKE_BACK_MAX_WAIT`].
const TAKE_BACK_RETRY: Duration = Duration::from_secs(1);
const TAKE_BACK_MAX_WAIT: Duration = Duration::from_secs(60);

struct HostLease {
    /// Fences of this instance that use (or wait for) the lease.
    holders: usize,
    ready: Shared<BoxFuture<'static, Result<(), String>>>,
    stop: tokio::sync::watch::Sender<bool>,
}

/// One fence's use of its host's lease; the last one gives the lease back.
struct LeaseGuard {
    svc: Arc<Service>,
    host: String,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let mut map = self.svc.leases.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get_mut(&self.host) {
            e.holders = e.holders.saturating_sub(1);
            if e.holders == 0
                && let Some(e) = map.remove(&self.host)
            {
                let _ = e.stop.send(true);
            }
        }
    }
}

/// Takes `host`'s lease in the ledger (retrying while another instance holds it, until
/// `within`), tells `ready`, renews it until `stop`, then gives it back.
async fn hold_lease(
    ledger: crate::fence::ledger::Ledger,
    host: String,
    holder: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
    within: Duration,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match ledger.lease(&host, &holder, HOST_LEASE).await {
            Ok(true) => break,
            Ok(false) if tokio::time::Instant::now() < deadline => {}
            Ok(false) => {
                let _ = ready.send(Err(format!(
                    "another instance holds the fence lease of host {host}"
                )));
                return;
            }
            Err(e) => {
                let _ = ready.send(Err(format!(
                    "cannot take the fence lease of host {host}: {e}"
                )));
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(LEASE_RETRY) => {}
            _ = stop.changed() => return,
        }
    }
    let _ = ready.send(Ok(()));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LEASE_RENEW) => {
                match ledger.lease(&host, &holder, HOST_LEASE).await {
                    Ok(true) => {}
                    other => tracing::error!(host, result = ?other.map_err(|e| e.to_string()), "the fence lease was not renewed"),
                }
            }
            _ = stop.changed() => break,
        }
    }
    if let Err(e) = ledger.release(&host, &holder).await {
        tracing::warn!(host, error = %e, "cannot give the fence lease back; it runs out by itself");
    }
}

/// A stable digest of a request's shape, naming it in the shared ledger.
fn key_digest(key: &FenceKey) -> String {
    let (vm, failed, target, volumes, dry_run) = key;
    let text = format!("{vm}\n{failed}\n{target}\n{}\n{dry_run}", volumes.join(","));
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Service {
    pub fn new(
        engine: RealEngine,
        link: Arc<CephLink>,
        metrics: Arc<Metrics>,
        config: Config,
        token: Option<String>,
    ) -> Arc<Service> {
        Arc::new(Service {
            engine: Arc::new(engine),
            link,
            metrics,
            config,
            token,
            in_flight: Mutex::default(),
            generation: AtomicU64::new(0),
            tracker: TaskTracker::new(),
            instance: crate::fence::driver::new_fence_id().replacen("f-", "i-", 1),
            leases: Mutex::default(),
            host_locks: Mutex::default(),
            taking_back: Mutex::default(),
        })
    }

    /// The recorded answer to an earlier request with this id.
    pub async fn replay(&self, request_id: &str) -> Result<Option<FenceRecord>, LedgerError> {
        self.engine.ledger.by_request_id(request_id).await
    }

    /// Answers one pre-instantiate request. A repeated `request_id` gets the recorded answer
    /// without acting again (an error if it named a different request); concurrent identical
    /// requests share one fence. The fence runs as its own task: it finishes and is recorded
    /// even if the caller disconnects.
    pub async fn pre_instantiate(
        self: &Arc<Self>,
        req: FenceRequest,
    ) -> Result<FenceRecord, PreInstantiateError> {
        let key = key_of(&req);
        // A replay that cannot be checked is not answered: acting again could answer
        // differently (nothing is done; the caller retries).
        if let Some(id) = &req.request_id
            && let Some(r) = self.replay(id).await?
        {
            if key_of_record(&r) != key {
                return Err(PreInstantiateError::Reused(RequestIdReused {
                    request_id: id.clone(),
                    fence_id: r.reply.fence_id,
                }));
            }
            return Ok(r);
        }
        let fut = {
            let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(&key) {
                // Join only a fence still running: a finished one answered an earlier request.
                Some(f) if f.fut.peek().is_none() => {
                    if let Some(id) = &req.request_id {
                        f.joined
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(id.clone());
                    }
                    f.fut.clone()
                }
                _ => {
                    let generation = self.generation.fetch_add(1, Ordering::Relaxed);
                    let joined = Arc::new(Mutex::new(Vec::new()));
                    let task = self.tracker.spawn(Arc::clone(self).run_fence(
                        req.clone(),
                        key.clone(),
                        generation,
                        joined.clone(),
                    ));
                    let r = req.clone();
                    let since = Since::now();
                    let fut = async move {
                        task.await.unwrap_or_else(|e| {
                            // Only if the service's own wrapper panicked; the fence is not known.
                            Arc::new(internal_error(
                                &r,
                                &format!("the fence task failed: {e}"),
                                &since,
                            ))
                        })
                    }
                    .boxed()
                    .shared();
                    map.insert(
                        key,
                        InFlight {
                            generation,
                            fut: fut.clone(),
                            joined,
                        },
                    );
                    fut
                }
            }
        };
        Ok((*fut.await).clone())
    }

    /// One fence as its own task: runs it (a panic becomes a recorded internal-error deny),
    /// then ends the shared entry and records the aliases of the requests that joined it,
    /// whether or not anyone still waits for the answer.
    async fn run_fence(
        self: Arc<Self>,
        req: FenceRequest,
        key: FenceKey,
        generation: u64,
        joined: Arc<Mutex<Vec<String>>>,
    ) -> Arc<FenceRecord> {
        let ledger = self.engine.ledger.clone();
        let since = Since::now();
        let _fencing = self.host_lock(&req.failed_host).read_owned().await;
        let digest = key_digest(&key);
        // Several instances share the ledger: one fences a host at a time, under its lease.
        // The request shape's latest fence before waiting for the lease: a different one after
        // it was recorded while this request waited (it ran then), so it is this request's
        // answer. No clocks are compared; a read that fails never lets the request join.
        let (lease, before) = if ledger.shared() && !req.dry_run {
            let before = ledger.key_fence(&digest).await.ok();
            (Some(self.lease(&req.failed_host).await), before)
        } else {
            (None, None)
        };
        let record = match lease {
            Some(Err(why)) => {
                let mut record = deny_record(&req, DenyReason::LedgerFailed, &why, &since);
                record.stages_ms.insert("lease".into(), since.elapsed_ms());
                ledger.record_deny(record.clone()).await;
                record
            }
            Some(Ok(guard)) => {
                let theirs = match (before, ledger.key_fence(&digest).await) {
                    (Some(before), Ok(Some(after)))
                        if before.as_deref() != Some(after.as_str()) =>
                    {
                        ledger.get(&after).await.ok().flatten()
                    }
                    _ => None,
                };
                let record = match theirs {
                    Some(r) => {
                        if let Some(id) = &req.request_id {
                            ledger.record_alias(id, &r.reply.fence_id).await;
                        }
                        r
                    }
                    None => {
                        let record = self.fence_catching_panics(&req).await;
                        if let Err(e) = ledger.record_key(&digest, &record.reply.fence_id).await {
                            tracing::error!(error = %e, "cannot record the fence under its request shape");
                        }
                        record
                    }
                };
                drop(guard);
                record
            }
            None => self.fence_catching_panics(&req).await,
        };
        if !record.take_back.is_empty() {
            tokio::spawn(Arc::clone(&self).take_back(record.clone()));
        }
        {
            let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(&key).is_some_and(|f| f.generation == generation) {
                map.remove(&key);
            }
        }
        let ids = std::mem::take(&mut *joined.lock().unwrap_or_else(|p| p.into_inner()));
        for id in ids {
            self.engine
                .ledger
                .record_alias(&id, &record.reply.fence_id)
                .await;
        }
        Arc::new(record)
    }

    async fn fence_catching_panics(&self, req: &FenceRequest) -> FenceRecord {
        let since = Since::now();
        let engine = self.engine.clone();
        let r = req.clone();
        match tokio::spawn(async move { engine.fence(&r).await }).await {
            Ok(record) => record,
            Err(e) => {
                // Still a recorded decision (rule 5); a deny whatever the ledger says.
                let record = internal_error(req, &format!("the fence task failed: {e}"), &since);
                self.engine.ledger.record_deny(record.clone()).await;
                record
            }
        }
    }

    /// The host's lease for work other than a fence (an unfence): the same lease fences take.
    pub async fn host_lease(self: &Arc<Self>, host: &str) -> Result<impl Drop + use<>, String> {
        self.lease(host).await
    }

    /// This instance's lease on fencing `host`, shared by all its fences of that host; waits
    /// (bounded by the fence deadline) while another instance holds it.
    async fn lease(self: &Arc<Self>, host: &str) -> Result<LeaseGuard, String> {
        let within = self.engine.settings.deadline;
        let ready = {
            let mut map = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            let entry = map.entry(host.to_string()).or_insert_with(|| {
                let (stop, stopped) = tokio::sync::watch::channel(false);
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(hold_lease(
                    self.engine.ledger.clone(),
                    host.to_string(),
                    self.instance.clone(),
                    stopped,
                    tx,
                    within,
                ));
                let ready = async move {
                    rx.await
                        .unwrap_or_else(|_| Err("the lease task ended".to_string()))
                }
                .boxed()
                .shared();
                HostLease {
                    holders: 0,
                    ready,
                    stop,
                }
            });
            entry.holders += 1;
            entry.ready.clone()
        };
        let guard = LeaseGuard {
            svc: Arc::clone(self),
            host: host.to_string(),
        };
        match tokio::time::timeout(within + Duration::from_secs(1), ready).await {
            Ok(Ok(())) => Ok(guard),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!(
                "the fence lease of host {host} was not had within {within:?}"
            )),
        }
    }

    /// Whether this instance holds (or just took) the lifecycle lease; always with a ledger
    /// that is not shared.
    pub async fn lifecycle_leader(&self, lease: Duration) -> bool {
        matches!(
            self.engine
                .ledger
                .lease(LIFECYCLE_LEASE, &self.instance, lease)
                .await,
            Ok(true)
        )
    }

    /// One round of the fence lifecycle (CONTRACT rule 6), on the leader. For every host with
    /// fences in force, under the host's lease:
    /// - scan it over a verified SSH session for the qemus of its fenced VMs (killing any
    ///   left and re-checking); when all are gone, lift exactly the entries those fences made
    ///   and record the unfence (`auto`);
    /// - otherwise keep its unproven fences in force: before one has less than half its expiry
    ///   left, make the host's whole-IP entries last again (a distinct covering entry, never a
    ///   moment uncovered) and record them with the fence. A VM fence is widened to the host
    ///   only then, after the host stayed unreachable for half the expiry.
    pub async fn lifecycle_tick(self: &Arc<Self>) -> Result<(), LedgerError> {
        let (in_force, owed) = self.read_fences().await?;
        // Denied fences whose entries no one has taken back yet (their instance ended first).
        for r in owed {
            tokio::spawn(Arc::clone(self).take_back(r));
        }
        let mut by_host: HashMap<String, Vec<FenceRecord>> = HashMap::new();
        for r in in_force {
            by_host.entry(r.failed_host.clone()).or_default().push(r);
        }
        for (host, records) in by_host {
            let Some(h) = self.engine.inventory.get(&host).cloned() else {
                continue;
            };
            let Some(_lifting) = self.lift_lock(&host) else {
                continue;
            };
            let Ok(guard) = self.lease(&host).await else {
                continue;
            };
            self.lifecycle_host(&h, records).await;
            drop(guard);
        }
        Ok(())
    }

    /// Reads the fences in force from the shared ledger and sets the gauges that describe
    /// them (`rbdfence_fences_in_force`, `_fences_unproven`, `_blocklist_entries`): true on
    /// every instance, and after a restart.
    pub async fn refresh_gauges(&self) -> Result<Vec<FenceRecord>, LedgerError> {
        Ok(self.read_fences().await?.0)
    }

    /// One read of the ledger: the fences in force (the gauges are set from them), and the
    /// denied fences whose entries are still owed a take-back (sent within the expiry, none
    /// recorded as taken back).
    async fn read_fences(&self) -> Result<(Vec<FenceRecord>, Vec<FenceRecord>), LedgerError> {
        let ledger = &self.engine.ledger;
        let unfences = ledger.unfences(None).await?;
        let oldest = time::OffsetDateTime::now_utc() - self.engine.settings.blocklist_expire;
        let (in_force, owed): (Vec<FenceRecord>, Vec<FenceRecord>) = ledger
            .recent(usize::MAX)
            .await?
            .into_iter()
            .filter(|r| {
                r.state(&unfences).in_force
                    || (!r.take_back.is_empty()
                        && !unfences.iter().any(|u| {
                            u.trigger == "take-back" && u.fences.contains(&r.reply.fence_id)
                        })
                        && time::OffsetDateTime::parse(
                            &r.started_at,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .is_ok_and(|t| t > oldest))
            })
            .partition(|r| r.state(&unfences).in_force);
        let now = time::OffsetDateTime::now_utc();
        let first_lapse = in_force
            .iter()
            .filter(|r| r.unproven())
            .filter_map(FenceRecord::lasts_until)
            .min()
            .map(|u| (u - now).whole_seconds());
        self.metrics.set_fences(
            in_force.len(),
            in_force.iter().filter(|r| r.unproven()).count(),
            first_lapse,
        );
        let mut entries = HashMap::new();
        for r in &in_force {
            let expiries = r
                .reply
                .evidence
                .blocklist
                .iter()
                .flat_map(|b| b.expires.iter())
                .chain(r.renewed.iter());
            for e in expiries {
                let Ok(until) = time::OffsetDateTime::parse(
                    &e.until,
                    &time::format_description::well_known::Rfc3339,
                ) else {
                    continue;
                };
                if let Ok(left) = Duration::try_from(until - now) {
                    entries.insert(e.entry.clone(), std::time::Instant::now() + left);
                }
            }
        }
        self.metrics.set_managed(entries);
        Ok((in_force, owed))
    }

    async fn lifecycle_host(&self, host: &Host, records: Vec<FenceRecord>) {
        let ledger = &self.engine.ledger;
        // Only the VMs never seen gone need the proof; the others were proven gone when they
        // were fenced (and a scan would kill a qemu of theirs started since, not ours to kill).
        let mut vms: Vec<VmUuid> = records
            .iter()
            .filter(|r| r.gone_since().is_none())
            .filter_map(|r| r.vm_uuid.parse().ok())
            .collect();
        vms.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        vms.dedup();
        let proven = if vms.is_empty() {
            true
        } else {
            matches!(self.engine.scan(host, &vms).await,
                Ok(reports) if reports.len() == vms.len() && reports.iter().all(|r| r.gone))
        };
        if proven {
            // The proof of the VMs never seen gone is this scan's: recorded, so that the
            // quiet period before lifting counts from it.
            let now = crate::fence::driver::now_rfc3339();
            for mut r in records.into_iter().filter(|r| r.gone_since().is_none()) {
                r.gone_at = Some(now.clone());
                if let Err(e) = ledger.rewrite(r).await {
                    tracing::error!(host = %host.uuid, error = %e, "lifecycle: cannot record that a fenced VM is gone");
                    return;
                }
            }
            let ceph = match self.link.ceph() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(host = %host.uuid, error = %e, "lifecycle: no Ceph connection to lift the host's entries");
                    return;
                }
            };
            let quiet = self.config.fence.lift_quiet();
            match unfence_host(ledger, &ceph, &host.uuid, Trigger::Auto, quiet).await {
                Ok(record) => {
                    self.metrics.entries_lifted(&record.lifted);
                    self.metrics.unfenced("auto");
                }
                Err(e @ crate::fence::unfence::UnfenceError::Quiet { .. }) => {
                    tracing::info!(host = %host.uuid, why = %e, "lifecycle: the host's fenced VMs are gone; lifting after the quiet period")
                }
                Err(e) => {
                    tracing::error!(host = %host.uuid, error = %e, "lifecycle: cannot unfence the host")
                }
            }
            return;
        }
        let expire = self.engine.settings.blocklist_expire;
        let soon = time::OffsetDateTime::now_utc() + expire / 2;
        let whole: Vec<BlocklistEntry> = host
            .storage_addrs
            .iter()
            .map(|ip| BlocklistEntry::Addr(EntityAddr::whole_ip(*ip)))
            .collect();
        for mut r in records.into_iter().filter(FenceRecord::unproven) {
            if r.lasts_until().is_some_and(|u| u > soon) {
                continue;
            }
            match self.engine.renew(&host.uuid, whole.clone()).await {
                Ok(c) => {
                    for l in c.entries {
                        r.renewed.push(EntryExpiry {
                            entry: l.entry.to_string(),
                            until: l
                                .until
                                .format(&time::format_description::well_known::Rfc3339)
                                .unwrap_or_default(),
                        });
                    }
                    tracing::info!(target: "rbdfence::audit", host = %host.uuid, fence_id = %r.reply.fence_id, renewed = ?r.renewed, "fence kept in force");
                    if let Err(e) = ledger.rewrite(r).await {
                        tracing::error!(host = %host.uuid, error = %e, "lifecycle: cannot record a renewal");
                    }
                }
                Err(e) => {
                    tracing::error!(host = %host.uuid, fence_id = %r.reply.fence_id, error = %e, "lifecycle: cannot keep an unproven fence in force")
                }
            }
        }
    }

    /// Stops taking fences and waits (bounded) for those in flight to be recorded.
    pub async fn drain(&self, within: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(within, self.tracker.wait())
            .await
            .is_ok()
    }

    fn host_lock(&self, host: &str) -> Arc<tokio::sync::RwLock<()>> {
        self.host_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(host.to_string())
            .or_default()
            .clone()
    }

    /// Takes back what denied fence `record` may have left in the osdmap: a blocklist add
    /// whose confirmation timed out can still commit after the deny (a slow or stalled mon),
    /// and would then cut the VM — which was not restarted elsewhere — or the whole host off
    /// its storage with nothing resting on it. In rounds, each with this instance's exclusive
    /// use of the host (no fence of it in flight) and the host's lease: every entry of the
    /// deny that no fence of the host in force relies on is removed (`rm` after the `add` on
    /// the same connection: the monitors apply them in that order), then checked absent one
    /// round later. Bounded by the entries' expiry, when they would lapse anyway; a user that
    /// may not remove entries ends it at once. Recorded as an unfence (`take-back`) listing
    /// the entries removed (an `rm` of an entry that never landed succeeds too).
    async fn take_back(self: Arc<Self>, record: FenceRecord) {
        let host = record.failed_host.clone();
        let fence_id = record.reply.fence_id.clone();
        struct Running<'a>(&'a Mutex<std::collections::HashSet<String>>, String);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&self.1);
            }
        }
        if !self
            .taking_back
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fence_id.clone())
        {
            return; // already under way in this instance
        }
        let _running = Running(&self.taking_back, fence_id.clone());
        let mut pending: Vec<BlocklistEntry> = record
            .take_back
            .iter()
            .filter_map(|e| e.parse().ok())
            .collect();
        let expire = self.engine.settings.blocklist_expire;
        let give_up = std::time::Instant::now() + expire;
        let Ok(started) = time::OffsetDateTime::parse(
            &record.started_at,
            &time::format_description::well_known::Rfc3339,
        ) else {
            tracing::error!(fence_id = %fence_id, started_at = %record.started_at, "a denied fence without a start time: not taking its entries back");
            return;
        };
        let mut wait = TAKE_BACK_RETRY;
        let mut lifted: Vec<String> = Vec::new();
        let mut checked = false;
        let mut refused = false;
        while std::time::Instant::now() < give_up {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(TAKE_BACK_MAX_WAIT);
            // The lease first: waiting for another instance's must not hold this instance's
            // fences of the host back (they wait on the host lock taken below).
            let _lease = if self.engine.ledger.shared() {
                match self.lease(&host).await {
                    Ok(g) => Some(g),
                    Err(_) => continue,
                }
            } else {
                None
            };
            let Some(_lifting) = self.lift_lock(&host) else {
                continue;
            };
            let Ok(fences) = crate::fence::unfence::in_force(&self.engine.ledger, &host).await
            else {
                continue;
            };
            let relied: std::collections::BTreeSet<String> =
                fences.iter().flat_map(FenceRecord::entries).collect();
            let Ok(ceph) = self.link.ceph() else { continue };
            let Ok(listed) = ceph.blocklist_ls().await else {
                continue;
            };
            if pending.is_empty() {
                // The check one round later: nothing of ours came back.
                pending = listed
                    .iter()
                    .filter(|i| lifted.contains(&i.entry))
                    .filter_map(|i| i.entry.parse().ok())
                    .collect();
                if pending.is_empty() {
                    checked = true;
                    break;
                }
            }
            let mut left = Vec::new();
            for e in pending {
                if relied.contains(&e.to_string()) {
                    continue;
                }
                // Listed with an expiry no add of this fence gives: it was there before the
                // fence (Ceph does not extend an entry added again), and is not ours to lift.
                let now = time::OffsetDateTime::now_utc();
                let before = listed
                    .iter()
                    .find(|i| i.entry == e.to_string())
                    .is_some_and(|i| {
                        time::OffsetDateTime::parse(
                            &i.until,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .is_ok_and(|until| !made_by_fence(until, started, now, expire))
                    });
                if before {
                    tracing::info!(host = %host, fence_id = %fence_id, entry = %e, "not taking back an entry that was there before the denied fence");
                    continue;
                }
                match ceph.blocklist_rm(e).await {
                    Ok(()) => {
                        if !lifted.contains(&e.to_string()) {
                            lifted.push(e.to_string());
                        }
                    }
                    Err(err) if err.errno == libc::EACCES => {
                        tracing::error!(host = %host, fence_id = %fence_id, entry = %e, error = %err, "the Ceph user may not lift blocklist entries: a denied fence's entry is not taken back");
                        refused = true;
                    }
                    Err(err) => {
                        tracing::warn!(host = %host, fence_id = %fence_id, entry = %e, error = %err, "cannot take back a denied fence's entry yet");
                        left.push(e);
                    }
                }
            }
            pending = left;
            if refused {
                // Asking again changes nothing; recorded as done (nothing lifted by it).
                checked = true;
                break;
            }
        }
        if !checked {
            tracing::error!(host = %host, fence_id = %fence_id, left = ?pending, "a denied fence's entries could not all be taken back; they lapse at their expiry");
        }
        if !checked && lifted.is_empty() {
            return;
        }
        // Recorded also when nothing had landed: the lifecycle then knows it is done.
        self.metrics.entries_lifted(&lifted);
        self.metrics.unfenced("take-back");
        let unfence = crate::fence::record::UnfenceRecord {
            unfence_id: crate::fence::driver::new_fence_id().replacen("f-", "u-", 1),
            host: host.clone(),
            at: crate::fence::driver::now_rfc3339(),
            trigger: "take-back".into(),
            fences: vec![fence_id.clone()],
            lifted: lifted.clone(),
        };
        if let Err(e) = self.engine.ledger.record_unfence(unfence).await {
            tracing::error!(host = %host, fence_id = %fence_id, error = %e, "cannot record taking back a denied fence's entries");
        }
        tracing::info!(target: "rbdfence::audit", host = %host, fence_id = %fence_id, lifted = ?lifted, "a denied fence's entries taken back");
    }

    /// Exclusive use of `host` within this instance (no fence of it runs meanwhile), or `None`
    /// when a fence of it is running.
    pub fn lift_lock(&self, host: &str) -> Option<tokio::sync::OwnedRwLockWriteGuard<()>> {
        self.host_lock(host).try_write_owned().ok()
    }

    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }
}

/// Whether a listed entry's expiry (`until`, the monitors' clock) is one an add sent by a
/// fence that started at `started` (this service's clock) gives: `expire` after a moment
/// between the fence's start and `now`, give or take a tenth of the expiry (at least a
/// minute) for the two clocks. An entry that was there before lapses at its own time — Ceph
/// does not extend an entry that is added again.
fn made_by_fence(
    until: time::OffsetDateTime,
    started: time::OffsetDateTime,
    now: time::OffsetDateTime,
    expire: Duration,
) -> bool {
    let slack = (expire / 10).max(Duration::from_secs(60));
    until >= started + expire - slack && until <= now + expire + slack
}

/// A deny for a fence that could not run to its decision (a bug, not a Ceph or SSH answer).
fn internal_error(req: &FenceRequest, message: &str, since: &Since) -> FenceRecord {
    deny_record(req, DenyReason::InternalError, message, since)
}

/// When the service began on a request: the start a deny of its own reports, so that its
/// `started_at` and `duration_ms` tell the time really spent (a lease that could not be taken
/// can take seconds).
struct Since {
    at: String,
    instant: std::time::Instant,
}

impl Since {
    fn now() -> Since {
        Since {
            at: crate::fence::driver::now_rfc3339(),
            instant: std::time::Instant::now(),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.instant.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A deny recorded without running the fence.
fn deny_record(
    req: &FenceRequest,
    reason: DenyReason,
    message: &str,
    since: &Since,
) -> FenceRecord {
    let d = Decision::Deny(reason);
    FenceRecord {
        renewed: Vec::new(),
        take_back: Vec::new(),
        gone_at: None,
        request_id: req.request_id.clone(),
        vm_uuid: req.vm.to_string(),
        failed_host: req.failed_host.clone(),
        target_host: req.target_host.clone(),
        volumes: req.volumes.iter().map(ToString::to_string).collect(),
        dry_run: req.dry_run,
        started_at: since.at.clone(),
        stages_ms: Default::default(),
        reply: FenceReply {
            fence_id: crate::fence::driver::new_fence_id(),
            decision: d.as_str().into(),
            outcome: d.outcome().as_str().into(),
            reason: d.reason().into(),
            message: message.into(),
            evidence: EvidenceReport::default(),
            duration_ms: since.elapsed_ms(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_the_fences_own_only_when_its_expiry_says_so() {
        let expire = Duration::from_secs(600);
        let t =
            |s: i64| time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_800_000_000 + s);
        let (started, now) = (t(0), t(30));
        // Added by the fence (also committed late, also with the clocks a little apart).
        assert!(made_by_fence(t(600), started, now, expire));
        assert!(made_by_fence(t(612), started, now, expire));
        assert!(made_by_fence(t(550), started, now, expire));
        // There before: an operator's entry lapsing sooner, or one lasting far longer.
        assert!(!made_by_fence(t(300), started, now, expire));
        assert!(!made_by_fence(t(86_400), started, now, expire));
        // A long expiry keeps a tenth of it as the margin.
        let day = Duration::from_secs(86_400);
        assert!(made_by_fence(t(86_400 - 3_000), started, now, day));
        assert!(!made_by_fence(t(3_600), started, now, day));
    }
}
