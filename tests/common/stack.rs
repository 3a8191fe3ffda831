//! Three test hosts with real sshds and the service config that names them.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use super::TestImage;
use super::cluster;
use super::sshd::{ClientKey, Sshd, write_known_hosts};

pub fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// A fresh, valid VM uuid.
pub fn new_uuid() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let h = format!(
        "{:032x}",
        n ^ (u128::from(std::process::id()) << 64)
            ^ (u128::from(N.fetch_add(1, Ordering::Relaxed)) << 96)
    );
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Three hosts of cluster c1: h1 fails (storage + sshd on .A), h2 is the HA target (.A+1, no
/// sshd), h3 a healthy sibling (sshd on .A+2). Writes the service config.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub key: ClientKey,
    pub failed_ip: Ipv4Addr,
    pub failed_sshd: Option<Sshd>,
    pub sibling_sshd: Sshd,
    pub config: PathBuf,
    /// Extra TOML appended to the [api] section (e.g. a token file).
    pub api_extra: String,
    /// The ledger in RADOS (pool `rbd`, this namespace) instead of the local file.
    pub ledger_namespace: Option<String>,
    /// `fence.blocklist_expire_secs` (600 unless a test changes it).
    pub expire_secs: u64,
    /// Extra TOML for the [fence] section.
    pub fence_extra: String,
}

impl Stack {
    pub fn new(base: u8) -> Stack {
        Self::with_failed_sshd(base, Sshd::start)
    }

    /// As [`Stack::new`], with the failed host's sshd started by `start` (e.g.
    /// [`Sshd::start_in_own_pid_namespace`]).
    pub fn with_failed_sshd(base: u8, start: fn(Ipv4Addr, &ClientKey) -> Sshd) -> Stack {
        let key = ClientKey::generate();
        let failed_ip = ip(base);
        let failed_sshd = start(failed_ip, &key);
        let sibling_sshd = Sshd::start(ip(base + 2), &key);
        let dir = tempfile::Builder::new()
            .prefix("rbdfence-e2e-")
            .tempdir()
            .unwrap();
        write_known_hosts(
            &dir.path().join("known_hosts"),
            &[&failed_sshd, &sibling_sshd],
        );
        let mut s = Stack {
            config: dir.path().join("rbdfence.toml"),
            api_extra: String::new(),
            ledger_namespace: None,
            expire_secs: 600,
            fence_extra: String::new(),
            dir,
            key,
            failed_ip,
            failed_sshd: Some(failed_sshd),
            sibling_sshd,
        };
        s.write_config("rbdfence", &cluster().conf.clone());
        s
    }

    pub fn write_config(&mut self, ceph_id: &str, ceph_conf: &std::path::Path) {
        let failed_ssh = self
            .failed_sshd
            .as_ref()
            .map(|s| s.addr().to_string())
            .unwrap_or(format!("{}:1", self.failed_ip));
        let o = self.failed_ip.octets()[3];
        let text = format!(
            r#"
[api]
listen = "127.0.0.1:0"
{api_extra}
[ceph]
conf = "{conf}"
id = "{ceph_id}"
op_timeout_secs = 5
connect_timeout_secs = 5
[fence]
blocklist_expire_secs = {expire}
lift_quiet_secs = 0
deadline_secs = 40
ssh_timeout_secs = 20
{fence_extra}
{ledger}
[ssh]
user = "root"
identity = "{identity}"
known_hosts = "{known_hosts}"
connect_timeout_secs = 3
command_timeout_secs = 10
[[hosts]]
uuid = "h1"
cluster = "c1"
storage_addrs = ["127.0.0.{o}"]
ssh = "{failed_ssh}"
[[hosts]]
uuid = "h2"
cluster = "c1"
storage_addrs = ["127.0.0.{t}"]
ssh = "127.0.0.{t}:1"
[[hosts]]
uuid = "h3"
cluster = "c1"
storage_addrs = ["127.0.0.{s}"]
ssh = "{sibling_ssh}"
"#,
            conf = ceph_conf.display(),
            api_extra = self.api_extra,
            expire = self.expire_secs,
            fence_extra = self.fence_extra,
            ledger = match &self.ledger_namespace {
                Some(ns) => format!("[ledger]\npool = \"rbd\"\nnamespace = \"{ns}\""),
                None => format!(
                    "ledger = \"{}\"",
                    self.dir.path().join("ledger.jsonl").display()
                ),
            },
            identity = self.key.identity().display(),
            known_hosts = self.dir.path().join("known_hosts").display(),
            t = o + 1,
            s = o + 2,
            sibling_ssh = self.sibling_sshd.addr(),
        );
        std::fs::write(&self.config, text).unwrap();
    }

    /// Runs `rbdfence fence --json` and returns (exit code, reply).
    pub fn fence(&self, vm: &str, volumes: &[&TestImage]) -> (i32, serde_json::Value) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rbdfence"));
        cmd.args(["fence", "--config"]).arg(&self.config);
        cmd.args([
            "--vm",
            vm,
            "--failed-host",
            "h1",
            "--target-host",
            "h2",
            "--json",
        ]);
        for v in volumes {
            cmd.args(["--volume", &v.name()]);
        }
        let out = cmd.output().unwrap();
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON reply ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), reply)
    }

    /// Switches the service to a fresh cephx user that may read images but not blocklist
    /// (`mon 'allow r'`): only an SSH proof can then approve. The user is removed when the
    /// returned guard drops.
    pub fn use_user_without_blocklist(&mut self) -> CephUser {
        let user = format!(
            "rbdfence-nobl-{}-{}",
            std::process::id(),
            self.failed_ip.octets()[3]
        );
        let keyring = self.dir.path().join("nobl.keyring");
        let conf = self.dir.path().join("nobl.conf");
        let out = Command::new("ceph")
            .arg("--conf")
            .arg(&cluster().conf)
            .args([
                "auth",
                "get-or-create",
                &format!("client.{user}"),
                "mon",
                "allow r",
                "osd",
                "profile rbd",
                "-o",
            ])
            .arg(&keyring)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&cluster().conf).unwrap();
        let text: String = text
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("keyring") {
                    format!("keyring = {}", keyring.display())
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&conf, text + "\n").unwrap();
        self.write_config(&user, &conf);
        CephUser { name: user }
    }

    pub fn ledger(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ledger.jsonl")).unwrap_or_default()
    }
}

/// A cephx user made for one test, removed when dropped.
pub struct CephUser {
    pub name: String,
}

impl Drop for CephUser {
    fn drop(&mut self) {
        let _ = Command::new("ceph")
            .arg("--conf")
            .arg(&cluster().conf)
            .args(["auth", "rm", &format!("client.{}", self.name)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// `rbdfence serve` as a real process, ended (SIGKILL) when dropped.
pub struct ServeProcess {
    pub child: std::process::Child,
    /// `http://IP:PORT`
    pub base: String,
    /// Every line it logged so far.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ServeProcess {
    /// Starts `rbdfence serve --config CONFIG` and waits (bounded) until it listens.
    pub fn start(config: &std::path::Path) -> ServeProcess {
        Self::start_with_env(config, &[])
    }

    /// As [`ServeProcess::start`], with extra environment variables (e.g. `RBDFENCE_LOG`).
    pub fn start_with_env(config: &std::path::Path, env: &[(&str, &str)]) -> ServeProcess {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_rbdfence"))
            .args(["serve", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                kept.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let listen = loop {
            let line = rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("rbdfence serve did not start");
            if let Some(rest) = line.split("listen=").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        ServeProcess {
            child,
            base: format!("http://{listen}"),
            log,
        }
    }

    /// SIGKILL, and reap it: nothing it held in memory survives.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
