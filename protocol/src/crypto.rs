//! Keys and the single signature check.
//!
//! Every signature in Swell is ed25519 over `domain ‖ 0x00 ‖ part ‖ part …`, where
//! `domain` names the object type and schema version (`swell/report/v1`, SIG-4) and
//! the parts are bytes exactly as received (SIG-3). [`verify`] is the only place a
//! signature is checked; the envelope and the threshold objects both call it.

use crate::hexser::byte_newtype;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

/// An ed25519 public key (32 bytes, compressed Edwards point).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);
byte_newtype!(PublicKey, 32);

/// A key's short name: the first 8 bytes of SHA-256("swell/keyid/v1" ‖ 0x00 ‖ key).
/// Derived from the key, so one key cannot have two ids (SIG-2).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; 8]);
byte_newtype!(KeyId, 8);

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);
byte_newtype!(Signature, 64);

impl PublicKey {
    /// This key's id.
    pub fn key_id(&self) -> KeyId {
        let mut h = Sha256::new();
        h.update(b"swell/keyid/v1\0");
        h.update(self.0);
        let d = h.finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[..8]);
        KeyId(id)
    }
}

/// Why a signature did not check out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    #[error("public key is not a valid ed25519 point")]
    BadKey,
    #[error("signature does not verify")]
    Invalid,
}

/// A private signing key. Its bytes never leave this type except through
/// [`SecretKey::to_seed`] (for writing a key file).
pub struct SecretKey(SigningKey);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey(public={})", self.public())
    }
}

impl SecretKey {
    /// The key whose 32-byte seed is `seed` (RFC 8032 private key).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        SecretKey(SigningKey::from_bytes(seed))
    }

    /// The 32-byte seed, for storing the key.
    pub fn to_seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// Id of the matching public key.
    pub fn key_id(&self) -> KeyId {
        self.public().key_id()
    }

    /// Signs `domain ‖ 0x00 ‖ parts…`.
    pub fn sign(&self, domain: &str, parts: &[&[u8]]) -> Signature {
        Signature(self.0.sign(&signing_input(domain, parts)).to_bytes())
    }
}

fn signing_input(domain: &str, parts: &[&[u8]]) -> Vec<u8> {
    let len = domain.len() + 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(domain.as_bytes());
    msg.push(0);
    for p in parts {
        msg.extend_from_slice(p);
    }
    msg
}

/// The one signature check: `verify_strict` (rejects small-order keys and
/// non-canonical signatures) over `domain ‖ 0x00 ‖ parts…`.
pub fn verify(
    key: &PublicKey,
    domain: &str,
    parts: &[&[u8]],
    sig: &Signature,
) -> Result<(), SignatureError> {
    let vk = VerifyingKey::from_bytes(&key.0).map_err(|_| SignatureError::BadKey)?;
    let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
    vk.verify_strict(&signing_input(domain, parts), &sig)
        .map_err(|_| SignatureError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_sign_verify_and_domain_separation() {
        let k = SecretKey::from_seed(&[7; 32]);
        let sig = k.sign("swell/report/v1", &[b"ab", b"c"]);
        assert_eq!(
            verify(&k.public(), "swell/report/v1", &[b"ab", b"c"], &sig),
            Ok(())
        );
        assert_eq!(
            verify(&k.public(), "swell/manifest/v1", &[b"ab", b"c"], &sig),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            verify(&k.public(), "swell/report/v1", &[b"ab", b"d"], &sig),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn crypto_small_order_key_is_rejected() {
        // The identity point: any "signature" with R = identity and s = 0 would pass a
        // lax check for every message.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut sig = [0u8; 64];
        sig[0] = 1;
        let r = verify(
            &PublicKey(identity),
            "swell/report/v1",
            &[b"x"],
            &Signature(sig),
        );
        assert!(r.is_err());
    }

    #[test]
    fn crypto_key_id_is_stable() {
        let k = SecretKey::from_seed(&[1; 32]);
        assert_eq!(k.key_id(), k.public().key_id());
        assert_ne!(k.key_id(), SecretKey::from_seed(&[2; 32]).key_id());
    }
}
