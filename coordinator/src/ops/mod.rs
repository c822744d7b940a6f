//! Operator commands over MQTT, in JSON so `mosquitto_pub` and any script can
//! drive Swell. Every command is untrusted input: unknown fields, bad values and
//! unknown rollouts are refused with a reason a person understands, and nothing
//! changes.
//!
//! ```json
//! {"op": "pause", "rollout": "fw-2-3", "id": "req-1"}
//! {"op": "create", "spec": {"rollout": "fw-2-3", "release": "<hex>", "waves": ["1%", "100%"]}}
//! ```
//! Common fields: `id` (echoed in the reply), `reply_to` (reply topic when the
//! MQTT 5 response topic is not set). Signed form, required when operator keys
//! are configured: `{"signed": "<command JSON text>", "key_id": "<hex>", "sig":
//! "<hex>"}` with an ed25519 signature over `swell/ops/v1 ‖ 0x00 ‖ text`, the
//! text of any size a command may have (OPS-1), and the command carrying
//! `issued_at` (Unix seconds, within 5 minutes), a unique `nonce`, `to` (the
//! command topic it is meant for, `{p}/ops/{fleet}/cmd`: that fleet's one
//! coordinator on that prefix) and, when it wants an answer, `reply_to`, which
//! an MQTT 5 response topic must then equal (OPS-3). A signed command is
//! accepted once: nonces within the time window, and across restarts an
//! `issued_at` above the highest one accepted from its key before the start
//! (persisted by the engine before the command takes effect; OPS-2).
//!
//! The `create` spec as operators write it, and how it becomes a rollout spec,
//! is in [`spec`].

mod spec;
#[cfg(test)]
mod tests;

pub use spec::{CreateSpec, MaintenanceSpec};

use crate::rollout::state::Command;
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
use swell_protocol::cohort::Selector;
use swell_protocol::crypto::{self, PublicKey, Signature};
use swell_protocol::{DeviceId, KeyId, RolloutId};

/// Largest command accepted.
pub const MAX_COMMAND: usize = 128 * 1024;
/// Domain tag of operator signatures.
pub const OPS_DOMAIN: &str = "swell/ops/v1";
/// How far `issued_at` of a signed command may be from the coordinator's clock.
pub const MAX_SKEW_SECS: u64 = 300;

/// A parsed operator command.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    Create {
        spec: Box<CreateSpec>,
        #[serde(default)]
        allow_overlap: bool,
    },
    Pause {
        rollout: RolloutId,
    },
    Resume {
        rollout: RolloutId,
    },
    Promote {
        rollout: RolloutId,
    },
    Abort {
        rollout: RolloutId,
    },
    Rollback {
        rollout: RolloutId,
    },
    Retry {
        rollout: RolloutId,
    },
    /// Approve a pending device; with `key` (its key id, as `devices` and
    /// the pending list show it) only while that is the key it is pending
    /// with (ENROLL-1).
    Approve {
        device: DeviceId,
        #[serde(default)]
        key: Option<KeyId>,
    },
    /// Remove a device's record (ENROLL-4): `device` (with `key`, only
    /// while it is bound to that key), or with `pending: true` every device
    /// pending approval. A device a rollout counts is not removed. A removed
    /// device may say Hello again and is then new.
    Reject {
        #[serde(default)]
        device: Option<DeviceId>,
        #[serde(default)]
        key: Option<KeyId>,
        #[serde(default)]
        pending: bool,
    },
    Status {
        rollout: Option<RolloutId>,
    },
    /// Inventory: devices by enrollment, liveness and running release.
    Fleet,
    /// Devices, filtered: a label selector (`region=eu,ring in (a,b)`), a
    /// running release (hex prefix, or `none`), liveness; at most `limit`.
    Devices {
        #[serde(default)]
        selector: Option<String>,
        #[serde(default)]
        release: Option<String>,
        #[serde(default)]
        online: Option<bool>,
        /// Only devices pending approval (with the key each is pending
        /// with), or only approved ones.
        #[serde(default)]
        enrollment: Option<crate::fleet::registry::Enrollment>,
        #[serde(default)]
        limit: Option<usize>,
    },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Pause { .. } => "pause",
            Op::Resume { .. } => "resume",
            Op::Promote { .. } => "promote",
            Op::Abort { .. } => "abort",
            Op::Rollback { .. } => "rollback",
            Op::Retry { .. } => "retry",
            Op::Approve { .. } => "approve",
            Op::Reject { .. } => "reject",
            Op::Status { .. } => "status",
            Op::Fleet => "fleet",
            Op::Devices { .. } => "devices",
        }
    }

    /// The state machine command and its rollout, for the commands that are one.
    /// Whether the command creates or steers a rollout (what the Kubernetes
    /// controller owns in Kubernetes mode).
    pub fn changes_rollouts(&self) -> bool {
        matches!(self, Op::Create { .. }) || self.as_command().is_some()
    }

    pub fn as_command(&self) -> Option<(&RolloutId, Command)> {
        Some(match self {
            Op::Pause { rollout } => (rollout, Command::Pause),
            Op::Resume { rollout } => (rollout, Command::Resume),
            Op::Promote { rollout } => (rollout, Command::Promote),
            Op::Abort { rollout } => (rollout, Command::Abort),
            Op::Rollback { rollout } => (rollout, Command::Rollback),
            Op::Retry { rollout } => (rollout, Command::Retry),
            _ => return None,
        })
    }
}

/// A command with its transport details.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: Option<String>,
    pub reply_to: Option<String>,
    pub op: Op,
    /// Key id of the operator who signed, if signed.
    pub signer: Option<KeyId>,
    /// The signer's new high-water mark of `issued_at`, to be stored durably
    /// before the command takes effect (OPS-2).
    pub mark: Option<(KeyId, u64)>,
}

/// Why a command was refused before it reached the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub id: Option<String>,
    pub reply_to: Option<String>,
    pub reason: &'static str,
    pub message: String,
}

/// Parses and authenticates commands; remembers recent nonces (replay).
#[derive(Debug, Default)]
pub struct OpsParser {
    operator_keys: Vec<PublicKey>,
    /// The topic commands arrive on; a signed command must name it.
    topic: String,
    /// Per operator key, the highest `issued_at` accepted before this start.
    floor: HashMap<KeyId, u64>,
    /// ... and since.
    high: HashMap<KeyId, u64>,
    nonces: HashMap<String, u64>,
    order: VecDeque<(u64, String)>,
}

/// Longest `id`, `reply_to`, `nonce`, `to`, `key_id` and `sig`.
const MAX_FIELD: usize = 256;

fn take_str(
    map: &mut serde_json::Map<String, serde_json::Value>,
    key: &str,
    max: usize,
) -> Result<Option<String>, String> {
    match map.remove(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if s.len() <= max => Ok(Some(s)),
        Some(_) => Err(format!("{key} must be a string of at most {max} bytes")),
    }
}

impl OpsParser {
    /// With operator keys, every command must be signed by one of them, name
    /// `topic` and be issued after `marks` (each key's highest `issued_at`
    /// accepted before, as stored).
    pub fn new(operator_keys: Vec<PublicKey>, topic: String, marks: &[(KeyId, u64)]) -> Self {
        let floor: HashMap<KeyId, u64> = marks.iter().copied().collect();
        OpsParser {
            operator_keys,
            topic,
            high: floor.clone(),
            floor,
            ..Default::default()
        }
    }

    pub fn requires_signature(&self) -> bool {
        !self.operator_keys.is_empty()
    }

    /// Parses one command payload; `response_topic`: its MQTT 5 response
    /// topic, if it has one.
    pub fn parse(
        &mut self,
        payload: &[u8],
        now: u64,
        response_topic: Option<&str>,
    ) -> Result<Request, Refused> {
        let refuse = |reason: &'static str, message: String| Refused {
            id: None,
            reply_to: None,
            reason,
            message,
        };
        if payload.len() > MAX_COMMAND {
            return Err(refuse(
                "oversized",
                format!(
                    "command is {} bytes; the limit is {MAX_COMMAND}",
                    payload.len()
                ),
            ));
        }
        let outer: serde_json::Value = serde_json::from_slice(payload)
            .map_err(|e| refuse("malformed", format!("invalid JSON: {e}")))?;
        let serde_json::Value::Object(mut map) = outer else {
            return Err(refuse("malformed", "a command is a JSON object".into()));
        };
        let mut signer = None;
        if map.contains_key("signed") {
            // The whole command, whatever its size (a create embeds a release).
            let text = take_str(&mut map, "signed", MAX_COMMAND)
                .map_err(|m| refuse("malformed", m))?
                .unwrap_or_default();
            let key_id = take_str(&mut map, "key_id", MAX_FIELD)
                .map_err(|m| refuse("malformed", m))?
                .unwrap_or_default();
            let sig = take_str(&mut map, "sig", MAX_FIELD)
                .map_err(|m| refuse("malformed", m))?
                .unwrap_or_default();
            if let Some(k) = map.keys().next() {
                return Err(refuse(
                    "malformed",
                    format!("unknown field {k:?} beside a signed command"),
                ));
            }
            let key_id = KeyId::from_hex(&key_id)
                .map_err(|_| refuse("malformed", "key_id is not 8 bytes of hex".into()))?;
            let sig = Signature::from_hex(&sig)
                .map_err(|_| refuse("malformed", "sig is not 64 bytes of hex".into()))?;
            let key = self
                .operator_keys
                .iter()
                .find(|k| k.key_id() == key_id)
                .ok_or_else(|| refuse("forged", format!("key {key_id} is not an operator key")))?;
            crypto::verify(key, OPS_DOMAIN, &[text.as_bytes()], &sig)
                .map_err(|_| refuse("forged", "operator signature does not verify".into()))?;
            let inner: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| refuse("malformed", format!("signed command is not JSON: {e}")))?;
            let serde_json::Value::Object(inner) = inner else {
                return Err(refuse("malformed", "a command is a JSON object".into()));
            };
            map = inner;
            signer = Some(key_id);
        }
        let id = take_str(&mut map, "id", MAX_FIELD).map_err(|m| refuse("malformed", m))?;
        let reply_to =
            take_str(&mut map, "reply_to", MAX_FIELD).map_err(|m| refuse("malformed", m))?;
        let with = |reason: &'static str, message: String| Refused {
            id: id.clone(),
            reply_to: reply_to.clone(),
            reason,
            message,
        };
        let issued_at = map.remove("issued_at");
        let nonce = take_str(&mut map, "nonce", MAX_FIELD).map_err(|m| with("malformed", m))?;
        let to = take_str(&mut map, "to", MAX_FIELD).map_err(|m| with("malformed", m))?;
        let mut mark = None;
        if self.requires_signature() {
            let Some(key_id) = signer else {
                return Err(with(
                    "unsigned",
                    "commands must be signed by an operator key".into(),
                ));
            };
            if to.as_deref() != Some(self.topic.as_str()) {
                return Err(with(
                    "misdirected",
                    format!(
                        "signed for {}, received on {} (a signed command names its command topic in \"to\")",
                        to.as_deref().unwrap_or("no topic"),
                        self.topic
                    ),
                ));
            }
            if let Some(rt) = response_topic
                && reply_to.as_deref() != Some(rt)
            {
                return Err(with(
                    "misdirected",
                    format!("the response topic {rt} is not the signed reply_to"),
                ));
            }
            let at = issued_at.and_then(|v| v.as_u64()).ok_or_else(|| {
                with(
                    "malformed",
                    "signed commands need issued_at (Unix seconds)".into(),
                )
            })?;
            if at.abs_diff(now) > MAX_SKEW_SECS {
                return Err(with(
                    "expired",
                    format!("issued_at {at} is more than {MAX_SKEW_SECS} s from now ({now})"),
                ));
            }
            let nonce =
                nonce.ok_or_else(|| with("malformed", "signed commands need a nonce".into()))?;
            if self.nonces.contains_key(&nonce) {
                return Err(with(
                    "replayed",
                    format!("nonce {nonce:?} was already used"),
                ));
            }
            let floor = self.floor.get(&key_id).copied().unwrap_or(0);
            if at <= floor {
                return Err(with(
                    "replayed",
                    format!(
                        "issued_at {at} is not after the last command of key {key_id} accepted before this coordinator started ({floor}); sign it again"
                    ),
                ));
            }
            self.remember(nonce, now);
            let high = self.high.entry(key_id).or_insert(0);
            if at > *high {
                *high = at;
                mark = Some((key_id, at));
            }
        }
        let op: Op = serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| with("invalid", e.to_string()))?;
        Ok(Request {
            id,
            reply_to,
            op,
            signer,
            mark,
        })
    }

    fn remember(&mut self, nonce: String, now: u64) {
        while let Some((t, _)) = self.order.front() {
            if now.saturating_sub(*t) <= 2 * MAX_SKEW_SECS && self.order.len() < 100_000 {
                break;
            }
            if let Some((_, n)) = self.order.pop_front() {
                self.nonces.remove(&n);
            }
        }
        self.nonces.insert(nonce.clone(), now);
        self.order.push_back((now, nonce));
    }
}

/// Two selectors that no device can satisfy both of: some key is pinned to
/// disjoint value sets, or required by one and forbidden by the other.
pub fn provably_disjoint(a: &Selector, b: &Selector) -> bool {
    use swell_protocol::cohort::Op as S;
    fn allowed(op: &S) -> Option<Vec<&str>> {
        match op {
            S::Eq(v) => Some(vec![v.as_str()]),
            S::In(vs) => Some(vs.iter().map(String::as_str).collect()),
            _ => None,
        }
    }
    for ra in &a.requirements {
        for rb in b.requirements.iter().filter(|r| r.key == ra.key) {
            let disjoint = match (&ra.op, &rb.op) {
                (S::Exists, S::NotExists) | (S::NotExists, S::Exists) => true,
                (S::NotExists, o) | (o, S::NotExists) => allowed(o).is_some(),
                (x, y) => match (allowed(x), allowed(y)) {
                    (Some(p), Some(q)) => !p.iter().any(|v| q.contains(v)),
                    (Some(p), None) => match y {
                        S::NotEq(v) => p == [v.as_str()],
                        S::NotIn(vs) => p.iter().all(|v| vs.iter().any(|w| w == v)),
                        _ => false,
                    },
                    (None, Some(q)) => match x {
                        S::NotEq(v) => q == [v.as_str()],
                        S::NotIn(vs) => q.iter().all(|v| vs.iter().any(|w| w == v)),
                        _ => false,
                    },
                    (None, None) => false,
                },
            };
            if disjoint {
                return true;
            }
        }
    }
    false
}
