//! Wiring: configuration → the fence engine with its real ports.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::fence::driver::{Engine, FenceSettings, SessionObserver, SshKiller};
use crate::fence::ledger::{Ledger, LedgerError};
use crate::fence::link::CephLink;
use crate::fence::ssh::{Jumps, SshSettings};

/// The engine as the CLI and the service run it.
pub type RealEngine = Engine<Arc<CephLink>, SshKiller>;

pub fn ssh_settings(cfg: &Config) -> SshSettings {
    SshSettings {
        user: cfg.ssh.user.clone(),
        identity: cfg.ssh.identity.clone(),
        known_hosts: cfg.ssh.known_hosts.clone(),
        connect_timeout: Duration::from_secs(cfg.ssh.connect_timeout_secs),
        command_timeout: Duration::from_secs(cfg.ssh.command_timeout_secs),
    }
}

/// Opens the ledger and builds the engine on `link`. A link that is not connected is fine:
/// fences then deny with `ceph-unavailable`.
pub fn engine(
    cfg: &Config,
    link: Arc<CephLink>,
    ssh_observer: Option<SessionObserver>,
) -> Result<RealEngine, LedgerError> {
    let ledger = match &cfg.fence.ledger {
        Some(path) => Ledger::open(path.clone())?,
        None => Ledger::in_rados(
            link.clone(),
            cfg.ledger.pool.clone(),
            cfg.ledger.namespace.clone(),
        ),
    };
    Ok(Engine::new(
        link,
        SshKiller {
            settings: ssh_settings(cfg),
            observer: ssh_observer,
            jumps: Jumps::default(),
        },
        cfg.inventory().unwrap_or_default(),
        FenceSettings::from_config(&cfg.fence),
        ledger,
    ))
}
