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
use swell_coordinator::assemble::Coordinator;
use swell_coordinator::engine::Settings;
use swell_coordinator::http;
use swell_coordinator::keyfile::{self, Role};
use swell_coordinator::metrics::Metrics;
use swell_coordinator::server::{Hooks, LoopConfig, unix_now};
use swell_mqtt::{MqttConfig, TlsPem, parse_url};
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
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
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
    /// Start an in-process MQTT broker (3.1.1 and 5) on this address and use it;
    /// its credentials are generated into {state-dir}/broker (see the
    /// `broker-password` command). Loopback unless told otherwise.
    #[arg(long, env = "SWELL_EMBEDDED_BROKER", num_args = 0..=1, default_missing_value = "127.0.0.1:1883")]
    embedded_broker: Option<SocketAddr>,
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
    /// Threads that verify device signatures (default: one per core).
    #[arg(long, env = "SWELL_VERIFY_THREADS")]
    verify_threads: Option<usize>,
    /// The database's page cache in MiB (default 16). It holds rollouts and
    /// their decision logs; device and report records live in journal files
    /// beside it, so a larger one buys nothing (BENCHMARKS.md, tenth round).
    #[arg(long, env = "SWELL_DB_CACHE_MIB")]
    db_cache_mib: Option<u64>,
    /// Check each device signature alone with `verify_strict` instead of in
    /// batches: about half the ingest rate; the two differ only on signatures
    /// their own signer made malleable (docs/architecture.md).
    #[arg(long, env = "SWELL_STRICT_SIGNATURES")]
    strict_signatures: bool,
    /// Log format: text or json.
    #[arg(long, env = "SWELL_LOG_FORMAT")]
    log_format: Option<String>,
    /// Address of the HTTP port: /metrics, /healthz, /readyz. Default: off, or
    /// 0.0.0.0:9090 in Kubernetes mode.
    #[arg(long, env = "SWELL_HTTP_ADDR")]
    http_addr: Option<String>,
    /// Kubernetes mode: Rollout resources are the source of truth and a Lease
    /// elects one active replica (needs the in-cluster service account).
    #[arg(long, env = "SWELL_KUBERNETES")]
    kubernetes: bool,
    /// Namespace of the Rollout resources and the Lease.
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// Name of the leader Lease (default swell-coordinator-<fleet>).
    #[arg(long, env = "SWELL_LEASE_NAME")]
    lease_name: Option<String>,
    /// This replica's identity in the Lease (default: the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Print the Rollout CustomResourceDefinition (YAML) generated from the code.
    Crd,
    /// Print a password of the embedded broker (made on first use):
    /// `operator` (for `swell --username operator --password-file`),
    /// `gateway`, `coordinator`, or `device ID` (the agent's `mqtt.password_file`).
    BrokerPassword {
        /// The coordinator's state directory.
        #[arg(long, env = "SWELL_STATE_DIR")]
        state_dir: PathBuf,
        /// operator, gateway, coordinator or device.
        who: String,
        /// The device id (with `device`).
        device: Option<String>,
    },
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
struct KubeConfig {
    namespace: String,
    lease_name: String,
    identity: String,
}

/// The merged, validated configuration.
struct Config {
    mqtt: MqttConfig,
    embedded: Option<SocketAddr>,
    state_dir: PathBuf,
    db_cache_bytes: u64,
    settings: Settings,
    loop_cfg: LoopConfig,
    json_logs: bool,
    http_addr: Option<SocketAddr>,
    kube: Option<KubeConfig>,
}

impl Config {
    /// The coordinator as configured.
    fn coordinator(self) -> Coordinator {
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
        },
        loop_cfg: LoopConfig {
            tick: dur("--tick", cli.tick.or(file.tick), "1s")?,
            beacon_interval,
            verify_threads: cli.verify_threads.or(file.verify_threads).unwrap_or(0),
            batch_signatures: !(cli.strict_signatures || file.strict_signatures.unwrap_or(false)),
            ..LoopConfig::default()
        },
        json_logs: log_format == "json",
    })
}

fn init_logs(json: bool) {
    // rmqtt (the embedded broker) reports every client that goes away.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rmqtt=warn,rmqtt_net=warn"));
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
    let cli = Cli::parse();
    match &cli.cmd {
        Some(Cmd::Crd) => return print_crd(),
        Some(Cmd::BrokerPassword {
            state_dir,
            who,
            device,
        }) => return print_broker_password(state_dir, who, device.as_deref()),
        None => {}
    }
    let cfg = config(cli)?;
    init_logs(cfg.json_logs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(cfg))
}

fn print_broker_password(state_dir: &Path, who: &str, device: Option<&str>) -> Result<()> {
    let creds = swell_broker::Credentials::load_or_create(&state_dir.join("broker"))?;
    let role = match who {
        "operator" => swell_broker::Role::Operator,
        "gateway" => swell_broker::Role::Gateway,
        "coordinator" => swell_broker::Role::Coordinator,
        "device" => {
            let id = device.context("device: which device id?")?;
            let id = swell_protocol::DeviceId::new(id).context("device id")?;
            println!("{}", creds.device_password(id.as_str()));
            return Ok(());
        }
        other => bail!("{other:?}: say operator, gateway, coordinator or device ID"),
    };
    println!("{}", creds.password(role).unwrap_or_default());
    Ok(())
}

#[cfg(feature = "kube")]
fn print_crd() -> Result<()> {
    print!("{}", swell_coordinator::k8s::crd::crd_yaml()?);
    Ok(())
}

#[cfg(not(feature = "kube"))]
fn print_crd() -> Result<()> {
    bail!("built without the `kube` feature")
}

async fn run(mut cfg: Config) -> Result<()> {
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("signal received");
        stop.cancel();
    });
    let metrics = Arc::new(Metrics::new());
    if let Some(addr) = cfg.http_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--http-addr)"))?;
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
        tokio::spawn(http::serve(listener, metrics.clone(), cancel.clone()));
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create {}", cfg.state_dir.display()))?;
    // Kept for as long as the coordinator runs: dropping it stops the broker.
    let _broker = match cfg.embedded {
        Some(addr) => Some(start_embedded(&mut cfg, addr, &metrics)?),
        None => None,
    };
    if let Some(k) = cfg.kube.take() {
        return run_kubernetes(cfg, k, metrics, cancel).await;
    }
    // A new epoch on every start fences messages of any earlier instance (ROLL-4).
    let started = cfg.coordinator().start(None)?;
    tracing::info!(epoch = started.epoch(), "coordinator starting");
    let (ready_tx, _ready_rx) = tokio::sync::watch::channel(false);
    let hooks = Hooks {
        metrics: Some(metrics),
        ..Hooks::default()
    };
    started.serve(cancel, ready_tx, hooks).await?;
    Ok(())
}

/// Starts the embedded broker; the coordinator connects to it with its own
/// credentials. Fails, and with it the process, when the address is taken.
fn start_embedded(
    cfg: &mut Config,
    addr: SocketAddr,
    metrics: &Arc<Metrics>,
) -> Result<swell_broker::EmbeddedBroker> {
    let dir = cfg.state_dir.join("broker");
    let creds =
        swell_broker::Credentials::load_or_create(&dir).context("embedded broker credentials")?;
    let rules = swell_broker::Rules::new(
        cfg.settings.topics.prefix(),
        Some(cfg.settings.fleet.as_str()),
    );
    let broker =
        swell_broker::EmbeddedBroker::start(swell_broker::BrokerConfig::new(addr, creds, rules))?;
    let bound = broker.addr();
    // A wildcard address listens everywhere; the coordinator itself goes over loopback.
    cfg.mqtt.host = if bound.ip().is_unspecified() {
        if bound.is_ipv6() {
            "::1".into()
        } else {
            "127.0.0.1".into()
        }
    } else {
        bound.ip().to_string()
    };
    cfg.mqtt.port = bound.port();
    cfg.mqtt.credentials = broker.login(swell_broker::Role::Coordinator);
    metrics.watch_broker(broker.stats().clone());
    tracing::info!(addr = %bound, credentials = %dir.display(), "embedded broker listening (MQTT 3.1.1 and 5)");
    Ok(broker)
}

#[cfg(not(feature = "kube"))]
async fn run_kubernetes(
    _cfg: Config,
    _k: KubeConfig,
    _metrics: Arc<Metrics>,
    _cancel: CancellationToken,
) -> Result<()> {
    bail!("--kubernetes: this build has no `kube` feature")
}

/// Standby until the Lease is ours, then the engine with the controller.
#[cfg(feature = "kube")]
async fn run_kubernetes(
    cfg: Config,
    k: KubeConfig,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    use swell_coordinator::k8s::{self, controller::EngineHandle, lease};
    let client = kube::Client::try_default()
        .await
        .context("Kubernetes client (in-cluster service account)")?;
    let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), &k.namespace);
    let elector = lease::Elector::new(leases, lease::LeaseConfig::new(&k.lease_name, &k.identity));
    // A standby keeps a plain broker session so readiness says whether it could
    // take over now.
    let standby_stop = cancel.child_token();
    let mut standby_mqtt = cfg.mqtt.clone();
    standby_mqtt.client_id = format!("{}-standby-{}", cfg.mqtt.client_id, k.identity);
    standby_mqtt.persistent = false;
    let standby = swell_mqtt::spawn(standby_mqtt, vec![], None, standby_stop.clone());
    let mirror = metrics.clone();
    let mut up = standby.connected.clone();
    tokio::spawn(async move {
        while up.changed().await.is_ok() {
            mirror.set_connected(*up.borrow());
        }
    });
    metrics.set_lease(swell_coordinator::metrics::LeaseState::Waiting);
    let Some(term) = elector.acquire(&metrics, &cancel).await else {
        return Ok(());
    };
    standby_stop.cancel();
    drop(standby);
    metrics.set_connected(false);
    // The state directory is opened only now: the previous leader has let go.
    let started = cfg.coordinator().start(Some(term))?;
    tracing::info!(epoch = started.epoch(), term, identity = %k.identity, "leading: coordinator starting");
    let (control_tx, control_rx) = tokio::sync::mpsc::channel(256);
    let (forward_tx, forward_rx) = tokio::sync::mpsc::channel(256);
    let (events_tx, events_rx) = tokio::sync::broadcast::channel(1024);
    let (leading_tx, leading_rx) = tokio::sync::watch::channel(true);
    let keeper_stop = cancel.child_token();
    tokio::spawn(
        elector
            .clone()
            .keep(leading_tx, metrics.clone(), keeper_stop.clone()),
    );
    let handle = EngineHandle::new(control_tx);
    tokio::spawn(k8s::run(
        client,
        k.namespace.clone(),
        k.identity.clone(),
        handle,
        events_rx,
        forward_rx,
        cancel.child_token(),
    ));
    let (ready_tx, _ready_rx) = tokio::sync::watch::channel(false);
    let hooks = Hooks {
        control: Some(control_rx),
        forward: Some(forward_tx),
        events: Some(events_tx),
        metrics: Some(metrics),
        leading: Some(leading_rx),
    };
    let result = started.serve(cancel, ready_tx, hooks).await;
    keeper_stop.cancel();
    match result {
        Err(swell_coordinator::engine::EngineError::Deposed) => {
            // Exit non-zero: Kubernetes restarts this pod, which comes back as a standby.
            bail!("deposed: another replica took the leader lease")
        }
        other => {
            if let Err(e) = elector.release().await {
                tracing::warn!(error = %e, "lease not released; the standby waits for it to expire");
            }
            other?;
            Ok(())
        }
    }
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
