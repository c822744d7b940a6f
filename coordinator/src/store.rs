//! Durable state, in sled, behind the [`Store`] trait.
//!
//! - tree `rollouts`: `r/{rollout}` → JSON [`RolloutRecord`]; `d/{rollout}/{n:016x}`
//!   → JSON [`DecisionEntry`]. A transition and its decisions are written in one
//!   atomic batch and flushed before anything is published (STATE-1), so the audit
//!   log never misses or repeats a transition.
//! - tree `devices`: `{device}` → postcard [`DeviceRecord`].
//! - tree `reports`: `{rollout}/{device}` → postcard latest report (release,
//!   phase, envelope `seq`), from which the trackers are rebuilt on start.
//!
//! A report that counts is one write: its record carries the report's `seq`, so
//! the device's replay floor is the larger of its device record's `last_seq` and
//! the `seq` of its stored reports (raised so on start). The device record
//! itself is written only when more than the floor changed (Hello, approval,
//! running release) or when the report is not stored. Deleting a rollout writes
//! its members' floors into their device records first.
//!
//! The coordinator epoch lives apart, in a small atomically written file
//! ([`crate::durable`]), so a lost or rebuilt database can never lower it.

use crate::fleet::registry::DeviceRecord;
use crate::rollout::spec::RolloutSpec;
use crate::rollout::state::{Command, Decision, Observations, RolloutState};
use serde::{Deserialize, Serialize};
use std::path::Path;
use swell_protocol::messages::Phase;
use swell_protocol::{DeviceId, ReleaseId, RolloutId};

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub spec: RolloutSpec,
    pub state: RolloutState,
    /// `seq` of the newest manifest published (or about to be).
    pub manifest_seq: u64,
    /// Decisions logged so far (the next entry's index).
    pub decisions: u64,
    pub created_at: u64,
}

/// One audit-log entry: a transition with the inputs it was computed from (ROLL-5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionEntry {
    pub at: u64,
    pub epoch: u64,
    pub before: RolloutState,
    /// The observations of a `step`, or the operator command.
    pub observations: Option<Observations>,
    pub command: Option<Command>,
    pub decisions: Vec<Decision>,
    pub after: RolloutState,
}

/// The latest report of one device for one rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReport {
    pub release: ReleaseId,
    pub phase: Phase,
    /// The envelope `seq` it came in: a replay floor of the device.
    pub seq: u64,
}

/// A report as written before it carried its `seq` (read back as `seq` 0: the
/// device record of that format held the floor).
#[derive(Deserialize)]
struct StoredReportV0 {
    release: ReleaseId,
    phase: Phase,
}

impl StoredReport {
    fn decode(bytes: &[u8]) -> Option<StoredReport> {
        postcard::from_bytes::<StoredReport>(bytes)
            .ok()
            .or_else(|| {
                postcard::from_bytes::<StoredReportV0>(bytes)
                    .ok()
                    .map(|r| StoredReport {
                        release: r.release,
                        phase: r.phase,
                        seq: 0,
                    })
            })
    }
}

/// Why the store failed. All store errors are retryable only by restarting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sled::Error),
    #[error("record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("cannot encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
}

/// What was loaded at start, and what could not be.
#[derive(Debug, Default)]
pub struct Loaded {
    pub rollouts: Vec<RolloutRecord>,
    pub devices: Vec<DeviceRecord>,
    pub reports: Vec<(RolloutId, DeviceId, StoredReport)>,
    /// Records that did not decode; moved aside under `corrupt/` (STATE-3).
    pub corrupt: Vec<String>,
}

/// Durable coordinator state.
pub trait Store: Send + Sync {
    fn load(&self) -> Result<Loaded, StoreError>;
    /// Writes a rollout and, atomically with it, its new decision entry.
    fn commit_rollout(
        &self,
        rec: &RolloutRecord,
        entry: Option<&DecisionEntry>,
    ) -> Result<(), StoreError>;
    fn decisions(&self, rollout: &RolloutId) -> Result<Vec<DecisionEntry>, StoreError>;
    fn put_device(&self, rec: &DeviceRecord) -> Result<(), StoreError>;
    /// Writes many device records at once.
    fn put_devices(&self, recs: &mut dyn Iterator<Item = &DeviceRecord>) -> Result<(), StoreError>;
    fn put_report(
        &self,
        rollout: &RolloutId,
        device: &DeviceId,
        report: &StoredReport,
    ) -> Result<(), StoreError>;
    /// Deletes a rollout with its decision log and reports.
    fn delete_rollout(&self, rollout: &RolloutId) -> Result<(), StoreError>;
    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), StoreError>;
}

/// The sled implementation.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
    rollouts: sled::Tree,
    devices: sled::Tree,
    reports: sled::Tree,
}

/// sled's page cache unless configured: the coordinator's own maps are the
/// hot state, the database is mostly written. Not lower: at 1,000,000
/// devices 32 MiB peaked 70 MB lower but cost up to 10 % more CPU, and 16
/// MiB 23 % (BENCHMARKS.md, seventh and eighth rounds).
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// A page cache size given in MiB, in bytes; `None` for 0 or too large.
pub fn cache_bytes_from_mib(mib: u64) -> Option<u64> {
    mib.checked_mul(1024 * 1024).filter(|b| *b > 0)
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens with a page cache of `cache_bytes` (sled's own estimate of node
    /// sizes; the memory it takes is larger).
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(500))
            .open()?;
        Ok(SledStore {
            rollouts: db.open_tree("rollouts")?,
            devices: db.open_tree("devices")?,
            reports: db.open_tree("reports")?,
            db,
        })
    }
}

fn json<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Encode {
        what,
        reason: e.to_string(),
    })
}

fn post<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(v).map_err(|e| StoreError::Encode {
        what,
        reason: e.to_string(),
    })
}

fn quarantine(tree: &sled::Tree, key: &[u8], corrupt: &mut Vec<String>) -> Result<(), StoreError> {
    let name = String::from_utf8_lossy(key).into_owned();
    if let Some(v) = tree.remove(key)? {
        let mut aside = b"corrupt/".to_vec();
        aside.extend_from_slice(key);
        tree.insert(aside, v)?;
    }
    corrupt.push(name);
    Ok(())
}

impl Store for SledStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        let mut out = Loaded::default();
        let mut bad: Vec<(sled::Tree, Vec<u8>)> = Vec::new();
        for kv in self.rollouts.scan_prefix(b"r/") {
            let (k, v) = kv?;
            match serde_json::from_slice::<RolloutRecord>(&v) {
                Ok(r) => out.rollouts.push(r),
                Err(_) => bad.push((self.rollouts.clone(), k.to_vec())),
            }
        }
        for kv in self.devices.iter() {
            let (k, v) = kv?;
            if k.starts_with(b"corrupt/") {
                continue;
            }
            match postcard::from_bytes::<DeviceRecord>(&v) {
                Ok(d) => out.devices.push(d),
                Err(_) => bad.push((self.devices.clone(), k.to_vec())),
            }
        }
        for kv in self.reports.iter() {
            let (k, v) = kv?;
            if k.starts_with(b"corrupt/") {
                continue;
            }
            let parsed = std::str::from_utf8(&k)
                .ok()
                .and_then(|s| s.split_once('/'))
                .and_then(|(r, d)| {
                    Some((
                        RolloutId::new(r).ok()?,
                        DeviceId::new(d).ok()?,
                        StoredReport::decode(&v)?,
                    ))
                });
            match parsed {
                Some(t) => out.reports.push(t),
                None => bad.push((self.reports.clone(), k.to_vec())),
            }
        }
        for (tree, key) in bad {
            quarantine(&tree, &key, &mut out.corrupt)?;
        }
        Ok(out)
    }

    fn commit_rollout(
        &self,
        rec: &RolloutRecord,
        entry: Option<&DecisionEntry>,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let id = rec.spec.id.as_str();
        if let Some(e) = entry {
            let n = rec.decisions.saturating_sub(1);
            batch.insert(format!("d/{id}/{n:016x}").as_bytes(), json("decision", e)?);
        }
        batch.insert(format!("r/{id}").as_bytes(), json("rollout", rec)?);
        self.rollouts.apply_batch(batch)?;
        self.rollouts.flush()?;
        Ok(())
    }

    fn decisions(&self, rollout: &RolloutId) -> Result<Vec<DecisionEntry>, StoreError> {
        let mut out = Vec::new();
        for kv in self
            .rollouts
            .scan_prefix(format!("d/{rollout}/").as_bytes())
        {
            let (k, v) = kv?;
            out.push(serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }

    fn put_device(&self, rec: &DeviceRecord) -> Result<(), StoreError> {
        self.devices
            .insert(rec.id.as_str().as_bytes(), post("device", rec)?)?;
        Ok(())
    }

    fn put_devices(&self, recs: &mut dyn Iterator<Item = &DeviceRecord>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for rec in recs {
            batch.insert(rec.id.as_str().as_bytes(), post("device", rec)?);
        }
        self.devices.apply_batch(batch)?;
        Ok(())
    }

    fn put_report(
        &self,
        rollout: &RolloutId,
        device: &DeviceId,
        report: &StoredReport,
    ) -> Result<(), StoreError> {
        self.reports.insert(
            format!("{rollout}/{device}").as_bytes(),
            post("report", report)?,
        )?;
        Ok(())
    }

    fn delete_rollout(&self, rollout: &RolloutId) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.remove(format!("r/{rollout}").as_bytes());
        for kv in self
            .rollouts
            .scan_prefix(format!("d/{rollout}/").as_bytes())
        {
            batch.remove(kv?.0);
        }
        self.rollouts.apply_batch(batch)?;
        let mut batch = sled::Batch::default();
        for kv in self.reports.scan_prefix(format!("{rollout}/").as_bytes()) {
            batch.remove(kv?.0);
        }
        self.reports.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::spec::{BreachPolicy, GateSpec};
    use crate::rollout::state_tests::spec;
    use swell_protocol::cohort::PPM_FULL;

    fn record() -> RolloutRecord {
        RolloutRecord {
            spec: spec(0, &[PPM_FULL], GateSpec::default(), BreachPolicy::Pause),
            state: RolloutState::new(),
            manifest_seq: 0,
            decisions: 0,
            created_at: 1,
        }
    }

    #[test]
    fn deleting_a_rollout_removes_its_record_decisions_and_reports_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let mut rec = record();
        rec.decisions = 1;
        let entry = DecisionEntry {
            at: 5,
            epoch: 1,
            before: RolloutState::new(),
            observations: None,
            command: Some(Command::Abort),
            decisions: vec![],
            after: rec.state.clone(),
        };
        s.commit_rollout(&rec, Some(&entry)).unwrap();
        let mut other = record();
        other.spec.id = RolloutId::new("other").unwrap();
        s.commit_rollout(&other, None).unwrap();
        let report = StoredReport {
            release: rec.spec.release_id(),
            phase: swell_protocol::messages::Phase::Committed,
            seq: 1,
        };
        let dev = DeviceId::new("dev-1").unwrap();
        s.put_report(&rec.spec.id, &dev, &report).unwrap();
        s.put_report(&other.spec.id, &dev, &report).unwrap();
        s.delete_rollout(&rec.spec.id).unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.rollouts.len(), 1);
        assert_eq!(loaded.rollouts[0].spec.id, other.spec.id);
        assert_eq!(loaded.reports.len(), 1);
        assert_eq!(loaded.reports[0].0, other.spec.id);
        assert!(s.decisions(&rec.spec.id).unwrap().is_empty());
    }

    #[test]
    fn store_round_trips_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = record();
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.commit_rollout(&rec, None).unwrap();
            rec.decisions = 1;
            rec.state.retry = 1;
            let entry = DecisionEntry {
                at: 5,
                epoch: 1,
                before: RolloutState::new(),
                observations: None,
                command: Some(Command::Retry),
                decisions: vec![Decision::Retry { retry: 1 }],
                after: rec.state.clone(),
            };
            s.commit_rollout(&rec, Some(&entry)).unwrap();
            s.put_report(
                &rec.spec.id,
                &DeviceId::new("d1").unwrap(),
                &StoredReport {
                    release: ReleaseId([1; 32]),
                    phase: Phase::Committed,
                    seq: 1,
                },
            )
            .unwrap();
            s.flush().unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.rollouts, vec![rec.clone()]);
        assert_eq!(loaded.reports.len(), 1);
        assert_eq!(s.decisions(&rec.spec.id).unwrap().len(), 1);
        assert!(loaded.corrupt.is_empty());
    }

    #[test]
    fn store_reads_reports_written_before_they_carried_seq() {
        #[derive(Serialize)]
        struct V0 {
            release: ReleaseId,
            phase: Phase,
        }
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let old = postcard::to_allocvec(&V0 {
            release: ReleaseId([3; 32]),
            phase: Phase::Committed,
        })
        .unwrap();
        s.reports.insert(b"r/d1", old).unwrap();
        s.put_report(
            &RolloutId::new("r").unwrap(),
            &DeviceId::new("d2").unwrap(),
            &StoredReport {
                release: ReleaseId([4; 32]),
                phase: Phase::Installing,
                seq: 9,
            },
        )
        .unwrap();
        // A record of neither format is set aside.
        s.reports.insert(b"r/d3", vec![0xff; 3]).unwrap();
        let mut loaded = s.load().unwrap();
        loaded.reports.sort_by(|a, b| a.1.cmp(&b.1));
        let got: Vec<_> = loaded
            .reports
            .iter()
            .map(|(_, d, r)| (d.as_str(), r.seq))
            .collect();
        assert_eq!(got, vec![("d1", 0), ("d2", 9)]);
        assert_eq!(loaded.reports[0].2.release, ReleaseId([3; 32]));
        assert_eq!(loaded.corrupt, vec!["r/d3".to_string()]);
    }

    #[test]
    fn store_corrupt_records_are_set_aside_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        s.commit_rollout(&record(), None).unwrap();
        s.rollouts
            .insert(b"r/broken", b"{not json".to_vec())
            .unwrap();
        s.devices.insert(b"d9", b"\xff\xff".to_vec()).unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.rollouts.len(), 1);
        assert_eq!(loaded.corrupt.len(), 2);
        // Set aside, so the next start is clean.
        let again = s.load().unwrap();
        assert!(again.corrupt.is_empty());
        assert!(s.rollouts.get(b"corrupt/r/broken").unwrap().is_some());
    }
}
