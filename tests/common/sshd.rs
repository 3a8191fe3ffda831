//! A real OpenSSH sshd as a test "host", without systemd.
//!
//! [`Sshd::start`] runs `/usr/sbin/sshd -D -f CONF -E LOG` in a fresh temp dir with its own
//! ed25519 host key, listening on `ip:PORT` (a port that was free a moment before; retried if
//! another process takes it first), accepting only [`ClientKey`]'s public key, and waits — bounded
//! — until it really answers with an SSH banner. `-D` keeps it our child, so its pid (also written
//! to its `PidFile`) is known and it can be reaped. [`Drop`] thaws it, ends it (SIGTERM, then
//! SIGKILL) and waits for it.
//!
//! Helpers write `known_hosts` files in OpenSSH format (`[ip]:port ssh-ed25519 AAAA…`), including
//! one that records a wrong key for a host.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";
/// How long sshd may take to start listening on a loaded machine.
const START_WITHIN: Duration = Duration::from_secs(15);
const PORT_ATTEMPTS: usize = 8;

/// Sends `sig` to `pid` (a process this test started). Returns whether it was delivered.
pub fn send_signal(pid: u32, sig: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    #[allow(unsafe_code)]
    // SAFETY: kill(2) takes plain integers and has no memory-safety preconditions; `pid` is
    // positive, so this never signals a process group, and it names a process this test started.
    let rc = unsafe { libc::kill(pid, sig) };
    rc == 0
}

/// Runs `ssh-keygen` to make an unencrypted ed25519 key pair at `path` (+ `.pub`); returns the
/// public key as `ssh-ed25519 AAAA…` (without comment).
pub fn generate_ed25519(path: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "rbdfence-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen");
    assert!(out.status.success(), "ssh-keygen failed: {out:?}");
    let public = std::fs::read_to_string(path.with_extension("pub")).expect("read public key");
    let mut fields = public.split_whitespace();
    let (Some(alg), Some(b64)) = (fields.next(), fields.next()) else {
        panic!("unexpected public key file: {public:?}");
    };
    format!("{alg} {b64}")
}

/// A client identity: an ed25519 key pair in its own temp dir.
pub struct ClientKey {
    _dir: tempfile::TempDir,
    identity: PathBuf,
    public: String,
}

impl ClientKey {
    pub fn generate() -> ClientKey {
        let dir = tempfile::Builder::new()
            .prefix("rbdfence-client-key-")
            .tempdir()
            .expect("temp dir");
        let identity = dir.path().join("id_ed25519");
        let public = generate_ed25519(&identity);
        ClientKey {
            _dir: dir,
            identity,
            public,
        }
    }

    /// The private key file (OpenSSH format).
    pub fn identity(&self) -> &Path {
        &self.identity
    }

    /// `ssh-ed25519 AAAA…`
    pub fn public(&self) -> &str {
        &self.public
    }
}

/// A running sshd, ended on drop.
pub struct Sshd {
    dir: tempfile::TempDir,
    child: Child,
    /// Started under a wrapper (its own PID namespace): `child` is the wrapper, and the pid
    /// file holds a pid of that namespace, never signalled.
    wrapped: bool,
    addr: SocketAddr,
    host_key: String,
}

impl Sshd {
    /// Starts sshd on `ip` (a free port), authorising `client`. Panics if it does not listen in
    /// time.
    pub fn start(ip: Ipv4Addr, client: &ClientKey) -> Sshd {
        Self::start_wrapped(ip, client, &[], "")
    }

    /// As [`Sshd::start`], with `config` (whole `sshd_config` lines) ahead of the usual
    /// configuration: sshd takes the first value it reads for a keyword, so these win.
    #[allow(dead_code)]
    pub fn start_configured(ip: Ipv4Addr, client: &ClientKey, config: &str) -> Sshd {
        Self::start_wrapped(ip, client, &[], config)
    }

    /// As [`Sshd::start`], but sshd runs in a PID namespace of its own with its own `/proc`
    /// (a containerised sshd): it sees only its own processes, not the host's.
    pub fn start_in_own_pid_namespace(ip: Ipv4Addr, client: &ClientKey) -> Sshd {
        Self::start_wrapped(
            ip,
            client,
            &["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
            "",
        )
    }

    fn start_wrapped(ip: Ipv4Addr, client: &ClientKey, wrapper: &[&str], config: &str) -> Sshd {
        assert!(
            ip.is_loopback() || (ip.octets()[0] == 198 && ip.octets()[1] & 0xfe == 18),
            "tests use loopback addresses, or 198.18.0.0/15 inside their own network namespaces"
        );
        std::fs::create_dir_all("/run/sshd").expect("mkdir -p /run/sshd");
        let dir = tempfile::Builder::new()
            .prefix("rbdfence-sshd-")
            .tempdir()
            .expect("temp dir");
        let host_key = generate_ed25519(&dir.path().join("host_ed25519"));
        std::fs::write(
            dir.path().join("authorized_keys"),
            format!("{}\n", client.public()),
        )
        .expect("write authorized_keys");

        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port(ip);
            let addr = SocketAddr::from((ip, port));
            let conf = write_config(dir.path(), addr, config);
            let log = dir.path().join("sshd.log");
            let pid_file = dir.path().join("sshd.pid");
            let _ = std::fs::remove_file(&log);
            let _ = std::fs::remove_file(&pid_file);
            let mut cmd = match wrapper.split_first() {
                Some((program, args)) => {
                    let mut c = Command::new(program);
                    c.args(args).arg(SSHD);
                    c
                }
                None => Command::new(SSHD),
            };
            let mut child = cmd
                .arg("-D")
                .arg("-f")
                .arg(&conf)
                .arg("-E")
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn sshd");
            if wait_listening(&mut child, addr, &pid_file, !wrapper.is_empty()) {
                return Sshd {
                    dir,
                    child,
                    wrapped: !wrapper.is_empty(),
                    addr,
                    host_key,
                };
            }
            // Not listening: most likely another process took the port meanwhile. Retry.
            last_log = std::fs::read_to_string(&log).unwrap_or_default();
            stop_child(&mut child, &pid_file, !wrapper.is_empty());
        }
        panic!("sshd on {ip} did not start listening; last log:\n{last_log}");
    }

    /// The address sshd listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listener's pid (as in its `PidFile`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `ssh-ed25519 AAAA…`
    pub fn host_key(&self) -> &str {
        &self.host_key
    }

    /// `[ip]:port ssh-ed25519 AAAA…` (or `ip ssh-ed25519 AAAA…` on port 22).
    pub fn known_hosts_line(&self) -> String {
        format!("{} {}", known_hosts_name(self.addr), self.host_key)
    }

    /// sshd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// SIGSTOP the listener (not for a wrapped sshd): TCP connects still complete (kernel backlog) but nobody answers.
    pub fn freeze(&self) {
        assert!(send_signal(self.pid(), libc::SIGSTOP), "SIGSTOP sshd");
    }

    /// SIGCONT the listener.
    pub fn thaw(&self) {
        send_signal(self.pid(), libc::SIGCONT);
    }

    fn stop(&mut self) {
        let pid_file = self.dir.path().join("sshd.pid");
        stop_child(&mut self.child, &pid_file, self.wrapped);
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls until sshd answers with an OpenSSH banner on `addr` and its pid file names it.
/// `wrapped`: sshd runs under a wrapper (its pid file names it in its own namespace).
fn wait_listening(child: &mut Child, addr: SocketAddr, pid_file: &Path, wrapped: bool) -> bool {
    let deadline = Instant::now() + START_WITHIN;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return false;
        }
        let started = match read_pid(pid_file) {
            Some(p) => wrapped || p == child.id(),
            None => false,
        };
        if started && banner_ok(addr) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

fn banner_ok(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while got.len() < 16 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    // Send a banner back so sshd logs a clean disconnect rather than a timeout.
    let _ = stream.write_all(b"SSH-2.0-rbdfence_probe\r\n");
    got.starts_with(b"SSH-2.0-OpenSSH")
}

fn read_pid(pid_file: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

/// Thaws and ends sshd (SIGTERM, then SIGKILL after 3 s) and reaps it. The pid file's pid is
/// signalled too, should it ever differ from the child's.
fn stop_child(child: &mut Child, pid_file: &Path, wrapped: bool) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    // The pid file's pid is signalled too, should it ever differ from the child's (never
    // for a wrapped sshd: its pid file holds a pid of its own namespace; `--kill-child` ends it).
    let mut pids = vec![child.id()];
    if let Some(p) = read_pid(pid_file).filter(|p| !wrapped && *p != child.id()) {
        pids.push(p);
    }
    for &p in &pids {
        send_signal(p, libc::SIGCONT);
        send_signal(p, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The name OpenSSH files `addr` under in known_hosts.
pub fn known_hosts_name(addr: SocketAddr) -> String {
    if addr.port() == 22 {
        addr.ip().to_string()
    } else {
        format!("[{}]:{}", addr.ip(), addr.port())
    }
}

/// Writes a known_hosts file with the true keys of `sshds`.
pub fn write_known_hosts(path: &Path, sshds: &[&Sshd]) {
    let mut text = String::from("# written by the rbdfence test fixture\n");
    for s in sshds {
        let _ = writeln!(text, "{}", s.known_hosts_line());
    }
    std::fs::write(path, text).expect("write known_hosts");
}

/// Writes a known_hosts file that records a freshly generated (wrong) ed25519 key for `wrong`'s
/// address, and the true keys of `others`.
pub fn write_known_hosts_with_wrong_key(path: &Path, wrong: &Sshd, others: &[&Sshd]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let bogus = generate_ed25519(&dir.path().join("bogus"));
    assert_ne!(bogus, wrong.host_key());
    let mut text = format!("{} {bogus}\n", known_hosts_name(wrong.addr()));
    for s in others {
        let _ = writeln!(text, "{}", s.known_hosts_line());
    }
    std::fs::write(path, text).expect("write known_hosts");
}

/// A port on `ip` that nobody listens on right now.
pub fn free_port(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// `SetEnv SHLVL=1`: bash, root's login shell here, sources `~/.bashrc` for a command run by
/// sshd unless SHLVL says it is nested; this machine's root `.bashrc` runs `pyenv init`, which
/// costs ~0.2 s of CPU per command and is no part of a hypervisor's fence.
fn write_config(dir: &Path, addr: SocketAddr, first: &str) -> PathBuf {
    let d = dir.display();
    let conf = format!(
        "{first}ListenAddress {addr}\n\
         HostKey {d}/host_ed25519\n\
         PidFile {d}/sshd.pid\n\
         AuthorizedKeysFile {d}/authorized_keys\n\
         UsePAM no\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PubkeyAuthentication yes\n\
         StrictModes no\n\
         PermitRootLogin prohibit-password\n\
         AllowTcpForwarding yes\n\
         UseDNS no\n\
         PrintMotd no\n\
         MaxStartups 100\n\
         SetEnv SHLVL=1\n\
         LogLevel DEBUG1\n"
    );
    let path = dir.join("sshd_config");
    std::fs::write(&path, conf).expect("write sshd_config");
    path
}
