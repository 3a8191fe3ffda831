//! The SSH kill step end to end: a real OpenSSH sshd as the host, a real qemu as the VM, and
//! decoy processes that must survive. Every test uses its own loopback address, temp dirs and
//! uuids, and ends every process it starts (guards' `Drop`), even when it fails.
//!
//! Loopback addresses used: 127.0.0.41 – 127.0.0.49 and 127.0.0.51 – 127.0.0.60.
#![allow(clippy::unwrap_used)]

#[path = "common/sshd.rs"]
mod sshd;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rbdfence::fence::ssh::{
    Jumps, KillReport, MAX_KILL_BATCH, Route, SocketSweep, SshError, SshSettings, SshTarget, Stage,
    connect_shared, kill_qemu, kill_qemus,
};
use rbdfence::fence::vm::VmUuid;
use sshd::{ClientKey, Sshd, send_signal, write_known_hosts, write_known_hosts_with_wrong_key};

/// Generous budgets: a loaded 2-core CI machine must not turn a slow login into a failure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// Slack allowed on top of a timeout before we call it a hang.
const TIMEOUT_SLACK: Duration = Duration::from_secs(5);

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

fn random_uuid() -> VmUuid {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn settings(client: &ClientKey, known_hosts: &Path) -> SshSettings {
    SshSettings {
        user: "root".to_owned(),
        identity: client.identity().to_owned(),
        known_hosts: known_hosts.to_owned(),
        connect_timeout: CONNECT_TIMEOUT,
        command_timeout: COMMAND_TIMEOUT,
    }
}

fn target(host_uuid: &str, sshd: &Sshd) -> SshTarget {
    SshTarget {
        host_uuid: host_uuid.to_owned(),
        addr: sshd.addr(),
        storage: vec![],
    }
}

/// A live process: exists and is not a zombie (state from /proc/PID/stat).
fn is_live(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.split(' ').next());
    !matches!(state, Some("Z" | "X"))
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// A real qemu (paused, no disk) carrying `-uuid`, daemonized; SIGKILLed on drop if still ours.
struct Qemu {
    _dir: tempfile::TempDir,
    pid: u32,
    uuid: VmUuid,
}

impl Qemu {
    fn start(uuid: &VmUuid) -> Qemu {
        let dir = tempfile::Builder::new()
            .prefix("rbdfence-qemu-")
            .tempdir()
            .unwrap();
        let pid_file = dir.path().join("qemu.pid");
        let out = Command::new("qemu-system-x86_64")
            .args(["-S", "-nodefaults", "-display", "none", "-name", "guest=t"])
            .args(["-uuid", uuid.as_str(), "-m", "64", "-daemonize", "-pidfile"])
            .arg(&pid_file)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "qemu failed to start: {out:?}");
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let qemu = Qemu {
            _dir: dir,
            pid,
            uuid: uuid.clone(),
        };
        assert!(is_live(pid), "qemu {pid} is not running");
        assert!(
            qemu.is_ours(),
            "pid {pid} is not our qemu: {:?}",
            cmdline(pid)
        );
        qemu
    }

    /// The pid still names our qemu (guards against a recycled pid in `Drop`).
    fn is_ours(&self) -> bool {
        let args = cmdline(self.pid);
        args.windows(2)
            .any(|w| w[0] == "-uuid" && w[1] == self.uuid.as_str())
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.is_ours() {
            send_signal(self.pid, libc::SIGKILL);
        }
    }
}

/// A process whose argv the finder must judge: `/bin/sh` under a chosen argv[0], blocked in the
/// `read` builtin (no child process), with `extra` arguments after the script.
struct Decoy {
    child: Child,
}

impl Decoy {
    fn spawn(argv0: &str, extra: &[&str]) -> Decoy {
        let child = Command::new("/bin/sh")
            .arg0(argv0)
            .args(["-c", "read x", "rbdfence-decoy"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Wait (bounded) until the kernel shows the new argv.
        let deadline = Instant::now() + Duration::from_secs(5);
        while cmdline(pid).first().map(String::as_str) != Some(argv0) {
            assert!(
                Instant::now() < deadline,
                "decoy {pid} never showed argv0 {argv0}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Decoy { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Decoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_killed(report: &KillReport, pids: &[u32]) {
    assert!(report.qemu_found, "{report:?}");
    let mut got = report.pids.clone();
    got.sort_unstable();
    let mut want = pids.to_vec();
    want.sort_unstable();
    assert_eq!(got, want, "{report:?}");
    assert!(report.killed, "{report:?}");
    assert!(report.gone, "{report:?}");
    assert!(report.alive.is_empty(), "{report:?}");
    assert!(report.unknown.is_empty(), "{report:?}");
}

fn known_hosts_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("known_hosts")
}

#[tokio::test]
async fn e2e_direct_kill_kills_only_the_vms_qemu() {
    let client = ClientKey::generate();
    let host = Sshd::start(ip(51), &client);
    let dir = tempfile::tempdir().unwrap();
    let kh = known_hosts_path(&dir);
    write_known_hosts(&kh, &[&host]);

    let vm = random_uuid();
    let other_vm = random_uuid();
    let qemu = Qemu::start(&vm);
    let other_qemu = Qemu::start(&other_vm);
    let decoys = [
        // Carries the uuid after a flag that is not -uuid, and in -smbios under another key.
        Decoy::spawn("rbdfence-not-qemu", &["-uuidx", vm.as_str()]),
        Decoy::spawn("kvm", &["-smbios", &format!("type=1,serial={vm}")]),
        // Looks like qemu and carries the uuid, but not as the value of -uuid.
        Decoy::spawn("/usr/bin/qemu-system-x86_64", &["-name", vm.as_str()]),
        // Looks like qemu, with -uuid at the very end and no value.
        Decoy::spawn("/usr/bin/qemu-system-x86_64", &[vm.as_str(), "-uuid"]),
        // Another VM's qemu look-alike.
        Decoy::spawn("qemu-system-x86_64", &["-uuid", other_vm.as_str()]),
        // The uuid with something appended.
        Decoy::spawn("qemu-kvm", &["-uuid", &format!("{vm}0")]),
    ];

    let started = Instant::now();
    let report = kill_qemu(
        &settings(&client, &kh),
        Route::Direct(&target("h51", &host)),
        &vm,
    )
    .await
    .unwrap();
    eprintln!("direct kill round trip: {:?}", started.elapsed());

    assert_killed(&report, &[qemu.pid]);
    assert!(!is_live(qemu.pid), "qemu {} survived", qemu.pid);
    assert!(is_live(other_qemu.pid), "the other VM's qemu was killed");
    for d in &decoys {
        assert!(is_live(d.pid()), "decoy {:?} was killed", cmdline(d.pid()));
    }

    // Repeating the step is safe and now finds nothing.
    let again = kill_qemu(
        &settings(&client, &kh),
        Route::Direct(&target("h51", &host)),
        &vm,
    )
    .await
    .unwrap();
    assert!(
        !again.qemu_found && !again.killed && again.gone,
        "{again:?}"
    );
    assert!(is_live(other_qemu.pid));
}

#[tokio::test]
async fn e2e_qemu_kvm_with_an_uppercase_uuid_is_matched() {
    let client = ClientKey::generate();
    let host = Sshd::start(ip(57), &client);
    let dir = tempfile::tempdir().unwrap();
    let kh = known_hosts_path(&dir);
    write_known_hosts(&kh, &[&host]);

    let vm = random_uuid();
    // A qemu-kvm look-alike, started by hand with the uuid in upper case.
    let kvm = Decoy::spawn("/usr/libexec/qemu-kvm", &["-uuid", &vm.to_uppercase()]);
    let bystander = Decoy::spawn("bash", &["-name", &vm.to_uppercase()]);
    let report = kill_qemu(
        &settings(&client, &kh),
        Route::Direct(&target("h57", &host)),
        &vm,
    )
    .await
    .unwrap();
    // Our child: a zombie until reaped, which counts as gone.
    assert_killed(&report, &[kvm.pid()]);
    assert!(!is_live(kvm.pid()));
    assert!(is_live(bystander.pid()));
}

#[tokio::test]
async fn e2e_via_jump_host_kills_over_a_tunnel_and_verifies_both_keys() {
    let client = ClientKey::generate();
    let jump = Sshd::start(ip(52), &client);
    let host = Sshd::start(ip(53), &client);
    let dir = tempfile::tempdir().unwrap();
    let kh = known_hosts_path(&dir);
    let (jump_t, host_t) = (target("h52", &jump), target("h53", &host));
    let route = Route::Via {
        jump: &jump_t,
        target: &host_t,
    };
    let vm = random_uuid();
    let qemu = Qemu::start(&vm);

    // Only the jump host known: the target's key is checked by the target's own address.
    write_known_hosts(&kh, &[&jump]);
    let err = kill_qemu(&settings(&client, &kh), route, &vm)
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::HostKeyUnknown { .. }), "{err}");
    assert_eq!(err.peer().unwrap().host_uuid, "h53", "{err}");
    // Only the target known: the jump host is refused before anything is tunnelled.
    write_known_hosts(&kh, &[&host]);
    let err = kill_qemu(&settings(&client, &kh), route, &vm)
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::HostKeyUnknown { .. }), "{err}");
    assert_eq!(err.peer().unwrap().host_uuid, "h52", "{err}");
    // The target's recorded key is wrong.
    write_known_hosts_with_wrong_key(&kh, &host, &[&jump]);
    let err = kill_qemu(&settings(&client, &kh), route, &vm)
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::HostKeyChanged { .. }), "{err}");
    assert_eq!(err.peer().unwrap().addr, host.addr(), "{err}");
    assert!(
        is_live(qemu.pid),
        "qemu died although no session was trusted"
    );

    write_known_hosts(&kh, &[&jump, &host]);
    let started = Instant::now();
    let report = kill_qemu(&settings(&client, &kh), route, &vm)
        .await
        .unwrap();
    eprintln!("via-jump kill round trip: {:?}", started.elapsed());
    assert_killed(&report, &[qemu.pid]);
    assert!(!is_live(qemu.pid));

    // The jump host relayed a direct-tcpip channel to the target's sshd...
    let want = format!("target {} port {}", host.addr().ip(), host.addr().port());
    let jump_log = jump.log();
    assert!(
        jump_log.contains("direct-tcpip") && jump_log.contains(&want),
        "jump sshd log lacks a direct-tcpip to {want}:\n{jump_log}"
    );
    // ...and the target accepted our key over it.
    let host_log = host.log();
    assert!(
        host_log.contains("Accepted publickey for root"),
        "{host_log}"
    );
}

#[tokio::test]
async fn e2e_already_dead_reports_gone_without_killing() {
    let client = ClientKey::generate();
    let host = Sshd::start(ip(54), &client);
    let dir = tempfile::tempdir().unwrap();
    let kh = known_hosts_path(&dir);
    write_known_hosts(&kh, &[&host]);
    let vm = random_uuid();
    let report = kill_qemu(
        &settings(&client, &kh),
        Route::Direct(&target("h54", &host)),
        &vm,
    )
    .await
    .unwrap();
    assert_eq!(
        report,
        KillReport {
            qemu_found: false,
            pids: vec![],
            killed: false,
            gone: true,
            alive: vec![],
            unknown: vec![],
            sockets: Some(SocketSweep {
                aborted: 0,
                held: Some(0),
            }),
        }
    );

    // The command's budget bounds it too (here it cannot even open the session channel).
    let mut s = settings(&client, &kh);
    s.command_timeout = Duration::from_millis(1);
    let started = Instant::now();
    let err = kill_qemu(&s, Route::Direct(&target("h54", &host)), &vm)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SshError::Timeout {
                stage: Stage::Command,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        started.elapsed() < CONNECT_TIMEOUT,
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn e2e_unknown_or_changed_host_keys_and_bad_identity_are_refused() {
    let client = ClientKey::generate();
    let host = Sshd::start(ip(55), &client);
    let dir = tempfile::tempdir().unwrap();
    let kh = known_hosts_path(&dir);
    let t = target("h55", &host);
    let vm = random_uuid();
    let qemu = Qemu::start(&vm);

    write_known_hosts_with_wrong_key(&kh, &host, &[]);
    let before = std::fs::read(&kh).unwrap();
    let err = kill_qemu(&settings(&client, &kh), Route::Direct(&t), &vm)
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::HostKeyChanged { .. }), "{err}");
    assert_eq!(err.label(), "host_key");
    assert_eq!(err.stage(), Some(Stage::Handshake));
    let text = err.to_string();
    assert!(
        text.contains("h55") && text.contains(&host.addr().to_string()),
        "{text}"
    );
    assert_eq!(
        std::fs::read(&kh).unwrap(),
        before,
        "known_hosts was modified"
    );

    std::fs::write(&kh, "").unwrap();
    let err = kill_qemu(&settings(&client, &kh), Route::Direct(&t), &vm)
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::HostKeyUnknown { .. }), "{err}");
    assert_eq!(err.label(), "host_key");
    assert!(
        std::fs::read(&kh).unwrap().is_empty(),
        "known_hosts was written"
    );

    // A known_hosts entry for the same ip on another port does not vouch for this one.
    let other_port = SocketAddr::from((ip(55), host.addr().port().wrapping_add(1).max(1)));
    std::fs::write(
        &kh,
        format!(
            "{} {}\n",
            sshd::known_hosts_name(other_port),
            host.host_key()
        ),
    )
    .unwrap();
    let err = kill_qemu(&settings(&client, &kh), Route::Direct(&t), &vm)
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::HostKeyUnknown { .. }), "{err}");

    // A missing known_hosts file is a configuration error, not an empty list.
    let missing = dir.path().join("no-such-known-hosts");
    let err = kill_qemu(&settings(&client, &missing), Route::Direct(&t), &vm)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SshError::LocalFile {
                what: "known_hosts",
                ..
            }
        ),
        "{err}"
    );
    assert!(!missing.exists());

    // A key the host does not authorise.
    write_known_hosts(&kh, &[&host]);
    let stranger = ClientKey::generate();
    let err = kill_qemu(&settings(&stranger, &kh), Route::Direct(&t), &vm)
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::Auth { .. }), "{err}");
    assert_eq!(err.label(), "auth");

    // The host's true key, revoked: refused, also when the revocation's key type is mistyped
    // (such a line does not parse; it still revokes the key in it).
    let name = sshd::known_hosts_name(host.addr());
    let blob = host.host_key().split(' ').nth(1).unwrap().to_string();
    for revocation in [
        format!("@revoked {name} {}", host.host_key()),
        format!("@revoked {name} ssh-ed19995 {blob}"),
    ] {
        std::fs::write(&kh, format!("{}\n{revocation}\n", host.known_hosts_line())).unwrap();
        let err = kill_qemu(&settings(&client, &kh), Route::Direct(&t), &vm)
            .await
            .unwrap_err();
        assert!(
            matches!(err, SshError::HostKeyRevoked { .. }),
            "{revocation}: {err}"
        );
        assert_eq!(err.label(), "host_key");
    }

    assert!(is_live(qemu.pid), "qemu must survive every refused attempt");
    assert!(qemu.is_ours());

    // Hashed entries (`ssh-keygen -H`) of the true key are trusted: the kill goes through.
    write_known_hosts(&kh, &[&host]);
    let out = std::process::Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(&kh)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let hashed = std::fs::read_to_string(&kh).unwrap();
    assert!(
        hashed.lines().any(|l| l.starts_with("|1|"))
            && !hashed.contains(&host.addr().ip().to_string()),
        "{hashed}"
    );
    let report = kill_qemu(&settings(&client, &kh), Route::Direct(&t), &vm)
        .await
        .unwrap();
    assert_killed(&report, &[qemu.pid]);
}

#[tokio::test]
async fn e2e_nothing_listening_fails_fast_and_a_frozen_sshd_times_out() {
    let client = ClientKey::generate();
    let host = Sshd::start(ip(56), &client);
    let jump = Sshd::start(ip(58), &client);
    let dir = tempfile::tempdir().unwrap();
    let kh = known_hosts_path(&dir);
    write_known_hosts(&kh, &[&host, &jump]);
    let vm = random_uuid();
    let short = Duration::from_secs(2);
    let mut s = settings(&client, &kh);
    s.connect_timeout = short;

    // Nothing listens on this port.
    let closed = SshTarget {
        host_uuid: "h56-closed".to_owned(),
        addr: SocketAddr::from((ip(56), sshd::free_port(ip(56)))),
        storage: vec![],
    };
    let started = Instant::now();
    let err = kill_qemu(&s, Route::Direct(&closed), &vm)
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, SshError::Connect { .. }), "{err}");
    assert_eq!(err.label(), "connect");
    assert!(
        took < Duration::from_secs(2),
        "refused connect took {took:?}"
    );

    // The listener is stopped: TCP completes in the kernel, but no banner ever comes.
    host.freeze();
    let t = target("h56", &host);
    let started = Instant::now();
    let err = kill_qemu(&s, Route::Direct(&t), &vm).await.unwrap_err();
    let took = started.elapsed();
    eprintln!("frozen sshd, direct: {err} after {took:?}");
    assert!(
        matches!(
            err,
            SshError::Timeout {
                stage: Stage::Handshake,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.label(), "timeout");
    assert!(took >= short - Duration::from_millis(50), "{took:?}");
    assert!(took <= short + TIMEOUT_SLACK, "{took:?}");

    // Through a healthy jump host to the frozen target: bounded by the target hop's budget.
    let jump_t = target("h58", &jump);
    let started = Instant::now();
    let err = kill_qemu(
        &s,
        Route::Via {
            jump: &jump_t,
            target: &t,
        },
        &vm,
    )
    .await
    .unwrap_err();
    let took = started.elapsed();
    eprintln!("frozen sshd, via jump: {err} after {took:?}");
    assert!(
        matches!(
            err,
            SshError::Timeout {
                stage: Stage::Handshake,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.peer().unwrap().host_uuid, "h56");
    assert!(took <= short + short + TIMEOUT_SLACK, "{took:?}");
    host.thaw();
}

#[test]
fn hostile_uuids_cannot_be_constructed() {
    for hostile in [
        "$(reboot)",
        "`reboot`",
        "; reboot",
        "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b; reboot",
        "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5'",
        "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f 4a5",
        "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f\n4a5",
        "0b6e1f2a3c4d4e5f8a9b0c1d2e3f4a5$",
        "",
    ] {
        assert!(hostile.parse::<VmUuid>().is_err(), "accepted {hostile:?}");
    }
    let vm: VmUuid = "0B6E1F2A3C4D4E5F8A9B0C1D2E3F4A5B".parse().unwrap();
    let cmd = rbdfence::fence::ssh::kill_command(&vm, &[]);
    assert!(cmd.contains("U=\"0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b\"\n"));
    let other: VmUuid = "0b6e1f2a3c4d4e5f8a9b0c1d2e3f4a5c".parse().unwrap();
    let cmd = rbdfence::fence::ssh::kill_batch_command(&[vm, other], &[]);
    assert!(cmd.contains(
        "U=\"0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b 0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5c\"\n"
    ));
}

/// How many sessions `sshd` accepted so far (one `Accepted publickey` line per login).
fn accepted_sessions(sshd: &Sshd) -> usize {
    sshd.log().matches("Accepted publickey for root").count()
}

#[tokio::test]
async fn e2e_one_session_kills_the_qemus_of_several_vms_and_spares_the_rest() {
    let client = ClientKey::generate();
    let host = Sshd::start(ip(59), &client);
    let dir = tempfile::tempdir().unwrap();
    let kh = known_hosts_path(&dir);
    write_known_hosts(&kh, &[&host]);
    let t = target("h59", &host);
    let s = settings(&client, &kh);

    let (a, b, c, spared_vm) = (random_uuid(), random_uuid(), random_uuid(), random_uuid());
    let qa = Qemu::start(&a);
    let qb = Qemu::start(&b);
    let qc = Qemu::start(&c);
    let spared = Qemu::start(&spared_vm);
    // A qemu look-alike of the spared VM that also names a requested uuid under -name.
    let decoy = Decoy::spawn(
        "qemu-system-x86_64",
        &["-uuid", spared_vm.as_str(), "-name", a.as_str()],
    );

    // Nothing to do: no session at all.
    assert_eq!(
        kill_qemus(&s, Route::Direct(&t), &[]).await.unwrap(),
        vec![]
    );
    // Too many: refused before connecting.
    let too_many: Vec<VmUuid> = (0..=MAX_KILL_BATCH).map(|_| random_uuid()).collect();
    let err = kill_qemus(&s, Route::Direct(&t), &too_many)
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::BatchTooLarge { .. }), "{err}");
    assert_eq!(accepted_sessions(&host), 0, "{}", host.log());

    // The batch, in an order other than the qemus' start order.
    let started = Instant::now();
    let reports = kill_qemus(&s, Route::Direct(&t), &[c.clone(), a.clone(), b.clone()])
        .await
        .unwrap();
    eprintln!("batch of 3 kill round trip: {:?}", started.elapsed());
    assert_eq!(reports.len(), 3);
    assert_killed(&reports[0], &[qc.pid]);
    assert_killed(&reports[1], &[qa.pid]);
    assert_killed(&reports[2], &[qb.pid]);
    for q in [&qa, &qb, &qc] {
        assert!(!is_live(q.pid), "qemu {} of {} survived", q.pid, q.uuid);
    }
    assert!(is_live(spared.pid), "the unrequested VM's qemu was killed");
    assert!(spared.is_ours());
    assert!(is_live(decoy.pid()), "the decoy was killed");
    // One login, one command, for all three VMs.
    let log = host.log();
    assert_eq!(accepted_sessions(&host), 1, "{log}");

    // Again, with a uuid repeated: it is sent once, reported twice, and all is already gone.
    let again = kill_qemus(&s, Route::Direct(&t), &[a.clone(), b.clone(), a.clone()])
        .await
        .unwrap();
    assert_eq!(again.len(), 3);
    assert_eq!(again[0], again[2]);
    for r in &again {
        assert!(!r.qemu_found && !r.killed && r.gone, "{r:?}");
    }
    assert_eq!(accepted_sessions(&host), 2, "{}", host.log());
    assert!(is_live(spared.pid));
}

#[tokio::test]
async fn e2e_batch_with_an_absent_vm_reports_it_gone_and_kills_the_others() {
    let client = ClientKey::generate();
    let host = Sshd::start(ip(60), &client);
    let dir = tempfile::tempdir().unwrap();
    let kh = known_hosts_path(&dir);
    write_known_hosts(&kh, &[&host]);
    let t = target("h60", &host);
    let s = settings(&client, &kh);

    let (x, absent, y) = (random_uuid(), random_uuid(), random_uuid());
    let qx = Qemu::start(&x);
    let qy = Qemu::start(&y);
    let reports = kill_qemus(&s, Route::Direct(&t), &[x.clone(), absent, y.clone()])
        .await
        .unwrap();
    assert_eq!(reports.len(), 3);
    assert_killed(&reports[0], &[qx.pid]);
    assert_eq!(
        reports[1],
        KillReport {
            qemu_found: false,
            pids: vec![],
            killed: false,
            gone: true,
            alive: vec![],
            unknown: vec![],
            sockets: Some(SocketSweep {
                aborted: 0,
                held: Some(0),
            }),
        }
    );
    assert_killed(&reports[2], &[qy.pid]);
    assert!(!is_live(qx.pid) && !is_live(qy.pid));
    assert_eq!(accepted_sessions(&host), 1, "{}", host.log());

    // The cost of a batch: one session for 1, 10 and 50 VMs without a qemu (direct route).
    let mut sessions = 1;
    for n in [1usize, 10, 50] {
        let batch: Vec<VmUuid> = (0..n).map(|_| random_uuid()).collect();
        let mut took = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            let reports = kill_qemus(&s, Route::Direct(&t), &batch).await.unwrap();
            took.push(started.elapsed());
            sessions += 1;
            assert_eq!(reports.len(), n);
            assert!(
                reports.iter().all(|r| !r.qemu_found && r.gone),
                "{reports:?}"
            );
        }
        took.sort_unstable();
        eprintln!(
            "batch of {n} absent VMs, one session each: min {:?}, median {:?}, max {:?}",
            took[0], took[1], took[2]
        );
    }
    assert_eq!(accepted_sessions(&host), sessions, "{}", host.log());
}

/// The pids whose parent is `parent` (sshd's per-connection processes, for its listener).
fn children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let after = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or("");
        if after.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            out.push(pid);
        }
    }
    out
}

#[tokio::test]
async fn e2e_tunnels_opened_together_share_one_login_to_the_jump_host() {
    let client = ClientKey::generate();
    let jump = Sshd::start(ip(41), &client);
    let hosts: Vec<Sshd> = (42..45).map(|i| Sshd::start(ip(i), &client)).collect();
    let dir = tempfile::tempdir().unwrap();
    let kh = known_hosts_path(&dir);
    let mut all: Vec<&Sshd> = hosts.iter().collect();
    all.push(&jump);
    write_known_hosts(&kh, &all);
    let s = settings(&client, &kh);
    let jump_t = target("j41", &jump);
    let targets: Vec<SshTarget> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| target(&format!("h{}", 42 + i), h))
        .collect();
    let jumps = Jumps::default();

    // Three failed hosts at once, through the same sibling: one login to it.
    let connected = futures::future::join_all(targets.iter().map(|t| {
        connect_shared(
            &s,
            &jumps,
            Route::Via {
                jump: &jump_t,
                target: t,
            },
        )
    }))
    .await;
    let connected: Vec<_> = connected.into_iter().map(Result::unwrap).collect();
    assert_eq!(jumps.held(), 1);
    assert_eq!(accepted_sessions(&jump), 1, "{}", jump.log());
    // Each tunnel is its own session to its own host, and runs its own command.
    let vms: Vec<VmUuid> = connected.iter().map(|_| random_uuid()).collect();
    let reports = futures::future::join_all(
        connected
            .iter()
            .zip(&vms)
            .map(|(c, vm)| c.kill_qemus(&s, std::slice::from_ref(vm))),
    )
    .await;
    for (r, h) in reports.into_iter().zip(&hosts) {
        let r = r.unwrap();
        assert!(r[0].gone && !r[0].qemu_found, "{r:?}");
        assert_eq!(accepted_sessions(h), 1, "{}", h.log());
    }
    // The login lives while a tunnel holds it, and no longer.
    let mut connected = connected.into_iter();
    connected.next().unwrap().close().await;
    assert_eq!(jumps.held(), 1);
    for c in connected {
        c.close().await;
    }
    assert_eq!(jumps.held(), 0);
    let again = connect_shared(
        &s,
        &jumps,
        Route::Via {
            jump: &jump_t,
            target: &targets[0],
        },
    )
    .await
    .unwrap();
    assert_eq!(accepted_sessions(&jump), 2, "{}", jump.log());
    again.close().await;
}

#[tokio::test]
async fn e2e_a_shared_jump_login_that_died_is_replaced_and_not_blamed_on_the_target() {
    let client = ClientKey::generate();
    let jump = Sshd::start(ip(45), &client);
    let host = Sshd::start(ip(46), &client);
    let dir = tempfile::tempdir().unwrap();
    let kh = known_hosts_path(&dir);
    write_known_hosts(&kh, &[&jump, &host]);
    let s = settings(&client, &kh);
    let (jump_t, host_t) = (target("j45", &jump), target("h46", &host));
    let route = Route::Via {
        jump: &jump_t,
        target: &host_t,
    };
    let jumps = Jumps::default();
    let first = connect_shared(&s, &jumps, route).await.unwrap();
    // The sibling's sshd drops the login (its per-connection processes end) while the first
    // tunnel still holds it.
    let served = children(jump.pid());
    assert!(!served.is_empty(), "no per-connection sshd process found");
    for pid in served {
        send_signal(pid, libc::SIGKILL);
    }
    let dropped = Instant::now();
    while first
        .kill_qemus(&s, std::slice::from_ref(&random_uuid()))
        .await
        .is_ok()
    {
        assert!(
            dropped.elapsed() < COMMAND_TIMEOUT,
            "the tunnel outlived its jump login"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The next tunnel logs in again: the dead login is neither reused nor taken for an
    // answer about the target.
    let second = connect_shared(&s, &jumps, route).await.unwrap();
    assert_eq!(accepted_sessions(&jump), 2, "{}", jump.log());
    let r = second
        .kill_qemus(&s, std::slice::from_ref(&random_uuid()))
        .await
        .unwrap();
    assert!(r[0].gone, "{r:?}");
    second.close().await;
    first.close().await;
    assert_eq!(jumps.held(), 0);
}

#[tokio::test]
async fn e2e_a_jump_host_that_refuses_to_forward_is_the_error_not_the_target() {
    let client = ClientKey::generate();
    let jump = Sshd::start_configured(ip(45), &client, "AllowTcpForwarding no\n");
    let host = Sshd::start(ip(46), &client);
    let dir = tempfile::tempdir().unwrap();
    let kh = known_hosts_path(&dir);
    write_known_hosts(&kh, &[&jump, &host]);
    let (jump_t, host_t) = (target("j45", &jump), target("h46", &host));
    let err = kill_qemu(
        &settings(&client, &kh),
        Route::Via {
            jump: &jump_t,
            target: &host_t,
        },
        &random_uuid(),
    )
    .await
    .unwrap_err();
    // The route walk passes over a sibling whose errors name it; an error naming the failed
    // host would end the walk with "unreachable" although another sibling may reach it.
    assert_eq!(err.stage(), Some(Stage::Tunnel), "{err}");
    assert_eq!(err.peer().unwrap().host_uuid, "j45", "{err}");
    assert_eq!(accepted_sessions(&host), 0, "{}", host.log());
}

/// Stopped processes, continued and killed when dropped (also on a failed assertion): the
/// per-connection processes of a test's own sshd.
struct Frozen(Vec<u32>);

impl Drop for Frozen {
    fn drop(&mut self) {
        for &pid in &self.0 {
            send_signal(pid, libc::SIGCONT);
            send_signal(pid, libc::SIGKILL);
        }
    }
}

/// Every descendant of `root`.
fn descendants(root: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut queue = vec![root];
    while let Some(p) = queue.pop() {
        for c in children(p) {
            out.push(c);
            queue.push(c);
        }
    }
    out
}

#[tokio::test]
async fn e2e_a_jump_login_that_stopped_answering_is_the_error_not_the_target() {
    let client = ClientKey::generate();
    let jump = Sshd::start(ip(47), &client);
    let hosts = [Sshd::start(ip(48), &client), Sshd::start(ip(49), &client)];
    let dir = tempfile::tempdir().unwrap();
    let kh = known_hosts_path(&dir);
    write_known_hosts(&kh, &[&jump, &hosts[0], &hosts[1]]);
    let s = SshSettings {
        connect_timeout: Duration::from_secs(2),
        ..settings(&client, &kh)
    };
    let jump_t = target("j47", &jump);
    let (first_t, second_t) = (target("h48", &hosts[0]), target("h49", &hosts[1]));
    let jumps = Jumps::default();
    let first = connect_shared(
        &s,
        &jumps,
        Route::Via {
            jump: &jump_t,
            target: &first_t,
        },
    )
    .await
    .unwrap();
    // The sibling hangs (its processes for the login stopped; the TCP connection stays up)
    // while the first tunnel holds the login; the second failed host is fine.
    let frozen = Frozen(descendants(jump.pid()));
    assert!(!frozen.0.is_empty(), "no per-connection sshd process found");
    for &pid in &frozen.0 {
        send_signal(pid, libc::SIGSTOP);
    }
    let started = Instant::now();
    let err = connect_shared(
        &s,
        &jumps,
        Route::Via {
            jump: &jump_t,
            target: &second_t,
        },
    )
    .await
    .err()
    .expect("a tunnel through a hung jump host cannot open");
    // Named as the jump host's failure, the route walk tries the next sibling; named as the
    // failed host's, it would stop there with "unreachable".
    assert_eq!(err.stage(), Some(Stage::Tunnel), "{err}");
    assert_eq!(err.peer().unwrap().host_uuid, "j47", "{err}");
    assert!(
        started.elapsed() < s.connect_timeout + TIMEOUT_SLACK,
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(accepted_sessions(&hosts[1]), 0, "{}", hosts[1].log());
    drop(frozen);
    first.close().await;
}
