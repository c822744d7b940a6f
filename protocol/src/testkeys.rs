//! TEST KEYS — their seeds are public. For tests, golden vectors, fuzzing and the
//! demo only; never configure a real fleet with them.
//!
//! `test_key(name)` = the ed25519 key whose seed is SHA-256("swell test key/" ‖ name).

use crate::crypto::SecretKey;
use sha2::{Digest as _, Sha256};

/// The test key called `name`.
pub fn test_key(name: &str) -> SecretKey {
    let mut h = Sha256::new();
    h.update(b"swell test key/");
    h.update(name.as_bytes());
    SecretKey::from_seed(&h.finalize().into())
}
