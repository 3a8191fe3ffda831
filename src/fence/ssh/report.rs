//! The kill script's report: one line per requested VM, parsed strictly (see `kill.sh` and
//! [`super::kill_batch_command`]). Anything malformed, inconsistent or unexpected is an error for
//! the whole batch, never "gone".

use std::collections::{HashMap, HashSet};

use crate::fence::vm::VmUuid;

/// First word of every line the remote script prints.
pub(super) const REPORT_TAG: &str = "rbdfence-kill";

/// What the remote side observed and did, for one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KillReport {
    /// At least one matching qemu process was running when the host was scanned.
    pub qemu_found: bool,
    /// PIDs of the matching qemu processes (attributed to this VM only).
    pub pids: Vec<u32>,
    /// SIGKILL was delivered to at least one of them.
    pub killed: bool,
    /// Re-checked: no matching process has a live (non-zombie) thread, no `unknown` process of
    /// the batch is still alive, and the sweep left no closed socket on the target's storage
    /// addresses that could still send ([`SocketSweep`]). This is the only field that proves
    /// anything.
    pub gone: bool,
    /// PIDs still alive after the re-check window (empty when `gone`).
    pub alive: Vec<u32>,
    /// PIDs the scan could not attribute to exactly one VM (normally empty): the command line
    /// could not be read although the process existed, or it is a qemu carrying two different
    /// requested uuids (SIGKILLed too). The same for every report of one batch; while any of
    /// them is alive, no VM of the batch is `gone` (it is then in `alive` too).
    pub unknown: Vec<u32>,
    /// The sweep of closed sockets on the target's storage addresses (see [`SocketSweep`]);
    /// `None` when it could not look (no `ss`, or `ss` failed). The same for every report of
    /// one batch; unless it found nothing left, no VM of the batch is `gone`.
    pub sockets: Option<SocketSweep>,
}

/// Closed TCP sockets on the target's storage addresses that may still carry data out: a
/// process that closed them (a killed or crashed qemu) is gone, but their unsent writes stay
/// with the kernel, which retransmits them at TCP's backed-off pace and delivers them once the
/// storage network answers — to an image another VM may own by then. The kill script aborts
/// every such socket (orphaned, in `FIN-WAIT-1`, `CLOSING` or `LAST-ACK`; `ss -K`) and looks
/// again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketSweep {
    /// Found and aborted.
    pub aborted: u32,
    /// Still there when it looked again; `None` when that second look failed. A VM is `gone`
    /// only when this is `Some(0)`.
    pub held: Option<u32>,
}

/// One report line:
/// `rbdfence-kill uuid=U found=P,P killed=P alive=P unknown=P sockets=N:N gone=0|1`, checked
/// on its own (`sockets` is `?:?` when the sweep could not look, `N:?` when its second look
/// failed).
#[derive(Debug)]
struct ReportLine<'a> {
    uuid: &'a str,
    found: Vec<u32>,
    killed: Vec<u32>,
    alive: Vec<u32>,
    unknown: Vec<u32>,
    sockets: Option<SocketSweep>,
    gone: bool,
}

fn parse_line(line: &str) -> Result<ReportLine<'_>, &'static str> {
    let mut words = line.split(' ');
    if words.next() != Some(REPORT_TAG) {
        return Err("missing the rbdfence-kill tag");
    }
    let mut field = |key: &str| -> Result<&str, &'static str> {
        let word = words.next().ok_or("missing field")?;
        let (k, v) = word.split_once('=').ok_or("field without '='")?;
        if k == key {
            Ok(v)
        } else {
            Err("fields out of order or unknown")
        }
    };
    let uuid = field("uuid")?;
    let found = parse_pids(field("found")?)?;
    let killed = parse_pids(field("killed")?)?;
    let alive = parse_pids(field("alive")?)?;
    let unknown = parse_pids(field("unknown")?)?;
    let sockets = parse_sweep(field("sockets")?)?;
    let gone = match field("gone")? {
        "1" => true,
        "0" => false,
        _ => return Err("gone is neither 0 nor 1"),
    };
    if words.next().is_some() {
        return Err("trailing fields");
    }
    if !killed.iter().all(|p| found.contains(p)) {
        return Err("killed a pid that was not found");
    }
    if found.iter().any(|p| unknown.contains(p)) {
        return Err("a pid both found and unknown");
    }
    if !alive
        .iter()
        .all(|p| found.contains(p) || unknown.contains(p))
    {
        return Err("alive pid neither found nor unknown");
    }
    let swept = sockets.is_some_and(|s| s.held == Some(0));
    if gone != (alive.is_empty() && swept) {
        return Err("gone disagrees with the alive list or the socket sweep");
    }
    Ok(ReportLine {
        uuid,
        found,
        killed,
        alive,
        unknown,
        sockets,
        gone,
    })
}

/// `sockets=FOUND:HELD`: two counts, `?:?` (could not look), or `N:?` (the second look
/// failed). Nothing found means nothing is left.
fn parse_sweep(value: &str) -> Result<Option<SocketSweep>, &'static str> {
    let count = |n: &str| -> Result<u32, &'static str> {
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err("a socket count is not a decimal number");
        }
        n.parse().map_err(|_| "a socket count is out of range")
    };
    match value.split_once(':').ok_or("sockets without ':'")? {
        ("?", "?") => Ok(None),
        (found, "?") => Ok(Some(SocketSweep {
            aborted: count(found)?,
            held: None,
        })),
        (found, held) => {
            let (aborted, held) = (count(found)?, count(held)?);
            if aborted == 0 && held != 0 {
                return Err("sockets held although none were found");
            }
            Ok(Some(SocketSweep {
                aborted,
                held: Some(held),
            }))
        }
    }
}

/// Parse the script's output for the distinct `vms`: newline-terminated lines, exactly one per
/// requested uuid (in any order, each once, no other), each consistent on its own and all
/// consistent with each other — the same batch-wide `unknown` pids with the same alive ones,
/// and no pid found under two uuids. Returns the reports in the order of `vms`.
pub(crate) fn parse_reports(stdout: &str, vms: &[VmUuid]) -> Result<Vec<KillReport>, &'static str> {
    let body = stdout
        .strip_suffix('\n')
        .ok_or("not newline-terminated lines")?;
    let slots: HashMap<&str, usize> = vms
        .iter()
        .enumerate()
        .map(|(i, vm)| (vm.as_str(), i))
        .collect();
    let mut reports: Vec<Option<KillReport>> = vec![None; vms.len()];
    let mut batch_unknown: Option<(Vec<u32>, Vec<u32>)> = None;
    let mut batch_sockets: Option<Option<SocketSweep>> = None;
    let mut attributed: HashSet<u32> = HashSet::new();
    for (n, text) in body.split('\n').enumerate() {
        if n >= vms.len() {
            return Err("more lines than requested uuids");
        }
        let line = parse_line(text)?;
        let slot = *slots
            .get(line.uuid)
            .ok_or("a line for a uuid that was not requested")?;
        if reports[slot].is_some() {
            return Err("two lines for one uuid");
        }
        let mut unknown = line.unknown.clone();
        unknown.sort_unstable();
        let mut alive_unknown: Vec<u32> = line
            .alive
            .iter()
            .copied()
            .filter(|p| unknown.contains(p))
            .collect();
        alive_unknown.sort_unstable();
        match &batch_unknown {
            None => batch_unknown = Some((unknown, alive_unknown)),
            Some(first) => {
                if *first != (unknown, alive_unknown) {
                    return Err("lines disagree on the unknown pids");
                }
            }
        }
        if *batch_sockets.get_or_insert(line.sockets) != line.sockets {
            return Err("lines disagree on the socket sweep");
        }
        for &pid in &line.found {
            if !attributed.insert(pid) {
                return Err("a pid found under two uuids");
            }
        }
        reports[slot] = Some(KillReport {
            qemu_found: !line.found.is_empty(),
            killed: !line.killed.is_empty(),
            pids: line.found,
            gone: line.gone,
            alive: line.alive,
            unknown: line.unknown,
            sockets: line.sockets,
        });
    }
    reports
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or("a requested uuid has no line")
}

fn parse_pids(list: &str) -> Result<Vec<u32>, &'static str> {
    if list.is_empty() {
        return Ok(Vec::new());
    }
    let mut pids = Vec::new();
    for item in list.split(',') {
        if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
            return Err("a pid is not a decimal number");
        }
        let pid: u32 = item.parse().map_err(|_| "a pid is out of range")?;
        if pid == 0 || pids.contains(&pid) {
            return Err("a pid is zero or repeated");
        }
        pids.push(pid);
    }
    Ok(pids)
}
