//! What the engine says about rollouts, as types: a rollout's status (the
//! retained `{p}/ops/{fleet}/rollout/{id}/status` message and every command's
//! `status`) and its events (`{p}/ops/{fleet}/events`). The engine returns these; JSON
//! is written only where they go on the wire, and the server, the Kubernetes
//! controller and the tests read the types. The JSON shapes are the operator
//! protocol (docs/protocol.md §6 and the README), unchanged by the types.

use crate::fleet::registry::Enrollment;
use crate::rollout::health_gate::HaltReason;
use crate::rollout::spec::{BreachPolicy, SilentPolicy};
use crate::rollout::state::{Decision, PauseReason};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
    /// Why it stopped (a breach, an abort), in words.
    pub halt_reason: Option<String>,
    /// The same, typed, with the counts that made it breach.
    #[serde(default)]
    pub halted_by: Option<HaltReason>,
    pub members: usize,
    pub selector: String,
    pub policy: BreachPolicy,
    /// Eligible reports over the opened waves, and how many the breach check
    /// needs before a failure rate can stop the rollout.
    #[serde(default)]
    pub breach_evidence: BreachEvidence,
    /// Whether silent devices count against the gate after the deadline.
    #[serde(default)]
    pub silent: SilentPolicy,
    /// Completed, rolled back or aborted: these counts no longer change.
    #[serde(default)]
    pub finished: bool,
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
    /// Refused for now (no fresh beacon yet): will try again.
    #[serde(default)]
    pub waiting: u32,
    /// Refused for good: exposure cap, hardware, counter below its floor.
    #[serde(default)]
    pub not_eligible: u32,
    /// Rolled back because the rollout told them to.
    #[serde(default)]
    pub rolled_back: u32,
}

/// How much evidence the breach check has, against what it needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreachEvidence {
    pub reported: u32,
    pub min_sample: u32,
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
    Created {
        version: String,
        members: usize,
    },
    Removed,
    /// A later rollout completed over its scope; its manifest was cleared.
    Superseded {
        by: String,
    },
}

/// An operator command's reply (`{p}/ops/{fleet}/cmd` answered on its response
/// topic, docs/protocol.md §6): `ok` with the command's answer as `status`, or
/// refused with a `reason`. `T` is what the command answers ([`Answer`] when
/// written; a reader that knows the command it sent reads its own type).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply<T = Answer> {
    pub ok: bool,
    /// The command's `op`; absent when the command could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    /// Why it was refused (`unknown_rollout`, `refused`, `unsigned`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<T>,
    /// The command's `id`, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl Reply {
    pub fn accepted(op: &str, message: String, answer: Answer) -> Self {
        Reply {
            ok: true,
            op: Some(op.to_string()),
            reason: None,
            message,
            status: Some(answer),
            id: None,
        }
    }

    /// `op` is `None` for a command that could not be read.
    pub fn refused(op: Option<&str>, reason: &str, message: String) -> Self {
        Reply {
            ok: false,
            op: op.map(str::to_string),
            reason: Some(reason.to_string()),
            message,
            status: None,
            id: None,
        }
    }
}

/// What an accepted command answers, by command.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Answer {
    /// `create`, `status` of one rollout, and every rollout command.
    Rollout(Box<RolloutStatus>),
    /// `status` without a rollout: all of them.
    Rollouts(Vec<RolloutStatus>),
    /// `approve`.
    Device { device: String },
    /// `reject`: the devices removed.
    Removed { removed: Vec<String> },
    /// `fleet`.
    Fleet(FleetSummary),
    /// `devices`.
    Devices(DeviceList),
    /// A command taken on to be applied elsewhere (the Kubernetes controller).
    Nothing,
}

/// The `fleet` command's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetSummary {
    pub devices: usize,
    pub approved: u64,
    pub pending: usize,
    pub online: u64,
    /// Devices by the release they run (id in hex, or `none`).
    pub running: BTreeMap<String, u64>,
    /// `key=value` → release → devices: which release runs where.
    pub by_label: BTreeMap<String, BTreeMap<String, u64>>,
    /// The fleet's desired state: every completed rollout whose manifest still
    /// stands (not superseded), by rollout id.
    #[serde(default)]
    pub desired: Vec<DesiredRelease>,
}

/// A completed rollout that is still the desired state of its scope, and the
/// devices that run its release now: its members' counts are final (RO-008);
/// devices that installed it from the standing manifest afterwards (they
/// enrolled or came back later) are counted here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredRelease {
    pub rollout: String,
    /// The release id (hex).
    pub release: String,
    /// The rollout's selector (empty: the whole fleet).
    pub selector: String,
    /// Devices that run the release now.
    pub running: u64,
    /// Of those, devices that were not members of the rollout: they joined
    /// after it completed.
    pub joined_after_completion: u64,
}

/// The `devices` command's answer: how many matched, and the first `limit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceList {
    pub matched: usize,
    pub devices: Vec<DeviceRow>,
}

/// One device as the `devices` command lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRow {
    pub device: String,
    pub enrollment: Enrollment,
    pub online: bool,
    /// The release it runs (id in hex).
    pub running: Option<String>,
    pub hardware: String,
    pub agent: String,
    /// The id of the key it is bound to (what `approve` takes as `key`).
    #[serde(default)]
    pub key: String,
    /// `key=value`.
    pub labels: Vec<String>,
    /// Unix seconds.
    pub last_seen: u64,
    /// Connections taken over by another client with its id, as its agent
    /// reported them (protocol 2 session notes; since the agent started).
    #[serde(default)]
    pub takeovers: u32,
    /// The life of its trust state (STATE-3): a new one after the device
    /// lost its trust file.
    #[serde(default)]
    pub incarnation: u64,
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

    // Replies keep the shape clients already read: `status` on success,
    // `reason` on refusal, `op` only when the command could be read.
    #[test]
    fn status_replies_keep_their_json_shape() {
        let ok = Reply::accepted(
            "approve",
            "device d approved".into(),
            Answer::Device { device: "d".into() },
        );
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"ok":true,"op":"approve","message":"device d approved","status":{"device":"d"}}"#
        );
        let mut no = Reply::refused(None, "malformed", "not JSON".into());
        no.id = Some("7".into());
        let text = serde_json::to_string(&no).unwrap();
        assert_eq!(
            text,
            r#"{"ok":false,"reason":"malformed","message":"not JSON","id":"7"}"#
        );
        let back: Reply<serde_json::Value> = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (back.ok, back.status, back.id.as_deref()),
            (false, None, Some("7"))
        );
    }
}
