//! Wiring: configuration → the fence engine with its real ports.

use std::time::Duration;

use crate::config::Config;
use crate::fence::driver::{CephLink, Engine, FenceSettings, SshKiller};
use crate::fence::ledger::{Ledger, LedgerError};
use crate::fence::ssh::SshSettings;

pub fn ssh_settings(cfg: &Config) -> SshSettings {
    SshSettings {
        user: cfg.ssh.user.clone(),
        identity: cfg.ssh.identity.clone(),
        known_hosts: cfg.ssh.known_hosts.clone(),
        connect_timeout: Duration::from_secs(cfg.ssh.connect_timeout_secs),
        command_timeout: Duration::from_secs(cfg.ssh.command_timeout_secs),
    }
}

/// Connects to Ceph (a failed connection is kept as `CephLink::Down`: fences then deny with
/// `ceph-unavailable`), opens the ledger and builds the engine.
pub async fn engine(cfg: &Config) -> Result<Engine<CephLink, SshKiller>, LedgerError> {
    let ledger = match &cfg.fence.ledger {
        Some(path) => Ledger::open(path.clone())?,
        None => Ledger::in_memory(),
    };
    let mut ceph = CephLink::connect(cfg.connect_options()).await;
    // Without our own addresses the self-fence guard cannot work: treat it as no connection.
    let own_addrs = match ceph.own_addrs().await {
        Ok(a) => a,
        Err(e) => {
            ceph = CephLink::Down(e);
            Vec::new()
        }
    };
    if let CephLink::Down(e) = &ceph {
        tracing::error!(error = %e, "not connected to Ceph: every fence will deny (ceph-unavailable)");
    }
    Ok(Engine {
        ceph,
        killer: SshKiller {
            settings: ssh_settings(cfg),
        },
        inventory: cfg.inventory().unwrap_or_default(),
        settings: FenceSettings::from_config(&cfg.fence),
        ledger,
        own_addrs,
        observer: None,
    })
}
