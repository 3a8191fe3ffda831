//! A whole fencing world on a test network of namespaces (see [`super::netns`]): its own micro
//! Ceph cluster, three hypervisor hosts of cluster c1 and `rbdfence serve`, each in its own
//! namespace, every host with a management and a storage link.
//!
//! - `ceph` (storage 198.18.1.1): one mon and one OSD (`scripts/ceph-micro.sh`).
//! - `h1` (198.18.0.11 / 198.18.1.11): the host that fails; its sshd listens on management.
//! - `h2` (198.18.0.12 / 198.18.1.12): the HA target; no sshd (a refused port).
//! - `h3` (198.18.0.13 / 198.18.1.13): a healthy sibling with sshd, the jump host for kills.
//! - `svc` (198.18.0.2 / 198.18.1.2): the service (ledger in RADOS, lifecycle on), and where
//!   the test's own Ceph CLI calls and HTTP requests come from.
//!
//! qemus run in their host's namespace, so their Ceph clients use the host's storage address
//! and really lose the cluster when its storage link goes down. Drop order (fields top to
//! bottom) ends the service, the sshds and the cluster before the namespaces go.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::netns::{Link, Net, Node, within};
use super::sshd::{ClientKey, Sshd, write_known_hosts};
use super::stack::{ServeProcess, new_uuid};
use super::unique;
use super::vm::{Launch, Vm, image_byte_of};

/// What a test may change in the world's service configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `fence.lifecycle_interval_secs`.
    pub lifecycle_secs: u64,
    /// `ssh.connect_timeout_secs`.
    pub ssh_connect_secs: u64,
    /// An API token (`api.token_file`); the world's requests then carry it.
    pub token: Option<String>,
    /// `RBDFENCE_LOG` for the service (its log filter).
    pub log: Option<String>,
    /// `fence.lift_quiet_secs` (0 unless a test needs the quiet period).
    pub lift_quiet_secs: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            lifecycle_secs: 3600,
            ssh_connect_secs: 3,
            token: None,
            log: None,
            lift_quiet_secs: 0,
        }
    }
}

/// The configured bounds a fence's stages must keep (see the config written below).
pub const SSH_TIMEOUT_MS: u64 = 20_000;
pub const BLOCKLIST_TIMEOUT_MS: u64 = 4_000;
pub const EVIDENCE_TIMEOUT_MS: u64 = 4_000;
pub const DEADLINE_MS: u64 = 40_000;
/// `ceph.op_timeout_secs`: every RADOS and mon call of the service.
pub const OP_TIMEOUT_MS: u64 = 3_000;

pub struct World {
    pub service: Option<ServeProcess>,
    pub h1_sshd: Sshd,
    pub h3_sshd: Sshd,
    /// The cephx user the service runs as, and the ceph.conf that names its keyring.
    pub ceph_user: (String, PathBuf),
    pub cluster: NsCluster,
    pub key: ClientKey,
    pub known_hosts: PathBuf,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub settings: Settings,
    pub svc: Node,
    pub ceph: Node,
    pub h1: Node,
    pub h2: Node,
    pub h3: Node,
    pub net: Net,
}

impl World {
    pub fn new(settings: Settings) -> World {
        let mut net = Net::new();
        let ceph = net.node("ceph", None, Some(1));
        let svc = net.node("svc", Some(2), Some(2));
        let h1 = net.node("h1", Some(11), Some(11));
        let h2 = net.node("h2", Some(12), Some(12));
        let h3 = net.node("h3", Some(13), Some(13));
        let cluster = NsCluster::up(&ceph);
        let key = ClientKey::generate();
        let h1_sshd = within(&h1.ns, || Sshd::start(h1.mgmt.unwrap(), &key));
        let h3_sshd = within(&h3.ns, || Sshd::start(h3.mgmt.unwrap(), &key));
        let dir = tempfile::Builder::new()
            .prefix("rbdfence-world-")
            .tempdir()
            .unwrap();
        let known_hosts = dir.path().join("known_hosts");
        write_known_hosts(&known_hosts, &[&h1_sshd, &h3_sshd]);
        let config = dir.path().join("rbdfence.toml");
        let mut world = World {
            service: None,
            h1_sshd,
            h3_sshd,
            ceph_user: ("rbdfence".into(), cluster.conf.clone()),
            cluster,
            key,
            known_hosts,
            dir,
            config,
            settings,
            svc,
            ceph,
            h1,
            h2,
            h3,
            net,
        };
        world.restart_service();
        world
    }

    /// Writes the service's configuration and (re)starts it.
    pub fn restart_service(&mut self) {
        self.service = None;
        let (id, conf) = &self.ceph_user;
        let token_line = match &self.settings.token {
            Some(token) => {
                let file = self.dir.path().join("token");
                std::fs::write(&file, format!("{token}\n")).unwrap();
                format!("token_file = \"{}\"", file.display())
            }
            None => String::new(),
        };
        let text = format!(
            r#"
[api]
listen = "127.0.0.1:0"
{token_line}
[ceph]
conf = "{conf}"
id = "{id}"
op_timeout_secs = {op}
connect_timeout_secs = 5
[fence]
blocklist_expire_secs = 600
deadline_secs = {deadline}
evidence_timeout_secs = {evidence}
blocklist_timeout_secs = {blocklist}
ssh_timeout_secs = {ssh}
lifecycle_interval_secs = {lifecycle}
lift_quiet_secs = {quiet}
[ledger]
pool = "rbd"
namespace = "rbdfence"
[ssh]
user = "root"
identity = "{identity}"
known_hosts = "{known_hosts}"
connect_timeout_secs = {connect}
command_timeout_secs = 10
[[hosts]]
uuid = "h1"
cluster = "c1"
storage_addrs = ["{h1_storage}"]
ssh = "{h1_ssh}"
[[hosts]]
uuid = "h2"
cluster = "c1"
storage_addrs = ["{h2_storage}"]
ssh = "{h2_mgmt}:1"
[[hosts]]
uuid = "h3"
cluster = "c1"
storage_addrs = ["{h3_storage}"]
ssh = "{h3_ssh}"
"#,
            conf = conf.display(),
            op = OP_TIMEOUT_MS / 1000,
            deadline = DEADLINE_MS / 1000,
            evidence = EVIDENCE_TIMEOUT_MS / 1000,
            blocklist = BLOCKLIST_TIMEOUT_MS / 1000,
            ssh = SSH_TIMEOUT_MS / 1000,
            lifecycle = self.settings.lifecycle_secs,
            quiet = self.settings.lift_quiet_secs,
            identity = self.key.identity().display(),
            known_hosts = self.known_hosts.display(),
            connect = self.settings.ssh_connect_secs,
            h1_storage = self.h1.storage.unwrap(),
            h1_ssh = self.h1_sshd.addr(),
            h2_storage = self.h2.storage.unwrap(),
            h2_mgmt = self.h2.mgmt.unwrap(),
            h3_storage = self.h3.storage.unwrap(),
            h3_ssh = self.h3_sshd.addr(),
        );
        std::fs::write(&self.config, text).unwrap();
        let env: Vec<(&str, &str)> = self
            .settings
            .log
            .as_deref()
            .map(|l| ("RBDFENCE_LOG", l))
            .into_iter()
            .collect();
        self.service = Some(within(&self.svc.ns, || {
            ServeProcess::start_with_env(&self.config, &env)
        }));
    }

    /// Creates cephx user `client.NAME` with `caps` (`mon`, `'…'`, `osd`, `'…'`), and runs the
    /// service as it from now on.
    pub fn use_user(&mut self, name: &str, caps: &[String]) {
        let keyring = self.dir.path().join(format!("{name}.keyring"));
        let mut args: Vec<String> = vec![
            "auth".into(),
            "get-or-create".into(),
            format!("client.{name}"),
        ];
        args.extend(caps.iter().cloned());
        args.push("-o".into());
        args.push(keyring.display().to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.cli("ceph", &args);
        let conf = self.dir.path().join(format!("{name}.conf"));
        let text: String = std::fs::read_to_string(&self.cluster.conf)
            .unwrap()
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("keyring") {
                    format!("keyring = {}\n", keyring.display())
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(&conf, text).unwrap();
        self.ceph_user = (name.to_string(), conf);
        self.restart_service();
    }
    /// Partitions (`up == false`) or heals one of `node`'s links.
    pub fn set(&self, node: &Node, link: Link, up: bool) {
        self.net.set(node, link, up);
    }

    /// Runs a Ceph CLI (`rbd`, `ceph`) as admin from the service's namespace; panics on failure.
    pub fn cli(&self, program: &str, args: &[&str]) -> String {
        let out = within(&self.svc.ns, || {
            Command::new("timeout")
                .arg("30")
                .arg(program)
                .arg("--conf")
                .arg(&self.cluster.conf)
                .args(args)
                .output()
                .unwrap()
        });
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A new 16 MiB image `rbd/PREFIX-…`; returns its spec.
    pub fn image(&self, prefix: &str) -> String {
        let spec = format!("rbd/{}", unique(prefix));
        self.cli("rbd", &["create", &spec, "--size", "16M"]);
        spec
    }

    /// As [`World::image`], without the exclusive-lock feature: no lock record ever names the
    /// image's writer, so once its watch expires no evidence names it.
    pub fn image_without_lock(&self, prefix: &str) -> String {
        let spec = format!("rbd/{}", unique(prefix));
        self.cli(
            "rbd",
            &[
                "create",
                &spec,
                "--size",
                "16M",
                "--image-feature",
                "layering",
            ],
        );
        spec
    }

    /// Waits until no watcher and no lock owner of `image` is left (a partitioned client's watch
    /// expires after the cluster's `osd_client_watch_timeout`).
    pub fn wait_unwatched(&self, image: &str, within: Duration) {
        let started = Instant::now();
        loop {
            let (status, body) = self.http("GET", &format!("/v1/images/{image}"), None);
            assert_eq!(status, 200, "{body:#}");
            if body["watchers"].as_array().is_some_and(Vec::is_empty)
                && body["lock_owners"].as_array().is_some_and(Vec::is_empty)
            {
                return;
            }
            assert!(
                started.elapsed() < within,
                "{image} is still watched after {within:?}: {body:#}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// A qemu VM on `host` with `image` as its disk (opened from the host's storage address).
    pub fn vm(&self, host: &Node, image: &str) -> Vm {
        let uuid = new_uuid();
        within(&host.ns, || {
            Vm::start_with(&self.cluster.conf, image, None, &uuid, Launch::Libvirt)
        })
    }

    /// As [`World::vm`], with extra qemu arguments.
    pub fn vm_with(&self, host: &Node, image: &str, extra: &[String]) -> Vm {
        let uuid = new_uuid();
        within(&host.ns, || {
            Vm::start_with_extra(
                &self.cluster.conf,
                image,
                None,
                &uuid,
                Launch::Libvirt,
                extra,
            )
        })
    }

    /// One byte of `image` at `offset`, as the cluster has it now.
    pub fn image_byte(&self, image: &str, offset: u64) -> u8 {
        within(&self.svc.ns, || {
            image_byte_of(&self.cluster.conf, image, offset)
        })
    }

    /// The cluster's blocklist (`osd blocklist ls`, exact entries and ranges): each entry as
    /// listed (`ADDR:PORT/NONCE`, `cidr:…` for a range).
    pub fn blocklist(&self) -> Vec<String> {
        self.cli("ceph", &["osd", "blocklist", "ls"])
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect()
    }

    /// `POST /v1/pre-instantiate` for `vm` of h1, to start on h2.
    pub fn pre_instantiate(&self, vm: &str, volumes: &[&str]) -> (u16, Value) {
        let body = serde_json::json!({
            "vm_uuid": vm,
            "failed_host": "h1",
            "target_host": "h2",
            "volumes": volumes,
        });
        self.http("POST", "/v1/pre-instantiate", Some(&body))
    }

    /// One HTTP/1.1 request to the service, from its namespace, bounded (120 s), with the
    /// world's token when it has one.
    pub fn http(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let auth = self
            .settings
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        self.http_with(method, path, body, &auth)
    }

    /// As [`World::http`], with `headers` (each ending in CRLF) instead of the token.
    pub fn http_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &str,
    ) -> (u16, Value) {
        let base = &self.service.as_ref().unwrap().base;
        let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
        let mut stream = within(&self.svc.ns, || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })
        .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let body = body.map(Value::to_string).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8_lossy(&raw);
        let (head, rest) = text.split_once("\r\n\r\n").unwrap();
        let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let body = if chunked { dechunk(rest) } else { rest.into() };
        let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
        (status, value)
    }

    /// A metric's value from the service's `/metrics` (0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.http("GET", "/metrics", None);
        text.as_str()
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits (bounded) until fence `id` is no longer in force.
    pub fn wait_lifted(&self, id: &str, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let record = self.fence_record(id);
            if record["state"]["in_force"] == false {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "fence {id} not lifted within {within:?}: {record:#}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits (bounded) until the cluster's blocklist is empty.
    pub fn wait_blocklist_empty(&self, what: &str, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let listed = self.blocklist();
            if listed.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: not within {within:?}: {listed:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `GET /v1/fences/ID`.
    pub fn fence_record(&self, id: &str) -> Value {
        let (status, v) = self.http("GET", &format!("/v1/fences/{id}"), None);
        assert_eq!(status, 200, "{v:#}");
        v
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// A micro Ceph cluster (`scripts/ceph-micro.sh`) running inside `node`'s namespace on its
/// storage address; stopped and purged when dropped.
pub struct NsCluster {
    pub dir: PathBuf,
    pub conf: PathBuf,
    ns: String,
}

impl NsCluster {
    pub fn up(node: &Node) -> NsCluster {
        let dir = std::env::temp_dir().join(format!("rbdfence-{}", node.ns));
        let ip = node.storage.unwrap().to_string();
        let out = within(&node.ns, || {
            Command::new("bash")
                .arg(super::repo().join("scripts/ceph-micro.sh"))
                .arg("up")
                .arg(&dir)
                .args(["--ip", &ip])
                .output()
                .unwrap()
        });
        let cluster = NsCluster {
            conf: dir.join("ceph.conf"),
            dir,
            ns: node.ns.clone(),
        };
        assert!(
            out.status.success(),
            "ceph-micro.sh up in {}: {}{}",
            node.ns,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster
    }

    /// The pid of one of its daemons (`mon.a`, `osd.0`), from its pid file.
    pub fn daemon_pid(&self, name: &str) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("run").join(format!("{name}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for NsCluster {
    fn drop(&mut self) {
        let _ = within(&self.ns, || {
            Command::new("bash")
                .arg(super::repo().join("scripts/ceph-micro.sh"))
                .arg("down")
                .arg(&self.dir)
                .arg("--purge")
                .output()
        });
    }
}
