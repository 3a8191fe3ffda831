//! Lifting a host's fences: exactly the entries rbdfence's own fences of that host made (never
//! an operator's, librbd's lock-break entries or another tool's), only after its VMs are proven
//! gone (or the operator forces it), and recorded in the ledger before anyone is told.
//!
//! Callers hold the host's lease (no fence of the host runs meanwhile, in any instance).

use std::collections::BTreeSet;

use super::ledger::{Ledger, LedgerError};
use super::record::{FenceRecord, UnfenceRecord};
use crate::rbd::{BlocklistEntry, Ceph, CephError};

/// What proved the host's VMs gone, or that nothing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The operator asked; `force` skips the proof for fences whose VM was never seen gone.
    Api { force: bool },
    /// The lifecycle scanned the host and found every fenced VM gone.
    Auto,
}

#[derive(Debug, thiserror::Error)]
pub enum UnfenceError {
    #[error(
        "fences of {host} approved on the blocklist alone for VMs {vms:?}: their qemu was never seen gone; check the host, then force"
    )]
    Unconfirmed { host: String, vms: Vec<String> },
    #[error(
        "the fenced VMs of {host} are gone only since {since}: what a killed qemu left in flight can still arrive until {until}; lift then, or force"
    )]
    Quiet {
        host: String,
        since: String,
        until: String,
    },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Ceph(#[from] CephError),
}

/// The fences of `host` in force, from the shared ledger.
pub async fn in_force(ledger: &Ledger, host: &str) -> Result<Vec<FenceRecord>, LedgerError> {
    let unfences = ledger.unfences(Some(host)).await?;
    Ok(ledger
        .recent(usize::MAX)
        .await?
        .into_iter()
        .filter(|r| r.failed_host == host && r.state(&unfences).in_force)
        .collect())
}

/// Lifts `host`'s fences in force and records it: not before every fenced VM has been known
/// gone for `quiet` (unless forced), since a killed qemu's writes still in flight must meet
/// the blocklist when they arrive.
pub async fn unfence_host(
    ledger: &Ledger,
    ceph: &Ceph,
    host: &str,
    trigger: Trigger,
    quiet: std::time::Duration,
) -> Result<UnfenceRecord, UnfenceError> {
    let fences = in_force(ledger, host).await?;
    let unproven: Vec<String> = fences
        .iter()
        .filter(|r| r.unproven())
        .map(|r| r.vm_uuid.clone())
        .collect();
    let label = match trigger {
        Trigger::Auto => "auto",
        Trigger::Api { force: false } if !unproven.is_empty() => {
            return Err(UnfenceError::Unconfirmed {
                host: host.to_string(),
                vms: unproven,
            });
        }
        Trigger::Api { force: true } if !unproven.is_empty() => "forced",
        Trigger::Api { .. } => "api",
    };
    if label != "forced" {
        let now = time::OffsetDateTime::now_utc();
        let rfc = |t: time::OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        };
        // Gone since the latest of them; a fence not known gone counts as gone now (the
        // caller's proof is this moment's).
        let since = fences.iter().map(|r| r.gone_since().unwrap_or(now)).max();
        if let Some(since) = since
            && now < since + quiet
        {
            return Err(UnfenceError::Quiet {
                host: host.to_string(),
                since: rfc(since),
                until: rfc(since + quiet),
            });
        }
    }
    let ours: BTreeSet<String> = fences.iter().flat_map(FenceRecord::entries).collect();
    let mut lifted = Vec::new();
    for item in ceph.blocklist_ls().await? {
        if !ours.contains(&item.entry) {
            continue;
        }
        let Ok(entry) = item.entry.parse::<BlocklistEntry>() else {
            continue;
        };
        ceph.blocklist_rm(entry).await?;
        lifted.push(entry.to_string());
    }
    let record = UnfenceRecord {
        unfence_id: super::driver::new_fence_id().replacen("f-", "u-", 1),
        host: host.to_string(),
        at: super::driver::now_rfc3339(),
        trigger: label.into(),
        fences: fences.iter().map(|r| r.reply.fence_id.clone()).collect(),
        lifted,
    };
    ledger.record_unfence(record.clone()).await?;
    tracing::info!(target: "rbdfence::audit", host, unfence_id = %record.unfence_id, trigger = label, lifted = ?record.lifted, fences = ?record.fences, "host unfenced");
    Ok(record)
}
