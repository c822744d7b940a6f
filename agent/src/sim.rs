//! Fleet simulator: many virtual devices running the real agent logic
//! ([`crate::evaluate`], [`crate::deployment`], [`crate::trust`]) with a simulated
//! installer, over real MQTT connections. Devices are multiplexed: each connection
//! carries `devices / connections` virtual devices, gets each manifest and beacon
//! once, and applies it to all of them; every device still signs its own Hello
//! and Reports with its own key and keeps its own floors. Shared by `swell demo`,
//! end-to-end tests and the fleet benchmark.

use crate::deployment::{self, Action, Event, Job, Policy};
use crate::evaluate::{Device, Verdict, evaluate, evaluate_checked};
use crate::trust::TrustState;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, MqttOptions};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use swell_protocol::cohort::Label;
use swell_protocol::envelope::{Audience, Stamp, UnverifiedEnvelope, seal};
use swell_protocol::messages::{
    Beacon, Hello, KeyList, Metrics, Phase, Reason, Release, Report, reason,
};
use swell_protocol::topics::Topics;
use swell_protocol::{DeviceId, FleetId, ReleaseId, RolloutId, SecretKey};
use tokio::time::Instant;

/// Whether a simulated install of `release` on `device` passes its probes.
pub type Outcome = Arc<dyn Fn(&DeviceId, &ReleaseId) -> bool + Send + Sync>;

/// What the simulated fleet looks like.
#[derive(Clone)]
pub struct SimConfig {
    pub host: String,
    pub port: u16,
    pub fleet: FleetId,
    pub topics: Topics,
    pub keys: KeyList,
    pub devices: usize,
    pub connections: usize,
    /// Device `i` is `{prefix}{i:05}`; its key is derived from `seed` and `i`.
    pub prefix: String,
    pub seed: u64,
    pub enrollment_token: String,
    pub labels: Arc<dyn Fn(usize) -> Vec<Label> + Send + Sync>,
    pub hardware: String,
    pub outcome: Outcome,
    /// What every device runs at start (release id, counter), if anything.
    pub initial: Option<(ReleaseId, u64)>,
    pub probation: Duration,
    /// Simulated download and install time (each device adds up to the same again).
    pub work: Duration,
    /// Download artifacts that carry URLs for real (HTTP, length cap, SHA-256)
    /// instead of simulating it; at most this many at once per connection.
    pub fetch_concurrency: usize,
    /// A gateway's user name and password: the simulated devices share a few
    /// connections, so the broker knows them as one gateway (each device still
    /// signs its own messages).
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("devices", &self.devices)
            .field("connections", &self.connections)
            .finish()
    }
}

/// Counters of the whole simulated fleet.
#[derive(Debug, Default)]
pub struct SimStats {
    pub reports: AtomicU64,
    /// Hellos sent (on connect, on a coordinator epoch not seen before, and
    /// after a running release changes).
    pub hellos: AtomicU64,
    pub committed: AtomicU64,
    pub rolled_back: AtomicU64,
    pub rejected: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Artifacts downloaded over HTTP and verified.
    pub downloads: AtomicU64,
}

/// A running simulated fleet.
#[derive(Debug)]
pub struct Fleet {
    pub stats: Arc<SimStats>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Stops every connection.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

/// The key of simulated device `i`: seed derived from (`seed`, `i`). Public, like
/// the test keys: never for real devices.
pub fn device_key(seed: u64, i: usize) -> SecretKey {
    swell_protocol::testkeys::test_key(&format!("sim-{seed}-{i}"))
}

struct VDev {
    id: DeviceId,
    key: SecretKey,
    labels: Vec<Label>,
    trust: TrustState,
    running: Option<(ReleaseId, Option<RolloutId>)>,
    previous: Option<(ReleaseId, Option<RolloutId>)>,
    failed: Option<(RolloutId, ReleaseId, u32)>,
    job: Option<Job>,
    /// The verified release of the current job (its artifacts and URLs).
    release: Option<Release>,
    seq: u64,
}

/// Simulated work finishing; turned into an [`Event`] when it fires.
#[derive(Debug, Clone, Copy)]
enum Timed {
    Downloaded,
    Installed,
    Probe { ok: bool },
    RolledBack,
}

struct Conn {
    cfg: SimConfig,
    client: AsyncClient,
    devs: Vec<VDev>,
    beacon_until: u64,
    epoch_seen: u64,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    pending: std::collections::HashMap<u64, Timed>,
    next_timer: u64,
    stats: Arc<SimStats>,
    policy: Policy,
    http: reqwest::Client,
    fetches: Arc<tokio::sync::Semaphore>,
    fetched_tx: tokio::sync::mpsc::UnboundedSender<(usize, ReleaseId, Result<(), Reason>)>,
}

/// Fetches every artifact of `release` that has a URL: the body is read up to
/// its signed length + 1 and must hash to its digest.
async fn fetch_release(http: &reqwest::Client, release: &Release) -> Result<(), Reason> {
    use sha2::Digest as _;
    let fail = |code, detail: String| Reason {
        code,
        detail: detail.chars().take(64).collect(),
    };
    for a in release.artifacts.iter().filter(|a| !a.urls.is_empty()) {
        let mut resp = tokio::time::timeout(Duration::from_secs(30), http.get(&a.urls[0]).send())
            .await
            .map_err(|_| fail(reason::SLOW_RETRIEVAL, "no answer".into()))?
            .map_err(|e| fail(reason::DOWNLOAD_FAILED, e.to_string()))?;
        if !resp.status().is_success() {
            return Err(fail(
                reason::DOWNLOAD_FAILED,
                format!("HTTP {}", resp.status()),
            ));
        }
        let mut h = sha2::Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| fail(reason::DOWNLOAD_FAILED, e.to_string()))?
        {
            n += chunk.len() as u64;
            if n > a.length {
                return Err(fail(
                    reason::LENGTH_MISMATCH,
                    format!("more than {} bytes", a.length),
                ));
            }
            h.update(&chunk);
        }
        if n != a.length || h.finalize().as_slice() != a.digest.0 {
            return Err(fail(
                reason::DIGEST_MISMATCH,
                "downloaded bytes differ".into(),
            ));
        }
    }
    Ok(())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Starts the fleet: connects, says hello for every device, and runs until stopped.
pub async fn start(cfg: SimConfig) -> Result<Fleet, String> {
    if DeviceId::new(format!("{}00000", cfg.prefix)).is_err() {
        return Err(format!(
            "device id prefix {:?} does not make valid device ids",
            cfg.prefix
        ));
    }
    let stats = Arc::new(SimStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let conns = cfg.connections.max(1).min(cfg.devices.max(1));
    let mut tasks = Vec::new();
    let mut ready = Vec::new();
    for c in 0..conns {
        let idx: Vec<usize> = (c..cfg.devices).step_by(conns).collect();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let cfg = cfg.clone();
        let stats = stats.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            run_conn(cfg, c, idx, stats, stop, tx).await
        }));
        ready.push(rx);
    }
    let connect_limit = Duration::from_secs(30 + (cfg.devices / 5_000) as u64);
    for r in ready {
        // Each connection derives its devices' keys before it connects.
        tokio::time::timeout(connect_limit, r)
            .await
            .map_err(|_| {
                format!(
                    "simulated devices could not connect within {} s",
                    connect_limit.as_secs()
                )
            })?
            .map_err(|_| "a simulator connection ended early".to_string())?;
    }
    Ok(Fleet { stats, stop, tasks })
}

async fn run_conn(
    cfg: SimConfig,
    c: usize,
    idx: Vec<usize>,
    stats: Arc<SimStats>,
    stop: Arc<AtomicBool>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    // A gateway's client ids (swell-broker's rules).
    let mut opts = MqttOptions::new(
        format!("swell-gw-{}sim-{c}", cfg.prefix),
        cfg.host.clone(),
        cfg.port,
    );
    if let Some((u, p)) = &cfg.credentials {
        opts.set_credentials(u.clone(), p.clone());
    }
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(Some(1 << 20));
    let (client, mut eventloop) = AsyncClient::new(opts, 100_000);
    let devs = idx
        .iter()
        .filter_map(|&i| Some((i, DeviceId::new(format!("{}{i:05}", cfg.prefix)).ok()?)))
        .map(|(i, id)| VDev {
            id,
            key: device_key(cfg.seed, i),
            labels: (cfg.labels)(i),
            trust: TrustState {
                counter_floor: cfg.initial.map_or(0, |i| i.1),
                ..TrustState::default()
            },
            running: cfg.initial.map(|i| (i.0, None)),
            previous: None,
            failed: None,
            job: None,
            release: None,
            seq: 0,
        })
        .collect();
    let policy = Policy {
        probation_secs: cfg.probation.as_secs(),
        max_attempts: 3,
    };
    let (fetched_tx, mut fetched_rx) = tokio::sync::mpsc::unbounded_channel();
    let fetches = Arc::new(tokio::sync::Semaphore::new(cfg.fetch_concurrency.max(1)));
    let mut conn = Conn {
        http: reqwest::Client::new(),
        fetches,
        fetched_tx,
        cfg,
        client,
        devs,
        beacon_until: 0,
        epoch_seen: 0,
        timers: BinaryHeap::new(),
        pending: Default::default(),
        next_timer: 0,
        stats,
        policy,
    };
    let mut ready = Some(ready);
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let next = conn.timers.peek().map(|Reverse((at, _, _))| *at);
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = eventloop.poll() => match ev {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    conn.subscribe_and_hello().await;
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    conn.on_message(&topic, &p.payload).await;
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            },
            _ = sleep => conn.fire_due().await,
            Some((i, release, r)) = fetched_rx.recv() => {
                // A result for the device's current job only.
                if conn.devs[i].job.as_ref().is_some_and(|j| j.release == release) {
                    let ev = match r {
                        Ok(()) => {
                            conn.stats.downloads.fetch_add(1, Ordering::Relaxed);
                            Event::Downloaded
                        }
                        Err(reason) => Event::DownloadFailed(reason),
                    };
                    conn.event(i, ev).await;
                }
            }
        }
    }
}

impl Conn {
    async fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) {
        self.stats
            .bytes_sent
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        let _ = self
            .client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await;
    }

    async fn subscribe_and_hello(&mut self) {
        let t = &self.cfg.topics;
        let _ = self
            .client
            .subscribe(t.manifests(&self.cfg.fleet), QoS::AtLeastOnce)
            .await;
        let _ = self
            .client
            .subscribe(t.beacon(&self.cfg.fleet), QoS::AtLeastOnce)
            .await;
        self.hello_all().await;
    }

    async fn hello_all(&mut self) {
        for i in 0..self.devs.len() {
            self.hello(i).await;
        }
    }

    /// Hello for device `i`: on connect, on a new coordinator epoch, and whenever
    /// the release it runs changes (so the fleet inventory stays exact).
    async fn hello(&mut self, i: usize) {
        let (topic, bytes, online) = {
            let d = &mut self.devs[i];
            d.seq += 1;
            let h = Hello {
                device: d.id.clone(),
                fleet: self.cfg.fleet.clone(),
                key: d.key.public(),
                labels: d.labels.clone(),
                hardware: self.cfg.hardware.clone(),
                agent_version: concat!("sim-", env!("CARGO_PKG_VERSION")).into(),
                proto_min: 1,
                proto_max: 1,
                boot: 1,
                running: d.running.as_ref().map(|r| r.0),
                counter_floor: d.trust.counter_floor,
                enrollment_token: Some(self.cfg.enrollment_token.clone()),
            };
            let stamp = Stamp {
                epoch: 1,
                seq: d.seq,
                issued_at: unix_now(),
                expires_at: 0,
                audience: Audience::Any,
            };
            let Ok(b) = seal(&d.key, stamp, &h) else {
                return;
            };
            (
                self.cfg.topics.hello(&d.id),
                b,
                self.cfg.topics.online(&d.id),
            )
        };
        self.stats.hellos.fetch_add(1, Ordering::Relaxed);
        self.publish(topic, bytes, false).await;
        self.publish(online, b"1".to_vec(), true).await;
    }

    async fn on_message(&mut self, topic: &str, payload: &[u8]) {
        let now = unix_now();
        if topic.ends_with("/beacon") {
            let Ok(env) = UnverifiedEnvelope::parse(payload) else {
                return;
            };
            let Some(key) = self
                .cfg
                .keys
                .coordinator_keys
                .iter()
                .find(|k| k.key_id() == env.header.key_id)
            else {
                return;
            };
            let Ok(v) = env.verify::<Beacon>(key, now) else {
                return;
            };
            self.beacon_until = v.header.expires_at;
            if v.header.epoch > self.epoch_seen {
                // A coordinator epoch not seen before: say hello again.
                self.epoch_seen = v.header.epoch;
                self.hello_all().await;
            }
            for i in 0..self.devs.len() {
                self.event(i, Event::FreshMessage { now }).await;
            }
            return;
        }
        // One signature check for every device of this connection.
        let checked = crate::evaluate::check_manifest(payload, &self.cfg.keys, now).ok();
        for i in 0..self.devs.len() {
            let verdict = {
                let d = &mut self.devs[i];
                let dev = Device {
                    id: &d.id,
                    fleet: &self.cfg.fleet,
                    labels: &d.labels,
                    hardware: &self.cfg.hardware,
                    running: d.running.clone(),
                    failed: d.failed.clone(),
                    installing: d
                        .job
                        .as_ref()
                        .filter(|j| !j.is_final())
                        .map(|j| (j.rollout.clone(), j.release)),
                    beacon_fresh: now < self.beacon_until,
                    directive: None,
                };
                match &checked {
                    Some(c) => evaluate_checked(c, &dev, &self.cfg.keys, &mut d.trust, now),
                    None => evaluate(payload, &dev, &self.cfg.keys, &mut d.trust, now),
                }
            };
            match verdict {
                Verdict::Install {
                    rollout,
                    release_id,
                    release,
                    retry,
                } => {
                    if self.devs[i].job.as_ref().is_some_and(|j| !j.is_final()) {
                        continue;
                    }
                    let previous = self.devs[i].running.as_ref().map(|r| r.0);
                    let (job, actions) =
                        Job::start(rollout, release_id, release.counter, retry, previous);
                    self.devs[i].job = Some(job);
                    self.devs[i].release = Some(*release);
                    self.carry_out(i, actions).await;
                }
                Verdict::RollBack { .. } => {
                    self.event(
                        i,
                        Event::RollbackRequested(Reason {
                            code: reason::OPERATOR,
                            detail: "rollout rolling back".into(),
                        }),
                    )
                    .await
                }
                Verdict::Reject {
                    rollout,
                    release_id,
                    reason,
                } => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    if let (Some(r), Some(rel)) = (rollout, release_id) {
                        self.report(i, r, rel, Phase::Rejected(reason)).await;
                    }
                }
                Verdict::NotForMe(_) | Verdict::Duplicate => {}
            }
            // Any verified manifest is a fresh message for probation (INST-2).
            self.event(i, Event::FreshMessage { now }).await;
        }
    }

    async fn event(&mut self, i: usize, ev: Event) {
        let Some(job) = self.devs[i].job.clone() else {
            return;
        };
        let (next, actions) = deployment::step(&job, ev, &self.policy);
        self.devs[i].job = Some(next);
        self.carry_out(i, actions).await;
    }

    fn schedule(&mut self, i: usize, after: Duration, ev: Timed) {
        self.next_timer += 1;
        self.pending.insert(self.next_timer, ev);
        self.timers
            .push(Reverse((Instant::now() + after, i, self.next_timer)));
    }

    fn jitter(&self, i: usize) -> Duration {
        let w = self.cfg.work.as_millis() as u64;
        let h = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.cfg.seed;
        self.cfg.work + Duration::from_millis(if w == 0 { 0 } else { h % w })
    }

    async fn carry_out(&mut self, i: usize, actions: Vec<Action>) {
        for a in actions {
            let Some(job) = self.devs[i].job.clone() else {
                return;
            };
            match a {
                Action::Download => {
                    let real = self.cfg.fetch_concurrency > 0
                        && self.devs[i]
                            .release
                            .as_ref()
                            .is_some_and(|r| r.artifacts.iter().any(|a| !a.urls.is_empty()));
                    match self.devs[i].release.clone().filter(|_| real) {
                        Some(release) => {
                            let (http, permits, tx) = (
                                self.http.clone(),
                                self.fetches.clone(),
                                self.fetched_tx.clone(),
                            );
                            let id = job.release;
                            tokio::spawn(async move {
                                let _permit = permits.acquire_owned().await;
                                let r = fetch_release(&http, &release).await;
                                let _ = tx.send((i, id, r));
                            });
                        }
                        None => self.schedule(i, self.jitter(i), Timed::Downloaded),
                    }
                }
                Action::Install => {
                    let work = self.jitter(i);
                    self.schedule(i, work, Timed::Installed);
                    // Probes run through the probation, then say how it went.
                    let ok = (self.cfg.outcome)(&self.devs[i].id, &job.release);
                    self.schedule(i, work + self.cfg.probation, Timed::Probe { ok });
                }
                Action::Commit => {
                    let d = &mut self.devs[i];
                    d.previous = d.running.take();
                    d.running = Some((job.release, Some(job.rollout.clone())));
                    d.trust.raise_counter_floor(job.counter);
                    self.stats.committed.fetch_add(1, Ordering::Relaxed);
                }
                Action::RollBack => self.schedule(i, self.jitter(i), Timed::RolledBack),
                Action::Report(phase) => {
                    if let Phase::RolledBack(_) = phase {
                        let d = &mut self.devs[i];
                        if d.running.as_ref().is_some_and(|r| r.0 == job.release) {
                            d.running = d.previous.take();
                        }
                        d.failed = Some((job.rollout.clone(), job.release, job.retry));
                        self.stats.rolled_back.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Phase::Failed(_) = phase {
                        self.devs[i].failed = Some((job.rollout.clone(), job.release, job.retry));
                    }
                    let changed = matches!(phase, Phase::RolledBack(_));
                    self.report(i, job.rollout.clone(), job.release, phase)
                        .await;
                    if changed {
                        self.hello(i).await;
                    }
                }
            }
        }
    }

    async fn fire_due(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, i, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(t) = self.pending.remove(&id) else {
                continue;
            };
            let now = unix_now();
            let ev = match t {
                Timed::Downloaded => Event::Downloaded,
                Timed::Installed => Event::Installed { now },
                Timed::Probe { ok: true } => Event::ProbesOk { now },
                Timed::Probe { ok: false } => Event::ProbeFailed(Reason {
                    code: reason::PROBE_FAILED,
                    detail: "simulated probe".into(),
                }),
                Timed::RolledBack => Event::RolledBack,
            };
            self.event(i, ev).await;
            // Probes keep running until the job commits: it waits for the whole
            // probation and a fresh coordinator message after activation.
            if matches!(t, Timed::Probe { ok: true })
                && self.devs[i]
                    .job
                    .as_ref()
                    .is_some_and(|j| matches!(j.stage, deployment::Stage::Probation { .. }))
            {
                self.schedule(i, Duration::from_millis(250), Timed::Probe { ok: true });
            }
        }
    }

    async fn report(&mut self, i: usize, rollout: RolloutId, release: ReleaseId, phase: Phase) {
        let (topic, bytes) = {
            let d = &mut self.devs[i];
            d.seq += 1;
            let r = Report {
                device: d.id.clone(),
                rollout: Some(rollout),
                release,
                phase,
                probes: vec![],
                metrics: Metrics::default(),
            };
            let stamp = Stamp {
                epoch: 1,
                seq: d.seq,
                issued_at: unix_now(),
                expires_at: 0,
                audience: Audience::Any,
            };
            let Ok(b) = seal(&d.key, stamp, &r) else {
                return;
            };
            (self.cfg.topics.report(&d.id), b)
        };
        self.stats.reports.fetch_add(1, Ordering::Relaxed);
        self.publish(topic, bytes, false).await;
    }
}
