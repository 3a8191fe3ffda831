//! The service's Prometheus metrics. The series, their labels and allowed values are the
//! contract in `metrics/README.md`; `tests/service.rs` keeps this file and that one equal.
//! Label values come from fixed sets (the decision's enums, errno names, stage names),
//! never from free text.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::fence::decision::{ApproveReason, Decision, DenyReason, Outcome, Scope};
use crate::fence::driver::{FenceObserver, Stage};
use crate::fence::record::FenceRecord;
use crate::rbd::client::CallEvent;
use crate::rbd::{CephError, Op};

const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The `op` label of `rbdfence_ceph_calls_total`.
pub const CEPH_OPS: [&str; 9] = [
    "connect",
    "image_status",
    "blocklist_add",
    "blocklist_rm",
    "blocklist_ls",
    "wait_for_latest_osdmap",
    "osdmap_epoch",
    "getaddrs",
    "ledger",
];

/// The `result` label of `rbdfence_ceph_calls_total`: `ok`, these errnos, or `other`.
pub const CEPH_RESULTS: [&str; 13] = [
    "ok",
    "EPERM",
    "ENOENT",
    "EIO",
    "EACCES",
    "EINVAL",
    "ETIMEDOUT",
    "ESHUTDOWN",
    "ENOTCONN",
    "ECONNREFUSED",
    "EAGAIN",
    "ERANGE",
    "other",
];

/// The `result` label of `rbdfence_ssh_sessions_total`.
pub const SSH_RESULTS: [&str; 10] = [
    "ok",
    "config",
    "connect",
    "handshake",
    "host_key",
    "auth",
    "channel",
    "timeout",
    "remote",
    "bad_output",
];

/// The `route` label of `rbdfence_http_requests_total`.
pub const HTTP_ROUTES: [&str; 10] = [
    "pre_instantiate",
    "sibling_fence_vm",
    "image",
    "fences",
    "fence",
    "unfence",
    "metrics",
    "healthz",
    "readyz",
    "other",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabels {
    trigger: &'static str,
}

/// The `trigger` label of `rbdfence_unfences_total`.
pub const UNFENCE_TRIGGERS: [&str; 4] = ["auto", "api", "forced", "take-back"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CephCallLabels {
    op: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CephOpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: &'static str,
    status: &'static str,
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

pub struct Metrics {
    registry: Registry,
    outcomes: Family<OutcomeLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    scopes: Family<ScopeLabels, Counter>,
    without_volumes: Counter,
    unfences: Family<TriggerLabels, Counter>,
    fences_in_force: Gauge,
    fences_unproven: Gauge,
    unproven_expiry: Gauge,
    lifecycle_leader: Gauge,
    fence_duration: Histogram,
    stage_duration: Family<StageLabels, Histogram, fn() -> Histogram>,
    ceph_calls: Family<CephCallLabels, Counter>,
    ceph_in_flight: Family<CephOpLabels, Gauge>,
    ceph_in_flight_peak: Family<CephOpLabels, Gauge>,
    /// Serialises a call's start with the peak update, so the peak is never lower than a
    /// count that was reached.
    in_flight_lock: Mutex<()>,
    ssh_sessions: Family<ResultLabels, Counter>,
    blocklist_entries: Gauge,
    ceph_connected: Gauge,
    http_requests: Family<HttpLabels, Counter>,
    /// Entries added by this service and not lifted, with their expiry.
    managed: Mutex<HashMap<String, Instant>>,
    blocklist_expire: Duration,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        let decisions = Family::<DecisionLabels, Counter>::default();
        let scopes = Family::<ScopeLabels, Counter>::default();
        let without_volumes = Counter::default();
        let unfences = Family::<TriggerLabels, Counter>::default();
        let fences_in_force = Gauge::default();
        let fences_unproven = Gauge::default();
        let unproven_expiry = Gauge::default();
        let lifecycle_leader = Gauge::default();
        let fence_duration = histogram();
        let stage_duration =
            Family::<StageLabels, Histogram, fn() -> Histogram>::new_with_constructor(histogram);
        let ceph_calls = Family::<CephCallLabels, Counter>::default();
        let ceph_in_flight = Family::<CephOpLabels, Gauge>::default();
        let ceph_in_flight_peak = Family::<CephOpLabels, Gauge>::default();
        let ssh_sessions = Family::<ResultLabels, Counter>::default();
        let blocklist_entries = Gauge::default();
        let ceph_connected = Gauge::default();
        let build_info = Family::<VersionLabels, Gauge>::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "rbdfence_fence_outcomes",
            "Finished fences by outcome",
            outcomes.clone(),
        );
        registry.register(
            "rbdfence_fence_decisions",
            "Fence decisions by decision and reason",
            decisions.clone(),
        );
        registry.register(
            "rbdfence_fence_scope",
            "Approvals by the scope of the storage fence they rest on",
            scopes.clone(),
        );
        registry.register(
            "rbdfence_unfences",
            "Hosts unfenced: their fences' entries lifted, by what proved the VMs gone",
            unfences.clone(),
        );
        registry.register(
            "rbdfence_fences_in_force",
            "Approved fences whose entries are still meant to fence (not lifted, not lapsed)",
            fences_in_force.clone(),
        );
        registry.register(
            "rbdfence_fences_unproven",
            "Fences in force whose VM was never seen gone: they rest on the blocklist alone",
            fences_unproven.clone(),
        );
        registry.register(
            "rbdfence_unproven_fence_expiry_seconds",
            "Seconds until the first unproven fence in force would lapse (0 when there is none)",
            unproven_expiry.clone(),
        );
        registry.register(
            "rbdfence_lifecycle_leader",
            "1 on the instance that runs the fence lifecycle",
            lifecycle_leader.clone(),
        );
        registry.register(
            "rbdfence_fences_without_volumes",
            "Fences decided without Ceph evidence: the request named no volume",
            without_volumes.clone(),
        );
        registry.register(
            "rbdfence_fence_duration_seconds",
            "Whole fence, request to recorded decision",
            fence_duration.clone(),
        );
        registry.register(
            "rbdfence_fence_stage_duration_seconds",
            "Fence stages: evidence, blocklist (add), osdmap (wait + confirm), ssh (kill)",
            stage_duration.clone(),
        );
        registry.register(
            "rbdfence_ceph_calls",
            "Ceph calls by operation and result",
            ceph_calls.clone(),
        );
        registry.register(
            "rbdfence_ceph_calls_in_flight",
            "Ceph calls running now, by operation",
            ceph_in_flight.clone(),
        );
        registry.register(
            "rbdfence_ceph_calls_in_flight_peak",
            "The most Ceph calls of an operation that ran at once since the service started",
            ceph_in_flight_peak.clone(),
        );
        registry.register(
            "rbdfence_ssh_sessions",
            "SSH kill sessions by result",
            ssh_sessions.clone(),
        );
        registry.register(
            "rbdfence_blocklist_entries",
            "Blocklist entries this service added, not lifted and not expired",
            blocklist_entries.clone(),
        );
        registry.register(
            "rbdfence_ceph_connected",
            "1 when the persistent Ceph connection answers its health check",
            ceph_connected.clone(),
        );
        registry.register(
            "rbdfence_build_info",
            "Build information; always 1",
            build_info.clone(),
        );
        registry.register(
            "rbdfence_http_requests",
            "HTTP requests by route and status class",
            http_requests.clone(),
        );

        // Every series exists from the start (at 0), so rates and alerts work at once.
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        for o in Outcome::ALL {
            let _ = outcomes.get_or_create(&OutcomeLabels {
                outcome: o.as_str(),
            });
        }
        for r in ApproveReason::ALL {
            let _ = decisions.get_or_create(&DecisionLabels {
                decision: "approve",
                reason: r.as_str(),
            });
        }
        for r in DenyReason::ALL {
            let _ = decisions.get_or_create(&DecisionLabels {
                decision: "deny",
                reason: r.as_str(),
            });
        }
        for trigger in UNFENCE_TRIGGERS {
            let _ = unfences.get_or_create(&TriggerLabels { trigger });
        }
        for s in Scope::ALL {
            let _ = scopes.get_or_create(&ScopeLabels { scope: s.as_str() });
        }
        for s in Stage::ALL {
            let _ = stage_duration.get_or_create(&StageLabels { stage: s.as_str() });
        }
        for op in CEPH_OPS {
            let _ = ceph_calls.get_or_create(&CephCallLabels { op, result: "ok" });
            let _ = ceph_in_flight.get_or_create(&CephOpLabels { op });
            let _ = ceph_in_flight_peak.get_or_create(&CephOpLabels { op });
        }
        let _ = ssh_sessions.get_or_create(&ResultLabels { result: "ok" });
        Metrics {
            registry,
            outcomes,
            decisions,
            scopes,
            without_volumes,
            unfences,
            fences_in_force,
            fences_unproven,
            unproven_expiry,
            lifecycle_leader,
            fence_duration,
            stage_duration,
            ceph_calls,
            ceph_in_flight,
            ceph_in_flight_peak,
            in_flight_lock: Mutex::new(()),
            ssh_sessions,
            blocklist_entries,
            ceph_connected,
            http_requests,
            managed: Mutex::default(),
            blocklist_expire: Duration::from_secs(86400),
        }
    }

    /// The expiry the service gives its blocklist entries (for `rbdfence_blocklist_entries`).
    pub fn with_blocklist_expire(mut self, expire: Duration) -> Metrics {
        self.blocklist_expire = expire;
        self
    }

    /// The exposition text (OpenMetrics).
    pub fn encode(&self) -> String {
        {
            let mut managed = self.managed.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            managed.retain(|_, until| *until > now);
            self.blocklist_entries.set(managed.len() as i64);
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// A Ceph call starts, ends with a result, or is abandoned by its caller.
    pub fn ceph_call_event(&self, op: Op, event: CallEvent<'_>) {
        let label = ceph_op_label(op);
        let labels = CephOpLabels { op: label };
        match event {
            CallEvent::Started => {
                let _guard = self
                    .in_flight_lock
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let now = self.ceph_in_flight.get_or_create(&labels).inc() + 1;
                let peak = self.ceph_in_flight_peak.get_or_create(&labels);
                if now > peak.get() {
                    peak.set(now);
                }
            }
            CallEvent::Finished(result) => {
                self.ceph_in_flight.get_or_create(&labels).dec();
                self.ceph_call(op, result);
            }
            CallEvent::Abandoned => {
                self.ceph_in_flight.get_or_create(&labels).dec();
            }
        }
    }

    pub fn ceph_call(&self, op: Op, result: Result<(), &CephError>) {
        let op = ceph_op_label(op);
        let result = match result {
            Ok(()) => "ok",
            Err(e) => {
                let l = crate::rbd::errno::label(e.errno);
                CEPH_RESULTS
                    .iter()
                    .copied()
                    .find(|r| *r == l)
                    .unwrap_or("other")
            }
        };
        self.ceph_calls
            .get_or_create(&CephCallLabels { op, result })
            .inc();
    }

    pub fn ssh_session(&self, result: &'static str) {
        let result = SSH_RESULTS
            .iter()
            .copied()
            .find(|r| *r == result)
            .unwrap_or("remote");
        self.ssh_sessions
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn set_ceph_connected(&self, up: bool) {
        self.ceph_connected.set(i64::from(up));
    }

    pub fn http_request(&self, route: &'static str, status: u16) {
        let route = HTTP_ROUTES
            .iter()
            .copied()
            .find(|r| *r == route)
            .unwrap_or("other");
        let status = match status {
            200..=299 => "2xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.http_requests
            .get_or_create(&HttpLabels { route, status })
            .inc();
    }

    /// Entries of a host were lifted (unfence).
    /// The entries of the fences in force, as the ledger tells them (replaces what this
    /// process tracked on its own).
    pub fn set_managed(&self, entries: HashMap<String, Instant>) {
        *self.managed.lock().unwrap_or_else(|p| p.into_inner()) = entries;
    }

    /// What the lifecycle last saw in the ledger.
    pub fn set_fences(&self, in_force: usize, unproven: usize, first_lapse_secs: Option<i64>) {
        self.fences_in_force.set(in_force as i64);
        self.fences_unproven.set(unproven as i64);
        self.unproven_expiry
            .set(first_lapse_secs.unwrap_or(0).max(0));
    }

    pub fn set_lifecycle_leader(&self, leader: bool) {
        self.lifecycle_leader.set(i64::from(leader));
    }

    /// One unfence, by its trigger (one of [`UNFENCE_TRIGGERS`]).
    pub fn unfenced(&self, trigger: &str) {
        if let Some(trigger) = UNFENCE_TRIGGERS.iter().find(|t| **t == trigger) {
            self.unfences
                .get_or_create(&TriggerLabels { trigger })
                .inc();
        }
    }

    pub fn entries_lifted(&self, entries: &[String]) {
        let mut managed = self.managed.lock().unwrap_or_else(|p| p.into_inner());
        for e in entries {
            managed.remove(e);
        }
    }

    /// Remembers confirmed entries until they expire.
    pub fn entries_added(&self, entries: &[String], expire: Duration) {
        let until = Instant::now() + expire;
        let mut managed = self.managed.lock().unwrap_or_else(|p| p.into_inner());
        for e in entries {
            managed.insert(e.clone(), until);
        }
    }
}

impl FenceObserver for Metrics {
    fn fence_finished(
        &self,
        record: &FenceRecord,
        decision: Decision,
        stages: &BTreeMap<Stage, Duration>,
    ) {
        self.outcomes
            .get_or_create(&OutcomeLabels {
                outcome: decision.outcome().as_str(),
            })
            .inc();
        self.decisions
            .get_or_create(&DecisionLabels {
                decision: decision.as_str(),
                reason: decision.reason(),
            })
            .inc();
        if decision.is_approve() {
            let scope = record
                .reply
                .evidence
                .blocklist
                .as_ref()
                .map_or(Scope::None, |b| b.scope);
            self.scopes
                .get_or_create(&ScopeLabels {
                    scope: scope.as_str(),
                })
                .inc();
        }
        if record.reply.evidence.without_volumes && !record.dry_run {
            self.without_volumes.inc();
        }
        self.fence_duration
            .observe(record.reply.duration_ms as f64 / 1e3);
        if let Some(b) = &record.reply.evidence.blocklist
            && b.osdmap_epoch.is_some()
        {
            self.entries_added(&b.entries, self.blocklist_expire);
        }
        for (stage, d) in stages {
            self.stage_duration
                .get_or_create(&StageLabels {
                    stage: stage.as_str(),
                })
                .observe(d.as_secs_f64());
        }
    }
}

/// The `op` label of a Ceph call.
fn ceph_op_label(op: Op) -> &'static str {
    match op {
        Op::Connect | Op::Create | Op::ConfReadFile | Op::ConfSet | Op::LibraryVersion => "connect",
        Op::ReadHeader | Op::LocateImage | Op::IoCtxCreate => "image_status",
        Op::BlocklistAdd => "blocklist_add",
        Op::BlocklistRm => "blocklist_rm",
        Op::BlocklistLs => "blocklist_ls",
        Op::BlocklistProbe => "blocklist_probe",
        Op::ObjectWrite | Op::ObjectRead | Op::ObjectList | Op::ObjectLock => "ledger",
        Op::WaitForLatestOsdmap => "wait_for_latest_osdmap",
        Op::OsdmapEpoch | Op::MonCommand => "osdmap_epoch",
        Op::GetAddrs => "getaddrs",
    }
}
