//! A test network built entirely inside network namespaces: the harness a newcomer reads first.
//!
//! Production failures are partitions, so the tests that need one make them for real:
//!
//! ```text
//!            namespace <tag>-sw: bridge "mg" (management)   bridge "st" (storage)
//!                                   |   |   |   |              |   |   |   |
//!   <tag>-svc   rbdfence serve ---- mg0 |   |   |   st0 -------+   |   |   |
//!   <tag>-ceph  mon + OSD                                    st0 --+   |   |
//!   <tag>-h1    sshd, qemus  ------ mg0 |   |                st0 ------+   |
//!   <tag>-h3    sshd       ---------- mg0   |                st0 ----------+
//!   …
//! ```
//!
//! - Every address is from 198.18.0.0/15 (management 198.18.0.0/24, storage 198.18.1.0/24), and
//!   lives only in namespaces the test made: the machine's own namespace gets no address, no
//!   route and no link of the test network. [`Net::new`] checks first that the machine does not
//!   use that range.
//! - A partition is the switch-side port of a host's link set down ([`Net::set`]): the host's
//!   TCP connections hang (no RST), exactly like a pulled cable; setting it up heals it.
//! - [`within`] runs a closure with the calling thread in a namespace: a process spawned there
//!   (sshd, qemu, the Ceph daemons, the service) lives in it, and a socket made there belongs to
//!   it. The test's own thread stays in the machine's namespace.
//! - [`Net`]'s drop deletes the namespaces, after the processes in them were ended by theirs.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// 198.18.0.0/15, the range the test networks use (RFC 2544's benchmarking range).
pub fn is_test_net(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 198 && (o[1] == 18 || o[1] == 19)
}

/// A management address: 198.18.0.`last`.
pub fn mgmt_ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, last)
}

/// A storage address: 198.18.1.`last`.
pub fn storage_ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, last)
}

fn setns(file: &File) {
    #[allow(unsafe_code)]
    // SAFETY: setns(2) takes a file descriptor that `file` keeps open for the call and a flag;
    // it changes only the calling thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Runs `f` with the calling thread in network namespace `ns` (a name from `ip netns`), then
/// moves the thread back where it was — also when `f` panics.
pub fn within<T>(ns: &str, f: impl FnOnce() -> T) -> T {
    struct Back(File);
    impl Drop for Back {
        fn drop(&mut self) {
            setns(&self.0);
        }
    }
    let home = File::open("/proc/thread-self/ns/net").unwrap();
    let target = File::open(format!("/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("network namespace {ns}: {e}"));
    setns(&target);
    let _back = Back(home);
    f()
}

/// Runs `ip ARGS` in the machine's namespace; panics with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip_output(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {}", args.join(" "));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Which of a host's two links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Mgmt,
    Storage,
}

impl Link {
    fn suffix(self) -> &'static str {
        match self {
            Link::Mgmt => "mg",
            Link::Storage => "st",
        }
    }
}

/// A namespace on the test network, with its addresses.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub ns: String,
    pub mgmt: Option<Ipv4Addr>,
    pub storage: Option<Ipv4Addr>,
}

/// The test network: a switch namespace with a management and a storage bridge, and the nodes
/// attached to them. Deleted when dropped.
pub struct Net {
    tag: String,
    switch: String,
    spaces: Vec<String>,
}

impl Net {
    /// Checks that the machine uses no address or route of 198.18.0.0/15, then makes the
    /// switch namespace with its two bridges.
    pub fn new() -> Net {
        for (what, text) in [
            ("address", ip_output(&["-o", "-4", "addr", "show"])),
            ("route", ip_output(&["-4", "route", "show", "table", "all"])),
        ] {
            assert!(
                !text.contains("198.18.") && !text.contains("198.19."),
                "this machine already has a 198.18.0.0/15 {what}; the test network must not \
                 shadow it:\n{text}"
            );
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "rbdf{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let switch = format!("{tag}-sw");
        let mut net = Net {
            tag,
            switch: switch.clone(),
            spaces: Vec::new(),
        };
        net.add_namespace(&switch);
        for bridge in ["mg", "st"] {
            ip(&["-n", &switch, "link", "add", bridge, "type", "bridge"]);
            ip(&["-n", &switch, "link", "set", bridge, "up"]);
        }
        net
    }

    fn add_namespace(&mut self, ns: &str) {
        ip(&["netns", "add", ns]);
        self.spaces.push(ns.to_string());
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }

    /// A node `name` (≤ 8 characters) with a management link at 198.18.0.`mgmt` and a storage
    /// link at 198.18.1.`storage`, each when given.
    pub fn node(&mut self, name: &str, mgmt: Option<u8>, storage: Option<u8>) -> Node {
        assert!(name.len() <= 8, "node names are at most 8 characters");
        let ns = format!("{}-{name}", self.tag);
        self.add_namespace(&ns);
        for (link, last) in [(Link::Mgmt, mgmt), (Link::Storage, storage)] {
            let Some(last) = last else { continue };
            let port = format!("{name}-{}", link.suffix());
            let inside = format!("{}0", link.suffix());
            let addr = match link {
                Link::Mgmt => mgmt_ip(last),
                Link::Storage => storage_ip(last),
            };
            let sw = self.switch.as_str();
            ip(&[
                "-n", sw, "link", "add", &port, "type", "veth", "peer", "name", &inside, "netns",
                &ns,
            ]);
            ip(&[
                "-n",
                sw,
                "link",
                "set",
                &port,
                "master",
                link.suffix(),
                "up",
            ]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &inside,
            ]);
            ip(&["-n", &ns, "link", "set", &inside, "up"]);
        }
        Node {
            name: name.to_string(),
            ns,
            mgmt: mgmt.map(mgmt_ip),
            storage: storage.map(storage_ip),
        }
    }

    /// Sets `node`'s `link` down (a partition: its switch port goes dark) or up (healed).
    pub fn set(&self, node: &Node, link: Link, up: bool) {
        let port = format!("{}-{}", node.name, link.suffix());
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &port,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.spaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
