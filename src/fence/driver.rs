//! The driver: runs the decision's steps through ports, bounded, and records the result.
//!
//! # Expected flow
//! [`Engine::fence`] asks [`next_step`] what to do, runs that step through a port ([`CephPort`]
//! for evidence and the blocklist, [`KillPort`] for SSH), stores what it saw in
//! [`Observed`], and asks again until the decision comes. The decision is recorded in the
//! [`Ledger`] with its evidence; only then is the reply returned.
//!
//! The SSH session to the failed host is opened at the start, in parallel with the evidence
//! (connecting changes nothing on the hosts). The kill command runs when the decision asks for
//! the kill step. When the evidence names every client, the decision asks for the VM fence and,
//! whatever its result, for the kill next: both then run at once, which changes no decision,
//! only the time (the fence no longer waits for a mon commit before the kill starts).
//! Requests for VMs of one failed host share the storage fence, the session and one kill
//! command. A dry run opens no session.
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared, join_all};

use super::decision::{
    BlocklistConfirmed, BlocklistFailure, Context, Decision, DenyReason, EvidenceFailure,
    ExecutorRole, FenceResult, KillObservation, KillResult, LastingEntry, Observed, Scope, Step,
    Verdict, VolumeEvidence, next_step,
};
use super::inventory::{Host, Inventory};
use super::ledger::Ledger;
use super::record::{
    BlocklistReport, EntryExpiry, EvidenceReport, FenceRecord, FenceReply, KillReportJson,
    VolumeReport,
};
use super::ssh::{Jumps, KillReport, Route, SshError, SshSettings, SshTarget};
use super::vm::VmUuid;
use crate::rbd::{
    BlocklistEntry, BlocklistItem, CephError, EntityAddr, ImageSpec, ImageStatus, Op,
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

/// What the fence needs from Ceph. Cheap to clone (a handle): a storage fence shared by
/// several requests runs as its own task-independent future.
pub trait CephPort: Clone + Send + Sync + 'static {
    /// This service's own Ceph client addresses: never to be fenced.
    fn own_addrs(&self) -> Vec<EntityAddr>;
    fn image_status(
        &self,
        spec: &ImageSpec,
    ) -> impl Future<Output = Result<ImageStatus, CephError>> + Send;
    fn blocklist_add(
        &self,
        entry: BlocklistEntry,
        expire: Duration,
    ) -> impl Future<Output = Result<(), CephError>> + Send;
    fn blocklist_rm(
        &self,
        entry: BlocklistEntry,
    ) -> impl Future<Output = Result<(), CephError>> + Send;
    fn wait_for_latest_osdmap(&self) -> impl Future<Output = Result<(), CephError>> + Send;
    fn blocklist_ls(&self) -> impl Future<Output = Result<Vec<BlocklistItem>, CephError>> + Send;
    fn osdmap_epoch(&self) -> impl Future<Output = Result<u64, CephError>> + Send;
}

/// What the fence needs from SSH: a verified session on one route (which changes nothing on
/// the hosts), and the kill command run on it for the qemus of `vms` (all on the route's target
/// host), one report per VM in the same order.
pub trait KillPort: Clone + Send + Sync + 'static {
    type Session: Send + Sync + 'static;
    fn connect(
        &self,
        route: Route<'_>,
    ) -> impl Future<Output = Result<Self::Session, SshError>> + Send;
    fn kill(
        &self,
        session: &Self::Session,
        vms: &[VmUuid],
    ) -> impl Future<Output = Result<Vec<KillReport>, SshError>> + Send;
    fn close(&self, session: Self::Session) -> impl Future<Output = ()> + Send;
}

/// Told of every SSH session's result (metrics hook): `ok` or the error's bounded label.
pub type SessionObserver = Arc<dyn Fn(&'static str) + Send + Sync>;

/// The real kill step, over russh.
#[derive(Clone)]
pub struct SshKiller {
    pub settings: SshSettings,
    pub observer: Option<SessionObserver>,
    /// Logins to jump hosts, shared by the tunnels through them at the same time.
    pub jumps: Jumps,
}

impl SshKiller {
    fn observe(&self, label: &'static str) {
        if let Some(obs) = &self.observer {
            obs(label);
        }
    }
}

impl KillPort for SshKiller {
    type Session = super::ssh::Connected;

    async fn connect(&self, route: Route<'_>) -> Result<Self::Session, SshError> {
        let r = super::ssh::connect_shared(&self.settings, &self.jumps, route).await;
        if let Err(e) = &r {
            self.observe(e.label());
        }
        r
    }

    async fn kill(
        &self,
        session: &Self::Session,
        vms: &[VmUuid],
    ) -> Result<Vec<KillReport>, SshError> {
        let r = session.kill_qemus(&self.settings, vms).await;
        self.observe(r.as_ref().map(|_| "ok").unwrap_or_else(SshError::label));
        r
    }

    async fn close(&self, session: Self::Session) {
        session.close().await;
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

/// How long a kill batch stays open for other VMs of the same failed host before its SSH
/// session starts. Requests for many VMs of one host reach the kill step together (they
/// share the storage fence), so a short window gathers them into one session.
pub const KILL_GATHER_WINDOW: Duration = Duration::from_millis(20);

/// How long a kill batch waits at most for the host's storage batches still running (their
/// VMs then share its scan).
pub const KILL_STORAGE_WAIT: Duration = Duration::from_millis(500);

/// How long a storage batch about to start waits at most for other fences of the host that
/// are still gathering evidence (they join it instead of needing the next one; their kills
/// then share one batch too).
pub const GATHER_EVIDENCE_WAIT: Duration = Duration::from_millis(100);

/// How long a storage batch stays open for other requests of the same host and scope before
/// its entries are added: requests for many VMs of one host arrive together, and their entries
/// then share one monitor proposal and one confirmation.
pub const STORAGE_GATHER_WINDOW: Duration = Duration::from_millis(10);

/// One storage batch: the adds and the confirmation for every entry that joined it.
type StorageFuture = Shared<BoxFuture<'static, Arc<StorageOutcome>>>;
/// One SSH session for a batch of VMs of one host.
type KillFuture = Shared<BoxFuture<'static, Arc<BatchOutcome>>>;
/// A session to a failed host, opened (by a spawned task) while the fence gathers evidence
/// and fences storage.
type ConnectFuture<S> = Shared<BoxFuture<'static, Arc<Connection<S>>>>;

/// The outcome of opening a session along the route walk.
enum Connection<S> {
    /// Verified and logged in. `session` is taken by the kill batch that runs a command on
    /// it and put back afterwards, so the host's next batch runs on the same session; once
    /// `retired` (the fence deadline after it connected), it is closed instead.
    Ready {
        executor: Option<String>,
        role: ExecutorRole,
        notes: Vec<String>,
        session: Mutex<Option<S>>,
        retired: AtomicBool,
    },
    /// No verified session to the failed host.
    Unreachable {
        executor: Option<String>,
        role: ExecutorRole,
        detail: String,
    },
}

impl<S> Connection<S> {
    fn ready(executor: Option<String>, role: ExecutorRole, notes: Vec<String>, s: S) -> Self {
        Connection::Ready {
            executor,
            role,
            notes,
            session: Mutex::new(Some(s)),
            retired: AtomicBool::new(false),
        }
    }

    /// Connected and retired.
    fn spent(fut: &ConnectFuture<S>) -> bool {
        matches!(fut.peek().map(|c| c.as_ref()),
            Some(Connection::Ready { retired, .. }) if retired.load(Ordering::Acquire))
    }

    /// Still worth joining: connecting, or connected and not retired (its session may be in
    /// use by a batch right now; the host's next batch waits for it).
    fn usable(fut: &ConnectFuture<S>) -> bool {
        match fut.peek().map(|c| c.as_ref()) {
            None => true,
            Some(Connection::Ready { retired, .. }) => !retired.load(Ordering::Acquire),
            Some(Connection::Unreachable { .. }) => false,
        }
    }
}

/// What one storage batch confirmed, entry by entry.
struct StorageOutcome {
    /// For each entry asked for, the lasting entry that fences it (itself, or a distinct
    /// covering entry when it lapses too soon), or why none could be had.
    entries: HashMap<BlocklistEntry, Result<LastingEntry, BlocklistFailure>>,
    osdmap_epoch: u64,
    add: Duration,
    confirm: Duration,
}

struct StorageBatch {
    scope: Scope,
    /// `Some` while the batch is open for joining; taken when its adds start.
    entries: Arc<Mutex<Option<BTreeSet<BlocklistEntry>>>>,
    /// What it adds and confirms, once it runs.
    running: Arc<Mutex<BTreeSet<BlocklistEntry>>>,
    fut: StorageFuture,
}

struct KillBatch {
    /// `Some` while the batch is open for joining; taken when its session starts.
    vms: Arc<Mutex<Option<Vec<VmUuid>>>>,
    fut: KillFuture,
}

enum BatchOutcome {
    /// A verified session ran the kill command: one report per VM of the batch.
    Reports {
        executor: Option<String>,
        role: ExecutorRole,
        notes: Vec<String>,
        reports: HashMap<VmUuid, KillReport>,
    },
    /// A verified session reached the failed host, but the kill command gave no trustworthy
    /// answer (the scan refused: another PID namespace, a failed self-check; bad output; the
    /// command timed out).
    NoAnswer {
        executor: Option<String>,
        role: ExecutorRole,
        detail: String,
    },
    /// No verified session to the failed host.
    Unreachable {
        executor: Option<String>,
        role: ExecutorRole,
        detail: String,
    },
}

struct HostState<S> {
    storage: Vec<StorageBatch>,
    kill: Option<KillBatch>,
    connection: Option<ConnectFuture<S>>,
    /// Fences of the host gathering evidence right now: they will come to its storage and
    /// kill batches soon, and a batch about to start waits a little for them.
    gathering: Arc<AtomicUsize>,
}

impl<S> Default for HostState<S> {
    fn default() -> Self {
        HostState {
            storage: Vec::new(),
            kill: None,
            connection: None,
            gathering: Arc::default(),
        }
    }
}

/// Counts one fence as gathering evidence for its host while it lives.
struct Gathering(Arc<AtomicUsize>);

impl Gathering {
    fn new(count: Arc<AtomicUsize>) -> Gathering {
        count.fetch_add(1, Ordering::AcqRel);
        Gathering(count)
    }
}

impl Drop for Gathering {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits, at most `limit`, until no fence of the host is gathering evidence.
async fn until_gathered(count: &AtomicUsize, limit: Duration) {
    let until = Instant::now() + limit;
    while count.load(Ordering::Acquire) > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub struct Engine<C, K: KillPort> {
    pub ceph: C,
    pub killer: K,
    pub inventory: Inventory,
    pub settings: FenceSettings,
    pub ledger: Ledger,
    pub observer: Option<Arc<dyn FenceObserver>>,
    hosts: Mutex<HashMap<String, HostState<K::Session>>>,
}

/// Runs `fut` with at most `limit`, and never past `deadline`.
async fn bounded<T>(limit: Duration, deadline: Instant, fut: impl Future<Output = T>) -> Option<T> {
    let budget = limit.min(deadline.saturating_duration_since(Instant::now()));
    tokio::time::timeout(budget, fut).await.ok()
}

/// A fence id unique across restarts of this process: time, pid, sequence.
pub fn new_fence_id() -> String {
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

/// Now, RFC 3339 in UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl<C: CephPort, K: KillPort> Engine<C, K> {
    pub fn new(
        ceph: C,
        killer: K,
        inventory: Inventory,
        settings: FenceSettings,
        ledger: Ledger,
    ) -> Self {
        Engine {
            ceph,
            killer,
            inventory,
            settings,
            ledger,
            observer: None,
            hosts: Mutex::default(),
        }
    }

    pub fn with_observer(mut self, observer: Arc<dyn FenceObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    fn hosts(&self) -> std::sync::MutexGuard<'_, HashMap<String, HostState<K::Session>>> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one fence to its decision, records it, and returns the record (whose `reply` is
    /// the answer to send).
    pub async fn fence(&self, req: &FenceRequest) -> FenceRecord {
        let started = Instant::now();
        let started_at = now_rfc3339();
        let deadline = started + self.settings.deadline;
        let failed = self.inventory.get(&req.failed_host);
        let own_addrs = self.ceph.own_addrs();
        let target_known =
            self.inventory.get(&req.target_host).is_some() && req.target_host != req.failed_host;
        // Open the SSH session while the evidence is gathered: connecting changes nothing on
        // the hosts; the kill command runs only when the decision asks for it.
        let prepared = match failed {
            Some(host) if !req.dry_run && target_known => {
                Some(self.connection(host, &req.target_host))
            }
            _ => None,
        };
        let ctx = Context {
            failed,
            target_known,
            inventory: &self.inventory,
            own_addrs: &own_addrs,
            dry_run: req.dry_run,
        };
        let mut obs = Observed::default();
        let mut stages: BTreeMap<Stage, Duration> = BTreeMap::new();
        let mut planned: BTreeMap<Scope, Vec<BlocklistEntry>> = BTreeMap::new();
        // The kill step, and how long it took. `Kill` is only asked for once the failed host is
        // known.
        let kill_step = || async {
            let t = Instant::now();
            let kill = match failed {
                Some(host) => {
                    self.kill(host, &req.target_host, &req.vm, deadline, prepared.clone())
                        .await
                }
                None => unreachable_kill("failed host unknown"),
            };
            (kill, t.elapsed())
        };
        // Each step fills one `None` field of `obs`, and `next_step` only asks for a step whose
        // field is `None`, so the loop ends after at most four steps.
        let verdict = loop {
            match next_step(&ctx, &obs) {
                Step::GatherEvidence => {
                    let t = Instant::now();
                    let _counted = Gathering::new(
                        self.hosts()
                            .entry(req.failed_host.clone())
                            .or_default()
                            .gathering
                            .clone(),
                    );
                    obs.evidence = Some(self.gather(&req.volumes, deadline).await);
                    stages.insert(Stage::Evidence, t.elapsed());
                }
                Step::Blocklist { scope, entries } => {
                    planned.insert(scope, entries.clone());
                    let host = req.failed_host.clone();
                    let fence = self.blocklist(host, scope, entries, deadline, &mut stages);
                    match (scope, failed) {
                        // Whatever the VM fence's result, the kill is the next step
                        // (`decision::tests::the_kill_follows_every_vm_fence`): run both at
                        // once. No decision changes, only the time.
                        (Scope::Vm, Some(_)) if obs.kill.is_none() => {
                            let (result, (kill, took)) = tokio::join!(fence, kill_step());
                            obs.vm_fence = Some(result);
                            obs.kill = Some(kill);
                            *stages.entry(Stage::Ssh).or_default() += took;
                        }
                        (Scope::Vm, _) => obs.vm_fence = Some(fence.await),
                        (Scope::Host | Scope::None, _) => obs.host_fence = Some(fence.await),
                    }
                }
                Step::Kill => {
                    let (kill, took) = kill_step().await;
                    obs.kill = Some(kill);
                    *stages.entry(Stage::Ssh).or_default() += took;
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
            if !req.dry_run {
                record.take_back = every_entry(&planned);
            }
            record.reply.decision = decision.as_str().into();
            record.reply.outcome = decision.outcome().as_str().into();
            record.reply.reason = decision.reason().into();
            record.reply.message = format!(
                "the decision ({}) could not be recorded: {e}",
                verdict.decision
            );
            self.ledger.record_deny(record.clone()).await;
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
            scope = record.reply.evidence.blocklist.as_ref().map_or("none", |b| b.scope.as_str()),
            without_volumes = record.reply.evidence.without_volumes,
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

    /// Makes `entries` (of host `host`) last the configured expiry again, without a moment
    /// uncovered: a storage batch, which replaces an entry too short to count by a distinct
    /// covering one, or renews it under that cover (see [`storage_batch`]).
    pub async fn renew(&self, host: &str, entries: Vec<BlocklistEntry>) -> FenceResult {
        let deadline = Instant::now() + self.settings.deadline;
        let mut stages = BTreeMap::new();
        self.blocklist(
            host.to_string(),
            Scope::Host,
            entries,
            deadline,
            &mut stages,
        )
        .await
    }

    /// Scans `host` for the qemus of `vms` over a verified SSH session through a sibling (or
    /// direct), killing any left and re-checking: one report per VM, or why there is none.
    pub async fn scan(&self, host: &Host, vms: &[VmUuid]) -> Result<Vec<KillReport>, String> {
        let executors: Vec<Host> = self
            .inventory
            .kill_executors(host, None)
            .into_iter()
            .cloned()
            .collect();
        let work = async {
            let conn =
                connect_route(self.killer.clone(), host.clone(), executors, String::new()).await;
            match conn.as_ref() {
                Connection::Ready { session, .. } => {
                    let taken = session.lock().unwrap_or_else(|p| p.into_inner()).take();
                    let Some(session) = taken else {
                        return Err("no SSH session".to_string());
                    };
                    let r = self.killer.kill(&session, vms).await;
                    self.killer.close(session).await;
                    r.map_err(|e| e.to_string())
                }
                Connection::Unreachable { detail, .. } => Err(detail.clone()),
            }
        };
        match tokio::time::timeout(self.settings.ssh_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err("no verified SSH answer within the ssh timeout".into()),
        }
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
                // ENOENT from opening the pool or the image; a missing conf or keyring is not it.
                Some(Err(e))
                    if e.is_not_found()
                        && matches!(e.op, Op::LocateImage | Op::IoCtxCreate | Op::ReadHeader) =>
                {
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

    /// The storage fence for `entries` (all of one failed host, of one scope), as a group
    /// commit per host and scope: joins the host's open batch of that scope, or the running one
    /// when that one adds every entry asked for (its adds and its confirmation cover them; no
    /// unfence of the host can run while its fences do), or opens a batch that gathers entries
    /// until the running one ends. So many VMs of one host share a few monitor proposals and
    /// confirmations, whenever their requests arrive. A batch runs as a shared future that
    /// every waiter drives, bounded by the blocklist timeout inside, so a waiter that gives up
    /// does not cancel it for the others.
    async fn blocklist(
        &self,
        host: String,
        scope: Scope,
        entries: Vec<BlocklistEntry>,
        deadline: Instant,
        stages: &mut BTreeMap<Stage, Duration>,
    ) -> FenceResult {
        let fut = {
            let mut hosts = self.hosts();
            let st = hosts.entry(host.clone()).or_default();
            st.storage.retain(|b| b.fut.peek().is_none());
            let mine = || st.storage.iter().filter(|b| b.scope == scope);
            let open = mine().find_map(|b| {
                let mut open = b.entries.lock().unwrap_or_else(|p| p.into_inner());
                open.as_mut().map(|set| {
                    set.extend(entries.iter().copied());
                    b.fut.clone()
                })
            });
            let covering = || {
                mine()
                    .find(|b| {
                        let running = b.running.lock().unwrap_or_else(|p| p.into_inner());
                        entries.iter().all(|e| running.contains(e))
                    })
                    .map(|b| b.fut.clone())
            };
            match open.or_else(covering) {
                Some(f) => f,
                None => {
                    let after: Vec<StorageFuture> = mine().map(|b| b.fut.clone()).collect();
                    let set = Arc::new(Mutex::new(Some(entries.iter().copied().collect())));
                    let running = Arc::new(Mutex::new(BTreeSet::new()));
                    let fut = storage_batch(
                        self.ceph.clone(),
                        after,
                        st.gathering.clone(),
                        set.clone(),
                        running.clone(),
                        self.settings,
                    )
                    .boxed()
                    .shared();
                    st.storage.push(StorageBatch {
                        scope,
                        entries: set,
                        running,
                        fut: fut.clone(),
                    });
                    fut
                }
            }
        };
        let waited = Instant::now();
        // Its batch may first wait for the running one; each bounds itself by the timeout.
        let budget = 2 * self.settings.blocklist_timeout
            + STORAGE_GATHER_WINDOW
            + GATHER_EVIDENCE_WAIT
            + WAITER_SLACK;
        let outcome = bounded(budget, deadline, fut).await;
        let Some(o) = outcome else {
            *stages.entry(Stage::Blocklist).or_default() += waited.elapsed();
            // Its batch may still be adding: what it sent may commit later.
            return Err(BlocklistFailure::Unanswered(
                "the blocklist was not confirmed in the osdmap within the blocklist timeout".into(),
            ));
        };
        *stages.entry(Stage::Blocklist).or_default() += o.add;
        *stages.entry(Stage::Osdmap).or_default() += o.confirm;
        let mut confirmed: Vec<LastingEntry> = Vec::new();
        for e in &entries {
            match o.entries.get(e) {
                Some(Ok(l)) => {
                    if !confirmed.contains(l) {
                        confirmed.push(l.clone());
                    }
                }
                Some(Err(f)) => return Err(f.clone()),
                None => {
                    return Err(BlocklistFailure::Failed(format!(
                        "{e}: the storage batch did not report it"
                    )));
                }
            }
        }
        Ok(BlocklistConfirmed {
            entries: confirmed,
            osdmap_epoch: o.osdmap_epoch,
        })
    }

    /// The failed host's session being opened (or opened and unused), or a new one.
    fn connection(&self, failed: &Host, target: &str) -> ConnectFuture<K::Session> {
        let mut hosts = self.hosts();
        let st = hosts.entry(failed.uuid.clone()).or_default();
        self.connection_locked(st, failed, target)
    }

    fn connection_locked(
        &self,
        st: &mut HostState<K::Session>,
        failed: &Host,
        target: &str,
    ) -> ConnectFuture<K::Session> {
        if let Some(c) = &st.connection
            && Connection::usable(c)
        {
            return c.clone();
        }
        let executors: Vec<Host> = self
            .inventory
            .kill_executors(failed, Some(target))
            .into_iter()
            .cloned()
            .collect();
        let fut = connect_route(
            self.killer.clone(),
            failed.clone(),
            executors,
            target.to_string(),
        )
        .boxed()
        .shared();
        // A task drives it (nobody may await it for a while) and, the fence deadline after it
        // connected, retires it: closes the session unless a batch has it (that batch closes
        // it when done).
        let (killer, linger, driven) = (self.killer.clone(), self.settings.deadline, fut.clone());
        tokio::spawn(async move {
            let c = driven.await;
            tokio::time::sleep(linger).await;
            if let Connection::Ready {
                session, retired, ..
            } = c.as_ref()
            {
                retired.store(true, Ordering::Release);
                let unused = session.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(s) = unused {
                    killer.close(s).await;
                }
            }
        });
        st.connection = Some(fut.clone());
        fut
    }

    /// Kills `vm`'s qemu on `failed`: joins the host's open kill batch (one SSH session for
    /// many VMs) or opens one. See [`kill_batch`] for the route.
    async fn kill(
        &self,
        failed: &Host,
        target: &str,
        vm: &VmUuid,
        deadline: Instant,
        prepared: Option<ConnectFuture<K::Session>>,
    ) -> KillObservation {
        let fut = {
            let mut hosts = self.hosts();
            let st = hosts.entry(failed.uuid.clone()).or_default();
            let joined = st.kill.as_ref().and_then(|b| {
                let mut open = b.vms.lock().unwrap_or_else(|p| p.into_inner());
                open.as_mut()
                    .filter(|list| list.len() < super::ssh::MAX_KILL_BATCH)
                    .map(|list| {
                        list.push(vm.clone());
                        b.fut.clone()
                    })
            });
            match joined {
                Some(f) => f,
                None => {
                    let vms = Arc::new(Mutex::new(Some(vec![vm.clone()])));
                    let executors: Vec<Host> = self
                        .inventory
                        .kill_executors(failed, Some(target))
                        .into_iter()
                        .cloned()
                        .collect();
                    // The host's session (shared by its batches, one at a time); else this
                    // fence's own attempt, even a failed one (a retry moments later would
                    // only double the wait); else a new one.
                    let connection = match (&st.connection, prepared) {
                        (Some(c), _) if Connection::usable(c) => c.clone(),
                        (_, Some(c)) if !Connection::spent(&c) => c,
                        _ => self.connection_locked(st, failed, target),
                    };
                    // One batch of the host runs at a time: this one gathers VMs until the
                    // running one ends, then runs on the session that one hands back.
                    let running = st
                        .kill
                        .as_ref()
                        .filter(|b| b.fut.peek().is_none())
                        .map(|b| b.fut.clone());
                    // The host's storage batches still running: their VMs come to the kill
                    // step when they end, and join this batch if it waits for them.
                    let fencing: Vec<StorageFuture> = st
                        .storage
                        .iter()
                        .filter(|b| b.fut.peek().is_none())
                        .map(|b| b.fut.clone())
                        .collect();
                    let fut = kill_batch(
                        self.killer.clone(),
                        running,
                        fencing,
                        connection,
                        failed.clone(),
                        executors,
                        target.to_string(),
                        vms.clone(),
                    )
                    .boxed()
                    .shared();
                    st.kill = Some(KillBatch {
                        vms,
                        fut: fut.clone(),
                    });
                    fut
                }
            }
        };
        match bounded(self.settings.ssh_timeout, deadline, fut).await {
            None => unreachable_kill("no verified SSH answer within the ssh timeout"),
            Some(outcome) => match outcome.as_ref() {
                BatchOutcome::NoAnswer {
                    executor,
                    role,
                    detail,
                } => KillObservation {
                    result: KillResult::Unconfirmed,
                    executor: executor.clone(),
                    role: role.to_owned(),
                    qemu_found: false,
                    killed: false,
                    detail: detail.clone(),
                },
                BatchOutcome::Unreachable {
                    executor,
                    role,
                    detail,
                } => KillObservation {
                    result: KillResult::Unreachable,
                    executor: executor.clone(),
                    role: role.to_owned(),
                    qemu_found: false,
                    killed: false,
                    detail: detail.clone(),
                },
                BatchOutcome::Reports {
                    executor,
                    role,
                    notes,
                    reports,
                } => match reports.get(vm) {
                    Some(r) => observe(r.clone(), executor.clone(), role.to_owned(), notes.clone()),
                    None => unreachable_kill("the kill session reported nothing for this VM"),
                },
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        req: &FenceRequest,
        started_at: String,
        obs: &Observed,
        planned: &BTreeMap<Scope, Vec<BlocklistEntry>>,
        verdict: Verdict,
        stages: &BTreeMap<Stage, Duration>,
        elapsed: Duration,
    ) -> FenceRecord {
        let volumes = match &obs.evidence {
            Some(Ok(v)) => v.iter().map(VolumeReport::from).collect(),
            _ => Vec::new(),
        };
        let blocklist = blocklist_report(obs, planned, &verdict);
        let kill = obs.kill.as_ref().map(|k| KillReportJson {
            executor: k.executor.clone(),
            role: k.role,
            ssh_reachable: k.result != KillResult::Unreachable,
            qemu_found: k.qemu_found,
            killed: k.killed,
            error: (!k.detail.is_empty()).then(|| k.detail.clone()),
        });
        let d = verdict.decision;
        let take_back = if matches!(d, Decision::Deny(_)) && !req.dry_run {
            failed_entries(obs, planned)
        } else {
            Vec::new()
        };
        FenceRecord {
            renewed: Vec::new(),
            take_back,
            gone_at: None,
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
                    without_volumes: req.volumes.is_empty(),
                    volumes,
                    blocklist,
                    kill,
                },
                duration_ms: elapsed.as_millis() as u64,
            },
        }
    }
}

/// The entries of the scopes whose storage fence failed (not answered in time, refused, or
/// not confirmed): an add of theirs may have landed, or land later. Not a scope whose entry is
/// listed but lapses too soon: that entry was there before the fence.
fn failed_entries(obs: &Observed, planned: &BTreeMap<Scope, Vec<BlocklistEntry>>) -> Vec<String> {
    let failed = |scope: &Scope| {
        let result = match scope {
            Scope::Vm => &obs.vm_fence,
            Scope::Host | Scope::None => &obs.host_fence,
        };
        matches!(
            result,
            Some(Err(
                BlocklistFailure::Unanswered(_) | BlocklistFailure::Failed(_)
            ))
        )
    };
    let only_failed: BTreeMap<Scope, Vec<BlocklistEntry>> = planned
        .iter()
        .filter(|(scope, _)| failed(scope))
        .map(|(scope, e)| (*scope, e.clone()))
        .collect();
    every_entry(&only_failed)
}

/// Every entry a fence asked the monitors for, of every scope, once each.
fn every_entry(planned: &BTreeMap<Scope, Vec<BlocklistEntry>>) -> Vec<String> {
    let mut all: Vec<String> = planned
        .values()
        .flatten()
        .map(ToString::to_string)
        .collect();
    all.sort();
    all.dedup();
    all
}

/// The storage fence the verdict rests on (or the one that failed), for the reply: the entries
/// relied on, each with its expiry. Absent when no storage step ran and none was needed.
fn blocklist_report(
    obs: &Observed,
    planned: &BTreeMap<Scope, Vec<BlocklistEntry>>,
    verdict: &Verdict,
) -> Option<BlocklistReport> {
    let result = match verdict.scope {
        Scope::Vm => obs.vm_fence.as_ref(),
        Scope::Host => obs.host_fence.as_ref(),
        Scope::None => None,
    };
    match result {
        Some(Ok(c)) => Some(BlocklistReport {
            scope: verdict.scope,
            entries: c.entries.iter().map(|l| l.entry.to_string()).collect(),
            expires: c
                .entries
                .iter()
                .map(|l| EntryExpiry {
                    entry: l.entry.to_string(),
                    until: rfc3339(l.until),
                })
                .collect(),
            osdmap_epoch: Some(c.osdmap_epoch),
            error: None,
        }),
        Some(Err(e)) => Some(BlocklistReport {
            scope: verdict.scope,
            entries: planned
                .get(&verdict.scope)
                .map(|v| v.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
            expires: Vec::new(),
            osdmap_epoch: None,
            error: Some(e.to_string()),
        }),
        None if verdict.decision.is_approve() => Some(BlocklistReport {
            scope: Scope::None,
            entries: Vec::new(),
            expires: Vec::new(),
            osdmap_epoch: None,
            error: None,
        }),
        None => None,
    }
}

/// How much longer than the blocklist timeout a waiter waits for a batch (the batch bounds
/// itself by that timeout; this only covers scheduling).
const WAITER_SLACK: Duration = Duration::from_secs(1);

/// The least time an entry must still run to count: the configured expiry less 10 % (clock
/// skew between the monitors and this host, and entries this service made moments ago).
/// Ceph does not extend an entry that is added again, so an older, shorter entry never counts.
pub fn lasting_threshold(expire: Duration) -> Duration {
    expire - expire / 10
}

/// How long a covering entry must still run while another entry is renewed under it.
const COVER_AT_LEAST: Duration = Duration::from_secs(30);

/// A distinct entry that fences every client `entry` fences, without fencing anyone else: the
/// `/32` (`/128`) range of a whole-IP entry. An exact client instance has none.
fn distinct_cover(entry: &BlocklistEntry) -> Option<BlocklistEntry> {
    match entry {
        BlocklistEntry::Addr(a) if a.port == 0 && a.nonce == 0 => {
            let prefix = if a.ip.is_ipv4() { 32 } else { 128 };
            Some(BlocklistEntry::Range(crate::rbd::Cidr { ip: a.ip, prefix }))
        }
        _ => None,
    }
}

/// One storage batch: waits [`STORAGE_GATHER_WINDOW`] for other requests' entries, adds them
/// all (concurrently: they land in one monitor proposal), waits for the latest osdmap and
/// confirms each entry is listed with an expiry that lasts ([`lasting_threshold`]).
///
/// An entry that exists already with a shorter expiry (Ceph keeps the old one) is replaced,
/// without a moment uncovered, by a distinct covering entry ([`distinct_cover`]); when that one
/// exists and is short too, the original is removed and added again while the cover still
/// holds. An exact client entry has no distinct cover: it is `Expiring`.
#[allow(clippy::too_many_arguments)]
async fn storage_batch<C: CephPort>(
    ceph: C,
    after: Vec<StorageFuture>,
    gathering: Arc<AtomicUsize>,
    set: Arc<Mutex<Option<BTreeSet<BlocklistEntry>>>>,
    running: Arc<Mutex<BTreeSet<BlocklistEntry>>>,
    settings: FenceSettings,
) -> Arc<StorageOutcome> {
    // Gather while the host's running batch of this scope runs (bounded: it bounds itself),
    // for the window, and while other fences of the host still gather evidence (bounded).
    join_all(after).await;
    tokio::time::sleep(STORAGE_GATHER_WINDOW).await;
    until_gathered(&gathering, GATHER_EVIDENCE_WAIT).await;
    let entries: Vec<BlocklistEntry> = {
        let taken = set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone_from(&taken);
        taken.into_iter().collect()
    };
    let mut out = StorageOutcome {
        entries: HashMap::new(),
        osdmap_epoch: 0,
        add: Duration::ZERO,
        confirm: Duration::ZERO,
    };
    let run = fence_entries(&ceph, &entries, settings, &mut out);
    let result = tokio::time::timeout(settings.blocklist_timeout, run).await;
    let failure = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some(if out.add.is_zero() {
            // Still adding: the monitors may commit what they were sent.
            BlocklistFailure::Unanswered(
                "the monitors did not answer the blocklist add within the blocklist timeout".into(),
            )
        } else {
            BlocklistFailure::Failed(
                "the blocklist was not confirmed in the osdmap within the blocklist timeout".into(),
            )
        }),
    };
    if let Some(f) = failure {
        for e in &entries {
            if !matches!(out.entries.get(e), Some(Ok(_))) {
                out.entries.insert(*e, Err(f.clone()));
            }
        }
    }
    Arc::new(out)
}

/// Adds `entries` with the configured expiry, concurrently; the first error is the answer.
async fn add_all<C: CephPort>(
    ceph: &C,
    entries: &[BlocklistEntry],
    expire: Duration,
) -> Result<(), BlocklistFailure> {
    let adds = join_all(entries.iter().map(|e| ceph.blocklist_add(*e, expire))).await;
    let errors: Vec<CephError> = adds.into_iter().filter_map(Result::err).collect();
    // An add the monitors did not answer may still commit; one they refused did not.
    match errors.iter().find(|e| e.errno == libc::ETIMEDOUT) {
        Some(err) => Err(BlocklistFailure::Unanswered(err.to_string())),
        None => match errors.first() {
            Some(err) => Err(BlocklistFailure::Failed(err.to_string())),
            None => Ok(()),
        },
    }
}

/// Waits for the latest osdmap, then lists the blocklist: each entry with its expiry.
async fn listing<C: CephPort>(
    ceph: &C,
) -> Result<HashMap<BlocklistEntry, time::OffsetDateTime>, BlocklistFailure> {
    let failed = |e: CephError| BlocklistFailure::Failed(e.to_string());
    ceph.wait_for_latest_osdmap().await.map_err(failed)?;
    let listed = ceph.blocklist_ls().await.map_err(failed)?;
    let mut out = HashMap::new();
    for item in listed {
        let (Ok(entry), Ok(until)) = (
            item.entry.parse::<BlocklistEntry>(),
            time::OffsetDateTime::parse(
                &item.until,
                &time::format_description::well_known::Rfc3339,
            ),
        ) else {
            continue;
        };
        out.insert(entry, until);
    }
    Ok(out)
}

/// What the listing says of one entry.
enum Listed {
    Lasting(LastingEntry),
    Short(time::OffsetDateTime),
    Missing,
}

fn look_up(
    listed: &HashMap<BlocklistEntry, time::OffsetDateTime>,
    entry: BlocklistEntry,
    threshold: time::OffsetDateTime,
) -> Listed {
    match listed.get(&entry) {
        Some(until) if *until >= threshold => Listed::Lasting(LastingEntry {
            entry,
            until: *until,
        }),
        Some(until) => Listed::Short(*until),
        None => Listed::Missing,
    }
}

fn threshold(settings: &FenceSettings) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + lasting_threshold(settings.blocklist_expire)
}

async fn fence_entries<C: CephPort>(
    ceph: &C,
    entries: &[BlocklistEntry],
    settings: FenceSettings,
    out: &mut StorageOutcome,
) -> Result<(), BlocklistFailure> {
    let expire = settings.blocklist_expire;
    let t = Instant::now();
    add_all(ceph, entries, expire).await?;
    out.add += t.elapsed();
    let t = Instant::now();
    let listed = listing(ceph).await?;
    out.confirm += t.elapsed();
    let mut short = Vec::new();
    for e in entries {
        match look_up(&listed, *e, threshold(&settings)) {
            Listed::Lasting(l) => {
                out.entries.insert(*e, Ok(l));
            }
            Listed::Short(until) => short.push((*e, until)),
            Listed::Missing => {
                out.entries.insert(
                    *e,
                    Err(BlocklistFailure::Failed(format!(
                        "{e} was added but is not in the osdmap's blocklist"
                    ))),
                );
            }
        }
    }
    if !short.is_empty() {
        renew(ceph, &short, settings, out).await?;
    }
    let t = Instant::now();
    out.osdmap_epoch = ceph
        .osdmap_epoch()
        .await
        .map_err(|e| BlocklistFailure::Failed(e.to_string()))?;
    out.confirm += t.elapsed();
    Ok(())
}

/// Makes each short entry's clients fenced by an entry that lasts, never leaving them
/// uncovered (see [`storage_batch`]).
async fn renew<C: CephPort>(
    ceph: &C,
    short: &[(BlocklistEntry, time::OffsetDateTime)],
    settings: FenceSettings,
    out: &mut StorageOutcome,
) -> Result<(), BlocklistFailure> {
    let expire = settings.blocklist_expire;
    let mut covers = Vec::new();
    for (e, until) in short {
        match distinct_cover(e) {
            Some(c) => covers.push((*e, c)),
            None => {
                out.entries.insert(
                    *e,
                    Err(BlocklistFailure::Expiring(format!(
                        "{e} exists already and lapses at {} (Ceph does not extend an entry added again), and no distinct entry covers exactly this client",
                        rfc3339(*until)
                    ))),
                );
            }
        }
    }
    if covers.is_empty() {
        return Ok(());
    }
    let t = Instant::now();
    let alts: Vec<BlocklistEntry> = covers.iter().map(|(_, c)| *c).collect();
    add_all(ceph, &alts, expire).await?;
    out.add += t.elapsed();
    let t = Instant::now();
    let listed = listing(ceph).await?;
    out.confirm += t.elapsed();
    let mut again = Vec::new();
    for (e, c) in covers {
        match look_up(&listed, c, threshold(&settings)) {
            Listed::Lasting(l) => {
                out.entries.insert(e, Ok(l));
            }
            // Both keys exist and are short: renew the original under the cover's protection.
            Listed::Short(cu)
                if cu
                    >= time::OffsetDateTime::now_utc()
                        + COVER_AT_LEAST
                        + settings.blocklist_timeout =>
            {
                again.push(e);
            }
            Listed::Short(_) | Listed::Missing => {
                out.entries.insert(
                    e,
                    Err(BlocklistFailure::Expiring(format!(
                        "{e} and its distinct cover {c} both exist already and lapse too soon to renew one under the other"
                    ))),
                );
            }
        }
    }
    if again.is_empty() {
        return Ok(());
    }
    let t = Instant::now();
    for r in join_all(again.iter().map(|e| ceph.blocklist_rm(*e))).await {
        r.map_err(|e| BlocklistFailure::Expiring(format!("renewing under cover: {e}")))?;
    }
    // The removal must be committed before the add, or the add keeps the old expiry.
    ceph.wait_for_latest_osdmap()
        .await
        .map_err(|e| BlocklistFailure::Failed(e.to_string()))?;
    add_all(ceph, &again, expire).await?;
    out.add += t.elapsed();
    let t = Instant::now();
    let listed = listing(ceph).await?;
    out.confirm += t.elapsed();
    for e in again {
        let r = match look_up(&listed, e, threshold(&settings)) {
            Listed::Lasting(l) => Ok(l),
            Listed::Short(_) | Listed::Missing => Err(BlocklistFailure::Expiring(format!(
                "{e} did not last after it was renewed"
            ))),
        };
        out.entries.insert(e, r);
    }
    Ok(())
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// How long the route walk waits for one bystander sibling before it also tries the next
/// (happy-eyeballs style): dead siblings of a failed rack cost this much each, not a whole
/// connect timeout.
pub const ROUTE_STAGGER: Duration = Duration::from_millis(100);

/// Opens a session to the failed host: tries the bystander siblings as jump hosts, a new one
/// every [`ROUTE_STAGGER`] (or at once when the previous failed) while the earlier ones are
/// still connecting; the first verified session wins. Only when no bystander works, the HA
/// target, then a direct session. A sibling that cannot be used itself is skipped; an answer
/// about the failed host (including "unreachable from a working sibling") ends the search.
async fn connect_route<K: KillPort>(
    killer: K,
    failed: Host,
    executors: Vec<Host>,
    target: String,
) -> Arc<Connection<K::Session>> {
    use futures::stream::{FuturesUnordered, StreamExt};

    let failed_t = SshTarget {
        host_uuid: failed.uuid.clone(),
        addr: failed.ssh,
        storage: failed.storage_addrs.clone(),
    };
    let jumps: Vec<(SshTarget, ExecutorRole)> = executors
        .iter()
        .map(|h| {
            let role = if h.uuid == target {
                ExecutorRole::Target
            } else {
                ExecutorRole::Sibling
            };
            let t = SshTarget {
                host_uuid: h.uuid.clone(),
                addr: h.ssh,
                storage: h.storage_addrs.clone(),
            };
            (t, role)
        })
        .collect();
    let (bystanders, targets): (Vec<_>, Vec<_>) = jumps
        .iter()
        .partition(|(_, role)| *role == ExecutorRole::Sibling);
    let mut notes = Vec::new();
    for group in [bystanders, targets] {
        let mut queue = group.into_iter();
        let mut pending = FuturesUnordered::new();
        loop {
            if pending.is_empty() {
                match queue.next() {
                    Some(j) => pending.push(via(killer.clone(), j, &failed_t)),
                    None => break,
                }
            }
            let next = tokio::select! {
                done = pending.next() => done,
                _ = tokio::time::sleep(ROUTE_STAGGER), if queue.len() > 0 => {
                    if let Some(j) = queue.next() {
                        pending.push(via(killer.clone(), j, &failed_t));
                    }
                    continue;
                }
            };
            let Some((jump, role, result)) = next else {
                continue;
            };
            match result {
                Ok(session) => {
                    return Arc::new(Connection::ready(Some(jump), role, notes, session));
                }
                Err(e) if e.peer().is_none_or(|p| p.host_uuid == jump) => {
                    notes.push(format!("via {jump}: {e}"));
                }
                Err(e) => {
                    notes.push(e.to_string());
                    return Arc::new(Connection::Unreachable {
                        executor: Some(jump),
                        role,
                        detail: notes.join("; "),
                    });
                }
            }
        }
    }
    match killer.connect(Route::Direct(&failed_t)).await {
        Ok(session) => Arc::new(Connection::ready(
            None,
            ExecutorRole::Direct,
            notes,
            session,
        )),
        Err(e) => {
            notes.push(format!("direct: {e}"));
            Arc::new(Connection::Unreachable {
                executor: None,
                role: ExecutorRole::Direct,
                detail: notes.join("; "),
            })
        }
    }
}

/// One attempt of the route walk: a session to `failed` through `jump`.
async fn via<K: KillPort>(
    killer: K,
    jump: &(SshTarget, ExecutorRole),
    failed: &SshTarget,
) -> (String, ExecutorRole, Result<K::Session, SshError>) {
    let (jump_t, role) = jump;
    let r = killer
        .connect(Route::Via {
            jump: jump_t,
            target: failed,
        })
        .await;
    (jump_t.host_uuid.clone(), *role, r)
}

/// One kill command for every VM that joins the batch: while the host's previous batch runs,
/// its storage batches still running end (at most [`KILL_STORAGE_WAIT`]), and for
/// [`KILL_GATHER_WINDOW`] after; then on the host's session (opened while the fence
/// ran its earlier steps, and handed back by the previous batch); on a new one only when
/// that session is gone. A session that answered is handed back for the next batch.
#[allow(clippy::too_many_arguments)]
async fn kill_batch<K: KillPort>(
    killer: K,
    running: Option<KillFuture>,
    fencing: Vec<StorageFuture>,
    connection: ConnectFuture<K::Session>,
    failed: Host,
    executors: Vec<Host>,
    target: String,
    vms: Arc<Mutex<Option<Vec<VmUuid>>>>,
) -> Arc<BatchOutcome> {
    if let Some(previous) = running {
        let _ = previous.await;
    }
    // Each scan reads every process of the host: a few VMs later in one scan costs less than
    // a second scan. Bounded, so a slow monitor does not hold up the VMs already fenced.
    let _ = tokio::time::timeout(KILL_STORAGE_WAIT, join_all(fencing)).await;
    tokio::time::sleep(KILL_GATHER_WINDOW).await;
    let vms = vms
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_default();
    let mut conn = connection.await;
    let take = |c: &Connection<K::Session>| match c {
        Connection::Ready { session, .. } => {
            session.lock().unwrap_or_else(|p| p.into_inner()).take()
        }
        Connection::Unreachable { .. } => None,
    };
    let mut shared = true;
    let session = match take(conn.as_ref()) {
        Some(s) => Some(s),
        None if matches!(conn.as_ref(), Connection::Ready { .. }) => {
            // The session is gone (retired, or an earlier batch's command failed on it):
            // open one for this batch alone.
            shared = false;
            conn = connect_route(killer.clone(), failed, executors, target).await;
            take(conn.as_ref())
        }
        None => None,
    };
    match (conn.as_ref(), session) {
        (
            Connection::Ready {
                executor,
                role,
                notes,
                session: slot,
                retired,
            },
            Some(session),
        ) => {
            let result = killer.kill(&session, &vms).await;
            if result.is_ok() && shared && !retired.load(Ordering::Acquire) {
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
                // Retired meanwhile: the linger task may have missed it; close it here.
                if retired.load(Ordering::Acquire) {
                    let left = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some(s) = left {
                        killer.close(s).await;
                    }
                }
            } else {
                killer.close(session).await;
            }
            match result {
                Ok(list) => Arc::new(BatchOutcome::Reports {
                    executor: executor.clone(),
                    role: *role,
                    notes: notes.clone(),
                    reports: vms.iter().cloned().zip(list).collect(),
                }),
                Err(e) => {
                    let mut detail = notes.clone();
                    detail.push(e.to_string());
                    Arc::new(BatchOutcome::NoAnswer {
                        executor: executor.clone(),
                        role: *role,
                        detail: detail.join("; "),
                    })
                }
            }
        }
        (
            Connection::Unreachable {
                executor,
                role,
                detail,
            },
            _,
        ) => Arc::new(BatchOutcome::Unreachable {
            executor: executor.clone(),
            role: *role,
            detail: detail.clone(),
        }),
        (Connection::Ready { executor, role, .. }, None) => Arc::new(BatchOutcome::Unreachable {
            executor: executor.clone(),
            role: *role,
            detail: "no SSH session left for this batch".into(),
        }),
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
        if !report.alive.is_empty() || !report.unknown.is_empty() {
            detail.push(format!(
                "still alive after SIGKILL: {:?}; unreadable: {:?}",
                report.alive, report.unknown
            ));
        }
        match report.sockets {
            None => detail.push(
                "could not sweep closed sockets on its storage addresses (is `ss` installed, and does qemu run in the login shell's network namespace?), so a dead qemu's unsent writes may still be on their way".into(),
            ),
            Some(s) if s.held != Some(0) => detail.push(format!(
                "{} closed sockets on its storage addresses could still deliver a dead qemu's unsent writes ({} of them could not be aborted)",
                s.aborted,
                s.held.map_or("some".into(), |h| h.to_string())
            )),
            Some(_) => {}
        }
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
