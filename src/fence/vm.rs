//! A validated VM uuid.
//!
//! [`VmUuid`] is the only way a VM's identity reaches a remote command (the SSH kill step builds
//! its shell text from it), so parsing is strict: exactly 32 hex digits, either in the canonical
//! hyphenated 8-4-4-4-12 form or in ZStack's form without hyphens, in any letter case. Nothing
//! else — no surrounding whitespace, no braces, no `urn:uuid:` prefix. The value is kept in the
//! form libvirt hands to qemu's `-uuid`: lowercase and hyphenated.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Length of the canonical hyphenated form (`8-4-4-4-12`).
const HYPHENATED_LEN: usize = 36;
/// Length of the bare form (ZStack's uuids).
const BARE_LEN: usize = 32;
/// Byte offsets of the hyphens in the canonical form.
const HYPHENS: [usize; 4] = [8, 13, 18, 23];
/// How much of a rejected input an error message repeats.
const ECHO_MAX: usize = 64;

/// A VM uuid, validated and normalised to lowercase hyphenated form
/// (`0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmUuid(String);

/// Why a string is not a VM uuid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid VM uuid {input:?}: {reason}")]
pub struct VmUuidError {
    /// The rejected input, truncated to a bounded length and escaped when displayed.
    pub input: String,
    /// What is wrong with it.
    pub reason: VmUuidErrorReason,
}

/// The reason a VM uuid was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VmUuidErrorReason {
    /// Neither 36 (hyphenated) nor 32 (bare) bytes long.
    #[error("length {0} is neither 36 (8-4-4-4-12 with hyphens) nor 32 (hex digits only)")]
    Length(usize),
    /// A byte that is not a hex digit where one is required.
    #[error("byte {position} is not a hex digit")]
    NotHex {
        /// Zero-based byte offset.
        position: usize,
    },
    /// A hyphen missing from, or misplaced in, the hyphenated form.
    #[error("byte {position} should be '-' (groups are 8-4-4-4-12)")]
    Hyphen {
        /// Zero-based byte offset.
        position: usize,
    },
}

impl VmUuid {
    /// The normalised form: lowercase, hyphenated.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The same uuid with upper-case hex digits.
    pub fn to_uppercase(&self) -> String {
        self.0.to_ascii_uppercase()
    }

    /// The 32 hex digits without hyphens, lowercase (ZStack's form).
    pub fn to_bare(&self) -> String {
        self.0.chars().filter(|c| *c != '-').collect()
    }
}

fn reject(input: &str, reason: VmUuidErrorReason) -> VmUuidError {
    let input = match input.char_indices().nth(ECHO_MAX) {
        Some((cut, _)) => format!("{}…", &input[..cut]),
        None => input.to_owned(),
    };
    VmUuidError { input, reason }
}

impl FromStr for VmUuid {
    type Err = VmUuidError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bytes = input.as_bytes();
        let mut digits = Vec::with_capacity(BARE_LEN);
        match bytes.len() {
            HYPHENATED_LEN => {
                for (position, &b) in bytes.iter().enumerate() {
                    if HYPHENS.contains(&position) {
                        if b != b'-' {
                            return Err(reject(input, VmUuidErrorReason::Hyphen { position }));
                        }
                    } else if b.is_ascii_hexdigit() {
                        digits.push(b.to_ascii_lowercase());
                    } else {
                        return Err(reject(input, VmUuidErrorReason::NotHex { position }));
                    }
                }
            }
            BARE_LEN => {
                for (position, &b) in bytes.iter().enumerate() {
                    if !b.is_ascii_hexdigit() {
                        return Err(reject(input, VmUuidErrorReason::NotHex { position }));
                    }
                    digits.push(b.to_ascii_lowercase());
                }
            }
            other => return Err(reject(input, VmUuidErrorReason::Length(other))),
        }
        let mut out = String::with_capacity(HYPHENATED_LEN);
        for (i, d) in digits.into_iter().enumerate() {
            // Digit index i sits at byte i + (number of hyphens before it).
            if matches!(i, 8 | 12 | 16 | 20) {
                out.push('-');
            }
            out.push(char::from(d));
        }
        Ok(VmUuid(out))
    }
}

impl TryFrom<String> for VmUuid {
    type Error = VmUuidError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl TryFrom<&str> for VmUuid {
    type Error = VmUuidError;

    fn try_from(value: &str) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<VmUuid> for String {
    fn from(value: VmUuid) -> Self {
        value.0
    }
}

impl AsRef<str> for VmUuid {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const CANON: &str = "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b";

    #[test]
    fn accepts_and_normalises_the_accepted_forms() {
        for input in [
            CANON,
            "0B6E1F2A-3C4D-4E5F-8A9B-0C1D2E3F4A5B",
            "0b6E1f2A-3C4d-4e5F-8a9B-0c1D2e3F4a5B",
            "0b6e1f2a3c4d4e5f8a9b0c1d2e3f4a5b",
            "0B6E1F2A3C4D4E5F8A9B0C1D2E3F4A5B",
        ] {
            let uuid: VmUuid = input.parse().unwrap();
            assert_eq!(uuid.as_str(), CANON, "{input}");
            assert_eq!(uuid.to_string(), CANON);
        }
        let uuid: VmUuid = CANON.parse().unwrap();
        assert_eq!(uuid.to_uppercase(), CANON.to_ascii_uppercase());
        assert_eq!(uuid.to_bare(), "0b6e1f2a3c4d4e5f8a9b0c1d2e3f4a5b");
        // Round trip through the normalised form is the identity.
        assert_eq!(uuid.as_str().parse::<VmUuid>().unwrap(), uuid);
    }

    #[test]
    fn rejects_hostile_and_malformed_inputs() {
        let hostile = [
            "",
            "$(reboot)",
            "`reboot`",
            ";",
            "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5;",
            "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b;reboot",
            "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b ",
            " 0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
            "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b\n",
            "0b6e1f2a-3c4d-4e5f-8a9b\n0c1d2e3f4a5b",
            "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f'a5b",
            "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f\"a5b",
            "0b6e1f2a 3c4d 4e5f 8a9b 0c1d2e3f4a5b",
            "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5$",
            "0b6e1f2a3c4d4e5f8a9b0c1d2e3f4a5$",
            "$(reboot)$(reboot)$(reboot)$(reboot)",
            "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5",
            "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5bb",
            "0b6e1f2a3c4d4e5f8a9b0c1d2e3f4a5",
            "0b6e1f2a3c4d4e5f8a9b0c1d2e3f4a5bb",
            "0b6e1f2a-3c4d4-e5f-8a9b-0c1d2e3f4a5b",
            "0b6e1f2a3-c4d-4e5f-8a9b-0c1d2e3f4a5b",
            "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5g",
            "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5\u{e9}",
            "{0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b}",
            "urn:uuid:0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
            "0x6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
            "0b6e1f2a_3c4d_4e5f_8a9b_0c1d2e3f4a5b",
            "------------------------------------",
            "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
        ];
        for input in hostile {
            let err = input.parse::<VmUuid>().unwrap_err();
            let shown = err.to_string();
            assert!(shown.starts_with("invalid VM uuid "), "{shown}");
            // The message never carries a raw newline from the input.
            assert!(!shown.contains('\n'), "{shown:?}");
        }
    }

    #[test]
    fn errors_name_the_input_and_the_reason() {
        let err = "$(reboot)".parse::<VmUuid>().unwrap_err();
        assert_eq!(err.input, "$(reboot)");
        assert_eq!(err.reason, VmUuidErrorReason::Length(9));
        assert_eq!(
            err.to_string(),
            "invalid VM uuid \"$(reboot)\": length 9 is neither 36 (8-4-4-4-12 with hyphens) \
             nor 32 (hex digits only)"
        );

        let err = "0b6e1f2a-3c4d-4e5f-8a9b-0c1d2e3f4a5;"
            .parse::<VmUuid>()
            .unwrap_err();
        assert_eq!(err.reason, VmUuidErrorReason::NotHex { position: 35 });

        let err = "0b6e1f2a 3c4d-4e5f-8a9b-0c1d2e3f4a5b"
            .parse::<VmUuid>()
            .unwrap_err();
        assert_eq!(err.reason, VmUuidErrorReason::Hyphen { position: 8 });

        let long = "a".repeat(500);
        let err = long.parse::<VmUuid>().unwrap_err();
        assert_eq!(err.reason, VmUuidErrorReason::Length(500));
        assert!(err.input.chars().count() <= ECHO_MAX + 1);
    }

    #[test]
    fn serde_validates_and_normalises() {
        let uuid: VmUuid = serde_json::from_str("\"0B6E1F2A3C4D4E5F8A9B0C1D2E3F4A5B\"").unwrap();
        assert_eq!(uuid.as_str(), CANON);
        assert_eq!(
            serde_json::to_string(&uuid).unwrap(),
            format!("\"{CANON}\"")
        );
        let err = serde_json::from_str::<VmUuid>("\"$(reboot)\"").unwrap_err();
        assert!(err.to_string().contains("invalid VM uuid"), "{err}");
        assert!(serde_json::from_str::<VmUuid>("42").is_err());
    }
}
