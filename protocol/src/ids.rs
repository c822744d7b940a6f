//! Identifiers. Names that end up in MQTT topics share one charset
//! (`^[a-z0-9][a-z0-9._-]{0,62}$`, SECURITY MQTT-2), so `+`, `#`, `/`, `$` and
//! control characters can never reach a topic. They are checked when built and
//! when decoded: an invalid id makes the whole message fail to decode.

use crate::hexser::byte_newtype;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::sync::Arc;

/// Longest identifier, in bytes.
pub const MAX_ID_LEN: usize = 63;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} bytes long; the limit is {MAX_ID_LEN}")]
    TooLong { what: &'static str, len: usize },
    #[error(
        "{what} has {found:?} at byte {at}; allowed are a-z, 0-9 and (not first) '.', '_', '-'"
    )]
    BadChar {
        what: &'static str,
        at: usize,
        found: char,
    },
}

/// Checks the shared identifier charset.
pub fn validate_id(what: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { what });
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { what, len: s.len() });
    }
    for (at, c) in s.char_indices() {
        let ok = c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || (at > 0 && matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(IdError::BadChar { what, at, found: c });
        }
    }
    Ok(())
}

/// Identifier text: short ids (most device ids) inline, longer ones shared.
///
/// The coordinator keeps one id per device in its registry. As an `Arc<str>`
/// a 10-byte id was a 16-byte handle plus a 48-byte heap block (reference
/// counts, text, allocator rounding): 64 bytes per device, 64 MB at a
/// million. Inline it is 24 bytes and a clone is a copy; an id too long to
/// fit is shared as before, so a clone is never an allocation.
#[derive(Clone)]
enum IdText {
    Inline { len: u8, bytes: [u8; INLINE_ID] },
    Shared(Arc<str>),
}

/// Longest id kept inline (the size of an `Arc<str>` plus 8 bytes, less
/// the tag and length).
const INLINE_ID: usize = 22;

impl IdText {
    /// `s` must already be a valid id (ASCII).
    fn new(s: &str) -> IdText {
        match u8::try_from(s.len()) {
            Ok(len) if s.len() <= INLINE_ID => {
                let mut bytes = [0u8; INLINE_ID];
                bytes[..s.len()].copy_from_slice(s.as_bytes());
                IdText::Inline { len, bytes }
            }
            _ => IdText::Shared(Arc::from(s)),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // Built from a `&str` cut at its own length: always UTF-8.
            IdText::Inline { len, bytes } => {
                std::str::from_utf8(bytes.get(..usize::from(*len)).unwrap_or_default())
                    .unwrap_or_default()
            }
            IdText::Shared(s) => s,
        }
    }

    /// The text's bytes without the UTF-8 check of [`Self::as_str`] (every
    /// registry lookup compares ids).
    fn as_bytes(&self) -> &[u8] {
        match self {
            IdText::Inline { len, bytes } => bytes.get(..usize::from(*len)).unwrap_or_default(),
            IdText::Shared(s) => s.as_bytes(),
        }
    }
}

// Compared and hashed as text, whatever the representation (`str` orders
// by its bytes).
impl PartialEq for IdText {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}
impl Eq for IdText {}
impl PartialOrd for IdText {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for IdText {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}
impl std::hash::Hash for IdText {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        // What `str` hashes (its bytes, then 0xff), without the UTF-8 check.
        h.write(self.as_bytes());
        h.write_u8(0xff);
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(IdText);

        impl $name {
            /// Validates and wraps `s` (at most one allocation, whatever `s`
            /// is: the coordinator parses ids out of every message's topic).
            pub fn new(s: impl AsRef<str>) -> Result<Self, IdError> {
                let s = s.as_ref();
                validate_id($what, s)?;
                Ok(Self(IdText::new(s)))
            }
            /// The identifier text.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }
        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }
        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }
        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.as_str().to_string()
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.as_str())
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }
    };
}

string_id!(
    /// A device's identity; also its MQTT client id and topic segment.
    DeviceId,
    "device id"
);
string_id!(
    /// A fleet: the set of devices that share manifests and a beacon.
    FleetId,
    "fleet id"
);
string_id!(
    /// A rollout, chosen by the operator; salts the bucket function.
    RolloutId,
    "rollout id"
);

/// A SHA-256 digest (artifacts, configuration blobs).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);
byte_newtype!(Digest, 32);

impl Digest {
    /// SHA-256 of `data`.
    pub fn sha256(data: &[u8]) -> Self {
        Digest(Sha256::digest(data).into())
    }
}

/// Names a release: SHA-256 of the release body bytes exactly as the release keys
/// signed them (adding a signature does not change it).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReleaseId(pub [u8; 32]);
byte_newtype!(ReleaseId, 32);

impl ReleaseId {
    /// The id of a release whose signed body is `body`.
    pub fn of_body(body: &[u8]) -> Self {
        ReleaseId(Sha256::digest(body).into())
    }

    /// First 8 bytes as hex, for logs and tables.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_the_charset() {
        for ok in ["a", "0", "dev-001", "rpi4.eu_west-1", &"a".repeat(63)] {
            assert!(DeviceId::new(ok).is_ok(), "{ok}");
            assert_eq!(ok.parse::<DeviceId>(), DeviceId::new(ok), "{ok}");
        }
    }

    #[test]
    fn ids_reject_wildcards_and_others() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("-dev", "leading dash"),
            (".dev", "leading dot"),
            ("Dev", "upper case"),
            ("dev/1", "slash"),
            ("dev+", "plus"),
            ("dev#", "hash"),
            ("$sys", "dollar"),
            ("dev 1", "space"),
            ("dev\n", "newline"),
            ("dev\0", "nul"),
            ("dév", "non-ascii"),
        ];
        for (bad, why) in cases {
            assert!(DeviceId::new(*bad).is_err(), "{why}: {bad:?}");
            assert_eq!(bad.parse::<DeviceId>(), DeviceId::new(*bad), "{why}");
        }
        assert_eq!(
            "a".repeat(64).parse::<FleetId>(),
            FleetId::new("a".repeat(64))
        );
        assert_eq!(
            DeviceId::new("a".repeat(64)),
            Err(IdError::TooLong {
                what: "device id",
                len: 64
            })
        );
    }

    #[test]
    fn ids_behave_as_their_text_inline_or_shared() {
        use std::collections::BTreeSet;
        use std::hash::BuildHasher;
        let h = std::hash::RandomState::new();
        // Both sides of the inline limit, and the longest id.
        let texts: Vec<String> = [1, 9, INLINE_ID - 1, INLINE_ID, INLINE_ID + 1, MAX_ID_LEN]
            .iter()
            .map(|&n| format!("d{}", "0".repeat(n - 1)))
            .collect();
        let mut sorted = BTreeSet::new();
        for t in &texts {
            let id = DeviceId::new(t).unwrap();
            assert_eq!(id.as_str(), t);
            assert_eq!(id.to_string(), *t);
            assert_eq!(String::from(id.clone()), *t);
            assert_eq!(id.clone(), id);
            assert_eq!(
                h.hash_one(&id),
                h.hash_one(t.as_str()),
                "hashes as its text"
            );
            let wire = postcard::to_allocvec(&id).unwrap();
            assert_eq!(wire, postcard::to_allocvec(t).unwrap());
            assert_eq!(postcard::from_bytes::<DeviceId>(&wire).unwrap(), id);
            sorted.insert(id);
        }
        let mut by_text = texts.clone();
        by_text.sort();
        let order: Vec<&str> = sorted.iter().map(DeviceId::as_str).collect();
        assert_eq!(order, by_text, "orders as its text");
        assert_ne!(DeviceId::new("d0").unwrap(), DeviceId::new("d00").unwrap());
        assert!(std::mem::size_of::<DeviceId>() <= 24);
    }

    #[test]
    fn ids_fail_decoding_when_invalid() {
        let bytes = postcard::to_allocvec(&"bad/id".to_string()).unwrap();
        assert!(postcard::from_bytes::<DeviceId>(&bytes).is_err());
        let bytes = postcard::to_allocvec(&"good-id".to_string()).unwrap();
        assert_eq!(
            postcard::from_bytes::<DeviceId>(&bytes).unwrap().as_str(),
            "good-id"
        );
    }
}
