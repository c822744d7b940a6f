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
//! "<hex>"}` with an ed25519 signature over `swell/ops/v1 ‖ 0x00 ‖ text`, and the
//! command carrying `issued_at` (Unix seconds, within 5 minutes) and a unique `nonce`.

use crate::rollout::planner::WavePlan;
use crate::rollout::spec::{BreachPolicy, GateSpec, MaintenanceWindows, RolloutSpec};
use crate::rollout::state::Command;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use swell_protocol::cohort::{self, Selector};
use swell_protocol::crypto::{self, PublicKey, Signature};
use swell_protocol::messages::reason;
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::{DeviceId, FleetId, KeyId, RolloutId};

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
    Approve {
        device: DeviceId,
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

/// The `create` spec as operators write it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSpec {
    pub rollout: RolloutId,
    /// The threshold-signed release, hex of its encoded bytes.
    pub release: String,
    #[serde(default)]
    pub fleet: Option<FleetId>,
    #[serde(default)]
    pub selector: String,
    #[serde(default)]
    pub canary: Vec<DeviceId>,
    /// Cumulative percentages: `["1%", "10%", "100%"]`.
    pub waves: Vec<String>,
    #[serde(default = "d_min_devices")]
    pub min_devices: u32,
    #[serde(default = "d_success")]
    pub success_threshold: String,
    #[serde(default = "d_failure")]
    pub max_failure_rate: String,
    /// humantime: `5m`, `0s`.
    #[serde(default = "d_bake")]
    pub bake: String,
    #[serde(default = "d_timeout")]
    pub install_timeout: String,
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    #[serde(default = "d_policy")]
    pub policy: String,
    #[serde(default)]
    pub manual_gates: Vec<u16>,
    /// RFC 3339.
    #[serde(default)]
    pub start_at: Option<String>,
    /// Wave index → RFC 3339.
    #[serde(default)]
    pub not_before: BTreeMap<u16, String>,
    #[serde(default)]
    pub maintenance: Option<MaintenanceSpec>,
    /// Reason names (`crash_loop`) or codes that breach at once.
    #[serde(default)]
    pub critical_reasons: Vec<String>,
}

/// Maintenance windows as operators write them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceSpec {
    pub tz: String,
    /// `["02:00-04:00", "22:30-01:00"]`.
    pub windows: Vec<String>,
}

fn d_min_devices() -> u32 {
    1
}
fn d_success() -> String {
    "95%".into()
}
fn d_failure() -> String {
    "5%".into()
}
fn d_bake() -> String {
    "5m".into()
}
fn d_timeout() -> String {
    "30m".into()
}
fn d_policy() -> String {
    "pause".into()
}

fn duration(what: &str, s: &str) -> Result<u64, String> {
    humantime::parse_duration(s)
        .map(|d| d.as_secs())
        .map_err(|e| format!("{what} {s:?}: {e}"))
}

fn time(what: &str, s: &str) -> Result<u64, String> {
    let ts: jiff::Timestamp = s
        .parse()
        .map_err(|e| format!("{what} {s:?} is not an RFC 3339 time: {e}"))?;
    u64::try_from(ts.as_second()).map_err(|_| format!("{what} {s:?} is before 1970"))
}

fn hhmm(s: &str) -> Result<u16, String> {
    let (h, m) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not HH:MM"))?;
    let h: u16 = h.parse().map_err(|_| format!("{s:?} is not HH:MM"))?;
    let m: u16 = m.parse().map_err(|_| format!("{s:?} is not HH:MM"))?;
    if h > 24 || m > 59 || (h == 24 && m > 0) {
        return Err(format!("{s:?} is not a time of day"));
    }
    Ok(h * 60 + m)
}

fn reason_code(s: &str) -> Result<u16, String> {
    if let Ok(n) = s.parse::<u16>() {
        return Ok(n);
    }
    (0..=100u16)
        .find(|c| reason::name(*c) == s)
        .ok_or_else(|| format!("unknown failure reason {s:?}"))
}

impl CreateSpec {
    /// Validates everything but the release signatures (the caller checks those
    /// against its key list).
    pub fn into_spec(self, default_fleet: &FleetId) -> Result<RolloutSpec, String> {
        let bytes =
            hex::decode(self.release.trim()).map_err(|e| format!("release is not hex: {e}"))?;
        let release = ThresholdSigned::decode(&bytes).map_err(|e| format!("release: {e}"))?;
        let selector = Selector::parse(&self.selector).map_err(|e| e.to_string())?;
        let steps = self
            .waves
            .iter()
            .map(|w| cohort::parse_percent(w))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("waves: {e}"))?;
        let plan = WavePlan::new(self.canary, steps).map_err(|e| e.to_string())?;
        let gate = GateSpec {
            min_devices: self.min_devices,
            success_threshold_ppm: cohort::parse_percent(&self.success_threshold)
                .map_err(|e| format!("success_threshold: {e}"))?,
            max_failure_rate_ppm: cohort::parse_percent(&self.max_failure_rate)
                .map_err(|e| format!("max_failure_rate: {e}"))?,
            bake_secs: duration("bake", &self.bake)?,
            install_timeout_secs: duration("install_timeout", &self.install_timeout)?,
            critical_reasons: self
                .critical_reasons
                .iter()
                .map(|r| reason_code(r))
                .collect::<Result<_, _>>()?,
        };
        let policy = match self.policy.as_str() {
            "pause" => BreachPolicy::Pause,
            "rollback" => BreachPolicy::Rollback,
            other => return Err(format!("policy {other:?}: use pause or rollback")),
        };
        let windows = match self.maintenance {
            None => None,
            Some(m) => {
                let mut daily = Vec::new();
                for w in &m.windows {
                    let (a, b) = w
                        .split_once('-')
                        .ok_or_else(|| format!("window {w:?} is not HH:MM-HH:MM"))?;
                    daily.push((hhmm(a.trim())?, hhmm(b.trim())?.min(1440)));
                }
                Some(MaintenanceWindows { tz: m.tz, daily })
            }
        };
        let spec = RolloutSpec {
            id: self.rollout,
            fleet: self.fleet.unwrap_or_else(|| default_fleet.clone()),
            release,
            selector,
            plan,
            gate,
            policy,
            manual_gates: self.manual_gates,
            max_in_flight: self.max_in_flight,
            start_at: self
                .start_at
                .as_deref()
                .map(|s| time("start_at", s))
                .transpose()?,
            not_before: self
                .not_before
                .iter()
                .map(|(w, t)| Ok((*w, time("not_before", t)?)))
                .collect::<Result<_, String>>()?,
            windows,
        };
        spec.validate()?;
        Ok(spec)
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
    nonces: HashMap<String, u64>,
    order: VecDeque<(u64, String)>,
}

fn take_str(
    map: &mut serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<Option<String>, String> {
    match map.remove(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if s.len() <= 256 => Ok(Some(s)),
        Some(_) => Err(format!("{key} must be a string of at most 256 bytes")),
    }
}

impl OpsParser {
    /// With operator keys, every command must be signed by one of them.
    pub fn new(operator_keys: Vec<PublicKey>) -> Self {
        OpsParser {
            operator_keys,
            ..Default::default()
        }
    }

    pub fn requires_signature(&self) -> bool {
        !self.operator_keys.is_empty()
    }

    /// Parses one command payload.
    pub fn parse(&mut self, payload: &[u8], now: u64) -> Result<Request, Refused> {
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
            let text = take_str(&mut map, "signed")
                .map_err(|m| refuse("malformed", m))?
                .unwrap_or_default();
            let key_id = take_str(&mut map, "key_id")
                .map_err(|m| refuse("malformed", m))?
                .unwrap_or_default();
            let sig = take_str(&mut map, "sig")
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
        let id = take_str(&mut map, "id").map_err(|m| refuse("malformed", m))?;
        let reply_to = take_str(&mut map, "reply_to").map_err(|m| refuse("malformed", m))?;
        let with = |reason: &'static str, message: String| Refused {
            id: id.clone(),
            reply_to: reply_to.clone(),
            reason,
            message,
        };
        let issued_at = map.remove("issued_at");
        let nonce = take_str(&mut map, "nonce").map_err(|m| with("malformed", m))?;
        if self.requires_signature() {
            if signer.is_none() {
                return Err(with(
                    "unsigned",
                    "commands must be signed by an operator key".into(),
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
            self.remember(nonce, now);
        }
        let op: Op = serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| with("invalid", e.to_string()))?;
        Ok(Request {
            id,
            reply_to,
            op,
            signer,
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

#[cfg(test)]
mod tests {
    use super::*;
    use swell_protocol::testkeys::test_key;

    fn fleet() -> FleetId {
        FleetId::new("f").unwrap()
    }

    #[test]
    fn ops_parse_commands() {
        let mut p = OpsParser::new(vec![]);
        let r = p
            .parse(
                br#"{"op":"pause","rollout":"fw-1","id":"7","reply_to":"me/replies"}"#,
                0,
            )
            .unwrap();
        assert_eq!(
            r.op,
            Op::Pause {
                rollout: RolloutId::new("fw-1").unwrap()
            }
        );
        assert_eq!(r.id.as_deref(), Some("7"));
        assert_eq!(r.reply_to.as_deref(), Some("me/replies"));
        let r = p.parse(br#"{"op":"status"}"#, 0).unwrap();
        assert_eq!(r.op, Op::Status { rollout: None });
    }

    #[test]
    fn ops_refusals_say_why() {
        let mut p = OpsParser::new(vec![]);
        let table: &[(&[u8], &str, &str)] = &[
            (b"not json", "malformed", "invalid JSON"),
            (b"[1,2]", "malformed", "JSON object"),
            (
                br#"{"op":"explode","rollout":"x"}"#,
                "invalid",
                "unknown variant",
            ),
            (br#"{"op":"pause"}"#, "invalid", "missing field `rollout`"),
            (
                br#"{"op":"pause","rollout":"x","force":true}"#,
                "invalid",
                "unknown field `force`",
            ),
            (
                br#"{"op":"pause","rollout":"Bad/Id"}"#,
                "invalid",
                "rollout id",
            ),
            (
                br#"{"op":"pause","rollout":"x","id":5}"#,
                "malformed",
                "id must be a string",
            ),
        ];
        for (input, reason, msg) in table {
            let e = p.parse(input, 0).unwrap_err();
            assert_eq!(
                e.reason,
                *reason,
                "{}: {e:?}",
                String::from_utf8_lossy(input)
            );
            assert!(
                e.message.contains(msg),
                "{}: {}",
                String::from_utf8_lossy(input),
                e.message
            );
        }
        let big = vec![b' '; MAX_COMMAND + 1];
        assert_eq!(p.parse(&big, 0).unwrap_err().reason, "oversized");
    }

    fn signed(key: &swell_protocol::SecretKey, text: &str) -> Vec<u8> {
        let sig = key.sign(OPS_DOMAIN, &[text.as_bytes()]);
        serde_json::json!({"signed": text, "key_id": key.key_id().to_string(), "sig": sig.to_string()})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn ops_signed_commands() {
        let op = test_key("operator-0");
        let mut p = OpsParser::new(vec![op.public()]);
        let cmd = r#"{"op":"abort","rollout":"r1","issued_at":1000,"nonce":"n1"}"#;
        let r = p.parse(&signed(&op, cmd), 1000).unwrap();
        assert_eq!(r.signer, Some(op.key_id()));
        // Replay of the same signed command.
        assert_eq!(
            p.parse(&signed(&op, cmd), 1001).unwrap_err().reason,
            "replayed"
        );
        // Unsigned when signatures are required.
        assert_eq!(
            p.parse(br#"{"op":"abort","rollout":"r1"}"#, 1000)
                .unwrap_err()
                .reason,
            "unsigned"
        );
        // Another key.
        let other = test_key("operator-9");
        assert_eq!(
            p.parse(&signed(&other, cmd), 1000).unwrap_err().reason,
            "forged"
        );
        // Tampered text.
        let mut forged: serde_json::Value = serde_json::from_slice(&signed(&op, cmd)).unwrap();
        forged["signed"] = serde_json::Value::String(cmd.replace("abort", "pause"));
        assert_eq!(
            p.parse(forged.to_string().as_bytes(), 1000)
                .unwrap_err()
                .reason,
            "forged"
        );
        // Stale.
        let old = r#"{"op":"abort","rollout":"r1","issued_at":1,"nonce":"n2"}"#;
        assert_eq!(
            p.parse(&signed(&op, old), 1000).unwrap_err().reason,
            "expired"
        );
    }

    fn release_hex() -> String {
        let body = swell_protocol::messages::Release {
            counter: 1,
            version: "1".into(),
            created_at: 0,
            artifacts: vec![swell_protocol::messages::Artifact {
                name: "a".into(),
                kind: swell_protocol::messages::ArtifactKind::Bundle,
                digest: swell_protocol::Digest::sha256(b"a"),
                length: 1,
                urls: vec![],
            }],
            config: None,
            hardware: vec!["sim".into()],
            exposure: None,
            rollback: None,
        };
        let mut r = ThresholdSigned::new(&body).unwrap();
        r.sign(&test_key("release-0")).unwrap();
        hex::encode(r.encode().unwrap())
    }

    #[test]
    fn ops_create_spec_validation() {
        let base = serde_json::json!({
            "rollout": "fw-1", "release": release_hex(), "waves": ["10%", "100%"],
            "selector": "hw=a", "bake": "1m", "install_timeout": "10m", "policy": "rollback",
            "maintenance": {"tz": "Europe/Berlin", "windows": ["02:00-04:00"]},
            "critical_reasons": ["crash_loop", "14"], "start_at": "2026-11-26T10:00:00Z",
        });
        let spec: CreateSpec = serde_json::from_value(base.clone()).unwrap();
        let s = spec.into_spec(&fleet()).unwrap();
        assert_eq!(s.gate.bake_secs, 60);
        assert_eq!(
            s.gate.critical_reasons,
            vec![reason::CRASH_LOOP, reason::PROBE_FAILED]
        );
        assert_eq!(s.windows.unwrap().daily, vec![(120, 240)]);
        assert_eq!(s.start_at, Some(1_795_687_200));

        let bad: &[(&str, serde_json::Value, &str)] = &[
            ("waves", serde_json::json!(["50%", "10%"]), "cumulative"),
            ("waves", serde_json::json!(["150%"]), "above 100%"),
            ("selector", serde_json::json!("hw in ()"), "selector"),
            ("success_threshold", serde_json::json!("120%"), "above 100%"),
            ("bake", serde_json::json!("soon"), "bake"),
            ("policy", serde_json::json!("explode"), "policy"),
            ("release", serde_json::json!("zz"), "not hex"),
            ("release", serde_json::json!("00"), "release"),
            (
                "maintenance",
                serde_json::json!({"tz": "Mars/Base", "windows": ["01:00-02:00"]}),
                "time zone",
            ),
            (
                "maintenance",
                serde_json::json!({"tz": "UTC", "windows": ["25:00-26:00"]}),
                "time of day",
            ),
            (
                "critical_reasons",
                serde_json::json!(["meltdown"]),
                "unknown failure reason",
            ),
            ("start_at", serde_json::json!("tomorrow"), "RFC 3339"),
            ("manual_gates", serde_json::json!([7]), "manual gate"),
            ("max_in_flight", serde_json::json!(0), "max_in_flight"),
        ];
        for (field, value, msg) in bad {
            let mut v = base.clone();
            v[*field] = value.clone();
            let e = serde_json::from_value::<CreateSpec>(v)
                .map_err(|e| e.to_string())
                .and_then(|s| s.into_spec(&fleet()))
                .unwrap_err();
            assert!(e.contains(msg), "{field}={value}: {e}");
        }
    }

    #[test]
    fn ops_selector_overlap() {
        let d = |a: &str, b: &str| {
            provably_disjoint(&Selector::parse(a).unwrap(), &Selector::parse(b).unwrap())
        };
        assert!(d("hw=a", "hw=b"));
        assert!(d("hw in (a,b)", "hw in (c)"));
        assert!(d("beta", "!beta"));
        assert!(d("hw=a", "!hw"));
        assert!(d("hw=a", "hw!=a"));
        assert!(d("hw in (a,b)", "hw notin (a,b,c)"));
        assert!(!d("hw=a", "region=eu"));
        assert!(!d("", "hw=a"));
        assert!(!d("hw in (a,b)", "hw in (b,c)"));
        assert!(!d("hw!=a", "hw!=b"));
    }
}
