//! Objects signed by a threshold of distinct keys: releases (release keys) and key
//! lists (root keys). Each signature covers `domain(kind) ‖ 0x00 ‖ body` where
//! `body` is kept as the exact bytes that were signed, so the object can be passed
//! on verbatim (a manifest embeds the release it names) and re-checked anywhere.

use crate::codec::{self, CodecError};
use crate::crypto::{self, KeyId, PublicKey, SecretKey, Signature};
use crate::envelope::MessageKind;
use crate::ids::ReleaseId;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::collections::BTreeSet;

/// Most signatures an object may carry (bounds verification work).
pub const MAX_SIGNATURES: usize = 16;

/// A body type signed by a threshold of keys.
pub trait ThresholdMessage: Serialize + DeserializeOwned {
    const KIND: MessageKind;
    /// Largest body accepted, checked before decoding.
    const MAX_BODY: usize;
    /// Semantic checks after decoding. Fail closed.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// One key's signature over the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySignature {
    pub key_id: KeyId,
    pub sig: Signature,
}

/// A threshold-signed object as it travels: kind, exact body bytes, signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThresholdSigned {
    /// Raw [`MessageKind`] (16 = release, 17 = key list).
    pub kind: u16,
    /// The postcard body exactly as signed.
    #[serde(with = "crate::hexser::vec")]
    pub body: Vec<u8>,
    pub sigs: Vec<KeySignature>,
}

/// Why a threshold object was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ThresholdError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("expected a {expected} object, got kind {got}")]
    WrongKind { expected: &'static str, got: u16 },
    #[error("{got} signatures; at most {MAX_SIGNATURES} are accepted")]
    TooManySignatures { got: usize },
    #[error("threshold must be at least 1")]
    ZeroThreshold,
    #[error("{valid} distinct trusted keys signed; {needed} are needed")]
    NotEnoughSignatures { valid: usize, needed: usize },
    #[error("{kind} is invalid: {reason}")]
    Invalid { kind: &'static str, reason: String },
}

impl ThresholdError {
    /// Stable label for counters and rejection reports.
    pub fn reason(&self) -> &'static str {
        match self {
            ThresholdError::Codec(CodecError::TooLarge { .. })
            | ThresholdError::TooManySignatures { .. } => "oversized",
            ThresholdError::Codec(_) => "malformed",
            ThresholdError::WrongKind { .. } => "wrong_kind",
            ThresholdError::ZeroThreshold | ThresholdError::NotEnoughSignatures { .. } => {
                "unsigned"
            }
            ThresholdError::Invalid { .. } => "invalid",
        }
    }
}

/// Largest encoded threshold object.
pub const MAX_THRESHOLD_OBJECT: usize = 48 * 1024;

impl ThresholdSigned {
    /// An unsigned object holding `body`. Refuses a body that fails validation.
    pub fn new<T: ThresholdMessage>(body: &T) -> Result<Self, ThresholdError> {
        body.validate().map_err(|reason| ThresholdError::Invalid {
            kind: T::KIND.name(),
            reason,
        })?;
        let bytes = codec::encode(T::KIND.name(), body)?;
        codec::check_len(T::KIND.name(), &bytes, T::MAX_BODY)?;
        Ok(ThresholdSigned {
            kind: T::KIND as u16,
            body: bytes,
            sigs: Vec::new(),
        })
    }

    /// Adds (or replaces) `key`'s signature. Unknown kinds cannot be signed.
    pub fn sign(&mut self, key: &SecretKey) -> Result<(), ThresholdError> {
        let kind = MessageKind::from_raw(self.kind).ok_or(ThresholdError::WrongKind {
            expected: "release or keylist",
            got: self.kind,
        })?;
        let key_id = key.key_id();
        self.sigs.retain(|s| s.key_id != key_id);
        if self.sigs.len() >= MAX_SIGNATURES {
            return Err(ThresholdError::TooManySignatures {
                got: self.sigs.len() + 1,
            });
        }
        let sig = key.sign(kind.domain(), &[&self.body]);
        self.sigs.push(KeySignature { key_id, sig });
        Ok(())
    }

    /// Encoded bytes.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode("threshold object", self)
    }

    /// Reads an object (size cap first, no trailing bytes). Signatures unchecked.
    pub fn decode(bytes: &[u8]) -> Result<Self, ThresholdError> {
        let obj: ThresholdSigned =
            codec::decode_exact("threshold object", bytes, MAX_THRESHOLD_OBJECT)?;
        if obj.sigs.len() > MAX_SIGNATURES {
            return Err(ThresholdError::TooManySignatures {
                got: obj.sigs.len(),
            });
        }
        Ok(obj)
    }

    /// SHA-256 of the signed body: the release id.
    pub fn id(&self) -> ReleaseId {
        ReleaseId::of_body(&self.body)
    }

    /// Counts the distinct `trusted` keys with a good signature (SIG-2: duplicate
    /// signatures, duplicate entries and repeated keys all count once) and decodes
    /// the body only when at least `threshold` did.
    pub fn verify<T: ThresholdMessage>(
        &self,
        trusted: &[PublicKey],
        threshold: u8,
    ) -> Result<T, ThresholdError> {
        if self.kind != T::KIND as u16 {
            return Err(ThresholdError::WrongKind {
                expected: T::KIND.name(),
                got: self.kind,
            });
        }
        if threshold == 0 {
            return Err(ThresholdError::ZeroThreshold);
        }
        if self.sigs.len() > MAX_SIGNATURES {
            return Err(ThresholdError::TooManySignatures {
                got: self.sigs.len(),
            });
        }
        codec::check_len(T::KIND.name(), &self.body, T::MAX_BODY)?;
        let mut good: BTreeSet<PublicKey> = BTreeSet::new();
        for s in &self.sigs {
            for key in trusted.iter().filter(|k| k.key_id() == s.key_id) {
                if !good.contains(key)
                    && crypto::verify(key, T::KIND.domain(), &[&self.body], &s.sig).is_ok()
                {
                    good.insert(*key);
                }
            }
        }
        if good.len() < usize::from(threshold) {
            return Err(ThresholdError::NotEnoughSignatures {
                valid: good.len(),
                needed: usize::from(threshold),
            });
        }
        let body: T = codec::decode_exact(T::KIND.name(), &self.body, T::MAX_BODY)?;
        body.validate().map_err(|reason| ThresholdError::Invalid {
            kind: T::KIND.name(),
            reason,
        })?;
        Ok(body)
    }
}
