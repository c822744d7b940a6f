//! What an operator asks for: the validated rollout spec.

use super::planner::WavePlan;
use serde::{Deserialize, Serialize};
use swell_protocol::cohort::{PPM_FULL, Selector};
use swell_protocol::messages::ExposureSchedule;
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::{FleetId, ReleaseId, RolloutId};

/// Health-gate thresholds (ROLL-1, ROLL-2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateSpec {
    /// Reports a wave needs before it can pass (capped at the wave's population).
    pub min_devices: u32,
    /// Healthy share a wave needs, ppm.
    pub success_threshold_ppm: u32,
    /// Failure share that breaches, ppm.
    pub max_failure_rate_ppm: u32,
    /// How long a wave must stay healthy after its devices finish, seconds.
    pub bake_secs: u64,
    /// How long a device may take from wave open to a final report, seconds;
    /// after it, silence and unfinished installs count as failures.
    pub install_timeout_secs: u64,
    /// Reason codes that breach at once, whatever the rates.
    pub critical_reasons: Vec<u16>,
    /// Reports (over the opened waves, eligible devices only) the breach
    /// check needs before a failure rate can stop the rollout; a critical
    /// failure needs none.
    #[serde(default = "default_min_breach_sample")]
    pub min_breach_sample: u32,
    /// Whether devices that never report count against the gate after the
    /// install deadline.
    #[serde(default)]
    pub silent: SilentPolicy,
}

/// The breach check's minimum sample when the spec does not say.
pub const DEFAULT_MIN_BREACH_SAMPLE: u32 = 10;

fn default_min_breach_sample() -> u32 {
    DEFAULT_MIN_BREACH_SAMPLE
}

/// What silence means for the gate once the install deadline has passed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SilentPolicy {
    /// A device of the wave that was online and never reported counts as failed.
    #[default]
    Fail,
    /// It is counted and shown, and left out of the gate's shares.
    Ignore,
}

impl SilentPolicy {
    pub fn name(self) -> &'static str {
        match self {
            SilentPolicy::Fail => "fail",
            SilentPolicy::Ignore => "ignore",
        }
    }
}

impl Default for GateSpec {
    fn default() -> Self {
        GateSpec {
            min_devices: 1,
            success_threshold_ppm: 950_000,
            max_failure_rate_ppm: 50_000,
            bake_secs: 300,
            install_timeout_secs: 1_800,
            critical_reasons: Vec::new(),
            min_breach_sample: DEFAULT_MIN_BREACH_SAMPLE,
            silent: SilentPolicy::Fail,
        }
    }
}

/// What a breach does (ROLL-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BreachPolicy {
    Pause,
    Rollback,
}

impl BreachPolicy {
    /// As written in specs and shown to operators.
    pub fn name(self) -> &'static str {
        match self {
            BreachPolicy::Pause => "pause",
            BreachPolicy::Rollback => "rollback",
        }
    }
}

/// A daily maintenance window in a named time zone: waves open only inside one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceWindows {
    /// IANA time zone name (`Europe/Berlin`).
    pub tz: String,
    /// Windows as minutes after local midnight, `[start, end)`; `end < start`
    /// wraps past midnight.
    pub daily: Vec<(u16, u16)>,
}

/// A validated rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub id: RolloutId,
    pub fleet: FleetId,
    /// The threshold-signed release (checked against the key list at create).
    pub release: ThresholdSigned,
    pub selector: Selector,
    pub plan: WavePlan,
    pub gate: GateSpec,
    pub policy: BreachPolicy,
    /// Waves after which an operator must `promote` before the next opens.
    pub manual_gates: Vec<u16>,
    /// Most devices installing at once; the wave opens in sub-steps.
    pub max_in_flight: Option<u32>,
    /// Nothing opens before this Unix time.
    pub start_at: Option<u64>,
    /// Per-wave earliest opening times, `(wave, unix seconds)`.
    pub not_before: Vec<(u16, u64)>,
    pub windows: Option<MaintenanceWindows>,
    /// The release's signed exposure schedule (ROLL-3), copied from the
    /// verified release at create: a wave opens only once it allows the wave.
    #[serde(default)]
    pub exposure: Option<ExposureSchedule>,
    /// The release's hardware ids, copied likewise: a device announcing
    /// another is not a member (empty: no filter).
    #[serde(default)]
    pub hardware: Vec<String>,
}

impl RolloutSpec {
    pub fn release_id(&self) -> ReleaseId {
        self.release.id()
    }

    /// Checks ranges the types do not.
    pub fn validate(&self) -> Result<(), String> {
        let g = &self.gate;
        if g.success_threshold_ppm > PPM_FULL {
            return Err("success_threshold must be at most 100%".into());
        }
        if g.max_failure_rate_ppm > PPM_FULL {
            return Err("max_failure_rate must be at most 100%".into());
        }
        if g.install_timeout_secs == 0 {
            return Err("install_timeout must be above 0".into());
        }
        if g.critical_reasons.len() > 32 {
            return Err("at most 32 critical reasons".into());
        }
        if self.max_in_flight == Some(0) {
            return Err("max_in_flight must be at least 1".into());
        }
        let waves = self.plan.wave_count();
        for &w in &self.manual_gates {
            if usize::from(w) >= waves {
                return Err(format!(
                    "manual gate after wave {w}, but there are {waves} waves"
                ));
            }
        }
        for &(w, _) in &self.not_before {
            if usize::from(w) >= waves {
                return Err(format!(
                    "not_before for wave {w}, but there are {waves} waves"
                ));
            }
        }
        if let Some(w) = &self.windows {
            if w.daily.is_empty() {
                return Err("maintenance windows: at least one daily window".into());
            }
            for &(a, b) in &w.daily {
                if a >= 1440 || b > 1440 || a == b {
                    return Err(format!("maintenance window {a}..{b} is not within a day"));
                }
            }
            super::schedule::zone(&w.tz)?;
        }
        Ok(())
    }

    /// Earliest time wave `wave` may open.
    pub fn not_before(&self, wave: u16) -> Option<u64> {
        self.not_before
            .iter()
            .filter(|(w, _)| *w == wave)
            .map(|(_, t)| *t)
            .max()
    }
}
