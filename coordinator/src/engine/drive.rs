//! Driving rollouts: each is stepped with its tracker's observations, every
//! transition committed to the store before its manifest, status and events
//! are returned for publishing (STATE-1), manifests re-signed before they
//! expire, and the fleet's freshness beacon signed.

use super::{Engine, EngineError, Live, Out, manifest_view, wave_target};
use crate::rollout::state::{self, Command, Observations, RolloutPhase};
use crate::status::{
    BreachEvidence, EventKind, Lifecycle, RolloutEvent, RolloutStatus, WaveProgress,
};
use crate::store::{DecisionEntry, FinalOutcome};
use swell_protocol::RolloutId;
use swell_protocol::envelope::{Audience, Stamp, seal};
use swell_protocol::messages::{Beacon, Manifest};
use tracing::info;

impl Engine {
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
    pub(super) fn settle_rollout(&mut self, id: &RolloutId, now: u64) -> Option<Out> {
        let l = self.rollouts.get_mut(id)?;
        if l.tracker.settled() {
            return None;
        }
        let devices = &self.devices;
        l.tracker
            .settle(|slot| devices.at(slot).is_some_and(|d| d.online));
        Some(self.status_out(id, now))
    }

    /// Stores a transition (with its inputs) and returns its events and manifest.
    pub(super) fn commit(
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
        if rec.state.is_final() && rec.outcome.is_none() {
            // What the rollout's record says from now on; later reports only
            // update the devices' own records.
            let devices = &self.devices;
            l.tracker
                .settle(|slot| devices.at(slot).is_some_and(|d| d.online));
            rec.outcome = Some(FinalOutcome {
                waves: l.tracker.counts().to_vec(),
                members: l.tracker.members(),
                finished_at: now,
                manifest_seq: rec.manifest_seq,
            });
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
        let completed = l.rec.state.phase == RolloutPhase::Completed;
        let mut out = Vec::new();
        for d in &st.decisions {
            out.extend(self.event(id, now, EventKind::Decision(d.clone())));
        }
        out.extend(self.publish_if_changed(id, now, false)?);
        if completed {
            out.extend(self.supersede_covered(id, now)?);
        }
        Ok(out)
    }

    /// The fleet's desired state: once rollout `id` completed, each finished
    /// rollout before it whose scope its selector provably covers is
    /// superseded: its retained manifest is cleared (a device, new or back
    /// from offline, can no longer pick an older release from it) and never
    /// published again. Its record and status stay as they finished.
    pub(super) fn supersede_covered(
        &mut self,
        id: &RolloutId,
        now: u64,
    ) -> Result<Vec<Out>, EngineError> {
        let Some(newer) = self.rollouts.get(id) else {
            return Ok(vec![]);
        };
        let (fleet, selector, created) = (
            newer.rec.spec.fleet.clone(),
            newer.rec.spec.selector.clone(),
            newer.rec.created_at,
        );
        let covered: Vec<RolloutId> = self
            .rollouts
            .iter()
            .filter(|(other, l)| {
                *other != id
                    && l.rec.superseded_by.is_none()
                    && l.rec.state.is_final()
                    && l.rec.created_at <= created
                    && l.rec.spec.fleet == fleet
                    && selector.covers(&l.rec.spec.selector)
            })
            .map(|(other, _)| other.clone())
            .collect();
        let mut out = Vec::new();
        for old in covered {
            let Some(l) = self.rollouts.get_mut(&old) else {
                continue;
            };
            let mut rec = l.rec.clone();
            rec.superseded_by = Some(id.clone());
            // Durable first: a restart must not publish it again.
            self.store.commit_rollout(&rec, None)?;
            l.rec = rec;
            info!(rollout = %old, by = %id, "rollout superseded: its manifest is cleared");
            out.push(Out {
                topic: self.s.topics.manifest(&fleet, &old),
                payload: Vec::new(),
                retain: true,
                correlation: None,
                event: None,
            });
            out.extend(self.event(
                &old,
                now,
                EventKind::Lifecycle(Lifecycle::Superseded { by: id.to_string() }),
            ));
        }
        Ok(out)
    }

    pub(super) fn event(&self, id: &RolloutId, now: u64, what: EventKind) -> Vec<Out> {
        let ev = RolloutEvent {
            at: now,
            epoch: self.s.epoch,
            rollout: id.to_string(),
            what,
        };
        vec![Out {
            topic: self.s.topics.ops_events(&self.s.fleet),
            payload: serde_json::to_vec(&ev).unwrap_or_default(),
            retain: false,
            correlation: None,
            event: Some(Box::new(ev)),
        }]
    }

    /// Publishes the manifest and status when what devices see changed, when the
    /// manifest nears expiry, or when forced (start of a new epoch).
    pub(super) fn publish_if_changed(
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
        if l.rec.state.started
            && l.rec.superseded_by.is_none()
            && (force || l.published != Some(view) || stale)
        {
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
    pub(super) fn status_out(&self, id: &RolloutId, now: u64) -> Out {
        Out {
            topic: self.s.topics.ops_status(&self.s.fleet, id),
            payload: self.rollouts.get(id).map_or_else(
                || b"null".to_vec(),
                |l| serde_json::to_vec(&status_of(l, now)).unwrap_or_default(),
            ),
            retain: true,
            correlation: None,
            event: None,
        }
    }

    pub(super) fn step_rollout(
        &mut self,
        id: &RolloutId,
        now: u64,
    ) -> Result<Vec<Out>, EngineError> {
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
        out.extend(self.expire_pending(now)?);
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
}

/// A rollout's status, from its record and its tracker's counts.
pub(super) fn status_of(l: &Live, now: u64) -> RolloutStatus {
    let st = &l.rec.state;
    let spec = &l.rec.spec;
    let (counts, members, updated_at, manifest_seq) = match &l.rec.outcome {
        Some(o) => (o.waves.as_slice(), o.members, o.finished_at, o.manifest_seq),
        None => (
            l.tracker.counts(),
            l.tracker.members(),
            now,
            l.rec.manifest_seq,
        ),
    };
    let opened = if st.started {
        usize::from(st.wave) + 1
    } else {
        0
    }
    .min(counts.len());
    let waves = counts
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
            waiting: c.waiting,
            not_eligible: c.not_eligible,
            rolled_back: c.rolled_back,
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
        manifest_seq,
        retry: st.retry,
        waiting: st.waiting.clone(),
        halt_reason: st.halt_reason.as_ref().map(ToString::to_string),
        halted_by: st.halt_reason.clone(),
        members,
        selector: spec.selector.to_string(),
        policy: spec.policy,
        breach_evidence: BreachEvidence {
            reported: counts[..opened]
                .iter()
                .map(|c| c.finished() + c.unfinished())
                .sum(),
            min_sample: spec.gate.min_breach_sample,
        },
        silent: spec.gate.silent,
        finished: st.is_final(),
        updated_at,
    }
}
