//! A [`Store`] in memory, for tests of the layers above the store (the
//! engine, the server loop) that need neither sled nor a directory. It keeps
//! the durability contract the engine relies on: a rollout commit is durable at
//! once, device and report records only after [`Store::flush`], and
//! [`MemoryStore::crash`] forgets what was not flushed, as a SIGKILL would.
//! [`Store::load`] returns what is durable, so a test "restarts" an engine by
//! starting a new one on the same store.

use super::{DecisionEntry, Loaded, RolloutRecord, Store, StoreError, StoredReport};
use crate::fleet::registry::DeviceRecord;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use swell_protocol::{DeviceId, KeyId, RolloutId};

#[derive(Debug, Default, Clone)]
struct Records {
    /// `None`: removed (only among the records not flushed yet).
    devices: BTreeMap<DeviceId, Option<DeviceRecord>>,
    reports: BTreeMap<(RolloutId, DeviceId), StoredReport>,
}

impl Records {
    /// Makes `pending` durable here.
    fn apply(&mut self, pending: Records) {
        for (id, rec) in pending.devices {
            match rec {
                Some(r) => self.devices.insert(id, Some(r)),
                None => self.devices.remove(&id),
            };
        }
        self.reports.extend(pending.reports);
    }
}

#[derive(Debug, Default)]
struct State {
    rollouts: BTreeMap<RolloutId, RolloutRecord>,
    decisions: BTreeMap<RolloutId, Vec<DecisionEntry>>,
    operator_marks: BTreeMap<KeyId, u64>,
    durable: Records,
    /// Written, not flushed yet.
    pending: Records,
    flushes: u64,
}

/// Coordinator state in memory (see the module's documentation).
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding it left whole maps behind.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets every device and report record written since the last flush.
    pub fn crash(&self) {
        self.lock().pending = Records::default();
    }

    /// How many flushes found something to make durable.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    /// The durable record of a device, if any.
    pub fn durable_device(&self, id: &DeviceId) -> Option<DeviceRecord> {
        self.lock().durable.devices.get(id).cloned().flatten()
    }
}

impl Store for MemoryStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        let s = self.lock();
        Ok(Loaded {
            rollouts: s.rollouts.values().cloned().collect(),
            devices: s.durable.devices.values().flatten().cloned().collect(),
            reports: s
                .durable
                .reports
                .iter()
                .map(|((r, d), rep)| (r.clone(), d.clone(), rep.clone()))
                .collect(),
            operator_marks: s.operator_marks.iter().map(|(k, v)| (*k, *v)).collect(),
            corrupt: Vec::new(),
        })
    }

    fn put_operator_mark(&self, key: KeyId, issued_at: u64) -> Result<(), StoreError> {
        let mut s = self.lock();
        let mark = s.operator_marks.entry(key).or_insert(0);
        *mark = (*mark).max(issued_at);
        Ok(())
    }

    fn commit_rollout(
        &self,
        rec: &RolloutRecord,
        entry: Option<&DecisionEntry>,
    ) -> Result<(), StoreError> {
        let mut s = self.lock();
        s.rollouts.insert(rec.spec.id.clone(), rec.clone());
        if let Some(e) = entry {
            s.decisions
                .entry(rec.spec.id.clone())
                .or_default()
                .push(e.clone());
        }
        Ok(())
    }

    fn decisions(&self, rollout: &RolloutId) -> Result<Vec<DecisionEntry>, StoreError> {
        Ok(self
            .lock()
            .decisions
            .get(rollout)
            .cloned()
            .unwrap_or_default())
    }

    fn put_device(&self, rec: &DeviceRecord) -> Result<(), StoreError> {
        self.lock()
            .pending
            .devices
            .insert(rec.id.clone(), Some(rec.clone()));
        Ok(())
    }

    fn remove_device(&self, id: &DeviceId) -> Result<(), StoreError> {
        self.lock().pending.devices.insert(id.clone(), None);
        Ok(())
    }

    fn put_report(
        &self,
        rollout: &RolloutId,
        device: &DeviceId,
        report: &StoredReport,
    ) -> Result<(), StoreError> {
        self.lock()
            .pending
            .reports
            .insert((rollout.clone(), device.clone()), report.clone());
        Ok(())
    }

    fn delete_rollout(&self, rollout: &RolloutId) -> Result<(), StoreError> {
        let mut s = self.lock();
        s.rollouts.remove(rollout);
        s.decisions.remove(rollout);
        // Durable at once, like the disk store: flush what came before it.
        let pending = std::mem::take(&mut s.pending);
        s.durable.apply(pending);
        s.durable.reports.retain(|(r, _), _| r != rollout);
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        let mut s = self.lock();
        let pending = std::mem::take(&mut s.pending);
        if pending.devices.is_empty() && pending.reports.is_empty() {
            return Ok(());
        }
        s.flushes += 1;
        s.durable.apply(pending);
        Ok(())
    }
}
