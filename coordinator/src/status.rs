//! What the engine says about rollouts, as types: a rollout's status (the
//! retained `{p}/ops/rollout/{id}/status` message and every command's
//! `status`) and its events (`{p}/ops/events`). The engine returns these; JSON
//! is written only where they go on the wire, and the server, the Kubernetes
//! controller and the tests read the types. The JSON shapes are the operator
//! protocol (docs/protocol.md §6 and the README), unchanged by the types.

use crate::rollout::spec::BreachPolicy;
use crate::rollout::state::{Decision, PauseReason};
use serde::{Deserialize, Serialize};

/// One rollout, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub rollout: String,
    pub fleet: String,
    /// The release id (hex).
    pub release: String,
    /// `pending`, `wave_open`, `baking`, `paused`, `completed`, `aborted`,
    /// `rolling_back` or `rolled_back`.
    pub phase: String,
    /// Who or what paused it, while paused.
    pub paused_by: Option<PauseReason>,
    /// The newest wave opened (or about to open).
    pub wave: u16,
    pub waves: Vec<WaveProgress>,
    /// The manifest's bucket bound, in decimal (a u64 does not fit a JSON number).
    pub open_below: String,
    /// What the manifest tells devices (`Active`, `Paused`, `Halted`, `RollingBack`).
    pub manifest_state: String,
    pub manifest_seq: u64,
    pub retry: u32,
    /// Why it waits (a schedule, or a gate that holds).
    pub waiting: Option<String>,
    /// Why it stopped (a breach, an abort).
    pub halt_reason: Option<String>,
    pub members: usize,
    pub selector: String,
    pub policy: BreachPolicy,
    /// When this status was made (Unix seconds).
    pub updated_at: u64,
}

impl RolloutStatus {
    /// Healthy and failed devices over the opened waves.
    pub fn opened_totals(&self) -> (u32, u32) {
        self.waves
            .iter()
            .filter(|w| w.opened)
            .fold((0, 0), |(h, f), w| (h + w.healthy, f + w.failed))
    }
}

/// One wave's counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveProgress {
    pub index: usize,
    /// `canary`, `10%`, …
    pub label: String,
    pub opened: bool,
    /// Members assigned to the wave, online or not.
    pub planned: u32,
    /// Members seen online since the wave opened.
    pub population: u32,
    pub healthy: u32,
    pub failed: u32,
    pub in_progress: u32,
    pub silent: u32,
}

/// Something that happened to a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutEvent {
    /// Unix seconds.
    pub at: u64,
    /// The coordinator epoch that made it.
    pub epoch: u64,
    pub rollout: String,
    #[serde(flatten)]
    pub what: EventKind,
}

/// A decision of the rollout's state machine, or one of the events around it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EventKind {
    /// `{"decision": "open_wave", "wave": 1, …}`: as stored in the audit log.
    Decision(Decision),
    /// `{"event": "created", …}`.
    Lifecycle(Lifecycle),
}

/// A rollout created or removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Lifecycle {
    Created { version: String, members: usize },
    Removed,
}

#[cfg(test)]
mod tests {
    use super::*;

    // The operator protocol's JSON, byte for byte: a decision event and a
    // lifecycle event, written and read back.
    #[test]
    fn status_events_keep_their_json_shape() {
        let e = RolloutEvent {
            at: 7,
            epoch: 2,
            rollout: "fw".into(),
            what: EventKind::Decision(Decision::OpenWave {
                wave: 1,
                open_below: 9,
            }),
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(
            text,
            r#"{"at":7,"epoch":2,"rollout":"fw","decision":"open_wave","wave":1,"open_below":9}"#
        );
        assert_eq!(serde_json::from_str::<RolloutEvent>(&text).unwrap(), e);
        let c = RolloutEvent {
            at: 1,
            epoch: 1,
            rollout: "fw".into(),
            what: EventKind::Lifecycle(Lifecycle::Created {
                version: "2.0".into(),
                members: 3,
            }),
        };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(
            text,
            r#"{"at":1,"epoch":1,"rollout":"fw","event":"created","version":"2.0","members":3}"#
        );
        assert_eq!(serde_json::from_str::<RolloutEvent>(&text).unwrap(), c);
    }
}
