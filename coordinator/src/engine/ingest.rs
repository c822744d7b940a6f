//! Device messages: Hellos (enrollment and facts), reports (counted by the
//! rollouts' trackers, their replay floor kept) and online flags. Each is
//! checked in a fixed order (topic, envelope, signature, device named in the
//! payload, fleet, enrollment, replay floor) and a refusal is counted by reason.

use super::{
    Engine, EngineError, MAX_PENDING_DEVICES, MAX_UNSUPPORTED_ANSWERED, Out, ParsedTopic, ReplyTo,
};
use crate::fleet::registry::{DeviceRecord, Enrollment, RegistryError};
use crate::precheck::{Planned, Precheck};
use crate::store::StoredReport;
use swell_protocol::envelope::{Audience, Header, Stamp, UnverifiedEnvelope, seal};
use swell_protocol::messages::{Enrolled, Hello, Report, SessionNote};
use swell_protocol::topics::Topic;
use swell_protocol::{DeviceId, EnvelopeError, MessageKind, PublicKey, enroll, version};
use tracing::{info, warn};

impl Engine {
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

    pub(super) fn plan_check<'a>(&self, parsed: &ParsedTopic, payload: &'a [u8]) -> Planned<'a> {
        let (report, device) = match parsed {
            Ok(Topic::Report { device }) => (true, device),
            Ok(Topic::Hello { device }) => (false, device),
            _ => return Planned::None,
        };
        let Ok(env) = UnverifiedEnvelope::parse(payload) else {
            return Planned::None;
        };
        let key = if report {
            self.devices.get(device).map(|d| d.key)
        } else {
            self.hello_key(device)
        };
        match key {
            // Reports only: an answer or a session note is checked as itself.
            Some(key) if report && env.kind() == Some(MessageKind::Report) => {
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
            Topic::OpsCmd { fleet } if fleet == self.s.fleet => {
                self.on_command(payload, reply, now)?
            }
            Topic::OpsCmd { fleet } => {
                let why = format!(
                    "for fleet {fleet}, this coordinator serves {}",
                    self.s.fleet
                );
                self.reject("other_fleet", "command", &why);
                vec![]
            }
            Topic::LegacyOpsCmd => self.on_legacy_command(payload, reply),
            _ => vec![],
        };
        out.extend(self.settle(now));
        Ok(out)
    }

    pub(super) fn on_online(&mut self, device: &DeviceId, payload: &[u8], now: u64) {
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
            for l in self
                .rollouts
                .values_mut()
                .filter(|l| l.rec.outcome.is_none())
            {
                l.tracker.on_online(slot);
            }
        }
    }

    /// The key a device's Hello must be signed with: an approved device's
    /// own. A pending binding is provisional (ENROLL-1): a pending device's
    /// Hello is checked self-signed, and one with a valid enrollment token
    /// replaces the key a Hello without one left there.
    fn hello_key(&self, device: &DeviceId) -> Option<swell_protocol::PublicKey> {
        self.devices
            .get(device)
            .filter(|d| d.enrollment == Enrollment::Approved)
            .map(|d| d.key)
    }

    pub(super) fn on_hello(
        &mut self,
        topic_device: &DeviceId,
        payload: &[u8],
        now: u64,
        pre: Precheck,
    ) -> Result<Vec<Out>, EngineError> {
        let key = self.hello_key(topic_device);
        // A check made ahead parsed the envelope already: it is parsed once.
        let verified = match pre.hello_with(key.as_ref()) {
            Some(checked) => checked,
            None => match UnverifiedEnvelope::parse(payload) {
                Ok(env) => Hello::verify(&env, key.as_ref(), now),
                Err(e) => {
                    self.reject(e.reason(), "hello", &e);
                    return Ok(vec![]);
                }
            },
        };
        let v = match verified {
            Ok(v) => v,
            Err(e) => {
                self.reject(
                    e.reason(),
                    "hello",
                    &format_args!("device {topic_device}: {e}"),
                );
                // An agent of another protocol version learns why it is not
                // heard (section 12 of docs/protocol.md).
                if matches!(
                    e,
                    EnvelopeError::UnsupportedProto { .. } | EnvelopeError::UnknownKind(_)
                ) && let Ok(env) = UnverifiedEnvelope::parse(payload)
                {
                    return self.answer_unsupported(topic_device, &env.header, now);
                }
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
            return self.answer_unsupported(topic_device, &v.header, now);
        }
        if v.header.epoch != h.incarnation {
            let why = format!(
                "device {}: epoch {} is not its incarnation {}",
                h.device, v.header.epoch, h.incarnation
            );
            self.reject("malformed", "hello", &why);
            return Ok(vec![]);
        }
        // ENROLL-2: the proof names this device, fleet and key, so it proves
        // nothing for anyone else.
        let token_ok = h.enrollment_proof.as_ref().is_some_and(|p| {
            self.s
                .enrollment_tokens
                .iter()
                .any(|t| enroll::verify(p, t, &h.device, &h.fleet, &h.key))
        });
        let newly_approved;
        let slot = match self.devices.slot(&h.device) {
            Some(slot) => {
                let Some(d) = self.devices.at_mut(slot) else {
                    return Ok(vec![]);
                };
                if d.key != h.key {
                    // Only a pending device gets here with another key.
                    if !token_ok {
                        let why = format!(
                            "device {} is pending with key {}; a Hello with another key needs a valid enrollment proof",
                            h.device,
                            d.key.key_id()
                        );
                        self.reject("forged", "hello", &why);
                        return Ok(vec![]);
                    }
                    warn!(
                        device = %h.device,
                        squatted_by = %d.key.key_id(),
                        key = %h.key.key_id(),
                        "a Hello with a valid enrollment proof replaces the key a Hello without one bound to this device"
                    );
                    d.key = h.key;
                    // The other key's counters are not this device's.
                    d.new_incarnation(h.incarnation, 0);
                }
                match h.incarnation.cmp(&d.incarnation) {
                    // A record from before protocol 3: the device's counter
                    // went on, so its floors hold.
                    _ if d.incarnation == 0 => d.incarnation = h.incarnation,
                    std::cmp::Ordering::Equal => {}
                    std::cmp::Ordering::Less => {
                        let why = format!(
                            "device {}: incarnation {} is older than {}",
                            h.device, h.incarnation, d.incarnation
                        );
                        self.reject("stale_incarnation", "hello", &why);
                        // Signed by its key: the device itself, whose trust
                        // state was rebuilt with a clock behind. The
                        // confirmation of its present incarnation tells it
                        // where to go on from.
                        return match self.devices.at(slot) {
                            Some(rec) => Ok(vec![self.enrolled(rec, now)?]),
                            None => Ok(vec![]),
                        };
                    }
                    // STATE-3: its trust state was rebuilt and its counter
                    // started again. Signed by its enrolled key; re-admitted
                    // at once with a valid proof, else it waits for approval.
                    std::cmp::Ordering::Greater => {
                        info!(
                            device = %h.device,
                            from = d.incarnation,
                            to = h.incarnation,
                            readmitted = token_ok,
                            "device starts a new incarnation"
                        );
                        d.new_incarnation(h.incarnation, 0);
                        self.counters.new_incarnations += 1;
                        if !token_ok && d.enrollment == Enrollment::Approved {
                            d.enrollment = Enrollment::Pending;
                            self.pending += 1;
                        }
                    }
                }
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
        let mut out = Vec::new();
        // Disjoint fields: the record is read in place, not copied.
        if let Some(rec) = self.devices.at(slot) {
            self.store.put_device(rec)?;
            // ENROLL-3: answered when the device's belief is not the truth
            // (a confirmation it lacks, or one it must drop); a fleet of
            // confirmed devices reconnecting at once costs nothing.
            if (rec.enrollment == Enrollment::Approved) != h.confirmed {
                out.push(self.enrolled(rec, now)?);
            }
            if rec.enrollment == Enrollment::Approved {
                if newly_approved {
                    info!(device = %rec.id, "device enrolled");
                }
                for l in self
                    .rollouts
                    .values_mut()
                    .filter(|l| l.rec.outcome.is_none() && &l.rec.spec.fleet == rec.fleet())
                {
                    l.tracker
                        .consider(slot, &rec.id, rec.labels(), rec.hardware(), true);
                }
            }
        }
        Ok(out)
    }

    /// The confirmation that `rec` is enrolled with its key in its
    /// incarnation (ENROLL-3), or for a device that is not (pending) the
    /// empty message that withdraws any: the answer to a Hello that believes
    /// otherwise, not retained (a confirmation per device would sit in the
    /// broker's memory; the device keeps it in its trust file instead).
    pub(super) fn enrolled(&self, rec: &DeviceRecord, now: u64) -> Result<Out, EngineError> {
        if rec.enrollment != Enrollment::Approved {
            return Ok(self.to_enrolled_topic(&rec.id, Vec::new()));
        }
        let stamp = Stamp {
            epoch: self.s.epoch,
            seq: now,
            issued_at: now,
            expires_at: 0,
            audience: Audience::Device(rec.id.clone()),
        };
        let body = Enrolled {
            device: rec.id.clone(),
            fleet: rec.fleet().clone(),
            key: rec.key,
            incarnation: rec.incarnation,
        };
        Ok(self.to_enrolled_topic(&rec.id, seal(&self.s.key, stamp, &body)?))
    }

    /// A message on `device`'s `enrolled` topic (never retained).
    pub(super) fn to_enrolled_topic(&self, device: &DeviceId, payload: Vec<u8>) -> Out {
        Out {
            topic: self.s.topics.enrolled(device),
            payload,
            retain: false,
            correlation: None,
            event: None,
        }
    }

    /// Tells a device whose Hello this coordinator cannot read which
    /// versions it speaks: signed, not retained, on the device's `desired`
    /// topic (which agents of every version read); at most once a minute per
    /// device, so a looping agent is not answered in a loop.
    fn answer_unsupported(
        &mut self,
        device: &DeviceId,
        header: &Header,
        now: u64,
    ) -> Result<Vec<Out>, EngineError> {
        if self.unsupported_answered.len() >= MAX_UNSUPPORTED_ANSWERED {
            self.unsupported_answered.clear();
        }
        let last = self.unsupported_answered.entry(device.clone()).or_insert(0);
        if *last != 0 && now < last.saturating_add(60) {
            return Ok(vec![]);
        }
        *last = now;
        let stamp = Stamp {
            epoch: self.s.epoch,
            seq: now,
            issued_at: now,
            expires_at: now + 3600,
            audience: Audience::Device(device.clone()),
        };
        Ok(vec![Out {
            topic: self.s.topics.desired(device),
            payload: seal(&self.s.key, stamp, &version::unsupported(header))?,
            retain: false,
            correlation: None,
            event: None,
        }])
    }

    /// What a verified message on a device's report topic must also be to
    /// count (MQTT-3, MQTT-6): about the device its topic names, from an
    /// approved device, in its current incarnation, above its report floor.
    /// Raises the floor and marks the device seen when it is.
    fn admit(
        &mut self,
        what: &str,
        topic_device: &DeviceId,
        body_device: &DeviceId,
        slot: usize,
        (epoch, seq): (u64, u64),
        now: u64,
    ) -> bool {
        if body_device != topic_device {
            let why = format!("topic names {topic_device}, payload {body_device}");
            self.reject("forged", what, &why);
            return false;
        }
        let Some(d) = self.devices.at_mut(slot) else {
            return false;
        };
        if d.enrollment != Enrollment::Approved {
            let e = RegistryError::NotApproved(topic_device.clone());
            self.reject(e.reason(), what, &e);
            return false;
        }
        // STATE-3: a message of an earlier life of the device's trust state
        // (a replay across a rebuild) is not counted against this one's floor.
        if d.incarnation != 0 && epoch != d.incarnation {
            let why = format!(
                "device {topic_device}: epoch {epoch}, its incarnation is {}",
                d.incarnation
            );
            self.reject("stale_incarnation", what, &why);
            return false;
        }
        if let Err(e) = d.accept_seq(seq) {
            self.reject(e.reason(), what, &e);
            return false;
        }
        d.seen(now);
        true
    }

    /// A device's agent says how often its connection was taken over
    /// (protocol 2): the same checks as a report, then its count is kept.
    fn on_session_note(
        &mut self,
        topic_device: &DeviceId,
        slot: usize,
        env: &UnverifiedEnvelope<'_>,
        key: &PublicKey,
        now: u64,
    ) {
        let v = match env.verify::<SessionNote>(key, now) {
            Ok(v) => v,
            Err(e) => {
                let why = format!("device {topic_device}: {e}");
                self.reject(e.reason(), "session note", &why);
                return;
            }
        };
        if !self.admit(
            "session note",
            topic_device,
            &v.body.device,
            slot,
            (v.header.epoch, v.header.seq),
            now,
        ) {
            return;
        }
        let SessionNote {
            takeovers,
            last_takeover,
            ..
        } = v.body;
        let last = self.takeovers.get(&slot).map_or(0, |&(n, _)| n);
        // A count below the last one is a new agent start counting again.
        let before = if takeovers >= last { last } else { 0 };
        self.counters.takeovers += u64::from(takeovers - before);
        if takeovers > before
            && let Some(g) = self.log_throttle.entry("taken_over").or_default().hit()
        {
            warn!(
                device = %topic_device,
                takeovers,
                suppressed = g.suppressed,
                "the device's connection was taken over by another client with its id (two agents with one device id, or a copy of its state)"
            );
        }
        self.takeovers.insert(slot, (takeovers, last_takeover));
    }

    /// Takeovers its agent reported for the device in `slot`.
    pub(super) fn takeovers_of(&self, slot: usize) -> u32 {
        self.takeovers.get(&slot).map_or(0, |&(n, _)| n)
    }

    pub(super) fn on_report(
        &mut self,
        topic_device: &DeviceId,
        payload: &[u8],
        now: u64,
        pre: Precheck,
    ) -> Result<Vec<Out>, EngineError> {
        let known = self
            .devices
            .slot(topic_device)
            .and_then(|slot| Some((slot, self.devices.at(slot)?.key)));
        // A check made ahead with the key the device has now parsed the
        // envelope already: it is parsed once.
        let prechecked = known.and_then(|(slot, key)| Some((slot, pre.report_with(&key)?)));
        let (slot, checked) = match prechecked {
            Some(found) => found,
            None => {
                let env = match UnverifiedEnvelope::parse(payload) {
                    Ok(e) => e,
                    Err(e) => {
                        self.reject(e.reason(), "report", &e);
                        return Ok(vec![]);
                    }
                };
                let Some((slot, key)) = known else {
                    let e = RegistryError::Unknown(topic_device.clone());
                    self.reject(e.reason(), "report", &e);
                    return Ok(vec![]);
                };
                if env.kind() == Some(MessageKind::SessionNote) {
                    self.on_session_note(topic_device, slot, &env, &key, now);
                    return Ok(vec![]);
                }
                if env.kind() == Some(MessageKind::Unsupported) {
                    if let Ok(v) = env.verify::<swell_protocol::messages::Unsupported>(&key, now) {
                        warn!(device = %topic_device, kind = v.body.kind, proto = v.body.proto, "device cannot read a message we sent");
                    }
                    return Ok(vec![]);
                }
                (slot, env.verify::<Report>(&key, now))
            }
        };
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
        if !self.admit(
            "report",
            topic_device,
            &v.body.device,
            slot,
            (v.header.epoch, v.header.seq),
            now,
        ) {
            return Ok(vec![]);
        }
        let Some(d) = self.devices.at_mut(slot) else {
            return Ok(vec![]);
        };
        let running_changed = v.body.phase == swell_protocol::messages::Phase::Committed
            && d.set_running(Some(v.body.release), &mut self.shared);
        self.counters.reports += 1;
        let (epoch, seq) = (v.header.epoch, v.header.seq);
        let r = v.body;
        if r.rollout.is_none()
            && let swell_protocol::messages::Phase::Rejected(why) = &r.phase
            && why.code == swell_protocol::messages::reason::NO_FRESH_BEACON
        {
            // FRESH-3 from the device's side: its beacons stopped arriving
            // while its reports still reach us.
            self.counters.possible_freezes += 1;
            if let Some(g) = self
                .log_throttle
                .entry("possible_freeze")
                .or_default()
                .hit()
            {
                warn!(
                    device = %r.device,
                    detail = %why.detail,
                    suppressed = g.suppressed,
                    "a device says no fresh beacon reached it: is the beacon withheld (a freeze), or this coordinator not publishing?"
                );
            }
        }
        // A finished rollout's counts are final: a later report only updates
        // the device's own record.
        let counted = r.rollout.as_ref().is_some_and(|rollout| {
            self.rollouts.get_mut(rollout).is_some_and(|l| {
                l.rec.outcome.is_none() && l.tracker.on_report(slot, &r.release, &r.phase)
            })
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
                    epoch,
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
}
