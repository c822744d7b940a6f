//! `swell keys`: key files.
//!
//! A secret key file is JSON `{"swell_key": 1, "role": …, "seed": hex}` written with
//! mode 0600 and never overwritten; the public half goes to `<file>.pub` as
//! `{"role": …, "public_key": hex, "key_id": hex}`.

use anyhow::{Context as _, Result, bail};
use clap::{Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use swell_protocol::{PublicKey, SecretKey};

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Generate a new key.
    Gen {
        role: Role,
        /// Secret key file to create (the public key goes to FILE.pub).
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Show the public key and key id of a key file (secret or .pub).
    Show { file: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Root,
    Release,
    Coordinator,
    Operator,
    Device,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretFile {
    swell_key: u32,
    role: Role,
    seed: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublicFile {
    role: Role,
    public_key: String,
    key_id: String,
}

pub fn run(cmd: KeysCmd) -> Result<()> {
    match cmd {
        KeysCmd::Gen { role, out } => generate(role, &out),
        KeysCmd::Show { file } => {
            let (role, public) = read_public(&file)?;
            println!("role:       {}", role_name(role));
            println!("public key: {public}");
            println!("key id:     {}", public.key_id());
            Ok(())
        }
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Root => "root",
        Role::Release => "release",
        Role::Coordinator => "coordinator",
        Role::Operator => "operator",
        Role::Device => "device",
    }
}

fn pub_path(secret: &Path) -> PathBuf {
    let mut p = secret.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

fn create_new(path: &Path, mode: u32) -> Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    opts.open(path).with_context(|| {
        format!(
            "cannot create {} (existing key files are never overwritten)",
            path.display()
        )
    })
}

fn generate(role: Role, out: &Path) -> Result<()> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    let key = SecretKey::from_seed(&seed);
    let secret = SecretFile {
        swell_key: 1,
        role,
        seed: hex::encode(seed),
    };
    let public = PublicFile {
        role,
        public_key: key.public().to_string(),
        key_id: key.key_id().to_string(),
    };
    let pub_out = pub_path(out);
    if pub_out.exists() {
        bail!("{} already exists", pub_out.display());
    }
    let mut f = create_new(out, 0o600)?;
    f.write_all((serde_json::to_string_pretty(&secret)? + "\n").as_bytes())?;
    f.sync_all()?;
    let mut f = create_new(&pub_out, 0o644)?;
    f.write_all((serde_json::to_string_pretty(&public)? + "\n").as_bytes())?;
    f.sync_all()?;
    println!(
        "{} key {} written to {} (public key in {})",
        role_name(role),
        public.key_id,
        out.display(),
        pub_out.display()
    );
    Ok(())
}

/// Reads a secret key file.
#[allow(dead_code)] // used by `release sign` and the ops commands (issue 5)
pub fn read_secret(path: &Path) -> Result<(Role, SecretKey)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let f: SecretFile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a Swell secret key file", path.display()))?;
    if f.swell_key != 1 {
        bail!(
            "{}: key file version {} is not supported",
            path.display(),
            f.swell_key
        );
    }
    let mut seed = [0u8; 32];
    hex::decode_to_slice(f.seed.trim(), &mut seed)
        .with_context(|| format!("{}: seed is not 32 bytes of hex", path.display()))?;
    Ok((f.role, SecretKey::from_seed(&seed)))
}

/// Reads the public key of a secret or public key file.
pub fn read_public(path: &Path) -> Result<(Role, PublicKey)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if let Ok(p) = serde_json::from_str::<PublicFile>(&text) {
        let key = PublicKey::from_hex(p.public_key.trim())
            .with_context(|| format!("{}: public_key is not 32 bytes of hex", path.display()))?;
        if key.key_id().to_string() != p.key_id {
            bail!(
                "{}: key_id {} does not belong to the public key (expected {})",
                path.display(),
                p.key_id,
                key.key_id()
            );
        }
        return Ok((p.role, key));
    }
    let (role, secret) = read_secret(path)?;
    Ok((role, secret.public()))
}
