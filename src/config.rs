//! The service's TOML configuration (`rbdfence serve|fence --config FILE`).
//!
//! Unknown keys and bad values are start-up errors that name the key. Every timeout has a
//! default and a bound; nothing may be configured to wait forever.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::fence::inventory::{Host, Inventory};
use crate::rbd::{ConnectOptions, Timeouts};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {key}: {why}")]
    Invalid {
        path: PathBuf,
        key: String,
        why: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub ceph: CephSection,
    #[serde(default)]
    pub api: ApiSection,
    #[serde(default)]
    pub fence: FenceSection,
    pub ssh: SshSection,
    #[serde(default)]
    pub ledger: LedgerSection,
    #[serde(default)]
    pub zstack: ZstackSection,
    #[serde(default)]
    pub hosts: Vec<HostEntry>,
}

/// The fence ledger in RADOS, shared by every instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSection {
    /// The pool holding the ledger's objects. Default `rbd`.
    #[serde(default = "default_ledger_pool")]
    pub pool: String,
    /// The RADOS namespace of the ledger's objects, within the pool. Default `rbdfence`.
    #[serde(default = "default_ledger_namespace")]
    pub namespace: String,
}

fn default_ledger_pool() -> String {
    "rbd".into()
}

fn default_ledger_namespace() -> String {
    "rbdfence".into()
}

impl Default for LedgerSection {
    fn default() -> Self {
        LedgerSection {
            pool: default_ledger_pool(),
            namespace: default_ledger_namespace(),
        }
    }
}

/// The ZStack endpoint (`POST /ha/sibling-fence-vm`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZstackSection {
    /// Refuse (400) a request that names no volume: without volumes there is no Ceph evidence,
    /// so no VM fence and no check that the VM runs elsewhere. Off by default (drop-in).
    #[serde(default)]
    pub require_volumes: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CephSection {
    #[serde(default = "default_ceph_conf")]
    pub conf: PathBuf,
    #[serde(default = "default_ceph_id")]
    pub id: String,
    /// `rados_osd_op_timeout` / `rados_mon_op_timeout`.
    #[serde(default = "d10")]
    pub op_timeout_secs: u64,
    /// `client_mount_timeout`.
    #[serde(default = "d10")]
    pub connect_timeout_secs: u64,
    /// How often the service checks its Ceph connection (readiness, reconnection).
    #[serde(default = "d5")]
    pub health_interval_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    pub token_file: Option<PathBuf>,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    #[serde(default = "d30")]
    pub request_timeout_secs: u64,
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            listen: default_listen(),
            token_file: None,
            max_body_bytes: default_max_body(),
            request_timeout_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FenceSection {
    #[serde(default = "default_expire")]
    pub blocklist_expire_secs: u64,
    /// The whole fence, from request to decision.
    #[serde(default = "d30")]
    pub deadline_secs: u64,
    #[serde(default = "d10")]
    pub evidence_timeout_secs: u64,
    /// Blocklist add + wait for the latest osdmap + confirmation.
    #[serde(default = "d10")]
    pub blocklist_timeout_secs: u64,
    /// The whole kill stage, every route tried.
    #[serde(default = "d15")]
    pub ssh_timeout_secs: u64,
    /// How often the lifecycle re-checks fenced hosts: keeps unproven fences in force, lifts
    /// a host's fences once its VMs are proven gone.
    #[serde(default = "d30")]
    pub lifecycle_interval_secs: u64,
    /// How long a fence stays after its VM was proven gone, before it may be lifted: a
    /// killed qemu's last writes can still be in its host's kernel, which delivers them at
    /// TCP's backed-off pace once a partition heals, even after the process is gone; the
    /// OSDs must still refuse them when they arrive. Above the hosts' TCP orphan lifetime
    /// (Linux: `tcp_orphan_retries`, minutes); at most half the expiry. 0 lifts at once.
    /// Default: 900, or half the expiry when that is shorter.
    pub lift_quiet_secs: Option<u64>,
    /// A local JSON-lines ledger instead of the one in RADOS (`[ledger]`): a single instance
    /// only.
    pub ledger: Option<PathBuf>,
}

impl FenceSection {
    /// How long a fence stays after its VM was proven gone (`lift_quiet_secs`).
    pub fn lift_quiet(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.lift_quiet_secs
                .unwrap_or_else(|| (self.blocklist_expire_secs / 2).min(900)),
        )
    }
}

impl Default for FenceSection {
    fn default() -> Self {
        FenceSection {
            blocklist_expire_secs: default_expire(),
            deadline_secs: 30,
            evidence_timeout_secs: 10,
            blocklist_timeout_secs: 10,
            ssh_timeout_secs: 15,
            lifecycle_interval_secs: 30,
            lift_quiet_secs: None,
            ledger: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshSection {
    #[serde(default = "default_user")]
    pub user: String,
    pub identity: PathBuf,
    pub known_hosts: PathBuf,
    /// TCP connect + handshake + auth, per hop.
    #[serde(default = "d5")]
    pub connect_timeout_secs: u64,
    /// The remote find-kill-recheck command.
    #[serde(default = "d10")]
    pub command_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    pub uuid: String,
    pub cluster: String,
    pub storage_addrs: Vec<String>,
    pub ssh: String,
}

fn default_ceph_conf() -> PathBuf {
    PathBuf::from("/etc/ceph/ceph.conf")
}
fn default_ceph_id() -> String {
    "rbdfence".into()
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7480))
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_expire() -> u64 {
    86400
}
fn default_user() -> String {
    "root".into()
}
fn d5() -> u64 {
    5
}
fn d10() -> u64 {
    10
}
fn d15() -> u64 {
    15
}
fn d30() -> u64 {
    30
}

/// A host uuid as the HA manager names it: 1–64 of `[A-Za-z0-9._-]`.
pub fn valid_host_uuid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: String, why: &str| ConfigError::Invalid {
            path: path.into(),
            key,
            why: why.into(),
        };
        let secs = [
            ("ceph.op_timeout_secs", self.ceph.op_timeout_secs),
            ("ceph.connect_timeout_secs", self.ceph.connect_timeout_secs),
            ("ceph.health_interval_secs", self.ceph.health_interval_secs),
            ("api.request_timeout_secs", self.api.request_timeout_secs),
            ("fence.deadline_secs", self.fence.deadline_secs),
            (
                "fence.evidence_timeout_secs",
                self.fence.evidence_timeout_secs,
            ),
            (
                "fence.blocklist_timeout_secs",
                self.fence.blocklist_timeout_secs,
            ),
            ("fence.ssh_timeout_secs", self.fence.ssh_timeout_secs),
            (
                "fence.lifecycle_interval_secs",
                self.fence.lifecycle_interval_secs,
            ),
            ("ssh.connect_timeout_secs", self.ssh.connect_timeout_secs),
            ("ssh.command_timeout_secs", self.ssh.command_timeout_secs),
        ];
        for (key, v) in secs {
            if v == 0 || v > 3600 {
                return Err(bad(key.into(), "must be between 1 and 3600 seconds"));
            }
        }
        for (key, v) in [
            ("ledger.pool", &self.ledger.pool),
            ("ledger.namespace", &self.ledger.namespace),
        ] {
            if v.is_empty() || v.len() > 128 || v.chars().any(|c| c.is_control() || c == '/') {
                return Err(bad(
                    key.into(),
                    "1-128 characters, no '/' or control characters",
                ));
            }
        }
        if self
            .fence
            .lift_quiet_secs
            .is_some_and(|q| q > self.fence.blocklist_expire_secs / 2)
        {
            return Err(bad(
                "fence.lift_quiet_secs".into(),
                "must be at most half of fence.blocklist_expire_secs",
            ));
        }
        if self.fence.blocklist_expire_secs < 60 {
            return Err(bad(
                "fence.blocklist_expire_secs".into(),
                "must be at least 60 seconds",
            ));
        }
        if self.api.max_body_bytes < 1024 || self.api.max_body_bytes > 16 * 1024 * 1024 {
            return Err(bad(
                "api.max_body_bytes".into(),
                "must be between 1 KiB and 16 MiB",
            ));
        }
        if self.ceph.id.is_empty() || self.ceph.id.starts_with("client.") {
            return Err(bad(
                "ceph.id".into(),
                "the cephx user without 'client.', e.g. rbdfence",
            ));
        }
        if self.ssh.user.is_empty()
            || !self
                .ssh
                .user
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(bad("ssh.user".into(), "must be a plain user name"));
        }
        self.inventory().map_err(|(key, why)| bad(key, &why))?;
        Ok(())
    }

    /// The hosts as the fence engine uses them; `Err((key, why))` names the bad key.
    pub fn inventory(&self) -> Result<Inventory, (String, String)> {
        let mut seen = HashSet::new();
        let mut hosts = Vec::new();
        for (i, h) in self.hosts.iter().enumerate() {
            let key = |k: &str| format!("hosts[{i}].{k}");
            if !valid_host_uuid(&h.uuid) {
                return Err((key("uuid"), "1-64 characters of A-Z a-z 0-9 . _ -".into()));
            }
            if !seen.insert(h.uuid.clone()) {
                return Err((key("uuid"), format!("duplicate host {}", h.uuid)));
            }
            if !valid_host_uuid(&h.cluster) {
                return Err((
                    key("cluster"),
                    "1-64 characters of A-Z a-z 0-9 . _ -".into(),
                ));
            }
            if h.storage_addrs.is_empty() {
                return Err((key("storage_addrs"), "at least one address".into()));
            }
            let mut addrs = Vec::new();
            for a in &h.storage_addrs {
                let ip: IpAddr = a
                    .parse()
                    .map_err(|_| (key("storage_addrs"), format!("{a:?} is not an IP address")))?;
                if ip.is_unspecified() {
                    return Err((
                        key("storage_addrs"),
                        format!("{a} would fence every client"),
                    ));
                }
                addrs.push(ip);
            }
            let ssh = parse_ssh_addr(&h.ssh)
                .ok_or_else(|| (key("ssh"), format!("{:?} is not IP:PORT", h.ssh)))?;
            hosts.push(Host {
                uuid: h.uuid.clone(),
                cluster: h.cluster.clone(),
                storage_addrs: addrs,
                ssh,
            });
        }
        // Two hosts claiming one storage address would make evidence ambiguous.
        let mut owner = std::collections::HashMap::new();
        for h in &hosts {
            for ip in &h.storage_addrs {
                if let Some(other) = owner.insert(*ip, h.uuid.clone()) {
                    return Err((
                        "hosts".into(),
                        format!(
                            "storage address {ip} belongs to both {other} and {}",
                            h.uuid
                        ),
                    ));
                }
            }
        }
        Ok(Inventory::new(hosts))
    }

    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            conf: self.ceph.conf.clone(),
            id: self.ceph.id.clone(),
            timeouts: Timeouts {
                op: Duration::from_secs(self.ceph.op_timeout_secs),
                mount: Duration::from_secs(self.ceph.connect_timeout_secs),
            },
        }
    }
}

/// `IP:PORT`, `[IPv6]:PORT`, or a bare IP (port 22). No host names: resolving one at fence
/// time would be another thing that can hang or lie.
fn parse_ssh_addr(s: &str) -> Option<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(a);
    }
    s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 22))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[ceph]
conf = "/etc/ceph/ceph.conf"
id = "rbdfence"
[api]
listen = "127.0.0.1:7480"
[fence]
blocklist_expire_secs = 86400
[ssh]
user = "root"
identity = "/etc/rbdfence/id_ed25519"
known_hosts = "/etc/rbdfence/known_hosts"
[[hosts]]
uuid = "h1"
cluster = "c1"
storage_addrs = ["127.0.0.2"]
ssh = "127.0.0.2:2222"
[[hosts]]
uuid = "h2"
cluster = "c1"
storage_addrs = ["127.0.0.3"]
ssh = "127.0.0.3"
"#;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    #[test]
    fn the_contract_example_parses_with_defaults() {
        let c = parse(GOOD).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.fence.deadline_secs, 30);
        assert_eq!(c.ssh.connect_timeout_secs, 5);
        let inv = c.inventory().unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(inv.get("h2").map(|h| h.ssh.port()), Some(22));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (GOOD.replace("[fence]", "[fence]\nbogus = 1"), "bogus"),
            (
                GOOD.replace("listen = \"127.0.0.1:7480\"", "listen = \"nowhere\""),
                "listen",
            ),
            (
                GOOD.replace("blocklist_expire_secs = 86400", "blocklist_expire_secs = 5"),
                "fence.blocklist_expire_secs",
            ),
            (
                GOOD.replace("[fence]", "[fence]\ndeadline_secs = 0"),
                "fence.deadline_secs",
            ),
            (
                GOOD.replace("storage_addrs = [\"127.0.0.3\"]", "storage_addrs = [\"x\"]"),
                "hosts[1].storage_addrs",
            ),
            (
                GOOD.replace(
                    "storage_addrs = [\"127.0.0.3\"]",
                    "storage_addrs = [\"127.0.0.2\"]",
                ),
                "both h1 and h2",
            ),
            (
                GOOD.replace("uuid = \"h2\"", "uuid = \"h1\""),
                "hosts[1].uuid",
            ),
            (
                GOOD.replace("uuid = \"h2\"", "uuid = \"h 2; reboot\""),
                "hosts[1].uuid",
            ),
            (
                GOOD.replace("ssh = \"127.0.0.3\"", "ssh = \"host.example:22\""),
                "hosts[1].ssh",
            ),
            (
                GOOD.replace(
                    "storage_addrs = [\"127.0.0.3\"]",
                    "storage_addrs = [\"0.0.0.0\"]",
                ),
                "hosts[1].storage_addrs",
            ),
            (
                GOOD.replace("id = \"rbdfence\"", "id = \"client.rbdfence\""),
                "ceph.id",
            ),
            (
                GOOD.replace("identity = \"/etc/rbdfence/id_ed25519\"\n", ""),
                "identity",
            ),
        ];
        for (text, key) in cases {
            let err = parse(&text)
                .err()
                .unwrap_or_else(|| panic!("accepted a config with bad {key}"));
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
    }
}
