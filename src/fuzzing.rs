//! Entry points for the fuzz targets in `fuzz/` (`cargo fuzz`): every parser of input that
//! comes from outside the service, each taking raw bytes. Each one panics only when an
//! invariant of ours breaks — a fuzz finding — never on bad input, which the parsers must
//! refuse with an error. Not an API.

use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;

use crate::fence::ssh::{KnownHosts, Verdict, known_hosts_name, parse_reports};
use crate::fence::vm::VmUuid;
use crate::rbd::{BlocklistEntry, Cidr, EntityAddr, ImageSpec};

/// A parser whose output prints back to text it parses to the same value.
fn round_trip<T>(text: &str)
where
    T: FromStr + std::fmt::Display + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = text.parse::<T>() {
        let printed = v.to_string();
        match printed.parse::<T>() {
            Ok(again) => assert_eq!(again, v, "{text:?} printed as {printed:?}"),
            Err(_) => panic!("{text:?} parsed, but its printed form {printed:?} does not"),
        }
    }
}

/// Entity addresses, blocklist entries, CIDR ranges, image specs, VM uuids: from requests,
/// the configuration, the mon's and the OSD's answers.
pub fn addresses(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    round_trip::<EntityAddr>(text);
    round_trip::<BlocklistEntry>(text);
    round_trip::<Cidr>(text);
    round_trip::<ImageSpec>(text);
    round_trip::<VmUuid>(text);
    if let Ok(list) = EntityAddr::parse_vec(text) {
        for a in list {
            round_trip::<EntityAddr>(&a.to_string());
        }
    }
    // A whole-IP entry covers every client of its address; an exact one only itself.
    if let Ok(a) = text.parse::<EntityAddr>() {
        let whole = BlocklistEntry::Addr(EntityAddr::whole_ip(a.ip));
        assert!(whole.fences(&a), "{whole} does not fence {a}");
    }
}

/// The lock class's record (`lock.rbd_lock` xattr of an image header), as the OSD returns it.
/// Every holder it yields has an address our own parser takes (the fence names it).
pub fn lock_record(data: &[u8]) {
    if let Ok(owners) = crate::rbd::lock_info::decode(data, 1_800_000_000) {
        for o in owners {
            if let Err(e) = o.addr() {
                panic!("decoded holder address {:?} does not parse: {e}", o.address);
            }
        }
    }
}

/// `osd blocklist ls` as the mon answers it (JSON arrays back to back).
pub fn blocklist_ls(data: &[u8]) {
    let _ = crate::rbd::blocklist::parse_ls(data);
}

/// The bodies of `POST /v1/pre-instantiate` and `POST /ha/sibling-fence-vm`. An accepted
/// request has valid hosts that differ, and volumes that print back to themselves.
pub fn requests(data: &[u8]) {
    if let Ok(req) = crate::api::decode_pre_instantiate(data) {
        assert_ne!(req.failed_host, req.target_host);
        assert!(
            !req.volumes.is_empty(),
            "a pre-instantiate names its volumes"
        );
        for v in &req.volumes {
            round_trip::<ImageSpec>(&v.to_string());
        }
    }
    if let Ok(req) = crate::api::decode_sibling_fence(data) {
        for v in &req.volumes {
            round_trip::<ImageSpec>(&v.to_string());
        }
    }
}

/// The uuids a fuzzed kill report answers for.
const REPORT_VMS: [&str; 3] = [
    "0b6e3f4e-9a51-4c55-8d3a-1f2e3d4c5b6a",
    "1c7f4a5f-ab62-4d66-9e4b-2a3f4e5d6c7b",
    "2d8a5b6a-bc73-4e77-af5c-3b4a5f6e7d8c",
];

/// The kill script's report, read back from the failed host: whatever it says, an accepted
/// report answers for exactly the requested VMs, never attributes one pid to two VMs, and
/// calls a VM gone only when no pid of it is alive and no closed socket that may still carry its
/// writes is left.
pub fn kill_report(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let vms: Vec<VmUuid> = REPORT_VMS
        .iter()
        .map(|u| u.parse().unwrap_or_else(|e| panic!("{u}: {e}")))
        .collect();
    if let Ok(reports) = parse_reports(text, &vms) {
        assert_eq!(reports.len(), vms.len());
        let mut seen = std::collections::HashSet::new();
        for r in &reports {
            for p in &r.pids {
                assert!(seen.insert(*p), "pid {p} under two VMs: {text:?}");
            }
            let swept = r.sockets.is_some_and(|s| s.held == Some(0));
            assert_eq!(r.gone, r.alive.is_empty() && swept, "{text:?}");
            assert_eq!(r.qemu_found, !r.pids.is_empty(), "{text:?}");
        }
    }
}

/// A fixed ed25519 host key the fuzzed `known_hosts` files are checked against.
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICjRBrHGjwkId9JKD8l2vsB7Lhv2ozJZi/cNfgEnuTR6";

/// A `known_hosts` file, and the verdict for a host's key from it: the first byte picks the
/// host's port (22 or another), the rest is the file. A key that a line of the file revokes
/// for the host is never trusted.
pub fn known_hosts(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let port = if pick % 2 == 0 { 22 } else { 2222 };
    let addr = SocketAddr::from(([198, 18, 0, 11], port));
    let name = known_hosts_name(addr);
    let key = russh::keys::PublicKey::from_openssh(HOST_KEY)
        .unwrap_or_else(|e| panic!("the fixed host key: {e}"));
    let known = KnownHosts::parse(Path::new("fuzz"), text);
    let verdict = known.verify(&name, &key);
    let _ = known.algorithms_for(&name);
    if text.lines().any(|l| {
        let mut w = l.split_whitespace();
        w.next() == Some("@revoked")
            && w.next() == Some(name.as_str())
            && HOST_KEY.split(' ').nth(1) == w.nth(1)
    }) {
        assert!(
            matches!(verdict, Verdict::Revoked { .. }),
            "a revoked key is trusted: {verdict:?}"
        );
    }
}
