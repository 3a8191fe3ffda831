//! Fixtures for the tests that run against a real Ceph cluster, real holders and real qemu.
//!
//! The cluster is the one `scripts/ceph-micro.sh up DIR` starts; tests find it through
//! `RBDFENCE_TEST_CLUSTER=DIR` (`scripts/test.sh` sets it). Without it they fail, saying how
//! to start one: in CI these tests run, never skip.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rbdfence::rbd::{Ceph, ConnectOptions, ImageSpec, Timeouts};

pub mod netns;
pub mod running;
pub mod sshd;
pub mod stack;
pub mod vm;
pub mod world;

/// The micro cluster the tests run against.
pub struct Cluster {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub ip: String,
}

pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let dir = std::env::var_os("RBDFENCE_TEST_CLUSTER")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                panic!(
                    "RBDFENCE_TEST_CLUSTER is not set. These tests need a real Ceph cluster: run \
                 `scripts/test.sh` (starts one), or `scripts/ceph-micro.sh up DIR` and export \
                 RBDFENCE_TEST_CLUSTER=DIR"
                )
            });
        let conf = dir.join("ceph.conf");
        assert!(
            conf.exists(),
            "{} has no ceph.conf: is it a ceph-micro.sh cluster directory?",
            dir.display()
        );
        let ip = std::fs::read_to_string(dir.join(".ceph-micro"))
            .unwrap_or_default()
            .trim()
            .to_string();
        Cluster { dir, conf, ip }
    })
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn connect_options(id: &str, secs: u64) -> ConnectOptions {
    let t = Duration::from_secs(secs);
    ConnectOptions {
        conf: cluster().conf.clone(),
        id: id.to_string(),
        timeouts: Timeouts { op: t, mount: t },
    }
}

/// A native admin connection to the test cluster.
pub async fn admin() -> Ceph {
    Ceph::connect(connect_options("admin", 10))
        .await
        .unwrap_or_else(|e| panic!("connect to the test cluster: {e}"))
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a Ceph CLI (`rbd`, `ceph`) as admin against the test cluster; panics on failure.
pub fn ceph_cli(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .arg("--conf")
        .arg(&cluster().conf)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An RBD image created for one test, removed when dropped.
pub struct TestImage {
    pub spec: ImageSpec,
}

impl TestImage {
    pub fn create(prefix: &str) -> TestImage {
        let name = unique(prefix);
        ceph_cli("rbd", &["create", &format!("rbd/{name}"), "--size", "16M"]);
        TestImage {
            spec: format!("rbd/{name}").parse().unwrap(),
        }
    }

    /// An image in RBD namespace `namespace` of pool `rbd` (created if missing; namespaces are
    /// left behind, empty, for other tests to reuse).
    pub fn create_in_namespace(namespace: &str, prefix: &str) -> TestImage {
        let name = unique(prefix);
        let listed = ceph_cli("rbd", &["namespace", "ls", "rbd", "--format", "json"]);
        if !listed.contains(&format!("\"{namespace}\"")) {
            ceph_cli("rbd", &["namespace", "create", &format!("rbd/{namespace}")]);
        }
        let spec = format!("rbd/{namespace}/{name}");
        ceph_cli("rbd", &["create", &spec, "--size", "16M"]);
        TestImage {
            spec: spec.parse().unwrap(),
        }
    }

    pub fn name(&self) -> String {
        self.spec.to_string()
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        // Best effort: a holder that was fenced may still be registered for a moment.
        let _ = Command::new("rbd")
            .arg("--conf")
            .arg(&cluster().conf)
            .args(["rm", "--no-progress", &self.spec.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `rbd status --format json` watchers, as (address, client, cookie).
pub fn rbd_status_watchers(image: &str) -> Vec<(String, i64, u64)> {
    let out = ceph_cli("rbd", &["status", "--format", "json", image]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut w: Vec<(String, i64, u64)> = v["watchers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["address"].as_str().unwrap().to_string(),
                w["client"].as_i64().unwrap(),
                w["cookie"].as_u64().unwrap(),
            )
        })
        .collect();
    w.sort();
    w
}

/// Compiles the C fixture `source` (relative to the repo) with `cc ARGS`, into
/// `target/test-fixtures/NAME-PID`; panics naming it if that fails.
pub fn build_c_fixture(source: &str, name: &str, args: &[&str]) -> PathBuf {
    let out_dir = repo().join("target").join("test-fixtures");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(format!("{name}-{}", std::process::id()));
    let status = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&out)
        .arg(repo().join(source))
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("cannot run cc: {e}"));
    assert!(status.success(), "building {source} failed");
    out
}

/// The LD_PRELOAD shim that makes a client appear from its own 127.x address, built once.
pub fn bind_shim() -> &'static Path {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        build_c_fixture(
            "tests/fixtures/bindaddr.c",
            "bindaddr.so",
            &["-shared", "-fPIC", "-ldl"],
        )
    })
}

/// A FUSE filesystem (tests/fixtures/hangfs.c) whose one file hangs every reader, mounted on a
/// temp dir; ended (the hung readers then fail) and unmounted when dropped.
pub struct HangFs {
    child: Child,
    pub dir: tempfile::TempDir,
}

impl HangFs {
    pub fn mount() -> HangFs {
        static BIN: OnceLock<PathBuf> = OnceLock::new();
        let bin =
            BIN.get_or_init(|| build_c_fixture("tests/fixtures/hangfs.c", "hangfs", &["-Wall"]));
        let dir = tempfile::Builder::new()
            .prefix("rbdfence-hangfs-")
            .tempdir()
            .unwrap();
        let mut child = Command::new(bin)
            .arg(dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "hangfs did not mount");
        HangFs { child, dir }
    }

    /// The file that hangs its readers.
    pub fn disk(&self) -> PathBuf {
        self.dir.path().join("disk")
    }
}

impl Drop for HangFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A real librados client (tests/fixtures/holder.py) holding an image open read-write from
/// its own 127.x address, like a running VM.
pub struct Holder {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub address: String,
    pub ip: String,
}

impl Holder {
    pub fn start(image: &TestImage, ip: &str) -> Holder {
        Self::try_start(image, ip).unwrap_or_else(|e| panic!("holder from {ip}: {e}"))
    }

    /// Starts a holder; `Err(line)` when it could not open the image (`fail ERRNO …`).
    pub fn try_start(image: &TestImage, ip: &str) -> Result<Holder, String> {
        let mut child = Command::new("/usr/bin/python3")
            .arg(repo().join("tests/fixtures/holder.py"))
            .arg("--conf")
            .arg(&cluster().conf)
            .args(["--id", "admin", "--image", &image.name()])
            .env("LD_PRELOAD", bind_shim())
            .env("RBDFENCE_BIND_ADDR", ip)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start holder.py: {e}"));
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let line = line.trim().to_string();
        let Some(address) = line.strip_prefix("ready ") else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(line);
        };
        let address = address.to_string();
        assert!(
            address.starts_with(&format!("{ip}:")),
            "holder came from {address}, wanted {ip}"
        );
        Ok(Holder {
            child,
            stdin,
            stdout,
            address,
            ip: ip.to_string(),
        })
    }

    fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    /// Writes 4 KiB of `byte` at `offset`: `Ok(())` or `Err(errno)`.
    pub fn write(&mut self, offset: u64, byte: u8) -> Result<(), i32> {
        let reply = self.ask(&format!("write {offset} {byte:02x} 4096"));
        match reply.strip_prefix("err ") {
            None if reply == "ok" => Ok(()),
            Some(n) => Err(n.parse().unwrap()),
            None => panic!("holder answered {reply:?}"),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn freeze(&self) {
        signal(self.pid(), libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        signal(self.pid(), libc::SIGCONT);
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.thaw();
        // A clean close drops the watch now; a killed client's watch lingers until
        // osd_client_watch_timeout and delays removing the image.
        let _ = writeln!(self.stdin, "quit").and_then(|_| self.stdin.flush());
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `sig` to a process this test started.
pub fn signal(pid: i32, sig: i32) {
    #[allow(unsafe_code)]
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is a child of this test.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "{what}: not seen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Removes a blocklist entry when dropped, so a failed test leaves no fence behind.
pub struct BlocklistGuard {
    pub entries: Vec<String>,
}

impl Drop for BlocklistGuard {
    fn drop(&mut self) {
        for e in &self.entries {
            let range = matches!(e.parse(), Ok(rbdfence::rbd::BlocklistEntry::Range(_)));
            let args: &[&str] = if range {
                &["osd", "blocklist", "range", "rm"]
            } else {
                &["osd", "blocklist", "rm"]
            };
            let _ = Command::new("ceph")
                .arg("--conf")
                .arg(&cluster().conf)
                .args(args)
                .arg(e)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Waits until `img` has no watchers (a frozen client's watch expiring, a fenced one's
/// dropped) and returns the status then seen.
pub async fn no_watchers(
    what: &str,
    img: &TestImage,
    within: Duration,
) -> rbdfence::rbd::ImageStatus {
    let ceph = admin().await;
    eventually(what, within, || {
        let ceph = ceph.clone();
        let spec = img.spec.clone();
        async move {
            ceph.image_status(&spec)
                .await
                .ok()
                .filter(|s| s.watchers.is_empty())
        }
    })
    .await
}

impl BlocklistGuard {
    /// Lifts whatever a fence reply says it blocklisted, when the test ends.
    pub fn for_reply(reply: &serde_json::Value) -> BlocklistGuard {
        let entries = reply["evidence"]["blocklist"]["entries"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        BlocklistGuard { entries }
    }
}
