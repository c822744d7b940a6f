//! What the device runs, as kept in the store, and the status snapshot the agent
//! writes to `{state}/status.json` for `swell-agent status` and for people.

use crate::deployment::{Job, Stage};
use serde::{Deserialize, Serialize};
use swell_protocol::{ReleaseId, RolloutId};

/// A release the device runs (or ran).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    pub release: ReleaseId,
    pub rollout: Option<RolloutId>,
    pub counter: u64,
    pub version: String,
}

/// What runs, what ran before, and the last release that failed here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub running: Option<Running>,
    pub previous: Option<Running>,
    /// (rollout, release, retry generation) of the last failure.
    pub failed: Option<(RolloutId, ReleaseId, u32)>,
}

/// The journaled job, for people.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub rollout: String,
    pub release: String,
    pub counter: u64,
    pub stage: &'static str,
    pub reason: Option<String>,
    pub attempt: u16,
}

impl JobStatus {
    pub fn of(j: &Job) -> JobStatus {
        let (stage, reason) = match &j.stage {
            Stage::Downloading => ("downloading", None),
            Stage::Installing => ("installing", None),
            Stage::Probation { .. } => ("probation", None),
            Stage::Committed => ("committed", None),
            Stage::RollingBack { reason } => ("rolling_back", Some(reason)),
            Stage::RolledBack { reason } => ("rolled_back", Some(reason)),
            Stage::Failed { reason } => ("failed", Some(reason)),
        };
        JobStatus {
            rollout: j.rollout.to_string(),
            release: hex::encode(j.release.0),
            counter: j.counter,
            stage,
            reason: reason.map(|r| {
                format!(
                    "{}: {}",
                    swell_protocol::messages::reason::name(r.code),
                    r.detail
                )
            }),
            attempt: j.attempt,
        }
    }
}

/// The snapshot in `status.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub device: String,
    pub boot: u64,
    pub connected: bool,
    pub key_list_version: Option<u64>,
    /// Fleet messages received before any key list, checked once one arrives.
    pub waiting_for_key_list: usize,
    pub running: Option<Running>,
    pub previous: Option<Running>,
    pub job: Option<JobStatus>,
    pub counter_floor: u64,
    pub outbox: usize,
    pub outbox_dropped: u64,
    pub counters: super::Counters,
}
