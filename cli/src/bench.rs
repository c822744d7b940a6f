//! `swell bench fleet`: how a full rollout scales, measured against the broker's
//! own limit in the same run (BENCHMARKS.md).
//!
//! One run: a broker (the embedded one, a Mosquitto started here with tuned
//! limits, or a URL), the coordinator as a child process (so its CPU and peak
//! RSS are its own), and N simulated devices running the real agent logic, each
//! signing its own Hello and Reports. It measures:
//! 1. a rollout (4 waves, zero bake): total and per-wave time, reports/s, the
//!    coordinator's CPU and peak RSS, bytes per device, and the coordinator's
//!    gate-to-manifest latency (from receiving the batch of reports that let a
//!    rollout move to publishing the new manifest);
//! 2. the broker's raw relay rate for the same number and size of messages,
//!    from the same number of connections to one plain subscriber;
//! 3. the ratio of (1)'s ingest rate to (2)'s relay rate.
//! 4. for both phases, the CPU each process spent per message (coordinator,
//!    broker, and this process: the fleet or the relay's clients) and how busy
//!    the machine was, so the ratio can be read against the cores all three
//!    share ([`bench_cpu`]).
//!
//! Nothing here asserts a time: tests run a small fleet to keep it working.

use crate::bench_cpu::{self, Roles, Spent, proc_usage};
use crate::demo::{DemoKeys, demo_keys};
use crate::ops_client::{OpsClient, answer};
use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{Value, json};
use std::io::{BufRead as _, Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use swell_agent::sim::{self, SimConfig};
use swell_coordinator::assemble::Coordinator;
use swell_coordinator::engine::Settings;
use swell_coordinator::metrics::Metrics;
use swell_coordinator::rollout::state::Decision;
use swell_coordinator::server::{Hooks, LoopConfig, unix_now};
use swell_coordinator::status::{EventKind, FleetSummary};
use swell_coordinator::store::{DEFAULT_CACHE_BYTES, cache_bytes_from_mib};
use swell_mqtt::{MqttConfig, parse_url};
use swell_protocol::cohort::Label;
use swell_protocol::messages::{Artifact, ArtifactKind, Release};
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::topics::Topics;
use swell_protocol::{DeviceId, Digest, FleetId, ReleaseId};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// A full rollout of N simulated devices against the broker's relay rate.
    Fleet(FleetArgs),
    /// (internal) The coordinator process of `bench fleet`.
    #[command(hide = true)]
    Coordinator(ChildArgs),
    /// (internal) The embedded broker in a process of its own, so `bench fleet`
    /// charges its CPU and memory to it.
    #[command(hide = true)]
    Broker(BrokerArgs),
}

#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Its credentials directory.
    #[arg(long)]
    dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct FleetArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// `embedded` (Swell's embedded broker, in a process of its own),
    /// `mosquitto` (Debian's mosquitto started here on a free port with raised
    /// queue limits, anonymous) or mqtt://host:port (anonymous).
    #[arg(long, default_value = "embedded")]
    broker: String,
    /// MQTT connections the devices share (default: one per 2,000, 2 to 64).
    #[arg(long)]
    connections: Option<usize>,
    /// Seed for keys (the same seed gives the same fleet).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Give up after this long.
    #[arg(long, default_value = "30m")]
    timeout: String,
    /// Threads the coordinator verifies device signatures on (0: one per core).
    #[arg(long, default_value_t = 0)]
    verify_threads: usize,
    /// The coordinator checks each signature alone (`--strict-signatures`),
    /// not in batches: the baseline of the batch check.
    #[arg(long)]
    strict_signatures: bool,
    /// Runs the coordinator process under this profiler command, split at
    /// spaces (e.g. `heaptrack -o /tmp/coord` or `perf record -g -o
    /// /tmp/coord.data --`). Figures taken under a profiler are not results.
    #[arg(long, value_name = "CMD")]
    wrap_coordinator: Option<String>,
    /// The coordinator's database page cache in MiB (its default: 16).
    #[arg(long)]
    db_cache_mib: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ChildArgs {
    #[arg(long)]
    host: String,
    #[arg(long)]
    port: u16,
    #[arg(long)]
    seed: u64,
    /// Where the coordinator writes its measurements when stdin closes.
    #[arg(long)]
    summary: PathBuf,
    #[arg(long, default_value_t = 0)]
    verify_threads: usize,
    #[arg(long)]
    strict_signatures: bool,
    #[arg(long)]
    db_cache_mib: Option<u64>,
    /// The broker's coordinator login (the embedded broker's).
    #[arg(long)]
    username: Option<String>,
    #[arg(long)]
    password_file: Option<PathBuf>,
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cmd {
        BenchCmd::Fleet(a) => rt.block_on(fleet(a)),
        BenchCmd::Coordinator(a) => rt.block_on(child(a)),
        BenchCmd::Broker(a) => broker_child(a),
    }
}

/// The embedded broker of `bench fleet --broker embedded`: prints `ready {pid}
/// {port}` and serves until stdin closes.
fn broker_child(a: BrokerArgs) -> Result<()> {
    let creds = swell_broker::Credentials::load_or_create(&a.dir)?;
    let b = swell_broker::EmbeddedBroker::start(swell_broker::BrokerConfig::new(
        "127.0.0.1:0".parse()?,
        creds,
        swell_broker::Rules::new(Topics::default().prefix(), Some(FLEET)),
    ))?;
    println!("ready {} {}", std::process::id(), b.addr().port());
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(b);
    Ok(())
}

/// A child process of the benchmark (the broker), killed on drop.
struct BrokerProc {
    child: std::process::Child,
    pid: u32,
    port: u16,
}

impl BrokerProc {
    fn start(dir: &std::path::Path) -> Result<BrokerProc> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["bench", "broker", "--dir"])
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the broker process")?;
        let out = child.stdout.take().context("broker stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line)?;
        let mut it = line.split_whitespace().skip(1);
        let (Some(pid), Some(port)) = (
            it.next().and_then(|p| p.parse().ok()),
            it.next().and_then(|p| p.parse().ok()),
        ) else {
            let _ = child.kill();
            bail!("the broker process did not start: {line:?}");
        };
        Ok(BrokerProc { child, pid, port })
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

const FLEET: &str = "bench";

/// The coordinator of the benchmark, in its own process.
async fn child(a: ChildArgs) -> Result<()> {
    let DemoKeys {
        coord,
        kl,
        signed_kl,
        ..
    } = demo_keys(a.seed)?;
    let state = tempfile::tempdir()?;
    let settings = Settings {
        fleet: FleetId::new(FLEET)?,
        topics: Topics::default(),
        key: coord,
        key_list: signed_kl,
        keys: kl,
        epoch: 0,
        enrollment_tokens: vec!["bench-token".into()],
        beacon_ttl: Duration::from_secs(30),
        manifest_ttl: Duration::from_secs(3_600),
    };
    let cache = match a.db_cache_mib {
        None => DEFAULT_CACHE_BYTES,
        Some(m) => cache_bytes_from_mib(m).context("--db-cache-mib must be above zero")?,
    };
    let cancel = CancellationToken::new();
    let (ready_tx, mut ready_rx) = tokio::sync::watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    let credentials = match (a.username, a.password_file) {
        (Some(u), Some(f)) => Some((u, std::fs::read_to_string(f)?.trim().to_string())),
        _ => None,
    };
    let mqtt = MqttConfig {
        host: a.host,
        port: a.port,
        client_id: format!("swell-coordinator-bench-{}", std::process::id()),
        credentials,
        keep_alive: Duration::from_secs(30),
        max_packet: 256 * 1024,
        // As in production: a million-Hello burst delays the broker's PINGRESP
        // past the keep-alive, and a clean session would lose the queue on the
        // reconnect (the 1,000,000-device run stalled at 663,803 enrolled).
        persistent: true,
        tls: None,
    };
    // Devices commit after their probation *and* a fresh coordinator message
    // (INST-2): the beacon interval bounds each wave from below.
    let mut coordinator = Coordinator::new(settings, state.path().to_path_buf(), mqtt);
    coordinator.db_cache_bytes = cache;
    coordinator.loop_cfg = LoopConfig {
        tick: Duration::from_millis(200),
        beacon_interval: Duration::from_secs(1),
        verify_threads: a.verify_threads,
        batch_signatures: !a.strict_signatures,
        ..LoopConfig::default()
    };
    let hooks = Hooks {
        metrics: Some(metrics.clone()),
        ..Hooks::default()
    };
    let started = coordinator.start(None)?;
    let loop_task = tokio::spawn(started.serve(cancel.clone(), ready_tx, hooks));
    tokio::time::timeout(Duration::from_secs(30), ready_rx.wait_for(|r| *r))
        .await
        .context("coordinator could not connect")??;
    // Its own pid: a profiler wrapping it (`--wrap-coordinator`) may be the
    // parent's child instead, and its CPU is charged to this process.
    println!("ready {}", std::process::id());
    std::io::stdout().flush()?;
    // The parent closes our stdin when it is done with us.
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await?;
    let (cpu, hwm) = proc_usage("self");
    cancel.cancel();
    let _ = loop_task.await;
    let summary = json!({
        "cpu_seconds": cpu,
        "peak_rss_kib": hwm,
        "gate_to_manifest_seconds": metrics.gate_samples(),
    });
    std::fs::write(&a.summary, serde_json::to_vec(&summary)?)?;
    Ok(())
}

fn release(counter: u64, keys: &DemoKeys) -> Result<ThresholdSigned> {
    let body = Release {
        counter,
        version: format!("{counter}.0.0"),
        created_at: unix_now(),
        // Devices simulate the download (fetch_concurrency 0): the benchmark
        // measures the control plane, not an artifact server.
        artifacts: vec![Artifact {
            name: "app.tar".into(),
            kind: ArtifactKind::Bundle,
            digest: Digest::sha256(b"bench"),
            length: 5,
            urls: vec!["https://artifacts.example/app.tar".into()],
        }],
        config: None,
        hardware: vec!["rpi4".into()],
        exposure: None,
        rollback: None,
    };
    let mut r = ThresholdSigned::new(&body)?;
    r.sign(&keys.rel_a)?;
    r.sign(&keys.rel_b)?;
    Ok(r)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct ChildProc {
    child: std::process::Child,
    /// The coordinator's own process (under a wrapper, not `child`).
    pid: u32,
    summary: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChildProc {
    fn start(host: &str, port: u16, a: &FleetArgs, logins: &Logins) -> Result<ChildProc> {
        let dir = tempfile::tempdir()?;
        let summary = dir.path().join("summary.json");
        let exe = std::env::current_exe()?;
        let mut wrap = a
            .wrap_coordinator
            .as_deref()
            .unwrap_or("")
            .split_whitespace();
        let mut cmd = match wrap.next() {
            Some(profiler) => {
                let mut c = Command::new(profiler);
                c.args(wrap).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.args(["bench", "coordinator", "--host", host, "--port"])
            .arg(port.to_string())
            .args(["--seed", &a.seed.to_string(), "--verify-threads"])
            .arg(a.verify_threads.to_string());
        if a.strict_signatures {
            cmd.arg("--strict-signatures");
        }
        if let Some(m) = a.db_cache_mib {
            cmd.arg("--db-cache-mib").arg(m.to_string());
        }
        if let Some((user, password)) = &logins.coordinator {
            let file = dir.path().join("coordinator.password");
            std::fs::write(&file, password)?;
            cmd.args(["--username", user, "--password-file"]).arg(&file);
        }
        let mut child = cmd
            .arg("--summary")
            .arg(&summary)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the coordinator process")?;
        let out = child.stdout.take().context("child stdout")?;
        // A profiler wrapping the process may print its own lines first.
        let mut out = std::io::BufReader::new(out);
        let mut line = String::new();
        let mut pid = None;
        for _ in 0..64 {
            line.clear();
            if out.read_line(&mut line)? == 0 {
                break;
            }
            pid = line
                .trim()
                .strip_prefix("ready ")
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some() {
                break;
            }
        }
        let Some(pid) = pid else {
            let _ = child.kill();
            bail!("the coordinator process did not start");
        };
        // Whatever a profiler prints later goes on to our stderr; a closed pipe
        // would kill it before it writes its data.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::stderr()));
        Ok(ChildProc {
            child,
            pid,
            summary,
            _dir: dir,
        })
    }

    /// Closes its stdin, waits for it, reads its measurements.
    fn finish(mut self) -> Result<Value> {
        drop(self.child.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the coordinator process failed: {status}");
        }
        Ok(serde_json::from_slice(&std::fs::read(&self.summary)?)?)
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The broker's logins for the benchmark's clients (none: anonymous).
#[derive(Debug, Default)]
struct Logins {
    coordinator: Option<(String, String)>,
    operator: Option<(String, String)>,
    gateway: Option<(String, String)>,
}

/// The broker's raw relay: `count` QoS 1 messages of `size` bytes from
/// `connections` publishers (gateways, on device report topics) to one plain
/// subscriber (the coordinator's user). Messages per second.
#[allow(clippy::too_many_arguments)]
async fn relay_rate(
    host: &str,
    port: u16,
    connections: usize,
    count: u64,
    size: usize,
    topic_len: usize,
    roles: &Roles,
    logins: &Logins,
) -> Result<(f64, Spent)> {
    let received = Arc::new(AtomicU64::new(0));
    let mut opts = MqttOptions::new(
        format!("swell-coordinator-bench-relay-{}", std::process::id()),
        host,
        port,
    );
    if let Some((u, p)) = &logins.coordinator {
        opts.set_credentials(u.clone(), p.clone());
    }
    opts.set_max_packet_size(Some(1 << 20));
    opts.set_keep_alive(Duration::from_secs(60));
    let (sub, mut el) = AsyncClient::new(opts, 1_000);
    let (up_tx, up_rx) = tokio::sync::oneshot::channel();
    let mut up_tx = Some(up_tx);
    let r = received.clone();
    let sub_task = tokio::spawn(async move {
        let _keep = sub.clone();
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = up_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = sub.try_subscribe("swell/v1/dev/+/report", QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    r.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), up_rx)
        .await
        .context("relay subscriber")??;
    // Topics as long as the devices' report topics.
    let pad = topic_len
        .saturating_sub("swell/v1/dev/relay-/report".len() + 5)
        .max(1);
    let payload = vec![0x5a; size];
    let from = roles.mark();
    let mut pubs = Vec::new();
    for c in 0..connections {
        let share = count / connections as u64 + u64::from((c as u64) < count % connections as u64);
        let mut opts = MqttOptions::new(
            format!("swell-gw-bench-relay-{c}-{}", std::process::id()),
            host,
            port,
        );
        if let Some((u, p)) = &logins.gateway {
            opts.set_credentials(u.clone(), p.clone());
        }
        opts.set_max_packet_size(Some(1 << 20));
        opts.set_keep_alive(Duration::from_secs(60));
        let (client, mut el) = AsyncClient::new(opts, 10_000);
        let topic = format!("swell/v1/dev/relay-{c:05}{}/report", "p".repeat(pad));
        let payload = payload.clone();
        pubs.push(tokio::spawn(async move {
            let poller = tokio::spawn(async move {
                loop {
                    if el.poll().await.is_err() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            });
            for _ in 0..share {
                if client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                    .await
                    .is_err()
                {
                    break;
                }
            }
            (client, poller)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while received.load(Ordering::Relaxed) < count {
        if Instant::now() > deadline {
            bail!(
                "relay baseline: {} of {count} messages arrived within 600 s",
                received.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let spent = Spent::between(roles, &from, &roles.mark(), count);
    for p in pubs {
        if let Ok((client, poller)) = p.await {
            let _ = client.disconnect().await;
            poller.abort();
        }
    }
    sub_task.abort();
    Ok((count as f64 / spent.seconds, spent))
}

async fn fleet(a: FleetArgs) -> Result<()> {
    if a.devices < 100 {
        bail!("--devices must be at least 100");
    }
    let limit = humantime::parse_duration(&a.timeout).context("--timeout")?;
    let keys = demo_keys(a.seed)?;
    let mut mosquitto = None;
    let mut embedded = None;
    let broker_dir = tempfile::tempdir()?;
    let mut logins = Logins::default();
    let (host, port, broker_name) = match a.broker.as_str() {
        "embedded" => {
            let creds = swell_broker::Credentials::load_or_create(broker_dir.path())?;
            let login = |role: swell_broker::Role, user: &str| {
                creds
                    .password(role)
                    .map(|p| (user.to_string(), p.to_string()))
            };
            logins = Logins {
                coordinator: login(swell_broker::Role::Coordinator, "coordinator"),
                operator: login(swell_broker::Role::Operator, "operator"),
                gateway: login(swell_broker::Role::Gateway, "gateway"),
            };
            let b = BrokerProc::start(broker_dir.path())?;
            let port = b.port;
            embedded = Some(b);
            (
                "127.0.0.1".to_string(),
                port,
                "embedded (rmqtt with Swell's checks, own process)".to_string(),
            )
        }
        "mosquitto" => {
            let m = swell_e2e::mosquitto::Mosquitto::start_relaxed()
                .map_err(|e| anyhow::anyhow!("mosquitto: {e:?}"))?;
            let port = m.port();
            mosquitto = Some(m);
            (
                "127.0.0.1".to_string(),
                port,
                "mosquitto (tuned limits)".to_string(),
            )
        }
        url => {
            let u = parse_url(url)?;
            if u.tls {
                bail!("the benchmark connects without TLS");
            }
            (u.host, u.port, url.to_string())
        }
    };
    let connections = a
        .connections
        .unwrap_or(a.devices.div_ceil(2_000))
        .clamp(2, 64);
    let say = |m: String| {
        if !a.json {
            println!("{m}");
        }
    };
    let signature_check = if a.strict_signatures {
        "one by one"
    } else {
        "batch"
    };
    say(format!(
        "swell bench fleet: {} devices on {connections} connections, broker {broker_name} at {host}:{port}, QoS 1, signatures checked: {signature_check}",
        a.devices,
    ));
    let coordinator = ChildProc::start(&host, port, &a, &logins)?;
    let coordinator_pid = coordinator.pid.to_string();
    let broker_pid = mosquitto
        .as_ref()
        .map(|m| m.pid())
        .or(embedded.as_ref().map(|b| b.pid));
    let roles = Roles {
        coordinator: Some(coordinator_pid.clone()),
        broker: broker_pid.map(|p| p.to_string()),
        clients: "self".into(),
    };
    let v2 = release(2, &keys)?;
    let sim_cfg = SimConfig {
        host: host.clone(),
        port,
        fleet: FleetId::new(FLEET)?,
        topics: Topics::default(),
        keys: keys.kl.clone(),
        devices: a.devices,
        connections,
        prefix: "dev-".into(),
        seed: a.seed,
        enrollment_token: "bench-token".into(),
        labels: Arc::new(|_| {
            vec![Label {
                key: "hw".into(),
                value: "rpi4".into(),
            }]
        }),
        hardware: "rpi4".into(),
        outcome: Arc::new(|_: &DeviceId, _: &ReleaseId| true),
        initial: None,
        probation: Duration::ZERO,
        work: Duration::ZERO,
        fetch_concurrency: 0,
        credentials: logins.gateway.clone(),
    };
    // The operator connects first: during a million-device Hello burst the
    // broker may not accept a new connection in time.
    let mut ops = OpsClient::connect(
        &MqttConfig {
            host: host.clone(),
            port,
            client_id: format!("swell-bench-operator-{}", std::process::id()),
            credentials: logins.operator.clone(),
            keep_alive: Duration::from_secs(30),
            max_packet: 1 << 20,
            persistent: false,
            tls: None,
        },
        Topics::default(),
    )
    .await?;
    let t0 = Instant::now();
    let fleet_sim = sim::start(sim_cfg).await.map_err(anyhow::Error::msg)?;
    let deadline = Instant::now() + limit;
    loop {
        // During a large Hello burst the coordinator's replies wait behind its
        // acks (BENCHMARKS.md): a late reply is not a failure here.
        let approved = match ops
            .command(json!({"op": "fleet"}), Duration::from_secs(30))
            .await
        {
            Ok(f) => answer::<FleetSummary>(&f).map_or(0, |f| f.approved),
            Err(_) => 0,
        };
        if approved == a.devices as u64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {approved} of {} devices enrolled", a.devices);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let enrolled_in = t0.elapsed();
    let stats = fleet_sim.stats.clone();
    let hellos = stats.hellos.load(Ordering::Relaxed);
    say(format!(
        "enrollment: {} devices approved in {:.1} s ({:.0}/s); {hellos} signed Hellos sent so far",
        a.devices,
        enrolled_in.as_secs_f64(),
        a.devices as f64 / enrolled_in.as_secs_f64()
    ));
    let reports0 = stats.reports.load(Ordering::Relaxed);
    let bytes0 = stats.bytes_sent.load(Ordering::Relaxed);
    let waves = ["1%", "10%", "50%", "100%"];
    let create = json!({"op": "create", "spec": {
        "rollout": "bench", "release": hex::encode(v2.encode()?), "selector": "hw=rpi4",
        "waves": waves, "min_devices": 1, "success_threshold": "99%",
        "max_failure_rate": "1%", "bake": "0s", "install_timeout": "30m", "policy": "pause"}});
    let started = Instant::now();
    let rollout_from = roles.mark();
    let r = ops.command(create, Duration::from_secs(30)).await?;
    if !r.ok {
        bail!("create refused: {}", r.message);
    }
    // Wave openings as the operator sees them (event arrival).
    let mut opened: Vec<(u64, Duration)> = Vec::new();
    let mut seen = 0;
    let finished = loop {
        for e in &ops.events[seen..] {
            if let EventKind::Decision(Decision::OpenWave { wave, .. }) = e.what
                && e.rollout == "bench"
            {
                opened.push((u64::from(wave), started.elapsed()));
            }
        }
        seen = ops.events.len();
        if let Some(s) = ops.statuses.get("bench") {
            match s.phase.as_str() {
                "completed" => break started.elapsed(),
                p @ ("paused" | "aborted" | "rolled_back") => {
                    bail!(
                        "the benchmark rollout stopped: {p} ({})",
                        s.halt_reason.as_deref().unwrap_or("")
                    )
                }
                _ => {}
            }
        }
        if !ops.next(tokio::time::Instant::from_std(deadline)).await {
            bail!("the rollout did not complete within {}", a.timeout);
        }
    };
    // Reports still in flight when the status said completed are few; count what was sent.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reports = stats.reports.load(Ordering::Relaxed) - reports0;
    let payload = stats.bytes_sent.load(Ordering::Relaxed) - bytes0;
    let rollout_cpu = Spent::between(&roles, &rollout_from, &roles.mark(), reports);
    let (cpu_now, _) = proc_usage(&coordinator_pid);
    let summary = coordinator.finish()?;
    fleet_sim.stop().await;
    drop(ops);
    let ingest = reports as f64 / finished.as_secs_f64();
    let size = (payload / reports.max(1)) as usize;
    let topic_len = Topics::default().report(&DeviceId::new("dev-00000")?).len();
    say(format!(
        "rollout: {reports} signed reports ingested and gated in {:.2} s ({ingest:.0} reports/s)",
        finished.as_secs_f64()
    ));
    let relay_roles = Roles {
        coordinator: None,
        ..roles.clone()
    };
    let (relay, relay_cpu) = relay_rate(
        &host,
        port,
        connections,
        reports,
        size,
        topic_len,
        &relay_roles,
        &logins,
    )
    .await?;
    // The broker's peak resident memory over the whole run (enrollment,
    // rollout and relay).
    let broker_rss_kib = broker_pid.map(|p| proc_usage(&p.to_string()).1);
    drop(mosquitto);
    drop(embedded);
    // The cores this process (the fleet) and its children (the broker, and the
    // coordinator unless `--wrap-coordinator` pins it elsewhere) may run on.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let ceiling = bench_cpu::rate_without_coordinator(&rollout_cpu, cores);
    let budget = bench_cpu::coordinator_budget_us(&rollout_cpu, cores, 0.8, relay);
    let mut lat: Vec<f64> = summary["gate_to_manifest_seconds"]
        .as_array()
        .map(|v| v.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    lat.sort_by(f64::total_cmp);
    let cpu = summary["cpu_seconds"].as_f64().unwrap_or(cpu_now);
    let rss_kib = summary["peak_rss_kib"].as_u64().unwrap_or(0);
    // Wire bytes: payload, topic, fixed header and packet id, and the PUBACK.
    let wire = payload + reports * (topic_len as u64 + 2 + 2 + 2 + 1 + 4);
    let mut per_wave = Vec::new();
    for (i, (w, at)) in opened.iter().enumerate() {
        let end = opened.get(i + 1).map_or(finished, |(_, t)| *t);
        per_wave.push(
            json!({"wave": w, "label": waves.get(*w as usize).copied().unwrap_or("?"),
            "seconds": (end - *at).as_secs_f64()}),
        );
    }
    let result = json!({
        "devices": a.devices,
        "connections": connections,
        "broker": broker_name,
        "signature_check": signature_check,
        "enrollment_seconds": enrolled_in.as_secs_f64(),
        "hellos_sent_by_enrollment": hellos,
        "hellos_sent_in_all": stats.hellos.load(Ordering::Relaxed),
        "rollout_seconds": finished.as_secs_f64(),
        "waves": per_wave,
        "reports": reports,
        "ingest_reports_per_second": ingest,
        "relay_messages_per_second": relay,
        "broker_peak_rss_kib": broker_rss_kib,
        "relay_seconds": relay_cpu.seconds,
        "message_bytes": size,
        "ratio": ingest / relay,
        "coordinator_cpu_seconds": cpu,
        "coordinator_cpu_share_of_one_core": cpu / (enrolled_in + finished).as_secs_f64(),
        "coordinator_peak_rss_kib": rss_kib,
        "coordinator_bytes_per_device": rss_kib * 1024 / a.devices as u64,
        "payload_bytes_per_device": payload / a.devices as u64,
        "wire_bytes_per_device": wire / a.devices as u64,
        "cpu": {
            "cores": cores,
            "rollout": rollout_cpu.to_json(),
            "relay": relay_cpu.to_json(),
            "ingest_without_coordinator_cost": ceiling,
            "ratio_without_coordinator_cost": ceiling.map(|c| c / relay),
            "coordinator_us_per_report_for_ratio_0_8": budget,
        },
        "gate_to_manifest_ms": {
            "samples": lat.len(),
            "p50": percentile(&lat, 0.5) * 1e3,
            "p99": percentile(&lat, 0.99) * 1e3,
            "max": lat.last().copied().unwrap_or(0.0) * 1e3,
        },
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    for w in &per_wave {
        println!(
            "  wave {:<5} {:>7.2} s",
            w["label"].as_str().unwrap_or(""),
            w["seconds"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "broker relay baseline: {reports} messages of {size} B in {:.2} s ({relay:.0} msg/s)",
        relay_cpu.seconds
    );
    println!("ratio ingest / relay: {:.2}", ingest / relay);
    if let Some(kib) = broker_rss_kib {
        println!(
            "broker: peak RSS {:.1} MiB over enrollment, rollout and relay",
            kib as f64 / 1024.0
        );
    }
    println!(
        "coordinator: {cpu:.1} CPU s over enrollment + rollout ({:.0}% of one core), peak RSS {:.1} MiB ({} B per device)",
        100.0
            * result["coordinator_cpu_share_of_one_core"]
                .as_f64()
                .unwrap_or(0.0),
        rss_kib as f64 / 1024.0,
        result["coordinator_bytes_per_device"]
    );
    let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    for (phase, spent) in [("rollout", &rollout_cpu), ("relay", &relay_cpu)] {
        println!(
            "CPU per message, {phase}: coordinator {} µs, broker {} µs, clients {:.1} µs, all {:.1} µs; machine busy {:.2} cores (stolen {:.2})",
            us(spent.coordinator_us),
            us(spent.broker_us),
            spent.clients_us,
            spent.total_us(),
            spent.machine_busy_cores,
            spent.machine_steal_cores,
        );
    }
    if let (Some(c), Some(b)) = (ceiling, budget) {
        println!(
            "with a coordinator that cost nothing, broker + fleet on the {cores} cores this benchmark may use would reach {c:.0} reports/s (ratio {:.2}); ratio 0.8 leaves the coordinator {b:.1} µs per report on them",
            c / relay
        );
    }
    println!(
        "on the wire per device during the rollout: {} B of signed reports ({} B with MQTT framing and acks)",
        result["payload_bytes_per_device"], result["wire_bytes_per_device"]
    );
    println!(
        "gate to manifest (coordinator): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} wave moves",
        percentile(&lat, 0.5) * 1e3,
        percentile(&lat, 0.99) * 1e3,
        lat.last().copied().unwrap_or(0.0) * 1e3,
        lat.len()
    );
    Ok(())
}
