//! The OSD blocklist through mon commands (`osd blocklist [range] add|rm`, `osd blocklist ls`)
//! and the osdmap epoch (`osd stat`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::addr::BlocklistEntry;
use super::cluster::Rados;
use super::error::{CephError, Op};

/// One entry of `blocklist ls`, as the contract prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlocklistItem {
    pub entry: String,
    pub kind: String,
    /// RFC 3339, UTC.
    pub until: String,
}

#[derive(Deserialize)]
struct RawItem {
    /// `addr` in the first array; `range` in the second, printed as an entity address whose
    /// nonce is the prefix length (`127.0.0.0:0/24`).
    #[serde(alias = "range")]
    addr: String,
    until: String,
}

fn command(op: &str, entry: &BlocklistEntry, expire: Option<Duration>) -> serde_json::Value {
    let mut cmd = json!({
        "prefix": "osd blocklist",
        "blocklistop": op,
        "addr": entry.to_string(),
    });
    if matches!(entry, BlocklistEntry::Range(_)) {
        cmd["range"] = json!("range");
    }
    if let Some(e) = expire {
        // The mon parses expire as a float (CephFloat).
        cmd["expire"] = json!(e.as_secs_f64());
    }
    cmd
}

/// What the service's cephx user may do with the blocklist, as the monitors answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlocklistRights {
    /// `osd blocklist add` of an exact entry (a VM's client, a whole IP).
    pub add: bool,
    /// `osd blocklist range add` (keeping a host's fence in force without a gap).
    pub range_add: bool,
    /// `osd blocklist rm` / `range rm` (lifting a fence).
    pub rm: bool,
}

/// No address, yet of the shape `profile rbd` grants `osd blocklist add` on
/// (`^[^/]+/[0-9]+$`): a monitor that lets a command naming it past the capability check can
/// only refuse it as unparsable.
const PROBE_ADDR: &str = "rbdfence-permission-probe/0";

impl Rados {
    /// Asks the monitors whether this user may add (exact entries and ranges) and remove
    /// blocklist entries, without changing anything: each command names [`PROBE_ADDR`], so a
    /// monitor whose capability check lets it through refuses it as unparsable (`EINVAL`,
    /// "unable to parse address"), and one whose check does not answers `EACCES`. Any other
    /// answer is an error: the rights are then unknown, never assumed.
    ///
    /// Implements: `rados_mon_command` (`osd blocklist [range] add|rm`, refused).
    pub fn blocklist_rights(&self) -> Result<BlocklistRights, CephError> {
        let ask = |op: &str, range: bool| -> Result<bool, CephError> {
            let mut cmd = json!({
                "prefix": "osd blocklist",
                "blocklistop": op,
                "addr": PROBE_ADDR,
            });
            if range {
                cmd["range"] = json!("range");
            }
            match self.mon_command(Op::BlocklistProbe, PROBE_ADDR, &cmd) {
                Err(e) if e.errno == libc::EACCES => Ok(false),
                Err(e) if e.errno == libc::EINVAL && e.message.contains("parse") => Ok(true),
                Err(e) => Err(e),
                Ok(_) => Err(CephError::new(
                    Op::BlocklistProbe,
                    PROBE_ADDR,
                    libc::EPROTO,
                    "the monitors accepted a blocklist command that names no address",
                )),
            }
        };
        Ok(BlocklistRights {
            add: ask("add", false)?,
            range_add: ask("add", true)?,
            rm: ask("rm", false)?,
        })
    }

    /// Adds a blocklist entry, committed by the monitors when this returns. Does not wait for
    /// this client's osdmap to catch up: call [`Rados::wait_for_latest_osdmap`] for that.
    ///
    /// Implements: `rados_mon_command` (`osd blocklist add`, `osd blocklist range add`).
    pub fn blocklist_add(
        &self,
        entry: &BlocklistEntry,
        expire: Option<Duration>,
    ) -> Result<(), CephError> {
        self.mon_command(
            Op::BlocklistAdd,
            &entry.to_string(),
            &command("add", entry, expire),
        )
        .map(|_| ())
    }

    /// Removes a blocklist entry (Ceph answers success for an entry that is not there).
    ///
    /// Implements: `rados_mon_command` (`osd blocklist rm`, `osd blocklist range rm`).
    pub fn blocklist_rm(&self, entry: &BlocklistEntry) -> Result<(), CephError> {
        self.mon_command(
            Op::BlocklistRm,
            &entry.to_string(),
            &command("rm", entry, None),
        )
        .map(|_| ())
    }

    /// Every blocklist entry, addresses then ranges.
    ///
    /// Implements: `rados_mon_command` (`osd blocklist ls`).
    pub fn blocklist_ls(&self) -> Result<Vec<BlocklistItem>, CephError> {
        let reply = self.mon_command(
            Op::BlocklistLs,
            "",
            &json!({"prefix": "osd blocklist ls", "format": "json"}),
        )?;
        parse_ls(&reply.out).map_err(|why| CephError::new(Op::BlocklistLs, "", libc::EBADMSG, why))
    }

    /// The epoch of the osdmap the monitors have committed.
    ///
    /// Implements: `rados_mon_command` (`osd stat`).
    pub fn osdmap_epoch(&self) -> Result<u64, CephError> {
        let reply = self.mon_command(
            Op::OsdmapEpoch,
            "",
            &json!({"prefix": "osd stat", "format": "json"}),
        )?;
        let v: serde_json::Value = serde_json::from_slice(&reply.out).map_err(|e| {
            CephError::new(
                Op::OsdmapEpoch,
                "",
                libc::EBADMSG,
                format!("bad JSON from osd stat: {e}"),
            )
        })?;
        v.get("epoch")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| {
                CephError::new(Op::OsdmapEpoch, "", libc::EBADMSG, "osd stat has no epoch")
            })
    }
}

/// `osd blocklist ls` answers with two JSON arrays back to back: addresses, then ranges
/// (older mons send only the first). A plain JSON parse fails on that; stream the values.
pub(crate) fn parse_ls(out: &[u8]) -> Result<Vec<BlocklistItem>, String> {
    let mut items = Vec::new();
    let stream = serde_json::Deserializer::from_slice(out).into_iter::<Vec<RawItem>>();
    for (i, array) in stream.enumerate() {
        let array = array.map_err(|e| format!("bad JSON from osd blocklist ls: {e}"))?;
        let kind = if i == 0 { "addr" } else { "range" };
        for raw in array {
            let entry = if kind == "range" {
                range_to_cidr(&raw.addr)
            } else {
                raw.addr
            };
            items.push(BlocklistItem {
                until: ceph_time_to_rfc3339(&raw.until).unwrap_or(raw.until),
                entry,
                kind: kind.to_string(),
            });
        }
    }
    Ok(items)
}

/// `127.0.0.0:0/24` (how the mon lists a range) → `127.0.0.0/24`, the form `add` takes.
fn range_to_cidr(s: &str) -> String {
    match s.parse::<super::addr::EntityAddr>() {
        Ok(a) => super::addr::Cidr {
            ip: a.ip,
            prefix: u8::try_from(a.nonce).unwrap_or(u8::MAX),
        }
        .to_string(),
        Err(_) => s.to_string(),
    }
}

/// Ceph prints times as `2026-11-25T22:40:02.123456+0000` (or with a space for the `T`);
/// returns the same instant as RFC 3339 in UTC, or `None` when it is not such a time.
pub fn ceph_time_to_rfc3339(s: &str) -> Option<String> {
    let s = s.trim().replacen(' ', "T", 1);
    let normalized = match s.len().checked_sub(5).and_then(|i| s.split_at_checked(i)) {
        // "+0000" → "+00:00"
        Some((head, off))
            if (off.starts_with('+') || off.starts_with('-'))
                && off[1..].bytes().all(|b| b.is_ascii_digit()) =>
        {
            format!("{head}{}:{}", &off[..3], &off[3..])
        }
        _ => s.clone(),
    };
    let t = OffsetDateTime::parse(&normalized, &Rfc3339).ok()?;
    t.to_offset(time::UtcOffset::UTC).format(&Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `blocklist_ls` fuzz target: a multi-byte character where the offset
    /// would start made the time parser slice inside it and panic.
    #[test]
    fn a_time_with_a_multibyte_character_is_no_time_and_no_panic() {
        assert_eq!(
            ceph_time_to_rfc3339("2026-11-29T21:80:00.00000\u{645}0000"),
            None
        );
        assert_eq!(
            ceph_time_to_rfc3339("2026-11-29T21:00:00.000000+\u{e9}00"),
            None
        );
        let out =
            "[{\"addr\":\"127.0.0.9:0/0\",\"until\":\"2026-11-29T21:80:00.00000\u{645}0000\"}]";
        let items = parse_ls(out.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(items.len(), 1);
    }

    #[test]
    fn parses_both_arrays_of_ls() {
        let out = br#"[{"addr":"127.0.0.2:0/0","until":"2026-11-25T22:40:02.123456+0000"}][{"range":"127.0.0.0:0/24","until":"2026-11-25T22:40:02.000000+0100"}]"#;
        let items = parse_ls(out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].entry, "127.0.0.2:0/0");
        assert_eq!(items[0].kind, "addr");
        assert_eq!(items[0].until, "2026-11-25T22:40:02.123456Z");
        assert_eq!(items[1].kind, "range");
        assert_eq!(items[1].entry, "127.0.0.0/24");
        assert_eq!(items[1].until, "2026-11-25T21:40:02Z");
        assert!(parse_ls(b"[]").unwrap_or_else(|e| panic!("{e}")).is_empty());
        assert!(parse_ls(b"[{").is_err());
    }

    #[test]
    fn range_commands_carry_the_range_word() {
        let e: BlocklistEntry = "127.0.0.0/24".parse().unwrap_or_else(|e| panic!("{e}"));
        let c = command("add", &e, Some(Duration::from_secs(60)));
        assert_eq!(c["range"], "range");
        assert_eq!(c["expire"], 60.0);
        let e: BlocklistEntry = "127.0.0.2".parse().unwrap_or_else(|e| panic!("{e}"));
        let c = command("rm", &e, None);
        assert_eq!(c["addr"], "127.0.0.2:0/0");
        assert!(c.get("range").is_none() && c.get("expire").is_none());
    }
}
