//! Key files, shared by the coordinator and the `swell` CLI.
//!
//! A secret key file is JSON `{"swell_key": 1, "role": …, "seed": hex}` (mode 0600,
//! never overwritten); its public half is `<file>.pub`: `{"role": …, "public_key":
//! hex, "key_id": hex}`. A key list file holds the encoded threshold object.

use serde::{Deserialize, Serialize};
use std::path::Path;
use swell_protocol::{PublicKey, SecretKey};

/// What a key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Root,
    Release,
    Coordinator,
    Operator,
    Device,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Root => "root",
            Role::Release => "release",
            Role::Coordinator => "coordinator",
            Role::Operator => "operator",
            Role::Device => "device",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretFile {
    pub swell_key: u32,
    pub role: Role,
    pub seed: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicFile {
    pub role: Role,
    pub public_key: String,
    pub key_id: String,
}

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

fn invalid(path: &Path, reason: impl Into<String>) -> KeyFileError {
    KeyFileError::Invalid {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn read(path: &Path) -> Result<String, KeyFileError> {
    std::fs::read_to_string(path).map_err(|source| KeyFileError::Io {
        path: path.display().to_string(),
        source,
    })
}

impl SecretFile {
    pub fn new(role: Role, key: &SecretKey) -> Self {
        SecretFile {
            swell_key: 1,
            role,
            seed: hex::encode(key.to_seed()),
        }
    }
}

impl PublicFile {
    pub fn new(role: Role, key: &PublicKey) -> Self {
        PublicFile {
            role,
            public_key: key.to_string(),
            key_id: key.key_id().to_string(),
        }
    }
}

/// Reads a secret key file.
pub fn read_secret(path: &Path) -> Result<(Role, SecretKey), KeyFileError> {
    let f: SecretFile = serde_json::from_str(&read(path)?)
        .map_err(|e| invalid(path, format!("not a Swell secret key file: {e}")))?;
    if f.swell_key != 1 {
        return Err(invalid(
            path,
            format!("key file version {} is not supported", f.swell_key),
        ));
    }
    let mut seed = [0u8; 32];
    hex::decode_to_slice(f.seed.trim(), &mut seed)
        .map_err(|_| invalid(path, "seed is not 32 bytes of hex"))?;
    Ok((f.role, SecretKey::from_seed(&seed)))
}

/// Reads the public key of a secret or public key file.
pub fn read_public(path: &Path) -> Result<(Role, PublicKey), KeyFileError> {
    let text = read(path)?;
    if let Ok(p) = serde_json::from_str::<PublicFile>(&text) {
        let key = PublicKey::from_hex(p.public_key.trim())
            .map_err(|_| invalid(path, "public_key is not 32 bytes of hex"))?;
        if key.key_id().to_string() != p.key_id {
            return Err(invalid(
                path,
                format!(
                    "key_id {} does not belong to the public key (expected {})",
                    p.key_id,
                    key.key_id()
                ),
            ));
        }
        return Ok((p.role, key));
    }
    let (role, secret) = read_secret(path)?;
    Ok((role, secret.public()))
}

/// Reads a key that must have `role`.
pub fn read_secret_as(path: &Path, role: Role) -> Result<SecretKey, KeyFileError> {
    let (r, k) = read_secret(path)?;
    if r != role {
        return Err(invalid(
            path,
            format!("is a {} key, a {} key is needed", r.name(), role.name()),
        ));
    }
    Ok(k)
}
