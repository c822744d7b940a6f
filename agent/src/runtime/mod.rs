//! The running agent: the loop that feeds the device core
//! ([`crate::device::DeviceCore`]) and carries out its effects. One task owns
//! the core, the store, the trust file, the outbox and the MQTT event loop;
//! downloads, installs, rollbacks, commits and probes run as workers (`work`,
//! one at a time) and come back to the core. Every effect of a message is
//! carried out before the message is acknowledged (STATE-1, MQTT-4).

mod link;
mod state;
mod work;

pub use state::Status;

use crate::config::AgentConfig;
use crate::device::{Clock, DeviceCore, Effect, JobKey, Outgoing, Restored, Settings, Work};
use crate::download::{Blobs, http_client};
use crate::install::{self, Installer};
use crate::store::AgentStore;
use crate::trust::{TrustFile, TrustState};
use link::Link;
use rumqttc::Outgoing as MqttOutgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, Publish};
use rumqttc::v5::{AsyncClient, Event as MqttEvent, EventLoop};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use swell_protocol::messages::{KeyList, RootOfTrust};
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::topics::Topic;
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
    #[error("no randomness for a new incarnation: {0}")]
    Random(String),
}

type WorkRx = mpsc::Receiver<(Option<JobKey>, Work)>;

/// The agent.
pub struct Agent {
    cfg: AgentConfig,
    core: DeviceCore,
    trust_file: TrustFile,
    store: AgentStore,
    keys_path: PathBuf,
    status_path: PathBuf,
    installer: Arc<dyn Installer>,
    blobs: Blobs,
    http: reqwest::Client,
    client: AsyncClient,
    subscriptions: swell_mqtt::Subscriptions,
    link: Link,
    work_tx: mpsc::Sender<(Option<JobKey>, Work)>,
    started: Instant,
    /// `status.json` is behind (written at most every tick).
    status_dirty: bool,
    /// When to connect again (takeovers by another client back off apart).
    reconnect: swell_mqtt::reconnect::Reconnect,
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
        swell_durable::private_dir(&dir).map_err(|source| AgentError::StateDir {
            path: dir.clone(),
            source,
        })?;
        let (key, created) = crate::identity::load_or_create(&dir.join("device.key"))?;
        if created {
            info!(device = %cfg.device, key = %hex::encode(key.public().0), "device key created");
        }
        let mut rebuilt = None;
        let trust_file = TrustFile::new(dir.join("trust"));
        let mut missing = false;
        let mut trust = match trust_file.load() {
            Ok(Some(t)) => t,
            Ok(None) => {
                missing = true;
                TrustState::default()
            }
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
        let boot = store.get::<u64>("boot")?.unwrap_or(0) + 1;
        store.put("boot", &boot)?;
        // STATE-3: a trust file gone from a device that ran before is a
        // rebuild, reported like a corrupt one.
        if missing && boot > 1 && rebuilt.is_none() {
            error!(
                "trust file missing although this device ran before; starting a new incarnation"
            );
            rebuilt = Some("trust file lost".to_string());
        }
        if trust.incarnation == 0 {
            let mut random = [0u8; 4];
            getrandom::fill(&mut random).map_err(|e| AgentError::Random(e.to_string()))?;
            trust.incarnation =
                crate::trust::new_incarnation(crate::clock::unix_now(), u32::from_le_bytes(random));
            info!(
                incarnation = trust.incarnation,
                "new trust state: a new incarnation"
            );
        }
        let keys_path = dir.join("keylist");
        let restored = Restored {
            keys: load_key_list(&keys_path, &cfg.root, &trust).map(Arc::new),
            trust,
            installed: store.get("installed")?.unwrap_or_default(),
            job: store.load_job()?,
            job_release: store
                .get::<Option<swell_protocol::messages::Release>>("job-release")?
                .flatten(),
            boot,
            rebuilt,
        };
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
        let started = Instant::now();
        let settings = Settings {
            fleet: cfg.fleet.clone(),
            hardware: cfg.hardware.clone(),
            agent_version: concat!("swell-agent/", env!("CARGO_PKG_VERSION")).into(),
            enrollment_token: cfg.enrollment_token.clone(),
            roots: cfg.root.clone(),
            policy: crate::deployment::Policy {
                probation_secs: cfg.probation.as_secs(),
                max_attempts: cfg.max_attempts,
            },
            reach_timeout_secs: cfg.reach_timeout.as_secs(),
            probe_interval_ms: crate::clock::millis(cfg.probe_interval),
            heartbeat_ms: Some(crate::clock::millis(cfg.heartbeat)),
        };
        let core = DeviceCore::new(
            Arc::new(settings),
            cfg.device.clone(),
            cfg.labels.clone(),
            key,
            restored,
            crate::clock::now(started),
        );
        let subscriptions = swell_mqtt::Subscriptions::new(
            [
                cfg.topics.keys(&cfg.fleet),
                cfg.topics.beacon(&cfg.fleet),
                cfg.topics.manifests(&cfg.fleet),
                cfg.topics.desired(&cfg.device),
                cfg.topics.enrolled(&cfg.device),
            ]
            .into_iter()
            .map(|f| (f, QoS::AtLeastOnce))
            .collect(),
        );
        let agent = Agent {
            status_path: dir.join("status.json"),
            trust_file,
            store,
            keys_path,
            installer,
            blobs,
            http,
            client,
            subscriptions,
            link: Link::default(),
            work_tx,
            started,
            status_dirty: true,
            reconnect: swell_mqtt::reconnect::Reconnect::default(),
            core,
            cfg,
        };
        Ok((agent, eventloop, work_rx))
    }

    fn clock(&self) -> Clock {
        crate::clock::now(self.started)
    }

    async fn main_loop(
        &mut self,
        eventloop: &mut EventLoop,
        work_rx: &mut WorkRx,
        stop: CancellationToken,
        sup: &mut dyn Supervisor,
    ) -> Result<(), AgentError> {
        let _span = info_span!("agent", device = %self.cfg.device).entered();
        let mut out = Vec::new();
        self.core.start(self.clock(), &mut out);
        self.execute(&mut out)?;
        if let Err(e) = self.installer.start() {
            warn!(error = %e, "could not start the active release's process");
        }
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut reconnect_at: Option<tokio::time::Instant> = None;
        loop {
            let backing_off = reconnect_at.is_some_and(|t| tokio::time::Instant::now() < t);
            tokio::select! {
                _ = stop.cancelled() => break,
                ev = eventloop.poll(), if !backing_off => {
                    reconnect_at = None;
                    match ev {
                        Ok(ev) => {
                            if matches!(ev, MqttEvent::Incoming(Packet::ConnAck(_))) {
                                self.reconnect.connected(std::time::Instant::now());
                            }
                            self.on_mqtt(ev, eventloop)?;
                        }
                        Err(e) => {
                            let took = swell_mqtt::taken_over(&e);
                            let w = self.reconnect.lost(took, std::time::Instant::now());
                            let wait = w.after;
                            if w.taken_over || w.kicked >= 3 {
                                self.core.taken_over(self.clock());
                                error!(device = %self.cfg.device, in_a_row = w.kicked, taken_over = w.taken_over, retry_in_ms = wait.as_millis() as u64, error = %e, "the broker keeps closing this connection soon after it opens: another client with this device's client id (two agents with one device id, or a copy of this one's state)? backing off");
                            } else {
                                warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker connection lost");
                            }
                            // The outbox is the record of what is unsent: drop
                            // rumqttc's own replay queue and resend from the outbox.
                            eventloop.pending.clear();
                            self.link.disconnected();
                            self.core.disconnected();
                            reconnect_at = Some(tokio::time::Instant::now() + wait);
                            self.status_dirty = true;
                        }
                    }
                }
                Some((for_job, work)) = work_rx.recv() => {
                    self.core.work_done(for_job, work, self.clock(), &mut out);
                    self.execute(&mut out)?;
                    self.status_dirty = true;
                }
                _ = tick.tick() => {
                    sup.alive();
                    if self.status_dirty {
                        self.write_status();
                    }
                    self.core.tick(self.clock(), &mut out);
                    if !out.is_empty() {
                        self.status_dirty = true;
                    }
                    self.execute(&mut out)?;
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

    /// Carries out the core's effects, in order, and empties `out`.
    fn execute(&mut self, out: &mut Vec<Effect>) -> Result<(), AgentError> {
        for effect in out.drain(..) {
            match effect {
                Effect::Journal(job) => {
                    self.store.save_job(&job)?;
                    let stage = state::JobStatus::of(&job).stage;
                    if self.cfg.abort_after.as_deref() == Some(stage) {
                        // Crash-test hook: die like a power cut right after this journal write.
                        error!(stage, "abort after this stage (testing hook): aborting");
                        std::process::abort();
                    }
                }
                Effect::SaveRelease(r) => self.store.put("job-release", &r)?,
                Effect::SaveInstalled(i) => self.store.put("installed", &i)?,
                Effect::PersistTrust => self.trust_file.store(self.core.trust())?,
                Effect::StoreKeyList(bytes) => {
                    if let Err(e) = swell_durable::write_atomic(&self.keys_path, &bytes, 0o644) {
                        error!(error = %e, "key list not stored; the next start reads the retained one");
                    }
                }
                Effect::Send(Outgoing::Hello { bytes, .. }) => self.link.publish_other(
                    &self.client,
                    self.cfg.topics.hello(&self.cfg.device),
                    bytes,
                    false,
                ),
                Effect::Send(Outgoing::Report {
                    seq,
                    bytes,
                    phase,
                    rollout,
                    heartbeat,
                }) => {
                    info!(phase = phase.name(), seq, rollout = ?rollout.as_ref().map(|r| r.as_str()), "report");
                    self.store.push(&bytes, heartbeat)?;
                    self.pump();
                }
                Effect::Send(Outgoing::Note { seq, bytes }) => {
                    info!(seq, takeovers = self.core.takeovers(), "session note");
                    self.store.push(&bytes, true)?;
                    self.pump();
                }
                Effect::Start(task) => self.start(task),
                Effect::PruneBlobs(keep) => {
                    if let Err(e) = self.blobs.prune(&keep) {
                        debug!(error = %e, "blob pruning failed");
                    }
                }
            }
            self.status_dirty = true;
        }
        Ok(())
    }

    fn start(&self, task: crate::device::Task) {
        let Some(job) = self.core.job() else { return };
        let span = info_span!("work", rollout = %job.rollout, release = %hex::encode(&job.release.0[..6]), device = %self.cfg.device);
        work::spawn(
            task,
            work::Context {
                for_job: self.core.job_key(),
                prepared: work::prepared(job, self.core.job_release(), &self.blobs),
                release: self.core.job_release().cloned(),
                blobs: self.blobs.clone(),
                http: self.http.clone(),
                limits: self.cfg.download.clone(),
                probes: self.cfg.probes.clone(),
                installer: self.installer.clone(),
                tx: self.work_tx.clone(),
            },
            span,
        );
    }

    fn write_status(&mut self) {
        self.status_dirty = false;
        let mut s = Status::of(
            &self.core,
            self.link.connected,
            self.store.queued(),
            self.store.dropped().unwrap_or(0),
        );
        s.closed_soon_in_a_row = self.reconnect.kicked();
        if let Ok(json) = serde_json::to_vec_pretty(&s)
            && let Err(e) = swell_durable::write_atomic(&self.status_path, &json, 0o644)
        {
            debug!(error = %e, "status file not written");
        }
    }

    // ---- MQTT ----

    /// Sends what the outbox holds, within the window, once the coordinator
    /// confirmed this device's enrollment (ENROLL-3): before that its
    /// reports would be refused, so they wait.
    fn pump(&mut self) {
        if self.core.enrolled() {
            self.link.pump(
                &self.client,
                &self.store,
                &self.cfg.topics.report(&self.cfg.device),
            );
        }
    }

    fn on_mqtt(&mut self, ev: MqttEvent, eventloop: &mut EventLoop) -> Result<(), AgentError> {
        // Subscribes on every CONNACK and checks each SUBACK (MQTT-5).
        for outcome in self.subscriptions.note(&self.client, &ev) {
            if matches!(outcome.state, swell_mqtt::FilterState::Refused(_)) {
                self.core.counters_mut().subscriptions_refused += 1;
                self.status_dirty = true;
            }
        }
        let mut out = Vec::new();
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
                self.core.connected(self.clock(), &mut out);
                self.execute(&mut out)?;
                self.pump();
                self.status_dirty = true;
            }
            MqttEvent::Incoming(Packet::Publish(p)) => {
                self.on_publish(&p, &mut out);
                self.execute(&mut out)?;
                // An enrollment confirmation lets waiting reports go.
                self.pump();
                self.status_dirty = true;
                // Acknowledged only now: whatever it changed is on disk (MQTT-4).
                if let Err(e) = self.client.try_ack(&p) {
                    warn!(error = %e, "ack not queued");
                }
            }
            MqttEvent::Incoming(Packet::PubAck(ack)) => {
                if let Some(key) = self.link.acked(ack.pkid) {
                    self.store.ack(key)?;
                    self.core.counters_mut().reports_acked += 1;
                    self.status_dirty = true;
                    self.pump();
                }
            }
            MqttEvent::Outgoing(MqttOutgoing::Publish(pkid)) => self.link.sent(pkid),
            _ => {}
        }
        Ok(())
    }

    /// Hands a message to the core by the channel it came on.
    fn on_publish(&mut self, p: &Publish, out: &mut Vec<Effect>) {
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let clock = self.clock();
        let core = &mut self.core;
        match self.cfg.topics.parse(&topic) {
            Ok(Topic::Keys { fleet }) if fleet == self.cfg.fleet => {
                core.on_key_list(&p.payload, clock, out);
            }
            Ok(Topic::Beacon { fleet }) if fleet == self.cfg.fleet => {
                core.on_beacon(&topic, &p.payload, p.retain, clock, out);
            }
            Ok(Topic::Manifest { fleet, .. }) if fleet == self.cfg.fleet => {
                core.on_manifest(&topic, &p.payload, clock, out);
            }
            Ok(Topic::Desired { device }) if device == self.cfg.device => {
                core.on_directive(&topic, &p.payload, clock, out);
            }
            Ok(Topic::Enrolled { device }) if device == self.cfg.device => {
                core.on_enrolled(&topic, &p.payload, clock, out);
            }
            _ => {
                core.counters_mut().unknown_topics += 1;
                warn!(%topic, "message on a topic this agent does not read; ignored");
            }
        }
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
