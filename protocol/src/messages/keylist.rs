//! `KeyList`: the root-signed list of every other key (after TUF's root role).
//! Devices pin the root public keys; the first key list must be signed by a
//! threshold of them, and a rotation must be signed by a threshold of the current
//! roots *and* of the new roots, with a higher version.

use super::check_count;
use crate::crypto::PublicKey;
use crate::envelope::MessageKind;
use crate::threshold::{ThresholdError, ThresholdMessage, ThresholdSigned};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Every public key a device needs, signed by the roots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyList {
    /// Strictly increasing on every change.
    pub version: u64,
    /// Unix seconds after which the list is refused.
    pub expires_at: u64,
    pub roots: Vec<PublicKey>,
    pub root_threshold: u8,
    pub release_keys: Vec<PublicKey>,
    pub release_threshold: u8,
    /// Keys that may sign manifests, beacons and directives.
    pub coordinator_keys: Vec<PublicKey>,
    /// Keys that may sign operator commands.
    pub operator_keys: Vec<PublicKey>,
}

/// The pinned anchor a device starts from (from its config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootOfTrust {
    pub roots: Vec<PublicKey>,
    pub threshold: u8,
}

/// Why a key list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyListError {
    #[error("not signed by the trusted roots: {0}")]
    TrustedRoots(ThresholdError),
    #[error("not signed by its own new roots: {0}")]
    NewRoots(ThresholdError),
    #[error("key list version {got} is not above the current {have}")]
    NotNewer { got: u64, have: u64 },
    #[error("key list expired at {expires_at}, now is {now}")]
    Expired { expires_at: u64, now: u64 },
}

fn distinct(what: &str, keys: &[PublicKey], threshold: Option<u8>) -> Result<(), String> {
    check_count(what, keys.len(), 0, 16)?;
    let set: BTreeSet<_> = keys.iter().collect();
    if set.len() != keys.len() {
        return Err(format!("{what} lists a key twice"));
    }
    if let Some(t) = threshold
        && (t == 0 || usize::from(t) > keys.len())
    {
        return Err(format!("{what}: threshold {t} with {} keys", keys.len()));
    }
    Ok(())
}

impl ThresholdMessage for KeyList {
    const KIND: MessageKind = MessageKind::KeyList;
    const MAX_BODY: usize = 8 * 1024;

    fn validate(&self) -> Result<(), String> {
        distinct("root keys", &self.roots, Some(self.root_threshold))?;
        distinct(
            "release keys",
            &self.release_keys,
            Some(self.release_threshold),
        )?;
        distinct("coordinator keys", &self.coordinator_keys, None)?;
        distinct("operator keys", &self.operator_keys, None)?;
        if self.expires_at == 0 {
            return Err("key list needs an expiry".into());
        }
        Ok(())
    }
}

impl RootOfTrust {
    /// The roots of an accepted key list, for checking the next one.
    pub fn of(list: &KeyList) -> Self {
        RootOfTrust {
            roots: list.roots.clone(),
            threshold: list.root_threshold,
        }
    }
}

impl KeyList {
    /// Accepts `signed` as the next key list: signed by a threshold of `trusted`
    /// roots and of its own roots, newer than `current_version`, not expired.
    pub fn accept(
        signed: &ThresholdSigned,
        trusted: &RootOfTrust,
        current_version: Option<u64>,
        now: u64,
    ) -> Result<KeyList, KeyListError> {
        let list: KeyList = signed
            .verify(&trusted.roots, trusted.threshold)
            .map_err(KeyListError::TrustedRoots)?;
        signed
            .verify::<KeyList>(&list.roots, list.root_threshold)
            .map_err(KeyListError::NewRoots)?;
        if let Some(have) = current_version
            && list.version <= have
        {
            return Err(KeyListError::NotNewer {
                got: list.version,
                have,
            });
        }
        if now >= list.expires_at {
            return Err(KeyListError::Expired {
                expires_at: list.expires_at,
                now,
            });
        }
        Ok(list)
    }
}
