//! `swell-coordinator`: runs rollouts over MQTT.
//!
//! Every flag can also be set by environment (`SWELL_…`) or in a TOML file
//! (`--config`, keys named like the long flags with `_`); flags beat environment
//! beats file. Durations are humantime (`30s`, `5m`).

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use swell_coordinator::http;
use swell_coordinator::metrics::Metrics;
use swell_coordinator::server::Hooks;
use tokio_util::sync::CancellationToken;

mod config;

use config::{Config, KubeConfig, config};

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
    /// A device pending approval that has said nothing for this long is
    /// removed (ENROLL-4); it may say Hello again.
    #[arg(long, env = "SWELL_PENDING_EXPIRY")]
    pending_expiry: Option<String>,
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
    /// Testing hook: abort like a power cut in the first batch with a device
    /// report, after applying it (`apply`) or after its flush (`flush`),
    /// before any ack (the MQTT-4 tests).
    #[arg(long, env = "SWELL_COORDINATOR_CRASH_AT", hide = true, value_parser = ["apply", "flush"])]
    crash_at: Option<String>,
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
