//! `swell demo`: a real rollout end to end in one process — an MQTT broker
//! (embedded rumqttd, or `--broker`), the coordinator, and a simulated fleet
//! running the real agent logic with a simulated installer. It rolls v1 → v2
//! through a canary and three waves, then a bad v3 that breaches the health gate
//! and rolls back, and prints what happened.
//!
//! The keys are derived from `--seed` and printed as demo keys: never use them for
//! a real fleet.

use crate::ops_client::{OpsClient, answer};
use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};
use swell_agent::sim::{self, SimConfig};
use swell_coordinator::assemble::Coordinator;
use swell_coordinator::engine::Settings;
use swell_coordinator::rollout::state::Decision;
use swell_coordinator::server::{Hooks, LoopConfig, unix_now};
use swell_coordinator::status::{EventKind, FleetSummary, RolloutStatus};
use swell_mqtt::{MqttConfig, parse_url};
use swell_protocol::cohort::Label;
use swell_protocol::messages::{Artifact, ArtifactKind, KeyList, Release};
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::topics::Topics;
use swell_protocol::{DeviceId, Digest, FleetId, ReleaseId, SecretKey};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 200)]
    devices: usize,
    /// Share of devices whose probes fail on the bad release v3.
    #[arg(long, default_value_t = 0.3)]
    bad_fraction: f64,
    /// Use this broker (mqtt://host:port) instead of the embedded one.
    #[arg(long)]
    broker: Option<String>,
    /// Seed for keys and device behaviour: the same seed gives the same run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// MQTT connections the simulated devices share (default: one per 500 devices).
    #[arg(long)]
    connections: Option<usize>,
    /// Bake time of each wave.
    #[arg(long, default_value = "2s")]
    bake: String,
    /// No live view; only the summary.
    #[arg(long)]
    quiet: bool,
}

/// Cancels the in-process coordinator when dropped (also on early errors).
struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

fn demo_key(seed: u64, name: &str) -> SecretKey {
    let mut h = Sha256::new();
    h.update(format!("swell demo key/{seed}/{name}").as_bytes());
    SecretKey::from_seed(&h.finalize().into())
}

/// The demo's artifact bytes for `version`.
fn content(version: &str) -> Vec<u8> {
    format!("demo app {version}\n").repeat(64).into_bytes()
}

fn release(
    counter: u64,
    version: &str,
    keys: &[&SecretKey],
    files: &swell_e2e::http::FileServer,
) -> Result<ThresholdSigned> {
    let content = content(version);
    let url = files.put(&format!("app-{version}.tar"), content.clone());
    let body = Release {
        counter,
        version: version.into(),
        created_at: unix_now(),
        artifacts: vec![Artifact {
            name: "app.tar".into(),
            kind: ArtifactKind::Bundle,
            digest: Digest::sha256(&content),
            length: content.len() as u64,
            urls: vec![url],
        }],
        config: None,
        hardware: vec!["rpi4".into()],
        exposure: None,
        rollback: None,
    };
    let mut r = ThresholdSigned::new(&body)?;
    for k in keys {
        r.sign(k)?;
    }
    Ok(r)
}

/// Deterministic per-device draw in [0, 1).
fn draw(seed: u64, device: &DeviceId) -> f64 {
    let mut h = Sha256::new();
    h.update(seed.to_be_bytes());
    h.update(device.as_str().as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

pub fn run(args: DemoArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.bad_fraction) {
        bail!("--bad-fraction must be between 0 and 1");
    }
    if args.devices < 10 {
        bail!("--devices must be at least 10");
    }
    let bake =
        humantime::parse_duration(&args.bake).with_context(|| format!("--bake {:?}", args.bake))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(demo(args, bake))
}

struct Timeline {
    started: Instant,
}

impl Timeline {
    fn say(&self, msg: impl std::fmt::Display) {
        println!("[{:>5.1}s] {msg}", self.started.elapsed().as_secs_f64());
    }
}

/// The demo's (and the benchmark's) keys, all derived from the seed.
pub(crate) struct DemoKeys {
    pub rel_a: SecretKey,
    pub rel_b: SecretKey,
    pub coord: SecretKey,
    pub kl: KeyList,
    pub signed_kl: ThresholdSigned,
}

pub(crate) fn demo_keys(seed: u64) -> Result<DemoKeys> {
    let root = demo_key(seed, "root");
    let (rel_a, rel_b) = (demo_key(seed, "release-a"), demo_key(seed, "release-b"));
    let coord = demo_key(seed, "coordinator");
    let kl = KeyList {
        version: 1,
        expires_at: unix_now() + 86_400,
        roots: vec![root.public()],
        root_threshold: 1,
        release_keys: vec![rel_a.public(), rel_b.public()],
        release_threshold: 2,
        coordinator_keys: vec![coord.public()],
        operator_keys: vec![],
    };
    let mut signed_kl = ThresholdSigned::new(&kl)?;
    signed_kl.sign(&root)?;
    Ok(DemoKeys {
        rel_a,
        rel_b,
        coord,
        kl,
        signed_kl,
    })
}

async fn demo(args: DemoArgs, bake: Duration) -> Result<()> {
    let t = Timeline {
        started: Instant::now(),
    };
    let seed = args.seed;
    let DemoKeys {
        rel_a,
        rel_b,
        coord,
        kl,
        signed_kl,
    } = demo_keys(seed)?;
    // Artifacts come from a real HTTP server; devices download and check them.
    let files = swell_e2e::http::FileServer::start().context("artifact server")?;
    let v1 = release(1, "1.0.0", &[&rel_a, &rel_b], &files)?;
    let v2 = release(2, "2.0.0", &[&rel_a, &rel_b], &files)?;
    let v3 = release(3, "3.0.0-bad", &[&rel_a, &rel_b], &files)?;
    t.say(format!("artifact server at {}", files.url()));
    t.say(format!("demo keys from seed {seed} (never use them for a real fleet); releases signed by 2 of 2 release keys:"));
    for (v, r) in [("1.0.0", &v1), ("2.0.0", &v2), ("3.0.0-bad", &v3)] {
        t.say(format!("  {v:<10} release id {}", r.id().short()));
    }

    let state = tempfile::tempdir()?;
    let fleet = FleetId::new("demo")?;
    let topics = Topics::default();
    // Kept until the end: dropping it stops the broker.
    let mut embedded = None;
    let (host, port) = match &args.broker {
        Some(url) => {
            let u = parse_url(url)?;
            if u.tls {
                bail!("the demo connects without TLS; give an mqtt:// broker");
            }
            (u.host, u.port)
        }
        None => {
            let creds = swell_broker::Credentials::load_or_create(&state.path().join("broker"))?;
            let b = swell_broker::EmbeddedBroker::start(swell_broker::BrokerConfig::new(
                "127.0.0.1:0".parse()?,
                creds,
                swell_broker::Rules::new(topics.prefix(), Some(fleet.as_str())),
            ))?;
            let addr = b.addr();
            t.say(format!(
                "embedded MQTT broker on {addr} (every client logs in: coordinator, operator, a gateway for the simulated devices)"
            ));
            embedded = Some(b);
            (addr.ip().to_string(), addr.port())
        }
    };
    let login = |role| embedded.as_ref().and_then(|b| b.login(role));

    let settings = Settings {
        fleet: fleet.clone(),
        topics: topics.clone(),
        key: coord,
        key_list: signed_kl,
        keys: kl.clone(),
        epoch: 0,
        enrollment_tokens: vec!["demo-enrollment-token".into()],
        beacon_ttl: Duration::from_secs(3),
        manifest_ttl: Duration::from_secs(3_600),
        pending_expiry: Duration::from_secs(3 * 86_400),
    };
    let cancel = CancellationToken::new();
    let _stop = StopOnDrop(cancel.clone());
    let (ready_tx, mut ready_rx) = tokio::sync::watch::channel(false);
    let mqtt = MqttConfig {
        host: host.clone(),
        port,
        client_id: format!("swell-coordinator-demo-{}", std::process::id()),
        credentials: login(swell_broker::Role::Coordinator),
        keep_alive: Duration::from_secs(30),
        max_packet: 256 * 1024,
        persistent: false,
        tls: None,
    };
    let mut coordinator = Coordinator::new(settings, state.path().to_path_buf(), mqtt);
    coordinator.loop_cfg = LoopConfig {
        tick: Duration::from_millis(200),
        beacon_interval: Duration::from_secs(1),
        ..LoopConfig::default()
    };
    let started = coordinator.start(None)?;
    let coordinator = tokio::spawn(started.serve(cancel.clone(), ready_tx, Hooks::default()));
    tokio::time::timeout(Duration::from_secs(10), async {
        while !*ready_rx.borrow() {
            if ready_rx.changed().await.is_err() {
                break;
            }
        }
    })
    .await
    .context("the coordinator could not connect to the broker")?;
    t.say("coordinator connected");

    let bad_id = v3.id();
    let bad_fraction = args.bad_fraction;
    let connections = args
        .connections
        .unwrap_or(args.devices.div_ceil(500))
        .clamp(1, 64);
    let sim_cfg = SimConfig {
        host: host.clone(),
        port,
        fleet: fleet.clone(),
        topics: topics.clone(),
        keys: kl,
        devices: args.devices,
        connections,
        prefix: "dev-".into(),
        seed,
        enrollment_token: "demo-enrollment-token".into(),
        labels: Arc::new(|i| {
            vec![
                Label {
                    key: "hw".into(),
                    value: "rpi4".into(),
                },
                Label {
                    key: "region".into(),
                    value: if i % 2 == 0 { "eu".into() } else { "us".into() },
                },
            ]
        }),
        hardware: "rpi4".into(),
        outcome: Arc::new(move |dev: &DeviceId, rel: &ReleaseId| {
            *rel != bad_id || draw(seed, dev) >= bad_fraction
        }),
        initial: Some((v1.id(), 1)),
        probation: Duration::from_secs(1),
        work: Duration::from_millis(150),
        fetch_concurrency: 16,
        credentials: login(swell_broker::Role::Gateway),
    };
    let fleet_sim = sim::start(sim_cfg).await.map_err(anyhow::Error::msg)?;
    t.say(format!(
        "{} simulated devices on {connections} MQTT connection(s), running 1.0.0",
        args.devices
    ));

    let mut ops = OpsClient::connect(
        &MqttConfig {
            host: host.clone(),
            port,
            client_id: format!("swell-demo-operator-{}", std::process::id()),
            credentials: login(swell_broker::Role::Operator),
            keep_alive: Duration::from_secs(30),
            max_packet: 1 << 20,
            persistent: false,
            tls: None,
        },
        topics,
        Some(fleet.clone()),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let f = ops
            .command(json!({"op": "fleet"}), Duration::from_secs(10))
            .await?;
        let approved = answer::<FleetSummary>(&f).map_or(0, |f| f.approved);
        if approved == args.devices as u64 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {approved} of {} devices enrolled within 120 s",
                args.devices
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    t.say(format!(
        "all {} devices enrolled (token), announced their labels and keys",
        args.devices
    ));

    let bake_s = format!("{}ms", bake.as_millis());
    let good = json!({"op": "create", "spec": {
        "rollout": "fw-v2", "release": hex::encode(v2.encode()?), "selector": "hw=rpi4",
        "canary": ["dev-00000", "dev-00001"], "waves": ["10%", "50%", "100%"],
        "min_devices": 1, "success_threshold": "95%", "max_failure_rate": "5%",
        "bake": bake_s, "install_timeout": "60s", "policy": "pause"}});
    let s2 = rollout(&mut ops, &t, good, args.quiet).await?;
    let bad = json!({"op": "create", "spec": {
        "rollout": "fw-v3", "release": hex::encode(v3.encode()?), "selector": "hw=rpi4",
        "waves": ["10%", "50%", "100%"], "min_devices": 1, "success_threshold": "95%",
        "max_failure_rate": "5%", "bake": bake_s, "install_timeout": "60s", "policy": "rollback"}});
    let s3 = rollout(&mut ops, &t, bad, args.quiet).await?;

    // The rollout is rolled back once no device reports the bad release as
    // installed; their Hellos saying what they run now follow. Wait for those
    // (bounded) so the inventory shows where the fleet ended.
    let bad_hex = v3.id().to_string();
    let until = Instant::now() + Duration::from_secs(5);
    let inventory = loop {
        let inv: FleetSummary = answer(
            &ops.command(json!({"op": "fleet"}), Duration::from_secs(10))
                .await?,
        )?;
        if !inv.running.contains_key(&bad_hex) || Instant::now() > until {
            break inv;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!();
    println!("Summary");
    summary(&ops, "fw-v2", "2.0.0", &s2);
    summary(&ops, "fw-v3", "3.0.0-bad", &s3);
    println!("fleet inventory (devices by running release):");
    let names = [
        (v1.id().to_string(), "1.0.0"),
        (v2.id().to_string(), "2.0.0"),
        (v3.id().to_string(), "3.0.0-bad"),
    ];
    for (id, n) in &inventory.running {
        let name = names
            .iter()
            .find(|(i, _)| i == id)
            .map_or(id.as_str(), |(_, v)| *v);
        println!("  {name:<10} {n}");
    }
    for d in &inventory.desired {
        let name = names
            .iter()
            .find(|(i, _)| *i == d.release)
            .map_or(d.release.as_str(), |(_, v)| *v);
        println!(
            "desired state: {} ({name}), {} running it, {} of them joined after it completed",
            d.rollout, d.running, d.joined_after_completion
        );
    }
    let sent = fleet_sim
        .stats
        .bytes_sent
        .load(std::sync::atomic::Ordering::Relaxed);
    let reports = fleet_sim
        .stats
        .reports
        .load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "devices sent {reports} signed reports, {} bytes on the wire ({} bytes per device)",
        sent,
        sent / args.devices as u64
    );
    println!(
        "the coordinator sent one signed manifest per wave change, whatever the fleet size: {} wave changes",
        manifests(&ops)
    );
    println!(
        "artifacts downloaded over HTTP and verified against their signed digest: {}",
        fleet_sim
            .stats
            .downloads
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    fleet_sim.stop().await;
    cancel.cancel();
    let _ = coordinator.await;
    let ok = s2.phase == "completed" && s3.phase == "rolled_back";
    t.say(if ok {
        "demo finished: fw-v2 completed, fw-v3 rolled back"
    } else {
        "demo finished with an unexpected outcome"
    });
    if !ok {
        bail!(
            "expected fw-v2 completed and fw-v3 rolled back, got {} and {}",
            s2.phase,
            s3.phase
        );
    }
    Ok(())
}

fn manifests(ops: &OpsClient) -> usize {
    ops.events
        .iter()
        .filter(|e| {
            matches!(
                e.what,
                EventKind::Decision(
                    Decision::OpenWave { .. }
                        | Decision::Widen { .. }
                        | Decision::Pause { .. }
                        | Decision::StartRollback { .. }
                        | Decision::Complete
                )
            )
        })
        .count()
}

const FINAL: [&str; 4] = ["completed", "rolled_back", "aborted", "paused"];

async fn rollout(
    ops: &mut OpsClient,
    t: &Timeline,
    create: Value,
    quiet: bool,
) -> Result<RolloutStatus> {
    let id = create["spec"]["rollout"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let r = ops.command(create, Duration::from_secs(10)).await?;
    if !r.ok {
        bail!("create {id} refused: {}", r.message);
    }
    t.say(format!("{id}: {}", r.message));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let mut shown = String::new();
    let mut events_seen = ops.events.len();
    loop {
        for e in &ops.events[events_seen..] {
            if e.rollout == id {
                t.say(format!("{id}: {}", crate::view::describe(e)));
            }
        }
        events_seen = ops.events.len();
        if let Some(s) = ops.statuses.get(&id) {
            let view = crate::view::watch_view(s);
            if !quiet && view != shown {
                print!("{view}");
                shown = view;
            }
            if FINAL.contains(&s.phase.as_str()) {
                return Ok(s.clone());
            }
        }
        if !ops.next(deadline).await {
            bail!("{id} did not finish within 300 s");
        }
    }
}

fn summary(ops: &OpsClient, id: &str, version: &str, s: &RolloutStatus) {
    println!(
        "{id} ({version}): {}{}",
        s.phase,
        s.halt_reason
            .as_deref()
            .map(|r| format!(" — {r}"))
            .unwrap_or_default()
    );
    let opened: Vec<(u64, u64)> = ops
        .events
        .iter()
        .filter(|e| e.rollout == id)
        .filter_map(|e| match e.what {
            EventKind::Decision(Decision::OpenWave { wave, .. }) => Some((u64::from(wave), e.at)),
            _ => None,
        })
        .collect();
    let end = ops
        .events
        .iter()
        .filter(|e| e.rollout == id)
        .map(|e| e.at)
        .max()
        .unwrap_or(0);
    println!(
        "  {:<7} {:>8} {:>8} {:>8} {:>8}  other outcomes",
        "wave", "devices", "healthy", "failed", "time"
    );
    for w in &s.waves {
        let i = w.index as u64;
        let start = opened.iter().find(|(k, _)| *k == i).map(|(_, at)| *at);
        let stop = opened
            .iter()
            .find(|(k, _)| *k == i + 1)
            .map_or(end, |(_, at)| *at);
        let time = start.map_or_else(
            || "-".to_string(),
            |a| format!("{}s", stop.saturating_sub(a)),
        );
        println!(
            "  {:<7} {:>8} {:>8} {:>8} {:>8} {}",
            w.label,
            w.population,
            w.healthy,
            w.failed,
            time,
            crate::view::others(w)
        );
    }
}
