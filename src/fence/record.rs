//! The reply to a fence request and the record kept of it (the ledger entry).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::decision::{ExecutorRole, Scope, VolumeEvidence};

/// The body of the pre-instantiate reply, as the contract gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceReply {
    pub fence_id: String,
    /// `approve` or `deny`.
    pub decision: String,
    /// `success-killed`, `success-already-dead`, `success-ssh-unreachable` or `failed`.
    pub outcome: String,
    /// Machine-readable: `killed`, `active-elsewhere`, `blocklist-failed`, …
    pub reason: String,
    pub message: String,
    pub evidence: EvidenceReport,
    pub duration_ms: u64,
}

impl FenceReply {
    pub fn approved(&self) -> bool {
        self.decision == "approve"
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EvidenceReport {
    pub volumes: Vec<VolumeReport>,
    /// The request named no volume (the ZStack endpoint allows it): there was no Ceph
    /// evidence, so no VM fence and no check that the VM runs elsewhere.
    #[serde(skip_serializing_if = "is_false", default)]
    pub without_volumes: bool,
    /// Absent when the blocklist step did not run.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub blocklist: Option<BlocklistReport>,
    /// Absent when the kill step did not run.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kill: Option<KillReportJson>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeReport {
    pub image: String,
    pub watchers: Vec<crate::rbd::Watcher>,
    pub lock_owners: Vec<crate::rbd::LockOwner>,
}

impl From<&VolumeEvidence> for VolumeReport {
    fn from(v: &VolumeEvidence) -> Self {
        VolumeReport {
            image: v.image.to_string(),
            watchers: v.watchers.clone(),
            lock_owners: v.lock_owners.clone(),
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlocklistReport {
    /// `vm` (the VM's own clients), `host` (every client of the failed host) or `none`.
    pub scope: Scope,
    /// The entries the fence rests on; when it failed, the entries it tried.
    pub entries: Vec<String>,
    /// When each entry the fence rests on lapses (it lasts the configured expiry, less 10 %).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub expires: Vec<EntryExpiry>,
    /// The osdmap epoch in which they were confirmed; absent when the step failed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub osdmap_epoch: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryExpiry {
    pub entry: String,
    /// RFC 3339, UTC.
    pub until: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillReportJson {
    /// The host the kill ran through; `null` for a direct session from rbdfence.
    pub executor: Option<String>,
    pub role: ExecutorRole,
    pub ssh_reachable: bool,
    pub qemu_found: bool,
    pub killed: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

/// What the ledger keeps: the request, the reply, and the stage timings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub request_id: Option<String>,
    pub vm_uuid: String,
    pub failed_host: String,
    pub target_host: String,
    pub volumes: Vec<String>,
    pub dry_run: bool,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// Milliseconds spent per stage (`evidence`, `blocklist`, `osdmap`, `ssh`).
    pub stages_ms: BTreeMap<String, u64>,
    /// Entries the lifecycle added later to keep this fence in force (Ceph does not extend an
    /// entry; a distinct covering one that lasts is made before the old one would lapse).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub renewed: Vec<EntryExpiry>,
    /// A deny's entries whose storage fence failed (an approval turned deny by a ledger
    /// failure: all its entries). An add whose confirmation timed out can still commit
    /// afterwards; nothing rests on such an entry, and the VM was not restarted elsewhere, so
    /// the service takes each back — unless a fence in force relies on it, or its expiry says
    /// it was there before the fence.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub take_back: Vec<String>,
    /// When the lifecycle proved this fence's VM gone (RFC 3339), for a fence approved
    /// without that proof. A fence proven when it was made was proven at its end.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gone_at: Option<String>,
    #[serde(flatten)]
    pub reply: FenceReply,
}

/// An unfence of a host, as the ledger keeps it: which of its fences it ended, which entries
/// it lifted (only ever entries those fences made), and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnfenceRecord {
    pub unfence_id: String,
    pub host: String,
    /// RFC 3339, UTC.
    pub at: String,
    /// `api` (the VMs were confirmed gone), `forced` (the operator skipped that proof) or
    /// `auto` (the lifecycle proved the VMs gone).
    pub trigger: String,
    /// The fences it ended.
    pub fences: Vec<String>,
    /// The blocklist entries it removed.
    pub lifted: Vec<String>,
}

/// Whether a fence is still in force, as the ledger tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceState {
    /// An approval whose entries are still meant to fence (not lifted, not lapsed).
    pub in_force: bool,
    /// The unfence that ended it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub unfence_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lifted_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub trigger: Option<String>,
}

/// A fence record with its state, as `GET /v1/fences` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FenceView {
    #[serde(flatten)]
    pub record: FenceRecord,
    pub state: FenceState,
}

fn rfc3339(s: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

impl FenceRecord {
    /// Whether this approval rests on the blocklist alone: its VM was never seen gone.
    /// Since when its VM is known gone: the lifecycle's proof, or the fence's own end when
    /// it proved it; `None` while it is not known.
    pub fn gone_since(&self) -> Option<time::OffsetDateTime> {
        let parse = |t: &str| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        };
        if let Some(at) = &self.gone_at {
            return parse(at);
        }
        if self.unproven() {
            return None;
        }
        let ms = i64::try_from(self.reply.duration_ms).unwrap_or(i64::MAX);
        parse(&self.started_at).map(|t| t + time::Duration::milliseconds(ms))
    }

    pub fn unproven(&self) -> bool {
        self.reply.approved()
            && matches!(
                self.reply.reason.as_str(),
                "ssh-unreachable" | "storage-fenced"
            )
    }

    /// The entries this fence made and rests on, with those the lifecycle added (none for a
    /// deny or a dry run).
    pub fn entries(&self) -> Vec<String> {
        let mut out = match &self.reply.evidence.blocklist {
            Some(b) if self.reply.approved() && !self.dry_run => b.entries.clone(),
            _ => Vec::new(),
        };
        for r in &self.renewed {
            if !out.contains(&r.entry) {
                out.push(r.entry.clone());
            }
        }
        out
    }

    /// When the last of its entries lapses (`None`: none is recorded with an expiry).
    pub fn lasts_until(&self) -> Option<time::OffsetDateTime> {
        self.reply
            .evidence
            .blocklist
            .iter()
            .flat_map(|b| b.expires.iter())
            .chain(self.renewed.iter())
            .filter_map(|e| rfc3339(&e.until))
            .max()
    }

    fn lapsed(&self, now: time::OffsetDateTime) -> bool {
        self.lasts_until().is_some_and(|u| u <= now)
    }

    /// Its state, given the unfences of its host.
    pub fn state(&self, unfences: &[UnfenceRecord]) -> FenceState {
        let ended = unfences
            .iter()
            .find(|u| u.host == self.failed_host && u.fences.contains(&self.reply.fence_id));
        match ended {
            Some(u) => FenceState {
                in_force: false,
                unfence_id: Some(u.unfence_id.clone()),
                lifted_at: Some(u.at.clone()),
                trigger: Some(u.trigger.clone()),
            },
            None => FenceState {
                in_force: !self.entries().is_empty()
                    && !self.lapsed(time::OffsetDateTime::now_utc()),
                unfence_id: None,
                lifted_at: None,
                trigger: None,
            },
        }
    }
}
