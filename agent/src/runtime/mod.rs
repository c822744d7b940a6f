//! The running agent: one task owns the trust state, the journal, the outbox and
//! the MQTT event loop; downloads, installs, rollbacks, commits and probes run as
//! workers (one at a time) and come back as [`Work`]. Everything that changes
//! state is made durable before the message that caused it is acknowledged
//! (STATE-1, MQTT-4) and before its side effects start (the journal).

mod before_keys;
mod link;
mod state;

pub use state::{Installed, Running, Status};

use crate::config::AgentConfig;
use crate::deployment::{self, Action, Event, Job, Policy, Stage};
use crate::download::{Blobs, http_client};
use crate::evaluate::{Device, Verdict, evaluate, verify_directive};
use crate::install::{self, Installer, Prepared, PreparedArtifact};
use crate::probe;
use crate::store::AgentStore;
use crate::trust::{TrustFile, TrustState};
use before_keys::BeforeKeys;
use link::Link;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, Publish};
use rumqttc::v5::{AsyncClient, Event as MqttEvent, EventLoop};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use swell_protocol::envelope::{Audience, Stamp, UnverifiedEnvelope, seal};
use swell_protocol::messages::{
    ArtifactKind, Beacon, DeviceDirective, Hello, KeyList, Metrics, Phase, ProbeResult, Reason,
    Release, Report, RootOfTrust, reason,
};
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::topics::Topic;
use swell_protocol::{ReleaseId, RolloutId, SecretKey};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn};

/// Why the agent could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Trust(#[from] crate::trust::TrustError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("installer: {0}")]
    Install(#[from] install::InstallError),
    #[error("HTTP client: {0}")]
    Http(String),
}

/// Most manifests held for later evaluation (one per rollout).
const MAX_HELD: usize = 32;

fn verdict_rollout(v: &Verdict) -> Option<&RolloutId> {
    match v {
        Verdict::Install { rollout, .. } | Verdict::RollBack { rollout, .. } => Some(rollout),
        Verdict::Reject { rollout, .. } => rollout.as_ref(),
        Verdict::NotForMe(_) | Verdict::Duplicate => None,
    }
}

/// Which job a worker's result belongs to.
type JobKey = (RolloutId, ReleaseId);
type WorkRx = mpsc::Receiver<(Option<JobKey>, Work)>;

/// What a worker finished.
#[derive(Debug)]
enum Work {
    Downloaded(Result<(), Reason>),
    Installed(Result<(), Reason>),
    RolledBack(Result<(), Reason>),
    Committed(Result<(), Reason>),
    Probed(probe::Round),
}

/// Work to start when the worker is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Task {
    Download,
    Install,
    RollBack,
    Probe,
    Commit,
}

/// Counters of refused input and delivery, also written to `status.json`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Counters {
    pub rejected_manifests: u64,
    pub rejected_directives: u64,
    pub rejected_key_lists: u64,
    pub rejected_beacons: u64,
    pub unknown_topics: u64,
    pub duplicates: u64,
    pub reports_queued: u64,
    pub reports_acked: u64,
    /// Subscriptions the broker refused: a misconfigured broker ACL, and the
    /// messages on those filters never arrive.
    pub subscriptions_refused: u64,
    /// Fleet messages dropped while waiting for a first key list (bounded).
    pub dropped_before_keys: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The agent.
pub struct Agent {
    cfg: AgentConfig,
    key: SecretKey,
    trust_file: TrustFile,
    trust: TrustState,
    store: AgentStore,
    keys: Option<KeyList>,
    keys_path: PathBuf,
    status_path: PathBuf,
    installed: Installed,
    job: Option<Job>,
    job_release: Option<Release>,
    beacon_until: u64,
    epoch_seen: u64,
    directive: Option<DeviceDirective>,
    installer: Arc<dyn Installer>,
    blobs: Blobs,
    http: reqwest::Client,
    policy: Policy,
    client: AsyncClient,
    subscriptions: swell_mqtt::Subscriptions,
    link: Link,
    work_tx: mpsc::Sender<(Option<JobKey>, Work)>,
    busy: bool,
    queue: VecDeque<Task>,
    /// A commit waiting for the installer: the job to journal once it succeeds.
    committing: Option<(Job, Vec<Action>)>,
    /// Events that arrived during the commit.
    held_events: Vec<Event>,
    /// Manifests that could not act yet, by rollout (bytes, when received).
    held: std::collections::BTreeMap<RolloutId, (Vec<u8>, u64)>,
    /// Fleet messages that came before any key list.
    before_keys: BeforeKeys,
    boot: u64,
    started: Instant,
    last_probe: Instant,
    last_heartbeat: Instant,
    probes: Vec<ProbeResult>,
    counters: Counters,
    /// Crash-test hook (`SWELL_AGENT_ABORT_AFTER=<stage>`): abort right after
    /// journaling this stage, as a power cut would.
    abort_after: Option<String>,
    /// `status.json` is behind (written at most every tick).
    status_dirty: bool,
    /// Reason to report once connected (store or trust file rebuilt).
    rebuilt: Option<String>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("device", &self.cfg.device)
            .finish()
    }
}

/// Tells the service manager how the agent is doing (systemd `Type=notify`:
/// ready once state is open, watchdog pings from the main loop itself, so a
/// wedged loop is restarted).
pub trait Supervisor: Send {
    fn ready(&mut self) {}
    fn alive(&mut self) {}
    fn stopping(&mut self) {}
}

/// No service manager.
#[derive(Debug, Default)]
pub struct NoSupervisor;
impl Supervisor for NoSupervisor {}

/// Runs the agent until `stop` fires.
pub async fn run(
    cfg: AgentConfig,
    stop: CancellationToken,
    sup: &mut dyn Supervisor,
) -> Result<(), AgentError> {
    let (mut agent, mut eventloop, mut work_rx) = Agent::open(cfg)?;
    sup.ready();
    let r = agent
        .main_loop(&mut eventloop, &mut work_rx, stop, sup)
        .await;
    sup.stopping();
    r
}

impl Agent {
    fn open(cfg: AgentConfig) -> Result<(Agent, EventLoop, WorkRx), AgentError> {
        let dir = cfg.state_dir.clone();
        crate::durable::private_dir(&dir).map_err(|source| AgentError::StateDir {
            path: dir.clone(),
            source,
        })?;
        let (key, created) = crate::identity::load_or_create(&dir.join("device.key"))?;
        if created {
            info!(device = %cfg.device, key = %hex::encode(key.public().0), "device key created");
        }
        let mut rebuilt = None;
        let trust_file = TrustFile::new(dir.join("trust"));
        let mut trust = match trust_file.load() {
            Ok(Some(t)) => t,
            Ok(None) => TrustState::default(),
            Err(e @ crate::trust::TrustError::Corrupt { .. }) => {
                let aside = trust_file.quarantine()?;
                error!(error = %e, aside = %aside.display(), "trust file corrupt; set aside, starting from the pinned roots");
                rebuilt = Some("trust file rebuilt".to_string());
                TrustState::default()
            }
            Err(e) => return Err(e.into()),
        };
        let (store, store_rebuilt) = AgentStore::open(&dir.join("db"), cfg.outbox_cap)?;
        if store_rebuilt {
            error!("agent store corrupt; set aside and rebuilt");
            rebuilt = Some("agent store rebuilt".to_string());
        }
        let installed: Installed = store.get("installed")?.unwrap_or_default();
        // Never let a rebuilt trust file sit below what already runs (VER-2).
        if let Some(r) = &installed.running {
            trust.raise_counter_floor(r.counter);
        }
        let boot = store.get::<u64>("boot")?.unwrap_or(0) + 1;
        store.put("boot", &boot)?;
        let keys_path = dir.join("keylist");
        let keys = load_key_list(&keys_path, &cfg.root, &trust);
        let installer: Arc<dyn Installer> = Arc::from(install::build(&cfg.backend)?);
        let blobs = Blobs::new(&dir).map_err(|source| AgentError::StateDir {
            path: dir.clone(),
            source,
        })?;
        let http = http_client(&cfg.download).map_err(AgentError::Http)?;
        let mqtt_cfg = swell_mqtt::MqttConfig {
            host: cfg.broker.host.clone(),
            port: cfg.broker.port,
            client_id: format!("swell-agent-{}", cfg.device),
            credentials: cfg.credentials.clone(),
            keep_alive: cfg.keep_alive,
            max_packet: 128 * 1024,
            persistent: true,
            tls: cfg.tls.clone(),
        };
        let will = LastWill::new(
            cfg.topics.online(&cfg.device),
            "0",
            QoS::AtLeastOnce,
            true,
            None,
        );
        let mut opts = swell_mqtt::options(&mqtt_cfg, Some(will));
        // A fresh session when the process starts (everything coordinators send
        // devices is retained, and the agent's own state is on disk), kept across
        // reconnects after that (see `on_mqtt`). Resuming a session from before a
        // crash relies on the broker redelivering unacknowledged messages, which
        // not every broker does.
        opts.set_clean_start(true);
        // rumqttc sizes its in-flight table to the broker's Receive Maximum
        // (65,535 on Mosquitto: ~20 MB touched at opt-level "z"). The agent
        // never has more than the outbox window plus a few others in flight.
        opts.set_outgoing_inflight_upper_limit(u16::try_from(link::WINDOW * 2).unwrap_or(32));
        // And asks the broker for no more than this many unacknowledged at once.
        opts.set_receive_maximum(Some(64));
        let (client, eventloop) = AsyncClient::new(opts, 256);
        let (work_tx, work_rx) = mpsc::channel(16);
        let job = store.load_job()?;
        let job_release = store.get::<Option<Release>>("job-release")?.flatten();
        let policy = Policy {
            probation_secs: cfg.probation.as_secs(),
            max_attempts: cfg.max_attempts,
        };
        let agent = Agent {
            status_path: dir.join("status.json"),
            trust_file,
            trust,
            store,
            keys,
            keys_path,
            installed,
            job,
            job_release,
            beacon_until: 0,
            epoch_seen: 0,
            directive: None,
            installer,
            blobs,
            http,
            policy,
            subscriptions: swell_mqtt::Subscriptions::new(
                [
                    cfg.topics.keys(&cfg.fleet),
                    cfg.topics.beacon(&cfg.fleet),
                    cfg.topics.manifests(&cfg.fleet),
                    cfg.topics.desired(&cfg.device),
                ]
                .into_iter()
                .map(|f| (f, QoS::AtLeastOnce))
                .collect(),
            ),
            client,
            link: Link::default(),
            work_tx,
            busy: false,
            queue: VecDeque::new(),
            committing: None,
            held_events: Vec::new(),
            held: Default::default(),
            before_keys: BeforeKeys::default(),
            boot,
            started: Instant::now(),
            last_probe: Instant::now(),
            last_heartbeat: Instant::now(),
            probes: Vec::new(),
            counters: Counters::default(),
            rebuilt,
            status_dirty: true,
            abort_after: std::env::var("SWELL_AGENT_ABORT_AFTER").ok(),
            key,
            cfg,
        };
        Ok((agent, eventloop, work_rx))
    }

    async fn main_loop(
        &mut self,
        eventloop: &mut EventLoop,
        work_rx: &mut WorkRx,
        stop: CancellationToken,
        sup: &mut dyn Supervisor,
    ) -> Result<(), AgentError> {
        let _span = info_span!("agent", device = %self.cfg.device).entered();
        self.persist_trust()?;
        self.recover()?;
        if let Err(e) = self.installer.start() {
            warn!(error = %e, "could not start the active release's process");
        }
        if let Some(detail) = self.rebuilt.take() {
            let release = self
                .installed
                .running
                .as_ref()
                .map_or(ReleaseId([0; 32]), |r| r.release);
            self.report(
                None,
                release,
                Phase::Failed(Reason {
                    code: reason::STORE_REBUILT,
                    detail,
                }),
                true,
            )?;
        }
        self.status_dirty = true;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut reconnect_at: Option<tokio::time::Instant> = None;
        let mut attempt = 0u32;
        loop {
            let backing_off = reconnect_at.is_some_and(|t| tokio::time::Instant::now() < t);
            tokio::select! {
                _ = stop.cancelled() => break,
                ev = eventloop.poll(), if !backing_off => {
                    reconnect_at = None;
                    match ev {
                        Ok(ev) => {
                            if matches!(ev, MqttEvent::Incoming(Packet::ConnAck(_))) {
                                attempt = 0;
                            }
                            self.on_mqtt(ev, eventloop).await?;
                        }
                        Err(e) => {
                            let wait = swell_mqtt::backoff(attempt);
                            attempt = attempt.saturating_add(1);
                            warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker connection lost");
                            // The outbox is the record of what is unsent: drop
                            // rumqttc's own replay queue and resend from the outbox.
                            eventloop.pending.clear();
                            self.link.disconnected();
                            reconnect_at = Some(tokio::time::Instant::now() + wait);
                            self.status_dirty = true;
                        }
                    }
                }
                Some((for_job, work)) = work_rx.recv() => {
                    self.busy = false;
                    self.on_work(for_job, work)?;
                    self.next_task();
                    self.status_dirty = true;
                }
                _ = tick.tick() => {
                    sup.alive();
                    self.on_tick()?;
                }
            }
        }
        info!("stopping");
        let was_connected = self.link.connected;
        self.link.connected = false;
        self.write_status();
        if was_connected {
            let _ = self.client.try_publish(
                self.cfg.topics.online(&self.cfg.device),
                QoS::AtLeastOnce,
                true,
                "0",
            );
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                loop {
                    if eventloop.poll().await.is_err() {
                        break;
                    }
                }
            })
            .await;
        }
        self.installer.stop();
        Ok(())
    }

    // ---- durable state ----

    fn persist_trust(&self) -> Result<(), AgentError> {
        self.trust_file.store(&self.trust)?;
        Ok(())
    }

    fn save_installed(&self) -> Result<(), AgentError> {
        self.store.put("installed", &self.installed)?;
        Ok(())
    }

    fn write_status(&mut self) {
        self.status_dirty = false;
        let s = Status {
            device: self.cfg.device.to_string(),
            boot: self.boot,
            connected: self.link.connected,
            key_list_version: self.keys.as_ref().map(|k| k.version),
            waiting_for_key_list: self.before_keys.len(),
            running: self.installed.running.clone(),
            previous: self.installed.previous.clone(),
            job: self.job.as_ref().map(state::JobStatus::of),
            counter_floor: self.trust.counter_floor,
            outbox: self.store.queued(),
            outbox_dropped: self.store.dropped().unwrap_or(0),
            counters: self.counters.clone(),
        };
        if let Ok(json) = serde_json::to_vec_pretty(&s)
            && let Err(e) = crate::durable::write_atomic(&self.status_path, &json, 0o644)
        {
            debug!(error = %e, "status file not written");
        }
    }

    // ---- reports ----

    fn metrics(&self) -> Metrics {
        Metrics {
            progress_permille: 0,
            attempt: self.job.as_ref().map_or(0, |j| j.attempt),
            uptime_secs: self.started.elapsed().as_secs(),
        }
    }

    /// The header for the device's next message: its counter (MQTT-6), taken
    /// and persisted before anything carries it (STATE-1).
    fn next_stamp(&mut self) -> Result<Stamp, AgentError> {
        let seq = self.trust.next_report_seq();
        self.persist_trust()?;
        Ok(Stamp {
            epoch: 1,
            seq,
            issued_at: self.trust.trusted_now(unix_now()),
            expires_at: 0,
            audience: Audience::Any,
        })
    }

    /// Signs a report with the next persisted counter, queues it durably, sends.
    fn report(
        &mut self,
        rollout: Option<RolloutId>,
        release: ReleaseId,
        phase: Phase,
        heartbeat: bool,
    ) -> Result<(), AgentError> {
        let stamp = self.next_stamp()?;
        let seq = stamp.seq;
        let r = Report {
            device: self.cfg.device.clone(),
            rollout,
            release,
            phase,
            probes: self.probes.clone(),
            metrics: self.metrics(),
        };
        match seal(&self.key, stamp, &r) {
            Ok(bytes) => {
                info!(phase = r.phase.name(), seq, rollout = ?r.rollout.as_ref().map(|r| r.as_str()), "report");
                self.store.push(&bytes, heartbeat)?;
                self.counters.reports_queued += 1;
                self.link.pump(
                    &self.client,
                    &self.store,
                    &self.cfg.topics.report(&self.cfg.device),
                );
            }
            Err(e) => error!(error = %e, "report could not be sealed"),
        }
        Ok(())
    }

    fn hello(&mut self) -> Result<(), AgentError> {
        // A hello is not queued durably (the next connect sends a fresh one), so
        // it takes no counter it could not carry.
        if !self.link.connected {
            return Ok(());
        }
        let stamp = self.next_stamp()?;
        let h = Hello {
            device: self.cfg.device.clone(),
            fleet: self.cfg.fleet.clone(),
            key: self.key.public(),
            labels: self.cfg.labels.clone(),
            hardware: self.cfg.hardware.clone(),
            agent_version: concat!("swell-agent/", env!("CARGO_PKG_VERSION")).into(),
            proto_min: 1,
            proto_max: 1,
            boot: self.boot,
            running: self.installed.running.as_ref().map(|r| r.release),
            counter_floor: self.trust.counter_floor,
            enrollment_token: self.cfg.enrollment_token.clone(),
        };
        match seal(&self.key, stamp, &h) {
            Ok(bytes) => self.link.publish_other(
                &self.client,
                self.cfg.topics.hello(&self.cfg.device),
                bytes,
                false,
            ),
            Err(e) => error!(error = %e, "hello could not be sealed"),
        }
        Ok(())
    }

    // ---- MQTT ----

    async fn on_mqtt(
        &mut self,
        ev: MqttEvent,
        eventloop: &mut EventLoop,
    ) -> Result<(), AgentError> {
        // Subscribes on every CONNACK and checks each SUBACK (MQTT-5).
        for outcome in self.subscriptions.note(&self.client, &ev) {
            if matches!(outcome.state, swell_mqtt::FilterState::Refused(_)) {
                self.counters.subscriptions_refused += 1;
                self.status_dirty = true;
            }
        }
        match ev {
            MqttEvent::Incoming(Packet::ConnAck(ack)) => {
                eventloop.options.set_clean_start(false);
                info!(session_present = ack.session_present, "connected to broker");
                self.link.connected = true;
                self.link.publish_other(
                    &self.client,
                    self.cfg.topics.online(&self.cfg.device),
                    b"1".to_vec(),
                    true,
                );
                self.hello()?;
                self.link.pump(
                    &self.client,
                    &self.store,
                    &self.cfg.topics.report(&self.cfg.device),
                );
                self.status_dirty = true;
            }
            MqttEvent::Incoming(Packet::Publish(p)) => {
                self.on_publish(&p)?;
                self.status_dirty = true;
                // Acknowledged only now: whatever it changed is on disk (MQTT-4).
                if let Err(e) = self.client.try_ack(&p) {
                    warn!(error = %e, "ack not queued");
                }
            }
            MqttEvent::Incoming(Packet::PubAck(ack)) => {
                if let Some(key) = self.link.acked(ack.pkid) {
                    self.store.ack(key)?;
                    self.counters.reports_acked += 1;
                    self.status_dirty = true;
                    self.link.pump(
                        &self.client,
                        &self.store,
                        &self.cfg.topics.report(&self.cfg.device),
                    );
                }
            }
            MqttEvent::Outgoing(Outgoing::Publish(pkid)) => self.link.sent(pkid),
            _ => {}
        }
        Ok(())
    }

    fn on_publish(&mut self, p: &Publish) -> Result<(), AgentError> {
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let now = unix_now();
        match self.cfg.topics.parse(&topic) {
            Ok(Topic::Keys { fleet }) if fleet == self.cfg.fleet => {
                self.on_key_list(&p.payload, now)
            }
            Ok(Topic::Beacon { fleet }) if fleet == self.cfg.fleet => {
                self.on_beacon(&p.payload, now)
            }
            Ok(Topic::Manifest { fleet, .. }) if fleet == self.cfg.fleet => {
                if self.keys.is_none() {
                    self.keep_until_keys(&topic, before_keys::Kind::Manifest, &p.payload);
                    return Ok(());
                }
                self.on_manifest(&p.payload, now)
            }
            Ok(Topic::Desired { device }) if device == self.cfg.device => {
                if self.keys.is_none() {
                    self.keep_until_keys(&topic, before_keys::Kind::Directive, &p.payload);
                    return Ok(());
                }
                self.on_directive(&p.payload, now)
            }
            _ => {
                self.counters.unknown_topics += 1;
                warn!(%topic, "message on a topic this agent does not read; ignored");
                Ok(())
            }
        }
    }

    fn on_key_list(&mut self, payload: &[u8], now: u64) -> Result<(), AgentError> {
        if payload.is_empty() {
            return Ok(());
        }
        let signed = match ThresholdSigned::decode(payload) {
            Ok(s) => s,
            Err(e) => {
                self.counters.rejected_key_lists += 1;
                warn!(reason = e.reason(), "key list refused: {e}");
                return Ok(());
            }
        };
        let trusted = self
            .keys
            .as_ref()
            .map_or_else(|| self.cfg.root.clone(), RootOfTrust::of);
        let current = self.keys.as_ref().map(|k| k.version);
        if let Ok(same) = signed.verify::<KeyList>(&trusted.roots, trusted.threshold)
            && Some(same.version) == current
        {
            return Ok(()); // retained re-delivery
        }
        match KeyList::accept(&signed, &trusted, current, self.trust.trusted_now(now)) {
            Ok(list) => {
                if let Err(e) = crate::durable::write_atomic(&self.keys_path, payload, 0o644) {
                    error!(error = %e, "key list not stored");
                    return Ok(());
                }
                self.trust.key_list_version = list.version;
                self.persist_trust()?;
                info!(version = list.version, "key list accepted");
                self.keys = Some(list);
                self.check_before_keys(now)?;
            }
            Err(e) => {
                self.counters.rejected_key_lists += 1;
                warn!(reason = "key_list", "key list refused: {e}");
            }
        }
        Ok(())
    }

    fn keep_until_keys(&mut self, topic: &str, kind: before_keys::Kind, payload: &[u8]) {
        self.status_dirty = true;
        if !self.before_keys.keep(topic, kind, payload) {
            self.counters.dropped_before_keys += 1;
            warn!(%topic, "too many messages before any key list; dropped");
        }
    }

    /// The messages that came before the first key list, checked now.
    fn check_before_keys(&mut self, now: u64) -> Result<(), AgentError> {
        let kept = self.before_keys.take();
        if !kept.is_empty() {
            debug!(
                messages = kept.len(),
                "checking what came before the key list"
            );
        }
        for (kind, payload) in kept {
            match kind {
                before_keys::Kind::Beacon => self.on_beacon(&payload, now)?,
                before_keys::Kind::Directive => self.on_directive(&payload, now)?,
                before_keys::Kind::Manifest => self.on_manifest(&payload, now)?,
            }
        }
        Ok(())
    }

    fn on_beacon(&mut self, payload: &[u8], now: u64) -> Result<(), AgentError> {
        let Some(keys) = &self.keys else {
            let topic = self.cfg.topics.beacon(&self.cfg.fleet);
            self.keep_until_keys(&topic, before_keys::Kind::Beacon, payload);
            return Ok(());
        };
        let checked = UnverifiedEnvelope::parse(payload).and_then(|env| {
            let key = keys
                .coordinator_keys
                .iter()
                .find(|k| k.key_id() == env.header.key_id)
                .ok_or(swell_protocol::EnvelopeError::BadSignature)?;
            env.verify::<Beacon>(key, self.trust.trusted_now(now))
        });
        let v = match checked {
            Ok(v) => v,
            Err(e) => {
                self.counters.rejected_beacons += 1;
                warn!(reason = e.reason(), "beacon refused: {e}");
                return Ok(());
            }
        };
        if v.header.epoch < self.trust.epoch_floor {
            self.counters.rejected_beacons += 1;
            warn!(
                epoch = v.header.epoch,
                floor = self.trust.epoch_floor,
                "beacon from a deposed coordinator"
            );
            return Ok(());
        }
        self.beacon_until = v.header.expires_at;
        if v.body.key_list_version > self.trust.key_list_version {
            info!(
                have = self.trust.key_list_version,
                announced = v.body.key_list_version,
                "newer key list announced"
            );
        }
        let old_floor = (self.trust.time_floor, self.trust.epoch_floor);
        self.trust.observe_time(v.header.issued_at);
        self.trust.epoch_floor = self.trust.epoch_floor.max(v.header.epoch);
        if (self.trust.time_floor, self.trust.epoch_floor) != old_floor {
            self.persist_trust()?;
        }
        if v.header.epoch > self.epoch_seen {
            // A coordinator epoch not seen before: it may have missed our hello.
            self.epoch_seen = v.header.epoch;
            self.hello()?;
        }
        self.apply(Event::FreshMessage {
            now: self.trust.trusted_now(now),
        })?;
        if !self.held.is_empty() && self.job.as_ref().is_none_or(Job::is_final) {
            self.retry_held()?;
        }
        Ok(())
    }

    fn device_facts(&self) -> (Option<(ReleaseId, Option<RolloutId>)>, Option<JobKey>) {
        let running = self
            .installed
            .running
            .as_ref()
            .map(|r| (r.release, r.rollout.clone()));
        let installing = self
            .job
            .as_ref()
            .filter(|j| !j.is_final())
            .map(|j| (j.rollout.clone(), j.release));
        (running, installing)
    }

    fn on_manifest(&mut self, payload: &[u8], now: u64) -> Result<(), AgentError> {
        self.evaluate_manifest(payload, now, false)
    }

    /// `recheck`: a held manifest evaluated again; if a newer one for its rollout
    /// arrived meanwhile it is simply dropped, not reported as a replay.
    fn evaluate_manifest(
        &mut self,
        payload: &[u8],
        now: u64,
        recheck: bool,
    ) -> Result<(), AgentError> {
        if payload.is_empty() {
            return Ok(()); // a cleared retained manifest
        }
        let Some(keys) = self.keys.clone() else {
            return Ok(()); // kept by the caller until a key list arrives
        };
        let (running, installing) = self.device_facts();
        let dev = Device {
            id: &self.cfg.device,
            fleet: &self.cfg.fleet,
            labels: &self.cfg.labels,
            hardware: &self.cfg.hardware,
            running,
            failed: self.installed.failed.clone(),
            installing,
            beacon_fresh: now < self.beacon_until,
            directive: self.directive.as_ref(),
        };
        let before = self.trust.clone();
        let mut trial = self.trust.clone();
        let verdict = evaluate(payload, &dev, &keys, &mut trial, now);
        // A manifest that cannot act *yet* is held, its floors not raised, and
        // evaluated again when a fresh beacon arrives or the current install
        // ends: after a reconnect, queued manifests can arrive before the
        // retained beacon, and one install runs at a time.
        let wait = match &verdict {
            Verdict::Reject {
                rollout: Some(r),
                reason,
                ..
            } if reason.code == reason::NO_FRESH_BEACON => Some((r.clone(), true)),
            Verdict::Install { rollout, .. }
                if self.job.as_ref().is_some_and(|j| !j.is_final()) =>
            {
                Some((rollout.clone(), false))
            }
            _ => None,
        };
        if let Some((rollout, refused)) = wait {
            let seen = self.held.get(&rollout).is_some_and(|h| h.0 == payload);
            if self.held.len() >= MAX_HELD && !self.held.contains_key(&rollout) {
                warn!(%rollout, "too many manifests waiting; dropped");
                return Ok(());
            }
            self.held.insert(rollout.clone(), (payload.to_vec(), now));
            if refused && !seen {
                if let Verdict::Reject {
                    rollout,
                    release_id: Some(rel),
                    reason,
                } = verdict
                {
                    self.counters.rejected_manifests += 1;
                    warn!(
                        reason = reason::name(reason.code),
                        "install deferred until a fresh beacon"
                    );
                    self.report(rollout, rel, Phase::Rejected(reason), false)?;
                }
            } else if !refused {
                info!(%rollout, "an install is under way; this one waits");
            }
            return Ok(());
        }
        if recheck
            && matches!(&verdict, Verdict::Reject { reason, .. } if reason.code == reason::REPLAYED)
        {
            return Ok(());
        }
        self.trust = trial;
        if let Some(r) = verdict_rollout(&verdict) {
            self.held.remove(r);
        }
        // The raised floors are persisted after the verdict is journaled and
        // before the ack: a crash in between redelivers the manifest, which then
        // still counts as new and finds the journaled job (STATE-1, STATE-4).
        match verdict {
            Verdict::Install {
                rollout,
                release_id,
                release,
                retry,
            } => {
                let _span = info_span!("install", rollout = %rollout, release = %hex::encode(&release_id.0[..6])).entered();
                let previous = self.installed.running.as_ref().map(|r| r.release);
                let (job, actions) =
                    Job::start(rollout, release_id, release.counter, retry, previous);
                info!(version = %release.version, "installing");
                self.store
                    .put("job-release", &Some(release.as_ref().clone()))?;
                self.job_release = Some(*release);
                self.commit_step(job, actions)?;
            }
            Verdict::RollBack {
                rollout,
                release_id,
            } => {
                info!(%rollout, "rollout rolling back");
                self.adopt_for_rollback(&rollout, release_id)?;
                self.apply(Event::RollbackRequested(Reason {
                    code: reason::OPERATOR,
                    detail: "rollout rolling back".into(),
                }))?;
            }
            Verdict::Reject {
                rollout,
                release_id,
                reason,
            } => {
                self.counters.rejected_manifests += 1;
                warn!(reason = reason::name(reason.code), detail = %reason.detail, "manifest refused");
                if let (Some(r), Some(rel)) = (rollout, release_id) {
                    self.report(Some(r), rel, Phase::Rejected(reason), false)?;
                }
            }
            Verdict::Duplicate => self.counters.duplicates += 1,
            Verdict::NotForMe(why) => debug!(why, "manifest not for this device"),
        }
        // Any verified manifest proves the coordinator is reachable (INST-2).
        if self.trust != before {
            self.persist_trust()?;
            self.apply(Event::FreshMessage {
                now: self.trust.trusted_now(now),
            })?;
        }
        Ok(())
    }

    /// A rollback can name a release installed by an earlier job than the
    /// current one: it becomes the current job again (as committed), so the
    /// state machine takes it back to what ran before it.
    fn adopt_for_rollback(
        &mut self,
        rollout: &RolloutId,
        release: ReleaseId,
    ) -> Result<(), AgentError> {
        if self
            .job
            .as_ref()
            .is_some_and(|j| &j.rollout == rollout && j.release == release)
        {
            return Ok(());
        }
        if self.job.as_ref().is_some_and(|j| !j.is_final()) {
            return Ok(()); // another install is under way; it finishes first
        }
        let Some(run) = self.installed.running.clone() else {
            return Ok(());
        };
        if run.release != release || run.rollout.as_ref() != Some(rollout) {
            return Ok(());
        }
        let job = Job {
            rollout: rollout.clone(),
            release,
            counter: run.counter,
            retry: 0,
            previous: self.installed.previous.as_ref().map(|p| p.release),
            stage: Stage::Committed,
            attempt: 1,
        };
        self.store.put("job-release", &None::<Release>)?;
        self.job_release = None;
        self.commit_step(job, Vec::new())
    }

    fn on_directive(&mut self, payload: &[u8], now: u64) -> Result<(), AgentError> {
        if payload.is_empty() {
            self.directive = None;
            return Ok(());
        }
        let Some(keys) = self.keys.clone() else {
            return Ok(());
        };
        let before = self.trust.clone();
        match verify_directive(payload, &self.cfg.device, &keys, &mut self.trust, now) {
            Ok(d) => {
                if self.trust != before {
                    self.persist_trust()?;
                }
                info!(
                    pin = d.pin.is_some(),
                    exclude = d.exclude,
                    "directive accepted"
                );
                let force = d.force_rollback.clone();
                self.directive = Some(d);
                if let Some(rollout) = force {
                    if let Some(r) = self.installed.running.clone()
                        && r.rollout.as_ref() == Some(&rollout)
                    {
                        self.adopt_for_rollback(&rollout, r.release)?;
                    }
                    let ours = self.job.as_ref().is_some_and(|j| j.rollout == rollout);
                    if ours {
                        self.apply(Event::RollbackRequested(Reason {
                            code: reason::OPERATOR,
                            detail: "directive".into(),
                        }))?;
                    }
                }
            }
            Err(r) => {
                self.counters.rejected_directives += 1;
                warn!(reason = reason::name(r.code), detail = %r.detail, "directive refused");
            }
        }
        Ok(())
    }

    // ---- the install state machine ----

    /// Journals `job`, then carries out `actions` (the order that makes every
    /// crash recoverable).
    fn commit_step(&mut self, job: Job, actions: Vec<Action>) -> Result<(), AgentError> {
        self.store.save_job(&job)?;
        if self.abort_after.as_deref() == Some(state::JobStatus::of(&job).stage) {
            // Crash-test hook: die like a power cut right after this journal write.
            error!(stage = ?job.stage, "SWELL_AGENT_ABORT_AFTER: aborting");
            std::process::abort();
        }
        if let Stage::Probation { .. } = job.stage
            && !matches!(
                self.job.as_ref().map(|j| &j.stage),
                Some(Stage::Probation { .. })
            )
        {
            self.last_probe = Instant::now();
        }
        let done = job.is_final();
        self.job = Some(job);
        for a in actions {
            self.carry_out(a)?;
        }
        self.status_dirty = true;
        if done {
            self.retry_held()?;
        }
        Ok(())
    }

    /// Evaluates the held manifests again.
    fn retry_held(&mut self) -> Result<(), AgentError> {
        let held = std::mem::take(&mut self.held);
        let now = unix_now();
        for (rollout, (bytes, _)) in held {
            debug!(%rollout, "re-evaluating a held manifest");
            self.evaluate_manifest(&bytes, now, true)?;
        }
        Ok(())
    }

    fn apply(&mut self, ev: Event) -> Result<(), AgentError> {
        let Some(job) = self.job.clone() else {
            return Ok(());
        };
        if self.committing.is_some() {
            // A commit is with the installer: its result moves the job on first,
            // then what arrived meanwhile.
            self.held_events.push(ev);
            return Ok(());
        }
        let (next, actions) = deployment::step(&job, ev, &self.policy);
        if next == job && actions.is_empty() {
            return Ok(());
        }
        if next.stage == Stage::Committed && job.stage != Stage::Committed {
            // Commit with the installer first; journal `Committed` only if it worked.
            self.committing = Some((next, actions));
            self.queue.push_front(Task::Commit);
            self.next_task();
            return Ok(());
        }
        self.commit_step(next, actions)
    }

    fn carry_out(&mut self, a: Action) -> Result<(), AgentError> {
        let Some(job) = self.job.clone() else {
            return Ok(());
        };
        match a {
            Action::Download => self.enqueue(Task::Download),
            Action::Install => self.enqueue(Task::Install),
            Action::RollBack => self.enqueue(Task::RollBack),
            Action::Commit => {
                // Done by the installer before the journal said so (see `apply`).
                self.installed.previous = self.installed.running.take();
                self.installed.running = Some(Running {
                    release: job.release,
                    rollout: Some(job.rollout.clone()),
                    counter: job.counter,
                    version: self
                        .job_release
                        .as_ref()
                        .map(|r| r.version.clone())
                        .unwrap_or_default(),
                });
                self.save_installed()?;
                self.trust.raise_counter_floor(job.counter);
                self.persist_trust()?;
                self.prune_blobs();
            }
            Action::Report(phase) => {
                if let Phase::RolledBack(_) | Phase::Failed(_) = &phase {
                    if matches!(phase, Phase::RolledBack(_))
                        && self
                            .installed
                            .running
                            .as_ref()
                            .is_some_and(|r| r.release == job.release)
                    {
                        self.installed.running = self.installed.previous.take();
                    }
                    self.installed.failed = Some((job.rollout.clone(), job.release, job.retry));
                    self.save_installed()?;
                }
                let changed = matches!(phase, Phase::RolledBack(_) | Phase::Committed);
                self.report(Some(job.rollout.clone()), job.release, phase, false)?;
                if changed && self.link.connected {
                    self.hello()?;
                }
            }
        }
        Ok(())
    }

    fn prune_blobs(&self) {
        let mut keep = Vec::new();
        if let Some(r) = &self.job_release {
            keep.extend(r.artifacts.iter().map(|a| a.digest));
            keep.extend(r.config.iter().map(|c| c.digest));
        }
        if let Err(e) = self.blobs.prune(&keep) {
            debug!(error = %e, "blob pruning failed");
        }
    }

    fn enqueue(&mut self, t: Task) {
        self.queue.push_back(t);
        self.next_task();
    }

    fn next_task(&mut self) {
        if self.busy {
            return;
        }
        if let Some(t) = self.queue.pop_front() {
            self.spawn(t);
        }
    }

    fn prepared(&self) -> Option<Prepared> {
        let job = self.job.as_ref()?;
        let r = self.job_release.as_ref()?;
        Some(Prepared {
            release: job.release,
            version: r.version.clone(),
            artifacts: r
                .artifacts
                .iter()
                .map(|a| PreparedArtifact {
                    kind: a.kind,
                    digest: a.digest,
                    length: a.length,
                    path: (a.kind != ArtifactKind::Container).then(|| self.blobs.path(&a.digest)),
                    image: (a.kind == ArtifactKind::Container)
                        .then(|| a.urls.first().cloned())
                        .flatten(),
                })
                .collect(),
            config: r
                .config
                .as_ref()
                .map(|c| (c.digest, c.length, self.blobs.path(&c.digest))),
            previous: job.previous,
        })
    }

    /// Starts a worker for the current job.
    fn spawn(&mut self, task: Task) {
        let Some(job) = self.job.clone() else { return };
        let for_job = Some((job.rollout.clone(), job.release));
        // Without its release (a rebuilt store) a job can still be rolled back,
        // but nothing can be downloaded or installed.
        let prep = self.prepared().unwrap_or_else(|| Prepared {
            release: job.release,
            version: String::new(),
            artifacts: Vec::new(),
            config: None,
            previous: job.previous,
        });
        let missing = prep.artifacts.is_empty();
        self.busy = true;
        let tx = self.work_tx.clone();
        let installer = self.installer.clone();
        let span = info_span!("work", rollout = %job.rollout, release = %hex::encode(&job.release.0[..6]), device = %self.cfg.device);
        if missing && matches!(task, Task::Download | Task::Install | Task::Commit) {
            error!(parent: &span, "journaled job without its release; abandoning it");
            let r = Reason {
                code: reason::STORE_REBUILT,
                detail: "release of the job is missing".into(),
            };
            let work = match task {
                Task::Download => Work::Downloaded(Err(r)),
                Task::Install => Work::Installed(Err(r)),
                _ => Work::Committed(Err(r)),
            };
            let _ = self.work_tx.try_send((for_job, work));
            return;
        }
        match task {
            Task::Download => {
                let blobs = self.blobs.clone();
                let http = self.http.clone();
                let limits = self.cfg.download.clone();
                let release = self.job_release.clone();
                tokio::spawn(async move {
                    let r: Result<(), Reason> = async {
                        let Some(release) = release else {
                            return Ok(());
                        };
                        for a in release
                            .artifacts
                            .iter()
                            .filter(|a| a.kind != ArtifactKind::Container)
                        {
                            blobs
                                .fetch(&http, &a.digest, a.length, &a.urls, &limits)
                                .await
                                .map_err(|e| e.reason())?;
                        }
                        if let Some(c) = &release.config {
                            blobs
                                .fetch(&http, &c.digest, c.length, &c.urls, &limits)
                                .await
                                .map_err(|e| e.reason())?;
                        }
                        Ok(())
                    }
                    .await;
                    if let Err(e) = &r {
                        warn!(parent: &span, reason = reason::name(e.code), detail = %e.detail, "download failed");
                    }
                    let _ = tx.send((for_job, Work::Downloaded(r))).await;
                });
            }
            Task::Install => {
                let blobs = self.blobs.clone();
                tokio::task::spawn_blocking(move || {
                    let _e = span.entered();
                    // INST-1: the installer gets bytes verified right now on the same path.
                    let verified = prep.artifacts.iter().all(|a| {
                        a.path.is_none() || blobs.verify(&a.digest, a.length).unwrap_or(false)
                    }) && prep
                        .config
                        .as_ref()
                        .is_none_or(|c| blobs.verify(&c.0, c.1).unwrap_or(false));
                    let r = if verified {
                        installer.install(&prep).map_err(|e| e.reason())
                    } else {
                        Err(Reason {
                            code: reason::DIGEST_MISMATCH,
                            detail: "blob changed after download".into(),
                        })
                    };
                    let _ = tx.blocking_send((for_job, Work::Installed(r)));
                });
            }
            Task::RollBack => {
                tokio::task::spawn_blocking(move || {
                    let _e = span.entered();
                    let r = installer.rollback(&prep).map_err(|e| e.reason());
                    let _ = tx.blocking_send((for_job, Work::RolledBack(r)));
                });
            }
            Task::Commit => {
                tokio::task::spawn_blocking(move || {
                    let _e = span.entered();
                    let r = installer.commit(&prep).map_err(|e| e.reason());
                    let _ = tx.blocking_send((for_job, Work::Committed(r)));
                });
            }
            Task::Probe => {
                let probes = self.cfg.probes.clone();
                let http = self.http.clone();
                tokio::spawn(async move {
                    let round = probe::run_all(&probes, &http, installer.as_ref()).await;
                    let _ = tx.send((for_job, Work::Probed(round))).await;
                });
            }
        }
    }

    fn on_work(&mut self, for_job: Option<JobKey>, work: Work) -> Result<(), AgentError> {
        let current = self.job.as_ref().map(|j| (j.rollout.clone(), j.release));
        if for_job != current {
            debug!("result of an earlier job; ignored");
            return Ok(());
        }
        let now = self.trust.trusted_now(unix_now());
        match work {
            Work::Downloaded(Ok(())) => self.apply(Event::Downloaded),
            Work::Downloaded(Err(r)) => self.apply(Event::DownloadFailed(r)),
            Work::Installed(Ok(())) => self.apply(Event::Installed { now }),
            Work::Installed(Err(r)) => {
                warn!(detail = %r.detail, "install failed");
                self.apply(Event::InstallFailed(r))
            }
            Work::RolledBack(Ok(())) => self.apply(Event::RolledBack),
            Work::RolledBack(Err(r)) => {
                // Keep trying: a device must end on its previous release.
                error!(detail = %r.detail, "rollback failed; retrying");
                self.queue.push_back(Task::RollBack);
                Ok(())
            }
            Work::Committed(r) => {
                let Some((next, actions)) = self.committing.take() else {
                    return Ok(());
                };
                match r {
                    Ok(()) => self.commit_step(next, actions)?,
                    Err(r) => {
                        warn!(detail = %r.detail, "commit failed; rolling back");
                        self.apply(Event::ProbeFailed(r))?;
                    }
                }
                for ev in std::mem::take(&mut self.held_events) {
                    self.apply(ev)?;
                }
                Ok(())
            }
            Work::Probed(round) => {
                self.probes = round.results;
                match round.failure {
                    Some(r) => {
                        warn!(detail = %r.detail, "probe failed");
                        self.apply(Event::ProbeFailed(r))
                    }
                    None => self.apply(Event::ProbesOk { now }),
                }
            }
        }
    }

    fn on_tick(&mut self) -> Result<(), AgentError> {
        if self.status_dirty {
            self.write_status();
        }
        let now = self.trust.trusted_now(unix_now());
        if let Some(Job {
            stage:
                Stage::Probation {
                    since,
                    fresh_after_activation,
                },
            ..
        }) = self.job.clone()
        {
            let deadline = since + self.cfg.probation.as_secs() + self.cfg.reach_timeout.as_secs();
            if !fresh_after_activation && now > deadline {
                // INST-2: healthy means still manageable.
                self.apply(Event::ProbeFailed(Reason {
                    code: reason::UNREACHABLE_AFTER_ACTIVATE,
                    detail: "no coordinator message after activation".into(),
                }))?;
            } else if !self.busy
                && self.committing.is_none()
                && self.last_probe.elapsed() >= self.cfg.probe_interval
            {
                self.last_probe = Instant::now();
                self.spawn(Task::Probe);
            }
        }
        if self.last_heartbeat.elapsed() >= self.cfg.heartbeat {
            self.last_heartbeat = Instant::now();
            let (phase, release) = match &self.installed.running {
                Some(r) => (Phase::Committed, r.release),
                None => (Phase::Init, ReleaseId([0; 32])),
            };
            self.report(None, release, phase, true)?;
        }
        Ok(())
    }

    /// After a restart: finish what a crash interrupted (DESIGN §6, INST-3).
    fn recover(&mut self) -> Result<(), AgentError> {
        let Some(job) = self.job.clone() else {
            return Ok(());
        };
        let _span = info_span!("recover", rollout = %job.rollout).entered();
        // A final job whose bookkeeping was cut short.
        match &job.stage {
            Stage::Committed => {
                if self.installed.running.as_ref().map(|r| r.release) != Some(job.release) {
                    info!("finishing an interrupted commit");
                    self.carry_out(Action::Commit)?;
                }
                return Ok(());
            }
            Stage::RolledBack { .. } | Stage::Failed { .. } => {
                if self.installed.failed.as_ref().map(|f| (&f.0, f.1))
                    != Some((&job.rollout, job.release))
                {
                    if self
                        .installed
                        .running
                        .as_ref()
                        .is_some_and(|r| r.release == job.release)
                        && matches!(job.stage, Stage::RolledBack { .. })
                    {
                        self.installed.running = self.installed.previous.take();
                    }
                    self.installed.failed = Some((job.rollout.clone(), job.release, job.retry));
                    self.save_installed()?;
                }
                return Ok(());
            }
            _ => {}
        }
        let now = self.trust.trusted_now(unix_now());
        let (next, actions) = deployment::recover(&job, &self.policy, now);
        info!(stage = ?next.stage, attempt = next.attempt, "resuming an interrupted install");
        self.commit_step(next, actions)
    }
}

/// Loads the stored key list if it is still the one the trust file names and is
/// signed by its own roots and, on first use, by the pinned ones.
fn load_key_list(
    path: &std::path::Path,
    pinned: &RootOfTrust,
    trust: &TrustState,
) -> Option<KeyList> {
    let bytes = std::fs::read(path).ok()?;
    let signed = ThresholdSigned::decode(&bytes).ok()?;
    let list: KeyList = signed
        .verify(&pinned.roots, pinned.threshold)
        .ok()
        .or_else(|| {
            // Rotated since: it was verified when accepted; now it must still be
            // signed by its own roots and be the version the trust file names.
            let own: KeyList =
                swell_protocol::codec::decode_exact("key list", &signed.body, 8 * 1024).ok()?;
            signed
                .verify::<KeyList>(&own.roots, own.root_threshold)
                .ok()
        })?;
    (list.version == trust.key_list_version).then_some(list)
}
