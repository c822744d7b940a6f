//! `swell-coordinator`: runs rollouts over MQTT.
//!
//! Every flag can also be set by environment (`SWELL_…`) or in a TOML file
//! (`--config`, keys named like the long flags with `_`); flags beat environment
//! beats file. Durations are humantime (`30s`, `5m`).

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use swell_coordinator::engine::{Engine, Settings};
use swell_coordinator::keyfile::{self, Role};
use swell_coordinator::server::{self, LoopConfig, unix_now};
use swell_coordinator::store::SledStore;
use swell_coordinator::transport::mqtt::{MqttConfig, TlsPem, parse_url};
use swell_coordinator::{broker, durable};
use swell_protocol::messages::{KeyList, RootOfTrust};
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::topics::{DEFAULT_PREFIX, Topics};
use swell_protocol::{FleetId, PublicKey};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "swell-coordinator",
    version,
    about = "Swell coordinator: rolls releases out in waves over MQTT"
)]
struct Cli {
    /// TOML file with any of the settings below.
    #[arg(long, env = "SWELL_CONFIG")]
    config: Option<PathBuf>,
    /// Broker URL (mqtt://host:port).
    #[arg(long, env = "SWELL_BROKER")]
    broker: Option<String>,
    /// Broker user name.
    #[arg(long, env = "SWELL_USERNAME")]
    username: Option<String>,
    /// Broker password (prefer the environment over a flag).
    #[arg(long, env = "SWELL_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// MQTT client id.
    #[arg(long, env = "SWELL_CLIENT_ID")]
    client_id: Option<String>,
    /// CA certificate (PEM) that signed the broker's certificate (mqtts://).
    #[arg(long, env = "SWELL_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "SWELL_CLIENT_CERT")]
    client_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, env = "SWELL_CLIENT_KEY")]
    client_key: Option<PathBuf>,
    /// Start an in-process MQTT 5 broker on this address and use it.
    #[arg(long, env = "SWELL_EMBEDDED_BROKER", num_args = 0..=1, default_missing_value = "127.0.0.1:1883")]
    embedded_broker: Option<SocketAddr>,
    /// Also serve MQTT 3.1.1 on this address from the embedded broker.
    #[arg(long, env = "SWELL_EMBEDDED_BROKER_V4")]
    embedded_broker_v4: Option<SocketAddr>,
    /// Directory for the database and the epoch file.
    #[arg(long, env = "SWELL_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Fleet served.
    #[arg(long, env = "SWELL_FLEET")]
    fleet: Option<String>,
    /// Topic prefix.
    #[arg(long, env = "SWELL_TOPIC_PREFIX")]
    topic_prefix: Option<String>,
    /// Coordinator secret key file.
    #[arg(long, env = "SWELL_KEY")]
    key: Option<PathBuf>,
    /// Root-signed key list file.
    #[arg(long, env = "SWELL_KEY_LIST")]
    key_list: Option<PathBuf>,
    /// Root public key files (the trust anchor the key list is checked against).
    #[arg(long = "root-key", env = "SWELL_ROOT_KEYS", value_delimiter = ',')]
    root_keys: Vec<PathBuf>,
    /// Root signatures the key list needs.
    #[arg(long, env = "SWELL_ROOT_THRESHOLD")]
    root_threshold: Option<u8>,
    /// Enrollment tokens that approve a device on its first Hello.
    #[arg(
        long = "enrollment-token",
        env = "SWELL_ENROLLMENT_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    enrollment_tokens: Vec<String>,
    /// How often the signed beacon is published.
    #[arg(long, env = "SWELL_BEACON_INTERVAL")]
    beacon_interval: Option<String>,
    /// Manifest validity; manifests are re-signed at half of it.
    #[arg(long, env = "SWELL_MANIFEST_TTL")]
    manifest_ttl: Option<String>,
    /// How often rollouts are evaluated.
    #[arg(long, env = "SWELL_TICK")]
    tick: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "SWELL_LOG_FORMAT")]
    log_format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    broker: Option<String>,
    username: Option<String>,
    password: Option<String>,
    client_id: Option<String>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    embedded_broker: Option<SocketAddr>,
    embedded_broker_v4: Option<SocketAddr>,
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
    tick: Option<String>,
    log_format: Option<String>,
}

/// The merged, validated configuration.
struct Config {
    mqtt: MqttConfig,
    embedded: Option<(SocketAddr, Option<SocketAddr>)>,
    state_dir: PathBuf,
    settings: Settings,
    loop_cfg: LoopConfig,
    json_logs: bool,
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

fn load_key_list(
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

fn config(cli: Cli) -> Result<Config> {
    let file: FileConfig = match &cli.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("config file {}", p.display()))?
        }
        None => FileConfig::default(),
    };
    let embedded_addr = cli.embedded_broker.or(file.embedded_broker);
    let embedded = embedded_addr.map(|a| (a, cli.embedded_broker_v4.or(file.embedded_broker_v4)));
    let broker_url = match (cli.broker.or(file.broker), embedded_addr) {
        (Some(u), _) => u,
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
    let log_format = cli
        .log_format
        .or(file.log_format)
        .unwrap_or_else(|| "text".into());
    if log_format != "text" && log_format != "json" {
        bail!("--log-format must be text or json");
    }
    Ok(Config {
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
        },
        loop_cfg: LoopConfig {
            tick: dur("--tick", cli.tick.or(file.tick), "1s")?,
            beacon_interval,
        },
        json_logs: log_format == "json",
    })
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json { b.json().init() } else { b.init() }
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let cfg = config(Cli::parse())?;
    init_logs(cfg.json_logs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(cfg))
}

async fn run(mut cfg: Config) -> Result<()> {
    if let Some((v5, v4)) = cfg.embedded {
        broker::start(v5, v4).map_err(anyhow::Error::msg)?;
        tracing::info!(%v5, ?v4, "embedded broker listening");
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create {}", cfg.state_dir.display()))?;
    // A new epoch on every start fences messages of any earlier instance (ROLL-4).
    cfg.settings.epoch = durable::next_epoch(&cfg.state_dir.join("epoch")).context("epoch file")?;
    let store = Arc::new(SledStore::open(&cfg.state_dir.join("db")).context("database")?);
    let (engine, initial) = Engine::start(cfg.settings, store, unix_now())?;
    tracing::info!(epoch = engine.epoch(), "coordinator starting");
    let cancel = CancellationToken::new();
    let (ready_tx, _ready_rx) = tokio::sync::watch::channel(false);
    let stop = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("signal received");
        stop.cancel();
    });
    server::run(engine, initial, cfg.mqtt, cfg.loop_cfg, cancel, ready_tx).await?;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
