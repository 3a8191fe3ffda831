//! Ceph entity addresses (`127.0.0.2:0/1207290181`) and blocklist entries.
//!
//! Pure parsing, no FFI. Accepts the forms Ceph prints: plain `IP:PORT/NONCE`, a msgr
//! prefix (`v1:`, `v2:`, `any:`), IPv6 in brackets, and address vectors `[v2:…,v1:…]`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One entity address: the IP a client's sockets use, its port (0 for clients) and nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntityAddr {
    pub ip: IpAddr,
    pub port: u16,
    pub nonce: u32,
}

impl EntityAddr {
    /// The whole-IP form `IP:0/0` that Ceph's blocklist matches against every client of the IP.
    pub fn whole_ip(ip: IpAddr) -> Self {
        EntityAddr {
            ip,
            port: 0,
            nonce: 0,
        }
    }

    /// Parses every address of a vector (`[v2:a,v1:b]`) or a single address.
    pub fn parse_vec(s: &str) -> Result<Vec<EntityAddr>, AddrError> {
        let s = s.trim();
        match s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            Some(inner) if inner.contains(',') || is_vec_element(inner) => inner
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| p.trim().parse())
                .collect(),
            _ => Ok(vec![s.parse()?]),
        }
    }
}

/// `[v2:…]` with one element: a vector, not a bracketed IPv6 literal.
fn is_vec_element(s: &str) -> bool {
    ["v1:", "v2:", "any:"].iter().any(|p| s.starts_with(p))
}

impl fmt::Display for EntityAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.nonce),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.nonce),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Ceph address {input:?}: {why}")]
pub struct AddrError {
    pub input: String,
    pub why: &'static str,
}

fn addr_err(input: &str, why: &'static str) -> AddrError {
    AddrError {
        input: input.to_string(),
        why,
    }
}

impl FromStr for EntityAddr {
    type Err = AddrError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let mut s = input.trim();
        for prefix in ["v1:", "v2:", "any:"] {
            if let Some(rest) = s.strip_prefix(prefix) {
                s = rest;
                break;
            }
        }
        let (hostport, nonce) = s
            .rsplit_once('/')
            .ok_or_else(|| addr_err(input, "expected IP:PORT/NONCE"))?;
        let nonce: u32 = nonce
            .parse()
            .map_err(|_| addr_err(input, "nonce is not a number"))?;
        let (ip, port) = if let Some(rest) = hostport.strip_prefix('[') {
            let (ip, port) = rest
                .split_once("]:")
                .ok_or_else(|| addr_err(input, "expected [IPv6]:PORT"))?;
            (ip, port)
        } else {
            hostport
                .rsplit_once(':')
                .ok_or_else(|| addr_err(input, "expected IP:PORT/NONCE"))?
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| addr_err(input, "not an IP address"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| addr_err(input, "port is not a number"))?;
        Ok(EntityAddr { ip, port, nonce })
    }
}

/// An IP network in CIDR form (`127.0.0.0/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub ip: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.ip, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = AddrError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let (ip, prefix) = input
            .trim()
            .split_once('/')
            .ok_or_else(|| addr_err(input, "expected IP/PREFIX"))?;
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| addr_err(input, "not an IP address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| addr_err(input, "prefix length is not a number"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(addr_err(input, "prefix length too long"));
        }
        Ok(Cidr { ip, prefix })
    }
}

/// What a blocklist entry fences: one client instance or every client of an IP
/// (`Addr`, sent as `osd blocklist add`), or a network (`Range`, `osd blocklist range add`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlocklistEntry {
    Addr(EntityAddr),
    Range(Cidr),
}

impl BlocklistEntry {
    pub fn kind(&self) -> &'static str {
        match self {
            BlocklistEntry::Addr(_) => "addr",
            BlocklistEntry::Range(_) => "range",
        }
    }

    /// Whether this entry fences a client at `addr`, as the OSDs decide it: an exact entry
    /// matches its own address, `IP:0/0` every client of the IP, a range every IP inside.
    pub fn fences(&self, addr: &EntityAddr) -> bool {
        match self {
            BlocklistEntry::Addr(e) if e.port == 0 && e.nonce == 0 => e.ip == addr.ip,
            BlocklistEntry::Addr(e) => e == addr,
            BlocklistEntry::Range(c) => c.contains(addr.ip),
        }
    }
}

impl BlocklistEntry {
    /// Whether this entry fences every client that `other` fences (so `other` adds nothing).
    pub fn covers(&self, other: &BlocklistEntry) -> bool {
        match other {
            BlocklistEntry::Addr(a) if a.port == 0 && a.nonce == 0 => match self {
                BlocklistEntry::Addr(s) => s == a,
                BlocklistEntry::Range(c) => c.contains(a.ip),
            },
            BlocklistEntry::Addr(a) => self.fences(a),
            BlocklistEntry::Range(r) => match self {
                BlocklistEntry::Range(s) => {
                    s.prefix <= r.prefix && s.contains(r.ip) && s.ip.is_ipv4() == r.ip.is_ipv4()
                }
                BlocklistEntry::Addr(_) => false,
            },
        }
    }
}

impl fmt::Display for BlocklistEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlocklistEntry::Addr(a) => a.fmt(f),
            BlocklistEntry::Range(c) => c.fmt(f),
        }
    }
}

impl FromStr for BlocklistEntry {
    type Err = AddrError;

    /// `IP:PORT/NONCE` (exact), a bare IP (= `IP:0/0`), or a CIDR (a range).
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        if s.is_empty() {
            return Err(addr_err(input, "empty"));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(BlocklistEntry::Addr(EntityAddr::whole_ip(ip)));
        }
        if let Some(ip) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            let ip = ip
                .parse()
                .map_err(|_| addr_err(input, "not an IP address"))?;
            return Ok(BlocklistEntry::Addr(EntityAddr::whole_ip(ip)));
        }
        // IP/PREFIX has no port; IP:PORT/NONCE has one (IPv6 entity addresses are bracketed).
        let (head, _) = s.rsplit_once('/').ok_or_else(|| {
            addr_err(
                input,
                "expected IP:PORT/NONCE, a bare IP or a CIDR (IP/PREFIX)",
            )
        })?;
        if head.parse::<IpAddr>().is_ok() {
            return s.parse().map(BlocklistEntry::Range);
        }
        s.parse().map(BlocklistEntry::Addr).map_err(|_| {
            addr_err(
                input,
                "expected IP:PORT/NONCE, a bare IP or a CIDR (IP/PREFIX)",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> EntityAddr {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn parses_entity_addresses() {
        let x = a("127.0.0.2:0/1207290181");
        assert_eq!(x.ip.to_string(), "127.0.0.2");
        assert_eq!((x.port, x.nonce), (0, 1207290181));
        assert_eq!(x.to_string(), "127.0.0.2:0/1207290181");
        assert_eq!(a("v2:127.0.0.1:3300/0").port, 3300);
        assert_eq!(a("any:127.0.0.1:0/7").nonce, 7);
        assert_eq!(a("[::1]:0/5").to_string(), "[::1]:0/5");
        for bad in [
            "",
            "127.0.0.2",
            "127.0.0.2:0",
            "x:0/1",
            "127.0.0.2:99999/1",
            "127.0.0.2:0/x",
        ] {
            assert!(bad.parse::<EntityAddr>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn parses_address_vectors() {
        let v = EntityAddr::parse_vec("[v2:127.0.0.1:0/11,v1:127.0.0.1:0/11]").unwrap_or_default();
        assert_eq!(v.len(), 2);
        assert_eq!(
            EntityAddr::parse_vec("[any:127.0.0.1:0/3]")
                .unwrap_or_default()
                .len(),
            1
        );
        assert_eq!(
            EntityAddr::parse_vec("127.0.0.1:0/3")
                .unwrap_or_default()
                .len(),
            1
        );
        assert_eq!(
            EntityAddr::parse_vec("[::1]:0/3").unwrap_or_default().len(),
            1
        );
    }

    #[test]
    fn parses_blocklist_entries() {
        let e: BlocklistEntry = "127.0.0.2".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.to_string(), "127.0.0.2:0/0");
        assert_eq!(e.kind(), "addr");
        let e: BlocklistEntry = "127.0.0.2:0/123".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.to_string(), "127.0.0.2:0/123");
        let e: BlocklistEntry = "127.0.0.0/24".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            ("range", "127.0.0.0/24")
        );
        let e: BlocklistEntry = "fd00::/64".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.kind(), "range");
        let e: BlocklistEntry = "::1".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.to_string(), "[::1]:0/0");
        for bad in [
            "",
            "host",
            "127.0.0.2:0",
            "127.0.0.0/33",
            "1.2.3/4",
            "127.0.0.2;rm -rf /",
        ] {
            assert!(
                bad.parse::<BlocklistEntry>().is_err(),
                "{bad} should not parse"
            );
        }
    }

    #[test]
    fn coverage_between_entries() {
        let e = |s: &str| {
            s.parse::<BlocklistEntry>()
                .unwrap_or_else(|e| panic!("{e}"))
        };
        assert!(e("127.0.0.2").covers(&e("127.0.0.2:0/77")));
        assert!(e("127.0.0.2").covers(&e("127.0.0.2")));
        assert!(!e("127.0.0.2:0/77").covers(&e("127.0.0.2")));
        assert!(!e("127.0.0.2").covers(&e("127.0.0.3:0/1")));
        assert!(e("127.0.0.0/24").covers(&e("127.0.0.2")));
        assert!(e("127.0.0.0/24").covers(&e("127.0.0.0/25")));
        assert!(!e("127.0.0.0/25").covers(&e("127.0.0.0/24")));
    }

    #[test]
    fn entries_fence_as_the_osds_do() {
        let holder = a("127.0.0.2:0/42");
        let other = a("127.0.0.4:0/42");
        let whole: BlocklistEntry = "127.0.0.2".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(whole.fences(&holder) && !whole.fences(&other));
        let exact: BlocklistEntry = "127.0.0.2:0/42".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(exact.fences(&holder) && !exact.fences(&a("127.0.0.2:0/43")));
        let range: BlocklistEntry = "127.0.0.0/30".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(range.fences(&holder) && !range.fences(&other));
    }
}
