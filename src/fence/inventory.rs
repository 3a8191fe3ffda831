//! The hosts rbdfence knows: which storage addresses are whose, and who may kill for whom.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// One hypervisor host of the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub uuid: String,
    pub cluster: String,
    /// The addresses this host's Ceph clients use.
    pub storage_addrs: Vec<IpAddr>,
    pub ssh: SocketAddr,
}

impl Host {
    /// Whether `ip` is one of this host's storage addresses (an IPv4-mapped IPv6 address
    /// counts as its IPv4 address).
    pub fn owns(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.storage_addrs.iter().any(|a| a.to_canonical() == ip)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Inventory {
    hosts: BTreeMap<String, Host>,
}

impl Inventory {
    pub fn new(hosts: Vec<Host>) -> Inventory {
        Inventory {
            hosts: hosts.into_iter().map(|h| (h.uuid.clone(), h)).collect(),
        }
    }

    pub fn get(&self, uuid: &str) -> Option<&Host> {
        self.hosts.get(uuid)
    }

    /// The host one of whose storage addresses `ip` is.
    pub fn owner(&self, ip: IpAddr) -> Option<&Host> {
        self.hosts.values().find(|h| h.owns(ip))
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The hosts that may kill for `failed`, best first: the other hosts of its cluster,
    /// the HA target last (it is about to run the VM; prefer a bystander when there is one).
    pub fn kill_executors(&self, failed: &Host, target: Option<&str>) -> Vec<&Host> {
        let mut siblings: Vec<&Host> = self
            .hosts
            .values()
            .filter(|h| h.cluster == failed.cluster && h.uuid != failed.uuid)
            .collect();
        siblings.sort_by_key(|h| (Some(h.uuid.as_str()) == target, h.uuid.clone()));
        siblings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(uuid: &str, cluster: &str, ip: &str) -> Host {
        Host {
            uuid: uuid.into(),
            cluster: cluster.into(),
            storage_addrs: vec![ip.parse().unwrap_or_else(|_| panic!("{ip}"))],
            ssh: SocketAddr::new(ip.parse().unwrap_or_else(|_| panic!("{ip}")), 22),
        }
    }

    #[test]
    fn executors_are_siblings_with_the_target_last() {
        let inv = Inventory::new(vec![
            host("h1", "c1", "127.0.0.2"),
            host("h2", "c1", "127.0.0.3"),
            host("h3", "c1", "127.0.0.4"),
            host("x1", "c2", "127.0.0.5"),
        ]);
        let failed = inv.get("h1").cloned().unwrap_or_else(|| panic!("h1"));
        let order: Vec<&str> = inv
            .kill_executors(&failed, Some("h2"))
            .iter()
            .map(|h| h.uuid.as_str())
            .collect();
        assert_eq!(order, vec!["h3", "h2"]);
        let order: Vec<&str> = inv
            .kill_executors(&failed, None)
            .iter()
            .map(|h| h.uuid.as_str())
            .collect();
        assert_eq!(order, vec!["h2", "h3"]);
        let lone = inv.get("x1").cloned().unwrap_or_else(|| panic!("x1"));
        assert!(inv.kill_executors(&lone, None).is_empty());
    }
}
