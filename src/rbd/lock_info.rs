//! The record Ceph's lock class keeps of a lock on an object (the `lock.<name>` xattr), read
//! with the object's watchers in one op and decoded here: who holds the lock, and how.
//!
//! Ceph's encoding, little-endian throughout; each versioned struct starts with a version
//! byte, a compat byte and a 32-bit length of what follows:
//!
//! ```text
//! lock_info    := struct{ u32 n, n × (locker_id, locker_info), u8 lock_type, string tag }
//! locker_id    := struct{ u8 entity_type, i64 entity_num, string cookie }
//! locker_info  := struct{ u32 sec, u32 nsec, entity_addr, string description }
//! entity_addr  := u8 1, struct{ u32 type, u32 nonce, u32 len, len bytes of sockaddr }
//!               | u8 0, 3 bytes 0, u32 nonce, 128 bytes of sockaddr_storage   (legacy)
//! string       := u32 len, len bytes
//! ```
//!
//! In the current form the sockaddr's family is little-endian; in the legacy form it is
//! big-endian; the port is big-endian in both. Anything else (a truncated record, a length
//! that overruns, an unknown family) is an error: the caller cannot tell who holds the lock,
//! so it must not say "nobody".

use std::net::{Ipv4Addr, Ipv6Addr};

use super::image::{LockMode, LockOwner};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// More lockers than this in one record is not a lock record we understand.
const MAX_LOCKERS: u32 = 4096;

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.data.len())
            .ok_or_else(|| format!("lock record truncated at byte {}", self.at))?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// A versioned struct's header; returns where the struct ends.
    fn start(&mut self, what: &str) -> Result<usize, String> {
        let _version = self.u8()?;
        let compat = self.u8()?;
        if compat > 1 {
            return Err(format!("{what} needs decoder version {compat}"));
        }
        let len = self.u32()? as usize;
        let end = self
            .at
            .checked_add(len)
            .filter(|e| *e <= self.data.len())
            .ok_or_else(|| format!("{what} overruns the lock record"))?;
        Ok(end)
    }

    /// Skips what a newer encoder appended to a struct.
    fn finish(&mut self, end: usize, what: &str) -> Result<(), String> {
        if self.at > end {
            return Err(format!("{what} is longer than its length says"));
        }
        self.at = end;
        Ok(())
    }
}

/// An entity address as `IP:PORT/NONCE` (`[IPv6]:PORT/NONCE`), as `rbd status` prints it.
fn entity_addr(r: &mut Reader<'_>) -> Result<String, String> {
    match r.u8()? {
        1 => {
            let end = r.start("entity_addr")?;
            let _type = r.u32()?;
            let nonce = r.u32()?;
            let len = r.u32()? as usize;
            let sa = r.take(len)?;
            r.finish(end, "entity_addr")?;
            if sa.len() < 2 {
                return Err("entity_addr without a family".into());
            }
            let family = u16::from_le_bytes([sa[0], sa[1]]);
            sockaddr(family, &sa[2..], nonce)
        }
        0 => {
            r.take(3)?;
            let nonce = r.u32()?;
            let ss = r.take(128)?;
            let family = u16::from_be_bytes([ss[0], ss[1]]);
            sockaddr(family, &ss[2..], nonce)
        }
        m => Err(format!("entity_addr marker {m} unknown")),
    }
}

fn sockaddr(family: u16, rest: &[u8], nonce: u32) -> Result<String, String> {
    match family {
        AF_INET if rest.len() >= 6 => {
            let port = u16::from_be_bytes([rest[0], rest[1]]);
            let ip = Ipv4Addr::new(rest[2], rest[3], rest[4], rest[5]);
            Ok(format!("{ip}:{port}/{nonce}"))
        }
        AF_INET6 if rest.len() >= 22 => {
            let port = u16::from_be_bytes([rest[0], rest[1]]);
            let mut b = [0u8; 16];
            b.copy_from_slice(&rest[6..22]);
            Ok(format!("[{}]:{port}/{nonce}", Ipv6Addr::from(b)))
        }
        f => Err(format!("entity_addr of family {f} (or too short)")),
    }
}

/// The holders of the lock in a `lock.<name>` xattr: their addresses and the lock's mode.
/// A holder whose lease expired before `now` (seconds since the epoch) is left out, as the
/// lock class itself leaves it out when asked; librbd's and `rbd lock add`'s locks have no
/// lease.
pub fn decode(data: &[u8], now: u64) -> Result<Vec<LockOwner>, String> {
    let mut r = Reader { data, at: 0 };
    let end = r.start("lock_info")?;
    let n = r.u32()?;
    if n > MAX_LOCKERS {
        return Err(format!("{n} lockers in one record"));
    }
    let mut addrs = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let id_end = r.start("locker_id")?;
        let _entity_type = r.u8()?;
        r.take(8)?;
        r.string()?;
        r.finish(id_end, "locker_id")?;
        let info_end = r.start("locker_info")?;
        let expires = u64::from(r.u32()?);
        let _nsec = r.u32()?;
        let addr = entity_addr(&mut r)?;
        r.string()?;
        r.finish(info_end, "locker_info")?;
        if expires == 0 || expires > now {
            addrs.push(addr);
        }
    }
    let mode = match r.u8()? {
        // exclusive, exclusive-ephemeral
        1 | 3 => LockMode::Exclusive,
        2 => LockMode::Shared,
        // "none": a record left after the last holder unlocked.
        0 => LockMode::Exclusive,
        t => return Err(format!("lock type {t} unknown")),
    };
    r.string()?;
    r.finish(end, "lock_info")?;
    if r.at != data.len() {
        return Err("bytes after the lock record".into());
    }
    Ok(addrs
        .into_iter()
        .map(|address| LockOwner { mode, address })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read from a micro cluster: `rbd_lock` of an image whose exclusive lock librbd holds for
    /// client.12676 at 127.0.0.1:0/1155582125 (`rados lock info` agrees).
    const LIBRBD_LOCK: &str = concat!(
        "01016d0000000100000001012100000008843100000000000014000000617574",
        "6f2031343036373131383438303239373601012f000000000000000000000001",
        "01011c00000001000000adc8e04410000000020000007f000001000000000000",
        "0000000000000108000000696e7465726e616c",
    );

    const NOW: u64 = 1_800_000_000;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_else(|e| panic!("{e}")))
            .collect()
    }

    #[test]
    fn a_real_exclusive_lock_record_decodes_to_its_holder() {
        let owners = decode(&hex(LIBRBD_LOCK), NOW).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            owners,
            vec![LockOwner {
                mode: LockMode::Exclusive,
                address: "127.0.0.1:0/1155582125".into()
            }]
        );
    }

    #[test]
    fn a_holder_whose_lease_ran_out_holds_nothing() {
        let mut rec = hex(LIBRBD_LOCK);
        // The locker_info's expiration: the 8 bytes after its struct header, which follows
        // the cookie "auto 140671184802976".
        let at = rec
            .windows(3)
            .position(|w| w == b"976")
            .unwrap_or_else(|| panic!("cookie not found"))
            + 3
            + 6;
        rec[at..at + 4].copy_from_slice(&((NOW - 1) as u32).to_le_bytes());
        assert_eq!(decode(&rec, NOW), Ok(vec![]));
        rec[at..at + 4].copy_from_slice(&((NOW + 60) as u32).to_le_bytes());
        assert_eq!(decode(&rec, NOW).map(|o| o.len()), Ok(1));
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_nobody() {
        let good = hex(LIBRBD_LOCK);
        for n in 0..good.len() {
            assert!(decode(&good[..n], NOW).is_err(), "truncated at {n}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(decode(&longer, NOW).is_err());
        // An unknown address family.
        let mut bad = good.clone();
        let fam = good
            .windows(6)
            .position(|w| w == [0x10, 0, 0, 0, 0x02, 0x00])
            .unwrap_or_else(|| panic!("family not found"));
        bad[fam + 4] = 0x07;
        assert!(decode(&bad, NOW).is_err());
        // A locker count far beyond any lock.
        let mut many = good;
        many[6..10].copy_from_slice(&100_000u32.to_le_bytes());
        assert!(decode(&many, NOW).is_err());
    }

    #[test]
    fn no_holder_and_ipv6_and_legacy_addresses() {
        // lock_info with no lockers, type none, empty tag.
        let empty = [1u8, 1, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(decode(&empty, NOW), Ok(vec![]));

        // marker 1; struct v1 compat 1, 40 bytes: type 1, nonce 7, a 28-byte sockaddr_in6.
        let mut v6 = vec![1u8, 1, 1, 40, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 28, 0, 0, 0];
        v6.extend_from_slice(&10u16.to_le_bytes());
        v6.extend_from_slice(&6800u16.to_be_bytes());
        v6.extend_from_slice(&[0; 4]);
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0; 4]);
        let mut r = Reader { data: &v6, at: 0 };
        assert_eq!(entity_addr(&mut r), Ok("[::1]:6800/7".to_string()));

        let mut legacy = vec![0u8, 0, 0, 0];
        legacy.extend_from_slice(&9u32.to_le_bytes());
        let mut ss = [0u8; 128];
        ss[..2].copy_from_slice(&AF_INET.to_be_bytes());
        ss[2..4].copy_from_slice(&6789u16.to_be_bytes());
        ss[4..8].copy_from_slice(&[10, 1, 2, 3]);
        legacy.extend_from_slice(&ss);
        let mut r = Reader {
            data: &legacy,
            at: 0,
        };
        assert_eq!(entity_addr(&mut r), Ok("10.1.2.3:6789/9".to_string()));
    }
}
