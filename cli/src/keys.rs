//! `swell keys`: key files, in the format of [`swell_coordinator::keyfile`].

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use swell_coordinator::keyfile::{PublicFile, Role, SecretFile, read_public};
use swell_protocol::SecretKey;

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
    /// Make the root-signed key list the coordinator and devices trust.
    List(crate::release::KeyListArgs),
}

pub fn run(cmd: KeysCmd) -> Result<()> {
    match cmd {
        KeysCmd::Gen { role, out } => generate(role, &out),
        KeysCmd::List(args) => crate::release::key_list(args),
        KeysCmd::Show { file } => {
            let (role, public) = read_public(&file)?;
            println!("role:       {}", role.name());
            println!("public key: {public}");
            println!("key id:     {}", public.key_id());
            Ok(())
        }
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
    let public = PublicFile::new(role, &key.public());
    let pub_out = pub_path(out);
    if pub_out.exists() {
        bail!("{} already exists", pub_out.display());
    }
    let mut f = create_new(out, 0o600)?;
    f.write_all((serde_json::to_string_pretty(&SecretFile::new(role, &key))? + "\n").as_bytes())?;
    f.sync_all()?;
    let mut f = create_new(&pub_out, 0o644)?;
    f.write_all((serde_json::to_string_pretty(&public)? + "\n").as_bytes())?;
    f.sync_all()?;
    println!(
        "{} key {} written to {} (public key in {})",
        role.name(),
        public.key_id,
        out.display(),
        pub_out.display()
    );
    Ok(())
}
