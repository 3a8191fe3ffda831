//! The kill step of a fence: SIGKILL a VM's qemu on a host over SSH, and re-check that it is gone.
//!
//! # Expected flow
//! 1. Load the client identity (an unencrypted OpenSSH private key, normally ed25519) and the
//!    `known_hosts` file (on a blocking thread).
//! 2. Connect: [`Route::Direct`] opens TCP to the target's sshd; [`Route::Via`] first logs in to
//!    the jump host (with [`connect_shared`], the tunnels opened at the same time through one
//!    jump host share that login: see [`Jumps`]), opens a `direct-tcpip` channel from it to the
//!    target's ssh address, and runs a second, independent SSH session over that channel. Each
//!    hop verifies the server's host key against `known_hosts` (looked up by that hop's own
//!    address, `[ip]:port` when the port is not 22) and authenticates with the identity
//!    (publickey only).
//! 3. Run one command on the target (see [`kill_batch_command`]), for every VM of the batch at
//!    once: it scans `/proc` once for qemu processes whose argv carries `-uuid <uuid>` for one of
//!    the requested uuids, SIGKILLs all of them, polls (every 10 ms, then every 50 ms, for up to
//!    2 s, one window for the whole batch) until every thread of each is gone or a zombie,
//!    destroys the closed sockets on the host's storage addresses that still hold data, and
//!    prints one report line per requested uuid, which are parsed strictly into one
//!    [`KillReport`] per VM.
//!
//! [`kill_qemus`] takes up to [`MAX_KILL_BATCH`] VMs (one connection per hop, one `exec`);
//! [`kill_qemu`] is the same call for a single VM.
//!
//! # Guarantees
//! - A host key that is not in `known_hosts` ([`SshError::HostKeyUnknown`]), differs from the
//!   recorded one ([`SshError::HostKeyChanged`]) or is marked `@revoked`
//!   ([`SshError::HostKeyRevoked`]) aborts the hop before authentication; nothing is ever written
//!   to `known_hosts`. The key-exchange signature itself is checked by russh before we are asked.
//! - Only public-key authentication is attempted, never passwords or keyboard-interactive.
//! - Every step is bounded: TCP connect, SSH handshake and authentication share one
//!   `connect_timeout` per hop (for `Via`, the target's budget also covers opening the tunnel);
//!   opening the session channel, the command and reading its output share `command_timeout`.
//!   A peer that accepts TCP but never speaks ends in [`SshError::Timeout`], never a hang.
//! - The only caller-supplied text in the remote command is a list of [`VmUuid`]s, which admit
//!   only hex digits and hyphens, joined by spaces; the script around them is a constant. A batch
//!   holds at most [`MAX_KILL_BATCH`] uuids (about 9.5 KiB of command text).
//! - `gone == true` in a [`KillReport`] means the remote side positively observed that no thread
//!   of any matching process is alive (absent, or state `Z`/`X` — a zombie cannot issue I/O),
//!   that it could read the command line of every process it scanned, and that no closed socket
//!   on the host's storage addresses is left that could still deliver a dead process's unsent
//!   writes ([`SocketSweep`]: it aborts them and looks again). Anything short of that is
//!   `gone == false` or an error; callers must not treat an error as "gone".
//! - In a batch, each process is attributed to at most one VM. A process that cannot be
//!   attributed to exactly one — its command line is unreadable, or it is a qemu carrying two
//!   different requested uuids — is `unknown` in every report of the batch, and while it is alive
//!   no VM of the batch is `gone`. So batching never makes a VM `gone` where a call for that VM
//!   alone would not; in the ambiguous case the VMs show `qemu_found == false` with the process in
//!   `unknown` (killed all the same).
//! - The output must hold exactly one well-formed line per requested uuid, in any order, and the
//!   lines must agree with each other (same `unknown` list, no pid under two uuids); anything
//!   else is [`SshError::BadOutput`] for the whole batch.
//!
//! # Assumptions
//! - The login user can read every `/proc/PID/cmdline` and signal qemu (root). The script
//!   checks that it sees the host's initial PID namespace (`/proc/2/comm` is `kthreadd`: kernel
//!   threads are visible there only), that `/proc/1` is visible and that the scan finds its own
//!   shell; anything else is an error, never "not running". So an sshd in a container that sees
//!   only its own processes proves nothing.
//! - The VM's qemu carries its uuid as `-uuid <uuid>` (libvirt) or as `uuid=<uuid>` in a
//!   `-smbios` argument (Proxmox), in any case of the hex digits. The binary's name does not
//!   matter (`kvm`, `qemu-kvm`, `qemu-system-*`, a wrapper): every process is scanned.
//! - The login shell is POSIX-compatible enough to run `exec /bin/sh -c '…'`, and prints nothing
//!   on its own (a chatty `.bashrc` makes the output unparseable: [`SshError::BadOutput`]). The
//!   script uses `sh` builtins, `printf`, `sleep`, and `awk` to read the candidates' command
//!   lines in one process (an awk that cannot split records on NUL, such as busybox's, is
//!   detected and not used); without a usable `awk` it forks `tr` once per candidate instead.
//! - `ss` (iproute2) can list and destroy sockets (`ss -K`: Linux 4.5 or later, built with
//!   `CONFIG_INET_DIAG_DESTROY`, as Debian's and RHEL's kernels are). Without `ss` the sweep
//!   cannot look and no VM is `gone`; a socket it cannot destroy is still seen, and no VM is
//!   `gone` either. The sweep sees the login shell's network namespace only: a matched qemu in
//!   another one makes the sweep `?` (no VM `gone`); the shell's `test` must know `-ef` (dash,
//!   bash and busybox do).
//! - Jump hosts allow TCP forwarding (`AllowTcpForwarding yes`, OpenSSH's default).
//! - PIDs are not recycled between the scan and the `kill` a few milliseconds later.
//!
//! # Failure modes
//! Each [`SshError`] names the host (uuid and address) and, where it applies, the [`Stage`].
//! An error concerns the whole batch: nothing is known about any of its VMs.
//! [`SshError::label`] gives a bounded value for metrics. A timeout drops the connection; any
//! russh task left reading from a peer that stopped answering is reaped by the session's
//! inactivity timeout.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::ChannelMsg;
use russh::client::{self, AuthResult, Handle};
use russh::keys::PublicKeyOrCertificate;
use russh::keys::{Algorithm, HashAlg, PrivateKey, PrivateKeyWithHashAlg};
use tokio::net::TcpStream;
use tokio::time::timeout_at;

use super::vm::VmUuid;

mod jump;
mod known_hosts;

pub use jump::Jumps;
pub(crate) use known_hosts::{KnownHosts, Verdict, known_hosts_name};

mod report;

pub(crate) use report::parse_reports;
pub use report::{KillReport, SocketSweep};

/// Most VMs one [`kill_qemus`] call takes. The command carries 37 bytes per uuid (about 9.5 KiB
/// at the bound, far below any exec-request or argv limit); a caller with more VMs on one host
/// splits them into batches of at most this many.
pub const MAX_KILL_BATCH: usize = 256;
/// Upper bound on the stdout we accept. A report line without pids is under 100 bytes; 1 KiB per
/// line leaves room for pids, even for a batch at [`MAX_KILL_BATCH`].
const MAX_STDOUT: usize = MAX_KILL_BATCH * 1024;
/// How much of stderr or bad output an error keeps.
const MAX_ECHO: usize = 512;
/// How long a polite disconnect may take before the connection is simply dropped.
const DISCONNECT_GRACE: Duration = Duration::from_millis(500);
/// How long a jump host may take to answer a keepalive once opening a tunnel through it timed
/// out: an answer means it is still connecting to the target (the target's failure), none
/// means the jump host itself hangs.
const JUMP_PROBE: Duration = Duration::from_secs(1);
/// Placeholder in [`KILL_SCRIPT`] for the (validated) uuids, separated by single spaces.
const UUID_SLOT: &str = "@VM_UUIDS@";
/// Placeholder in [`KILL_SCRIPT`] for the target's storage addresses (printed [`IpAddr`]s: hex
/// digits, dots and colons), separated by single spaces.
const STORAGE_SLOT: &str = "@STORAGE_ADDRS@";

/// The remote kill script, `kill.sh` beside this file, sent verbatim (so it carries no comments:
/// they are here). POSIX sh; must contain no single quote (it is sent inside one).
///
/// `U` holds the requested uuids (lowercase, hyphenated, separated by single spaces); it is the
/// only variable part.
///
/// Scan (once for the whole batch): first the script refuses to answer unless `/proc/2/comm` is
/// `kthreadd` (it sees the host's initial PID namespace, not a container's). Every process is
/// a candidate, whatever its binary is called (the list is one glob of `/proc`, no file opened
/// per process; one whose command line cannot be read is counted below). The
/// candidates are matched on their argv: the argument after each `-uuid`/`--uuid`, and each
/// comma-separated `uuid=` field of the argument after each `-smbios`/`--smbios`, is looked
/// up, with A–F lowercased, as a whole word of `U` — so the value is exactly one requested
/// uuid, and a value holding a space, a newline or anything else matches nothing. A process
/// whose values name one requested uuid is recorded as `PID:UUID`; one naming two different
/// requested uuids is ambiguous: it is SIGKILLed too, but reported as `unknown` (attributed to
/// no VM).
///
/// The match runs in two ways with the same rules and the same result:
/// - Fast path: one `awk` (POSIX; mawk, gawk) for all candidates. It reads each
///   `/proc/PID/cmdline` with `getline` and `RS` set to NUL, so every record is one argument
///   (a newline is just data), and prints `PID UUID` per match, `PID -` per ambiguous process,
///   `PID ?` per command line it could not read (the shell then counts it `unknown` if the
///   process still exists), and `end` last. The PID is always the one it was given, never text
///   from the file. It prints `end` only if it read its own shell's command line as exactly
///   three arguments, `/bin/sh…`, `-c` and this script (so it does split on NUL; busybox awk
///   does not), and if opening a file that does not exist fails. The shell accepts the answer
///   only if awk exited 0 and every line is well formed: a candidate's PID, at most once, not
///   its own, with a word of `U`, `-` or `?`, followed by `end` and nothing else.
/// - Fallback, when awk is missing, fails or its answer is refused: for every candidate, `tr`
///   turns the command line into `\001`-separated fields (a newline or `\001` inside an
///   argument becomes `\002`, so it cannot forge a field) and lowercases A–F, and the shell
///   does the match.
///
/// Self-check: the script runs as `/bin/sh -c <script>`, so its own command line starts with
/// `/bin/sh` (the `read` path works) and holds the script with `U` (the awk or `tr` path works);
/// it refuses to report when either is not seen, so a missing `/proc` or a broken tool cannot
/// read as "no qemu". A process whose command line cannot be opened while it still exists is
/// reported as `unknown` and kept in the liveness check.
///
/// Liveness: a process whose leader is not a zombie is alive (one read of `/proc/PID/stat`);
/// otherwise it looks at every thread in `/proc/PID/task`, up to the first live one: a killed
/// thread group can have a zombie leader while other threads are still exiting. It is polled
/// every 10 ms for the first 50 ms (one qemu is usually gone by then), then every 50 ms, for up
/// to 2 s in all, for the matches of all uuids and the unknown processes together.
///
/// Sweep (once for the batch, after the liveness check; skipped when `N`, the target's storage
/// addresses, is empty): `ss` lists the orphaned TCP sockets (inode 0) from each address in
/// `FIN-WAIT-1`, `CLOSING` or `LAST-ACK` — closed by their process with data or a FIN not yet
/// acknowledged — and destroys each by its exact pair of addresses (`ss -K`); then it lists
/// them again. A killed qemu's write that was issued into a partition sits in such a socket,
/// and TCP would deliver it when the storage network answers again. Report `sockets=FOUND:LEFT`,
/// `?` where `ss` is missing or fails, or where a matched qemu ran in another network
/// namespace than the script's (checked before the kill, with `-ef` on `/proc/PID/ns/net`):
/// its sockets are out of the sweep's sight.
///
/// Report: one line per word of `U`, in that order: its own found, killed and alive pids, the
/// batch's unknown pids, and the alive unknown pids added to its alive list, so an unknown
/// process that lives makes every line `gone=0`; the sweep's counts, and unless it left
/// nothing, every line is `gone=0` too.
const KILL_SCRIPT: &str = include_str!("kill.sh");

/// How to log in to hosts. Shared by every hop of a route.
#[derive(Clone, Debug)]
pub struct SshSettings {
    /// Remote login user (normally `root`: the command reads every `/proc/PID/cmdline` and
    /// SIGKILLs qemu).
    pub user: String,
    /// Private key file, OpenSSH format, unencrypted (ed25519 recommended).
    pub identity: PathBuf,
    /// OpenSSH `known_hosts` file; hosts on a port other than 22 are written `[ip]:port`.
    /// Plain, wildcard (`*`, `?`), negated and hashed (`|1|…`) host patterns and the `@revoked`
    /// marker are understood; `@cert-authority` lines are ignored.
    pub known_hosts: PathBuf,
    /// Per hop: TCP connect + handshake + authentication (+ opening the tunnel, for the target
    /// of a [`Route::Via`]).
    pub connect_timeout: Duration,
    /// Opening the session channel, running the command and reading its output.
    pub command_timeout: Duration,
}

/// A host as reached over SSH.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshTarget {
    /// The inventory uuid of the host (for errors and logs).
    pub host_uuid: String,
    /// The host's sshd address.
    pub addr: SocketAddr,
    /// The host's storage addresses: the kill sweeps closed sockets on them that may still
    /// carry a dead qemu's writes (see [`SocketSweep`]). Empty: no sweep.
    pub storage: Vec<IpAddr>,
}

/// How to reach the host that runs the command.
#[derive(Clone, Copy, Debug)]
pub enum Route<'a> {
    /// Straight to the target.
    Direct(&'a SshTarget),
    /// Log in to `jump`, and from there tunnel (`direct-tcpip`) to `target`'s ssh address. Both
    /// hosts' keys are verified; the target's by its own address.
    Via {
        /// The host that relays the connection.
        jump: &'a SshTarget,
        /// The host that runs the command.
        target: &'a SshTarget,
    },
}

impl Route<'_> {
    /// The host that runs the command.
    pub fn target(&self) -> &SshTarget {
        match self {
            Route::Direct(target) | Route::Via { target, .. } => target,
        }
    }
}

/// A host in an error: inventory uuid and ssh address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The inventory uuid of the host.
    pub host_uuid: String,
    /// The sshd address used.
    pub addr: SocketAddr,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.host_uuid, self.addr)
    }
}

impl From<&SshTarget> for Peer {
    fn from(t: &SshTarget) -> Self {
        Peer {
            host_uuid: t.host_uuid.clone(),
            addr: t.addr,
        }
    }
}

/// The step that failed or timed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Opening the TCP connection.
    Tcp,
    /// Opening the `direct-tcpip` channel through the jump host.
    Tunnel,
    /// SSH version exchange, key exchange and host-key verification.
    Handshake,
    /// Public-key authentication.
    Auth,
    /// Opening the session channel and starting the command.
    Session,
    /// Running the command and reading its output.
    Command,
}

impl Stage {
    /// A fixed string for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Tcp => "tcp",
            Stage::Tunnel => "tunnel",
            Stage::Handshake => "handshake",
            Stage::Auth => "auth",
            Stage::Session => "session",
            Stage::Command => "command",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the kill step failed. None of these proves anything about the VM.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SshError {
    /// The identity or `known_hosts` file could not be read or parsed.
    #[error("ssh: cannot use {what} {path}: {message}")]
    LocalFile {
        /// `"identity"` or `"known_hosts"`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The TCP connection failed (refused, unreachable, …).
    #[error("ssh {peer}: tcp connect failed: {source}")]
    Connect {
        /// The host.
        peer: Peer,
        /// The socket error (shared: the callers waiting for one jump login all get it).
        source: Arc<std::io::Error>,
    },
    /// The SSH handshake failed for a reason other than the host key.
    #[error("ssh {peer}: handshake failed: {message}")]
    Handshake {
        /// The host.
        peer: Peer,
        /// russh's description.
        message: String,
    },
    /// The server's host key is not in `known_hosts`.
    #[error(
        "ssh {peer}: host key {fingerprint} is not in {known_hosts} (looked up as {:?}); \
         refusing to connect",
        known_hosts_name(.peer.addr)
    )]
    HostKeyUnknown {
        /// The host.
        peer: Peer,
        /// The key the server offered (`SHA256:…`).
        fingerprint: String,
        /// The file consulted.
        known_hosts: PathBuf,
    },
    /// `known_hosts` records a different key for this host.
    #[error(
        "ssh {peer}: host key {fingerprint} does not match {known_hosts} line {line} \
         (looked up as {:?}); refusing to connect",
        known_hosts_name(.peer.addr)
    )]
    HostKeyChanged {
        /// The host.
        peer: Peer,
        /// The key the server offered (`SHA256:…`).
        fingerprint: String,
        /// A line recording a key for this host.
        line: usize,
        /// The file consulted.
        known_hosts: PathBuf,
    },
    /// The server's host key is marked `@revoked` in `known_hosts`.
    #[error("ssh {peer}: host key {fingerprint} is revoked in {known_hosts} line {line}")]
    HostKeyRevoked {
        /// The host.
        peer: Peer,
        /// The key the server offered (`SHA256:…`).
        fingerprint: String,
        /// The `@revoked` line.
        line: usize,
        /// The file consulted.
        known_hosts: PathBuf,
    },
    /// The server did not accept the identity.
    #[error("ssh {peer}: public key authentication as {user:?} was refused")]
    Auth {
        /// The host.
        peer: Peer,
        /// The login user.
        user: String,
    },
    /// A channel could not be opened or the command could not be started.
    #[error("ssh {peer}: {stage} failed: {message}")]
    Channel {
        /// The host. For [`Stage::Tunnel`]: the target when the jump host answered that it
        /// cannot reach it; the jump host when it refused to forward or its session is gone.
        peer: Peer,
        /// [`Stage::Tunnel`], [`Stage::Session`] or [`Stage::Command`].
        stage: Stage,
        /// What happened.
        message: String,
    },
    /// A step did not finish in time.
    #[error("ssh {peer}: {stage} timed out after {after:?}")]
    Timeout {
        /// The host.
        peer: Peer,
        /// The step that was running.
        stage: Stage,
        /// The budget that ran out (`connect_timeout` or `command_timeout`).
        after: Duration,
    },
    /// The command ran but failed (non-zero exit, killed by a signal, or a precondition it
    /// checks).
    #[error("ssh {peer}: kill command failed: {reason}; stderr: {stderr:?}")]
    Remote {
        /// The host.
        peer: Peer,
        /// Exit status, signal, or the script's error code (`no-proc`, `self-check`).
        reason: String,
        /// The command's stderr, truncated.
        stderr: String,
    },
    /// The command exited 0 but its output is not a well-formed report for the batch.
    #[error("ssh {peer}: unexpected kill command output ({detail}): {output:?}")]
    BadOutput {
        /// The host.
        peer: Peer,
        /// What is wrong with it.
        detail: &'static str,
        /// The output, truncated.
        output: String,
    },
    /// [`kill_qemus`] was given more VMs than one session takes; nothing was attempted. The
    /// caller splits them into batches of at most `max`.
    #[error("ssh: {count} VMs in one kill batch, at most {max} are allowed; split the batch")]
    BatchTooLarge {
        /// How many were given.
        count: usize,
        /// [`MAX_KILL_BATCH`].
        max: usize,
    },
}

impl SshError {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SshError::LocalFile { .. } => "config",
            SshError::Connect { .. } => "connect",
            SshError::Handshake { .. } => "handshake",
            SshError::HostKeyUnknown { .. }
            | SshError::HostKeyChanged { .. }
            | SshError::HostKeyRevoked { .. } => "host_key",
            SshError::Auth { .. } => "auth",
            SshError::Channel { .. } => "channel",
            SshError::Timeout { .. } => "timeout",
            SshError::Remote { .. } => "remote",
            SshError::BadOutput { .. } => "bad_output",
            SshError::BatchTooLarge { .. } => "batch_too_large",
        }
    }

    /// The host the error concerns, when there is one.
    pub fn peer(&self) -> Option<&Peer> {
        match self {
            SshError::LocalFile { .. } | SshError::BatchTooLarge { .. } => None,
            SshError::Connect { peer, .. }
            | SshError::Handshake { peer, .. }
            | SshError::HostKeyUnknown { peer, .. }
            | SshError::HostKeyChanged { peer, .. }
            | SshError::HostKeyRevoked { peer, .. }
            | SshError::Auth { peer, .. }
            | SshError::Channel { peer, .. }
            | SshError::Timeout { peer, .. }
            | SshError::Remote { peer, .. }
            | SshError::BadOutput { peer, .. } => Some(peer),
        }
    }

    /// The step that failed, when known.
    pub fn stage(&self) -> Option<Stage> {
        match self {
            SshError::LocalFile { .. } | SshError::BatchTooLarge { .. } => None,
            SshError::Connect { .. } => Some(Stage::Tcp),
            SshError::Handshake { .. }
            | SshError::HostKeyUnknown { .. }
            | SshError::HostKeyChanged { .. }
            | SshError::HostKeyRevoked { .. } => Some(Stage::Handshake),
            SshError::Auth { .. } => Some(Stage::Auth),
            SshError::Channel { stage, .. } | SshError::Timeout { stage, .. } => Some(*stage),
            SshError::Remote { .. } | SshError::BadOutput { .. } => Some(Stage::Command),
        }
    }
}

/// The exact command sent to the target for `vm` alone: [`kill_batch_command`] of one uuid.
pub fn kill_command(vm: &VmUuid, storage: &[IpAddr]) -> String {
    kill_batch_command(std::slice::from_ref(vm), storage)
}

/// The exact command sent to the target for `vms`: `exec /bin/sh -c '<script>'`.
///
/// The script is a constant; its only variable part is the uuids, joined by single spaces, and a
/// [`VmUuid`] can only hold hex digits and hyphens. [`kill_qemus`] passes at most
/// [`MAX_KILL_BATCH`] distinct uuids.
pub fn kill_batch_command(vms: &[VmUuid], storage: &[IpAddr]) -> String {
    let uuids = vms.iter().map(VmUuid::as_str).collect::<Vec<_>>().join(" ");
    let addrs = storage
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "exec /bin/sh -c '{}'",
        KILL_SCRIPT
            .replace(UUID_SLOT, &uuids)
            .replace(STORAGE_SLOT, &addrs)
    )
}

/// Kill `vm`'s qemu on `route`'s target, and report what was seen: [`kill_qemus`] for one VM.
///
/// `Ok` means the command ran and reported; look at [`KillReport::gone`]. Every error means
/// nothing is known about the VM.
pub async fn kill_qemu(
    settings: &SshSettings,
    route: Route<'_>,
    vm: &VmUuid,
) -> Result<KillReport, SshError> {
    let mut reports = kill_qemus(settings, route, std::slice::from_ref(vm)).await?;
    match reports.pop() {
        Some(report) if reports.is_empty() => Ok(report),
        // Unreachable: kill_qemus returns exactly one report per VM.
        _ => Err(SshError::BadOutput {
            peer: Peer::from(route.target()),
            detail: "not exactly one report for one VM",
            output: String::new(),
        }),
    }
}

/// Kill the qemus of all `vms` on `route`'s target over one SSH session (one connection per hop,
/// one command), and report what was seen for each.
///
/// Returns one [`KillReport`] per entry of `vms`, in the same order (a uuid given twice gets two
/// equal reports; it is sent once). An empty `vms` returns `Ok(vec![])` without connecting; more
/// than [`MAX_KILL_BATCH`] entries is [`SshError::BatchTooLarge`], also without connecting —
/// callers split larger sets into several calls. `Ok` means the command ran and reported for
/// every VM; look at each [`KillReport::gone`]. Every error concerns the whole batch: nothing is
/// known about any of its VMs.
pub async fn kill_qemus(
    settings: &SshSettings,
    route: Route<'_>,
    vms: &[VmUuid],
) -> Result<Vec<KillReport>, SshError> {
    if vms.is_empty() {
        return Ok(Vec::new());
    }
    if vms.len() > MAX_KILL_BATCH {
        return Err(SshError::BatchTooLarge {
            count: vms.len(),
            max: MAX_KILL_BATCH,
        });
    }
    let connected = connect(settings, route).await.inspect_err(|e| {
        let target = route.target();
        tracing::warn!(
            host = %target.host_uuid, addr = %target.addr, vms = vms.len(), first_vm = %vms[0],
            error = %e, label = e.label(), "ssh kill step failed"
        );
    })?;
    let result = connected.kill_qemus(settings, vms).await;
    connected.close().await;
    result
}

/// A verified, logged-in SSH session to a route's target (and, for [`Route::Via`], the jump
/// session carrying it), ready to run the kill command. Opening it changes nothing on either
/// host, so the fence opens it while it gathers evidence and fences storage, and runs the kill
/// command on it only after the storage fence step.
pub struct Connected {
    session: Session,
    jump: Option<Arc<jump::Jump>>,
    target: SshTarget,
}

/// Connects along `route`: every host key verified, public-key login, each hop bounded by
/// `connect_timeout`. A [`Route::Via`] logs in to its jump host for this call alone; see
/// [`connect_shared`].
pub async fn connect(settings: &SshSettings, route: Route<'_>) -> Result<Connected, SshError> {
    connect_shared(settings, &Jumps::default(), route).await
}

/// [`connect`], but a [`Route::Via`] shares its login to the jump host with the other
/// tunnels `jumps` holds through it at the same time (see [`Jumps`]).
pub async fn connect_shared(
    settings: &SshSettings,
    jumps: &Jumps,
    route: Route<'_>,
) -> Result<Connected, SshError> {
    let creds = Arc::new(load_credentials(settings).await?);
    match route {
        Route::Direct(target) => Ok(Connected {
            session: open_direct(settings, &creds, target).await?,
            jump: None,
            target: target.clone(),
        }),
        Route::Via { jump, target } => {
            let shared = jumps.get(settings, &creds, jump).await?;
            let tunnelled = match shared.session() {
                Some(jump_session) => {
                    open_tunnelled(settings, &creds, jump_session, jump, target).await
                }
                // Unreachable: `get` returns logged-in sessions only.
                None => Err(SshError::Handshake {
                    peer: jump.into(),
                    message: "no jump session".into(),
                }),
            };
            match tunnelled {
                Ok(session) => Ok(Connected {
                    session,
                    jump: Some(shared),
                    target: target.clone(),
                }),
                Err(e) => {
                    jump::Jump::release(shared).await;
                    Err(e)
                }
            }
        }
    }
}

impl Connected {
    /// The host the kill command runs on.
    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    /// Runs the kill command for `vms` (at most [`MAX_KILL_BATCH`]) on this session: one report
    /// per entry of `vms`, in the same order, as [`kill_qemus`] describes.
    pub async fn kill_qemus(
        &self,
        settings: &SshSettings,
        vms: &[VmUuid],
    ) -> Result<Vec<KillReport>, SshError> {
        if vms.is_empty() {
            return Ok(Vec::new());
        }
        if vms.len() > MAX_KILL_BATCH {
            return Err(SshError::BatchTooLarge {
                count: vms.len(),
                max: MAX_KILL_BATCH,
            });
        }
        let mut unique: Vec<VmUuid> = Vec::with_capacity(vms.len());
        for vm in vms {
            if !unique.contains(vm) {
                unique.push(vm.clone());
            }
        }
        let started = Instant::now();
        let target = &self.target;
        let elapsed_ms = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let reports = match run_kill(settings, &self.session, target, &unique).await {
            Ok(reports) => reports,
            Err(e) => {
                tracing::warn!(
                    host = %target.host_uuid, addr = %target.addr, vms = unique.len(),
                    first_vm = %unique[0], error = %e, label = e.label(), elapsed_ms = elapsed_ms(),
                    "ssh kill step failed"
                );
                return Err(e);
            }
        };
        for (vm, report) in unique.iter().zip(&reports) {
            tracing::info!(
                host = %target.host_uuid, addr = %target.addr, vm = %vm,
                qemu_found = report.qemu_found, killed = report.killed, gone = report.gone,
                pids = ?report.pids, unknown = ?report.unknown, batch = unique.len(),
                elapsed_ms = elapsed_ms(), "ssh kill step finished"
            );
        }
        let mut ordered = Vec::with_capacity(vms.len());
        for vm in vms {
            match unique
                .iter()
                .position(|u| u == vm)
                .and_then(|i| reports.get(i))
            {
                Some(report) => ordered.push(report.clone()),
                // Unreachable: the parser returns one report per distinct uuid.
                None => {
                    return Err(SshError::BadOutput {
                        peer: Peer::from(target),
                        detail: "no report for a requested VM",
                        output: String::new(),
                    });
                }
            }
        }
        Ok(ordered)
    }

    /// Disconnects (the target session, then the jump session if no other tunnel holds
    /// it), bounded.
    pub async fn close(self) {
        close(self.session).await;
        if let Some(jump) = self.jump {
            jump::Jump::release(jump).await;
        }
    }
}

/// The identity and the parsed `known_hosts`, loaded once per call.
struct Credentials {
    identity: Arc<PrivateKey>,
    known_hosts: KnownHosts,
}

async fn load_credentials(settings: &SshSettings) -> Result<Credentials, SshError> {
    let identity_path = settings.identity.clone();
    let known_hosts_path = settings.known_hosts.clone();
    tokio::task::spawn_blocking(move || {
        let identity = russh::keys::load_secret_key(&identity_path, None).map_err(|e| {
            SshError::LocalFile {
                what: "identity",
                path: identity_path.clone(),
                message: e.to_string(),
            }
        })?;
        let known_hosts = KnownHosts::load(&known_hosts_path)?;
        Ok(Credentials {
            identity: Arc::new(identity),
            known_hosts,
        })
    })
    .await
    .map_err(|e| SshError::LocalFile {
        what: "identity",
        path: settings.identity.clone(),
        message: format!("loader task failed: {e}"),
    })?
}

/// The client side of one SSH connection.
type Session = Handle<Verifier>;

fn timeout(peer: &Peer, stage: Stage, after: Duration) -> SshError {
    SshError::Timeout {
        peer: peer.clone(),
        stage,
        after,
    }
}

/// Connect to `target` over TCP, verify it and log in.
async fn open_direct(
    settings: &SshSettings,
    creds: &Arc<Credentials>,
    target: &SshTarget,
) -> Result<Session, SshError> {
    let peer = Peer::from(target);
    let budget = settings.connect_timeout;
    let deadline = tokio::time::Instant::now() + budget;
    let stream = timeout_at(deadline, TcpStream::connect(target.addr))
        .await
        .map_err(|_| timeout(&peer, Stage::Tcp, budget))?
        .map_err(|source| SshError::Connect {
            peer: peer.clone(),
            source: Arc::new(source),
        })?;
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(addr = %target.addr, error = %e, "set_nodelay failed");
    }
    handshake_and_auth(settings, creds, peer, stream, deadline).await
}

/// Open a `direct-tcpip` channel from `jump_session` to `target`, and log in to `target` over it.
async fn open_tunnelled(
    settings: &SshSettings,
    creds: &Arc<Credentials>,
    jump_session: &Session,
    jump: &SshTarget,
    target: &SshTarget,
) -> Result<Session, SshError> {
    let peer = Peer::from(target);
    let budget = settings.connect_timeout;
    let deadline = tokio::time::Instant::now() + budget;
    let channel = timeout_at(
        deadline,
        jump_session.channel_open_direct_tcpip(
            target.addr.ip().to_string(),
            u32::from(target.addr.port()),
            "127.0.0.1",
            0,
        ),
    )
    .await;
    let Ok(channel) = channel else {
        return Err(tunnel_timed_out(jump_session, jump, &peer, budget).await);
    };
    let channel = channel.map_err(|e| match e {
        // The jump host answered: it could not reach the target's sshd.
        russh::Error::ChannelOpenFailure(russh::ChannelOpenFailure::ConnectFailed) => {
            SshError::Channel {
                peer: peer.clone(),
                stage: Stage::Tunnel,
                message: format!("jump host {} could not reach it: {e}", Peer::from(jump)),
            }
        }
        // The jump host refused to forward (not allowed, out of resources) or its session is
        // gone: about the jump host, which says nothing of the target.
        e => SshError::Channel {
            peer: Peer::from(jump),
            stage: Stage::Tunnel,
            message: format!("cannot open a tunnel to {peer} through it: {e}"),
        },
    })?;
    handshake_and_auth(settings, creds, peer, channel.into_stream(), deadline).await
}

/// Opening a tunnel to `target` timed out: about the target only if the jump host still
/// answers (it is still trying to connect, and a host that does not answer its connect is
/// unreachable from it); otherwise about the jump host, which hangs (its login may be one
/// that other tunnels opened earlier).
async fn tunnel_timed_out(
    jump_session: &Session,
    jump: &SshTarget,
    target: &Peer,
    budget: Duration,
) -> SshError {
    let answered = tokio::time::timeout(JUMP_PROBE, jump_session.send_ping())
        .await
        .is_ok_and(|r| r.is_ok())
        && !jump_session.is_closed();
    if answered {
        timeout(target, Stage::Tunnel, budget)
    } else {
        SshError::Channel {
            peer: Peer::from(jump),
            stage: Stage::Tunnel,
            message: format!(
                "opening a tunnel to {target} timed out after {budget:?}, and the jump host did \
                 not answer a keepalive within {JUMP_PROBE:?}"
            ),
        }
    }
}

async fn handshake_and_auth<S>(
    settings: &SshSettings,
    creds: &Arc<Credentials>,
    peer: Peer,
    stream: S,
    deadline: tokio::time::Instant,
) -> Result<Session, SshError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let budget = settings.connect_timeout;
    let lookup = known_hosts_name(peer.addr);
    let config = client_config(settings, creds.known_hosts.algorithms_for(&lookup));
    let verifier = Verifier {
        peer: peer.clone(),
        lookup,
        creds: Arc::clone(creds),
    };
    let mut session = timeout_at(deadline, client::connect_stream(config, stream, verifier))
        .await
        .map_err(|_| timeout(&peer, Stage::Handshake, budget))?
        .map_err(|e| match e {
            HopError::HostKey(e) => *e,
            HopError::Ssh(e) => SshError::Handshake {
                peer: peer.clone(),
                message: e.to_string(),
            },
        })?;

    let identity = Arc::clone(&creds.identity);
    let auth = async {
        let hash = if identity.algorithm().is_rsa() {
            session.best_supported_rsa_hash().await?.flatten()
        } else {
            None
        };
        session
            .authenticate_publickey(
                settings.user.clone(),
                PrivateKeyWithHashAlg::new(identity, hash),
            )
            .await
    };
    let result = timeout_at(deadline, auth)
        .await
        .map_err(|_| timeout(&peer, Stage::Auth, budget))?;
    match result {
        Ok(AuthResult::Success) => Ok(session),
        Ok(AuthResult::Failure { .. }) => Err(SshError::Auth {
            peer,
            user: settings.user.clone(),
        }),
        Err(e) => Err(SshError::Handshake {
            peer,
            message: format!("during authentication: {e}"),
        }),
    }
}

fn client_config(
    settings: &SshSettings,
    host_key_algorithms: Vec<Algorithm>,
) -> Arc<client::Config> {
    let mut preferred = russh::Preferred::default();
    if !host_key_algorithms.is_empty() {
        // Like OpenSSH: ask for the key types known_hosts records for this host, so a host that
        // also has other key types is not mistaken for a changed one.
        preferred.key = Cow::Owned(host_key_algorithms);
    }
    Arc::new(client::Config {
        // Backstop only: ends a session task left behind by a timeout, if its peer went silent.
        inactivity_timeout: Some(
            settings.connect_timeout + settings.command_timeout + Duration::from_secs(5),
        ),
        nodelay: true,
        preferred,
        ..Default::default()
    })
}

async fn close(session: Session) {
    let _ = tokio::time::timeout(
        DISCONNECT_GRACE,
        session.disconnect(russh::Disconnect::ByApplication, "", "en"),
    )
    .await;
}

/// What the command returned.
struct Output {
    stdout: Vec<u8>,
    stdout_overflow: bool,
    stderr: Vec<u8>,
    exit_status: Option<u32>,
    exit_signal: Option<String>,
}

async fn run_kill(
    settings: &SshSettings,
    session: &Session,
    target: &SshTarget,
    vms: &[VmUuid],
) -> Result<Vec<KillReport>, SshError> {
    let peer = Peer::from(target);
    let budget = settings.command_timeout;
    let deadline = tokio::time::Instant::now() + budget;
    let output = timeout_at(
        deadline,
        exec(session, &peer, kill_batch_command(vms, &target.storage)),
    )
    .await
    .map_err(|_| timeout(&peer, Stage::Command, budget))??;
    interpret(&peer, output, vms)
}

async fn exec(session: &Session, peer: &Peer, command: String) -> Result<Output, SshError> {
    let channel_error = |stage, message: String| SshError::Channel {
        peer: peer.clone(),
        stage,
        message,
    };
    let mut channel = session
        .channel_open_session()
        .await
        .map_err(|e| channel_error(Stage::Session, format!("open session channel: {e}")))?;
    channel
        .exec(true, command)
        .await
        .map_err(|e| channel_error(Stage::Session, format!("exec request: {e}")))?;
    let mut out = Output {
        stdout: Vec::new(),
        stdout_overflow: false,
        stderr: Vec::new(),
        exit_status: None,
        exit_signal: None,
    };
    while let Some(msg) = channel.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                if out.stdout.len() + data.len() > MAX_STDOUT {
                    out.stdout_overflow = true;
                } else {
                    out.stdout.extend_from_slice(&data);
                }
            }
            ChannelMsg::ExtendedData { data, .. } => {
                let room = MAX_ECHO.saturating_sub(out.stderr.len());
                out.stderr.extend_from_slice(&data[..data.len().min(room)]);
            }
            ChannelMsg::ExitStatus { exit_status } => out.exit_status = Some(exit_status),
            ChannelMsg::ExitSignal { signal_name, .. } => {
                out.exit_signal = Some(format!("{signal_name:?}"));
            }
            ChannelMsg::Failure => {
                return Err(channel_error(
                    Stage::Session,
                    "the server refused to run the command".to_owned(),
                ));
            }
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    Ok(out)
}

fn truncated(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    match text.char_indices().nth(MAX_ECHO) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.into_owned(),
    }
}

/// Turns the command's result into one report per entry of `vms` (distinct), in order.
fn interpret(peer: &Peer, out: Output, vms: &[VmUuid]) -> Result<Vec<KillReport>, SshError> {
    let stderr = truncated(&out.stderr);
    let bad = |detail| SshError::BadOutput {
        peer: peer.clone(),
        detail,
        output: truncated(&out.stdout),
    };
    let remote = |reason: String| SshError::Remote {
        peer: peer.clone(),
        reason,
        stderr: stderr.clone(),
    };
    if let Some(signal) = &out.exit_signal {
        return Err(remote(format!("killed by signal {signal}")));
    }
    if out.stdout_overflow {
        return Err(bad("more output than a batch can produce"));
    }
    let stdout = std::str::from_utf8(&out.stdout).map_err(|_| bad("not UTF-8"))?;
    match out.exit_status {
        Some(0) => parse_reports(stdout, vms).map_err(bad),
        Some(status) => match parse_error_line(stdout) {
            Some(code) => Err(remote(format!("{code} (exit status {status})"))),
            None => Err(remote(format!("exit status {status}"))),
        },
        None => Err(remote("no exit status reported".to_owned())),
    }
}

/// The script's own failure line: `rbdfence-kill error=CODE`.
fn parse_error_line(stdout: &str) -> Option<&'static str> {
    match stdout {
        "rbdfence-kill error=no-proc\n" => Some("no-proc: /proc is missing or hides processes"),
        "rbdfence-kill error=pid-namespace\n" => Some(
            "pid-namespace: the scan does not see the host's initial PID namespace (/proc/2 is not kthreadd), so it cannot prove a process gone",
        ),
        "rbdfence-kill error=self-check\n" => {
            Some("self-check: the /proc scan did not find its own shell")
        }
        _ => None,
    }
}

/// The russh handler: verifies the server's host key against `known_hosts`.
struct Verifier {
    peer: Peer,
    lookup: String,
    creds: Arc<Credentials>,
}

/// Error type of [`Verifier`]: russh's own, or our host-key verdict.
#[derive(Debug)]
enum HopError {
    Ssh(russh::Error),
    HostKey(Box<SshError>),
}

impl From<russh::Error> for HopError {
    fn from(e: russh::Error) -> Self {
        HopError::Ssh(e)
    }
}

impl client::Handler for Verifier {
    type Error = HopError;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let known = &self.creds.known_hosts;
        let key = match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            // We never advertise certificate algorithms; treat one as an unknown key.
            PublicKeyOrCertificate::Certificate(cert) => {
                return Err(HopError::HostKey(Box::new(SshError::HostKeyUnknown {
                    peer: self.peer.clone(),
                    fingerprint: format!(
                        "certificate for {}",
                        cert.public_key().fingerprint(HashAlg::Sha256)
                    ),
                    known_hosts: known.path.clone(),
                })));
            }
        };
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let error = match known.verify(&self.lookup, key) {
            Verdict::Trusted => {
                tracing::debug!(host = %self.peer, %fingerprint, "host key verified");
                return Ok(true);
            }
            Verdict::Unknown => SshError::HostKeyUnknown {
                peer: self.peer.clone(),
                fingerprint,
                known_hosts: known.path.clone(),
            },
            Verdict::Changed { line } => SshError::HostKeyChanged {
                peer: self.peer.clone(),
                fingerprint,
                line,
                known_hosts: known.path.clone(),
            },
            Verdict::Revoked { line } => SshError::HostKeyRevoked {
                peer: self.peer.clone(),
                fingerprint,
                line,
                known_hosts: known.path.clone(),
            },
        };
        Err(HopError::HostKey(Box::new(error)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::unix::process::CommandExt;

    use super::report::REPORT_TAG;
    use std::path::Path;
    use std::process::Command;

    fn vm() -> VmUuid {
        "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b".parse().unwrap()
    }

    fn vms(n: usize) -> Vec<VmUuid> {
        (0..n)
            .map(|i| format!("0b6e1f2a-3c4d-4e5f-8a9b-{i:012x}").parse().unwrap())
            .collect()
    }

    fn random_vm() -> VmUuid {
        std::fs::read_to_string("/proc/sys/kernel/random/uuid")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// The script as the target runs it for `vms`.
    fn script_for(vms: &[VmUuid]) -> String {
        let cmd = kill_batch_command(vms, &[]);
        cmd["exec /bin/sh -c '".len()..cmd.len() - 1].to_owned()
    }

    /// Runs the script locally under `shell`, as sshd would: argv[0] is /bin/sh.
    fn run_locally(shell: &str, vms: &[VmUuid]) -> std::process::Output {
        run_with_path(shell, vms, None)
    }

    /// [`run_locally`], with `PATH` set to `path` when given (see [`tool_dir`]).
    fn run_with_path(shell: &str, vms: &[VmUuid], path: Option<&Path>) -> std::process::Output {
        let mut cmd = Command::new(shell);
        cmd.arg0("/bin/sh").arg("-c").arg(script_for(vms));
        if let Some(path) = path {
            cmd.env("PATH", path);
        }
        cmd.output().unwrap()
    }

    /// Where `name` is on this machine's `PATH`.
    fn which(name: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    }

    /// The `awk` a run of the script finds on its `PATH`.
    #[derive(Clone, Copy, Debug)]
    enum Awk {
        /// None at all.
        Missing,
        /// This machine's `awk` (Debian: mawk).
        System,
        /// This program (a real awk, or busybox, which runs its awk applet under that name).
        Program(&'static str),
        /// A stand-in: `/bin/sh` runs this text.
        StandIn(&'static str),
    }

    /// A directory to use as the script's whole `PATH`: `awk` as given, `sleep`, and `tr` —
    /// the real one, or (`tr_works == false`) one that always fails, so that a run can only
    /// succeed if the awk fast path handled the scan (the `tr` fallback fails its self-check).
    /// `None` when a program it needs is not installed.
    fn tool_dir(awk: Awk, tr_works: bool) -> Option<tempfile::TempDir> {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        symlink(which("sleep")?, dir.path().join("sleep")).unwrap();
        let tr = if tr_works {
            which("tr")?
        } else {
            which("false")?
        };
        symlink(tr, dir.path().join("tr")).unwrap();
        match awk {
            Awk::Missing => {}
            Awk::System => symlink(which("awk")?, dir.path().join("awk")).unwrap(),
            Awk::Program(program) => {
                if !Path::new(program).is_file() {
                    return None;
                }
                symlink(program, dir.path().join("awk")).unwrap();
            }
            Awk::StandIn(text) => {
                use std::os::unix::fs::PermissionsExt;
                let path = dir.path().join("awk");
                std::fs::write(&path, format!("#!/bin/sh\n{text}\n")).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        Some(dir)
    }

    /// A report line for `vm` with the given fields after the uuid.
    fn line(vm: &VmUuid, fields: &str) -> String {
        format!("{REPORT_TAG} uuid={vm} {fields}\n")
    }

    #[test]
    fn command_is_the_constant_script_around_the_uuids() {
        let cmd = kill_command(&vm(), &[]);
        assert!(cmd.starts_with("exec /bin/sh -c '"));
        assert!(cmd.ends_with('\''));
        let inner = &cmd["exec /bin/sh -c '".len()..cmd.len() - 1];
        assert!(
            !inner.contains('\''),
            "the script must not contain a single quote"
        );
        assert!(!KILL_SCRIPT.contains('\''));
        assert_eq!(KILL_SCRIPT.matches(UUID_SLOT).count(), 1);
        assert_eq!(KILL_SCRIPT.matches(STORAGE_SLOT).count(), 1);
        let script = |uuids: &str, addrs: &str| {
            KILL_SCRIPT
                .replace(UUID_SLOT, uuids)
                .replace(STORAGE_SLOT, addrs)
        };
        assert_eq!(inner, script(vm().as_str(), ""));
        assert!(inner.starts_with("U=\"0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b\"\nN=\"\"\n"));
        assert_eq!(cmd, kill_batch_command(&[vm()], &[]));

        // The target's storage addresses, printed, joined by single spaces.
        let storage: Vec<IpAddr> = vec![
            "198.51.100.7".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ];
        let cmd = kill_command(&vm(), &storage);
        let inner = &cmd["exec /bin/sh -c '".len()..cmd.len() - 1];
        assert_eq!(inner, script(vm().as_str(), "198.51.100.7 2001:db8::1"));

        // A full batch: the same script, the uuids joined by single spaces, a modest size.
        let batch = vms(MAX_KILL_BATCH);
        let cmd = kill_batch_command(&batch, &[]);
        let joined = batch.iter().map(VmUuid::as_str).collect::<Vec<_>>();
        let inner = &cmd["exec /bin/sh -c '".len()..cmd.len() - 1];
        assert_eq!(inner, script(&joined.join(" "), ""));
        assert!(!inner.contains('\''));
        let variable = cmd.len() - kill_batch_command(&[], &[]).len();
        assert_eq!(variable, MAX_KILL_BATCH * 37 - 1);
        assert!(cmd.len() < 16 * 1024, "{} bytes", cmd.len());
    }

    #[test]
    fn script_parses_under_the_local_shells() {
        for shell in ["/bin/sh", "/bin/dash", "/bin/bash", "/bin/busybox"] {
            if !Path::new(shell).exists() {
                continue;
            }
            let mut cmd = Command::new(shell);
            if shell.ends_with("busybox") {
                cmd.arg("sh");
            }
            let out = cmd.arg("-n").arg("-c").arg(KILL_SCRIPT).output().unwrap();
            assert!(out.status.success(), "{shell}: {out:?}");
        }
    }

    #[test]
    fn script_run_locally_finds_nothing_for_unused_uuids() {
        // No qemu carries these uuids: the scan must pass its self-check and report "gone",
        // one line per uuid, in the order given.
        let one: VmUuid = "deadbeef-0000-4000-8000-00000000f00d".parse().unwrap();
        let many = vms(50);
        for shell in ["/bin/sh", "/bin/dash", "/bin/bash"] {
            if !Path::new(shell).exists() {
                continue;
            }
            for batch in [std::slice::from_ref(&one), &many[..]] {
                let out = run_locally(shell, batch);
                assert!(out.status.success(), "{shell}: {out:?}");
                let stdout = String::from_utf8(out.stdout).unwrap();
                let want: String = batch
                    .iter()
                    .map(|vm| line(vm, "found= killed= alive= unknown= sockets=0:0 gone=1"))
                    .collect();
                assert_eq!(
                    stdout,
                    want,
                    "{shell}: stderr {:?}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }

    /// The script as the target runs it for `vms` with the storage addresses `storage`, under
    /// `/bin/sh`, with `PATH` set to `path` when given.
    fn run_swept(vms: &[VmUuid], storage: &[IpAddr], path: Option<&Path>) -> String {
        let cmd = kill_batch_command(vms, storage);
        let mut run = Command::new("/bin/sh");
        run.arg0("/bin/sh")
            .arg("-c")
            .arg(&cmd["exec /bin/sh -c '".len()..cmd.len() - 1]);
        if let Some(path) = path {
            run.env("PATH", path);
        }
        let out = run.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// This machine's orphaned sockets from `src` (any port) that may still send data.
    fn closed_sockets_holding_data(src: IpAddr) -> usize {
        let out = Command::new("ss")
            .args([
                "-Htne",
                "state",
                "fin-wait-1",
                "state",
                "closing",
                "state",
                "last-ack",
            ])
            .arg("src")
            .arg(src.to_string())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.split_whitespace().any(|w| w == "ino:0"))
            .count()
    }

    /// A closed socket on a storage address that still holds unsent data (its peer stopped
    /// reading): the script aborts it, looks again, and reports it; its peer sees a reset.
    /// Sockets on other addresses are not touched. Without `ss` the script cannot look, and no
    /// VM is gone.
    #[tokio::test]
    async fn script_aborts_closed_sockets_that_still_hold_data() {
        use std::io::{ErrorKind, Read, Write};
        // An address of its own, so that no other test's socket is swept.
        let storage: IpAddr = "127.0.0.201".parse().unwrap();
        let server = tokio::net::TcpSocket::new_v4().unwrap();
        server.set_recv_buffer_size(4096).unwrap();
        server.bind((storage, 0).into()).unwrap();
        let listener = server.listen(1).unwrap().into_std().unwrap();
        listener.set_nonblocking(false).unwrap();
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.set_send_buffer_size(4096).unwrap();
        client.bind((storage, 0).into()).unwrap();
        let client = client
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap()
            .into_std()
            .unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        // Fill the peer's window and the client's buffer, then close: an orphan holding data.
        let mut client = client;
        client.set_nonblocking(true).unwrap();
        let chunk = [0x5a_u8; 4096];
        loop {
            match client.write(&chunk) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        drop(client);
        let deadline = Instant::now() + Duration::from_secs(5);
        while closed_sockets_holding_data(storage) == 0 {
            assert!(Instant::now() < deadline, "no orphan was made");
            std::thread::sleep(Duration::from_millis(20));
        }

        let vm = vm();
        // Without `ss`: it cannot look, so nothing is proven gone, and nothing is touched.
        let dir = tool_dir(Awk::System, true).expect("sleep, tr and awk are installed");
        assert_eq!(
            run_swept(std::slice::from_ref(&vm), &[storage], Some(dir.path())),
            line(&vm, "found= killed= alive= unknown= sockets=?:? gone=0")
        );
        assert_eq!(closed_sockets_holding_data(storage), 1);
        // Another address: not touched.
        let other: IpAddr = "127.0.0.202".parse().unwrap();
        assert_eq!(
            run_swept(std::slice::from_ref(&vm), &[other], None),
            line(&vm, "found= killed= alive= unknown= sockets=0:0 gone=1")
        );
        assert_eq!(closed_sockets_holding_data(storage), 1);
        // The storage address: aborted, and the VM is gone.
        assert_eq!(
            run_swept(std::slice::from_ref(&vm), &[other, storage], None),
            line(&vm, "found= killed= alive= unknown= sockets=1:0 gone=1")
        );
        assert_eq!(closed_sockets_holding_data(storage), 0);
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0; 1 << 20];
        let reset = loop {
            match peer.read(&mut buf) {
                Ok(0) => break false,
                Ok(_) => {}
                Err(e) => break e.kind() == ErrorKind::ConnectionReset,
            }
        };
        assert!(reset, "the peer sees the connection reset, not its end");
    }

    /// A qemu in another network namespace than the script's: its closed sockets would be out
    /// of the sweep's sight, so the sweep says it cannot look and the VM is not gone, though
    /// killed. The same qemu in the script's namespace is gone.
    #[test]
    fn a_qemu_in_another_network_namespace_is_never_called_gone() {
        let storage: IpAddr = "127.0.0.203".parse().unwrap();
        let vm = vm();
        for other_netns in [true, false] {
            let mut cmd = if other_netns {
                let mut c = Command::new("unshare");
                c.args(["--net", "--", "/bin/sh"]);
                c
            } else {
                Command::new("/bin/sh")
            };
            let mut child = cmd
                .args(["-c", "read x", "look-alike", "-uuid", vm.as_str()])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let pid = child.id();
            let deadline = Instant::now() + Duration::from_secs(5);
            while !std::fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .starts_with(b"/bin/sh")
            {
                assert!(Instant::now() < deadline, "the look-alike never exec'd");
                std::thread::sleep(Duration::from_millis(10));
            }
            let out = run_swept(std::slice::from_ref(&vm), &[storage], None);
            let _ = child.wait();
            let want = if other_netns {
                format!("found={pid} killed={pid} alive= unknown= sockets=?:? gone=0")
            } else {
                format!("found={pid} killed={pid} alive= unknown= sockets=0:0 gone=1")
            };
            assert_eq!(out, line(&vm, &want), "in another netns: {other_netns}");
        }
    }

    /// `/bin/sh` under a chosen argv[0], blocked in the `read` builtin, with extra arguments.
    fn look_alike(argv0: &str, extra: &[&str]) -> std::process::Child {
        let child = Command::new("/bin/sh")
            .arg0(argv0)
            .args(["-c", "read x", "look-alike"])
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let path = format!("/proc/{}/cmdline", child.id());
        while !std::fs::read(&path)
            .unwrap_or_default()
            .starts_with(argv0.as_bytes())
        {
            assert!(Instant::now() < deadline, "look-alike never exec'd");
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    #[test]
    fn script_run_locally_kills_only_matching_processes_under_dash_and_bash() {
        for shell in ["/bin/dash", "/bin/bash"] {
            if !Path::new(shell).exists() {
                continue;
            }
            let vm = random_vm();
            let upper = vm.to_uppercase();
            let mut target = look_alike("/usr/bin/qemu-system-x86_64", &["-uuid", &upper]);
            let mut others = [
                look_alike("not-qemu", &["-uuidx", vm.as_str()]),
                look_alike("qemu-system-x86_64", &["-name", vm.as_str()]),
                look_alike("qemu-kvm", &["-uuid\nx", vm.as_str()]),
            ];
            let out = run_locally(shell, std::slice::from_ref(&vm));
            let stdout = String::from_utf8(out.stdout).unwrap();
            let report = parse_reports(&stdout, std::slice::from_ref(&vm));
            let survivors: Vec<bool> = others
                .iter_mut()
                .map(|c| c.try_wait().unwrap().is_none())
                .collect();
            let _ = target.kill();
            let _ = target.wait();
            for c in &mut others {
                let _ = c.kill();
                let _ = c.wait();
            }
            let report = report.unwrap_or_else(|e| panic!("{shell}: {e}: {stdout:?}"));
            assert_eq!(report.len(), 1);
            assert_eq!(report[0].pids, vec![target.id()], "{shell}");
            assert!(report[0].killed && report[0].gone, "{shell}: {report:?}");
            assert_eq!(survivors, [true, true, true], "{shell}");
        }
    }

    #[test]
    fn script_run_locally_attributes_each_process_to_one_uuid_of_the_batch() {
        for shell in ["/bin/dash", "/bin/bash"] {
            if !Path::new(shell).exists() {
                continue;
            }
            let (a, b, c, d) = (random_vm(), random_vm(), random_vm(), random_vm());
            let spaced = format!("{a} {b}");
            let mut doomed = [
                // a: upper case, and a second -uuid naming an unrequested VM.
                look_alike("/usr/bin/qemu-system-x86_64", &["-uuid", &a.to_uppercase()]),
                look_alike("qemu-kvm", &["-uuid", d.as_str(), "-uuid", a.as_str()]),
                // b: two processes, one with --uuid.
                look_alike("qemu-kvm", &["-uuid", b.as_str()]),
                look_alike("/bin/qemu-system-aarch64", &["--uuid", b.as_str()]),
                // Carries two requested uuids: attributed to neither, killed, unknown.
                look_alike(
                    "qemu-system-x86_64",
                    &["-uuid", a.as_str(), "-uuid", c.as_str()],
                ),
            ];
            let mut spared = [
                // d is not requested.
                look_alike("qemu-system-x86_64", &["-uuid", d.as_str()]),
                // Two requested uuids in one value: not a uuid at all.
                look_alike("qemu-system-x86_64", &["-uuid", &spaced]),
                look_alike("not-qemu", &["-smbios", &format!("type=1,serial={a}")]),
            ];
            let batch = [c.clone(), a.clone(), b.clone()];
            let out = run_locally(shell, &batch);
            let stdout = String::from_utf8(out.stdout).unwrap();
            let parsed = parse_reports(&stdout, &batch);
            let alive: Vec<bool> = doomed
                .iter_mut()
                .chain(spared.iter_mut())
                .map(|p| p.try_wait().unwrap().is_none())
                .collect();
            let pids: Vec<u32> = doomed.iter().map(std::process::Child::id).collect();
            for p in doomed.iter_mut().chain(spared.iter_mut()) {
                let _ = p.kill();
                let _ = p.wait();
            }
            let r = parsed.unwrap_or_else(|e| panic!("{shell}: {e}: {stdout:?}"));
            let sorted = |mut v: Vec<u32>| {
                v.sort_unstable();
                v
            };
            // Lines come in the order of U.
            let order: Vec<&str> = stdout
                .lines()
                .map(|l| &l["rbdfence-kill uuid=".len()..][..36])
                .collect();
            assert_eq!(order, [c.as_str(), a.as_str(), b.as_str()], "{shell}");
            let (rc, ra, rb) = (&r[0], &r[1], &r[2]);
            assert_eq!(
                sorted(ra.pids.clone()),
                sorted(pids[0..2].to_vec()),
                "{shell}"
            );
            assert_eq!(
                sorted(rb.pids.clone()),
                sorted(pids[2..4].to_vec()),
                "{shell}"
            );
            assert!(!rc.qemu_found && !rc.killed, "{shell}: {rc:?}");
            for report in &r {
                assert_eq!(report.unknown, vec![pids[4]], "{shell}: {report:?}");
                assert!(
                    report.gone && report.alive.is_empty(),
                    "{shell}: {report:?}"
                );
            }
            assert!(ra.killed && rb.killed, "{shell}: {r:?}");
            assert_eq!(
                alive,
                [false, false, false, false, false, true, true, true],
                "{shell}: {r:?}"
            );
        }
    }

    /// Processes a test started, each under a role name; SIGKILLed and reaped (through their own
    /// handles) on drop, so a failing test leaves nothing behind.
    struct Procs(Vec<(String, std::process::Child)>);

    impl Procs {
        fn add(&mut self, role: &str, argv0: &str, extra: &[&str]) -> u32 {
            let child = look_alike(argv0, extra);
            let pid = child.id();
            self.0.push((role.to_owned(), child));
            pid
        }

        fn role(&self, pid: &str) -> String {
            self.0
                .iter()
                .find(|(_, c)| c.id().to_string() == pid)
                .map_or_else(|| format!("pid {pid}?"), |(role, _)| role.clone())
        }

        /// Roles of the processes that are still running.
        fn running(&mut self) -> Vec<String> {
            self.0
                .iter_mut()
                .filter_map(|(role, c)| c.try_wait().unwrap().is_none().then(|| role.clone()))
                .collect()
        }
    }

    impl Drop for Procs {
        fn drop(&mut self) {
            for (_, c) in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Qemu stand-ins for the batch `[c, a, b]` (`d` is not requested). Roles `a…`/`b…` must be
    /// attributed to that uuid, `conflict` carries two requested uuids, `spare…` must survive.
    fn matching_fixture(a: &VmUuid, b: &VmUuid, c: &VmUuid, d: &VmUuid) -> Procs {
        let (a, b, c, d) = (a.as_str(), b.as_str(), c.as_str(), d.as_str());
        let mut p = Procs(Vec::new());
        let spare_d = p.add("spare-unrequested", "qemu-system-x86_64", &["-uuid", d]);
        let spare_name = p.add("spare-after-name", "qemu-system-x86_64", &["-name", a]);
        p.add(
            "spare-trailing-uuid-flag",
            "qemu-system-x86_64",
            &["-name", a, "-uuid"],
        );
        p.add("spare-extra-char", "qemu-kvm", &["-uuid", &format!("{a}0")]);
        p.add(
            "spare-extra-space",
            "qemu-kvm",
            &["-uuid", &format!("{a} ")],
        );
        p.add(
            "spare-two-in-one",
            "qemu-kvm",
            &["-uuid", &format!("{a} {b}")],
        );
        p.add("spare-empty-value", "qemu-kvm", &["-uuid", "", a]);
        p.add(
            "spare-newline-value",
            "qemu-kvm",
            &["-uuid", &format!("{a}\n{b}")],
        );
        p.add("spare-newline-flag", "qemu-kvm", &["-uuid\nx", a]);
        p.add("spare-flag-after-newline", "qemu-kvm", &["x\n-uuid", a]);
        p.add("spare-ctrl-a", "qemu-kvm", &[&format!("-uuid\u{1}{a}")]);
        // The uuid is the VM's whatever the binary is called (a wrapper, Proxmox's `kvm`).
        p.add("a-not-qemu", "not-qemu", &["-uuid", a]);
        p.add("a-upper-argv0", "/usr/bin/QEMU-KVM", &["-uuid", a]);
        p.add("a-kvm", "/usr/bin/kvm", &["-uuid", a]);
        // Only in -smbios (Proxmox), as a field of a type=1 table.
        let smbios = format!("type=1,manufacturer=x,uuid={}", a.to_uppercase());
        p.add("a-smbios", "kvm", &["-smbios", &smbios]);
        p.add(
            "b-smbios-long",
            "/usr/bin/kvm",
            &["--smbios", &format!("type=1,uuid={b}")],
        );
        p.add(
            "spare-smbios-other-key",
            "kvm",
            &["-smbios", &format!("type=1,serial={a}")],
        );
        p.add(
            "spare-smbios-key-prefix",
            "kvm",
            &["-smbios", &format!("type=1,xuuid={a}")],
        );
        p.add(
            "spare-uuid-field-elsewhere",
            "kvm",
            &["-name", &format!("uuid={a}")],
        );
        p.add(
            "spare-smbios-suffix",
            "kvm",
            &["-smbios", &format!("type=1,uuid={a}x")],
        );
        // Text shaped like the awk's output lines, naming other processes.
        let fake = format!("vm\n{spare_name} {b}\n{spare_d} -\nend\n{spare_d} {a}");
        p.add(
            "spare-fake-lines",
            "qemu-kvm",
            &["-name", &fake, "-uuid", d],
        );
        p.add(
            "a-upper",
            "/usr/bin/qemu-system-x86_64",
            &["-uuid", &a.to_uppercase()],
        );
        p.add("a-second-uuid", "qemu-kvm", &["-uuid", d, "-uuid", a]);
        p.add(
            "a-fake-lines",
            "qemu-system-x86_64",
            &["-name", &fake, "-uuid", a],
        );
        p.add("b-kvm-upper", "qemu-kvm", &["-uuid", &b.to_uppercase()]);
        p.add("b-long-flag", "/bin/qemu-system-aarch64", &["--uuid", b]);
        p.add("conflict", "qemu-system-x86_64", &["-uuid", a, "-uuid", c]);
        p
    }

    /// The report with pids replaced by the roles of `procs` (sorted) and uuids by `names`.
    fn by_role(stdout: &str, procs: &Procs, names: &[(&VmUuid, &str)]) -> String {
        let mut out = String::new();
        for line in stdout.lines() {
            for (n, word) in line.split(' ').enumerate() {
                if n > 0 {
                    out.push(' ');
                }
                match word.split_once('=') {
                    Some(("uuid", v)) => {
                        let name = names.iter().find(|(u, _)| u.as_str() == v);
                        out.push_str(&format!("uuid={}", name.map_or(v, |(_, n)| *n)));
                    }
                    Some((k @ ("found" | "killed" | "alive" | "unknown"), v)) => {
                        let mut roles: Vec<String> = v
                            .split(',')
                            .filter(|p| !p.is_empty())
                            .map(|p| procs.role(p))
                            .collect();
                        roles.sort();
                        out.push_str(&format!("{k}={}", roles.join(",")));
                    }
                    _ => out.push_str(word),
                }
            }
            out.push('\n');
        }
        out
    }

    #[test]
    fn script_fast_path_and_tr_fallback_give_identical_reports() {
        let a = "a-fake-lines,a-kvm,a-not-qemu,a-second-uuid,a-smbios,a-upper,a-upper-argv0";
        let b = "b-kvm-upper,b-long-flag,b-smbios-long";
        let want = format!(
            "rbdfence-kill uuid=c found= killed= alive= unknown=conflict sockets=0:0 gone=1\n\
             rbdfence-kill uuid=a found={a} killed={a} alive= unknown=conflict sockets=0:0 gone=1\n\
             rbdfence-kill uuid=b found={b} killed={b} alive= unknown=conflict sockets=0:0 gone=1\n"
        );
        // (what, awk, whether tr works). With a failing tr only the awk fast path can succeed;
        // the stand-ins must make the script fall back to tr.
        let modes = [
            ("default PATH", None, true),
            ("system awk, failing tr", Some(Awk::System), false),
            (
                "mawk, failing tr",
                Some(Awk::Program("/usr/bin/mawk")),
                false,
            ),
            (
                "gawk, failing tr",
                Some(Awk::Program("/usr/bin/gawk")),
                false,
            ),
            ("no awk", Some(Awk::Missing), true),
            ("awk exits 2", Some(Awk::StandIn("exit 2")), true),
            (
                "awk prints a malformed line",
                Some(Awk::StandIn("echo \"1 x y\"; echo end")),
                true,
            ),
            (
                "awk names a pid it was not given",
                Some(Awk::StandIn("echo \"4194305 -\"; echo end")),
                true,
            ),
            ("awk prints no end", Some(Awk::StandIn(":")), true),
            (
                "awk prints all requested uuids for one pid",
                Some(Awk::StandIn(
                    "u=${2#u=}; shift 6; for p; do [ \"$p\" = \"$PPID\" ] || break; done; \
                     echo \"$p $u\"; echo end",
                )),
                true,
            ),
            // busybox awk cannot split on NUL: its output fails the self-check.
            ("busybox awk", Some(Awk::Program("/bin/busybox")), true),
        ];
        let mut ran = Vec::new();
        for shell in ["/bin/dash", "/bin/bash"] {
            if !Path::new(shell).exists() {
                continue;
            }
            for (what, awk, tr_works) in modes {
                let dir = match awk {
                    None => None,
                    Some(awk) => match tool_dir(awk, tr_works) {
                        Some(dir) => Some(dir),
                        None => continue,
                    },
                };
                let (a, b, c, d) = (random_vm(), random_vm(), random_vm(), random_vm());
                let mut procs = matching_fixture(&a, &b, &c, &d);
                let batch = [c.clone(), a.clone(), b.clone()];
                let out = run_with_path(shell, &batch, dir.as_ref().map(|d| d.path()));
                let running = procs.running();
                let stdout = String::from_utf8(out.stdout).unwrap();
                let ctx = format!(
                    "{shell}, {what}: {:?}, stderr {:?}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(out.status.success(), "{ctx}: {stdout:?}");
                parse_reports(&stdout, &batch).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                let names = [(&a, "a"), (&b, "b"), (&c, "c")];
                assert_eq!(by_role(&stdout, &procs, &names), want, "{ctx}");
                let spared: Vec<String> = procs
                    .0
                    .iter()
                    .map(|(role, _)| role.clone())
                    .filter(|role| role.starts_with("spare-"))
                    .collect();
                assert_eq!(running, spared, "{ctx}");
                ran.push(format!("{shell}, {what}"));
            }
        }
        // The fast path itself was exercised (this machine's awk, with a failing tr).
        if which("awk").is_some() {
            assert!(
                ran.iter().any(|r| r.ends_with("system awk, failing tr")),
                "{ran:?}"
            );
        }
    }

    #[test]
    fn script_refuses_an_awk_that_does_not_split_on_nul() {
        // busybox awk cannot split on NUL: were its (empty) scan accepted, every VM would read
        // as gone. With a failing tr as well, the script must stop at its self-check.
        let Some(dir) = tool_dir(Awk::Program("/bin/busybox"), false) else {
            return;
        };
        let vm = random_vm();
        let mut procs = Procs(Vec::new());
        procs.add("target", "qemu-kvm", &["-uuid", vm.as_str()]);
        for shell in ["/bin/dash", "/bin/bash"] {
            if !Path::new(shell).exists() {
                continue;
            }
            let out = run_with_path(shell, std::slice::from_ref(&vm), Some(dir.path()));
            assert_eq!(out.status.code(), Some(3), "{shell}: {out:?}");
            assert_eq!(
                out.stdout, b"rbdfence-kill error=self-check\n",
                "{shell}: {out:?}"
            );
            assert_eq!(procs.running(), ["target"], "{shell}");
        }
    }

    #[test]
    fn report_line_parsing_is_strict() {
        let v = vm();
        let one = std::slice::from_ref(&v);
        let parse = |fields: &str| parse_reports(&line(&v, fields), one).map(|mut r| r.remove(0));
        let ok = parse("found=12,34 killed=12,34 alive= unknown= sockets=0:0 gone=1").unwrap();
        assert_eq!(
            ok,
            KillReport {
                qemu_found: true,
                pids: vec![12, 34],
                killed: true,
                gone: true,
                alive: vec![],
                unknown: vec![],
                sockets: Some(SocketSweep {
                    aborted: 0,
                    held: Some(0)
                }),
            }
        );
        let none = parse("found= killed= alive= unknown= sockets=0:0 gone=1").unwrap();
        assert!(!none.qemu_found && !none.killed && none.gone);
        let stuck = parse("found=7 killed=7 alive=7 unknown= sockets=0:0 gone=0").unwrap();
        assert!(stuck.qemu_found && stuck.killed && !stuck.gone);
        let unknown = parse("found= killed= alive=9 unknown=9 sockets=0:0 gone=0").unwrap();
        assert_eq!(unknown.unknown, vec![9]);

        let with_uuid = |text: &str| {
            text.replacen(
                "rbdfence-kill ",
                &format!("rbdfence-kill uuid={} ", vm()),
                1,
            )
        };
        for bad in [
            "",
            "\n",
            "rbdfence-kill found= killed= alive= unknown= sockets=0:0 gone=1",
            "rbdfence-kill found= killed= alive= unknown= sockets=0:0 gone=1\n\n",
            "hello\nrbdfence-kill found= killed= alive= unknown= sockets=0:0 gone=1\n",
            "rbdfence-kill found= killed= alive= unknown= sockets=0:0 gone=1 extra=1\n",
            "rbdfence-kill killed= found= alive= unknown= sockets=0:0 gone=1\n",
            "rbdfence-kill found= killed= alive= unknown= sockets=0:0 gone=2\n",
            "rbdfence-kill found= killed= alive= unknown= sockets=0:0 gone=\n",
            "rbdfence-kill found=1 killed=2 alive= unknown= sockets=0:0 gone=1\n",
            "rbdfence-kill found=1 killed=1 alive=1 unknown= sockets=0:0 gone=1\n",
            "rbdfence-kill found=1 killed=1 alive= unknown= sockets=0:0 gone=0\n",
            "rbdfence-kill found=1 killed= alive=5 unknown= sockets=0:0 gone=0\n",
            "rbdfence-kill found=1,1 killed= alive= unknown= sockets=0:0 gone=1\n",
            "rbdfence-kill found=1, killed= alive= unknown= sockets=0:0 gone=1\n",
            "rbdfence-kill found=+1 killed= alive= unknown= sockets=0:0 gone=1\n",
            "rbdfence-kill found=0 killed= alive= unknown= sockets=0:0 gone=1\n",
            "rbdfence-kill found=99999999999 killed= alive= unknown= sockets=0:0 gone=1\n",
            "rbdfence-kill found=1 killed= alive= unknown=1 sockets=0:0 gone=1\n",
            "rbdfence-kill  found= killed= alive= unknown= sockets=0:0 gone=1\n",
            "rbdfence-kill found= killed= alive= unknown= sockets=0:0 gone=1\r\n",
            "rbdfence-kill error=no-proc\n",
            "RBDFENCE-KILL found= killed= alive= unknown= sockets=0:0 gone=1\n",
        ] {
            let bad = with_uuid(bad);
            assert!(parse_reports(&bad, one).is_err(), "accepted {bad:?}");
        }
        // The uuid field: present, first, exactly the requested (normalised) text.
        for bad in [
            "rbdfence-kill found= killed= alive= unknown= sockets=0:0 gone=1\n".to_owned(),
            format!("rbdfence-kill found= uuid={v} killed= alive= unknown= sockets=0:0 gone=1\n"),
            "rbdfence-kill uuid= found= killed= alive= unknown= sockets=0:0 gone=1\n".to_owned(),
            format!("rbdfence-kill uuid={v}  found= killed= alive= unknown= sockets=0:0 gone=1\n"),
            line(&v, "found= killed= alive= unknown= sockets=0:0 gone=1").to_uppercase(),
            format!(
                "rbdfence-kill uuid={} found= killed= alive= unknown= sockets=0:0 gone=1\n",
                v.to_uppercase()
            ),
            format!(
                "rbdfence-kill uuid={} found= killed= alive= unknown= sockets=0:0 gone=1\n",
                v.to_bare()
            ),
        ] {
            assert!(parse_reports(&bad, one).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn batch_report_parsing_is_strict() {
        let batch = vms(3);
        let [a, b, c] = [&batch[0], &batch[1], &batch[2]];
        let nothing = "found= killed= alive= unknown= sockets=0:0 gone=1";

        // Any order in, the order of `vms` out.
        let ok = format!(
            "{}{}{}",
            line(c, nothing),
            line(
                a,
                "found=10,11 killed=10,11 alive= unknown= sockets=0:0 gone=1"
            ),
            line(b, "found=20 killed=20 alive=20 unknown= sockets=0:0 gone=0"),
        );
        let r = parse_reports(&ok, &batch).unwrap();
        assert_eq!(r[0].pids, vec![10, 11]);
        assert!(r[0].killed && r[0].gone);
        assert_eq!(r[1].alive, vec![20]);
        assert!(r[1].qemu_found && !r[1].gone);
        assert!(!r[2].qemu_found && !r[2].killed && r[2].gone);

        // An unknown pid that is alive: in every line, and every line is not gone.
        let stuck = format!(
            "{}{}{}",
            line(a, "found=10 killed=10 alive=9 unknown=9 sockets=0:0 gone=0"),
            line(b, "found= killed= alive=9 unknown=9 sockets=0:0 gone=0"),
            line(c, "found= killed= alive=9 unknown=9 sockets=0:0 gone=0"),
        );
        let r = parse_reports(&stuck, &batch).unwrap();
        assert!(r.iter().all(|r| !r.gone && r.unknown == [9]), "{r:?}");
        // One that is gone: in every line, and gone does not depend on it.
        let dead = format!(
            "{}{}{}",
            line(a, "found=10 killed=10 alive= unknown=9 sockets=0:0 gone=1"),
            line(b, "found= killed= alive= unknown=9 sockets=0:0 gone=1"),
            line(c, "found= killed= alive= unknown=9 sockets=0:0 gone=1"),
        );
        let r = parse_reports(&dead, &batch).unwrap();
        assert!(r.iter().all(|r| r.gone && r.unknown == [9]), "{r:?}");

        let other = vms(4).remove(3);
        let bad_cases: Vec<(&str, String)> = vec![
            (
                "missing line",
                format!("{}{}", line(a, nothing), line(b, nothing)),
            ),
            (
                "duplicate uuid",
                format!(
                    "{}{}{}",
                    line(a, nothing),
                    line(b, nothing),
                    line(a, nothing)
                ),
            ),
            (
                "duplicate uuid, extra line",
                format!(
                    "{}{}{}{}",
                    line(a, nothing),
                    line(b, nothing),
                    line(c, nothing),
                    line(a, nothing)
                ),
            ),
            (
                "unrequested uuid",
                format!(
                    "{}{}{}",
                    line(a, nothing),
                    line(b, nothing),
                    line(&other, nothing)
                ),
            ),
            (
                "unrequested uuid, extra line",
                format!(
                    "{}{}{}{}",
                    line(a, nothing),
                    line(b, nothing),
                    line(c, nothing),
                    line(&other, nothing)
                ),
            ),
            (
                "killed but not found",
                format!(
                    "{}{}{}",
                    line(a, "found= killed=5 alive= unknown= sockets=0:0 gone=1"),
                    line(b, nothing),
                    line(c, nothing)
                ),
            ),
            (
                "gone with a live pid",
                format!(
                    "{}{}{}",
                    line(a, "found=5 killed=5 alive=5 unknown= sockets=0:0 gone=1"),
                    line(b, nothing),
                    line(c, nothing)
                ),
            ),
            (
                "one pid under two uuids",
                format!(
                    "{}{}{}",
                    line(a, "found=5 killed=5 alive= unknown= sockets=0:0 gone=1"),
                    line(b, "found=5 killed=5 alive= unknown= sockets=0:0 gone=1"),
                    line(c, nothing)
                ),
            ),
            (
                "unknown pids differ between lines",
                format!(
                    "{}{}{}",
                    line(a, "found= killed= alive= unknown=9 sockets=0:0 gone=1"),
                    line(b, nothing),
                    line(c, "found= killed= alive= unknown=9 sockets=0:0 gone=1")
                ),
            ),
            (
                "a live unknown pid left out of one line",
                format!(
                    "{}{}{}",
                    line(a, "found= killed= alive=9 unknown=9 sockets=0:0 gone=0"),
                    line(b, "found= killed= alive= unknown=9 sockets=0:0 gone=1"),
                    line(c, "found= killed= alive=9 unknown=9 sockets=0:0 gone=0")
                ),
            ),
            (
                "blank line",
                format!(
                    "{}\n{}{}",
                    line(a, nothing),
                    line(b, nothing),
                    line(c, nothing)
                ),
            ),
            (
                "trailing blank line",
                format!(
                    "{}{}{}\n",
                    line(a, nothing),
                    line(b, nothing),
                    line(c, nothing)
                ),
            ),
            (
                "no final newline",
                format!(
                    "{}{}{}",
                    line(a, nothing),
                    line(b, nothing),
                    line(c, nothing)
                )
                .trim_end()
                .to_owned(),
            ),
            (
                "a chatty line",
                format!(
                    "motd\n{}{}{}",
                    line(a, nothing),
                    line(b, nothing),
                    line(c, nothing)
                ),
            ),
            ("empty", String::new()),
        ];
        for (what, text) in &bad_cases {
            assert!(
                parse_reports(text, &batch).is_err(),
                "{what}: accepted {text:?}"
            );
        }
    }

    #[test]
    fn interpret_maps_exit_states() {
        let peer = Peer {
            host_uuid: "h1".into(),
            addr: "127.0.0.2:2222".parse().unwrap(),
        };
        let one = [vm()];
        let out = |stdout: &str, status: Option<u32>, signal: Option<&str>| Output {
            stdout: stdout.as_bytes().to_vec(),
            stdout_overflow: false,
            stderr: b"boom".to_vec(),
            exit_status: status,
            exit_signal: signal.map(str::to_owned),
        };
        let report = line(&vm(), "found= killed= alive= unknown= sockets=0:0 gone=1");
        let ok = interpret(&peer, out(&report, Some(0), None), &one).unwrap();
        assert!(ok.len() == 1 && ok[0].gone);
        let e = interpret(&peer, out(&report, Some(1), None), &one).unwrap_err();
        assert_eq!(e.label(), "remote");
        let e = interpret(
            &peer,
            out("rbdfence-kill error=self-check\n", Some(3), None),
            &one,
        )
        .unwrap_err();
        assert!(e.to_string().contains("self-check"), "{e}");
        assert!(e.to_string().contains("h1 (127.0.0.2:2222)"), "{e}");
        let e = interpret(&peer, out(&report, None, Some("KILL")), &one).unwrap_err();
        assert_eq!(e.label(), "remote");
        let e = interpret(&peer, out(&report, None, None), &one).unwrap_err();
        assert_eq!(e.label(), "remote");
        let e = interpret(&peer, out("motd\n", Some(0), None), &one).unwrap_err();
        assert_eq!(e.label(), "bad_output");
        assert_eq!(e.stage(), Some(Stage::Command));
        // A good line for another batch is bad output for this one.
        let e = interpret(&peer, out(&report, Some(0), None), &vms(1)).unwrap_err();
        assert_eq!(e.label(), "bad_output");
        let mut overflow = out(&report, Some(0), None);
        overflow.stdout_overflow = true;
        let e = interpret(&peer, overflow, &one).unwrap_err();
        assert_eq!(e.label(), "bad_output");
    }

    #[tokio::test]
    async fn empty_and_oversized_batches_never_connect() {
        // Files that do not exist and an address nobody is asked: any attempt would fail.
        let settings = SshSettings {
            user: "root".into(),
            identity: "/nonexistent/rbdfence/id".into(),
            known_hosts: "/nonexistent/rbdfence/known_hosts".into(),
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(1),
        };
        let target = SshTarget {
            host_uuid: "h1".into(),
            addr: "127.0.0.1:9".parse().unwrap(),
            storage: vec![],
        };
        let route = Route::Direct(&target);
        assert_eq!(kill_qemus(&settings, route, &[]).await.unwrap(), vec![]);
        let e = kill_qemus(&settings, route, &vms(MAX_KILL_BATCH + 1))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                SshError::BatchTooLarge {
                    count: 257,
                    max: 256
                }
            ),
            "{e}"
        );
        assert_eq!(e.label(), "batch_too_large");
        assert_eq!((e.peer(), e.stage()), (None, None));
        assert!(
            e.to_string().contains("257") && e.to_string().contains("256"),
            "{e}"
        );
        // At the bound it gets as far as loading the (missing) identity.
        let e = kill_qemus(&settings, route, &vms(MAX_KILL_BATCH))
            .await
            .unwrap_err();
        assert_eq!(e.label(), "config", "{e}");
    }

    #[test]
    fn error_labels_are_bounded() {
        let peer = Peer {
            host_uuid: "h1".into(),
            addr: "127.0.0.2:22".parse().unwrap(),
        };
        let e = SshError::Timeout {
            peer: peer.clone(),
            stage: Stage::Handshake,
            after: Duration::from_secs(3),
        };
        assert_eq!(e.label(), "timeout");
        assert_eq!(e.stage(), Some(Stage::Handshake));
        assert_eq!(
            e.to_string(),
            "ssh h1 (127.0.0.2:22): handshake timed out after 3s"
        );
        let e = SshError::Auth {
            peer,
            user: "root".into(),
        };
        assert_eq!(e.label(), "auth");
        let e = SshError::BatchTooLarge {
            count: 300,
            max: 256,
        };
        assert_eq!(e.label(), "batch_too_large");
    }
}
