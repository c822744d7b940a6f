//! `swell keys list` (the root-signed key list) and `swell release create|sign`
//! (releases signed by a threshold of release keys). Offline operations: no
//! broker is contacted.

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use swell_coordinator::keyfile::{Role, read_public, read_secret_as};
use swell_coordinator::server::unix_now;
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
    /// Make an unsigned release from artifacts — files, or http(s) URLs that are
    /// fetched once — with digest and length computed.
    Create {
        /// Artifact files or URLs (a URL is also where devices fetch it, unless
        /// --url says otherwise).
        #[arg(long = "artifact", required = true)]
        artifacts: Vec<String>,
        #[arg(long, value_enum, default_value_t = Kind::Bundle)]
        kind: Kind,
        /// Where devices fetch the artifacts from (one URL per artifact, in order).
        #[arg(long = "url")]
        urls: Vec<String>,
        /// Configuration paired with the artifacts (a file or an http(s) URL). A
        /// configuration-only change is a new release with the same artifacts.
        #[arg(long)]
        config: Option<String>,
        /// Where devices fetch the configuration from (default: the --config URL).
        #[arg(long)]
        config_url: Option<String>,
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
        expires_at: unix_now() + valid.as_secs(),
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

fn is_url(s: &str) -> bool {
    s.starts_with("https://") || s.starts_with("http://")
}

/// Digest and length of a file, or of what a URL serves (streamed, never held
/// whole in memory).
fn digest_of(src: &str) -> Result<(Digest, u64)> {
    use sha2::Digest as _;
    if !is_url(src) {
        let p = Path::new(src);
        let mut f =
            std::fs::File::open(p).with_context(|| format!("cannot read {}", p.display()))?;
        let mut h = sha2::Sha256::new();
        let n = std::io::copy(&mut f, &mut h)
            .with_context(|| format!("cannot read {}", p.display()))?;
        return Ok((Digest(h.finalize().into()), n));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(30))
            .build()?;
        let mut resp = client
            .get(src)
            .send()
            .await
            .with_context(|| format!("cannot fetch {src}"))?;
        if !resp.status().is_success() {
            bail!("{src}: HTTP {}", resp.status());
        }
        let mut h = sha2::Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = resp
            .chunk()
            .await
            .with_context(|| format!("reading {src}"))?
        {
            h.update(&chunk);
            n += chunk.len() as u64;
        }
        Ok((Digest(h.finalize().into()), n))
    })
}

pub fn release(cmd: ReleaseCmd) -> Result<()> {
    match cmd {
        ReleaseCmd::Create {
            artifacts,
            kind,
            urls,
            config,
            config_url,
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
            for (i, src) in artifacts.iter().enumerate() {
                let (digest, length) = digest_of(src)?;
                let name = src
                    .rsplit('/')
                    .next()
                    .filter(|n| !n.is_empty())
                    .map(|n| {
                        n.chars()
                            .filter(|c| (' '..='~').contains(c))
                            .take(64)
                            .collect()
                    })
                    .unwrap_or_else(|| format!("artifact-{i}"));
                let url = urls
                    .get(i)
                    .cloned()
                    .or_else(|| is_url(src).then(|| src.clone()));
                list.push(Artifact {
                    name,
                    kind,
                    digest,
                    length,
                    urls: url.into_iter().collect(),
                });
            }
            let config = match config {
                Some(src) => {
                    let (digest, length) = digest_of(&src)?;
                    let url = config_url.or_else(|| is_url(&src).then(|| src.clone()));
                    Some(ConfigBlob {
                        digest,
                        length,
                        urls: url.into_iter().collect(),
                    })
                }
                None => None,
            };
            let body = Release {
                counter,
                version,
                created_at: unix_now(),
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
