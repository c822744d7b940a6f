//! The coordinator engine: everything between the MQTT session and the pure
//! rollout logic, without doing network I/O itself ("sans-IO", like rumqttc's
//! state). It takes incoming messages and clock ticks, updates the registry,
//! trackers and store, and returns what must be published. The server loop
//! ([`crate::server`]) carries that out.
//!
//! By responsibility: [`ingest`] (device messages: Hello, report, online
//! flag), [`commands`] (operator commands and their replies), [`inventory`]
//! (the fleet and device queries), [`drive`] (stepping rollouts, committing
//! their transitions, publishing manifests, statuses, events and beacons).
//!
//! Ordering (STATE-1): a rollout transition is committed and flushed to the store
//! before its manifest is returned for publishing; device facts are written before
//! the caller acknowledges the messages that carried them (the caller flushes once
//! per batch, then acks).

mod commands;
mod drive;
mod ingest;
mod inventory;
mod roster;

pub use commands::Refusal;

use crate::fleet::interner::Interner;
use crate::fleet::registry::{DeviceRecord, Enrollment, Registry};
use crate::fleet::tracker::Tracker;
use crate::ops::{Op, OpsParser};
use crate::rollout::spec::RolloutSpec;
use crate::rollout::state::RolloutState;
use crate::status::{RolloutEvent, RolloutStatus};
use crate::store::{RolloutRecord, Store, StoreError};
use drive::status_of;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use swell_mqtt::log_throttle::LogThrottle;
use swell_protocol::envelope::EnvelopeError;
use swell_protocol::messages::{KeyList, ManifestState};
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::topics::{Topic, TopicError, Topics};
use swell_protocol::{DeviceId, FleetId, RolloutId, SecretKey};
use tracing::{info, warn};

/// Most devices waiting for approval at once (a flood of Hellos cannot grow the
/// registry without bound).
pub const MAX_PENDING_DEVICES: usize = 10_000;
/// Devices remembered as answered `Unsupported` (for the once-a-minute limit);
/// the memory is dropped when it is full.
const MAX_UNSUPPORTED_ANSWERED: usize = 10_000;

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
    /// Pending devices silent this long are removed (ENROLL-4).
    pub pending_expiry: Duration,
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
    /// Devices whose agents said their connection was taken over.
    pub taken_over: u64,
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
    /// Takeovers of device connections, as their session notes tell them.
    pub takeovers: u64,
    /// Devices' reports that their beacon expired with no fresh one (FRESH-3).
    pub possible_freezes: u64,
    /// Hellos that started a device's new incarnation (STATE-3).
    pub new_incarnations: u64,
    /// Devices removed by an operator's `reject` (ENROLL-4).
    pub devices_rejected: u64,
    /// Pending devices removed for saying nothing for `pending_expiry`.
    pub pending_expired: u64,
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
    /// By registry slot: the takeovers a device's agent reported (its latest
    /// session note: count since its start, and when the latest was). Sparse.
    takeovers: HashMap<usize, (u32, u64)>,
    /// One log line per reason every 10 s.
    log_throttle: HashMap<&'static str, LogThrottle>,
    /// Set in Kubernetes mode: rollout commands go to the controller.
    forward_rollout_ops: bool,
    forwarded: Vec<Forwarded>,
    /// When each device whose Hello could not be read was last answered.
    unsupported_answered: HashMap<DeviceId, u64>,
    /// When pending devices were last checked for expiry.
    pending_swept: u64,
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
    /// Another coordinator acts for this fleet on this topic prefix (RO-014).
    #[error(
        "another coordinator is active for fleet {fleet} on topic prefix {prefix}: {other}; stop it, or give this one another fleet or prefix"
    )]
    AnotherCoordinator {
        fleet: String,
        prefix: String,
        other: Box<crate::presence::Presence>,
    },
    /// The fleet's presence topic could not be read (RO-014).
    #[error("claiming fleet {fleet}: {reason}")]
    Claim { fleet: String, reason: String },
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
        let ops = OpsParser::new(
            s.keys.operator_keys.clone(),
            s.topics.ops_cmd(&s.fleet),
            &loaded.operator_marks,
        );
        let mut e = Engine {
            s,
            store,
            devices: Registry::default(),
            shared: Interner::default(),
            pending: 0,
            rollouts: BTreeMap::new(),
            ops,
            counters: Counters::default(),
            takeovers: HashMap::new(),
            log_throttle: HashMap::new(),
            forward_rollout_ops: false,
            forwarded: Vec::new(),
            unsupported_answered: HashMap::new(),
            pending_swept: 0,
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
            // Only a report of the device's present incarnation is a floor
            // of it (the record's own floor covers those before protocol 3).
            if let Some(d) = e.devices.at_mut(slot)
                && rep.epoch == d.incarnation
            {
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
            rec.spec.release_id(),
            rec.spec.plan.clone(),
            rec.spec.selector.clone(),
            rec.spec.gate.critical_reasons.clone(),
            rec.spec.hardware.clone(),
        );
        for (slot, d) in self.devices.slots() {
            if d.enrollment == Enrollment::Approved && d.fleet() == &rec.spec.fleet {
                t.consider(slot, &d.id, d.labels(), d.hardware(), d.online);
            }
        }
        if rec.state.started {
            t.open(rec.state.open_below);
            let devices = &self.devices;
            t.settle(|slot| devices.at(slot).is_some_and(|d| d.online));
        }
        t
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
        g.taken_over = self.takeovers.len() as u64;
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
            t.ops_cmd(&self.s.fleet),
            t.legacy_ops_cmd(),
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
