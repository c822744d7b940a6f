//! The `Rollout` custom resource (`swell.dev/v1alpha1`, short name `srl`).
//!
//! Its spec is the ops `create` spec in Kubernetes spelling (camelCase) plus
//! `paused`; the conversion goes through the same [`CreateSpec`] parser the MQTT
//! command uses, so defaults and validation live in one place. Everything but
//! `paused` and `allowOverlap` is immutable once set (CEL transition rules in the
//! schema): a running rollout's plan is what devices already act on.

use crate::ops::CreateSpec;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// API group of Swell's resources.
pub const GROUP: &str = "swell.dev";

/// A rollout of one signed release to a fleet, in waves.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "swell.dev",
    version = "v1alpha1",
    kind = "Rollout",
    plural = "rollouts",
    shortname = "srl",
    namespaced,
    status = "RolloutStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Wave","type":"integer","jsonPath":".status.wave"}"#,
    printcolumn = r#"{"name":"Healthy","type":"integer","jsonPath":".status.healthy"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.failed"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RolloutResourceSpec {
    /// Hex of the threshold-signed release (`swell release create` prints it).
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "release is immutable; create a new Rollout"}]))]
    pub release: String,
    /// Fleet; the coordinator's own fleet when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "fleet is immutable"}]))]
    pub fleet: Option<String>,
    /// Label selector (`region=eu,ring in (a,b)`); all devices when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "selector is immutable"}]))]
    pub selector: String,
    /// Devices that form wave 0 by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "canary is immutable"}]))]
    pub canary: Vec<String>,
    /// Cumulative percentages per wave: `["1%", "10%", "100%"]`.
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "waves are immutable"}]))]
    pub waves: Vec<String>,
    /// Devices a wave needs before its gate can pass (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_devices: Option<u32>,
    /// Share of a wave that must be healthy (default `95%`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_threshold: Option<String>,
    /// Failure rate that breaches (default `5%`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failure_rate: Option<String>,
    /// Soak time after a wave is healthy (humantime, default `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake: Option<String>,
    /// Time a device has to finish installing (default `30m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_timeout: Option<String>,
    /// Devices installing at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// What a breach does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<BreachPolicy>,
    /// Waves that wait for `promote` after their gate passed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manual_gates: Vec<u16>,
    /// RFC 3339 start time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<String>,
    /// Wave index → earliest RFC 3339 time it may open.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub not_before: BTreeMap<String, String>,
    /// Daily windows in which waves may open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<Maintenance>,
    /// Failure reasons (`crash_loop`) or codes that breach at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub critical_reasons: Vec<String>,
    /// Eligible reports before a failure rate can breach (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_breach_sample: Option<u32>,
    /// Whether devices that never report count against the gate after the
    /// install deadline: `fail` (default) or `ignore`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["fail", "ignore"]))]
    pub silent: Option<String>,
    /// Allow a selector that may overlap an active rollout's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_overlap: bool,
    /// Hold the rollout: no wave opens or widens; devices mid-install finish.
    #[serde(default)]
    pub paused: bool,
}

/// What a breach does.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BreachPolicy {
    Pause,
    Rollback,
}

/// Daily maintenance windows.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct Maintenance {
    /// IANA time zone, `Europe/Berlin`.
    pub tz: String,
    /// `["02:00-04:00", "22:30-01:00"]`.
    pub windows: Vec<String>,
}

/// Progress of one wave.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WaveStatus {
    pub index: u16,
    pub label: String,
    pub opened: bool,
    pub population: u64,
    pub healthy: u64,
    pub failed: u64,
    pub in_progress: u64,
    pub silent: u64,
}

/// A standard condition (the shape of `metav1.Condition`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Progressing, Paused, Degraded or Completed.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// What the coordinator reports about a rollout.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// pending, wave_open, baking, paused, completed, aborted, rolling_back,
    /// rolled_back; `invalid` when the spec was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Newest opened wave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<WaveStatus>,
    /// Devices selected by the rollout.
    #[serde(default)]
    pub members: u64,
    #[serde(default)]
    pub healthy: u64,
    #[serde(default)]
    pub failed: u64,
    /// Release id (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// Why the rollout is waiting, paused or stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `swell.dev/action` annotation value last carried out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_action: Option<String>,
    /// What came of it (applied, or why it was refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_action_result: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl RolloutResourceSpec {
    /// The ops `create` spec for a rollout named `name`. Defaults and checks are
    /// the MQTT command's.
    pub fn to_create_spec(&self, name: &str) -> Result<CreateSpec, String> {
        let mut m = Map::new();
        m.insert("rollout".into(), json!(name));
        m.insert("release".into(), json!(self.release));
        m.insert("selector".into(), json!(self.selector));
        m.insert("canary".into(), json!(self.canary));
        m.insert("waves".into(), json!(self.waves));
        m.insert("manual_gates".into(), json!(self.manual_gates));
        m.insert("critical_reasons".into(), json!(self.critical_reasons));
        let optional = [
            ("fleet", self.fleet.as_ref().map(|v| json!(v))),
            ("min_devices", self.min_devices.map(|v| json!(v))),
            (
                "success_threshold",
                self.success_threshold.as_ref().map(|v| json!(v)),
            ),
            (
                "max_failure_rate",
                self.max_failure_rate.as_ref().map(|v| json!(v)),
            ),
            ("bake", self.bake.as_ref().map(|v| json!(v))),
            (
                "install_timeout",
                self.install_timeout.as_ref().map(|v| json!(v)),
            ),
            ("max_in_flight", self.max_in_flight.map(|v| json!(v))),
            ("policy", self.policy.map(|v| json!(v))),
            (
                "min_breach_sample",
                self.min_breach_sample.map(|v| json!(v)),
            ),
            ("silent", self.silent.as_ref().map(|v| json!(v))),
            ("start_at", self.start_at.as_ref().map(|v| json!(v))),
            (
                "maintenance",
                self.maintenance
                    .as_ref()
                    .map(|v| json!({"tz": v.tz, "windows": v.windows})),
            ),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        }
        let mut nb = Map::new();
        for (wave, at) in &self.not_before {
            let w: u16 = wave
                .parse()
                .map_err(|_| format!("notBefore key {wave:?} is not a wave index"))?;
            nb.insert(w.to_string(), json!(at));
        }
        m.insert("not_before".into(), Value::Object(nb));
        serde_json::from_value(Value::Object(m)).map_err(|e| format!("spec: {e}"))
    }

    /// The resource spec for an ops `create` command (MQTT → Kubernetes).
    pub fn from_create_spec(c: &CreateSpec, allow_overlap: bool) -> Result<Self, String> {
        Ok(RolloutResourceSpec {
            release: c.release.clone(),
            fleet: c.fleet.as_ref().map(|f| f.to_string()),
            selector: c.selector.clone(),
            canary: c.canary.iter().map(|d| d.to_string()).collect(),
            waves: c.waves.clone(),
            min_devices: Some(c.min_devices),
            success_threshold: Some(c.success_threshold.clone()),
            max_failure_rate: Some(c.max_failure_rate.clone()),
            bake: Some(c.bake.clone()),
            install_timeout: Some(c.install_timeout.clone()),
            max_in_flight: c.max_in_flight,
            policy: Some(match c.policy.as_str() {
                "pause" => BreachPolicy::Pause,
                "rollback" => BreachPolicy::Rollback,
                other => return Err(format!("policy {other:?}: use pause or rollback")),
            }),
            manual_gates: c.manual_gates.clone(),
            start_at: c.start_at.clone(),
            not_before: c
                .not_before
                .iter()
                .map(|(w, t)| (w.to_string(), t.clone()))
                .collect(),
            maintenance: c.maintenance.as_ref().map(|m| Maintenance {
                tz: m.tz.clone(),
                windows: m.windows.clone(),
            }),
            critical_reasons: c.critical_reasons.clone(),
            min_breach_sample: Some(c.min_breach_sample),
            silent: Some(c.silent.clone()),
            allow_overlap,
            paused: false,
        })
    }
}

/// The CRD as YAML (what `swell-coordinator crd` prints and
/// `deploy/k3s/crds/rollout.yaml` holds).
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    use kube::CustomResourceExt;
    let body = serde_yaml_ng::to_string(&Rollout::crd())?;
    Ok(format!(
        "# Generated by `swell-coordinator crd` from coordinator/src/k8s/crd.rs; do not edit.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_example_rollout_is_a_valid_create_spec() {
        let text = include_str!("../../../deploy/k3s/examples/rollout.yaml");
        let r: Rollout = serde_yaml_ng::from_str(text).unwrap();
        let c = r.spec.to_create_spec("fw-2-3").unwrap();
        assert_eq!(c.waves, ["1%", "10%", "50%", "100%"]);
        assert_eq!(c.policy, "rollback");
        assert_eq!(c.max_in_flight, Some(500));
        assert_eq!(c.min_devices, 5);
        assert_eq!(c.critical_reasons, ["crash_loop"]);
        assert_eq!((c.min_breach_sample, c.silent.as_str()), (20, "fail"));
        assert_eq!(c.canary.len(), 2);
    }

    #[test]
    fn defaults_are_the_ops_commands_and_round_trip() {
        let rs: RolloutResourceSpec =
            serde_json::from_value(json!({"release": "00", "waves": ["100%"]})).unwrap();
        let c = rs.to_create_spec("fw-1").unwrap();
        assert_eq!(
            (
                c.bake.as_str(),
                c.install_timeout.as_str(),
                c.policy.as_str()
            ),
            ("5m", "30m", "pause")
        );
        assert_eq!(c.success_threshold, "95%");
        assert_eq!((c.min_breach_sample, c.silent.as_str()), (10, "fail"));
        let back = RolloutResourceSpec::from_create_spec(&c, false)
            .unwrap()
            .to_create_spec("fw-1")
            .unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn bad_specs_are_refused_with_the_field_named() {
        let mut rs: RolloutResourceSpec =
            serde_json::from_value(json!({"release": "00", "waves": ["100%"]})).unwrap();
        rs.not_before
            .insert("first".into(), "2026-01-01T00:00:00Z".into());
        let e = rs.to_create_spec("fw-1").unwrap_err();
        assert!(e.contains("notBefore"), "{e}");
        let bad: Result<RolloutResourceSpec, _> =
            serde_json::from_value(json!({"release": "00", "waves": ["100%"], "policy": "ignore"}));
        assert!(bad.is_err());
    }
}
