//! The `create` spec as operators write it (durations and percentages as
//! text, defaults filled in), checked and turned into a [`RolloutSpec`].

use crate::rollout::planner::WavePlan;
use crate::rollout::spec::{
    BreachPolicy, DEFAULT_MIN_BREACH_SAMPLE, GateSpec, MaintenanceWindows, RolloutSpec,
    SilentPolicy,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use swell_protocol::cohort::{self, Selector};
use swell_protocol::messages::reason;
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::{DeviceId, FleetId, RolloutId};

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
    /// Reports the breach check needs before a failure rate stops the rollout.
    #[serde(default = "d_min_breach_sample")]
    pub min_breach_sample: u32,
    /// `fail` (devices that never report count as failed after the install
    /// deadline) or `ignore`.
    #[serde(default = "d_silent")]
    pub silent: String,
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
fn d_min_breach_sample() -> u32 {
    DEFAULT_MIN_BREACH_SAMPLE
}
fn d_silent() -> String {
    "fail".into()
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
            min_breach_sample: self.min_breach_sample,
            silent: match self.silent.as_str() {
                "fail" => SilentPolicy::Fail,
                "ignore" => SilentPolicy::Ignore,
                other => return Err(format!("silent must be fail or ignore, not {other:?}")),
            },
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
            // Filled from the release once create verified it.
            exposure: None,
            hardware: Vec::new(),
        };
        spec.validate()?;
        Ok(spec)
    }
}
