//! The coordinator engine: everything between the MQTT session and the pure
//! rollout logic, without doing network I/O itself ("sans-IO", like rumqttc's
//! state). It takes incoming messages and clock ticks, updates the registry,
//! trackers and store, and returns what must be published. The server loop
//! ([`crate::server`]) carries that out.
//!
//! Ordering (STATE-1): a rollout transition is committed and flushed to the store
//! before its manifest is returned for publishing; device facts are written before
//! the caller acknowledges the messages that carried them (the caller flushes once
//! per batch, then acks).

use crate::fleet::interner::Interner;
use crate::fleet::registry::{DeviceRecord, Enrollment, Registry, RegistryError};
use crate::fleet::tracker::Tracker;
use crate::ops::{self, Op, OpsParser, Refused, Request};
use crate::precheck::{Planned, Precheck};
use crate::rollout::spec::RolloutSpec;
use crate::rollout::state::{self, Command, Observations, RolloutPhase, RolloutState};
use crate::status::{EventKind, Lifecycle, RolloutEvent, RolloutStatus, WaveProgress};
use crate::store::{DecisionEntry, RolloutRecord, Store, StoreError, StoredReport};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use swell_mqtt::log_throttle::LogThrottle;
use swell_protocol::envelope::{Audience, EnvelopeError, Stamp, UnverifiedEnvelope, seal};
use swell_protocol::messages::{Beacon, Hello, KeyList, Manifest, ManifestState, Release, Report};
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::topics::{Topic, TopicError, Topics};
use swell_protocol::{DeviceId, FleetId, MessageKind, PublicKey, RolloutId, SecretKey, version};
use tracing::{info, warn};

/// Most devices waiting for approval at once (a flood of Hellos cannot grow the
/// registry without bound).
pub const MAX_PENDING_DEVICES: usize = 10_000;

/// What the engine was configured with.
#[derive(Debug)]
pub struct Settings {
    pub fleet: FleetId,
    pub topics: Topics,
    pub key: SecretKey,
    /// The root-signed key list, as published to devices, and its content.
    pub key_list: ThresholdSigned,
    pub keys: KeyList,
    pub epoch: u64,
    pub enrollment_tokens: Vec<String>,
    pub beacon_ttl: Duration,
    pub manifest_ttl: Duration,
}

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// MQTT 5 correlation data for replies.
    pub correlation: Option<Vec<u8>>,
    /// The event this is, typed, for the process's own listeners (the
    /// Kubernetes controller), so nothing parses back the JSON it was written as.
    pub event: Option<Box<RolloutEvent>>,
}

/// Where a command's reply goes.
#[derive(Debug, Clone, Default)]
pub struct ReplyTo {
    pub response_topic: Option<String>,
    pub correlation: Option<Vec<u8>>,
}

/// An operator command that changes a rollout, received over MQTT while the
/// Kubernetes controller owns rollouts: it becomes a patch of the `Rollout`
/// resource (the single source of truth) and is answered once that patch lands.
#[derive(Debug, Clone)]
pub struct Forwarded {
    pub op: Op,
    pub id: Option<String>,
    pub reply_to: Option<String>,
    pub reply: ReplyTo,
    pub signer: Option<swell_protocol::KeyId>,
}

/// Fleet-wide gauges, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetGauges {
    pub approved: u64,
    pub pending: u64,
    pub online: u64,
    /// Rollouts by phase name.
    pub rollouts: BTreeMap<&'static str, u64>,
}

/// Counters, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub rejected: BTreeMap<&'static str, u64>,
    pub reports: u64,
    pub hellos: u64,
    pub commands_accepted: u64,
    pub commands_refused: u64,
    pub manifests: u64,
}

struct Live {
    rec: RolloutRecord,
    tracker: Tracker,
    /// (wave, open_below, state, retry) of the newest manifest.
    published: Option<(u16, u64, ManifestState, u32)>,
    published_at: u64,
}

/// A message's topic as [`Topics::parse`] read it.
pub type ParsedTopic = Result<Topic, TopicError>;

/// The engine.
pub struct Engine {
    s: Settings,
    store: Arc<dyn Store>,
    devices: Registry,
    /// Shared hardware, agent and label strings of the registry.
    shared: Interner,
    pending: usize,
    rollouts: BTreeMap<RolloutId, Live>,
    ops: OpsParser,
    pub counters: Counters,
    /// One log line per reason every 10 s.
    log_throttle: HashMap<&'static str, LogThrottle>,
    /// Set in Kubernetes mode: rollout commands go to the controller.
    forward_rollout_ops: bool,
    forwarded: Vec<Forwarded>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("devices", &self.devices.len())
            .field("rollouts", &self.rollouts.len())
            .finish()
    }
}

/// Why the engine could not start or go on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("signing failed: {0}")]
    Sign(#[from] EnvelopeError),
    #[error("configuration: {0}")]
    Config(String),
    /// Another replica holds the leader lease now; this one must stop at once
    /// (its epoch is fenced off, ROLL-4).
    #[error("leadership lost: another replica holds the lease")]
    Deposed,
}

fn manifest_view(st: &RolloutState) -> (u16, u64, ManifestState, u32) {
    (st.wave, st.open_below, st.manifest_state(), st.retry)
}

fn wave_target(spec: &RolloutSpec, st: &RolloutState) -> u64 {
    spec.plan
        .open_below(usize::from(st.wave))
        .unwrap_or(u64::MAX)
}

impl Engine {
    /// Loads the store, rebuilds registry and trackers, and returns what must be
    /// (re)published: key list, beacon, every stored manifest (same content, this
    /// epoch) and statuses.
    pub fn start(
        s: Settings,
        store: Arc<dyn Store>,
        now: u64,
    ) -> Result<(Engine, Vec<Out>), EngineError> {
        if !s.keys.coordinator_keys.contains(&s.key.public()) {
            return Err(EngineError::Config(format!(
                "coordinator key {} is not in the key list's coordinator keys",
                s.key.key_id()
            )));
        }
        let loaded = store.load()?;
        for key in &loaded.corrupt {
            warn!(%key, "corrupt record set aside; the coordinator rebuilt without it");
        }
        let ops = OpsParser::new(s.keys.operator_keys.clone());
        let mut e = Engine {
            s,
            store,
            devices: Registry::default(),
            shared: Interner::default(),
            pending: 0,
            rollouts: BTreeMap::new(),
            ops,
            counters: Counters::default(),
            log_throttle: HashMap::new(),
            forward_rollout_ops: false,
            forwarded: Vec::new(),
        };
        let mut skipped = 0u64;
        for mut d in loaded.devices {
            // Online state is learned again from the retained online topics.
            d.online = false;
            if d.enrollment == Enrollment::Pending {
                e.pending += 1;
            }
            d.share(&mut e.shared);
            if e.devices.insert(d).is_none() {
                skipped += 1;
            }
        }
        if skipped > 0 {
            warn!(skipped, "registry full: stored devices not loaded");
        }
        for rec in loaded.rollouts {
            let tracker = e.new_tracker(&rec);
            e.rollouts.insert(
                rec.spec.id.clone(),
                Live {
                    rec,
                    tracker,
                    published: None,
                    published_at: 0,
                },
            );
        }
        for (rollout, device, rep) in loaded.reports {
            // A counted report was written without its device record.
            let Some(slot) = e.devices.slot(&device) else {
                continue;
            };
            if let Some(d) = e.devices.at_mut(slot) {
                d.last_seq = d.last_seq.max(rep.seq);
            }
            if let Some(l) = e.rollouts.get_mut(&rollout) {
                l.tracker.on_report(slot, &rep.release, &rep.phase);
            }
        }
        let mut out = vec![Out {
            topic: e.s.topics.keys(&e.s.fleet),
            payload: e
                .s
                .key_list
                .encode()
                .map_err(|err| EngineError::Config(err.to_string()))?,
            retain: true,
            correlation: None,
            event: None,
        }];
        out.extend(e.beacon(now)?);
        let ids: Vec<RolloutId> = e.rollouts.keys().cloned().collect();
        for id in ids {
            out.extend(e.publish_if_changed(&id, now, true)?);
        }
        info!(
            epoch = e.s.epoch,
            devices = e.devices.len(),
            rollouts = e.rollouts.len(),
            "coordinator state loaded"
        );
        Ok((e, out))
    }

    fn new_tracker(&self, rec: &RolloutRecord) -> Tracker {
        let mut t = Tracker::new(
            rec.spec.id.clone(),
            rec.spec.release_id(),
            rec.spec.plan.clone(),
            rec.spec.selector.clone(),
            rec.spec.gate.critical_reasons.clone(),
        );
        for (slot, d) in self.devices.values().enumerate() {
            if d.enrollment == Enrollment::Approved && d.fleet() == &rec.spec.fleet {
                t.consider(slot, &d.id, d.labels(), d.online);
            }
        }
        if rec.state.started {
            t.open(rec.state.open_below);
            let devices = &self.devices;
            t.settle(|slot| devices.at(slot).is_some_and(|d| d.online));
        }
        t
    }

    /// Walks the members of the waves opened since the last call (see
    /// [`Tracker::settle`]) and returns the rollouts' statuses, which wait for
    /// it. [`Engine::step_active`] leaves this to its caller, so a manifest goes
    /// out before a large wave is walked; every other entry point settles
    /// before it returns.
    pub fn settle(&mut self, now: u64) -> Vec<Out> {
        let ids: Vec<RolloutId> = self
            .rollouts
            .iter()
            .filter(|(_, l)| !l.tracker.settled())
            .map(|(id, _)| id.clone())
            .collect();
        ids.iter()
            .filter_map(|id| self.settle_rollout(id, now))
            .collect()
    }

    /// Settles one rollout's tracker; its status when there was anything to walk.
    fn settle_rollout(&mut self, id: &RolloutId, now: u64) -> Option<Out> {
        let l = self.rollouts.get_mut(id)?;
        if l.tracker.settled() {
            return None;
        }
        let devices = &self.devices;
        l.tracker
            .settle(|slot| devices.at(slot).is_some_and(|d| d.online));
        Some(self.status_out(id, now))
    }

    /// Kubernetes mode: rollout commands from MQTT are handed to the controller
    /// ([`Engine::take_forwarded`]) instead of being applied here.
    pub fn forward_rollout_ops(&mut self, on: bool) {
        self.forward_rollout_ops = on;
    }

    /// Commands waiting for the controller.
    pub fn take_forwarded(&mut self) -> Vec<Forwarded> {
        std::mem::take(&mut self.forwarded)
    }

    /// Applies a command from a trusted local source (the Kubernetes controller,
    /// whose caller was authorised by the API server). Returns what to publish and
    /// the outcome: a message and the status, or a reason and message.
    #[allow(clippy::type_complexity)]
    pub fn apply_local(
        &mut self,
        op: Op,
        now: u64,
    ) -> (Vec<Out>, Result<(String, Value), (&'static str, String)>) {
        let name = op.name();
        let applied = self.apply(op, now);
        let settled = self.settle(now);
        match applied {
            Ok((mut out, message, status)) => {
                out.extend(settled);
                info!(op = name, source = "kubernetes", "{message}");
                (out, Ok((message, status)))
            }
            Err((reason, message)) => {
                info!(
                    op = name,
                    source = "kubernetes",
                    reason,
                    "refused: {message}"
                );
                (settled, Err((reason, message)))
            }
        }
    }

    /// A reply to an operator command answered outside the engine.
    pub fn reply_out(
        &self,
        id: Option<&str>,
        reply_to: Option<&str>,
        reply: &ReplyTo,
        body: Value,
    ) -> Vec<Out> {
        self.reply(id, reply_to, reply, body)
    }

    /// Forgets a rollout (its `Rollout` resource was deleted): halts it if it is
    /// still running, clears its retained manifest and status so devices and
    /// late subscribers stop seeing it, and deletes its records. `false` when
    /// the engine did not know it.
    pub fn remove(&mut self, id: &RolloutId, now: u64) -> Result<(bool, Vec<Out>), EngineError> {
        let Some(l) = self.rollouts.get(id) else {
            return Ok((false, vec![]));
        };
        let mut out = Vec::new();
        if !l.rec.state.is_final() {
            // Halt first: an agent that still holds the manifest (offline now,
            // retained copy cleared) must not keep installing it.
            if let Ok(st) = state::command(&l.rec.spec, &l.rec.state, &Command::Abort, now) {
                out.extend(self.commit(id, st, None, Some(Command::Abort), now)?);
            }
        }
        let Some(l) = self.rollouts.remove(id) else {
            return Ok((false, out));
        };
        // The replay floors its reports held move into the device records.
        for rec in l.tracker.member_slots().filter_map(|s| self.devices.at(s)) {
            self.store.put_device(rec)?;
        }
        self.store.delete_rollout(id)?;
        for topic in [
            self.s.topics.manifest(&l.rec.spec.fleet, id),
            self.s.topics.ops_status(id),
        ] {
            // An empty retained publish deletes the retained message.
            out.push(Out {
                topic,
                payload: Vec::new(),
                retain: true,
                correlation: None,
                event: None,
            });
        }
        out.extend(self.event(id, now, EventKind::Lifecycle(Lifecycle::Removed)));
        info!(rollout = %id, "rollout removed");
        out.extend(self.settle(now));
        Ok((true, out))
    }

    /// Device and rollout gauges (walks the registry: call it on a timer, not
    /// per message).
    pub fn gauges(&self) -> FleetGauges {
        let mut g = FleetGauges::default();
        for d in self.devices.values() {
            match d.enrollment {
                Enrollment::Approved => g.approved += 1,
                Enrollment::Pending => g.pending += 1,
            }
            g.online += u64::from(d.online);
        }
        for l in self.rollouts.values() {
            *g.rollouts.entry(l.rec.state.phase_name()).or_default() += 1;
        }
        g
    }

    pub fn fleet(&self) -> &FleetId {
        &self.s.fleet
    }

    pub fn epoch(&self) -> u64 {
        self.s.epoch
    }

    pub fn topics(&self) -> &Topics {
        &self.s.topics
    }

    /// Subscriptions the coordinator needs. Plain, not `$share/…`: Mosquitto
    /// 2.0 keeps a persistent session's plain subscriptions across a restart
    /// and queues what devices publish before the coordinator is back, but
    /// restores the session without its shared subscriptions, so reports sent
    /// in that gap were acknowledged to devices and dropped.
    pub fn subscriptions(&self) -> Vec<String> {
        let t = &self.s.topics;
        vec![
            t.all_devices("hello"),
            t.all_devices("report"),
            t.all_devices("online"),
            t.ops_cmd(),
        ]
    }

    fn reject(&mut self, reason: &'static str, what: &str, detail: &dyn std::fmt::Display) {
        *self.counters.rejected.entry(reason).or_default() += 1;
        if let Some(g) = self.log_throttle.entry(reason).or_default().hit() {
            warn!(
                reason,
                suppressed = g.suppressed,
                "rejected {what}: {detail}"
            );
        }
    }

    /// Handles one incoming publish. Device facts are written to the store but not
    /// flushed: call [`Engine::flush`] before acknowledging.
    pub fn handle(
        &mut self,
        topic: &str,
        payload: &[u8],
        reply: ReplyTo,
        now: u64,
    ) -> Result<Vec<Out>, EngineError> {
        self.handle_checked(topic, payload, reply, now, Precheck::None)
    }

    /// Which signature check each device message needs, with the key the
    /// registry holds for its device now (cheap: no signature is checked),
    /// and each message's topic as parsed (for [`Engine::handle_parsed`], so
    /// it is parsed once). The checks themselves need nothing from the engine,
    /// so they can run on other threads while it applies earlier messages
    /// ([`crate::precheck::verify_planned`], [`crate::precheck::pipeline`]).
    pub fn plan_checks<'a>(
        &self,
        msgs: &[(&str, &'a [u8])],
    ) -> (Vec<ParsedTopic>, Vec<Planned<'a>>) {
        msgs.iter()
            .map(|(topic, payload)| {
                let parsed = self.s.topics.parse(topic);
                let plan = self.plan_check(&parsed, payload);
                (parsed, plan)
            })
            .unzip()
    }

    fn plan_check<'a>(&self, parsed: &ParsedTopic, payload: &'a [u8]) -> Planned<'a> {
        let (report, device) = match parsed {
            Ok(Topic::Report { device }) => (true, device),
            Ok(Topic::Hello { device }) => (false, device),
            _ => return Planned::None,
        };
        let Ok(env) = UnverifiedEnvelope::parse(payload) else {
            return Planned::None;
        };
        let key = self.devices.get(device).map(|d| d.key);
        match key {
            Some(key) if report && env.kind() != Some(MessageKind::Unsupported) => {
                Planned::Report { env, key }
            }
            _ if report => Planned::None,
            key => Planned::Hello { env, key },
        }
    }

    /// [`Engine::handle`] with a signature check made earlier (used only if it
    /// was made with the key the device has now).
    pub fn handle_checked(
        &mut self,
        topic: &str,
        payload: &[u8],
        reply: ReplyTo,
        now: u64,
        pre: Precheck,
    ) -> Result<Vec<Out>, EngineError> {
        let parsed = self.s.topics.parse(topic);
        self.handle_parsed(parsed, payload, reply, now, pre)
    }

    /// [`Engine::handle_checked`] with the topic parsed by [`Engine::plan_checks`].
    pub fn handle_parsed(
        &mut self,
        parsed: ParsedTopic,
        payload: &[u8],
        reply: ReplyTo,
        now: u64,
        pre: Precheck,
    ) -> Result<Vec<Out>, EngineError> {
        let parsed = match parsed {
            Ok(t) => t,
            Err(e) => {
                self.reject("bad_topic", "message", &e);
                return Ok(vec![]);
            }
        };
        let mut out = match parsed {
            Topic::Hello { device } => self.on_hello(&device, payload, now, pre)?,
            Topic::Report { device } => self.on_report(&device, payload, now, pre)?,
            Topic::Online { device } => {
                self.on_online(&device, payload, now);
                vec![]
            }
            Topic::OpsCmd => self.on_command(payload, reply, now)?,
            _ => vec![],
        };
        out.extend(self.settle(now));
        Ok(out)
    }

    fn on_online(&mut self, device: &DeviceId, payload: &[u8], now: u64) {
        let online = match payload {
            b"1" => true,
            b"0" => false,
            _ => {
                self.reject(
                    "malformed",
                    "online flag",
                    &format_args!("device {device}: payload is not 0 or 1"),
                );
                return;
            }
        };
        let Some(slot) = self.devices.slot(device) else {
            return;
        };
        let Some(d) = self.devices.at_mut(slot) else {
            return;
        };
        d.online = online;
        d.seen(now);
        if online && d.enrollment == Enrollment::Approved {
            for l in self.rollouts.values_mut() {
                l.tracker.on_online(slot);
            }
        }
    }

    fn on_hello(
        &mut self,
        topic_device: &DeviceId,
        payload: &[u8],
        now: u64,
        pre: Precheck,
    ) -> Result<Vec<Out>, EngineError> {
        let env = match UnverifiedEnvelope::parse(payload) {
            Ok(e) => e,
            Err(e) => {
                self.reject(e.reason(), "hello", &e);
                return Ok(vec![]);
            }
        };
        let key = self.devices.get(topic_device).map(|d| d.key);
        let verified = pre
            .hello_with(key.as_ref())
            .unwrap_or_else(|| verify_hello(&env, key.as_ref(), now));
        let v = match verified {
            Ok(v) => v,
            Err(e) => {
                self.reject(
                    e.reason(),
                    "hello",
                    &format_args!("device {topic_device}: {e}"),
                );
                return Ok(vec![]);
            }
        };
        let h = v.body;
        if &h.device != topic_device {
            self.reject(
                "forged",
                "hello",
                &format_args!("topic names {topic_device}, payload {}", h.device),
            );
            return Ok(vec![]);
        }
        if h.fleet != self.s.fleet {
            let e = RegistryError::WrongFleet {
                device: h.device.clone(),
                fleet: h.fleet.clone(),
            };
            self.reject(e.reason(), "hello", &e);
            return Ok(vec![]);
        }
        if version::negotiate(h.proto_min, h.proto_max).is_err() {
            self.reject(
                "unsupported",
                "hello",
                &format_args!(
                    "device {}: protocol {}..={}",
                    h.device, h.proto_min, h.proto_max
                ),
            );
            return Ok(vec![]);
        }
        let token_ok = h
            .enrollment_token
            .as_ref()
            .is_some_and(|t| self.s.enrollment_tokens.iter().any(|k| k == t));
        let newly_approved;
        let slot = match self.devices.slot(&h.device) {
            Some(slot) => {
                let Some(d) = self.devices.at_mut(slot) else {
                    return Ok(vec![]);
                };
                if let Err(e) = d.accept_hello_seq(v.header.seq) {
                    self.reject(e.reason(), "hello", &e);
                    return Ok(vec![]);
                }
                d.update_from_hello(&h, now, &mut self.shared);
                newly_approved = d.enrollment == Enrollment::Pending && token_ok;
                if newly_approved {
                    d.enrollment = Enrollment::Approved;
                    self.pending -= 1;
                }
                slot
            }
            None => {
                let enrollment = if token_ok {
                    Enrollment::Approved
                } else {
                    Enrollment::Pending
                };
                let pending = enrollment == Enrollment::Pending;
                if pending && self.pending >= MAX_PENDING_DEVICES {
                    self.reject(
                        "too_many_pending",
                        "hello",
                        &format_args!("device {}", h.device),
                    );
                    return Ok(vec![]);
                }
                let rec =
                    DeviceRecord::from_hello(&h, v.header.seq, now, enrollment, &mut self.shared);
                let Some(slot) = self.devices.insert(rec) else {
                    self.reject(
                        "registry_full",
                        "hello",
                        &format_args!("device {}", h.device),
                    );
                    return Ok(vec![]);
                };
                if pending {
                    self.pending += 1;
                    info!(device = %h.device, "device awaits approval");
                }
                newly_approved = !pending;
                slot
            }
        };
        self.counters.hellos += 1;
        // Disjoint fields: the record is read in place, not copied.
        if let Some(rec) = self.devices.at(slot) {
            self.store.put_device(rec)?;
            if rec.enrollment == Enrollment::Approved {
                if newly_approved {
                    info!(device = %rec.id, "device enrolled");
                }
                for l in self
                    .rollouts
                    .values_mut()
                    .filter(|l| &l.rec.spec.fleet == rec.fleet())
                {
                    l.tracker.consider(slot, &rec.id, rec.labels(), true);
                }
            }
        }
        Ok(vec![])
    }

    fn on_report(
        &mut self,
        topic_device: &DeviceId,
        payload: &[u8],
        now: u64,
        pre: Precheck,
    ) -> Result<Vec<Out>, EngineError> {
        let env = match UnverifiedEnvelope::parse(payload) {
            Ok(e) => e,
            Err(e) => {
                self.reject(e.reason(), "report", &e);
                return Ok(vec![]);
            }
        };
        let Some((slot, d)) = self
            .devices
            .slot(topic_device)
            .and_then(|slot| Some((slot, self.devices.at(slot)?)))
        else {
            let e = RegistryError::Unknown(topic_device.clone());
            self.reject(e.reason(), "report", &e);
            return Ok(vec![]);
        };
        if env.kind() == Some(MessageKind::Unsupported) {
            if let Ok(v) = env.verify::<swell_protocol::messages::Unsupported>(&d.key, now) {
                warn!(device = %topic_device, kind = v.body.kind, proto = v.body.proto, "device cannot read a message we sent");
            }
            return Ok(vec![]);
        }
        let checked = pre
            .report_with(&d.key)
            .unwrap_or_else(|| env.verify::<Report>(&d.key, now));
        let v = match checked {
            Ok(v) => v,
            Err(e) => {
                self.reject(
                    e.reason(),
                    "report",
                    &format_args!("device {topic_device}: {e}"),
                );
                return Ok(vec![]);
            }
        };
        if &v.body.device != topic_device {
            self.reject(
                "forged",
                "report",
                &format_args!("topic names {topic_device}, payload {}", v.body.device),
            );
            return Ok(vec![]);
        }
        let Some(d) = self.devices.at_mut(slot) else {
            return Ok(vec![]);
        };
        if d.enrollment != Enrollment::Approved {
            let e = RegistryError::NotApproved(topic_device.clone());
            self.reject(e.reason(), "report", &e);
            return Ok(vec![]);
        }
        if let Err(e) = d.accept_seq(v.header.seq) {
            self.reject(e.reason(), "report", &e);
            return Ok(vec![]);
        }
        d.seen(now);
        let running_changed = v.body.phase == swell_protocol::messages::Phase::Committed
            && d.set_running(Some(v.body.release), &mut self.shared);
        self.counters.reports += 1;
        let seq = v.header.seq;
        let r = v.body;
        let counted = r.rollout.as_ref().is_some_and(|rollout| {
            self.rollouts
                .get_mut(rollout)
                .is_some_and(|l| l.tracker.on_report(slot, &r.release, &r.phase))
        });
        if counted && let Some(rollout) = &r.rollout {
            // One write: the stored report carries the replay floor.
            self.store.put_report(
                rollout,
                &r.device,
                &StoredReport {
                    release: r.release,
                    phase: r.phase,
                    seq,
                },
            )?;
        }
        if (running_changed || !counted)
            && let Some(rec) = self.devices.at(slot)
        {
            self.store.put_device(rec)?;
        }
        Ok(vec![])
    }

    fn reply(
        &self,
        id: Option<&str>,
        reply_to: Option<&str>,
        reply: &ReplyTo,
        body: Value,
    ) -> Vec<Out> {
        let topic = reply
            .response_topic
            .clone()
            .or_else(|| reply_to.map(str::to_string));
        let Some(topic) = topic else { return vec![] };
        // A reply never goes into the Swell tree or a wildcard.
        if topic.contains(['+', '#'])
            || topic.starts_with(self.s.topics.prefix())
            || topic.is_empty()
        {
            return vec![];
        }
        let mut body = body;
        if let Some(id) = id {
            body["id"] = json!(id);
        }
        vec![Out {
            topic,
            payload: body.to_string().into_bytes(),
            retain: false,
            correlation: reply.correlation.clone(),
            event: None,
        }]
    }

    fn on_command(
        &mut self,
        payload: &[u8],
        reply: ReplyTo,
        now: u64,
    ) -> Result<Vec<Out>, EngineError> {
        let req = match self.ops.parse(payload, now) {
            Ok(r) => r,
            Err(Refused {
                id,
                reply_to,
                reason,
                message,
            }) => {
                self.counters.commands_refused += 1;
                self.reject(reason, "command", &message);
                let body = json!({"ok": false, "reason": reason, "message": message});
                return Ok(self.reply(id.as_deref(), reply_to.as_deref(), &reply, body));
            }
        };
        let Request {
            id,
            reply_to,
            op,
            signer,
        } = req;
        let op_name = op.name();
        if self.forward_rollout_ops && op.changes_rollouts() {
            self.counters.commands_accepted += 1;
            self.forwarded.push(Forwarded {
                op,
                id,
                reply_to,
                reply,
                signer,
            });
            return Ok(vec![]);
        }
        let result = self.apply(op, now);
        let (mut out, body) = match result {
            Ok((out, message, status)) => {
                self.counters.commands_accepted += 1;
                info!(op = op_name, signer = ?signer.map(|k| k.to_string()), "{message}");
                (
                    out,
                    json!({"ok": true, "op": op_name, "message": message, "status": status}),
                )
            }
            Err((reason, message)) => {
                self.counters.commands_refused += 1;
                info!(op = op_name, reason, "command refused: {message}");
                (
                    vec![],
                    json!({"ok": false, "op": op_name, "reason": reason, "message": message}),
                )
            }
        };
        out.extend(self.reply(id.as_deref(), reply_to.as_deref(), &reply, body));
        Ok(out)
    }

    #[allow(clippy::type_complexity)]
    fn apply(
        &mut self,
        op: Op,
        now: u64,
    ) -> Result<(Vec<Out>, String, Value), (&'static str, String)> {
        if let Some((rollout, cmd)) = op.as_command() {
            let rollout = rollout.clone();
            return self.apply_command(&rollout, cmd, now);
        }
        match op {
            Op::Create {
                spec,
                allow_overlap,
            } => self.create(*spec, allow_overlap, now),
            Op::Approve { device } => {
                let unknown = || {
                    (
                        "unknown_device",
                        format!("device {device} has not said hello"),
                    )
                };
                let slot = self.devices.slot(&device).ok_or_else(unknown)?;
                let d = self.devices.at_mut(slot).ok_or_else(unknown)?;
                if d.enrollment == Enrollment::Approved {
                    return Err(("already", format!("device {device} is already approved")));
                }
                d.enrollment = Enrollment::Approved;
                self.pending -= 1;
                let rec = d.clone();
                self.store
                    .put_device(&rec)
                    .map_err(|e| ("store", e.to_string()))?;
                self.store.flush().map_err(|e| ("store", e.to_string()))?;
                for l in self
                    .rollouts
                    .values_mut()
                    .filter(|l| &l.rec.spec.fleet == rec.fleet())
                {
                    l.tracker.consider(slot, &rec.id, rec.labels(), rec.online);
                }
                Ok((
                    vec![],
                    format!("device {device} approved"),
                    json!({"device": device.as_str()}),
                ))
            }
            Op::Status { rollout } => match rollout {
                Some(r) => {
                    let l = self
                        .rollouts
                        .get(&r)
                        .ok_or(("unknown_rollout", format!("no rollout {r}")))?;
                    Ok((vec![], format!("status of {r}"), status_json(l, now)))
                }
                None => {
                    let all: Vec<Value> = self
                        .rollouts
                        .values()
                        .map(|l| status_json(l, now))
                        .collect();
                    Ok((vec![], format!("{} rollouts", all.len()), json!(all)))
                }
            },
            Op::Fleet => {
                let mut running: BTreeMap<String, u64> = BTreeMap::new();
                // label → release → devices: which experience runs where.
                let mut by_label: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
                let (mut approved, mut online) = (0u64, 0u64);
                for d in self.devices.values() {
                    approved += u64::from(d.enrollment == Enrollment::Approved);
                    online += u64::from(d.online);
                    let key = d
                        .running
                        .as_deref()
                        .map_or_else(|| "none".to_string(), |r| r.to_string());
                    for l in d.labels() {
                        *by_label
                            .entry(format!("{}={}", l.key, l.value))
                            .or_default()
                            .entry(key.clone())
                            .or_default() += 1;
                    }
                    *running.entry(key).or_default() += 1;
                }
                let body = json!({
                    "devices": self.devices.len(),
                    "approved": approved,
                    "pending": self.pending,
                    "online": online,
                    "running": running,
                    "by_label": by_label,
                });
                Ok((vec![], format!("{} devices", self.devices.len()), body))
            }
            Op::Devices {
                selector,
                release,
                online,
                limit,
            } => {
                let selector = selector
                    .as_deref()
                    .map(swell_protocol::cohort::Selector::parse)
                    .transpose()
                    .map_err(|e| ("invalid", format!("selector: {e}")))?;
                let release = release.map(|r| r.to_ascii_lowercase());
                let limit = limit.unwrap_or(1_000).min(10_000);
                let mut matched = 0usize;
                let mut rows = Vec::new();
                let mut sorted: Vec<&DeviceRecord> = self.devices.values().collect();
                sorted.sort_by(|a, b| a.id.cmp(&b.id));
                for d in sorted {
                    let run = d.running.as_deref().map(|r| r.to_string());
                    let keep = selector.as_ref().is_none_or(|s| s.matches(d.labels()))
                        && online.is_none_or(|o| o == d.online)
                        && release.as_deref().is_none_or(|want| match &run {
                            None => want == "none",
                            Some(r) => r.starts_with(want),
                        });
                    if !keep {
                        continue;
                    }
                    matched += 1;
                    if rows.len() < limit {
                        rows.push(json!({
                            "device": d.id.as_str(),
                            "enrollment": if d.enrollment == Enrollment::Approved { "approved" } else { "pending" },
                            "online": d.online,
                            "running": run,
                            "hardware": d.hardware(),
                            "agent": d.agent_version(),
                            "labels": d.labels().iter().map(|l| format!("{}={}", l.key, l.value)).collect::<Vec<_>>(),
                            "last_seen": d.last_seen(),
                        }));
                    }
                }
                let msg = format!("{matched} devices match");
                Ok((vec![], msg, json!({"matched": matched, "devices": rows})))
            }
            _ => Err(("invalid", "unsupported operation".into())),
        }
    }

    fn create(
        &mut self,
        spec: ops::CreateSpec,
        allow_overlap: bool,
        now: u64,
    ) -> Result<(Vec<Out>, String, Value), (&'static str, String)> {
        let spec = spec.into_spec(&self.s.fleet).map_err(|m| ("invalid", m))?;
        if spec.fleet != self.s.fleet {
            return Err((
                "invalid",
                format!(
                    "this coordinator serves fleet {}, not {}",
                    self.s.fleet, spec.fleet
                ),
            ));
        }
        if self.rollouts.contains_key(&spec.id) {
            return Err(("exists", format!("rollout {} already exists", spec.id)));
        }
        let release: Release = spec
            .release
            .verify(&self.s.keys.release_keys, self.s.keys.release_threshold)
            .map_err(|e| {
                (
                    "unsigned",
                    format!("release {}: {e}", spec.release_id().short()),
                )
            })?;
        if !allow_overlap {
            for l in self
                .rollouts
                .values()
                .filter(|l| !l.rec.state.is_final() && l.rec.spec.fleet == spec.fleet)
            {
                if !ops::provably_disjoint(&l.rec.spec.selector, &spec.selector) {
                    return Err((
                        "overlap",
                        format!(
                            "selector {:?} may select devices of active rollout {} ({:?}); narrow it or pass allow_overlap",
                            spec.selector.to_string(),
                            l.rec.spec.id,
                            l.rec.spec.selector.to_string()
                        ),
                    ));
                }
            }
        }
        let rec = RolloutRecord {
            spec,
            state: RolloutState::new(),
            manifest_seq: 0,
            decisions: 0,
            created_at: now,
        };
        self.store
            .commit_rollout(&rec, None)
            .map_err(|e| ("store", e.to_string()))?;
        let id = rec.spec.id.clone();
        let tracker = self.new_tracker(&rec);
        let members = tracker.members();
        self.rollouts.insert(
            id.clone(),
            Live {
                rec,
                tracker,
                published: None,
                published_at: 0,
            },
        );
        info!(rollout = %id, version = %release.version, members, "rollout created");
        let mut out = self
            .step_rollout(&id, now)
            .map_err(|e| ("store", e.to_string()))?;
        let status = self
            .rollouts
            .get(&id)
            .map(|l| status_json(l, now))
            .unwrap_or(Value::Null);
        out.extend(self.event(
            &id,
            now,
            EventKind::Lifecycle(Lifecycle::Created {
                version: release.version.clone(),
                members,
            }),
        ));
        Ok((
            out,
            format!(
                "rollout {id} created: release {} with {members} matching devices",
                release.version
            ),
            status,
        ))
    }

    fn apply_command(
        &mut self,
        id: &RolloutId,
        cmd: Command,
        now: u64,
    ) -> Result<(Vec<Out>, String, Value), (&'static str, String)> {
        let l = self
            .rollouts
            .get(id)
            .ok_or(("unknown_rollout", format!("no rollout {id}")))?;
        let st =
            state::command(&l.rec.spec, &l.rec.state, &cmd, now).map_err(|m| ("refused", m))?;
        if cmd == Command::Retry
            && let Some(l) = self.rollouts.get_mut(id)
        {
            l.tracker.retry();
        }
        let mut out = self
            .commit(id, st, None, Some(cmd.clone()), now)
            .map_err(|e| ("store", e.to_string()))?;
        out.extend(
            self.step_rollout(id, now)
                .map_err(|e| ("store", e.to_string()))?,
        );
        let status = self
            .rollouts
            .get(id)
            .map(|l| status_json(l, now))
            .unwrap_or(Value::Null);
        Ok((
            out,
            format!("{cmd:?} applied to {id}").to_lowercase(),
            status,
        ))
    }

    /// Stores a transition (with its inputs) and returns its events and manifest.
    fn commit(
        &mut self,
        id: &RolloutId,
        st: state::Step,
        obs: Option<Observations>,
        cmd: Option<Command>,
        now: u64,
    ) -> Result<Vec<Out>, EngineError> {
        let epoch = self.s.epoch;
        let Some(l) = self.rollouts.get_mut(id) else {
            return Ok(vec![]);
        };
        if st.next == l.rec.state && st.decisions.is_empty() {
            return Ok(vec![]);
        }
        let entry = DecisionEntry {
            at: now,
            epoch,
            before: l.rec.state.clone(),
            observations: obs,
            command: cmd,
            decisions: st.decisions.clone(),
            after: st.next.clone(),
        };
        let mut rec = l.rec.clone();
        rec.state = st.next;
        rec.decisions += 1;
        if l.published != Some(manifest_view(&rec.state)) && rec.state.started {
            rec.manifest_seq += 1;
        }
        // STATE-1: durable before anything is published.
        self.store.commit_rollout(&rec, Some(&entry))?;
        l.rec = rec;
        if l.rec.state.started {
            // O(1); the walk waits until the manifest is out (`settle`).
            l.tracker.open(l.rec.state.open_below);
        }
        for d in &st.decisions {
            info!(rollout = %id, wave = l.rec.state.wave, phase = l.rec.state.phase_name(), decision = ?d, "rollout decision");
        }
        let mut out = Vec::new();
        for d in &st.decisions {
            out.extend(self.event(id, now, EventKind::Decision(d.clone())));
        }
        out.extend(self.publish_if_changed(id, now, false)?);
        Ok(out)
    }

    fn event(&self, id: &RolloutId, now: u64, what: EventKind) -> Vec<Out> {
        let ev = RolloutEvent {
            at: now,
            epoch: self.s.epoch,
            rollout: id.to_string(),
            what,
        };
        vec![Out {
            topic: self.s.topics.ops_events(),
            payload: serde_json::to_vec(&ev).unwrap_or_default(),
            retain: false,
            correlation: None,
            event: Some(Box::new(ev)),
        }]
    }

    /// Publishes the manifest and status when what devices see changed, when the
    /// manifest nears expiry, or when forced (start of a new epoch).
    fn publish_if_changed(
        &mut self,
        id: &RolloutId,
        now: u64,
        force: bool,
    ) -> Result<Vec<Out>, EngineError> {
        let ttl = self.s.manifest_ttl.as_secs();
        let Some(l) = self.rollouts.get_mut(id) else {
            return Ok(vec![]);
        };
        let mut out = Vec::new();
        let view = manifest_view(&l.rec.state);
        let stale = now >= l.published_at.saturating_add(ttl / 2);
        if l.rec.state.started && (force || l.published != Some(view) || stale) {
            if l.published.is_some() && l.published == Some(view) {
                // Same content re-signed for freshness: a new seq, durably first.
                l.rec.manifest_seq += 1;
                self.store.commit_rollout(&l.rec, None)?;
            }
            let m = Manifest {
                rollout: l.rec.spec.id.clone(),
                fleet: l.rec.spec.fleet.clone(),
                selector: l.rec.spec.selector.clone(),
                canary: l.rec.spec.plan.canary().to_vec(),
                wave: l.rec.state.wave,
                open_below: l.rec.state.open_below,
                state: l.rec.state.manifest_state(),
                release: l.rec.spec.release.clone(),
                retry: l.rec.state.retry,
            };
            let stamp = Stamp {
                epoch: self.s.epoch,
                seq: l.rec.manifest_seq,
                issued_at: now,
                expires_at: now + ttl,
                audience: Audience::Fleet(l.rec.spec.fleet.clone()),
            };
            let bytes = seal(&self.s.key, stamp, &m)?;
            l.published = Some(view);
            l.published_at = now;
            self.counters.manifests += 1;
            out.push(Out {
                topic: self.s.topics.manifest(&l.rec.spec.fleet, id),
                payload: bytes,
                retain: true,
                correlation: None,
                event: None,
            });
        }
        // An unwalked tracker's counts are incomplete: `settle` publishes it.
        if l.tracker.settled() {
            out.push(self.status_out(id, now));
        }
        Ok(out)
    }

    /// The retained status of a rollout.
    fn status_out(&self, id: &RolloutId, now: u64) -> Out {
        Out {
            topic: self.s.topics.ops_status(id),
            payload: self
                .rollouts
                .get(id)
                .map_or(Value::Null, |l| status_json(l, now))
                .to_string()
                .into_bytes(),
            retain: true,
            correlation: None,
            event: None,
        }
    }

    fn step_rollout(&mut self, id: &RolloutId, now: u64) -> Result<Vec<Out>, EngineError> {
        let Some(l) = self.rollouts.get(id) else {
            return Ok(vec![]);
        };
        if l.rec.state.is_final() {
            return Ok(vec![]);
        }
        // Gates judge complete counts only.
        let mut out: Vec<Out> = self.settle_rollout(id, now).into_iter().collect();
        let Some(l) = self.rollouts.get(id) else {
            return Ok(out);
        };
        let obs = l.tracker.observe(
            now,
            l.rec.spec.max_in_flight,
            wave_target(&l.rec.spec, &l.rec.state),
        );
        let st = state::step(&l.rec.spec, &l.rec.state, &obs);
        out.extend(self.commit(id, st, Some(obs), None, now)?);
        Ok(out)
    }

    /// Evaluates every rollout still running: called right after a batch of
    /// reports, so a gate that the batch completed opens the next wave at once
    /// instead of on the next tick (gate-to-manifest latency). The opened
    /// waves are not walked yet: publish what this returns, then call
    /// [`Engine::settle`].
    pub fn step_active(&mut self, now: u64) -> Result<Vec<Out>, EngineError> {
        let ids: Vec<RolloutId> = self
            .rollouts
            .iter()
            .filter(|(_, l)| !l.rec.state.is_final())
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        for id in ids {
            out.extend(self.step_rollout(&id, now)?);
        }
        Ok(out)
    }

    /// Evaluates every active rollout; also re-signs manifests before they expire.
    pub fn tick(&mut self, now: u64) -> Result<Vec<Out>, EngineError> {
        let ids: Vec<RolloutId> = self.rollouts.keys().cloned().collect();
        let mut out = Vec::new();
        for id in ids {
            out.extend(self.step_rollout(&id, now)?);
            let stale = self.rollouts.get(&id).is_some_and(|l| {
                l.rec.state.started
                    && now
                        >= l.published_at
                            .saturating_add(self.s.manifest_ttl.as_secs() / 2)
            });
            if stale {
                out.extend(self.publish_if_changed(&id, now, true)?);
            }
        }
        out.extend(self.settle(now));
        Ok(out)
    }

    /// A signed freshness beacon (FRESH-3).
    pub fn beacon(&self, now: u64) -> Result<Vec<Out>, EngineError> {
        let stamp = Stamp {
            epoch: self.s.epoch,
            seq: now,
            issued_at: now,
            expires_at: now + self.s.beacon_ttl.as_secs().max(1),
            audience: Audience::Fleet(self.s.fleet.clone()),
        };
        let b = Beacon {
            fleet: self.s.fleet.clone(),
            key_list_version: self.s.keys.version,
        };
        Ok(vec![Out {
            topic: self.s.topics.beacon(&self.s.fleet),
            payload: seal(&self.s.key, stamp, &b)?,
            retain: true,
            correlation: None,
            event: None,
        }])
    }

    /// Makes device facts durable (before acknowledging their messages).
    pub fn flush(&self) -> Result<(), EngineError> {
        self.store.flush()?;
        Ok(())
    }

    /// Status of one rollout, as published.
    pub fn status(&self, id: &RolloutId, now: u64) -> Option<RolloutStatus> {
        self.rollouts.get(id).map(|l| status_of(l, now))
    }

    pub fn device(&self, id: &DeviceId) -> Option<&DeviceRecord> {
        self.devices.get(id)
    }

    pub fn rollout_state(&self, id: &RolloutId) -> Option<&RolloutState> {
        self.rollouts.get(id).map(|l| &l.rec.state)
    }
}

/// A Hello is checked with the enrolled key, or self-signed from a new device.
pub(crate) fn verify_hello(
    env: &UnverifiedEnvelope<'_>,
    enrolled: Option<&PublicKey>,
    now: u64,
) -> Result<swell_protocol::envelope::Verified<Hello>, EnvelopeError> {
    match enrolled {
        Some(k) => env.verify::<Hello>(k, now),
        None => Hello::verify_self_signed(env, now),
    }
}

/// The status as it goes in a command's reply (JSON, the operator protocol).
fn status_json(l: &Live, now: u64) -> Value {
    serde_json::to_value(status_of(l, now)).unwrap_or(Value::Null)
}

fn status_of(l: &Live, now: u64) -> RolloutStatus {
    let st = &l.rec.state;
    let spec = &l.rec.spec;
    let waves = l
        .tracker
        .counts()
        .iter()
        .enumerate()
        .map(|(i, c)| WaveProgress {
            index: i,
            label: spec.plan.wave_label(i),
            opened: st.started && i <= usize::from(st.wave),
            planned: c.planned,
            population: c.population,
            healthy: c.healthy,
            failed: c.failed,
            in_progress: c.in_progress,
            silent: c.silent(),
        })
        .collect();
    RolloutStatus {
        rollout: spec.id.to_string(),
        fleet: spec.fleet.to_string(),
        release: spec.release_id().to_string(),
        phase: st.phase_name().to_string(),
        paused_by: match &st.phase {
            RolloutPhase::Paused { reason, .. } => Some(reason.clone()),
            _ => None,
        },
        wave: st.wave,
        waves,
        open_below: st.open_below.to_string(),
        manifest_state: format!("{:?}", st.manifest_state()),
        manifest_seq: l.rec.manifest_seq,
        retry: st.retry,
        waiting: st.waiting.clone(),
        halt_reason: st.halt_reason.clone(),
        members: l.tracker.members(),
        selector: spec.selector.to_string(),
        policy: spec.policy,
        updated_at: now,
    }
}
