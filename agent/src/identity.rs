//! The device key: generated on first start from the OS's randomness, kept in
//! `{state}/device.key` (mode 0600, 32-byte seed as hex), never sent anywhere.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use swell_protocol::SecretKey;

/// Why the device key could not be loaded or made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("device key {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("device key {path}: {reason}")]
    Bad { path: String, reason: String },
    #[error("no randomness from the OS: {0}")]
    Random(String),
}

/// Loads the device key, creating it on first start. A key file readable by
/// others is refused rather than used.
pub fn load_or_create(path: &Path) -> Result<(SecretKey, bool), IdentityError> {
    let p = path.display().to_string();
    let io = |source| IdentityError::Io {
        path: p.clone(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(IdentityError::Bad {
                    path: p,
                    reason: format!("mode {:o} lets others read it; chmod 600", mode & 0o777),
                });
            }
            let seed: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| IdentityError::Bad {
                    path: p.clone(),
                    reason: "not a 32-byte hex seed".into(),
                })?;
            Ok((SecretKey::from_seed(&seed), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| IdentityError::Random(e.to_string()))?;
            swell_durable::write_atomic(path, format!("{}\n", hex::encode(seed)).as_bytes(), 0o600)
                .map_err(io)?;
            Ok((SecretKey::from_seed(&seed), true))
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_created_once_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        let (k1, created) = load_or_create(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (k2, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(k1.public(), k2.public());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(IdentityError::Bad { .. })
        ));
        std::fs::write(&path, "zz").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(IdentityError::Bad { .. })
        ));
    }
}
