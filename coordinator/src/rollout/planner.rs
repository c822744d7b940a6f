//! The wave planner: which devices each wave opens, and the `open_below` a manifest
//! must carry for it. Pure; the device-side rule it must agree with is
//! [`swell_protocol::messages::Manifest::opens_for`].
//!
//! Wave numbering: when the plan names canary devices, wave 0 is the canary wave
//! (those devices only, `open_below = 0`), and the percentage steps follow as waves
//! 1..; without canaries the steps are waves 0...

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use swell_protocol::cohort::{self, format_percent};
use swell_protocol::messages::MAX_CANARY;
use swell_protocol::{DeviceId, ReleaseId};

/// A rollout's waves. Deserializing validates, like [`WavePlan::new`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawPlan", into = "RawPlan")]
pub struct WavePlan {
    canary: Vec<DeviceId>,
    steps_ppm: Vec<u32>,
}

#[derive(Serialize, Deserialize)]
struct RawPlan {
    canary: Vec<DeviceId>,
    steps_ppm: Vec<u32>,
}

impl TryFrom<RawPlan> for WavePlan {
    type Error = PlanError;
    fn try_from(r: RawPlan) -> Result<Self, PlanError> {
        WavePlan::new(r.canary, r.steps_ppm)
    }
}

impl From<WavePlan> for RawPlan {
    fn from(p: WavePlan) -> RawPlan {
        RawPlan {
            canary: p.canary,
            steps_ppm: p.steps_ppm,
        }
    }
}

/// A plan that cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    #[error("waves: {0}")]
    Waves(String),
    #[error("{0} canary devices; at most {MAX_CANARY}")]
    TooManyCanaries(usize),
    #[error("canary device {0} is listed twice")]
    DuplicateCanary(DeviceId),
}

impl WavePlan {
    /// A plan of `canary` devices first, then cumulative `steps_ppm`.
    pub fn new(canary: Vec<DeviceId>, steps_ppm: Vec<u32>) -> Result<Self, PlanError> {
        cohort::validate_waves(&steps_ppm).map_err(PlanError::Waves)?;
        if canary.len() > MAX_CANARY {
            return Err(PlanError::TooManyCanaries(canary.len()));
        }
        let mut seen = BTreeSet::new();
        for d in &canary {
            if !seen.insert(d) {
                return Err(PlanError::DuplicateCanary(d.clone()));
            }
        }
        Ok(WavePlan { canary, steps_ppm })
    }

    pub fn canary(&self) -> &[DeviceId] {
        &self.canary
    }

    /// The cumulative percentage steps, in ppm.
    pub fn steps_ppm(&self) -> &[u32] {
        &self.steps_ppm
    }

    fn offset(&self) -> usize {
        usize::from(!self.canary.is_empty())
    }

    /// Number of waves, the canary wave included.
    pub fn wave_count(&self) -> usize {
        self.offset() + self.steps_ppm.len()
    }

    /// Whether the last wave opens every selected device.
    pub fn reaches_everyone(&self) -> bool {
        self.steps_ppm.last() == Some(&cohort::PPM_FULL)
    }

    /// The `open_below` a manifest carries once `wave` is open (`None` past the
    /// last wave).
    pub fn open_below(&self, wave: usize) -> Option<u64> {
        if wave < self.offset() {
            return Some(0);
        }
        self.steps_ppm
            .get(wave - self.offset())
            .map(|&p| cohort::open_below(p))
    }

    /// The wave that opens `device` to `release` (`None`: no wave reaches it).
    pub fn wave_of(&self, release: &ReleaseId, device: &DeviceId) -> Option<usize> {
        if self.canary.contains(device) {
            return Some(0);
        }
        cohort::wave_of(cohort::bucket(release, device), &self.steps_ppm).map(|w| w + self.offset())
    }

    /// Label for people: `canary`, `5%`, ….
    pub fn wave_label(&self, wave: usize) -> String {
        if wave < self.offset() {
            return "canary".into();
        }
        self.steps_ppm
            .get(wave - self.offset())
            .map_or_else(|| "-".into(), |&p| format_percent(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use swell_protocol::cohort::PPM_FULL;

    fn dev(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    #[test]
    fn planner_rejects_bad_plans() {
        assert!(matches!(
            WavePlan::new(vec![], vec![]),
            Err(PlanError::Waves(_))
        ));
        assert!(matches!(
            WavePlan::new(vec![], vec![50_000, 10_000]),
            Err(PlanError::Waves(_))
        ));
        assert_eq!(
            WavePlan::new(vec![dev("a"), dev("a")], vec![PPM_FULL]),
            Err(PlanError::DuplicateCanary(dev("a")))
        );
        let many = (0..=MAX_CANARY).map(|i| dev(&format!("d{i}"))).collect();
        assert!(matches!(
            WavePlan::new(many, vec![PPM_FULL]),
            Err(PlanError::TooManyCanaries(_))
        ));
    }

    #[test]
    fn planner_labels_and_counts() {
        let p = WavePlan::new(vec![dev("c1")], vec![100_000, 500_000, PPM_FULL]).unwrap();
        assert_eq!(p.wave_count(), 4);
        assert_eq!(p.wave_label(0), "canary");
        assert_eq!(p.wave_label(1), "10%");
        assert_eq!(p.open_below(0), Some(0));
        assert_eq!(p.open_below(3), Some(u64::MAX));
        assert_eq!(p.open_below(4), None);
        assert!(p.reaches_everyone());
    }

    proptest! {
        /// The coordinator's idea of a device's wave and the device's own reading
        /// of the manifest for each wave agree exactly: the device is open in wave
        /// k's manifest iff its planned wave is at most k.
        #[test]
        fn planner_agrees_with_devices(
            n in 0u32..5000,
            canaries in proptest::collection::btree_set(0u32..5000, 0..4),
            mut steps in proptest::collection::btree_set(1u32..PPM_FULL, 0..5),
        ) {
            steps.insert(PPM_FULL);
            let canary: Vec<DeviceId> = canaries.iter().map(|i| dev(&format!("d{i}"))).collect();
            let plan = WavePlan::new(canary.clone(), steps.into_iter().collect()).unwrap();
            let release = ReleaseId([0x5a; 32]);
            let d = dev(&format!("d{n}"));
            let planned = plan.wave_of(&release, &d).unwrap();
            let b = cohort::bucket(&release, &d);
            for k in 0..plan.wave_count() {
                let ob = plan.open_below(k).unwrap();
                let device_view = canary.contains(&d) || cohort::is_open(b, ob);
                prop_assert_eq!(device_view, planned <= k, "wave {}", k);
            }
        }
    }
}
