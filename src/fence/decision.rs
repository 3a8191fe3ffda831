//! The fence decision: pure, exhaustive, no I/O.
//!
//! # Expected flow
//! [`next_step`] looks at what has been observed so far and yields the next step; the driver
//! runs it, records what it saw in [`Observed`], and asks again. Each step is idempotent
//! (blocklisting twice, or killing a process that is gone, changes nothing), so a step repeated
//! after a crash is harmless. The order gives the least collateral (CONTRACT.md, rules 1–4):
//!
//! 1. Gather the evidence: watchers and exclusive-lock owners of every volume. Every client
//!    must be on the failed host: another inventory host's is `active-elsewhere`, a client of
//!    no inventory host is `unknown-client`; nothing is touched then.
//! 2. **Evidence complete** (every volume names at least one client): fence exactly those
//!    clients (scope `vm`), then kill the VM's qemu over SSH for the outcome; approve by (a).
//! 3. **Otherwise the scan decides first**: a trustworthy "gone" (killed and re-checked, or not
//!    running, and no live watcher contradicting it) approves by (c), with the exact clients
//!    seen fenced (scope `vm`), or nothing to fence (scope `none`). A host that answered and
//!    confirmed the VM gone is never fenced whole for it.
//! 4. **Anything short of that** (unreachable, not confirmed gone, the VM fence not to be had):
//!    fence every storage address of the failed host (scope `host`); approve by (b).
//!
//! # Guarantees (the contract's safety rules)
//! 1. `Approve` only by (a), (b) or (c); a blocklist entry counts only when the storage step
//!    confirmed it in the osdmap with an expiry that lasts ([`BlocklistConfirmed`]).
//! 2. Empty evidence is unknown, not safe: a volume with no client makes (a) impossible.
//! 3. A dry run gathers evidence only and always ends in `Deny(DryRun)`, with its plan.
//!
//! # Assumptions
//! The inventory's `storage_addrs` are the addresses the host's Ceph clients use (checked at
//! load time to belong to one host each). [`KillResult::Killed`] and [`KillResult::NotRunning`]
//! are only produced from a scan that saw the host's initial PID namespace over a session whose
//! host key was verified.
//!
//! # Failure modes
//! Any failure to gather evidence denies (`image-not-found`, `ceph-unavailable`,
//! `evidence-invalid`); a storage fence that could not be had denies unless another proof holds
//! (`blocklist-failed`, `blocklist-expiring`, `kill-unconfirmed`).

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::inventory::{Host, Inventory};
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

/// How wide a storage fence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// The exact client addresses the evidence named: nothing else on the host is touched.
    Vm,
    /// Every client of the failed host's storage addresses.
    Host,
    /// Nothing was fenced: the scan proved the VM gone and no client was seen.
    None,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Vm, Scope::Host, Scope::None];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Vm => "vm",
            Scope::Host => "host",
            Scope::None => "none",
        }
    }
}

/// One blocklist entry as confirmed: listed in the osdmap the service waited for, until then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastingEntry {
    pub entry: BlocklistEntry,
    pub until: OffsetDateTime,
}

/// A storage fence as it was confirmed: every entry is in the osdmap of this epoch and lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlocklistConfirmed {
    pub entries: Vec<LastingEntry>,
    pub osdmap_epoch: u64,
}

/// Why a storage fence could not be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlocklistFailure {
    /// Ceph refused, or the entries were not seen in the osdmap in time.
    Failed(String),
    /// The monitors did not answer an add in time: it may still commit later. The fence is
    /// then never widened to the host (the same monitors would take the host's entry just as
    /// late, and a late host-wide entry would cut every VM of the host off its storage under
    /// a deny); what was sent is taken back.
    Unanswered(String),
    /// The entries are listed, but one lapses too soon and no entry that lasts could be made
    /// (Ceph does not extend an entry that is added again).
    Expiring(String),
}

impl fmt::Display for BlocklistFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlocklistFailure::Failed(m)
            | BlocklistFailure::Unanswered(m)
            | BlocklistFailure::Expiring(m) => f.write_str(m),
        }
    }
}

impl BlocklistFailure {
    fn deny_reason(&self) -> DenyReason {
        match self {
            BlocklistFailure::Failed(_) | BlocklistFailure::Unanswered(_) => {
                DenyReason::BlocklistFailed
            }
            BlocklistFailure::Expiring(_) => DenyReason::BlocklistExpiring,
        }
    }
}

pub type FenceResult = Result<BlocklistConfirmed, BlocklistFailure>;

/// How the VM's qemu on the failed host ended up, as the kill step saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillResult {
    /// Found by its uuid, killed, and re-checked gone (or a zombie) by a trustworthy scan.
    Killed,
    /// Not running on the failed host, as a trustworthy scan saw it.
    NotRunning,
    /// Reached the host over a verified session, but the VM was not confirmed gone (alive after
    /// SIGKILL, or a scan that cannot be trusted: another PID namespace, a failed self-check).
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
    /// The fence of the VM's own clients (scope `vm`).
    pub vm_fence: Option<FenceResult>,
    /// The fence of the whole failed host (scope `host`).
    pub host_fence: Option<FenceResult>,
    pub kill: Option<KillObservation>,
}

/// The fixed facts of one fence request.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    /// The failed host, `None` when the inventory does not know it.
    pub failed: Option<&'a Host>,
    /// Whether the target host is known to the inventory.
    pub target_known: bool,
    /// Every host, to tell a client of another host from a client of no known host.
    pub inventory: &'a Inventory,
    /// This service's own Ceph client addresses: never to be fenced.
    pub own_addrs: &'a [EntityAddr],
    pub dry_run: bool,
}

/// The next thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    GatherEvidence,
    Blocklist {
        scope: Scope,
        entries: Vec<BlocklistEntry>,
    },
    Kill,
    Decide(Verdict),
}

/// Why a fence was approved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApproveReason {
    /// qemu found, killed, confirmed gone.
    Killed,
    /// qemu not running on the failed host.
    AlreadyDead,
    /// No verified session reached the failed host; the storage fence holds.
    SshUnreachable,
    /// A verified session reached the host, but the VM was not confirmed gone; the storage
    /// fence holds.
    StorageFenced,
}

/// Why a fence was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DenyReason {
    ActiveElsewhere,
    /// A client whose address belongs to no inventory host.
    UnknownClient,
    BlocklistFailed,
    /// The only entries to be had lapse too soon.
    BlocklistExpiring,
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

/// A decision with the scope of the storage fence it rests on, and its human explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// The fence the approval rests on; for a deny, the widest fence tried (`none` if none).
    pub scope: Scope,
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
    pub const ALL: [DenyReason; 13] = [
        DenyReason::ActiveElsewhere,
        DenyReason::UnknownClient,
        DenyReason::BlocklistFailed,
        DenyReason::BlocklistExpiring,
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
            DenyReason::UnknownClient => "unknown-client",
            DenyReason::BlocklistFailed => "blocklist-failed",
            DenyReason::BlocklistExpiring => "blocklist-expiring",
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

    /// One of the four outcomes of the original ZStack design. It tells the truth about the
    /// kill: `success-ssh-unreachable` only when no verified session reached the host; an
    /// approval on the storage fence whose kill was not confirmed (`storage-fenced`) is
    /// `failed`, like every deny.
    pub fn outcome(self) -> Outcome {
        match self {
            Decision::Approve(ApproveReason::Killed) => Outcome::SuccessKilled,
            Decision::Approve(ApproveReason::AlreadyDead) => Outcome::SuccessAlreadyDead,
            Decision::Approve(ApproveReason::SshUnreachable) => Outcome::SuccessSshUnreachable,
            Decision::Approve(ApproveReason::StorageFenced) | Decision::Deny(_) => Outcome::Failed,
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

fn deny(reason: DenyReason, scope: Scope, message: impl Into<String>) -> Step {
    Step::Decide(Verdict {
        decision: Decision::Deny(reason),
        scope,
        message: message.into(),
    })
}

fn approve(reason: ApproveReason, scope: Scope, message: impl Into<String>) -> Step {
    Step::Decide(Verdict {
        decision: Decision::Approve(reason),
        scope,
        message: message.into(),
    })
}

/// The clients the evidence named, all on the failed host.
#[derive(Debug, Default)]
struct Clients {
    exact: BTreeSet<EntityAddr>,
    /// Every volume named at least one client (and there was at least one volume).
    complete: bool,
    /// A watcher was seen: a client that pinged within `osd_client_watch_timeout`.
    live_watcher: bool,
}

/// The one place that decides. See the module docs for the rules it implements.
pub fn next_step(ctx: &Context<'_>, obs: &Observed) -> Step {
    let Some(failed) = ctx.failed else {
        return deny(
            DenyReason::UnknownHost,
            Scope::None,
            "the failed host is not in the inventory",
        );
    };
    if !ctx.target_known {
        return deny(
            DenyReason::UnknownHost,
            Scope::None,
            "the target host is not in the inventory",
        );
    }
    let volumes = match &obs.evidence {
        None => return Step::GatherEvidence,
        Some(Err(EvidenceFailure::ImageNotFound(m))) => {
            return deny(DenyReason::ImageNotFound, Scope::None, m.clone());
        }
        Some(Err(EvidenceFailure::CephUnavailable(m))) => {
            return deny(DenyReason::CephUnavailable, Scope::None, m.clone());
        }
        Some(Ok(v)) => v,
    };
    let clients = match classify(ctx.inventory, failed, volumes) {
        Ok(c) => c,
        Err(step) => return step,
    };
    let host = &failed.uuid;
    let vm_entries: Vec<BlocklistEntry> = clients
        .exact
        .iter()
        .copied()
        .map(BlocklistEntry::Addr)
        .collect();
    let host_entries: Vec<BlocklistEntry> = failed
        .storage_addrs
        .iter()
        .map(|ip| BlocklistEntry::Addr(EntityAddr::whole_ip(*ip)))
        .collect();
    if let Some(step) = self_fence(ctx, host, &vm_entries) {
        return step;
    }
    if ctx.dry_run {
        return deny(
            DenyReason::DryRun,
            Scope::None,
            plan(host, &clients, &vm_entries, &host_entries),
        );
    }

    // (a) The evidence names every client: fence exactly those, then kill for the outcome.
    if clients.complete {
        match &obs.vm_fence {
            None => {
                return Step::Blocklist {
                    scope: Scope::Vm,
                    entries: vm_entries,
                };
            }
            Some(Ok(c)) => {
                let Some(kill) = &obs.kill else {
                    return Step::Kill;
                };
                return approve_on_fence(host, Scope::Vm, c, kill);
            }
            // The VM fence could not be had: the scan decides, as without evidence.
            Some(Err(_)) => {}
        }
    }

    // (c) The scan decides first.
    let Some(kill) = &obs.kill else {
        return Step::Kill;
    };
    let gone = match kill.result {
        KillResult::Killed => true,
        KillResult::NotRunning => !clients.live_watcher,
        KillResult::Unconfirmed | KillResult::Unreachable => false,
    };
    if gone {
        let (reason, what) = if kill.result == KillResult::Killed {
            (ApproveReason::Killed, "qemu killed and confirmed gone")
        } else {
            (ApproveReason::AlreadyDead, "no qemu of the VM runs")
        };
        if vm_entries.is_empty() {
            return approve(
                reason,
                Scope::None,
                format!("{what} on {host}; no client of the VM was seen, so nothing was fenced"),
            );
        }
        return match &obs.vm_fence {
            None => Step::Blocklist {
                scope: Scope::Vm,
                entries: vm_entries,
            },
            Some(Ok(c)) => approve(
                reason,
                Scope::Vm,
                format!(
                    "{what} on {host}; its clients {} are fenced at osdmap epoch {}",
                    list(&vm_entries),
                    c.osdmap_epoch
                ),
            ),
            Some(Err(e)) => deny(
                e.deny_reason(),
                Scope::Vm,
                format!(
                    "{what} on {host}, so the host is not fenced whole; but the VM's clients {} could not be fenced: {e}",
                    list(&vm_entries)
                ),
            ),
        };
    }

    // Monitors that did not answer the VM's fence in time: no widening (see
    // `BlocklistFailure::Unanswered`).
    if let Some(Err(e @ BlocklistFailure::Unanswered(_))) = &obs.vm_fence {
        return deny(
            e.deny_reason(),
            Scope::Vm,
            format!(
                "the VM's clients {} could not be fenced: the monitors did not answer in time ({e}); {}; the host is not fenced whole, since a host-wide entry the same monitors commit late would cut every VM of {host} off its storage",
                list(&vm_entries),
                not_gone(host, kill, &clients)
            ),
        );
    }

    // (b) Nothing less is provably enough: fence the whole host.
    if let Some(step) = self_fence(ctx, host, &host_entries) {
        return step;
    }
    let why = not_gone(host, kill, &clients);
    let why = match &obs.vm_fence {
        Some(Err(e)) => format!("the VM's clients could not be fenced ({e}); {why}"),
        _ => why,
    };
    match &obs.host_fence {
        None => Step::Blocklist {
            scope: Scope::Host,
            entries: host_entries,
        },
        Some(Ok(c)) => {
            let reason = if kill.result == KillResult::Unreachable {
                ApproveReason::SshUnreachable
            } else {
                ApproveReason::StorageFenced
            };
            approve(
                reason,
                Scope::Host,
                format!(
                    "{why}; host {host} fenced whole ({}) at osdmap epoch {}",
                    list(&host_entries),
                    c.osdmap_epoch
                ),
            )
        }
        Some(Err(e)) => {
            let reason = match kill.result {
                KillResult::Unreachable => e.deny_reason(),
                _ => DenyReason::KillUnconfirmed,
            };
            deny(
                reason,
                Scope::Host,
                format!("{why}; and the host fence failed: {e}: the VM may still write"),
            )
        }
    }
}

/// Approval on a confirmed fence; the kill only labels the outcome.
fn approve_on_fence(
    host: &str,
    scope: Scope,
    c: &BlocklistConfirmed,
    kill: &KillObservation,
) -> Step {
    let fenced = format!(
        "{} fenced at osdmap epoch {}",
        if scope == Scope::Vm {
            "the VM's clients"
        } else {
            "the host"
        },
        c.osdmap_epoch
    );
    let detail = detail(kill);
    match kill.result {
        KillResult::Killed => approve(
            ApproveReason::Killed,
            scope,
            format!("qemu killed on {host} and confirmed gone; {fenced}"),
        ),
        KillResult::NotRunning => approve(
            ApproveReason::AlreadyDead,
            scope,
            format!("no qemu of the VM runs on {host}; {fenced}"),
        ),
        KillResult::Unreachable => approve(
            ApproveReason::SshUnreachable,
            scope,
            format!("{host} not reachable over SSH{detail}; {fenced}"),
        ),
        KillResult::Unconfirmed => approve(
            ApproveReason::StorageFenced,
            scope,
            format!("the VM on {host} was not confirmed gone{detail}; {fenced}"),
        ),
    }
}

fn detail(kill: &KillObservation) -> String {
    if kill.detail.is_empty() {
        String::new()
    } else {
        format!(" ({})", kill.detail)
    }
}

/// Why the scan does not prove the VM gone.
fn not_gone(host: &str, kill: &KillObservation, clients: &Clients) -> String {
    let detail = detail(kill);
    match kill.result {
        KillResult::Unreachable => format!("{host} not reachable over SSH{detail}"),
        KillResult::Unconfirmed => format!("the VM on {host} was not confirmed gone{detail}"),
        KillResult::NotRunning if clients.live_watcher => format!(
            "the scan on {host} found no qemu of the VM, but a live watcher from {host} contradicts it"
        ),
        KillResult::Killed | KillResult::NotRunning => format!("the VM on {host} is gone"),
    }
}

fn list(entries: &[BlocklistEntry]) -> String {
    entries
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Never fence this service's own Ceph client.
fn self_fence(ctx: &Context<'_>, host: &str, entries: &[BlocklistEntry]) -> Option<Step> {
    let own = ctx
        .own_addrs
        .iter()
        .find(|a| entries.iter().any(|e| e.fences(a)))?;
    Some(deny(
        DenyReason::SelfFence,
        Scope::None,
        format!(
            "fencing {} of host {host} would blocklist this service's own Ceph client {own}",
            list(entries)
        ),
    ))
}

fn plan(host: &str, clients: &Clients, vm: &[BlocklistEntry], whole: &[BlocklistEntry]) -> String {
    if clients.complete {
        format!(
            "dry run: would blocklist the VM's clients {} (scope vm), then kill its qemu on host {host} over SSH; nothing was done",
            list(vm)
        )
    } else {
        let seen = if vm.is_empty() {
            "nothing (scope none)".to_string()
        } else {
            format!("its clients {} (scope vm)", list(vm))
        };
        format!(
            "dry run: the evidence does not name every client, so the scan decides: would kill the VM's qemu on host {host} over SSH; if it is confirmed gone, blocklist {seen}, else the whole host {} (scope host); nothing was done",
            list(whole)
        )
    }
}

/// Rule 4 and the VM's clients: every address seen must be the failed host's.
fn classify(
    inventory: &Inventory,
    failed: &Host,
    volumes: &[VolumeEvidence],
) -> Result<Clients, Step> {
    let mut clients = Clients {
        complete: !volumes.is_empty(),
        ..Clients::default()
    };
    let mut unknown: Option<String> = None;
    for v in volumes {
        if v.watchers.is_empty() && v.lock_owners.is_empty() {
            clients.complete = false;
        }
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
                        Scope::None,
                        format!(
                            "{}: {what} address cannot be read ({e}); not fencing blindly",
                            v.image
                        ),
                    ));
                }
            };
            if failed.owns(addr.ip) {
                clients.live_watcher |= what == "watcher";
                clients.exact.insert(addr);
            } else if let Some(other) = inventory.owner(addr.ip) {
                return Err(deny(
                    DenyReason::ActiveElsewhere,
                    Scope::None,
                    format!(
                        "{}: {what} {address} is on host {}, not on failed host {}; the VM may be running there; nothing was touched",
                        v.image, other.uuid, failed.uuid
                    ),
                ));
            } else if unknown.is_none() {
                unknown = Some(format!(
                    "{}: {what} {address} belongs to no host of the inventory (is it an address of {} missing from its storage_addrs?); nothing was touched",
                    v.image, failed.uuid
                ));
            }
        }
    }
    match unknown {
        Some(m) => Err(deny(DenyReason::UnknownClient, Scope::None, m)),
        None => Ok(clients),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rbd::LockMode;

    fn host(uuid: &str, ip: &str) -> Host {
        Host {
            uuid: uuid.into(),
            cluster: "c1".into(),
            storage_addrs: vec![ip.parse().unwrap_or_else(|_| unreachable!())],
            ssh: format!("{ip}:22")
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        }
    }

    fn inventory() -> Inventory {
        Inventory::new(vec![
            host("h1", "127.0.0.2"),
            host("h2", "127.0.0.3"),
            host("h3", "127.0.0.4"),
        ])
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

    fn confirmed() -> FenceResult {
        Ok(BlocklistConfirmed {
            entries: vec![],
            osdmap_epoch: 42,
        })
    }

    fn failed_bl() -> FenceResult {
        Err(BlocklistFailure::Failed(
            "blocklist add 127.0.0.2:0/0 failed: EACCES".into(),
        ))
    }

    fn unanswered() -> FenceResult {
        Err(BlocklistFailure::Unanswered(
            "blocklist add 127.0.0.2:0/1 failed: ETIMEDOUT".into(),
        ))
    }

    fn expiring() -> FenceResult {
        Err(BlocklistFailure::Expiring(
            "127.0.0.2:0/1 lapses in 59 s".into(),
        ))
    }

    struct Fixture {
        inv: Inventory,
        h1: Host,
    }

    impl Fixture {
        fn new() -> Fixture {
            let inv = inventory();
            let h1 = inv.get("h1").cloned().unwrap_or_else(|| unreachable!());
            Fixture { inv, h1 }
        }

        fn ctx(&self) -> Context<'_> {
            Context {
                failed: Some(&self.h1),
                target_known: true,
                inventory: &self.inv,
                own_addrs: &[],
                dry_run: false,
            }
        }
    }

    /// Runs the decision like the driver: each step answered from the given results.
    fn run(
        ctx: &Context<'_>,
        evidence: Vec<VolumeEvidence>,
        vm: FenceResult,
        whole: FenceResult,
        k: KillResult,
    ) -> (Verdict, Vec<&'static str>) {
        let mut obs = Observed {
            evidence: Some(Ok(evidence)),
            ..Default::default()
        };
        let mut steps = Vec::new();
        for _ in 0..8 {
            match next_step(ctx, &obs) {
                Step::GatherEvidence => panic!("evidence was given"),
                Step::Blocklist {
                    scope: Scope::Vm, ..
                } => {
                    steps.push("vm-fence");
                    obs.vm_fence = Some(vm.clone());
                }
                Step::Blocklist {
                    scope: Scope::Host,
                    entries,
                } => {
                    let e: Vec<String> = entries.iter().map(ToString::to_string).collect();
                    assert_eq!(
                        e,
                        vec!["127.0.0.2:0/0"],
                        "the host fence is its storage IPs"
                    );
                    steps.push("host-fence");
                    obs.host_fence = Some(whole.clone());
                }
                Step::Blocklist {
                    scope: Scope::None, ..
                } => panic!("a fence of scope none is never asked for"),
                Step::Kill => {
                    steps.push("kill");
                    obs.kill = Some(kill(k));
                }
                Step::Decide(v) => return (v, steps),
            }
        }
        panic!("no decision after 8 steps")
    }

    /// The README's truth table: evidence × storage fences × scan → decision, scope, steps.
    #[test]
    fn truth_table() {
        use ApproveReason as A;
        use DenyReason as D;
        use KillResult as K;
        let f = Fixture::new();
        let owner = || vol(&[], &["127.0.0.2:0/1"]);
        let live = || vol(&["127.0.0.2:0/1"], &["127.0.0.2:0/1"]);
        let watcher_only = || vol(&["127.0.0.2:0/1"], &[]);
        let none = || vol(&[], &[]);
        type Row = (
            &'static str,
            Vec<VolumeEvidence>,
            FenceResult,
            FenceResult,
            KillResult,
            Decision,
            Scope,
            &'static [&'static str],
        );
        let rows: Vec<Row> = vec![
            // (a) Complete evidence: the VM's clients, then the kill for the label.
            (
                "complete, killed",
                vec![live()],
                confirmed(),
                confirmed(),
                K::Killed,
                Decision::Approve(A::Killed),
                Scope::Vm,
                &["vm-fence", "kill"],
            ),
            (
                "complete, crashed on a healthy host",
                vec![owner()],
                confirmed(),
                confirmed(),
                K::NotRunning,
                Decision::Approve(A::AlreadyDead),
                Scope::Vm,
                &["vm-fence", "kill"],
            ),
            (
                "complete, host hung",
                vec![owner()],
                confirmed(),
                confirmed(),
                K::Unreachable,
                Decision::Approve(A::SshUnreachable),
                Scope::Vm,
                &["vm-fence", "kill"],
            ),
            (
                "complete, alive after SIGKILL",
                vec![live()],
                confirmed(),
                confirmed(),
                K::Unconfirmed,
                Decision::Approve(A::StorageFenced),
                Scope::Vm,
                &["vm-fence", "kill"],
            ),
            // The VM fence cannot be had: the scan decides.
            (
                "complete, vm fence failed, host hung",
                vec![owner()],
                failed_bl(),
                confirmed(),
                K::Unreachable,
                Decision::Approve(A::SshUnreachable),
                Scope::Host,
                &["vm-fence", "kill", "host-fence"],
            ),
            (
                "complete, vm fence unanswered, host hung: never widened",
                vec![owner()],
                unanswered(),
                confirmed(),
                K::Unreachable,
                Decision::Deny(D::BlocklistFailed),
                Scope::Vm,
                &["vm-fence", "kill"],
            ),
            (
                "complete, vm entry expiring, host hung",
                vec![owner()],
                expiring(),
                confirmed(),
                K::Unreachable,
                Decision::Approve(A::SshUnreachable),
                Scope::Host,
                &["vm-fence", "kill", "host-fence"],
            ),
            (
                "complete, vm fence failed, killed: never the host",
                vec![owner()],
                failed_bl(),
                confirmed(),
                K::Killed,
                Decision::Deny(D::BlocklistFailed),
                Scope::Vm,
                &["vm-fence", "kill"],
            ),
            (
                "complete, vm entry expiring, gone",
                vec![owner()],
                expiring(),
                confirmed(),
                K::NotRunning,
                Decision::Deny(D::BlocklistExpiring),
                Scope::Vm,
                &["vm-fence", "kill"],
            ),
            (
                "complete, nothing holds",
                vec![owner()],
                failed_bl(),
                failed_bl(),
                K::Unreachable,
                Decision::Deny(D::BlocklistFailed),
                Scope::Host,
                &["vm-fence", "kill", "host-fence"],
            ),
            (
                "complete, not confirmed gone, nothing holds",
                vec![live()],
                failed_bl(),
                failed_bl(),
                K::Unconfirmed,
                Decision::Deny(D::KillUnconfirmed),
                Scope::Host,
                &["vm-fence", "kill", "host-fence"],
            ),
            // (c) Incomplete evidence: the scan first.
            (
                "no client, not running",
                vec![none()],
                confirmed(),
                confirmed(),
                K::NotRunning,
                Decision::Approve(A::AlreadyDead),
                Scope::None,
                &["kill"],
            ),
            (
                "no client, killed",
                vec![none()],
                confirmed(),
                confirmed(),
                K::Killed,
                Decision::Approve(A::Killed),
                Scope::None,
                &["kill"],
            ),
            (
                "no volumes (ZStack), not running",
                vec![],
                confirmed(),
                confirmed(),
                K::NotRunning,
                Decision::Approve(A::AlreadyDead),
                Scope::None,
                &["kill"],
            ),
            (
                "one volume without client, killed",
                vec![owner(), none()],
                confirmed(),
                confirmed(),
                K::Killed,
                Decision::Approve(A::Killed),
                Scope::Vm,
                &["kill", "vm-fence"],
            ),
            (
                "one volume without client, killed, vm fence failed",
                vec![owner(), none()],
                failed_bl(),
                confirmed(),
                K::Killed,
                Decision::Deny(D::BlocklistFailed),
                Scope::Vm,
                &["kill", "vm-fence"],
            ),
            // A live watcher contradicts "not running".
            (
                "contradiction: watcher but no qemu",
                vec![watcher_only(), none()],
                confirmed(),
                confirmed(),
                K::NotRunning,
                Decision::Approve(A::StorageFenced),
                Scope::Host,
                &["kill", "host-fence"],
            ),
            (
                "contradiction, no storage fence",
                vec![watcher_only(), none()],
                confirmed(),
                failed_bl(),
                K::NotRunning,
                Decision::Deny(D::KillUnconfirmed),
                Scope::Host,
                &["kill", "host-fence"],
            ),
            // (b) The whole host, only when nothing less is proven.
            (
                "no client, host hung",
                vec![none()],
                confirmed(),
                confirmed(),
                K::Unreachable,
                Decision::Approve(A::SshUnreachable),
                Scope::Host,
                &["kill", "host-fence"],
            ),
            (
                "no client, alive after SIGKILL",
                vec![none()],
                confirmed(),
                confirmed(),
                K::Unconfirmed,
                Decision::Approve(A::StorageFenced),
                Scope::Host,
                &["kill", "host-fence"],
            ),
            // The ZStack flaw: an SSH timeout is not proof of death.
            (
                "no client, host hung, no blocklist",
                vec![none()],
                confirmed(),
                failed_bl(),
                K::Unreachable,
                Decision::Deny(D::BlocklistFailed),
                Scope::Host,
                &["kill", "host-fence"],
            ),
            (
                "no client, host hung, host entry expiring",
                vec![none()],
                confirmed(),
                expiring(),
                K::Unreachable,
                Decision::Deny(D::BlocklistExpiring),
                Scope::Host,
                &["kill", "host-fence"],
            ),
            (
                "no client, alive, no blocklist",
                vec![none()],
                confirmed(),
                failed_bl(),
                K::Unconfirmed,
                Decision::Deny(D::KillUnconfirmed),
                Scope::Host,
                &["kill", "host-fence"],
            ),
        ];
        for (name, ev, vm, whole, k, want, scope, steps) in rows {
            let (v, got_steps) = run(&f.ctx(), ev, vm, whole, k);
            assert_eq!(v.decision, want, "{name}: {}", v.message);
            assert_eq!(v.scope, scope, "{name}: {}", v.message);
            assert_eq!(got_steps, steps, "{name}");
            if !v.decision.is_approve() {
                assert_eq!(v.decision.outcome(), Outcome::Failed, "{name}");
            }
        }
    }

    /// Exhaustive over every evidence shape, storage result and scan result: an approval
    /// always rests on (a), (b) or (c), and a host that confirmed the VM gone is never fenced
    /// whole.
    #[test]
    fn the_kill_follows_every_vm_fence() {
        // The driver runs the kill together with the VM fence. That changes no decision only
        // if, whatever the VM fence's result, the decision asks for the kill next.
        let f = Fixture::new();
        let shapes = [
            vec![vol(&["127.0.0.2:0/1"], &["127.0.0.2:0/1"])],
            vec![vol(&[], &["127.0.0.2:0/1"])],
            vec![vol(&["127.0.0.2:0/1"], &[])],
            vec![vol(&["127.0.0.2:0/1"], &[]), vol(&[], &["127.0.0.2:0/2"])],
        ];
        let mut vm_fences = 0;
        for ev in &shapes {
            let mut obs = Observed {
                evidence: Some(Ok(ev.clone())),
                ..Default::default()
            };
            assert!(
                matches!(
                    next_step(&f.ctx(), &obs),
                    Step::Blocklist {
                        scope: Scope::Vm,
                        ..
                    }
                ),
                "{ev:?}"
            );
            for vm in [confirmed(), failed_bl(), expiring(), unanswered()] {
                obs.vm_fence = Some(vm.clone());
                assert_eq!(
                    next_step(&f.ctx(), &obs),
                    Step::Kill,
                    "{ev:?} after the VM fence {vm:?}"
                );
                vm_fences += 1;
            }
        }
        assert_eq!(vm_fences, 16);
    }

    #[test]
    fn every_approval_rests_on_a_proof_and_least_collateral() {
        let f = Fixture::new();
        let shapes = [
            vec![vol(&["127.0.0.2:0/1"], &["127.0.0.2:0/1"])],
            vec![vol(&[], &["127.0.0.2:0/1"])],
            vec![vol(&["127.0.0.2:0/1"], &[])],
            vec![vol(&[], &[])],
            vec![vol(&[], &["127.0.0.2:0/1"]), vol(&[], &[])],
            vec![],
        ];
        let results = [confirmed(), failed_bl(), expiring()];
        let kills = [
            KillResult::Killed,
            KillResult::NotRunning,
            KillResult::Unconfirmed,
            KillResult::Unreachable,
        ];
        for ev in &shapes {
            for vm in &results {
                for whole in &results {
                    for k in kills {
                        let (v, steps) = run(&f.ctx(), ev.clone(), vm.clone(), whole.clone(), k);
                        let complete = !ev.is_empty()
                            && ev
                                .iter()
                                .all(|x| !x.watchers.is_empty() || !x.lock_owners.is_empty());
                        let any_client = ev
                            .iter()
                            .any(|x| !x.watchers.is_empty() || !x.lock_owners.is_empty());
                        let watcher = ev.iter().any(|x| !x.watchers.is_empty());
                        let gone =
                            k == KillResult::Killed || (k == KillResult::NotRunning && !watcher);
                        let vm_ok = vm.is_ok() && steps.contains(&"vm-fence");
                        let host_ok = whole.is_ok() && steps.contains(&"host-fence");
                        let a = complete && vm_ok;
                        let b = host_ok;
                        let c = gone && (!any_client || vm_ok);
                        let case = format!(
                            "{ev:?} {vm:?} {whole:?} {k:?} → {} {:?} {steps:?}",
                            v.decision, v.scope
                        );
                        if v.decision.is_approve() {
                            assert!(a || b || c, "approved without proof: {case}");
                        } else {
                            assert!(!(a || c), "denied although proven: {case}");
                        }
                        if gone {
                            assert!(
                                !steps.contains(&"host-fence"),
                                "a host that confirmed the VM gone was fenced whole: {case}"
                            );
                        }
                        if complete && vm.is_ok() {
                            assert!(
                                !steps.contains(&"host-fence"),
                                "fenced wider than the evidence needs: {case}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn foreign_and_unknown_clients_deny_before_touching_anything() {
        let f = Fixture::new();
        let cases = [
            (
                vol(&["127.0.0.3:0/9"], &[]),
                DenyReason::ActiveElsewhere,
                "h2",
            ),
            (
                vol(&["127.0.0.2:0/1"], &["127.0.0.4:0/5"]),
                DenyReason::ActiveElsewhere,
                "h3",
            ),
            (
                vol(&[], &["127.0.0.3:0/9"]),
                DenyReason::ActiveElsewhere,
                "h2",
            ),
            (
                vol(&["127.0.0.9:0/5"], &[]),
                DenyReason::UnknownClient,
                "127.0.0.9:0/5",
            ),
            // Another host's client wins over an unknown one: it is the more specific answer.
            (
                vol(&["127.0.0.9:0/5"], &["127.0.0.3:0/1"]),
                DenyReason::ActiveElsewhere,
                "h2",
            ),
        ];
        for (v, want, named) in cases {
            let obs = Observed {
                evidence: Some(Ok(vec![vol(&["127.0.0.2:0/1"], &[]), v])),
                ..Default::default()
            };
            let Step::Decide(verdict) = next_step(&f.ctx(), &obs) else {
                panic!("expected a decision")
            };
            assert_eq!(
                verdict.decision,
                Decision::Deny(want),
                "{}",
                verdict.message
            );
            assert!(verdict.message.contains(named), "{}", verdict.message);
            assert!(
                verdict.message.contains("nothing was touched"),
                "{}",
                verdict.message
            );
        }
    }

    #[test]
    fn an_ipv4_mapped_address_is_the_hosts_own() {
        let f = Fixture::new();
        let obs = Observed {
            evidence: Some(Ok(vec![vol(&["[::ffff:127.0.0.2]:0/7"], &[])])),
            ..Default::default()
        };
        assert!(matches!(
            next_step(&f.ctx(), &obs),
            Step::Blocklist {
                scope: Scope::Vm,
                ..
            }
        ));
    }

    #[test]
    fn evidence_failures_deny() {
        let f = Fixture::new();
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
        for (fail, want) in cases {
            let obs = Observed {
                evidence: Some(Err(fail)),
                ..Default::default()
            };
            assert!(
                matches!(next_step(&f.ctx(), &obs), Step::Decide(v) if v.decision == Decision::Deny(want))
            );
        }
        let obs = Observed {
            evidence: Some(Ok(vec![vol(&["garbage"], &[])])),
            ..Default::default()
        };
        assert!(
            matches!(next_step(&f.ctx(), &obs), Step::Decide(v) if v.decision == Decision::Deny(DenyReason::EvidenceInvalid))
        );
    }

    #[test]
    fn unknown_hosts_deny_first() {
        let f = Fixture::new();
        let obs = Observed::default();
        for c in [
            Context {
                failed: None,
                ..f.ctx()
            },
            Context {
                target_known: false,
                ..f.ctx()
            },
        ] {
            assert!(
                matches!(next_step(&c, &obs), Step::Decide(v) if v.decision == Decision::Deny(DenyReason::UnknownHost))
            );
        }
    }

    #[test]
    fn dry_run_gathers_evidence_then_denies_with_the_plan() {
        let f = Fixture::new();
        let c = Context {
            dry_run: true,
            ..f.ctx()
        };
        assert_eq!(next_step(&c, &Observed::default()), Step::GatherEvidence);
        for (ev, says) in [
            (vol(&["127.0.0.2:0/1"], &[]), "127.0.0.2:0/1 (scope vm)"),
            (vol(&[], &[]), "127.0.0.2:0/0 (scope host)"),
        ] {
            let obs = Observed {
                evidence: Some(Ok(vec![ev])),
                ..Default::default()
            };
            let Step::Decide(v) = next_step(&c, &obs) else {
                panic!("dry run must decide after evidence")
            };
            assert_eq!(v.decision, Decision::Deny(DenyReason::DryRun));
            assert!(
                v.message.contains(says) && v.message.contains("nothing was done"),
                "{}",
                v.message
            );
        }
        let obs = Observed {
            evidence: Some(Ok(vec![vol(&["127.0.0.3:0/1"], &[])])),
            ..Default::default()
        };
        assert!(
            matches!(next_step(&c, &obs), Step::Decide(v) if v.decision == Decision::Deny(DenyReason::ActiveElsewhere))
        );
    }

    #[test]
    fn never_fences_this_service_itself() {
        let f = Fixture::new();
        let own: Vec<EntityAddr> =
            vec!["127.0.0.2:0/555".parse().unwrap_or_else(|_| unreachable!())];
        let c = Context {
            own_addrs: &own,
            ..f.ctx()
        };
        // A VM fence of other clients of that IP is fine; the whole host is not.
        let (v, steps) = run(
            &c,
            vec![vol(&[], &["127.0.0.2:0/1"])],
            confirmed(),
            confirmed(),
            KillResult::Killed,
        );
        assert_eq!(v.decision, Decision::Approve(ApproveReason::Killed));
        assert_eq!(steps, vec!["vm-fence", "kill"]);
        let (v, _) = run(
            &c,
            vec![vol(&[], &[])],
            confirmed(),
            confirmed(),
            KillResult::Unreachable,
        );
        assert_eq!(
            v.decision,
            Decision::Deny(DenyReason::SelfFence),
            "{}",
            v.message
        );
    }

    #[test]
    fn outcomes_and_labels() {
        assert_eq!(
            Decision::Approve(ApproveReason::SshUnreachable).outcome(),
            Outcome::SuccessSshUnreachable
        );
        assert_eq!(
            Decision::Approve(ApproveReason::StorageFenced).outcome(),
            Outcome::Failed,
            "a reached host whose VM was not confirmed gone is not 'ssh-unreachable'"
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
        for s in Scope::ALL {
            assert_eq!(
                serde_json::to_value(s).ok(),
                Some(serde_json::Value::from(s.as_str()))
            );
        }
    }
}
