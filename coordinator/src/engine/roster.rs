//! Who stays in the registry (ENROLL-4): a device removed by an operator's
//! `reject`, and pending devices that said nothing for `pending_expiry`. A
//! device a rollout counts is never removed (its registry slot is the
//! rollout's member key), so a removed slot can name a new device later.

use super::{Engine, Out};
use crate::fleet::registry::Enrollment;
use crate::store::StoreError;
use swell_protocol::RolloutId;
use tracing::info;

/// How often pending devices are checked for expiry.
const SWEEP_EVERY_SECS: u64 = 600;

impl Engine {
    /// A rollout whose tracker counts the device in `slot`, if any.
    pub(super) fn counted_in(&self, slot: usize) -> Option<&RolloutId> {
        self.rollouts
            .iter()
            .find(|(_, l)| l.tracker.is_member(slot))
            .map(|(id, _)| id)
    }

    /// Removes the device in `slot` from the registry and the store; its id
    /// and the withdrawal of its enrollment confirmation (an empty message on
    /// its `enrolled` topic; a device offline now hears it in answer to its
    /// next Hello).
    pub(super) fn forget_device(
        &mut self,
        slot: usize,
    ) -> Result<Option<(String, Out)>, StoreError> {
        let Some(rec) = self.devices.remove(slot) else {
            return Ok(None);
        };
        if rec.enrollment == Enrollment::Pending {
            self.pending = self.pending.saturating_sub(1);
        }
        self.takeovers.remove(&slot);
        self.store.remove_device(&rec.id)?;
        let withdraw = self.to_enrolled_topic(&rec.id, Vec::new());
        Ok(Some((rec.id.to_string(), withdraw)))
    }

    /// Removes the pending devices silent for `pending_expiry`, at most once
    /// every ten minutes; what to publish.
    pub(super) fn expire_pending(&mut self, now: u64) -> Result<Vec<Out>, StoreError> {
        if self.pending == 0 || now < self.pending_swept.saturating_add(SWEEP_EVERY_SECS) {
            return Ok(vec![]);
        }
        self.pending_swept = now;
        let ttl = self.s.pending_expiry.as_secs();
        let stale: Vec<usize> = self
            .devices
            .slots()
            .filter(|(_, d)| {
                d.enrollment == Enrollment::Pending && d.last_seen().saturating_add(ttl) <= now
            })
            .map(|(slot, _)| slot)
            .filter(|&slot| self.counted_in(slot).is_none())
            .collect();
        let mut out = Vec::new();
        for slot in stale {
            if let Some((_, o)) = self.forget_device(slot)? {
                out.push(o);
            }
        }
        if !out.is_empty() {
            self.store.flush()?;
            self.counters.pending_expired += out.len() as u64;
            info!(
                devices = out.len(),
                after_secs = ttl,
                "pending devices silent too long removed"
            );
        }
        Ok(out)
    }
}
