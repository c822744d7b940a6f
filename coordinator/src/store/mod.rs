//! Durable state behind the [`Store`] trait: rollouts in sled, device and
//! report records in a journal of plain files beside it.
//!
//! - sled tree `rollouts`: `r/{rollout}` → JSON [`RolloutRecord`];
//!   `d/{rollout}/{n:016x}` → JSON [`DecisionEntry`]. A transition and its
//!   decisions are written in one atomic batch and flushed before anything is
//!   published (STATE-1), so the audit log never misses or repeats a
//!   transition.
//! - `records/` ([`journal`], [`files`]): device records (`{device}` →
//!   postcard [`DeviceRecord`]) and latest reports (`{rollout}/{device}` →
//!   postcard release, phase, envelope `seq`, from which the trackers are
//!   rebuilt on start). A flush appends the records written since the last
//!   one to the current segment file as checksummed entries (one, or
//!   several of about 1 MiB after a burst) and syncs it, so the messages
//!   acknowledged after it are durable (STATE-1). Once a
//!   segment holds [`FOLD_AFTER_RECORDS`] records it is closed, and a
//!   background thread folds the closed segments into `records/snapshot`
//!   (newest record per key, in key order, streamed). A start folds what is
//!   left before it loads (a segment with no entries is dropped, not folded,
//!   so a start after a run that wrote nothing does not rewrite the
//!   snapshot). Records that do not decode go to sled tree
//!   `records.corrupt`, damaged entries to `records/aside/` (STATE-3).
//!
//! A report that counts is one record: it carries the report's `seq`, so
//! the device's replay floor is the larger of its device record's `last_seq` and
//! the `seq` of its stored reports (raised so on start). The device record
//! itself is written only when more than the floor changed (Hello, approval,
//! running release) or when the report is not stored. Deleting a rollout writes
//! its members' floors into their device records first.
//!
//! The coordinator epoch lives apart, in a small atomically written file
//! ([`crate::durable`]), so a lost or rebuilt database can never lower it.

mod files;
mod journal;

use crate::fleet::registry::DeviceRecord;
use crate::rollout::spec::RolloutSpec;
use crate::rollout::state::{Command, Decision, Observations, RolloutState};
use serde::{Deserialize, Serialize};
use swell_protocol::messages::Phase;
use swell_protocol::{DeviceId, KeyId, ReleaseId, RolloutId};

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
    /// Set once the rollout is completed, rolled back or aborted: its counts
    /// from then on, whatever devices report later.
    #[serde(default)]
    pub outcome: Option<FinalOutcome>,
    /// A later rollout that completed over (at least) this one's scope: this
    /// one's manifest is no longer the fleet's desired state for any device,
    /// so it is cleared and not published again.
    #[serde(default)]
    pub superseded_by: Option<RolloutId>,
}

/// A finished rollout's record of what happened: frozen when it finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalOutcome {
    pub waves: Vec<crate::rollout::health_gate::WaveCounts>,
    pub members: usize,
    pub finished_at: u64,
    /// The manifest that finished it (re-signed copies for freshness follow).
    pub manifest_seq: u64,
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
    /// And its `epoch`, the device's incarnation: a floor only within it.
    /// Last, so a report stored before it existed reads with 0.
    pub epoch: u64,
}

impl StoredReport {
    fn decode(bytes: &[u8]) -> Option<StoredReport> {
        postcard::from_bytes::<StoredReport>(bytes)
            .or_else(|_| {
                let mut v = bytes.to_vec();
                v.push(0);
                postcard::from_bytes::<StoredReport>(&v)
            })
            .ok()
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
    #[error("journal file: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot start the journal's fold thread: {0}")]
    FoldThread(std::io::Error),
}

/// What was loaded at start, and what could not be.
#[derive(Debug, Default)]
pub struct Loaded {
    pub rollouts: Vec<RolloutRecord>,
    pub devices: Vec<DeviceRecord>,
    pub reports: Vec<(RolloutId, DeviceId, StoredReport)>,
    /// Per operator key, the highest `issued_at` of a signed command accepted
    /// (OPS-2).
    pub operator_marks: Vec<(KeyId, u64)>,
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
    /// Removes a device's record (ENROLL-4); durable with the next flush.
    fn remove_device(&self, id: &DeviceId) -> Result<(), StoreError>;
    fn put_report(
        &self,
        rollout: &RolloutId,
        device: &DeviceId,
        report: &StoredReport,
    ) -> Result<(), StoreError>;
    /// Raises an operator key's high-water mark of `issued_at`; durable when
    /// it returns (the command it belongs to takes effect after it).
    fn put_operator_mark(&self, key: KeyId, issued_at: u64) -> Result<(), StoreError>;
    /// Deletes a rollout with its decision log and reports.
    fn delete_rollout(&self, rollout: &RolloutId) -> Result<(), StoreError>;
    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), StoreError>;
}

mod disk;
#[cfg(any(test, feature = "test-util"))]
mod memory;

pub use disk::{
    DEFAULT_CACHE_BYTES, DiskStore, FOLD_AFTER_RECORDS, FOLD_PART_RECORDS, Tuning,
    cache_bytes_from_mib,
};
#[cfg(any(test, feature = "test-util"))]
pub use memory::MemoryStore;
