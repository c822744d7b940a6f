//! The fleet's messages: the key list, the beacon, manifests and the device's
//! directive. Authority comes from signatures, never from topics (MQTT-3): the
//! caller says which channel a message came on, the checks decide what it may
//! do.

use super::waiting::Kind;
use super::{Clock, DeviceCore, Effect};
use crate::deployment::{Event, Job, Stage};
use crate::evaluate::{
    CheckedManifest, Device, Verdict, evaluate, evaluate_checked, verify_directive,
};
use swell_protocol::envelope::{UnverifiedEnvelope, Verified};
use swell_protocol::messages::{
    Beacon, Enrolled, KeyList, Phase, Reason, RootOfTrust, Unsupported, reason,
};
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::{EnvelopeError, ReleaseId, RolloutId};
use tracing::{debug, info, warn};

/// Checks a beacon's signature under the key list's coordinator keys at `now`
/// (a trusted time). The simulator checks a beacon once per connection this
/// way and hands the result to each of its devices.
pub fn check_beacon(
    payload: &[u8],
    keys: &KeyList,
    now: u64,
) -> Result<Verified<Beacon>, EnvelopeError> {
    let env = UnverifiedEnvelope::parse(payload)?;
    let key = keys
        .coordinator_keys
        .iter()
        .find(|k| k.key_id() == env.header.key_id)
        .ok_or(EnvelopeError::BadSignature)?;
    env.verify::<Beacon>(key, now)
}

impl DeviceCore {
    /// The retained key list (a rotation, or the first one).
    pub fn on_key_list(&mut self, payload: &[u8], clock: Clock, out: &mut Vec<Effect>) {
        if payload.is_empty() {
            return;
        }
        let signed = match ThresholdSigned::decode(payload) {
            Ok(s) => s,
            Err(e) => {
                self.counters.rejected_key_lists += 1;
                warn!(reason = e.reason(), "key list refused: {e}");
                return;
            }
        };
        let trusted = self
            .keys
            .as_ref()
            .map_or_else(|| self.s.roots.clone(), |k| RootOfTrust::of(k));
        let current = self.keys.as_ref().map(|k| k.version);
        if let Ok(same) = signed.verify::<KeyList>(&trusted.roots, trusted.threshold)
            && Some(same.version) == current
        {
            return; // a retained re-delivery
        }
        match KeyList::accept(
            &signed,
            &trusted,
            current,
            self.trust.trusted_now(clock.unix),
        ) {
            Ok(list) => {
                out.push(Effect::StoreKeyList(payload.to_vec()));
                self.trust.key_list_version = list.version;
                // TIME-2: what a rotated-out coordinator key raised goes too.
                let signers: Vec<_> = list.coordinator_keys.iter().map(|k| k.key_id()).collect();
                self.trust.keep_signers(&signers);
                self.persist_trust(out);
                info!(version = list.version, "key list accepted");
                let first = self.keys.is_none();
                self.keys = Some(std::sync::Arc::new(list));
                if first {
                    self.check_before_keys(clock, out);
                }
            }
            Err(e) => {
                self.counters.rejected_key_lists += 1;
                warn!(reason = "key_list", "key list refused: {e}");
            }
        }
    }

    fn keep_until_keys(&mut self, kind: Kind, topic: &str, payload: &[u8]) {
        if !self.before_keys.keep(topic, kind, payload) {
            self.counters.dropped_before_keys += 1;
            warn!(%topic, "too many messages before the key list or the enrollment confirmation; dropped");
        }
    }

    /// The messages that came before the first key list (or, for manifests,
    /// before the enrollment confirmation), beacon first.
    fn check_before_keys(&mut self, clock: Clock, out: &mut Vec<Effect>) {
        let kept = self.before_keys.take();
        if !kept.is_empty() {
            debug!(
                messages = kept.len(),
                "checking what came before the key list"
            );
        }
        for (topic, kind, payload) in kept {
            match kind {
                Kind::Beacon { retained } => self.on_beacon(&topic, &payload, retained, clock, out),
                Kind::Directive => self.on_directive(&topic, &payload, clock, out),
                Kind::Manifest => self.on_manifest(&topic, &payload, clock, out),
                Kind::Enrolled => self.on_enrolled(&topic, &payload, clock, out),
            }
        }
    }

    /// The fleet's beacon, received on `topic`; `retained`: the broker
    /// delivered it as a stored message (its RETAIN flag), not as published.
    pub fn on_beacon(
        &mut self,
        topic: &str,
        payload: &[u8],
        retained: bool,
        clock: Clock,
        out: &mut Vec<Effect>,
    ) {
        let Some(keys) = &self.keys else {
            self.keep_until_keys(Kind::Beacon { retained }, topic, payload);
            return;
        };
        match check_beacon(payload, keys, self.trust.trusted_now(clock.unix)) {
            Ok(v) => self.on_checked_beacon(&v, retained, clock, out),
            Err(e) => {
                self.counters.rejected_beacons += 1;
                warn!(reason = e.reason(), "beacon refused: {e}");
            }
        }
    }

    /// A beacon already checked with [`check_beacon`].
    pub fn on_checked_beacon(
        &mut self,
        v: &Verified<Beacon>,
        retained: bool,
        clock: Clock,
        out: &mut Vec<Effect>,
    ) {
        if v.header.epoch < self.trust.epoch_floor() {
            self.counters.rejected_beacons += 1;
            warn!(
                epoch = v.header.epoch,
                floor = self.trust.epoch_floor(),
                "beacon from a deposed coordinator"
            );
            return;
        }
        self.beacon_until = v.header.expires_at;
        self.freeze_reported = false;
        if v.body.key_list_version > self.trust.key_list_version {
            info!(
                have = self.trust.key_list_version,
                announced = v.body.key_list_version,
                "newer key list announced"
            );
        }
        let old_floor = (
            self.trust.time_floor,
            self.trust.epoch_floors.get(&v.header.key_id).copied(),
        );
        let before = self.trust.time_floor;
        self.trust.observe_time(v.header.issued_at);
        self.trust.hold_time_floor(before, self.time_ceiling(clock));
        self.trust.raise_epoch(v.header.key_id, v.header.epoch);
        let new_floor = (
            self.trust.time_floor,
            self.trust.epoch_floors.get(&v.header.key_id).copied(),
        );
        if new_floor != old_floor {
            self.persist_trust(out);
        }
        if v.header.epoch > self.epoch_seen {
            self.epoch_seen = v.header.epoch;
            // A coordinator epoch not seen before, published while we were
            // subscribed: that coordinator may have started after our Hello,
            // so say it again. A retained beacon was stored before we
            // subscribed, so before our Hello (the subscriptions go out first),
            // by a coordinator that subscribes before it publishes a beacon:
            // it has our Hello, or will from its session.
            if !retained {
                self.hello(clock, out);
            }
        }
        let now = self.trust.trusted_now(clock.unix);
        self.apply(Event::FreshMessage { now }, clock, out);
        if !self.held.is_empty() && self.job.as_ref().is_none_or(Job::is_final) {
            self.retry_held(clock, out);
        }
    }

    /// A manifest of the fleet, received on `topic`.
    pub fn on_manifest(
        &mut self,
        topic: &str,
        payload: &[u8],
        clock: Clock,
        out: &mut Vec<Effect>,
    ) {
        if self.keys.is_none() || !self.enrolled() {
            self.keep_until_keys(Kind::Manifest, topic, payload);
            return;
        }
        self.evaluate_manifest(payload, None, clock, false, out);
    }

    /// A manifest whose coordinator signature the caller checked once for many
    /// devices ([`crate::evaluate::check_manifest`]); the device's own checks
    /// and floors still apply.
    pub fn on_checked_manifest(
        &mut self,
        checked: &CheckedManifest,
        topic: &str,
        payload: &[u8],
        clock: Clock,
        out: &mut Vec<Effect>,
    ) {
        if !self.enrolled() {
            self.keep_until_keys(Kind::Manifest, topic, payload);
            return;
        }
        self.evaluate_manifest(payload, Some(checked), clock, false, out);
    }

    /// The coordinator's confirmation of this device's enrollment
    /// (ENROLL-3), received on `topic`; empty when the coordinator withdrew
    /// it. Checked like a directive (a coordinator key of the key list);
    /// only one for this device, fleet and key counts.
    pub fn on_enrolled(
        &mut self,
        topic: &str,
        payload: &[u8],
        clock: Clock,
        out: &mut Vec<Effect>,
    ) {
        let Some(keys) = self.keys.clone() else {
            self.keep_until_keys(Kind::Enrolled, topic, payload);
            return;
        };
        if payload.is_empty() {
            if self.trust.enrolled_key.take().is_some() {
                warn!("the coordinator withdrew this device's enrollment");
                self.persist_trust(out);
            }
            return;
        }
        let checked = UnverifiedEnvelope::parse(payload).and_then(|env| {
            let key = keys
                .coordinator_keys
                .iter()
                .find(|k| k.key_id() == env.header.key_id)
                .ok_or(EnvelopeError::BadSignature)?;
            env.verify::<Enrolled>(key, self.trust.trusted_now(clock.unix))
        });
        let e = match checked {
            Ok(v) => v.body,
            Err(e) => {
                self.counters.rejected_enrollments += 1;
                warn!(reason = e.reason(), "enrollment confirmation refused: {e}");
                return;
            }
        };
        let own = self.key.public();
        if e.device != self.id || e.fleet != self.s.fleet {
            self.counters.rejected_enrollments += 1;
            warn!(device = %e.device, fleet = %e.fleet, "enrollment confirmation for another device; ignored");
            return;
        }
        if e.key != own {
            debug!(key = %e.key.key_id(), "enrollment confirmation for another key; waiting for ours");
            return;
        }
        match e.incarnation.cmp(&self.trust.incarnation) {
            std::cmp::Ordering::Equal => {
                if self.trust.enrolled_key != Some(own) {
                    self.trust.enrolled_key = Some(own);
                    self.persist_trust(out);
                    info!(incarnation = e.incarnation, "enrollment confirmed");
                    self.check_before_keys(clock, out);
                }
            }
            // STATE-3: the coordinator knows a later life of this key than
            // ours (our trust state was rebuilt with a clock behind): go on
            // after it, and say so.
            std::cmp::Ordering::Greater => {
                let next = e.incarnation.saturating_add(1);
                warn!(
                    ours = self.trust.incarnation,
                    confirmed = e.incarnation,
                    next,
                    "the coordinator confirmed a later incarnation of this device; starting the next one"
                );
                self.trust.incarnation = next;
                self.trust.enrolled_key = None;
                self.persist_trust(out);
                self.hello(clock, out);
            }
            // An earlier life's confirmation: ours comes after our Hello.
            std::cmp::Ordering::Less => {}
        }
    }

    /// Evaluates the held manifests again.
    pub(super) fn retry_held(&mut self, clock: Clock, out: &mut Vec<Effect>) {
        for (rollout, bytes) in self.held.take() {
            debug!(%rollout, "re-evaluating a held manifest");
            self.evaluate_manifest(&bytes, None, clock, true, out);
        }
    }

    /// `recheck`: a held manifest evaluated again; if a newer one for its rollout
    /// arrived meanwhile it is simply dropped, not reported as a replay.
    fn evaluate_manifest(
        &mut self,
        payload: &[u8],
        checked: Option<&CheckedManifest>,
        clock: Clock,
        recheck: bool,
        out: &mut Vec<Effect>,
    ) {
        if payload.is_empty() {
            return; // a cleared retained manifest
        }
        let Some(keys) = self.keys.clone() else {
            return;
        };
        self.counters.manifests_evaluated += 1;
        let now = clock.unix;
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
        let dev = Device {
            id: &self.id,
            fleet: &self.s.fleet,
            labels: &self.labels,
            hardware: &self.s.hardware,
            running,
            failed: self.installed.failed.clone(),
            installing,
            beacon_fresh: now < self.beacon_until,
            directive: self.directive.as_deref(),
        };
        let before = self.trust.clone();
        let mut trial = self.trust.clone();
        let verdict = match checked {
            Some(c) => evaluate_checked(c, &dev, &keys, &mut trial, now),
            None => evaluate(payload, &dev, &keys, &mut trial, now),
        };
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
            let seen = self.held.holds(&rollout, payload);
            if !self.held.hold(&rollout, payload) {
                warn!(%rollout, "too many manifests waiting; dropped");
                return;
            }
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
                    self.report(rollout, rel, Phase::Rejected(reason), false, clock, out);
                }
            } else if !refused {
                info!(%rollout, "an install is under way; this one waits");
            }
            return;
        }
        if recheck
            && matches!(&verdict, Verdict::Reject { reason, .. } if reason.code == reason::REPLAYED)
        {
            return;
        }
        trial.hold_time_floor(self.trust.time_floor, self.time_ceiling(clock));
        self.trust = trial;
        if let Some(r) = verdict_rollout(&verdict) {
            self.held.release(r);
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
                let _span = tracing::info_span!("install", rollout = %rollout, release = %hex::encode(&release_id.0[..6])).entered();
                let previous = self.installed.running.as_ref().map(|r| r.release);
                let (job, actions) =
                    Job::start(rollout, release_id, release.counter, retry, previous);
                info!(version = %release.version, "installing");
                out.push(Effect::SaveRelease(Some(release.as_ref().clone())));
                self.job_release = Some(release);
                self.commit_step(job, actions, clock, out);
            }
            Verdict::RollBack {
                rollout,
                release_id,
            } => {
                info!(%rollout, "rollout rolling back");
                self.adopt_for_rollback(&rollout, release_id, clock, out);
                self.apply(
                    Event::RollbackRequested(Reason {
                        code: reason::OPERATOR,
                        detail: "rollout rolling back".into(),
                    }),
                    clock,
                    out,
                );
            }
            Verdict::Reject {
                rollout,
                release_id,
                reason,
            } => {
                self.counters.rejected_manifests += 1;
                warn!(reason = reason::name(reason.code), detail = %reason.detail, "manifest refused");
                if let (Some(r), Some(rel)) = (rollout, release_id) {
                    self.report(Some(r), rel, Phase::Rejected(reason), false, clock, out);
                }
            }
            Verdict::Duplicate => self.counters.duplicates += 1,
            Verdict::NotForMe(why) => debug!(why, "manifest not for this device"),
        }
        // Any verified manifest proves the coordinator is reachable (INST-2).
        if self.trust != before {
            self.persist_trust(out);
            let now = self.trust.trusted_now(clock.unix);
            self.apply(Event::FreshMessage { now }, clock, out);
        }
    }

    /// A rollback can name a release installed by an earlier job than the
    /// current one: it becomes the current job again (as committed), so the
    /// state machine takes it back to what ran before it.
    fn adopt_for_rollback(
        &mut self,
        rollout: &RolloutId,
        release: ReleaseId,
        clock: Clock,
        out: &mut Vec<Effect>,
    ) {
        if self
            .job
            .as_ref()
            .is_some_and(|j| &j.rollout == rollout && j.release == release)
        {
            return;
        }
        if self.job.as_ref().is_some_and(|j| !j.is_final()) {
            return; // another install is under way; it finishes first
        }
        let Some(run) = self.installed.running.clone() else {
            return;
        };
        if run.release != release || run.rollout.as_ref() != Some(rollout) {
            return;
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
        out.push(Effect::SaveRelease(None));
        self.job_release = None;
        self.commit_step(job, Vec::new(), clock, out);
    }

    /// The device's own retained directive (pin, exclude, forced rollback).
    pub fn on_directive(
        &mut self,
        topic: &str,
        payload: &[u8],
        clock: Clock,
        out: &mut Vec<Effect>,
    ) {
        if self.keys.is_none() {
            self.keep_until_keys(Kind::Directive, topic, payload);
            return;
        }
        if payload.is_empty() {
            self.directive = None;
            return;
        }
        let Some(keys) = self.keys.clone() else {
            return;
        };
        if let Ok(env) = UnverifiedEnvelope::parse(payload)
            && env.kind() == Some(swell_protocol::MessageKind::Unsupported)
        {
            self.on_unsupported(&env, &keys, clock);
            return;
        }
        let before = self.trust.clone();
        match verify_directive(payload, &self.id, &keys, &mut self.trust, clock.unix) {
            Ok(d) => {
                self.trust
                    .hold_time_floor(before.time_floor, self.time_ceiling(clock));
                if self.trust != before {
                    self.persist_trust(out);
                }
                info!(
                    pin = d.pin.is_some(),
                    exclude = d.exclude,
                    "directive accepted"
                );
                let force = d.force_rollback.clone();
                self.directive = Some(Box::new(d));
                if let Some(rollout) = force {
                    if let Some(r) = self.installed.running.clone()
                        && r.rollout.as_ref() == Some(&rollout)
                    {
                        self.adopt_for_rollback(&rollout, r.release, clock, out);
                    }
                    if self.job.as_ref().is_some_and(|j| j.rollout == rollout) {
                        self.apply(
                            Event::RollbackRequested(Reason {
                                code: reason::OPERATOR,
                                detail: "directive".into(),
                            }),
                            clock,
                            out,
                        );
                    }
                }
            }
            Err(r) => {
                self.counters.rejected_directives += 1;
                warn!(reason = reason::name(r.code), detail = %r.detail, "directive refused");
            }
        }
    }
}

impl DeviceCore {
    /// The coordinator cannot read what this device sends (another protocol
    /// version): said loudly, counted; nothing else changes.
    fn on_unsupported(&mut self, env: &UnverifiedEnvelope<'_>, keys: &KeyList, clock: Clock) {
        let Some(key) = keys
            .coordinator_keys
            .iter()
            .find(|k| k.key_id() == env.header.key_id)
        else {
            self.counters.rejected_directives += 1;
            return;
        };
        match env.verify::<Unsupported>(key, self.trust.trusted_now(clock.unix)) {
            Ok(v) => {
                self.counters.unsupported_by_coordinator += 1;
                let u = v.body;
                tracing::error!(
                    kind = u.kind,
                    proto = u.proto,
                    coordinator_speaks = %format_args!("{}..={}", u.proto_min, u.proto_max),
                    we_speak = %format_args!("{}..={}", swell_protocol::version::PROTO_MIN, swell_protocol::version::PROTO_MAX),
                    "the coordinator cannot read this agent's messages: upgrade the agent or the coordinator"
                );
            }
            Err(e) => {
                self.counters.rejected_directives += 1;
                warn!(reason = e.reason(), "unsupported answer refused: {e}");
            }
        }
    }
}

fn verdict_rollout(v: &Verdict) -> Option<&RolloutId> {
    match v {
        Verdict::Install { rollout, .. } | Verdict::RollBack { rollout, .. } => Some(rollout),
        Verdict::Reject { rollout, .. } => rollout.as_ref(),
        Verdict::NotForMe(_) | Verdict::Duplicate => None,
    }
}
