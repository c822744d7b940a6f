//! Enrollment proofs (ENROLL-2): a Hello shows it knows the fleet's enrollment
//! token without carrying it.
//!
//! `proof = HMAC-SHA256(key = token bytes, "swell/enroll/v3" ‖ 0x00 ‖
//! device ‖ 0x00 ‖ fleet ‖ 0x00 ‖ public key[32])`. It binds the token to one
//! device id *and* one device key: a copy read off the wire proves nothing
//! for another id, and nothing for another key under this id (the Hello is
//! signed by the key it names), so it cannot be used to squat an id. The ids'
//! charset has no NUL, so the separators make the input unambiguous.

use crate::crypto::PublicKey;
use crate::hexser::byte_newtype;
use crate::ids::{DeviceId, FleetId};
use hmac::{Hmac, Mac};
use sha2::Sha256;

const DOMAIN: &[u8] = b"swell/enroll/v3";

/// An enrollment proof: 32 bytes on the wire, hex in JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnrollmentProof(pub [u8; 32]);
byte_newtype!(EnrollmentProof, 32);

fn mac(token: &str, device: &DeviceId, fleet: &FleetId, key: &PublicKey) -> Hmac<Sha256> {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(token.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    m.update(DOMAIN);
    m.update(&[0]);
    m.update(device.as_str().as_bytes());
    m.update(&[0]);
    m.update(fleet.as_str().as_bytes());
    m.update(&[0]);
    m.update(key.as_bytes());
    m
}

/// The proof a device with `token` sends in its Hello.
pub fn prove(token: &str, device: &DeviceId, fleet: &FleetId, key: &PublicKey) -> EnrollmentProof {
    EnrollmentProof(
        mac(token, device, fleet, key)
            .finalize()
            .into_bytes()
            .into(),
    )
}

/// Whether `proof` was made with `token` for this device, fleet and key
/// (compared in constant time).
pub fn verify(
    proof: &EnrollmentProof,
    token: &str,
    device: &DeviceId,
    fleet: &FleetId,
    key: &PublicKey,
) -> bool {
    mac(token, device, fleet, key)
        .verify_slice(&proof.0)
        .is_ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::testkeys::test_key;

    #[test]
    fn enroll_2_a_proof_binds_token_device_fleet_and_key() {
        let d = DeviceId::new("dev-1").unwrap();
        let f = FleetId::new("prod").unwrap();
        let k = test_key("device-1").public();
        let p = prove("a-long-enough-token", &d, &f, &k);
        assert!(verify(&p, "a-long-enough-token", &d, &f, &k));
        assert!(!verify(&p, "another-token-here!", &d, &f, &k));
        let d2 = DeviceId::new("dev-2").unwrap();
        assert!(!verify(&p, "a-long-enough-token", &d2, &f, &k));
        let f2 = FleetId::new("lab").unwrap();
        assert!(!verify(&p, "a-long-enough-token", &d, &f2, &k));
        let k2 = test_key("device-2").public();
        assert!(!verify(&p, "a-long-enough-token", &d, &f, &k2));
    }

    /// The construction as docs/protocol.md states it, from the HMAC
    /// definition (RFC 2104) over SHA-256 directly.
    #[test]
    fn enroll_2_proof_matches_the_documented_construction() {
        use sha2::Digest as _;
        let d = DeviceId::new("dev-1").unwrap();
        let f = FleetId::new("prod").unwrap();
        let k = test_key("device-1").public();
        let token = b"a-long-enough-token";
        let mut block = [0u8; 64];
        block[..token.len()].copy_from_slice(token);
        let pad = |b: u8| block.iter().map(|x| x ^ b).collect::<Vec<u8>>();
        let mut msg = b"swell/enroll/v3\0dev-1\0prod\0".to_vec();
        msg.extend_from_slice(k.as_bytes());
        let inner = Sha256::new()
            .chain_update(pad(0x36))
            .chain_update(&msg)
            .finalize();
        let outer = Sha256::new()
            .chain_update(pad(0x5c))
            .chain_update(inner)
            .finalize();
        assert_eq!(
            prove("a-long-enough-token", &d, &f, &k).0.as_slice(),
            outer.as_slice()
        );
    }
}
