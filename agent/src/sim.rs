//! Fleet simulator: many virtual devices, each one [`DeviceCore`] (the device
//! the agent runs), with a simulated installer, over real MQTT connections.
//! What differs from the agent is the transport and the installer only:
//! - devices are multiplexed: each connection carries `devices / connections`
//!   virtual devices, gets each manifest and beacon once, checks its
//!   coordinator signature once ([`crate::evaluate::check_manifest`],
//!   [`crate::device::check_beacon`]) and hands it to every device, which
//!   applies its own floors and checks; every device signs its own Hello and
//!   reports with its own key;
//! - the key list comes with the configuration (no retained key list is read),
//!   nothing is persisted, there is no outbox (reports go straight out) and no
//!   heartbeat;
//! - downloads, installs and rollbacks take the configured work time (or, with
//!   `fetch_concurrency`, downloads are real HTTP with length and digest
//!   checks), probes pass or fail by [`SimConfig::outcome`], commits succeed;
//! - a device is ticked only when [`DeviceCore::wake_at`] says it has
//!   something to do.
//!
//! Shared by `swell demo`, end-to-end tests and the fleet benchmark.

use crate::deployment::Policy;
use crate::device::{
    Clock, DeviceCore, Effect, Installed, JobKey, Outgoing, Restored, Running, Settings, Task, Work,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Filter;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, MqttOptions};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use swell_protocol::cohort::Label;
use swell_protocol::messages::{KeyList, Phase, Reason, Release, RootOfTrust, reason};
use swell_protocol::topics::Topics;
use swell_protocol::{DeviceId, FleetId, ReleaseId, SecretKey};
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

/// A timer: simulated work finishing, or a device's next tick.
#[derive(Debug)]
enum Timer {
    Work(Option<JobKey>, Work),
    Wake,
}

struct Conn {
    cfg: SimConfig,
    client: AsyncClient,
    devs: Vec<DeviceCore>,
    /// Each device's position in `devs`, for the messages to one device.
    by_id: std::collections::HashMap<DeviceId, usize>,
    /// The earliest wake scheduled per device (monotonic ms), so a device has
    /// one pending wake, not one per input.
    wake: Vec<Option<u64>>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    pending: std::collections::HashMap<u64, Timer>,
    next_timer: u64,
    started: std::time::Instant,
    stats: Arc<SimStats>,
    http: reqwest::Client,
    fetches: Arc<tokio::sync::Semaphore>,
    fetched_tx: tokio::sync::mpsc::UnboundedSender<(usize, Option<JobKey>, Result<(), Reason>)>,
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
    let started = std::time::Instant::now();
    let settings = Arc::new(Settings {
        fleet: cfg.fleet.clone(),
        hardware: cfg.hardware.clone(),
        agent_version: concat!("sim-", env!("CARGO_PKG_VERSION")).into(),
        enrollment_token: Some(cfg.enrollment_token.clone()),
        roots: RootOfTrust::of(&cfg.keys),
        policy: Policy {
            probation_secs: cfg.probation.as_secs(),
            max_attempts: 3,
        },
        reach_timeout_secs: REACH_TIMEOUT_SECS,
        probe_interval_ms: PROBE_INTERVAL_MS,
        heartbeat_ms: None,
    });
    let keys = Arc::new(cfg.keys.clone());
    let clock = crate::clock::now(started);
    let devs: Vec<DeviceCore> = idx
        .iter()
        .filter_map(|&i| Some((i, DeviceId::new(format!("{}{i:05}", cfg.prefix)).ok()?)))
        .map(|(i, id)| {
            let restored = Restored {
                keys: Some(keys.clone()),
                installed: Installed {
                    running: cfg.initial.map(|(release, counter)| Running {
                        release,
                        rollout: None,
                        counter,
                        version: String::new(),
                    }),
                    ..Installed::default()
                },
                boot: 1,
                ..Restored::default()
            };
            DeviceCore::new(
                settings.clone(),
                id,
                (cfg.labels)(i),
                device_key(cfg.seed, i),
                restored,
                clock,
            )
        })
        .collect();
    let (fetched_tx, mut fetched_rx) = tokio::sync::mpsc::unbounded_channel();
    let fetches = Arc::new(tokio::sync::Semaphore::new(cfg.fetch_concurrency.max(1)));
    let mut conn = Conn {
        http: reqwest::Client::new(),
        fetches,
        fetched_tx,
        cfg,
        client,
        wake: vec![None; devs.len()],
        by_id: devs
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id().clone(), i))
            .collect(),
        devs,
        timers: BinaryHeap::new(),
        pending: Default::default(),
        next_timer: 0,
        started,
        stats,
    };
    let mut out = Vec::new();
    for i in 0..conn.devs.len() {
        conn.devs[i].start(clock, &mut out);
        conn.execute(i, &mut out).await;
    }
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
                    conn.connected().await;
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    conn.on_message(&topic, &p.payload, p.retain).await;
                }
                Ok(_) => {}
                Err(_) => {
                    for d in &mut conn.devs {
                        d.disconnected();
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
            _ = sleep => conn.fire_due().await,
            Some((i, for_job, r)) = fetched_rx.recv() => {
                if r.is_ok() {
                    conn.stats.downloads.fetch_add(1, Ordering::Relaxed);
                }
                conn.work_done(i, for_job, Work::Downloaded(r)).await;
            }
        }
    }
}

/// How often a simulated device in probation runs its probes.
const PROBE_INTERVAL_MS: u64 = 250;
/// INST-2 for simulated devices, as the agent's default.
const REACH_TIMEOUT_SECS: u64 = 600;

impl Conn {
    fn clock(&self) -> Clock {
        crate::clock::now(self.started)
    }

    async fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) {
        self.stats
            .bytes_sent
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        let _ = self
            .client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await;
    }

    /// A connection: subscribe, then every device is online and says Hello.
    async fn connected(&mut self) {
        let t = &self.cfg.topics;
        for filter in [t.manifests(&self.cfg.fleet), t.beacon(&self.cfg.fleet)] {
            let _ = self.client.subscribe(filter, QoS::AtLeastOnce).await;
        }
        // Each device's own enrollment confirmation (a `+` filter would bring
        // every device's to every connection).
        let own: Vec<Filter> = self
            .devs
            .iter()
            .map(|d| Filter::new(t.enrolled(d.id()), QoS::AtLeastOnce))
            .collect();
        for chunk in own.chunks(256) {
            let _ = self.client.subscribe_many(chunk.to_vec()).await;
        }
        let clock = self.clock();
        let mut out = Vec::new();
        for i in 0..self.devs.len() {
            let online = self.cfg.topics.online(self.devs[i].id());
            self.publish(online, b"1".to_vec(), true).await;
            self.devs[i].connected(clock, &mut out);
            self.execute(i, &mut out).await;
        }
    }

    async fn on_message(&mut self, topic: &str, payload: &[u8], retained: bool) {
        let clock = self.clock();
        let mut out = Vec::new();
        if topic.ends_with("/enrolled") {
            let device = match self.cfg.topics.parse(topic) {
                Ok(swell_protocol::topics::Topic::Enrolled { device }) => device,
                _ => return,
            };
            if let Some(&i) = self.by_id.get(&device) {
                self.devs[i].on_enrolled(topic, payload, clock, &mut out);
                self.execute(i, &mut out).await;
            }
            return;
        }
        if topic.ends_with("/beacon") {
            // One signature check for every device of this connection.
            let Ok(v) = crate::device::check_beacon(payload, &self.cfg.keys, clock.unix) else {
                return;
            };
            for i in 0..self.devs.len() {
                self.devs[i].on_checked_beacon(&v, retained, clock, &mut out);
                self.execute(i, &mut out).await;
            }
            return;
        }
        // One signature check for every device of this connection; each device
        // still applies its own floors and checks.
        let checked = crate::evaluate::check_manifest(payload, &self.cfg.keys, clock.unix).ok();
        for i in 0..self.devs.len() {
            match &checked {
                Some(c) => self.devs[i].on_checked_manifest(c, topic, payload, clock, &mut out),
                None => self.devs[i].on_manifest(topic, payload, clock, &mut out),
            }
            self.execute(i, &mut out).await;
        }
    }

    async fn work_done(&mut self, i: usize, for_job: Option<JobKey>, work: Work) {
        let mut out = Vec::new();
        let clock = self.clock();
        self.devs[i].work_done(for_job, work, clock, &mut out);
        self.execute(i, &mut out).await;
    }

    fn schedule(&mut self, i: usize, after: Duration, t: Timer) {
        self.next_timer += 1;
        self.pending.insert(self.next_timer, t);
        self.timers
            .push(Reverse((Instant::now() + after, i, self.next_timer)));
    }

    fn jitter(&self, i: usize) -> Duration {
        let w = self.cfg.work.as_millis() as u64;
        let h = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.cfg.seed;
        self.cfg.work + Duration::from_millis(if w == 0 { 0 } else { h % w })
    }

    /// Carries out device `i`'s effects: messages go out on this connection,
    /// tasks are simulated (or, for downloads with URLs, done for real), the
    /// device's state stays in memory. Then its next tick is timed.
    async fn execute(&mut self, i: usize, out: &mut Vec<Effect>) {
        for effect in std::mem::take(out) {
            match effect {
                Effect::Send(Outgoing::Hello { bytes, .. }) => {
                    self.stats.hellos.fetch_add(1, Ordering::Relaxed);
                    let topic = self.cfg.topics.hello(self.devs[i].id());
                    self.publish(topic, bytes, false).await;
                }
                Effect::Send(Outgoing::Report { bytes, phase, .. }) => {
                    let counter = match phase {
                        Phase::Committed => Some(&self.stats.committed),
                        Phase::RolledBack(_) => Some(&self.stats.rolled_back),
                        Phase::Rejected(_) => Some(&self.stats.rejected),
                        _ => None,
                    };
                    if let Some(c) = counter {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    self.stats.reports.fetch_add(1, Ordering::Relaxed);
                    let topic = self.cfg.topics.report(self.devs[i].id());
                    self.publish(topic, bytes, false).await;
                }
                // A simulated device's connection is never taken over; the
                // core would say so like the agent's.
                Effect::Send(Outgoing::Note { bytes, .. }) => {
                    let topic = self.cfg.topics.report(self.devs[i].id());
                    self.publish(topic, bytes, false).await;
                }
                Effect::Start(task) => self.start(i, task),
                Effect::Journal(_)
                | Effect::SaveRelease(_)
                | Effect::SaveInstalled(_)
                | Effect::PersistTrust
                | Effect::StoreKeyList(_)
                | Effect::PruneBlobs(_) => {}
            }
        }
        let clock = self.clock();
        if let Some(at) = self.devs[i].wake_at(clock)
            && self.wake[i].is_none_or(|w| at < w)
        {
            self.wake[i] = Some(at);
            let after = Duration::from_millis(at.saturating_sub(clock.mono_ms));
            self.schedule(i, after, Timer::Wake);
        }
    }

    /// The simulated installer: downloads, installs and rollbacks take the
    /// configured work time, probes pass or fail by the configured outcome,
    /// commits succeed.
    fn start(&mut self, i: usize, task: Task) {
        let for_job = self.devs[i].job_key();
        match task {
            Task::Download => {
                let release = self.devs[i]
                    .job_release()
                    .filter(|r| r.artifacts.iter().any(|a| !a.urls.is_empty()))
                    .filter(|_| self.cfg.fetch_concurrency > 0)
                    .cloned();
                match release {
                    Some(release) => {
                        let (http, permits, tx) = (
                            self.http.clone(),
                            self.fetches.clone(),
                            self.fetched_tx.clone(),
                        );
                        tokio::spawn(async move {
                            let _permit = permits.acquire_owned().await;
                            let r = fetch_release(&http, &release).await;
                            let _ = tx.send((i, for_job, r));
                        });
                    }
                    None => {
                        let after = self.jitter(i);
                        self.schedule(i, after, Timer::Work(for_job, Work::Downloaded(Ok(()))));
                    }
                }
            }
            Task::Install => {
                let after = self.jitter(i);
                self.schedule(i, after, Timer::Work(for_job, Work::Installed(Ok(()))));
            }
            Task::RollBack => {
                let after = self.jitter(i);
                self.schedule(i, after, Timer::Work(for_job, Work::RolledBack(Ok(()))));
            }
            Task::Probe => {
                let ok = for_job
                    .as_ref()
                    .is_none_or(|(_, release)| (self.cfg.outcome)(self.devs[i].id(), release));
                let failure = (!ok).then(|| Reason {
                    code: reason::PROBE_FAILED,
                    detail: "simulated probe".into(),
                });
                self.schedule(
                    i,
                    Duration::ZERO,
                    Timer::Work(
                        for_job,
                        Work::Probed {
                            results: vec![],
                            failure,
                        },
                    ),
                );
            }
            Task::Commit => {
                self.schedule(
                    i,
                    Duration::ZERO,
                    Timer::Work(for_job, Work::Committed(Ok(()))),
                );
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
            match t {
                Timer::Work(for_job, work) => self.work_done(i, for_job, work).await,
                Timer::Wake => {
                    self.wake[i] = None;
                    let mut out = Vec::new();
                    let clock = self.clock();
                    self.devs[i].tick(clock, &mut out);
                    self.execute(i, &mut out).await;
                }
            }
        }
    }
}
