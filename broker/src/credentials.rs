//! The embedded broker's credentials, generated on first start into a
//! directory of the coordinator's state (mode 0700, each file 0600):
//!
//! | file | what |
//! |---|---|
//! | `coordinator.password` | the coordinator's own password (user `coordinator`) |
//! | `operator.password` | the operators' password (user `operator`), for `swell --password-file` |
//! | `gateway.password` | a gateway's password (user `gateway`), for simulators |
//! | `device.secret` | 32 random bytes; a device's password is derived from it and its id |
//!
//! A device authenticates with its device id as user name and
//! `hex(HMAC-SHA256(secret, "swell/broker-device/v1" ‖ id))[..32]` as password
//! ([`Credentials::device_password`], `swell-coordinator broker-password
//! device ID`): every device has a password of its own without the broker
//! storing one per device, and a device knows only its own. The three role
//! names are not available as device ids on this broker.

use crate::rules::{Identity, Role};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Why credentials could not be read or made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: &'static str },
    #[error("no randomness available for new credentials: {0}")]
    Random(String),
}

/// The user names of the fixed roles.
pub const COORDINATOR_USER: &str = "coordinator";
pub const OPERATOR_USER: &str = "operator";
pub const GATEWAY_USER: &str = "gateway";

const DEVICE_DOMAIN: &[u8] = b"swell/broker-device/v1";

/// Loaded credentials.
#[derive(Clone)]
pub struct Credentials {
    dir: PathBuf,
    coordinator: String,
    operator: String,
    gateway: String,
    device_secret: [u8; 32],
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret.
        write!(f, "Credentials {{ dir: {} }}", self.dir.display())
    }
}

fn random_hex(bytes: usize) -> Result<String, CredentialsError> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).map_err(|e| CredentialsError::Random(e.to_string()))?;
    Ok(hex::encode(b))
}

fn valid(path: &Path, s: &str) -> Result<String, CredentialsError> {
    let s = s.trim().to_string();
    if s.len() < 16 {
        return Err(CredentialsError::Invalid {
            path: path.to_path_buf(),
            reason: "shorter than 16 characters",
        });
    }
    Ok(s)
}

/// Reads `path`, or writes `make()` there first (0600, synced) when it does not
/// exist.
fn read_or_create(
    path: &Path,
    make: impl FnOnce() -> Result<String, CredentialsError>,
) -> Result<String, CredentialsError> {
    let io = |source| CredentialsError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(s) => valid(path, &s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let value = make()?;
            // Written whole to a file of its own, then linked into place: a
            // reader never sees half a secret, and of two processes making it at
            // once (the coordinator, `broker-password`) the first link wins.
            let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt as _;
                opts.mode(0o600);
            }
            let mut f = opts.open(&tmp).map_err(io)?;
            f.write_all(format!("{value}\n").as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            let linked = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => Ok(value),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let s = std::fs::read_to_string(path).map_err(io)?;
                    valid(path, &s)
                }
                Err(e) => Err(io(e)),
            }
        }
        Err(e) => Err(io(e)),
    }
}

/// Constant-time comparison: how long a refusal takes says nothing about how
/// much of a password was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Credentials {
    /// Loads the credentials in `dir`, making whatever is missing.
    pub fn load_or_create(dir: &Path) -> Result<Self, CredentialsError> {
        let io = |source| CredentialsError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        let password = || random_hex(16);
        let secret = read_or_create(&dir.join("device.secret"), || random_hex(32))?;
        let device_secret: [u8; 32] = hex::decode(&secret)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| CredentialsError::Invalid {
                path: dir.join("device.secret"),
                reason: "not 32 bytes of hex",
            })?;
        Ok(Credentials {
            coordinator: read_or_create(&dir.join("coordinator.password"), password)?,
            operator: read_or_create(&dir.join("operator.password"), password)?,
            gateway: read_or_create(&dir.join("gateway.password"), password)?,
            device_secret,
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The password of a fixed role's user (`None` for devices: see
    /// [`Credentials::device_password`]).
    pub fn password(&self, role: Role) -> Option<&str> {
        match role {
            Role::Coordinator => Some(&self.coordinator),
            Role::Operator => Some(&self.operator),
            Role::Gateway => Some(&self.gateway),
            Role::Device => None,
        }
    }

    /// The file holding a fixed role's password.
    pub fn password_file(&self, role: Role) -> Option<PathBuf> {
        self.password(role)
            .map(|_| self.dir.join(format!("{}.password", role.name())))
    }

    /// The password of the device with this id.
    pub fn device_password(&self, device: &str) -> String {
        // HMAC takes a key of any length; the error case cannot happen.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.device_secret) else {
            return String::new();
        };
        mac.update(DEVICE_DOMAIN);
        mac.update(device.as_bytes());
        let mut h = hex::encode(mac.finalize().into_bytes());
        h.truncate(32);
        h
    }

    /// Who `user` is if `password` is theirs.
    pub fn authenticate(&self, user: &str, password: &[u8]) -> Option<Identity> {
        let fixed = [
            (COORDINATOR_USER, Role::Coordinator, &self.coordinator),
            (OPERATOR_USER, Role::Operator, &self.operator),
            (GATEWAY_USER, Role::Gateway, &self.gateway),
        ];
        if let Some((_, role, pw)) = fixed.iter().find(|(u, _, _)| *u == user) {
            return same(pw.as_bytes(), password).then(|| Identity {
                user: user.to_string(),
                role: *role,
            });
        }
        // A device's user name is its id (MQTT-2: no wildcard or '/' can be in it).
        swell_protocol::ids::validate_id("device id", user).ok()?;
        same(self.device_password(user).as_bytes(), password).then(|| Identity {
            user: user.to_string(),
            role: Role::Device,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker");
        let a = Credentials::load_or_create(&path).unwrap();
        let b = Credentials::load_or_create(&path).unwrap();
        assert_eq!(a.password(Role::Operator), b.password(Role::Operator));
        assert_eq!(a.device_password("dev-1"), b.device_password("dev-1"));
        assert_ne!(a.device_password("dev-1"), a.device_password("dev-2"));
        assert_ne!(a.password(Role::Operator), a.password(Role::Coordinator));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(path.join("operator.password"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
    }

    #[test]
    fn credentials_authenticate_by_role() {
        let dir = tempfile::tempdir().unwrap();
        let c = Credentials::load_or_create(dir.path()).unwrap();
        let op = c.password(Role::Operator).unwrap().to_string();
        assert_eq!(
            c.authenticate("operator", op.as_bytes()).map(|i| i.role),
            Some(Role::Operator)
        );
        assert_eq!(c.authenticate("coordinator", op.as_bytes()), None);
        let pw = c.device_password("dev-1");
        assert_eq!(
            c.authenticate("dev-1", pw.as_bytes()).map(|i| i.role),
            Some(Role::Device)
        );
        assert_eq!(c.authenticate("dev-2", pw.as_bytes()), None);
        assert_eq!(c.authenticate("dev-1", b""), None);
        // Not a device id: never a device (no '+', '#', '/' in an identity).
        let bad = c.device_password("a/+");
        assert_eq!(c.authenticate("a/+", bad.as_bytes()), None);
    }

    #[test]
    fn credentials_refuse_a_truncated_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("operator.password"), "short\n").unwrap();
        let e = Credentials::load_or_create(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("shorter than 16"), "{e}");
    }
}
