//! `swell keys list` (the root-signed key list) and `swell release create|sign`
//! (releases signed by a threshold of release keys). Offline operations: no
//! broker is contacted.

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use swell_coordinator::keyfile::{Role, read_public, read_secret_as};
use swell_protocol::messages::{Artifact, ArtifactKind, ConfigBlob, KeyList, Release};
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::{Digest, PublicKey};

#[derive(Debug, Args)]
pub struct KeyListArgs {
    /// Root secret key files; each signs, and their public keys are the roots.
    #[arg(long = "root", required = true)]
    roots: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    root_threshold: u8,
    /// Release public key files.
    #[arg(long = "release", required = true)]
    release: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    release_threshold: u8,
    /// Coordinator public key files.
    #[arg(long = "coordinator", required = true)]
    coordinator: Vec<PathBuf>,
    /// Operator public key files (commands must then be signed).
    #[arg(long = "operator")]
    operator: Vec<PathBuf>,
    /// Key list version; each new list needs a higher one.
    #[arg(long, default_value_t = 1)]
    version: u64,
    /// Validity.
    #[arg(long, default_value = "365d")]
    valid_for: String,
    #[arg(long, short)]
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Kind {
    Firmware,
    Bundle,
    Container,
}

#[derive(Debug, Subcommand)]
pub enum ReleaseCmd {
    /// Make an unsigned release from artifact files (digest and length computed).
    Create {
        /// Artifact files.
        #[arg(long = "artifact", required = true)]
        artifacts: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = Kind::Bundle)]
        kind: Kind,
        /// Where devices fetch the artifacts from (one URL per artifact, in order).
        #[arg(long = "url")]
        urls: Vec<String>,
        /// Configuration paired with the artifacts.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Display version.
        #[arg(long)]
        version: String,
        /// Release counter: higher than any release the devices run.
        #[arg(long)]
        counter: u64,
        /// Hardware ids the release may run on.
        #[arg(long = "hardware", required = true)]
        hardware: Vec<String>,
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Add release-key signatures to a release file (in place).
    Sign {
        file: PathBuf,
        /// Release secret key files.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
    },
}

fn publics(paths: &[PathBuf]) -> Result<Vec<PublicKey>> {
    paths
        .iter()
        .map(|p| read_public(p).map(|(_, k)| k).map_err(anyhow::Error::from))
        .collect()
}

fn write(out: &Path, obj: &ThresholdSigned) -> Result<()> {
    std::fs::write(out, obj.encode()?).with_context(|| format!("cannot write {}", out.display()))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn key_list(a: KeyListArgs) -> Result<()> {
    let signers = a
        .roots
        .iter()
        .map(|p| read_secret_as(p, Role::Root))
        .collect::<Result<Vec<_>, _>>()?;
    let valid = humantime::parse_duration(&a.valid_for)
        .with_context(|| format!("--valid-for {:?}", a.valid_for))?;
    let list = KeyList {
        version: a.version,
        expires_at: now() + valid.as_secs(),
        roots: signers.iter().map(|k| k.public()).collect(),
        root_threshold: a.root_threshold,
        release_keys: publics(&a.release)?,
        release_threshold: a.release_threshold,
        coordinator_keys: publics(&a.coordinator)?,
        operator_keys: publics(&a.operator)?,
    };
    let mut obj = ThresholdSigned::new(&list).map_err(|e| anyhow::anyhow!("{e}"))?;
    for k in &signers {
        obj.sign(k)?;
    }
    write(&a.out, &obj)?;
    println!(
        "key list v{} written to {} ({} roots signed)",
        a.version,
        a.out.display(),
        signers.len()
    );
    Ok(())
}

fn digest_file(p: &Path) -> Result<(Digest, u64)> {
    let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
    Ok((Digest::sha256(&bytes), bytes.len() as u64))
}

pub fn release(cmd: ReleaseCmd) -> Result<()> {
    match cmd {
        ReleaseCmd::Create {
            artifacts,
            kind,
            urls,
            config,
            version,
            counter,
            hardware,
            out,
        } => {
            if !urls.is_empty() && urls.len() != artifacts.len() {
                bail!("give one --url per --artifact, or none");
            }
            let kind = match kind {
                Kind::Firmware => ArtifactKind::Firmware,
                Kind::Bundle => ArtifactKind::Bundle,
                Kind::Container => ArtifactKind::Container,
            };
            let mut list = Vec::new();
            for (i, p) in artifacts.iter().enumerate() {
                let (digest, length) = digest_file(p)?;
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| format!("artifact-{i}"));
                list.push(Artifact {
                    name,
                    kind,
                    digest,
                    length,
                    urls: urls.get(i).cloned().into_iter().collect(),
                });
            }
            let config = match config {
                Some(p) => {
                    let (digest, length) = digest_file(&p)?;
                    Some(ConfigBlob {
                        digest,
                        length,
                        urls: vec![],
                    })
                }
                None => None,
            };
            let body = Release {
                counter,
                version,
                created_at: now(),
                artifacts: list,
                config,
                hardware,
                exposure: None,
                rollback: None,
            };
            let obj = ThresholdSigned::new(&body).map_err(|e| anyhow::anyhow!("{e}"))?;
            write(&out, &obj)?;
            println!(
                "release {} (unsigned) written to {}; sign it with `swell release sign`",
                obj.id(),
                out.display()
            );
            Ok(())
        }
        ReleaseCmd::Sign { file, keys } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let mut obj = ThresholdSigned::decode(&bytes)
                .with_context(|| format!("{} is not a release file", file.display()))?;
            if obj.kind != swell_protocol::MessageKind::Release as u16 {
                bail!("{} is not a release", file.display());
            }
            for k in &keys {
                obj.sign(&read_secret_as(k, Role::Release)?)?;
            }
            write(&file, &obj)?;
            println!(
                "release {} now carries {} signature(s)",
                obj.id(),
                obj.sigs.len()
            );
            Ok(())
        }
    }
}
