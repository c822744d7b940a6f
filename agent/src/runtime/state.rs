//! The status snapshot the agent writes to `{state}/status.json` for
//! `swell-agent status` and for people.

use crate::deployment::{Job, Stage};
use crate::device::{Counters, DeviceCore, Running};
use serde::Serialize;

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
    /// Manifests held until they can act (no fresh beacon, another install).
    pub held_manifests: usize,
    pub running: Option<Running>,
    pub previous: Option<Running>,
    pub job: Option<JobStatus>,
    pub counter_floor: u64,
    pub outbox: usize,
    pub outbox_dropped: u64,
    pub counters: Counters,
    /// Connections in a row the broker closed within a minute of opening (0
    /// once one held a minute): another client with this device's client id
    /// (two agents with one device id, a copy of this one's state) looks so.
    pub closed_soon_in_a_row: u32,
    /// Connections taken over since the agent started (what its session notes
    /// tell the coordinator).
    pub takeovers: u32,
}

impl Status {
    pub fn of(core: &DeviceCore, connected: bool, outbox: usize, outbox_dropped: u64) -> Status {
        Status {
            device: core.id().to_string(),
            boot: core.boot(),
            connected,
            key_list_version: core.keys().map(|k| k.version),
            waiting_for_key_list: core.waiting_for_key_list(),
            held_manifests: core.held_manifests(),
            running: core.installed().running.clone(),
            previous: core.installed().previous.clone(),
            job: core.job().map(JobStatus::of),
            counter_floor: core.trust().counter_floor,
            outbox,
            outbox_dropped,
            counters: core.counters().clone(),
            closed_soon_in_a_row: 0,
            takeovers: core.takeovers(),
        }
    }
}
