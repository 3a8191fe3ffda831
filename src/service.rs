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
use crate::fence::ledger::LedgerError;
use crate::fence::link::CephLink;
use crate::fence::record::{EvidenceReport, FenceRecord, FenceReply};
use crate::metrics::Metrics;

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
                    let fut = async move {
                        task.await.unwrap_or_else(|e| {
                            // Only if the service's own wrapper panicked; the fence is not known.
                            Arc::new(internal_error(&r, &format!("the fence task failed: {e}")))
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
        let engine = self.engine.clone();
        let r = req.clone();
        let record = match tokio::spawn(async move { engine.fence(&r).await }).await {
            Ok(record) => record,
            Err(e) => {
                // Still a recorded decision (rule 5); a deny whatever the ledger says.
                let record = internal_error(&req, &format!("the fence task failed: {e}"));
                self.engine.ledger.record_deny(record.clone()).await;
                record
            }
        };
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

    /// Stops taking fences and waits (bounded) for those in flight to be recorded.
    pub async fn drain(&self, within: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(within, self.tracker.wait())
            .await
            .is_ok()
    }

    /// Whether a fence of `host` (as the failed host) is running in this instance.
    pub fn fence_in_flight_for(&self, host: &str) -> bool {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(key, f)| key.1 == host && f.fut.peek().is_none())
    }

    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }
}

/// A deny for a fence that could not run to its decision (a bug, not a Ceph or SSH answer).
fn internal_error(req: &FenceRequest, message: &str) -> FenceRecord {
    let d = Decision::Deny(DenyReason::InternalError);
    FenceRecord {
        request_id: req.request_id.clone(),
        vm_uuid: req.vm.to_string(),
        failed_host: req.failed_host.clone(),
        target_host: req.target_host.clone(),
        volumes: req.volumes.iter().map(ToString::to_string).collect(),
        dry_run: req.dry_run,
        started_at: crate::fence::driver::now_rfc3339(),
        stages_ms: Default::default(),
        reply: FenceReply {
            fence_id: crate::fence::driver::new_fence_id(),
            decision: d.as_str().into(),
            outcome: d.outcome().as_str().into(),
            reason: d.reason().into(),
            message: message.into(),
            evidence: EvidenceReport::default(),
            duration_ms: 0,
        },
    }
}
