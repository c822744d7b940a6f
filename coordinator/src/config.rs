//! The `swell-coordinator` binary's configuration (not part of the library):
//! the TOML file, the environment and the flags merged into one [`Config`],
//! with the key list loaded and checked against the root of trust. Flags beat
//! environment beats file.

use super::Cli;
use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use swell_coordinator::assemble::Coordinator;
use swell_coordinator::engine::Settings;
use swell_coordinator::keyfile::{self, Role};
use swell_coordinator::server::{CrashAt, LoopConfig, unix_now};
use swell_mqtt::{MqttConfig, TlsPem, parse_url};
use swell_protocol::messages::{KeyList, RootOfTrust};
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::topics::{DEFAULT_PREFIX, Topics};
use swell_protocol::{FleetId, PublicKey};

/// Shortest enrollment token accepted at start (ENROLL-2).
const MIN_ENROLLMENT_TOKEN: usize = 16;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    broker: Option<String>,
    username: Option<String>,
    password: Option<String>,
    client_id: Option<String>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    embedded_broker: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
    fleet: Option<String>,
    topic_prefix: Option<String>,
    key: Option<PathBuf>,
    key_list: Option<PathBuf>,
    root_keys: Option<Vec<PathBuf>>,
    root_threshold: Option<u8>,
    enrollment_tokens: Option<Vec<String>>,
    beacon_interval: Option<String>,
    manifest_ttl: Option<String>,
    pending_expiry: Option<String>,
    tick: Option<String>,
    verify_threads: Option<usize>,
    db_cache_mib: Option<u64>,
    strict_signatures: Option<bool>,
    log_format: Option<String>,
    http_addr: Option<String>,
    kubernetes: Option<bool>,
    namespace: Option<String>,
    lease_name: Option<String>,
    identity: Option<String>,
}

/// Kubernetes mode settings.
#[cfg_attr(not(feature = "kube"), allow(dead_code))]
pub(crate) struct KubeConfig {
    pub(crate) namespace: String,
    pub(crate) lease_name: String,
    pub(crate) identity: String,
}

/// The merged, validated configuration.
pub(crate) struct Config {
    pub(crate) mqtt: MqttConfig,
    pub(crate) embedded: Option<SocketAddr>,
    pub(crate) state_dir: PathBuf,
    pub(crate) db_cache_bytes: u64,
    pub(crate) settings: Settings,
    pub(crate) loop_cfg: LoopConfig,
    pub(crate) json_logs: bool,
    pub(crate) http_addr: Option<SocketAddr>,
    pub(crate) kube: Option<KubeConfig>,
}

impl Config {
    /// The coordinator as configured.
    pub(crate) fn coordinator(self) -> Coordinator {
        Coordinator {
            settings: self.settings,
            state_dir: self.state_dir,
            db_cache_bytes: self.db_cache_bytes,
            mqtt: self.mqtt,
            loop_cfg: self.loop_cfg,
        }
    }
}

fn dur(what: &str, v: Option<String>, default: &str) -> Result<Duration> {
    let s = v.unwrap_or_else(|| default.to_string());
    let d = humantime::parse_duration(&s).with_context(|| format!("{what} {s:?}"))?;
    if d.is_zero() {
        bail!("{what} must be above zero");
    }
    Ok(d)
}

fn required<T>(what: &str, v: Option<T>) -> Result<T> {
    v.with_context(|| {
        format!(
            "--{what} is required (flag, SWELL_{} or config file)",
            what.replace('-', "_").to_uppercase()
        )
    })
}

pub(crate) fn load_key_list(
    path: &Path,
    roots: &[PathBuf],
    threshold: u8,
    now: u64,
) -> Result<(ThresholdSigned, KeyList)> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read key list {}", path.display()))?;
    let signed =
        ThresholdSigned::decode(&bytes).with_context(|| format!("key list {}", path.display()))?;
    let roots: Vec<PublicKey> = roots
        .iter()
        .map(|p| keyfile::read_public(p).map(|(_, k)| k))
        .collect::<Result<_, _>>()?;
    if roots.is_empty() {
        bail!("--root-key is required: the key list is checked against the root keys");
    }
    let list = KeyList::accept(&signed, &RootOfTrust { roots, threshold }, None, now)
        .with_context(|| format!("key list {}", path.display()))?;
    Ok((signed, list))
}

pub(crate) fn config(cli: Cli) -> Result<Config> {
    let file: FileConfig = match &cli.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("config file {}", p.display()))?
        }
        None => FileConfig::default(),
    };
    let embedded = cli.embedded_broker.or(file.embedded_broker);
    let broker_url = match (cli.broker.or(file.broker), embedded) {
        (Some(_), Some(_)) => bail!(
            "--broker and --embedded-broker exclude each other: the coordinator uses the broker it starts"
        ),
        (Some(u), None) => u,
        // Where the embedded broker listens is known once it has bound.
        (None, Some(a)) => format!("mqtt://{a}"),
        (None, None) => bail!("--broker or --embedded-broker is required"),
    };
    let url = parse_url(&broker_url)?;
    let read =
        |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let (ca, cert, key) = (
        cli.ca_file.or(file.ca_file),
        cli.client_cert.or(file.client_cert),
        cli.client_key.or(file.client_key),
    );
    let tls = if url.tls {
        let ca = ca.with_context(|| format!("{broker_url} is TLS: --ca-file is required"))?;
        let client = match (cert, key) {
            (Some(c), Some(k)) => Some((read(&c)?, read(&k)?)),
            (None, None) => None,
            _ => bail!("--client-cert and --client-key go together"),
        };
        Some(TlsPem {
            ca: read(&ca)?,
            client,
        })
    } else {
        if ca.is_some() || cert.is_some() || key.is_some() {
            bail!("TLS files given but {broker_url} is not mqtts://");
        }
        None
    };
    let fleet = FleetId::new(required("fleet", cli.fleet.or(file.fleet))?).context("--fleet")?;
    let topics = Topics::new(
        &cli.topic_prefix
            .or(file.topic_prefix)
            .unwrap_or_else(|| DEFAULT_PREFIX.into()),
    )?;
    let key = keyfile::read_secret_as(&required("key", cli.key.or(file.key))?, Role::Coordinator)?;
    let roots = if cli.root_keys.is_empty() {
        file.root_keys.unwrap_or_default()
    } else {
        cli.root_keys
    };
    let threshold = cli.root_threshold.or(file.root_threshold).unwrap_or(1);
    let (key_list, keys) = load_key_list(
        &required("key-list", cli.key_list.or(file.key_list))?,
        &roots,
        threshold,
        unix_now(),
    )?;
    let tokens = if cli.enrollment_tokens.is_empty() {
        file.enrollment_tokens.unwrap_or_default()
    } else {
        cli.enrollment_tokens
    };
    // ENROLL-2: an empty token (an unset "$TOKEN") would enroll every device
    // that sends an empty one, and a short one is guessed.
    if let Some(t) = tokens.iter().find(|t| t.len() < MIN_ENROLLMENT_TOKEN) {
        bail!(
            "--enrollment-token: a token of {} bytes is refused; use at least {MIN_ENROLLMENT_TOKEN} (e.g. `openssl rand -hex 16`), or none to approve every device by hand",
            t.len()
        );
    }
    let beacon_interval = dur(
        "--beacon-interval",
        cli.beacon_interval.or(file.beacon_interval),
        "60s",
    )?;
    let username = cli.username.or(file.username);
    let password = cli.password.or(file.password);
    let credentials = match (username, password) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        _ => bail!("--username and --password go together"),
    };
    if embedded.is_some() && credentials.is_some() {
        bail!("--embedded-broker makes its own credentials: drop --username and --password");
    }
    let log_format = cli
        .log_format
        .or(file.log_format)
        .unwrap_or_else(|| "text".into());
    if log_format != "text" && log_format != "json" {
        bail!("--log-format must be text or json");
    }
    let kubernetes = cli.kubernetes || file.kubernetes.unwrap_or(false);
    // Probes need the port in Kubernetes; elsewhere it is opt-in, so several
    // coordinators (tests, demos) never fight over one port.
    let default_http = if kubernetes { "0.0.0.0:9090" } else { "off" };
    let http_addr = match cli
        .http_addr
        .or(file.http_addr)
        .unwrap_or_else(|| default_http.into())
        .as_str()
    {
        "off" => None,
        a => Some(
            a.parse::<SocketAddr>()
                .with_context(|| format!("--http-addr {a:?}"))?,
        ),
    };
    let kube = if kubernetes {
        let identity = cli
            .identity
            .or(file.identity)
            .or_else(|| std::env::var("HOSTNAME").ok())
            .context("--identity (or POD_NAME) is required in Kubernetes mode")?;
        Some(KubeConfig {
            namespace: cli
                .namespace
                .or(file.namespace)
                .context("--namespace (or POD_NAMESPACE) is required in Kubernetes mode")?,
            lease_name: cli
                .lease_name
                .or(file.lease_name)
                .unwrap_or_else(|| format!("swell-coordinator-{fleet}")),
            identity,
        })
    } else {
        None
    };
    Ok(Config {
        http_addr,
        kube,
        mqtt: MqttConfig {
            host: url.host,
            port: url.port,
            tls,
            client_id: cli
                .client_id
                .or(file.client_id)
                .unwrap_or_else(|| format!("swell-coordinator-{fleet}")),
            credentials,
            keep_alive: Duration::from_secs(30),
            max_packet: 256 * 1024,
            persistent: true,
        },
        embedded,
        state_dir: required("state-dir", cli.state_dir.or(file.state_dir))?,
        db_cache_bytes: match cli.db_cache_mib.or(file.db_cache_mib) {
            None => swell_coordinator::store::DEFAULT_CACHE_BYTES,
            Some(m) => swell_coordinator::store::cache_bytes_from_mib(m)
                .context("--db-cache-mib must be above zero and below 2^44")?,
        },
        settings: Settings {
            fleet,
            topics,
            key,
            key_list,
            keys,
            epoch: 0,
            enrollment_tokens: tokens,
            beacon_ttl: beacon_interval * 3,
            manifest_ttl: dur(
                "--manifest-ttl",
                cli.manifest_ttl.or(file.manifest_ttl),
                "7d",
            )?,
            pending_expiry: dur(
                "--pending-expiry",
                cli.pending_expiry.or(file.pending_expiry),
                "3d",
            )?,
        },
        loop_cfg: LoopConfig {
            tick: dur("--tick", cli.tick.or(file.tick), "1s")?,
            beacon_interval,
            verify_threads: cli.verify_threads.or(file.verify_threads).unwrap_or(0),
            batch_signatures: !(cli.strict_signatures || file.strict_signatures.unwrap_or(false)),
            crash_at: match cli.crash_at.as_deref() {
                Some("apply") => Some(CrashAt::Apply),
                Some("flush") => Some(CrashAt::Flush),
                _ => None,
            },
            ..LoopConfig::default()
        },
        json_logs: log_format == "json",
    })
}
