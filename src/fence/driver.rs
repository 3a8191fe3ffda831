//! The driver: runs the decision's steps through ports, bounded, and records the result.
//!
//! # Expected flow
//! [`Engine::fence`] asks [`next_step`] what to do, runs that step through a port ([`CephPort`]
//! for evidence and the blocklist, [`KillPort`] for SSH), stores what it saw in
//! [`Observed`], and asks again until the decision comes. The decision is recorded in the
//! [`Ledger`] with its evidence; only then is the reply returned.
//!
//! # Guarantees
//! Every stage runs under its own timeout and under the whole fence's deadline, so a fence
//! always ends, within `deadline` plus a small slack. A stage that times out is a failed
//! stage, which the decision turns into a deny unless another proof exists. If the ledger
//! cannot record an approval, the reply is a deny (`ledger-failed`).
//!
//! # Assumptions
//! Ports are idempotent: blocklisting an entry twice, or killing a process that is gone,
//! changes nothing.
//!
//! # Failure modes
//! Ceph errors during evidence → `ceph-unavailable` / `image-not-found`; during the
//! blocklist → the blocklist is failed (deny unless the kill is confirmed); SSH errors → the
//! kill is `Unreachable` (approve only with a confirmed blocklist).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use futures::future::join_all;

use super::decision::{
    BlocklistConfirmed, Context, Decision, DenyReason, EvidenceFailure, ExecutorRole,
    KillObservation, KillResult, Observed, Step, Verdict, VolumeEvidence, next_step,
};
use super::inventory::{Host, Inventory};
use super::ledger::Ledger;
use super::record::{
    BlocklistReport, EvidenceReport, FenceRecord, FenceReply, KillReportJson, VolumeReport,
};
use super::ssh::{KillReport, Route, SshError, SshSettings, SshTarget};
use super::vm::VmUuid;
use crate::rbd::{
    BlocklistEntry, BlocklistItem, Ceph, CephError, EntityAddr, ImageSpec, ImageStatus,
};

/// The fence's stages, as timed and labelled in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Evidence,
    Blocklist,
    Osdmap,
    Ssh,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Evidence, Stage::Blocklist, Stage::Osdmap, Stage::Ssh];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Evidence => "evidence",
            Stage::Blocklist => "blocklist",
            Stage::Osdmap => "osdmap",
            Stage::Ssh => "ssh",
        }
    }
}

/// What the fence needs from Ceph.
pub trait CephPort: Send + Sync {
    fn image_status(
        &self,
        spec: &ImageSpec,
    ) -> impl Future<Output = Result<ImageStatus, CephError>> + Send;
    fn blocklist_add(
        &self,
        entry: BlocklistEntry,
        expire: Duration,
    ) -> impl Future<Output = Result<(), CephError>> + Send;
    fn wait_for_latest_osdmap(&self) -> impl Future<Output = Result<(), CephError>> + Send;
    fn blocklist_ls(&self) -> impl Future<Output = Result<Vec<BlocklistItem>, CephError>> + Send;
    fn osdmap_epoch(&self) -> impl Future<Output = Result<u64, CephError>> + Send;
}

impl CephPort for Ceph {
    async fn image_status(&self, spec: &ImageSpec) -> Result<ImageStatus, CephError> {
        Ceph::image_status(self, spec).await
    }
    async fn blocklist_add(
        &self,
        entry: BlocklistEntry,
        expire: Duration,
    ) -> Result<(), CephError> {
        Ceph::blocklist_add(self, entry, Some(expire)).await
    }
    async fn wait_for_latest_osdmap(&self) -> Result<(), CephError> {
        Ceph::wait_for_latest_osdmap(self).await
    }
    async fn blocklist_ls(&self) -> Result<Vec<BlocklistItem>, CephError> {
        Ceph::blocklist_ls(self).await
    }
    async fn osdmap_epoch(&self) -> Result<u64, CephError> {
        Ceph::osdmap_epoch(self).await
    }
}

/// What the fence needs from SSH: run the kill on one route.
pub trait KillPort: Send + Sync {
    fn kill(
        &self,
        route: Route<'_>,
        vm: &VmUuid,
    ) -> impl Future<Output = Result<KillReport, SshError>> + Send;
}

/// The real kill step, over russh.
pub struct SshKiller {
    pub settings: SshSettings,
}

impl KillPort for SshKiller {
    async fn kill(&self, route: Route<'_>, vm: &VmUuid) -> Result<KillReport, SshError> {
        super::ssh::kill_qemu(&self.settings, route, vm).await
    }
}

/// Timeouts and the blocklist expiry.
#[derive(Debug, Clone, Copy)]
pub struct FenceSettings {
    pub blocklist_expire: Duration,
    pub deadline: Duration,
    pub evidence_timeout: Duration,
    pub blocklist_timeout: Duration,
    pub ssh_timeout: Duration,
}

impl FenceSettings {
    pub fn from_config(f: &crate::config::FenceSection) -> FenceSettings {
        FenceSettings {
            blocklist_expire: Duration::from_secs(f.blocklist_expire_secs),
            deadline: Duration::from_secs(f.deadline_secs),
            evidence_timeout: Duration::from_secs(f.evidence_timeout_secs),
            blocklist_timeout: Duration::from_secs(f.blocklist_timeout_secs),
            ssh_timeout: Duration::from_secs(f.ssh_timeout_secs),
        }
    }
}

/// One validated fence request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceRequest {
    pub request_id: Option<String>,
    pub vm: VmUuid,
    pub failed_host: String,
    pub target_host: String,
    pub volumes: Vec<ImageSpec>,
    pub dry_run: bool,
}

/// Told of every finished fence (metrics hook).
pub trait FenceObserver: Send + Sync {
    fn fence_finished(
        &self,
        record: &FenceRecord,
        decision: Decision,
        stages: &BTreeMap<Stage, Duration>,
    );
}

pub struct Engine<C, K> {
    pub ceph: C,
    pub killer: K,
    pub inventory: Inventory,
    pub settings: FenceSettings,
    pub ledger: Ledger,
    /// This service's own Ceph client addresses: never fenced.
    pub own_addrs: Vec<EntityAddr>,
    pub observer: Option<std::sync::Arc<dyn FenceObserver>>,
}

/// Runs `fut` with at most `limit`, and never past `deadline`.
async fn bounded<T>(limit: Duration, deadline: Instant, fut: impl Future<Output = T>) -> Option<T> {
    let budget = limit.min(deadline.saturating_duration_since(Instant::now()));
    tokio::time::timeout(budget, fut).await.ok()
}

fn new_fence_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "f-{:x}-{:x}-{:x}",
        now.as_millis(),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl<C: CephPort, K: KillPort> Engine<C, K> {
    /// Runs one fence to its decision, records it, and returns the record (whose `reply` is
    /// the answer to send).
    pub async fn fence(&self, req: &FenceRequest) -> FenceRecord {
        let started = Instant::now();
        let started_at = now_rfc3339();
        let deadline = started + self.settings.deadline;
        let failed = self.inventory.get(&req.failed_host);
        let ctx = Context {
            failed,
            target_known: self.inventory.get(&req.target_host).is_some()
                && req.target_host != req.failed_host,
            own_addrs: &self.own_addrs,
            dry_run: req.dry_run,
        };
        let mut obs = Observed::default();
        let mut stages: BTreeMap<Stage, Duration> = BTreeMap::new();
        let mut planned: Vec<BlocklistEntry> = Vec::new();
        // Each step fills one `None` field of `obs`, and `next_step` only asks for a step whose
        // field is `None`, so the loop ends after at most three steps.
        let verdict = loop {
            match next_step(&ctx, &obs) {
                Step::GatherEvidence => {
                    let t = Instant::now();
                    obs.evidence = Some(self.gather(&req.volumes, deadline).await);
                    stages.insert(Stage::Evidence, t.elapsed());
                }
                Step::Blocklist(entries) => {
                    planned = entries.clone();
                    obs.blocklist = Some(self.blocklist(entries, deadline, &mut stages).await);
                }
                Step::Kill => {
                    let t = Instant::now();
                    // `Kill` is only asked for once the failed host is known.
                    let kill = match failed {
                        Some(host) => self.kill(host, &req.target_host, &req.vm, deadline).await,
                        None => unreachable_kill("failed host unknown"),
                    };
                    obs.kill = Some(kill);
                    stages.insert(Stage::Ssh, t.elapsed());
                }
                Step::Decide(v) => break v,
            }
        };
        let mut record = self.record(
            req,
            started_at,
            &obs,
            &planned,
            verdict.clone(),
            &stages,
            started.elapsed(),
        );
        let mut decision = verdict.decision;
        if let Err(e) = self.ledger.record(record.clone()).await {
            tracing::error!(fence_id = %record.reply.fence_id, error = %e, "cannot record the decision; denying");
            decision = Decision::Deny(DenyReason::LedgerFailed);
            record.reply.decision = decision.as_str().into();
            record.reply.outcome = decision.outcome().as_str().into();
            record.reply.reason = decision.reason().into();
            record.reply.message = format!(
                "the decision ({}) could not be recorded: {e}",
                verdict.decision
            );
        }
        tracing::info!(
            target: "rbdfence::audit",
            fence_id = %record.reply.fence_id,
            request_id = record.request_id.as_deref().unwrap_or(""),
            vm = %record.vm_uuid,
            failed_host = %record.failed_host,
            target_host = %record.target_host,
            decision = %record.reply.decision,
            outcome = %record.reply.outcome,
            reason = %record.reply.reason,
            duration_ms = record.reply.duration_ms,
            evidence = %serde_json::to_string(&record.reply.evidence).unwrap_or_default(),
            message = %record.reply.message,
            "fence decided"
        );
        if let Some(obs) = &self.observer {
            obs.fence_finished(&record, decision, &stages);
        }
        record
    }

    /// Watchers and lock owners of every volume, in parallel.
    async fn gather(
        &self,
        volumes: &[ImageSpec],
        deadline: Instant,
    ) -> Result<Vec<VolumeEvidence>, EvidenceFailure> {
        let limit = self.settings.evidence_timeout;
        let results = join_all(volumes.iter().map(|spec| async move {
            match bounded(limit, deadline, self.ceph.image_status(spec)).await {
                Some(Ok(s)) => Ok(VolumeEvidence {
                    image: spec.clone(),
                    watchers: s.watchers,
                    lock_owners: s.lock_owners,
                }),
                Some(Err(e)) if e.is_not_found() => {
                    Err(EvidenceFailure::ImageNotFound(e.to_string()))
                }
                Some(Err(e)) => Err(EvidenceFailure::CephUnavailable(e.to_string())),
                None => Err(EvidenceFailure::CephUnavailable(format!(
                    "{spec}: no answer from Ceph within the evidence timeout"
                ))),
            }
        }))
        .await;
        // Not-found first: it is the more specific answer when both happen.
        let mut out = Vec::with_capacity(results.len());
        let mut failure = None;
        for r in results {
            match r {
                Ok(v) => out.push(v),
                Err(f @ EvidenceFailure::ImageNotFound(_)) => failure = Some(f),
                Err(f) => {
                    failure.get_or_insert(f);
                }
            }
        }
        match failure {
            Some(f) => Err(f),
            None => Ok(out),
        }
    }

    /// Adds every entry, waits for the latest osdmap, confirms the entries are listed, and
    /// reads the epoch. Any failure is the blocklist's failure.
    async fn blocklist(
        &self,
        entries: Vec<BlocklistEntry>,
        deadline: Instant,
        stages: &mut BTreeMap<Stage, Duration>,
    ) -> Result<BlocklistConfirmed, String> {
        let stage_deadline = deadline.min(Instant::now() + self.settings.blocklist_timeout);
        let limit = self.settings.blocklist_timeout;
        let t = Instant::now();
        // Concurrent adds land in the same monitor proposal more often than sequential ones.
        let adds = join_all(entries.iter().map(|e| async move {
            match bounded(
                limit,
                stage_deadline,
                self.ceph.blocklist_add(*e, self.settings.blocklist_expire),
            )
            .await
            {
                Some(r) => r.map_err(|err| err.to_string()),
                None => Err(format!(
                    "blocklist add {e}: no answer within the blocklist timeout"
                )),
            }
        }))
        .await;
        stages.insert(Stage::Blocklist, t.elapsed());
        if let Some(err) = adds.into_iter().find_map(Result::err) {
            return Err(err);
        }
        let t = Instant::now();
        let confirmed = async {
            self.ceph
                .wait_for_latest_osdmap()
                .await
                .map_err(|e| e.to_string())?;
            let listed = self.ceph.blocklist_ls().await.map_err(|e| e.to_string())?;
            let missing: Vec<String> = entries
                .iter()
                .map(ToString::to_string)
                .filter(|e| !listed.iter().any(|i| &i.entry == e))
                .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "added but not in the osdmap's blocklist: {}",
                    missing.join(", ")
                ));
            }
            let epoch = self.ceph.osdmap_epoch().await.map_err(|e| e.to_string())?;
            Ok(BlocklistConfirmed {
                entries: entries.clone(),
                osdmap_epoch: epoch,
            })
        };
        let r = match bounded(limit, stage_deadline, confirmed).await {
            Some(r) => r,
            None => Err(
                "the osdmap carrying the blocklist was not confirmed within the blocklist timeout"
                    .into(),
            ),
        };
        stages.insert(Stage::Osdmap, t.elapsed());
        r
    }

    /// Tries each sibling of the failed host as a jump host (the HA target last), then a
    /// direct session. A sibling that cannot be used itself is skipped; an answer about the
    /// failed host (including "unreachable from a working sibling") ends the search.
    async fn kill(
        &self,
        failed: &Host,
        target: &str,
        vm: &VmUuid,
        deadline: Instant,
    ) -> KillObservation {
        let failed_t = SshTarget {
            host_uuid: failed.uuid.clone(),
            addr: failed.ssh,
        };
        let attempt = async {
            let mut notes = Vec::new();
            for jump in self.inventory.kill_executors(failed, Some(target)) {
                let jump_t = SshTarget {
                    host_uuid: jump.uuid.clone(),
                    addr: jump.ssh,
                };
                let role = if jump.uuid == target {
                    ExecutorRole::Target
                } else {
                    ExecutorRole::Sibling
                };
                match self
                    .killer
                    .kill(
                        Route::Via {
                            jump: &jump_t,
                            target: &failed_t,
                        },
                        vm,
                    )
                    .await
                {
                    Ok(report) => return observe(report, Some(jump.uuid.clone()), role, notes),
                    Err(e)
                        if e.peer().is_some_and(|p| p.host_uuid == jump.uuid)
                            || e.peer().is_none() =>
                    {
                        notes.push(format!("via {}: {e}", jump.uuid));
                    }
                    Err(e) => {
                        notes.push(e.to_string());
                        return KillObservation {
                            result: KillResult::Unreachable,
                            executor: Some(jump.uuid.clone()),
                            role,
                            qemu_found: false,
                            killed: false,
                            detail: notes.join("; "),
                        };
                    }
                }
            }
            match self.killer.kill(Route::Direct(&failed_t), vm).await {
                Ok(report) => observe(report, None, ExecutorRole::Direct, notes),
                Err(e) => {
                    notes.push(format!("direct: {e}"));
                    KillObservation {
                        result: KillResult::Unreachable,
                        executor: None,
                        role: ExecutorRole::Direct,
                        qemu_found: false,
                        killed: false,
                        detail: notes.join("; "),
                    }
                }
            }
        };
        match bounded(self.settings.ssh_timeout, deadline, attempt).await {
            Some(k) => k,
            None => unreachable_kill("no verified SSH answer within the ssh timeout"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        req: &FenceRequest,
        started_at: String,
        obs: &Observed,
        planned: &[BlocklistEntry],
        verdict: Verdict,
        stages: &BTreeMap<Stage, Duration>,
        elapsed: Duration,
    ) -> FenceRecord {
        let volumes = match &obs.evidence {
            Some(Ok(v)) => v.iter().map(VolumeReport::from).collect(),
            _ => Vec::new(),
        };
        let blocklist = obs.blocklist.as_ref().map(|b| BlocklistReport {
            entries: planned.iter().map(ToString::to_string).collect(),
            osdmap_epoch: b.as_ref().ok().map(|c| c.osdmap_epoch),
            error: b.as_ref().err().cloned(),
        });
        let kill = obs.kill.as_ref().map(|k| KillReportJson {
            executor: k.executor.clone(),
            role: k.role,
            ssh_reachable: k.result != KillResult::Unreachable,
            qemu_found: k.qemu_found,
            killed: k.killed,
            error: (!k.detail.is_empty()).then(|| k.detail.clone()),
        });
        let d = verdict.decision;
        FenceRecord {
            request_id: req.request_id.clone(),
            vm_uuid: req.vm.to_string(),
            failed_host: req.failed_host.clone(),
            target_host: req.target_host.clone(),
            volumes: req.volumes.iter().map(ToString::to_string).collect(),
            dry_run: req.dry_run,
            started_at,
            stages_ms: stages
                .iter()
                .map(|(s, d)| (s.as_str().to_string(), d.as_millis() as u64))
                .collect(),
            reply: FenceReply {
                fence_id: new_fence_id(),
                decision: d.as_str().into(),
                outcome: d.outcome().as_str().into(),
                reason: d.reason().into(),
                message: verdict.message,
                evidence: EvidenceReport {
                    volumes,
                    blocklist,
                    kill,
                },
                duration_ms: elapsed.as_millis() as u64,
            },
        }
    }
}

fn unreachable_kill(detail: &str) -> KillObservation {
    KillObservation {
        result: KillResult::Unreachable,
        executor: None,
        role: ExecutorRole::None,
        qemu_found: false,
        killed: false,
        detail: detail.into(),
    }
}

/// A report from a verified session: only `gone` proves anything.
fn observe(
    report: KillReport,
    executor: Option<String>,
    role: ExecutorRole,
    notes: Vec<String>,
) -> KillObservation {
    let result = match (report.gone, report.killed) {
        (true, true) => KillResult::Killed,
        (true, false) => KillResult::NotRunning,
        (false, _) => KillResult::Unconfirmed,
    };
    let mut detail = notes;
    if !report.gone {
        detail.push(format!(
            "still alive after SIGKILL: {:?}; unreadable: {:?}",
            report.alive, report.unknown
        ));
    }
    KillObservation {
        result,
        executor,
        role,
        qemu_found: report.qemu_found,
        killed: report.killed,
        detail: detail.join("; "),
    }
}

/// The Ceph connection as the fence sees it: up, or down with the error that took it down
/// (every call then fails with that error, so the fence denies with `ceph-unavailable`).
pub enum CephLink {
    Up(Ceph),
    Down(CephError),
}

impl CephLink {
    pub async fn connect(opts: crate::rbd::ConnectOptions) -> CephLink {
        match Ceph::connect(opts).await {
            Ok(c) => CephLink::Up(c),
            Err(e) => CephLink::Down(e),
        }
    }

    /// Our own client addresses (empty when down: nothing will be fenced then anyway).
    pub async fn own_addrs(&self) -> Result<Vec<EntityAddr>, CephError> {
        match self {
            CephLink::Up(c) => c.client_addrs().await,
            CephLink::Down(_) => Ok(Vec::new()),
        }
    }
}

impl CephPort for CephLink {
    async fn image_status(&self, spec: &ImageSpec) -> Result<ImageStatus, CephError> {
        match self {
            CephLink::Up(c) => c.image_status(spec).await,
            CephLink::Down(e) => Err(e.clone()),
        }
    }
    async fn blocklist_add(
        &self,
        entry: BlocklistEntry,
        expire: Duration,
    ) -> Result<(), CephError> {
        match self {
            CephLink::Up(c) => c.blocklist_add(entry, Some(expire)).await,
            CephLink::Down(e) => Err(e.clone()),
        }
    }
    async fn wait_for_latest_osdmap(&self) -> Result<(), CephError> {
        match self {
            CephLink::Up(c) => c.wait_for_latest_osdmap().await,
            CephLink::Down(e) => Err(e.clone()),
        }
    }
    async fn blocklist_ls(&self) -> Result<Vec<BlocklistItem>, CephError> {
        match self {
            CephLink::Up(c) => c.blocklist_ls().await,
            CephLink::Down(e) => Err(e.clone()),
        }
    }
    async fn osdmap_epoch(&self) -> Result<u64, CephError> {
        match self {
            CephLink::Up(c) => c.osdmap_epoch().await,
            CephLink::Down(e) => Err(e.clone()),
        }
    }
}
