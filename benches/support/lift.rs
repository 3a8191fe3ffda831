//! Lifting a benchmark's leftover blocklist entries (shared by the benchmarks through
//! `#[path]`).

use std::ops::RangeInclusive;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

/// Whether `entry` (`IP:PORT/NONCE` or `IP/BITS`) is on 127.0.0.X with X in `last`.
fn ours(entry: &str, last: &RangeInclusive<u8>) -> bool {
    let ip = entry.split(['/', ':']).next().unwrap_or("");
    ip.strip_prefix("127.0.0.")
        .and_then(|o| o.parse::<u8>().ok())
        .is_some_and(|o| last.contains(&o))
}

/// Lifts (as admin, with the CLI) every blocklist entry on 127.0.0.X, X in `last`; returns
/// them.
pub fn lift_entries(conf: &Path, last: RangeInclusive<u8>) -> Vec<String> {
    let Ok(out) = Command::new("ceph")
        .arg("--conf")
        .arg(conf)
        .args(["osd", "blocklist", "ls", "--format", "json"])
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    // Two arrays back to back: addresses, then ranges.
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lifted = Vec::new();
    for (k, arr) in serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .filter_map(Result::ok)
        .enumerate()
    {
        for item in arr.as_array().cloned().unwrap_or_default() {
            let Some(entry) = item["addr"].as_str().or(item["range"].as_str()) else {
                continue;
            };
            if !ours(entry, &last) {
                continue;
            }
            let args: &[&str] = if k == 0 {
                &["osd", "blocklist", "rm"]
            } else {
                &["osd", "blocklist", "range", "rm"]
            };
            let _ = Command::new("ceph")
                .arg("--conf")
                .arg(conf)
                .args(args)
                .arg(entry)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            lifted.push(entry.to_string());
        }
    }
    lifted
}
