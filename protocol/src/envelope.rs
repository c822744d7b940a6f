//! The signed envelope every single-signer message travels in.
//!
//! Wire layout (postcard): `Header ‖ varint(len) ‖ payload ‖ signature[64]`.
//! The signature is ed25519 over `domain(kind) ‖ 0x00 ‖ header bytes ‖ payload
//! bytes`, all exactly as received. The header layout is frozen for the life of the
//! protocol, so any party can read the kind and version of a message it does not
//! understand and answer `Unsupported`.

use crate::codec::{self, CodecError};
use crate::crypto::{self, KeyId, PublicKey, SecretKey, Signature};
use crate::ids::{DeviceId, FleetId};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Newest protocol major version this crate speaks. Every kind travels with
/// the version that last defined it ([`MessageKind::proto`]): version 2 added
/// [`MessageKind::SessionNote`]; version 3 redefined [`MessageKind::Hello`]
/// (an enrollment proof instead of the token, an incarnation) and
/// [`MessageKind::Manifest`] (waves over the release's bucket), and added
/// [`MessageKind::Enrolled`]. A peer reads the kinds whose version it knows
/// and answers the others with `Unsupported`.
pub const PROTO_VERSION: u16 = 3;

/// Largest envelope accepted anywhere, before any parsing (DL-1).
pub const MAX_ENVELOPE: usize = 64 * 1024;

/// The frozen envelope header. Never add, remove or reorder fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Protocol major version of the payload.
    pub proto: u16,
    /// Raw [`MessageKind`]; raw so unknown kinds still decode.
    pub kind: u16,
    /// Id of the key that signed.
    pub key_id: KeyId,
    /// Coordinator leader epoch (ROLL-4); a device sends its incarnation
    /// (protocol 3: the number its Hello announces, STATE-3).
    pub epoch: u64,
    /// Sender's sequence number; strictly increasing per sender and stream.
    pub seq: u64,
    /// Sender's clock, Unix seconds.
    pub issued_at: u64,
    /// Unix seconds after which the message is refused; 0 = none (only allowed for
    /// kinds that do not require expiry).
    pub expires_at: u64,
    /// Whom the message is for.
    pub audience: Audience,
}

/// Whom a message is addressed to. Part of the frozen header: never add variants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Audience {
    /// Anyone (device reports to the coordinator, operator views).
    Any,
    /// Every device of one fleet (manifests, beacons).
    Fleet(FleetId),
    /// One device (directives).
    Device(DeviceId),
}

/// Message kinds. The numbers are the wire values and never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum MessageKind {
    Manifest = 1,
    Beacon = 2,
    Directive = 3,
    Hello = 4,
    Report = 5,
    Unsupported = 6,
    /// Protocol 2: a device says how often its connection was taken over.
    SessionNote = 7,
    /// Protocol 3: the coordinator confirms a device's enrollment for its key
    /// and incarnation (ENROLL-3).
    Enrolled = 8,
    Release = 16,
    KeyList = 17,
}

impl MessageKind {
    /// Every kind, in wire order.
    pub const ALL: [MessageKind; 10] = [
        MessageKind::Manifest,
        MessageKind::Beacon,
        MessageKind::Directive,
        MessageKind::Hello,
        MessageKind::Report,
        MessageKind::Unsupported,
        MessageKind::SessionNote,
        MessageKind::Enrolled,
        MessageKind::Release,
        MessageKind::KeyList,
    ];

    /// The kind with wire value `raw`, if this version knows it.
    pub fn from_raw(raw: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u16 == raw)
    }

    /// Short lowercase name (`report`).
    pub fn name(self) -> &'static str {
        match self {
            MessageKind::Manifest => "manifest",
            MessageKind::Beacon => "beacon",
            MessageKind::Directive => "directive",
            MessageKind::Hello => "hello",
            MessageKind::Report => "report",
            MessageKind::Unsupported => "unsupported",
            MessageKind::SessionNote => "session_note",
            MessageKind::Enrolled => "enrolled",
            MessageKind::Release => "release",
            MessageKind::KeyList => "keylist",
        }
    }

    /// The protocol version a message of this kind carries in its header: the
    /// version that last defined the kind.
    pub fn proto(self) -> u16 {
        match self {
            MessageKind::Hello | MessageKind::Manifest | MessageKind::Enrolled => 3,
            MessageKind::SessionNote => 2,
            _ => 1,
        }
    }

    /// Signature domain tag: type and schema version (SIG-4).
    pub fn domain(self) -> &'static str {
        match self {
            MessageKind::Manifest => "swell/manifest/v3",
            MessageKind::Beacon => "swell/beacon/v1",
            MessageKind::Directive => "swell/directive/v1",
            MessageKind::Hello => "swell/hello/v3",
            MessageKind::Report => "swell/report/v1",
            MessageKind::Unsupported => "swell/unsupported/v1",
            MessageKind::SessionNote => "swell/session_note/v1",
            MessageKind::Enrolled => "swell/enrolled/v3",
            MessageKind::Release => "swell/release/v1",
            MessageKind::KeyList => "swell/keylist/v1",
        }
    }
}

/// A payload type that travels in an [`Envelope`](UnverifiedEnvelope).
pub trait Message: Serialize + DeserializeOwned {
    /// Its kind.
    const KIND: MessageKind;
    /// Largest payload accepted, checked before decoding.
    const MAX_PAYLOAD: usize;
    /// Whether `expires_at = 0` is refused.
    const EXPIRY_REQUIRED: bool;
    /// Semantic checks after decoding (counts, ranges). Fail closed.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Why an envelope was refused. [`EnvelopeError::reason`] gives the counter label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(
        "protocol version {got} is not supported for this kind (this side speaks 1..={PROTO_VERSION})"
    )]
    UnsupportedProto { got: u16 },
    #[error("message kind {0} is not known to this version")]
    UnknownKind(u16),
    #[error("expected a {expected} message, got kind {got}")]
    WrongKind { expected: &'static str, got: u16 },
    #[error("signed by key {got}, expected key {expected}")]
    KeyMismatch { expected: KeyId, got: KeyId },
    #[error("signature does not verify")]
    BadSignature,
    #[error("{kind} message carries no expiry time")]
    MissingExpiry { kind: &'static str },
    #[error("message expired at {expires_at}, now is {now}")]
    Expired { expires_at: u64, now: u64 },
    #[error("{kind} message is invalid: {reason}")]
    Invalid { kind: &'static str, reason: String },
}

impl EnvelopeError {
    /// Stable, low-cardinality label for metrics and rejection reports.
    pub fn reason(&self) -> &'static str {
        match self {
            EnvelopeError::Codec(CodecError::TooLarge { .. }) => "oversized",
            EnvelopeError::Codec(_) => "malformed",
            EnvelopeError::UnsupportedProto { .. } | EnvelopeError::UnknownKind(_) => "unsupported",
            EnvelopeError::WrongKind { .. } => "wrong_kind",
            EnvelopeError::KeyMismatch { .. } | EnvelopeError::BadSignature => "forged",
            EnvelopeError::MissingExpiry { .. } | EnvelopeError::Expired { .. } => "expired",
            EnvelopeError::Invalid { .. } => "invalid",
        }
    }
}

/// Header fields the sender chooses; `proto`, `kind` and `key_id` are filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub epoch: u64,
    pub seq: u64,
    pub issued_at: u64,
    pub expires_at: u64,
    pub audience: Audience,
}

/// Signs `body` with `key` and returns the envelope bytes. Refuses to sign a body
/// that would fail its own validation or size cap.
pub fn seal<T: Message>(key: &SecretKey, stamp: Stamp, body: &T) -> Result<Vec<u8>, EnvelopeError> {
    let kind = T::KIND;
    body.validate().map_err(|reason| EnvelopeError::Invalid {
        kind: kind.name(),
        reason,
    })?;
    if T::EXPIRY_REQUIRED && stamp.expires_at == 0 {
        return Err(EnvelopeError::MissingExpiry { kind: kind.name() });
    }
    let header = Header {
        proto: kind.proto(),
        kind: kind as u16,
        key_id: key.key_id(),
        epoch: stamp.epoch,
        seq: stamp.seq,
        issued_at: stamp.issued_at,
        expires_at: stamp.expires_at,
        audience: stamp.audience,
    };
    let header_bytes = codec::encode("header", &header)?;
    let payload = codec::encode(kind.name(), body)?;
    codec::check_len(kind.name(), &payload, T::MAX_PAYLOAD)?;
    let sig = key.sign(kind.domain(), &[&header_bytes, &payload]);
    let mut out = header_bytes;
    out.extend_from_slice(&codec::encode("payload", &payload.as_slice())?);
    out.extend_from_slice(&sig.0);
    codec::check_len("envelope", &out, MAX_ENVELOPE)?;
    Ok(out)
}

/// An envelope whose structure has been read but whose signature has not been
/// checked. Only the header may be looked at (to find the key, or to answer
/// `Unsupported`); the payload is reachable only through [`Self::verify`].
#[derive(Debug, Clone)]
pub struct UnverifiedEnvelope<'a> {
    /// The header as decoded. Not authenticated yet.
    pub header: Header,
    header_bytes: &'a [u8],
    payload: &'a [u8],
    sig: Signature,
}

/// A message whose signature, kind, expiry and content checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified<T> {
    pub header: Header,
    pub body: T,
}

impl<'a> UnverifiedEnvelope<'a> {
    /// Reads the envelope structure: size cap first, then header, payload bytes and
    /// signature, with nothing left over.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, EnvelopeError> {
        codec::check_len("envelope", bytes, MAX_ENVELOPE)?;
        let (header, rest) = postcard::take_from_bytes::<Header>(bytes)
            .map_err(|e| codec::malformed("envelope header", e))?;
        let header_bytes = &bytes[..bytes.len() - rest.len()];
        codec::check_canonical("envelope header", &header, header_bytes)?;
        let before_payload = rest.len();
        let (payload, rest) = postcard::take_from_bytes::<&[u8]>(rest)
            .map_err(|e| codec::malformed("envelope payload", e))?;
        let prefix = codec::encode("payload length", &(payload.len() as u64))?;
        if before_payload - rest.len() != prefix.len() + payload.len() {
            return Err(CodecError::Malformed {
                what: "envelope payload",
                reason: "non-canonical encoding (overlong varint)".into(),
            }
            .into());
        }
        let (sig, rest) = rest
            .split_first_chunk::<64>()
            .ok_or(CodecError::Malformed {
                what: "envelope signature",
                reason: format!("{} bytes where 64 are needed", rest.len()),
            })?;
        if !rest.is_empty() {
            return Err(CodecError::TrailingBytes {
                what: "envelope",
                extra: rest.len(),
            }
            .into());
        }
        Ok(UnverifiedEnvelope {
            header,
            header_bytes,
            payload,
            sig: Signature(*sig),
        })
    }

    /// The payload bytes, unverified: only for self-signed kinds, which must read
    /// the signer's key from the payload (see `Hello::verify_self_signed`).
    pub(crate) fn unverified_payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The message kind, if this version knows it.
    pub fn kind(&self) -> Option<MessageKind> {
        MessageKind::from_raw(self.header.kind)
    }

    /// Checks protocol version, kind, signer, signature (over the bytes as
    /// received) and expiry, and only then decodes and validates the payload.
    pub fn verify<T: Message>(
        &self,
        key: &PublicKey,
        now: u64,
    ) -> Result<Verified<T>, EnvelopeError> {
        self.check_unsigned::<T>(key)?;
        crypto::verify(
            key,
            T::KIND.domain(),
            &[self.header_bytes, self.payload],
            &self.sig,
        )
        .map_err(|_| EnvelopeError::BadSignature)?;
        self.open::<T>(now)
    }

    /// [`Self::verify`] for many envelopes (each with its signer's key), the
    /// signatures checked together by [`crypto::verify_batch`]: the same
    /// checks in the same order, the same answer for each, in order.
    pub fn verify_all<T: Message>(
        items: &[(&UnverifiedEnvelope<'_>, &PublicKey)],
        now: u64,
    ) -> Vec<Result<Verified<T>, EnvelopeError>> {
        let checked: Vec<Result<(), EnvelopeError>> = items
            .iter()
            .map(|(env, key)| env.check_unsigned::<T>(key))
            .collect();
        let parts: Vec<[&[u8]; 2]> = items
            .iter()
            .map(|(env, _)| [env.header_bytes, env.payload])
            .collect();
        let signed: Vec<crypto::Signed<'_>> = items
            .iter()
            .zip(&parts)
            .zip(&checked)
            .filter(|(_, c)| c.is_ok())
            .map(|(((env, key), parts), _)| crypto::Signed {
                key,
                domain: T::KIND.domain(),
                parts,
                sig: &env.sig,
            })
            .collect();
        let mut signatures = crypto::verify_batch(&signed).into_iter();
        items
            .iter()
            .zip(checked)
            .map(|((env, _), c)| {
                c?;
                match signatures.next() {
                    Some(Ok(())) => env.open::<T>(now),
                    _ => Err(EnvelopeError::BadSignature),
                }
            })
            .collect()
    }

    /// What is checked before the signature: version, kind, size, signer.
    fn check_unsigned<T: Message>(&self, key: &PublicKey) -> Result<(), EnvelopeError> {
        let h = &self.header;
        if h.proto != T::KIND.proto() {
            return Err(EnvelopeError::UnsupportedProto { got: h.proto });
        }
        if h.kind != T::KIND as u16 {
            return Err(match MessageKind::from_raw(h.kind) {
                None => EnvelopeError::UnknownKind(h.kind),
                Some(_) => EnvelopeError::WrongKind {
                    expected: T::KIND.name(),
                    got: h.kind,
                },
            });
        }
        codec::check_len(T::KIND.name(), self.payload, T::MAX_PAYLOAD)?;
        let expected = key.key_id();
        if h.key_id != expected {
            return Err(EnvelopeError::KeyMismatch {
                expected,
                got: h.key_id,
            });
        }
        Ok(())
    }

    /// What is checked once the signature is good: expiry, then the payload's
    /// decoding and validation.
    fn open<T: Message>(&self, now: u64) -> Result<Verified<T>, EnvelopeError> {
        let h = &self.header;
        if h.expires_at == 0 {
            if T::EXPIRY_REQUIRED {
                return Err(EnvelopeError::MissingExpiry {
                    kind: T::KIND.name(),
                });
            }
        } else if now >= h.expires_at {
            return Err(EnvelopeError::Expired {
                expires_at: h.expires_at,
                now,
            });
        }
        let body: T = codec::decode_exact(T::KIND.name(), self.payload, T::MAX_PAYLOAD)?;
        body.validate().map_err(|reason| EnvelopeError::Invalid {
            kind: T::KIND.name(),
            reason,
        })?;
        Ok(Verified {
            header: self.header.clone(),
            body,
        })
    }
}
