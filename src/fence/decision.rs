//! The fence decision: pure, exhaustive, no I/O.
//!
//! # Expected flow
//! [`next_step`] looks at what has been observed so far and yields the next step:
//! gather evidence → blocklist the failed host → kill its qemu over SSH → decide. The driver
//! runs the step, records what it saw in [`Observed`], and asks again. Each step is
//! idempotent (blocklisting twice, or killing a process that is gone, changes nothing), so
//! a step repeated after a crash is harmless.
//!
//! # Guarantees (the contract's safety rules)
//! 1. `Approve` only when the blocklist is confirmed in the osdmap, or the VM's qemu was
//!    positively confirmed gone over an SSH session whose host key was verified. Every other
//!    combination is `Deny` (fail closed).
//! 2. The blocklist step always comes before the kill step, so SSH can only change the
//!    outcome label, never safety. SSH unreachable alone never approves.
//! 3. Empty evidence (no watchers, no lock owners) is not proof of anything: the fence
//!    proceeds exactly as with evidence from the failed host.
//! 4. A watcher or lock owner whose address is not one of the failed host's is
//!    `Deny(ActiveElsewhere)` before anything is touched.
//! 5. A dry run gathers evidence only and always ends in `Deny(DryRun)`, listing what it
//!    would have done.
//!
//! # Assumptions
//! The inventory's `storage_addrs` are the addresses the host's Ceph clients use (checked at
//! load time to belong to one host each). The kill observation's `Gone` is only produced by
//! the SSH step after host-key verification and a re-check on the failed host.
//!
//! # Failure modes
//! Any failure to gather evidence denies (`image-not-found`, `ceph-unavailable`,
//! `evidence-invalid`); a blocklist failure denies unless the kill is confirmed; an
//! unconfirmed kill without a blocklist denies (`kill-unconfirmed`).

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;

use super::inventory::Host;
use crate::rbd::{BlocklistEntry, EntityAddr, ImageSpec, LockOwner, Watcher};

/// What Ceph said about one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeEvidence {
    pub image: ImageSpec,
    pub watchers: Vec<Watcher>,
    pub lock_owners: Vec<LockOwner>,
}

/// Why the evidence could not be gathered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvidenceFailure {
    /// A volume's pool or image does not exist.
    ImageNotFound(String),
    /// Ceph did not answer (timeout, connection) or refused (permissions).
    CephUnavailable(String),
}

/// The storage fence as it was confirmed: the entries are in the osdmap of this epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlocklistConfirmed {
    pub entries: Vec<BlocklistEntry>,
    pub osdmap_epoch: u64,
}

/// How the VM's qemu on the failed host ended up, as the kill step saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillResult {
    /// Found, killed, and re-checked gone (or a zombie) over a verified session.
    Killed,
    /// Not running on the failed host, seen over a verified session.
    NotRunning,
    /// Reached the host over a verified session, but the process was not confirmed gone.
    Unconfirmed,
    /// No verified session to the failed host (unreachable, timeout, unknown or changed host
    /// key, auth failure): nothing is known about the process.
    Unreachable,
}

/// What the kill step reports, for the decision and the evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillObservation {
    pub result: KillResult,
    /// The host the kill ran through (a sibling), or `None` for a direct session.
    pub executor: Option<String>,
    pub role: ExecutorRole,
    pub qemu_found: bool,
    pub killed: bool,
    /// What went wrong, for the message; empty when nothing did.
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExecutorRole {
    /// Another host of the failed host's cluster, used as an SSH jump host.
    Sibling,
    /// The HA target host, used as the jump host because no other sibling was usable.
    Target,
    /// rbdfence itself, straight to the failed host.
    Direct,
    /// No route was tried (dry run, or no time left).
    None,
}

/// Everything observed so far in one fence. `None` = that step has not run yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub evidence: Option<Result<Vec<VolumeEvidence>, EvidenceFailure>>,
    pub blocklist: Option<Result<BlocklistConfirmed, String>>,
    pub kill: Option<KillObservation>,
}

/// The fixed facts of one fence request.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    /// The failed host, `None` when the inventory does not know it.
    pub failed: Option<&'a Host>,
    /// Whether the target host is known to the inventory.
    pub target_known: bool,
    /// This service's own Ceph client addresses: never to be fenced.
    pub own_addrs: &'a [EntityAddr],
    pub dry_run: bool,
}

/// The next thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    GatherEvidence,
    Blocklist(Vec<BlocklistEntry>),
    Kill,
    Decide(Verdict),
}

/// Why a fence was approved; each maps to one of the four outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApproveReason {
    /// qemu found, killed, confirmed gone.
    Killed,
    /// qemu not running on the failed host.
    AlreadyDead,
    /// SSH failed; the blocklist is confirmed.
    SshUnreachable,
    /// SSH reached the host but the kill was not confirmed; the blocklist is confirmed.
    StorageFenced,
}

/// Why a fence was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DenyReason {
    ActiveElsewhere,
    BlocklistFailed,
    KillUnconfirmed,
    UnknownHost,
    ImageNotFound,
    CephUnavailable,
    EvidenceInvalid,
    SelfFence,
    DryRun,
    LedgerFailed,
    /// The fence itself failed unexpectedly (a bug): never an approval.
    InternalError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    SuccessKilled,
    SuccessAlreadyDead,
    SuccessSshUnreachable,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    Approve(ApproveReason),
    Deny(DenyReason),
}

/// A decision with its human explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    pub message: String,
}

impl ApproveReason {
    pub const ALL: [ApproveReason; 4] = [
        ApproveReason::Killed,
        ApproveReason::AlreadyDead,
        ApproveReason::SshUnreachable,
        ApproveReason::StorageFenced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ApproveReason::Killed => "killed",
            ApproveReason::AlreadyDead => "already-dead",
            ApproveReason::SshUnreachable => "ssh-unreachable",
            ApproveReason::StorageFenced => "storage-fenced",
        }
    }
}

impl DenyReason {
    pub const ALL: [DenyReason; 11] = [
        DenyReason::ActiveElsewhere,
        DenyReason::BlocklistFailed,
        DenyReason::KillUnconfirmed,
        DenyReason::UnknownHost,
        DenyReason::ImageNotFound,
        DenyReason::CephUnavailable,
        DenyReason::EvidenceInvalid,
        DenyReason::SelfFence,
        DenyReason::DryRun,
        DenyReason::LedgerFailed,
        DenyReason::InternalError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::ActiveElsewhere => "active-elsewhere",
            DenyReason::BlocklistFailed => "blocklist-failed",
            DenyReason::KillUnconfirmed => "kill-unconfirmed",
            DenyReason::UnknownHost => "unknown-host",
            DenyReason::ImageNotFound => "image-not-found",
            DenyReason::CephUnavailable => "ceph-unavailable",
            DenyReason::EvidenceInvalid => "evidence-invalid",
            DenyReason::SelfFence => "self-fence",
            DenyReason::DryRun => "dry-run",
            DenyReason::LedgerFailed => "ledger-failed",
            DenyReason::InternalError => "internal-error",
        }
    }
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::SuccessKilled,
        Outcome::SuccessAlreadyDead,
        Outcome::SuccessSshUnreachable,
        Outcome::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::SuccessKilled => "success-killed",
            Outcome::SuccessAlreadyDead => "success-already-dead",
            Outcome::SuccessSshUnreachable => "success-ssh-unreachable",
            Outcome::Failed => "failed",
        }
    }
}

impl Decision {
    pub fn is_approve(self) -> bool {
        matches!(self, Decision::Approve(_))
    }

    pub fn as_str(self) -> &'static str {
        if self.is_approve() { "approve" } else { "deny" }
    }

    /// One of the four outcomes of the original ZStack design; every deny is `failed`.
    pub fn outcome(self) -> Outcome {
        match self {
            Decision::Approve(ApproveReason::Killed) => Outcome::SuccessKilled,
            Decision::Approve(ApproveReason::AlreadyDead) => Outcome::SuccessAlreadyDead,
            Decision::Approve(ApproveReason::SshUnreachable | ApproveReason::StorageFenced) => {
                Outcome::SuccessSshUnreachable
            }
            Decision::Deny(_) => Outcome::Failed,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Decision::Approve(r) => r.as_str(),
            Decision::Deny(r) => r.as_str(),
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.as_str(), self.reason())
    }
}

fn deny(reason: DenyReason, message: impl Into<String>) -> Step {
    Step::Decide(Verdict {
        decision: Decision::Deny(reason),
        message: message.into(),
    })
}

fn approve(reason: ApproveReason, message: impl Into<String>) -> Step {
    Step::Decide(Verdict {
        decision: Decision::Approve(reason),
        message: message.into(),
    })
}

/// The one place that decides. See the module docs for the rules it implements.
pub fn next_step(ctx: &Context<'_>, obs: &Observed) -> Step {
    let Some(failed) = ctx.failed else {
        return deny(
            DenyReason::UnknownHost,
            "the failed host is not in the inventory",
        );
    };
    if !ctx.target_known {
        return deny(
            DenyReason::UnknownHost,
            "the target host is not in the inventory",
        );
    }
    let volumes = match &obs.evidence {
        None => return Step::GatherEvidence,
        Some(Err(EvidenceFailure::ImageNotFound(m))) => {
            return deny(DenyReason::ImageNotFound, m.clone());
        }
        Some(Err(EvidenceFailure::CephUnavailable(m))) => {
            return deny(DenyReason::CephUnavailable, m.clone());
        }
        Some(Ok(v)) => v,
    };
    let entries = match plan_blocklist(failed, volumes) {
        Ok(e) => e,
        Err(step) => return step,
    };
    if let Some(own) = ctx
        .own_addrs
        .iter()
        .find(|a| entries.iter().any(|e| e.fences(a)))
    {
        return deny(
            DenyReason::SelfFence,
            format!(
                "fencing host {} would blocklist this service's own Ceph client {own}",
                failed.uuid
            ),
        );
    }
    if ctx.dry_run {
        let list: Vec<String> = entries.iter().map(ToString::to_string).collect();
        return deny(
            DenyReason::DryRun,
            format!(
                "dry run: would blocklist {} and kill the VM's qemu on host {} through a sibling; nothing was done",
                list.join(", "),
                failed.uuid
            ),
        );
    }
    let blocklist = match &obs.blocklist {
        None => return Step::Blocklist(entries),
        Some(b) => b,
    };
    let Some(kill) = &obs.kill else {
        return Step::Kill;
    };
    decide(failed, blocklist, kill)
}

/// Rule 4 and the storage fence's entries: every address seen must be the failed host's;
/// then fence each of its storage IPs whole, plus every exact client address seen.
fn plan_blocklist(failed: &Host, volumes: &[VolumeEvidence]) -> Result<Vec<BlocklistEntry>, Step> {
    let mut entries = BTreeSet::new();
    for ip in &failed.storage_addrs {
        entries.insert(BlocklistEntry::Addr(EntityAddr::whole_ip(*ip)));
    }
    for v in volumes {
        let seen = v
            .watchers
            .iter()
            .map(|w| ("watcher", w.address.as_str()))
            .chain(
                v.lock_owners
                    .iter()
                    .map(|o| ("lock owner", o.address.as_str())),
            );
        for (what, address) in seen {
            let addr: EntityAddr = match address.parse() {
                Ok(a) => a,
                Err(e) => {
                    return Err(deny(
                        DenyReason::EvidenceInvalid,
                        format!(
                            "{}: {what} address cannot be read ({e}); not fencing blindly",
                            v.image
                        ),
                    ));
                }
            };
            if !failed.owns(addr.ip) {
                return Err(deny(
                    DenyReason::ActiveElsewhere,
                    format!(
                        "{}: {what} {address} is not on failed host {}; the VM may be running elsewhere; nothing was touched",
                        v.image, failed.uuid
                    ),
                ));
            }
            entries.insert(BlocklistEntry::Addr(addr));
        }
    }
    Ok(entries.into_iter().collect())
}

/// After the blocklist and the kill have both been tried.
fn decide(
    failed: &Host,
    blocklist: &Result<BlocklistConfirmed, String>,
    kill: &KillObservation,
) -> Step {
    let host = &failed.uuid;
    let detail = if kill.detail.is_empty() {
        String::new()
    } else {
        format!(" ({})", kill.detail)
    };
    match (blocklist, kill.result) {
        (_, KillResult::Killed) => approve(
            ApproveReason::Killed,
            match blocklist {
                Ok(b) => format!(
                    "qemu killed on {host} and confirmed gone; storage fenced at osdmap epoch {}",
                    b.osdmap_epoch
                ),
                Err(e) => {
                    format!("qemu killed on {host} and confirmed gone; the blocklist failed: {e}")
                }
            },
        ),
        (_, KillResult::NotRunning) => approve(
            ApproveReason::AlreadyDead,
            match blocklist {
                Ok(b) => format!(
                    "no qemu of the VM runs on {host}; storage fenced at osdmap epoch {}",
                    b.osdmap_epoch
                ),
                Err(e) => format!("no qemu of the VM runs on {host}; the blocklist failed: {e}"),
            },
        ),
        (Ok(b), KillResult::Unreachable) => approve(
            ApproveReason::SshUnreachable,
            format!(
                "{host} not reachable over SSH{detail}; storage fenced at osdmap epoch {}",
                b.osdmap_epoch
            ),
        ),
        (Ok(b), KillResult::Unconfirmed) => approve(
            ApproveReason::StorageFenced,
            format!(
                "qemu on {host} not confirmed gone{detail}; storage fenced at osdmap epoch {}",
                b.osdmap_epoch
            ),
        ),
        (Err(e), KillResult::Unreachable) => deny(
            DenyReason::BlocklistFailed,
            format!(
                "blocklist failed: {e}; and {host} not reachable over SSH{detail}: the VM may still write"
            ),
        ),
        (Err(e), KillResult::Unconfirmed) => deny(
            DenyReason::KillUnconfirmed,
            format!("qemu on {host} not confirmed gone{detail}; and the blocklist failed: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rbd::LockMode;

    fn host() -> Host {
        Host {
            uuid: "h1".into(),
            cluster: "c1".into(),
            storage_addrs: vec!["127.0.0.2".parse().unwrap_or_else(|_| unreachable!())],
            ssh: "127.0.0.2:22".parse().unwrap_or_else(|_| unreachable!()),
        }
    }

    fn vol(watchers: &[&str], owners: &[&str]) -> VolumeEvidence {
        VolumeEvidence {
            image: "rbd/vm-root".parse().unwrap_or_else(|_| unreachable!()),
            watchers: watchers
                .iter()
                .map(|a| Watcher {
                    address: a.to_string(),
                    client: 4100,
                    cookie: 1,
                })
                .collect(),
            lock_owners: owners
                .iter()
                .map(|a| LockOwner {
                    mode: LockMode::Exclusive,
                    address: a.to_string(),
                })
                .collect(),
        }
    }

    fn kill(result: KillResult) -> KillObservation {
        KillObservation {
            result,
            executor: Some("h3".into()),
            role: ExecutorRole::Sibling,
            qemu_found: matches!(result, KillResult::Killed | KillResult::Unconfirmed),
            killed: matches!(result, KillResult::Killed),
            detail: String::new(),
        }
    }

    fn confirmed() -> Option<Result<BlocklistConfirmed, String>> {
        Some(Ok(BlocklistConfirmed {
            entries: vec![],
            osdmap_epoch: 42,
        }))
    }

    fn failed_bl() -> Option<Result<BlocklistConfirmed, String>> {
        Some(Err("blocklist add 127.0.0.2:0/0 failed: ETIMEDOUT".into()))
    }

    fn ctx(h: &Host) -> Context<'_> {
        Context {
            failed: Some(h),
            target_known: true,
            own_addrs: &[],
            dry_run: false,
        }
    }

    fn decision(step: Step) -> Decision {
        match step {
            Step::Decide(v) => v.decision,
            other => panic!("expected a decision, got {other:?}"),
        }
    }

    #[test]
    fn steps_run_in_order_evidence_blocklist_kill() {
        let h = host();
        let mut obs = Observed::default();
        assert_eq!(next_step(&ctx(&h), &obs), Step::GatherEvidence);
        obs.evidence = Some(Ok(vec![vol(&["127.0.0.2:0/77"], &["127.0.0.2:0/77"])]));
        let Step::Blocklist(entries) = next_step(&ctx(&h), &obs) else {
            panic!("expected Blocklist")
        };
        let entries: Vec<String> = entries.iter().map(ToString::to_string).collect();
        assert_eq!(entries, vec!["127.0.0.2:0/0", "127.0.0.2:0/77"]);
        obs.blocklist = confirmed();
        assert_eq!(
            next_step(&ctx(&h), &obs),
            Step::Kill,
            "storage first, then SSH"
        );
        obs.kill = Some(kill(KillResult::Killed));
        assert_eq!(
            decision(next_step(&ctx(&h), &obs)),
            Decision::Approve(ApproveReason::Killed)
        );
    }

    /// Every row of the safety rules, as (evidence, blocklist, kill) → decision.
    #[test]
    fn safety_rules_table() {
        use ApproveReason as A;
        use DenyReason as D;
        use KillResult as K;
        let h = host();
        let own = vol(&["127.0.0.2:0/1"], &["127.0.0.2:0/1"]);
        let empty = vol(&[], &[]);
        let stale_owner = vol(&[], &["127.0.0.2:0/1"]);
        type Row = (
            &'static str,
            VolumeEvidence,
            Option<Result<BlocklistConfirmed, String>>,
            KillResult,
            Decision,
        );
        let rows: Vec<Row> = vec![
            (
                "killed with blocklist",
                own.clone(),
                confirmed(),
                K::Killed,
                Decision::Approve(A::Killed),
            ),
            (
                "already dead",
                own.clone(),
                confirmed(),
                K::NotRunning,
                Decision::Approve(A::AlreadyDead),
            ),
            (
                "ssh unreachable, blocklist confirmed",
                own.clone(),
                confirmed(),
                K::Unreachable,
                Decision::Approve(A::SshUnreachable),
            ),
            (
                "kill unconfirmed, blocklist confirmed",
                own.clone(),
                confirmed(),
                K::Unconfirmed,
                Decision::Approve(A::StorageFenced),
            ),
            // The ZStack flaw: an SSH timeout is not proof of death.
            (
                "ssh timeout without blocklist",
                own.clone(),
                failed_bl(),
                K::Unreachable,
                Decision::Deny(D::BlocklistFailed),
            ),
            (
                "blocklist failed but kill confirmed",
                own.clone(),
                failed_bl(),
                K::Killed,
                Decision::Approve(A::Killed),
            ),
            (
                "blocklist failed, already dead",
                own.clone(),
                failed_bl(),
                K::NotRunning,
                Decision::Approve(A::AlreadyDead),
            ),
            (
                "qemu found, death unconfirmed, no blocklist",
                own.clone(),
                failed_bl(),
                K::Unconfirmed,
                Decision::Deny(D::KillUnconfirmed),
            ),
            // Empty evidence is unknown, not safe: the fence still runs and needs its proof.
            (
                "empty evidence, ssh unreachable, no blocklist",
                empty.clone(),
                failed_bl(),
                K::Unreachable,
                Decision::Deny(D::BlocklistFailed),
            ),
            (
                "empty evidence, fenced and killed",
                empty,
                confirmed(),
                K::Killed,
                Decision::Approve(A::Killed),
            ),
            (
                "stale lock owner, watch expired",
                stale_owner.clone(),
                confirmed(),
                K::Killed,
                Decision::Approve(A::Killed),
            ),
            (
                "stale lock owner, no proof",
                stale_owner,
                failed_bl(),
                K::Unreachable,
                Decision::Deny(D::BlocklistFailed),
            ),
        ];
        for (name, v, bl, k, want) in rows {
            let obs = Observed {
                evidence: Some(Ok(vec![v])),
                blocklist: bl,
                kill: Some(kill(k)),
            };
            let got = decision(next_step(&ctx(&h), &obs));
            assert_eq!(got, want, "{name}");
            if matches!(got, Decision::Deny(_)) {
                assert_eq!(
                    got.outcome(),
                    Outcome::Failed,
                    "{name}: every deny is failed"
                );
            }
        }
    }

    #[test]
    fn never_approves_without_a_confirmed_blocklist_or_a_confirmed_kill() {
        // Exhaustive over the observable combinations after both steps.
        let h = host();
        for bl in [confirmed(), failed_bl()] {
            for k in [
                KillResult::Killed,
                KillResult::NotRunning,
                KillResult::Unconfirmed,
                KillResult::Unreachable,
            ] {
                let obs = Observed {
                    evidence: Some(Ok(vec![vol(&[], &[])])),
                    blocklist: bl.clone(),
                    kill: Some(kill(k)),
                };
                let d = decision(next_step(&ctx(&h), &obs));
                let proof = matches!(bl, Some(Ok(_)))
                    || matches!(k, KillResult::Killed | KillResult::NotRunning);
                assert_eq!(d.is_approve(), proof, "{bl:?} {k:?} → {d}");
            }
        }
    }

    #[test]
    fn a_foreign_watcher_or_owner_denies_before_touching_anything() {
        let h = host();
        for v in [
            vol(&["127.0.0.3:0/9"], &[]),                // the target host's watcher
            vol(&["127.0.0.2:0/1"], &["127.0.0.9:0/5"]), // a third host owns the lock
            vol(&[], &["127.0.0.3:0/9"]),                // stale owner from elsewhere
        ] {
            let obs = Observed {
                evidence: Some(Ok(vec![vol(&["127.0.0.2:0/1"], &[]), v])),
                ..Default::default()
            };
            let step = next_step(&ctx(&h), &obs);
            assert_eq!(
                decision(step.clone()),
                Decision::Deny(DenyReason::ActiveElsewhere)
            );
            let Step::Decide(verdict) = step else {
                unreachable!()
            };
            assert!(
                verdict.message.contains("nothing was touched"),
                "{}",
                verdict.message
            );
        }
    }

    #[test]
    fn evidence_failures_deny() {
        let h = host();
        let cases = [
            (
                EvidenceFailure::ImageNotFound("rbd/x: ENOENT".into()),
                DenyReason::ImageNotFound,
            ),
            (
                EvidenceFailure::CephUnavailable("ETIMEDOUT".into()),
                DenyReason::CephUnavailable,
            ),
        ];
        for (f, want) in cases {
            let obs = Observed {
                evidence: Some(Err(f)),
                ..Default::default()
            };
            assert_eq!(decision(next_step(&ctx(&h), &obs)), Decision::Deny(want));
        }
        let obs = Observed {
            evidence: Some(Ok(vec![vol(&["garbage"], &[])])),
            ..Default::default()
        };
        assert_eq!(
            decision(next_step(&ctx(&h), &obs)),
            Decision::Deny(DenyReason::EvidenceInvalid)
        );
    }

    #[test]
    fn unknown_hosts_deny_first() {
        let h = host();
        let obs = Observed::default();
        let c = Context {
            failed: None,
            ..ctx(&h)
        };
        assert_eq!(
            decision(next_step(&c, &obs)),
            Decision::Deny(DenyReason::UnknownHost)
        );
        let c = Context {
            target_known: false,
            ..ctx(&h)
        };
        assert_eq!(
            decision(next_step(&c, &obs)),
            Decision::Deny(DenyReason::UnknownHost)
        );
    }

    #[test]
    fn dry_run_gathers_evidence_then_denies_with_the_plan() {
        let h = host();
        let c = Context {
            dry_run: true,
            ..ctx(&h)
        };
        assert_eq!(next_step(&c, &Observed::default()), Step::GatherEvidence);
        let obs = Observed {
            evidence: Some(Ok(vec![vol(&["127.0.0.2:0/1"], &[])])),
            ..Default::default()
        };
        let Step::Decide(v) = next_step(&c, &obs) else {
            panic!("dry run must decide after evidence")
        };
        assert_eq!(v.decision, Decision::Deny(DenyReason::DryRun));
        assert!(
            v.message.contains("127.0.0.2:0/0") && v.message.contains("nothing was done"),
            "{}",
            v.message
        );
        // A dry run still refuses a foreign watcher.
        let obs = Observed {
            evidence: Some(Ok(vec![vol(&["127.0.0.3:0/1"], &[])])),
            ..Default::default()
        };
        assert_eq!(
            decision(next_step(&c, &obs)),
            Decision::Deny(DenyReason::ActiveElsewhere)
        );
    }

    #[test]
    fn never_fences_this_service_itself() {
        let h = host();
        let own: Vec<EntityAddr> =
            vec!["127.0.0.2:0/555".parse().unwrap_or_else(|_| unreachable!())];
        let c = Context {
            own_addrs: &own,
            ..ctx(&h)
        };
        let obs = Observed {
            evidence: Some(Ok(vec![vol(&[], &[])])),
            ..Default::default()
        };
        assert_eq!(
            decision(next_step(&c, &obs)),
            Decision::Deny(DenyReason::SelfFence)
        );
    }

    #[test]
    fn outcomes_and_labels() {
        assert_eq!(
            Decision::Approve(ApproveReason::StorageFenced).outcome(),
            Outcome::SuccessSshUnreachable
        );
        for r in DenyReason::ALL {
            assert_eq!(Decision::Deny(r).outcome(), Outcome::Failed);
            assert_eq!(
                serde_json::to_value(r).ok(),
                Some(serde_json::Value::from(r.as_str()))
            );
        }
        for r in ApproveReason::ALL {
            assert_eq!(
                serde_json::to_value(r).ok(),
                Some(serde_json::Value::from(r.as_str()))
            );
        }
        for o in Outcome::ALL {
            assert_eq!(
                serde_json::to_value(o).ok(),
                Some(serde_json::Value::from(o.as_str()))
            );
        }
    }
}
