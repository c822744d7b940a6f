//! The device: everything an agent decides, as one pure state machine. The
//! `swell-agent` runtime runs it for the one device it is, the fleet simulator
//! runs one per virtual device, so the demo, the benchmark and every sim-based
//! test exercise the device that ships.
//!
//! In: the fleet's messages (key list, beacon, manifests, the device's
//! directive), the results of work (download, install, probe, commit,
//! rollback), the connection coming and going, and ticks, each with a
//! [`Clock`]. Out: [`Effect`]s, in the order they must be carried out. The
//! order is the crash-safety argument (STATE-1, STATE-4): a job is journaled
//! before its actions run, trust floors are persisted before the message that
//! raised them is acknowledged (the caller acknowledges after carrying out
//! every effect of a message), and a report's counter is persisted before the
//! report exists.
//!
//! Layout:
//! - this module: [`DeviceCore`], its [`Settings`], the [`Effect`]s, [`Task`]s
//!   and their results ([`Work`]), the durable state it starts from
//!   ([`Restored`]), and what it sends ([`Outgoing`]);
//! - `inbox`: the key list, beacon, manifests and directive;
//! - `installed`: what runs, what ran before, what failed ([`Installed`]);
//! - `job`: the install job: journal, actions, one task at a time, the commit
//!   ordering, the INST-2 reach deadline, probes, heartbeats, recovery;
//! - `waiting`: manifests that cannot act yet and messages that came before
//!   any key list.

mod inbox;
mod installed;
mod job;
mod waiting;

#[cfg(test)]
mod tests;

use crate::deployment::{Event, Job, Policy};
use crate::trust::TrustState;
use std::collections::VecDeque;
use std::sync::Arc;
use swell_protocol::cohort::Label;
use swell_protocol::envelope::{Audience, Stamp, seal};
use swell_protocol::messages::{
    DeviceDirective, Hello, KeyList, Metrics, Phase, ProbeResult, Reason, Release, Report,
    RootOfTrust, SessionNote,
};
use swell_protocol::{DeviceId, Digest, FleetId, ReleaseId, RolloutId, SecretKey};
use waiting::{BeforeKeys, Held};

pub use inbox::check_beacon;
pub use installed::{Installed, Running};

/// Which job a worker's result belongs to.
pub type JobKey = (RolloutId, ReleaseId);

/// Times an input happens at: the wall clock (seconds since the epoch, as the
/// device's clock says; the core never trusts it below its time floor) and a
/// monotonic clock in milliseconds for intervals (probes, heartbeats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    pub unix: u64,
    pub mono_ms: u64,
}

/// What does not change while a device runs and devices of one fleet share
/// (the simulator's devices share one copy).
#[derive(Debug, Clone)]
pub struct Settings {
    pub fleet: FleetId,
    pub hardware: String,
    /// `swell-agent/x.y.z` (the simulator says `sim-x.y.z`).
    pub agent_version: String,
    pub enrollment_token: Option<String>,
    /// The pinned roots a first key list must be signed by.
    pub roots: RootOfTrust,
    pub policy: Policy,
    /// INST-2: how long after the probation a new release may go without a
    /// verified coordinator message before it is rolled back.
    pub reach_timeout_secs: u64,
    /// A probe round at most this often during probation.
    pub probe_interval_ms: u64,
    /// A heartbeat report this often; `None`: none (the simulator's fleets).
    pub heartbeat_ms: Option<u64>,
}

/// The durable state a device starts from (what the agent's store and trust
/// file hold; a simulated device starts from nothing).
#[derive(Debug, Clone, Default)]
pub struct Restored {
    pub trust: TrustState,
    pub keys: Option<Arc<KeyList>>,
    pub installed: Installed,
    pub job: Option<Job>,
    pub job_release: Option<Release>,
    /// Starts of the agent so far, this one included.
    pub boot: u64,
    /// Why the trust file or the store had to be rebuilt, if they had.
    pub rebuilt: Option<String>,
}

/// Work the device hands to a worker, one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Fetch and verify the job's artifacts and config.
    Download,
    /// Install and activate them (INST-1: bytes verified on the same path).
    Install,
    /// Return to what ran before.
    RollBack,
    /// One round of probes.
    Probe,
    /// Make the new release permanent (before `Committed` is journaled).
    Commit,
}

/// What a worker finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    Downloaded(Result<(), Reason>),
    Installed(Result<(), Reason>),
    RolledBack(Result<(), Reason>),
    Committed(Result<(), Reason>),
    Probed {
        results: Vec<ProbeResult>,
        failure: Option<Reason>,
    },
}

/// A signed message for the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// On the device's `hello` topic; not queued durably (the next connection
    /// sends a fresh one).
    Hello { seq: u64, bytes: Vec<u8> },
    /// On the device's `report` topic, through the durable outbox; heartbeats
    /// are the first to go when the outbox is full.
    Report {
        seq: u64,
        bytes: Vec<u8>,
        phase: Phase,
        rollout: Option<RolloutId>,
        heartbeat: bool,
    },
    /// A [`SessionNote`] (protocol 2), on the `report` topic through the same
    /// outbox as reports (one counter, one order), evicted like a heartbeat.
    Note { seq: u64, bytes: Vec<u8> },
}

/// What the caller carries out, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Journal the install job durably, before anything after it.
    Journal(Job),
    /// Keep the job's release (its artifacts and config) with the journal.
    SaveRelease(Option<Release>),
    /// What runs, what ran before, what failed.
    SaveInstalled(Installed),
    /// Write the trust file (STATE-2) from [`DeviceCore::trust`] before the
    /// effects after this one. Its state when executed may be newer than when
    /// this was emitted; floors only rise, so that is as good (and the effect
    /// carries no copy of it: one per report and per beacon).
    PersistTrust,
    /// The accepted key list's bytes, for the next start.
    StoreKeyList(Vec<u8>),
    Send(Outgoing),
    /// Start a worker; its result comes back as [`DeviceCore::work_done`].
    Start(Task),
    /// Blobs other than these may go.
    PruneBlobs(Vec<Digest>),
}

/// Counts of refused input and delivery, for `status.json` and the simulator.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Counters {
    /// Manifests checked against the device's facts (each delivery, held
    /// ones again when they are evaluated again).
    pub manifests_evaluated: u64,
    pub rejected_manifests: u64,
    pub rejected_directives: u64,
    pub rejected_key_lists: u64,
    pub rejected_beacons: u64,
    pub unknown_topics: u64,
    pub duplicates: u64,
    pub reports_queued: u64,
    pub reports_acked: u64,
    /// Enrollment confirmations refused (bad signature, another device).
    pub rejected_enrollments: u64,
    /// `Unsupported` answers from the coordinator: it cannot read this
    /// agent's protocol version.
    pub unsupported_by_coordinator: u64,
    /// Subscriptions the broker refused: a misconfigured broker ACL, and the
    /// messages on those filters never arrive.
    pub subscriptions_refused: u64,
    /// Fleet messages dropped while waiting for a first key list (bounded).
    pub dropped_before_keys: u64,
    /// Times the beacon expired with no fresh one after it (FRESH-3): a
    /// coordinator that is down, or a beacon withheld to freeze the fleet.
    pub possible_freezes: u64,
}

/// The first wait before an unconfirmed device says Hello again, doubling
/// to the last (ENROLL-3). Long: an answer is rarely lost (the device
/// subscribes before it says Hello, and a coordinator that comes back says
/// so with a beacon of a new epoch, which brings a Hello), and a million
/// devices enrolling take minutes; a shorter wait would multiply that load.
const FIRST_HELLO_AGAIN_MS: u64 = 300_000;
const LAST_HELLO_AGAIN_MS: u64 = 1_800_000;

/// One device's decisions.
#[derive(Debug)]
pub struct DeviceCore {
    s: Arc<Settings>,
    id: DeviceId,
    labels: Vec<Label>,
    key: SecretKey,
    trust: TrustState,
    keys: Option<Arc<KeyList>>,
    installed: Installed,
    job: Option<Job>,
    // Boxed: rarely set, and a simulated fleet holds a million of these.
    job_release: Option<Box<Release>>,
    beacon_until: u64,
    /// What the device can justify as the time (TIME-1): this Unix time at
    /// this monotonic instant (the trust file's floor or its own clock at
    /// start); it advances with the monotonic clock, not with signed times.
    time_anchor: (u64, u64),
    epoch_seen: u64,
    directive: Option<Box<DeviceDirective>>,
    held: Held,
    before_keys: BeforeKeys,
    /// A commit with the installer: the job to journal once it succeeds.
    committing: Option<Box<(Job, Vec<crate::deployment::Action>)>>,
    /// Events that arrived during the commit.
    held_events: Vec<Event>,
    busy: bool,
    /// The expired beacon's possible freeze was reported (FRESH-3); a fresh
    /// beacon clears it.
    freeze_reported: bool,
    queue: VecDeque<Task>,
    connected: bool,
    boot: u64,
    rebuilt: Option<String>,
    probes: Vec<ProbeResult>,
    started_ms: u64,
    last_probe_ms: u64,
    last_heartbeat_ms: u64,
    /// Connections taken over since the start, and when the latest was
    /// (boxed: rarely set, and a simulated fleet holds a million cores).
    takeovers: Option<Box<(u32, u64)>>,
    /// While the enrollment is not confirmed: when (monotonic ms) to say
    /// Hello again, and the wait after that one (ENROLL-3: an answer lost,
    /// or a coordinator that was down, must not leave the device mute).
    hello_again: Option<(u64, u64)>,
    counters: Counters,
}

impl DeviceCore {
    pub fn new(
        settings: Arc<Settings>,
        id: DeviceId,
        labels: Vec<Label>,
        key: SecretKey,
        restored: Restored,
        clock: Clock,
    ) -> Self {
        let mut trust = restored.trust;
        let trust_floor = trust.time_floor;
        // A trust state the caller did not give an incarnation (the
        // simulator's devices, which keep nothing) takes one from the clock.
        if trust.incarnation == 0 {
            trust.incarnation = crate::trust::new_incarnation(clock.unix, 1);
            trust.enrolled_key = None;
        }
        // Never let a rebuilt trust file sit below what already runs (VER-2).
        if let Some(r) = &restored.installed.running {
            trust.raise_counter_floor(r.counter);
        }
        DeviceCore {
            s: settings,
            id,
            labels,
            key,
            trust,
            keys: restored.keys,
            installed: restored.installed,
            job: restored.job,
            job_release: restored.job_release.map(Box::new),
            beacon_until: 0,
            time_anchor: (trust_floor.max(clock.unix), clock.mono_ms),
            epoch_seen: 0,
            directive: None,
            held: Held::default(),
            before_keys: BeforeKeys::default(),
            committing: None,
            held_events: Vec::new(),
            busy: false,
            freeze_reported: false,
            queue: VecDeque::new(),
            connected: false,
            boot: restored.boot.max(1),
            rebuilt: restored.rebuilt,
            probes: Vec::new(),
            started_ms: clock.mono_ms,
            last_probe_ms: clock.mono_ms,
            last_heartbeat_ms: clock.mono_ms,
            takeovers: None,
            hello_again: None,
            counters: Counters::default(),
        }
    }

    /// The first input: the trust floors as they stand, an interrupted install
    /// resumed or rolled back (DESIGN §6, INST-3), and a `store_rebuilt` report
    /// if the store or trust file was rebuilt (STATE-3).
    pub fn start(&mut self, clock: Clock, out: &mut Vec<Effect>) {
        out.push(Effect::PersistTrust);
        self.recover(clock, out);
        if let Some(detail) = self.rebuilt.take() {
            let release = self.running_release();
            self.report(
                None,
                release,
                Phase::Failed(Reason {
                    code: swell_protocol::messages::reason::STORE_REBUILT,
                    detail,
                }),
                true,
                clock,
                out,
            );
        }
    }

    /// A connection to the broker: say Hello.
    pub fn connected(&mut self, clock: Clock, out: &mut Vec<Effect>) {
        self.connected = true;
        self.hello_again = None;
        self.hello(clock, out);
    }

    pub fn disconnected(&mut self) {
        self.connected = false;
    }

    /// The broker closed the connection because another client connected
    /// with this device's client id. The coordinator learns how often with a
    /// session note after every Hello from now on.
    pub fn taken_over(&mut self, clock: Clock) {
        let t = self.takeovers.get_or_insert_with(|| Box::new((0, 0)));
        t.0 = t.0.saturating_add(1);
        t.1 = clock.unix;
    }

    /// How far a signed time may move the time floor now (TIME-1): the
    /// justified time (its own clock, or the anchor plus the monotonic time
    /// since) plus the skew.
    fn time_ceiling(&self, clock: Clock) -> u64 {
        let (at, mono) = self.time_anchor;
        let elapsed = clock.mono_ms.saturating_sub(mono) / 1000;
        let justified = clock.unix.max(at.saturating_add(elapsed));
        justified.saturating_add(crate::trust::MAX_AHEAD_SECS)
    }

    /// Connections taken over since the start.
    pub fn takeovers(&self) -> u32 {
        self.takeovers.as_deref().map_or(0, |t| t.0)
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    // ---- what the caller reads ----

    pub fn settings(&self) -> &Settings {
        &self.s
    }
    pub fn id(&self) -> &DeviceId {
        &self.id
    }
    pub fn trust(&self) -> &TrustState {
        &self.trust
    }

    /// Whether the coordinator confirmed this device's enrollment for its key
    /// in this incarnation (ENROLL-3): until then it acts on no manifest and
    /// its reports wait in the outbox.
    pub fn enrolled(&self) -> bool {
        self.trust.enrolled_key == Some(self.key.public())
    }
    pub fn keys(&self) -> Option<&KeyList> {
        self.keys.as_deref()
    }
    pub fn installed(&self) -> &Installed {
        &self.installed
    }
    pub fn job(&self) -> Option<&Job> {
        self.job.as_ref()
    }
    /// The verified release of the current job (its artifacts and URLs).
    pub fn job_release(&self) -> Option<&Release> {
        self.job_release.as_deref()
    }
    pub fn boot(&self) -> u64 {
        self.boot
    }
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
    /// For counts only the caller sees (acks, topics, subscriptions).
    pub fn counters_mut(&mut self) -> &mut Counters {
        &mut self.counters
    }
    /// Fleet messages received before any key list, checked once one arrives.
    pub fn waiting_for_key_list(&self) -> usize {
        self.before_keys.len()
    }
    /// Manifests held until they can act (no fresh beacon, another install).
    pub fn held_manifests(&self) -> usize {
        self.held.len()
    }
    pub fn probes(&self) -> &[ProbeResult] {
        &self.probes
    }

    fn running_release(&self) -> ReleaseId {
        self.installed
            .running
            .as_ref()
            .map_or(ReleaseId([0; 32]), |r| r.release)
    }

    // ---- what the device sends ----

    /// The header of the device's next message: its counter (MQTT-6), taken and
    /// persisted before anything carries it (STATE-1).
    fn next_stamp(&mut self, clock: Clock, out: &mut Vec<Effect>) -> Stamp {
        let seq = self.trust.next_report_seq();
        out.push(Effect::PersistTrust);
        Stamp {
            epoch: self.trust.incarnation,
            seq,
            issued_at: self.trust.trusted_now(clock.unix),
            expires_at: 0,
            audience: Audience::Any,
        }
    }

    fn report(
        &mut self,
        rollout: Option<RolloutId>,
        release: ReleaseId,
        phase: Phase,
        heartbeat: bool,
        clock: Clock,
        out: &mut Vec<Effect>,
    ) {
        let stamp = self.next_stamp(clock, out);
        let seq = stamp.seq;
        let r = Report {
            device: self.id.clone(),
            rollout,
            release,
            phase,
            probes: self.probes.clone(),
            metrics: Metrics {
                progress_permille: 0,
                attempt: self.job.as_ref().map_or(0, |j| j.attempt),
                uptime_secs: clock.mono_ms.saturating_sub(self.started_ms) / 1000,
            },
        };
        match seal(&self.key, stamp, &r) {
            Ok(bytes) => {
                self.counters.reports_queued += 1;
                out.push(Effect::Send(Outgoing::Report {
                    seq,
                    bytes,
                    phase: r.phase,
                    rollout: r.rollout,
                    heartbeat,
                }));
            }
            Err(e) => tracing::error!(error = %e, "report could not be sealed"),
        }
    }

    /// A Hello, only while connected: it is not queued, so it takes no counter
    /// it could not carry.
    fn hello(&mut self, clock: Clock, out: &mut Vec<Effect>) {
        if !self.connected {
            return;
        }
        let stamp = self.next_stamp(clock, out);
        let seq = stamp.seq;
        let h = Hello {
            device: self.id.clone(),
            fleet: self.s.fleet.clone(),
            key: self.key.public(),
            labels: self.labels.clone(),
            hardware: self.s.hardware.clone(),
            agent_version: self.s.agent_version.clone(),
            proto_min: swell_protocol::version::PROTO_MIN,
            proto_max: swell_protocol::version::PROTO_MAX,
            boot: self.boot,
            running: self.installed.running.as_ref().map(|r| r.release),
            counter_floor: self.trust.counter_floor,
            incarnation: self.trust.incarnation,
            enrollment_proof: self.s.enrollment_token.as_deref().map(|t| {
                swell_protocol::enroll::prove(t, &self.id, &self.s.fleet, &self.key.public())
            }),
            confirmed: self.enrolled(),
        };
        match seal(&self.key, stamp, &h) {
            Ok(bytes) => out.push(Effect::Send(Outgoing::Hello { seq, bytes })),
            Err(e) => tracing::error!(error = %e, "hello could not be sealed"),
        }
        if !self.enrolled() {
            let wait = self.hello_again.map_or(FIRST_HELLO_AGAIN_MS, |(_, w)| {
                (w * 2).min(LAST_HELLO_AGAIN_MS)
            });
            self.hello_again = Some((clock.mono_ms + wait, wait));
        }
        if let Some(&(takeovers, last_takeover)) = self.takeovers.as_deref() {
            let stamp = self.next_stamp(clock, out);
            let seq = stamp.seq;
            let note = SessionNote {
                device: self.id.clone(),
                takeovers,
                last_takeover,
            };
            match seal(&self.key, stamp, &note) {
                Ok(bytes) => out.push(Effect::Send(Outgoing::Note { seq, bytes })),
                Err(e) => tracing::error!(error = %e, "session note could not be sealed"),
            }
        }
    }

    fn save_installed(&self, out: &mut Vec<Effect>) {
        out.push(Effect::SaveInstalled(self.installed.clone()));
    }

    fn persist_trust(&self, out: &mut Vec<Effect>) {
        out.push(Effect::PersistTrust);
    }
}
