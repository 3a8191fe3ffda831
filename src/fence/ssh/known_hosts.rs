//! `known_hosts`: the host keys rbdfence trusts, and OpenSSH's rules for matching them.
//!
//! The lines are parsed by `ssh-key` (through russh); the matching is ours, because russh's
//! `check_known_hosts_path` is unsafe for a fencer, and must not replace it:
//! - it reads a missing or unreadable file as an empty one, so a mistyped path reads as
//!   "unknown host" instead of the error the operator needs;
//! - it splits lines on single spaces, so tabs or double blanks break matching;
//! - it ignores `@revoked` (a revoked key also listed plainly is trusted) and `@cert-authority`;
//! - it has no `*`/`?` globs and no `!` negation;
//! - a key of another algorithm is "unknown", never "changed";
//! - its line numbers drift after comment lines.
//!
//! Here: blanks are collapsed before parsing; globs, negation and hashed names (`|1|salt|hash`,
//! HMAC-SHA1) match as OpenSSH does; `@revoked` wins over any plain line, and a revocation
//! line that does not parse still revokes the key blob it names; `@cert-authority` lines are
//! skipped; a missing file is an error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::known_hosts::{Entry, HostPatterns, Marker};
use russh::keys::{Algorithm, PublicKey};

use super::SshError;

/// The name OpenSSH files a host under: `ip` for port 22, `[ip]:port` otherwise.
pub(crate) fn known_hosts_name(addr: SocketAddr) -> String {
    if addr.port() == 22 {
        addr.ip().to_string()
    } else {
        format!("[{}]:{}", addr.ip(), addr.port())
    }
}

/// A parsed `known_hosts` file.
pub(crate) struct KnownHosts {
    pub(super) path: PathBuf,
    /// (1-based line number, entry)
    entries: Vec<(usize, Entry)>,
    /// `@revoked` lines that do not parse: (line number, their words). A key whose base64
    /// blob is one of the words is refused for every host — a mistyped revocation must not
    /// be skipped the way OpenSSH skips other bad lines, or the key it revokes stays trusted.
    broken_revocations: Vec<(usize, Vec<String>)>,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Trusted,
    Unknown,
    Changed { line: usize },
    Revoked { line: usize },
}

impl KnownHosts {
    /// Read and parse `path`. A missing or unreadable file is an error (not an empty list), so a
    /// mistyped path is reported as such. Lines that do not parse are skipped, like OpenSSH does.
    pub(super) fn load(path: &Path) -> Result<KnownHosts, SshError> {
        let text = std::fs::read_to_string(path).map_err(|e| SshError::LocalFile {
            what: "known_hosts",
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Ok(KnownHosts::parse(path, &text))
    }

    pub(crate) fn parse(path: &Path, text: &str) -> KnownHosts {
        let mut entries = Vec::new();
        let mut broken_revocations = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // ssh-key's parser wants single spaces between fields; OpenSSH allows any blanks.
            let normalised = line.split_whitespace().collect::<Vec<_>>().join(" ");
            match normalised.parse::<Entry>() {
                Ok(entry) => entries.push((index + 1, entry)),
                Err(e) if normalised.starts_with("@revoked") => {
                    tracing::warn!(
                        path = %path.display(), line = index + 1, error = %e,
                        "a @revoked known_hosts line does not parse: the key in it is refused for every host"
                    );
                    let words = normalised.split(' ').skip(1).map(String::from).collect();
                    broken_revocations.push((index + 1, words));
                }
                Err(e) => tracing::warn!(
                    path = %path.display(), line = index + 1, error = %e,
                    "skipping unparsable known_hosts line"
                ),
            }
        }
        KnownHosts {
            path: path.to_owned(),
            entries,
            broken_revocations,
        }
    }

    /// Entries that apply to `name`, ignoring `@cert-authority` lines.
    fn applicable<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (usize, &'a Entry)> + 'a {
        self.entries
            .iter()
            .filter(move |(_, e)| {
                e.marker() != Some(&Marker::CertAuthority) && host_matches(e.host_patterns(), name)
            })
            .map(|(line, e)| (*line, e))
    }

    pub(crate) fn verify(&self, name: &str, key: &PublicKey) -> Verdict {
        if let Some(blob) = key
            .to_openssh()
            .ok()
            .and_then(|t| t.split(' ').nth(1).map(String::from))
            && let Some((line, _)) = self
                .broken_revocations
                .iter()
                .find(|(_, words)| words.contains(&blob))
        {
            return Verdict::Revoked { line: *line };
        }
        let mut first_other = None;
        let mut trusted = false;
        for (line, entry) in self.applicable(name) {
            let same = entry.public_key().key_data() == key.key_data();
            match entry.marker() {
                Some(Marker::Revoked) if same => return Verdict::Revoked { line },
                Some(_) => {}
                None if same => trusted = true,
                None => {
                    first_other.get_or_insert(line);
                }
            }
        }
        match (trusted, first_other) {
            (true, _) => Verdict::Trusted,
            (false, Some(line)) => Verdict::Changed { line },
            (false, None) => Verdict::Unknown,
        }
    }

    /// The host-key algorithms to ask `name` for: those of its recorded keys, in russh's order
    /// of preference. Empty when nothing is recorded.
    pub(crate) fn algorithms_for(&self, name: &str) -> Vec<Algorithm> {
        let recorded: Vec<Algorithm> = self
            .applicable(name)
            .filter(|(_, e)| e.marker().is_none())
            .map(|(_, e)| family(&e.public_key().algorithm()))
            .collect();
        russh::Preferred::default()
            .key
            .iter()
            .filter(|a| recorded.contains(&family(a)))
            .cloned()
            .collect()
    }
}

/// RSA keys are one family whatever signature hash is negotiated.
fn family(algorithm: &Algorithm) -> Algorithm {
    match algorithm {
        Algorithm::Rsa { .. } => Algorithm::Rsa { hash: None },
        other => other.clone(),
    }
}

fn host_matches(patterns: &HostPatterns, name: &str) -> bool {
    match patterns {
        HostPatterns::Patterns(list) => {
            let mut hit = false;
            for pattern in list {
                if let Some(negated) = pattern.strip_prefix('!') {
                    if glob(negated.as_bytes(), name.as_bytes()) {
                        return false;
                    }
                } else if glob(pattern.as_bytes(), name.as_bytes()) {
                    hit = true;
                }
            }
            hit
        }
        HostPatterns::HashedName { salt, hash } => {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt);
            ring::hmac::verify(&key, name.as_bytes(), hash).is_ok()
        }
    }
}

/// OpenSSH host-pattern matching: `*` any run of characters, `?` one character, otherwise
/// exact (ASCII case-insensitive, as OpenSSH lowercases host names).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c.eq_ignore_ascii_case(&text[t]) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ED_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA/GZYKo8S4/9tYOAyzpsfUaaTCm9AGiUxzOuw9CVpNT";
    const ED_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKJGp9M0Pc8etpNAEsoNmoogJTIHN9ZpB1DGqVfkNYvU";

    fn key(s: &str) -> PublicKey {
        s.parse().unwrap()
    }

    #[test]
    fn known_hosts_matching() {
        let text = format!(
            "# comment\n\
             \n\
             [127.0.0.2]:2222 {ED_A} host a\n\
             127.0.0.3\t{ED_A}\n\
             [127.0.0.4]:2222,[127.0.0.5]:2222   {ED_B}\n\
             [127.0.0.4]:2222 {ED_A}\n\
             @revoked [127.0.0.6]:2222 {ED_A}\n\
             [127.0.0.6]:2222 {ED_A}\n\
             @cert-authority [127.0.0.7]:2222 {ED_A}\n\
             [127.0.0.8]:* {ED_A}\n\
             127.0.0.*,!127.0.0.99 {ED_B}\n\
             this line is garbage\n"
        );
        let kh = KnownHosts::parse(Path::new("/kh"), &text);
        let a = key(ED_A);
        let b = key(ED_B);
        assert_eq!(kh.verify("[127.0.0.2]:2222", &a), Verdict::Trusted);
        assert_eq!(
            kh.verify("[127.0.0.2]:2222", &b),
            Verdict::Changed { line: 3 }
        );
        // Same address, other port: a different host entry.
        assert_eq!(kh.verify("[127.0.0.2]:2223", &a), Verdict::Unknown);
        assert_eq!(kh.verify("127.0.0.3", &a), Verdict::Trusted);
        // Any recorded key for the host that matches is enough (OpenSSH semantics).
        assert_eq!(kh.verify("[127.0.0.4]:2222", &a), Verdict::Trusted);
        assert_eq!(kh.verify("[127.0.0.5]:2222", &b), Verdict::Trusted);
        assert_eq!(
            kh.verify("[127.0.0.5]:2222", &a),
            Verdict::Changed { line: 5 }
        );
        assert_eq!(
            kh.verify("[127.0.0.6]:2222", &a),
            Verdict::Revoked { line: 7 }
        );
        assert_eq!(kh.verify("[127.0.0.7]:2222", &a), Verdict::Unknown);
        assert_eq!(kh.verify("[127.0.0.8]:2222", &a), Verdict::Trusted);
        assert_eq!(kh.verify("127.0.0.50", &b), Verdict::Trusted);
        assert_eq!(kh.verify("127.0.0.99", &b), Verdict::Unknown);
        assert_eq!(kh.verify("10.0.0.1", &a), Verdict::Unknown);
        assert_eq!(
            kh.algorithms_for("[127.0.0.2]:2222"),
            vec![Algorithm::Ed25519]
        );
        assert!(kh.algorithms_for("10.0.0.1").is_empty());
    }

    /// Found by the `known_hosts` fuzz target: a `@revoked` line whose key type is mistyped
    /// does not parse, and was skipped — so the very key it revokes was trusted through the
    /// host's plain line. A revocation is never lost that way: its key is refused for every
    /// host, whatever the rest of the line says.
    #[test]
    fn a_revocation_that_does_not_parse_still_revokes_its_key() {
        let blob = ED_A.split_whitespace().nth(1).unwrap_or_default();
        let text = format!(
            "[127.0.0.6]:2222 {ED_A}\n\
             @revoked [127.0.0.6]:2222 ssh-ed19995 {blob}\n\
             @revoked\t127.0.0.9  {blob} trailing words\n\
             [127.0.0.7]:2222 {ED_B}\n\
             @revoked [127.0.0.7]:2222 ssh-ed25519 AAAA!!notbase64\n"
        );
        let kh = KnownHosts::parse(Path::new("/kh"), &text);
        assert_eq!(
            kh.verify("[127.0.0.6]:2222", &key(ED_A)),
            Verdict::Revoked { line: 2 }
        );
        assert_eq!(
            kh.verify("[127.0.0.8]:2222", &key(ED_A)),
            Verdict::Revoked { line: 2 }
        );
        // A revocation with no key in it revokes nothing it could name.
        assert_eq!(kh.verify("[127.0.0.7]:2222", &key(ED_B)), Verdict::Trusted);
    }

    #[test]
    fn hashed_known_hosts_entries_match() {
        // `ssh-keygen -H` form of "[127.0.0.2]:2222", salt = 20 zero bytes.
        let salt = [0u8; 20];
        let key_hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
        let tag = ring::hmac::sign(&key_hmac, b"[127.0.0.2]:2222");
        let b64 = |bytes: &[u8]| {
            // Tiny standard base64 encoder for the test.
            const ALPHABET: &[u8] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut out = String::new();
            for chunk in bytes.chunks(3) {
                let n = chunk.len();
                let v = (u32::from(chunk[0]) << 16)
                    | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
                    | u32::from(*chunk.get(2).unwrap_or(&0));
                for i in 0..4 {
                    if i <= n {
                        out.push(char::from(ALPHABET[((v >> (18 - 6 * i)) & 63) as usize]));
                    } else {
                        out.push('=');
                    }
                }
            }
            out
        };
        let line = format!("|1|{}|{} {ED_A}\n", b64(&salt), b64(tag.as_ref()));
        let kh = KnownHosts::parse(Path::new("/kh"), &line);
        assert_eq!(kh.entries.len(), 1, "{line}");
        assert_eq!(kh.verify("[127.0.0.2]:2222", &key(ED_A)), Verdict::Trusted);
        assert_eq!(
            kh.verify("[127.0.0.2]:2222", &key(ED_B)),
            Verdict::Changed { line: 1 }
        );
        assert_eq!(kh.verify("[127.0.0.3]:2222", &key(ED_A)), Verdict::Unknown);
    }

    #[test]
    fn known_hosts_names_and_globs() {
        assert_eq!(
            known_hosts_name("127.0.0.2:22".parse().unwrap()),
            "127.0.0.2"
        );
        assert_eq!(
            known_hosts_name("127.0.0.2:2222".parse().unwrap()),
            "[127.0.0.2]:2222"
        );
        assert_eq!(
            known_hosts_name("[::1]:2222".parse().unwrap()),
            "[::1]:2222"
        );
        assert!(glob(b"*", b"anything"));
        assert!(glob(b"127.0.0.?", b"127.0.0.5"));
        assert!(!glob(b"127.0.0.?", b"127.0.0.55"));
        assert!(glob(b"HOST*", b"host.example"));
        assert!(glob(b"*.example", b"a.b.example"));
        assert!(!glob(b"*.example", b"a.b.exampl"));
        assert!(!glob(b"", b"x"));
        assert!(glob(b"", b""));
    }
}
