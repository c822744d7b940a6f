//! Keys and the single signature check.
//!
//! Every signature in Swell is ed25519 over `domain ‖ 0x00 ‖ part ‖ part …`, where
//! `domain` names the object type and schema version (`swell/report/v1`, SIG-4) and
//! the parts are bytes exactly as received (SIG-3). [`verify`] is the one
//! signature check; the envelope and the threshold objects both call it.
//! [`verify_batch`] checks many device signatures at once for the coordinator's
//! ingest and gives each the answer [`verify`] would (see its notes for the one
//! case where it may not, which only the key's holder can produce).

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

/// One signature of a batch for [`verify_batch`].
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    pub key: &'a PublicKey,
    pub domain: &'a str,
    pub parts: &'a [&'a [u8]],
    pub sig: &'a Signature,
}

/// Fewest signatures checked as one batch; fewer are checked one by one
/// (a batch of two or three saves little and a failed one costs double).
pub const BATCH_MIN: usize = 4;

/// Checks every item and returns, in order, what [`verify`] returns for it.
///
/// The signatures go through one ed25519 batch equation (about twice as fast
/// per signature from a few dozen on); if it fails, each is checked alone with
/// `verify_strict`, as [`verify`] does (reusing the decoded key), to say which.
/// Before the batch, the checks `verify_strict` makes and the batch equation
/// does not are made here: a small-order (weak) key, an `R` of small order, and
/// a non-canonical encoding of `R`; an item failing them is checked alone, so it
/// gets exactly `verify`'s answer.
///
/// The one difference left: a signature whose `R` or key has a torsion
/// component (neither zero nor all of it) fails `verify_strict`'s equation, and
/// may pass the batch's (the random weights cancel the torsion with probability
/// about 1/8). Only the holder of the private key can make such a signature, and
/// it signs exactly the same bytes, so it cannot change what the coordinator
/// accepts as said by that device; it is signature malleability by the signer,
/// which nothing in Swell depends on (replays are refused by `seq`, not by
/// signature bytes).
pub fn verify_batch(items: &[Signed<'_>]) -> Vec<Result<(), SignatureError>> {
    let one = |it: &Signed<'_>| verify(it.key, it.domain, it.parts, it.sig);
    if items.len() < BATCH_MIN {
        return items.iter().map(one).collect();
    }
    let mut out: Vec<Result<(), SignatureError>> = vec![Ok(()); items.len()];
    let mut batch = Vec::with_capacity(items.len());
    let mut keys = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        match VerifyingKey::from_bytes(&it.key.0) {
            Ok(vk) if !vk.is_weak() && r_may_batch(&it.sig.0) => {
                batch.push(i);
                keys.push(vk);
            }
            _ => out[i] = one(it),
        }
    }
    let inputs: Vec<Vec<u8>> = batch
        .iter()
        .map(|&i| signing_input(items[i].domain, items[i].parts))
        .collect();
    let msgs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
    let sigs: Vec<ed25519_dalek::Signature> = batch
        .iter()
        .map(|&i| ed25519_dalek::Signature::from_bytes(&items[i].sig.0))
        .collect();
    if batch.len() < BATCH_MIN || ed25519_dalek::verify_batch(&msgs, &sigs, &keys).is_err() {
        for (j, &i) in batch.iter().enumerate() {
            out[i] = strict(&keys[j], msgs[j], &sigs[j]);
        }
    }
    out
}

/// Whether a signature's `R` (its first 32 bytes) is one `verify_strict` could
/// accept as far as its encoding goes: canonical (`y < p`, and no sign bit on
/// `x = 0`) and not a point of small order. Torsion points' `y` values are
/// matched with the sign bit cleared: both signs of each are torsion points, and
/// the two with `x = 0` (`y = ±1`) are the only ones whose sign bit is not
/// canonical.
fn r_may_batch(sig: &[u8; 64]) -> bool {
    let mut y = [0u8; 32];
    y.copy_from_slice(&sig[..32]);
    y[31] &= 0x7f;
    // y >= p = 2^255 - 19: 0x7f, 30 times 0xff, then a low byte >= 0xed.
    if y[31] == 0x7f && y[1..31].iter().all(|&b| b == 0xff) && y[0] >= 0xed {
        return false;
    }
    !torsion_ys().contains(&y)
}

/// The `y` coordinates (sign bit cleared) of the eight points of small order.
fn torsion_ys() -> &'static [[u8; 32]; 8] {
    static YS: std::sync::OnceLock<[[u8; 32]; 8]> = std::sync::OnceLock::new();
    YS.get_or_init(|| {
        curve25519_dalek::constants::EIGHT_TORSION.map(|p| {
            let mut y = p.compress().to_bytes();
            y[31] &= 0x7f;
            y
        })
    })
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
    strict(&vk, &signing_input(domain, parts), &sig)
}

fn strict(
    vk: &VerifyingKey,
    msg: &[u8],
    sig: &ed25519_dalek::Signature,
) -> Result<(), SignatureError> {
    vk.verify_strict(msg, sig)
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

    use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
    use curve25519_dalek::scalar::Scalar;
    use sha2::Sha512;

    const DOMAIN: &str = "swell/report/v1";

    /// A signature made by hand: `R` encoded as `r_enc` with discrete log `r`,
    /// key encoded as `a_enc` with secret scalar `a`; passes the cofactorless
    /// equation `sB = R + kA` whatever the encodings say.
    fn hand_made(r: Scalar, r_enc: [u8; 32], a: Scalar, a_enc: [u8; 32], msg: &[u8]) -> Signature {
        let input = signing_input(DOMAIN, &[msg]);
        let mut h = Sha512::new();
        h.update(r_enc);
        h.update(a_enc);
        h.update(&input);
        let k = Scalar::from_bytes_mod_order_wide(&h.finalize().into());
        let s = r + k * a;
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&r_enc);
        sig[32..].copy_from_slice(s.as_bytes());
        Signature(sig)
    }

    fn scalar(seed: u8) -> Scalar {
        Scalar::from_bytes_mod_order([seed; 32])
    }

    fn point(s: Scalar) -> [u8; 32] {
        (s * ED25519_BASEPOINT_POINT).compress().to_bytes()
    }

    /// Honest signatures by `n` distinct keys over distinct messages.
    fn honest(n: u8) -> Vec<(PublicKey, Vec<u8>, Signature)> {
        (0..n)
            .map(|i| {
                let k = SecretKey::from_seed(&[i.wrapping_add(40); 32]);
                let msg = vec![i; usize::from(i) + 3];
                let sig = k.sign(DOMAIN, &[&msg]);
                (k.public(), msg, sig)
            })
            .collect()
    }

    fn check(items: &[(PublicKey, Vec<u8>, Signature)]) -> Vec<Result<(), SignatureError>> {
        let parts: Vec<[&[u8]; 1]> = items.iter().map(|(_, m, _)| [m.as_slice()]).collect();
        let signed: Vec<Signed<'_>> = items
            .iter()
            .zip(&parts)
            .map(|((k, _, s), p)| Signed {
                key: k,
                domain: DOMAIN,
                parts: p,
                sig: s,
            })
            .collect();
        let one: Vec<_> = signed
            .iter()
            .map(|s| verify(s.key, s.domain, s.parts, s.sig))
            .collect();
        let all = verify_batch(&signed);
        assert_eq!(
            all, one,
            "the batch must answer what verify answers, item by item"
        );
        all
    }

    /// Whether ed25519-dalek's own batch equation, without the checks of
    /// `verify_batch`, would accept these: shows each hand-made case below is
    /// one the checks are needed for.
    fn bare_batch_accepts(items: &[(PublicKey, Vec<u8>, Signature)]) -> bool {
        let inputs: Vec<Vec<u8>> = items
            .iter()
            .map(|(_, m, _)| signing_input(DOMAIN, &[m]))
            .collect();
        let msgs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
        let sigs: Vec<_> = items
            .iter()
            .map(|(_, _, s)| ed25519_dalek::Signature::from_bytes(&s.0))
            .collect();
        let keys: Vec<_> = items
            .iter()
            .map(|(k, _, _)| VerifyingKey::from_bytes(&k.0).unwrap())
            .collect();
        ed25519_dalek::verify_batch(&msgs, &sigs, &keys).is_ok()
    }

    #[test]
    fn batch_accepts_honest_signatures_of_any_count() {
        for n in [0, 1, BATCH_MIN as u8 - 1, BATCH_MIN as u8, 33, 64] {
            assert!(
                check(&honest(n)).iter().all(Result::is_ok),
                "{n} signatures"
            );
        }
    }

    #[test]
    fn batch_names_exactly_the_bad_ones() {
        let mut items = honest(32);
        items[3].1.push(0); // message changed after signing
        items[17].2 = items[18].2; // someone else's signature
        items[20].0 = items[21].0; // wrong key
        // A key that is not a point.
        items[25].0 = (2u8..)
            .map(|y| {
                let mut k = [0u8; 32];
                k[0] = y;
                PublicKey(k)
            })
            .find(|k| VerifyingKey::from_bytes(&k.0).is_err())
            .unwrap();
        let out = check(&items);
        let bad: Vec<usize> = out
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_err())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(bad, vec![3, 17, 20, 25]);
        assert_eq!(out[25], Err(SignatureError::BadKey));
    }

    #[test]
    fn batch_refuses_a_non_canonical_s() {
        let mut items = honest(8);
        // s + l: the same scalar mod l, but not its canonical encoding.
        let l = Scalar::ZERO - Scalar::ONE;
        let mut s = [0u8; 32];
        s.copy_from_slice(&items[2].2.0[32..]);
        let mut carry = 1u16; // s + (l - 1) + 1
        for (b, lb) in s.iter_mut().zip(l.as_bytes()) {
            let v = u16::from(*b) + u16::from(*lb) + carry;
            *b = v as u8;
            carry = v >> 8;
        }
        items[2].2.0[32..].copy_from_slice(&s);
        let out = check(&items);
        assert!(out[2].is_err());
        assert_eq!(out.iter().filter(|r| r.is_ok()).count(), 7);
    }

    #[test]
    fn batch_refuses_what_verify_strict_refuses_and_the_bare_equation_takes() {
        let msg = b"device says healthy".to_vec();
        let a = scalar(9);
        let a_enc = point(a);
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let cases: Vec<(&str, PublicKey, Signature)> = vec![
            // A weak key (the identity): R = rB, s = r passes for any message.
            (
                "small-order key",
                PublicKey(identity),
                hand_made(scalar(5), point(scalar(5)), Scalar::ZERO, identity, &msg),
            ),
            // R is the identity and s = ka.
            (
                "small-order R",
                PublicKey(a_enc),
                hand_made(Scalar::ZERO, identity, a, a_enc, &msg),
            ),
            // R is the identity encoded as y = p + 1.
            ("R with y >= p", PublicKey(a_enc), {
                let mut r = [0xff; 32];
                r[0] = 0xee;
                r[31] = 0x7f;
                hand_made(Scalar::ZERO, r, a, a_enc, &msg)
            }),
            // R is the identity with its x sign bit set ("negative zero").
            ("R with x = -0", PublicKey(a_enc), {
                let mut r = identity;
                r[31] |= 0x80;
                hand_made(Scalar::ZERO, r, a, a_enc, &msg)
            }),
        ];
        for (what, key, sig) in cases {
            let mut items = honest(15);
            items.push((key, msg.clone(), sig));
            assert!(
                bare_batch_accepts(&items),
                "{what}: the bare batch equation takes it"
            );
            let out = check(&items);
            assert_eq!(out[15], Err(SignatureError::Invalid), "{what}");
            assert!(out[..15].iter().all(Result::is_ok), "{what}");
        }
    }

    #[test]
    fn torsion_encodings_are_the_eight_small_order_points() {
        // Every encoding the check refuses as torsion decodes to a small-order
        // point, with either sign bit; an honest R is never refused.
        for y in torsion_ys() {
            for sign in [0u8, 0x80] {
                let mut enc = *y;
                enc[31] |= sign;
                if let Some(p) = curve25519_dalek::edwards::CompressedEdwardsY(enc).decompress() {
                    assert!(p.is_small_order());
                }
                let mut sig = [0u8; 64];
                sig[..32].copy_from_slice(&enc);
                assert!(!r_may_batch(&sig));
            }
        }
        for (_, _, sig) in honest(64) {
            assert!(r_may_batch(&sig.0));
        }
    }

    #[test]
    fn crypto_key_id_is_stable() {
        let k = SecretKey::from_seed(&[1; 32]);
        assert_eq!(k.key_id(), k.public().key_id());
        assert_ne!(k.key_id(), SecretKey::from_seed(&[2; 32]).key_id());
    }
}
