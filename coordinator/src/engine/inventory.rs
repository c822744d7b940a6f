//! What the fleet runs: the `fleet` and `devices` commands' answers, read from
//! the registry.

use super::Engine;
use crate::fleet::registry::{DeviceRecord, Enrollment};
use crate::rollout::state::RolloutPhase;
use crate::status::{DesiredRelease, DeviceList, DeviceRow, FleetSummary};
use std::collections::BTreeMap;
use swell_protocol::cohort::Selector;

/// Most devices one `devices` answer lists (and its default).
const MAX_ROWS: usize = 10_000;
const DEFAULT_ROWS: usize = 1_000;

impl Engine {
    /// Devices by enrollment, online, and the release they run, overall and
    /// per label.
    pub(super) fn fleet_summary(&self) -> FleetSummary {
        let mut running: BTreeMap<String, u64> = BTreeMap::new();
        let mut by_label: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let (mut approved, mut online) = (0u64, 0u64);
        for d in self.devices.values() {
            approved += u64::from(d.enrollment == Enrollment::Approved);
            online += u64::from(d.online);
            let key = d
                .running
                .as_deref()
                .map_or_else(|| "none".to_string(), |r| r.to_string());
            for l in d.labels() {
                *by_label
                    .entry(format!("{}={}", l.key, l.value))
                    .or_default()
                    .entry(key.clone())
                    .or_default() += 1;
            }
            *running.entry(key).or_default() += 1;
        }
        FleetSummary {
            devices: self.devices.len(),
            approved,
            pending: self.pending,
            online,
            running,
            by_label,
            desired: self.desired_releases(),
        }
    }

    /// Completed rollouts whose manifest stands, with the devices that run
    /// their release, members or not.
    fn desired_releases(&self) -> Vec<DesiredRelease> {
        let mut desired: Vec<DesiredRelease> = self
            .rollouts
            .values()
            .filter(|l| {
                l.rec.state.phase == RolloutPhase::Completed && l.rec.superseded_by.is_none()
            })
            .map(|l| {
                let release = l.rec.spec.release.id();
                let (mut running, mut joined) = (0u64, 0u64);
                // Registry slots are the positions of its records.
                for (slot, d) in self.devices.slots() {
                    if d.running.as_deref() == Some(&release) {
                        running += 1;
                        joined += u64::from(!l.tracker.is_member(slot));
                    }
                }
                DesiredRelease {
                    rollout: l.rec.spec.id.to_string(),
                    release: release.to_string(),
                    selector: l.rec.spec.selector.to_string(),
                    running,
                    joined_after_completion: joined,
                }
            })
            .collect();
        desired.sort_by(|a, b| a.rollout.cmp(&b.rollout));
        desired
    }

    /// The devices that match every filter given, by id; at most `limit`
    /// listed, all counted. `release` is a prefix of the release id, or `none`.
    pub(super) fn device_list(
        &self,
        selector: Option<&Selector>,
        release: Option<&str>,
        online: Option<bool>,
        enrollment: Option<Enrollment>,
        limit: Option<usize>,
    ) -> DeviceList {
        let release = release.map(str::to_ascii_lowercase);
        let limit = limit.unwrap_or(DEFAULT_ROWS).min(MAX_ROWS);
        let mut sorted: Vec<(usize, &DeviceRecord)> = self.devices.slots().collect();
        sorted.sort_by(|a, b| a.1.id.cmp(&b.1.id));
        let mut matched = 0usize;
        let mut devices = Vec::new();
        for (slot, d) in sorted {
            let run = d.running.as_deref().map(|r| r.to_string());
            let keep = selector.is_none_or(|s| s.matches(d.labels()))
                && online.is_none_or(|o| o == d.online)
                && enrollment.is_none_or(|e| e == d.enrollment)
                && release.as_deref().is_none_or(|want| match &run {
                    None => want == "none",
                    Some(r) => r.starts_with(want),
                });
            if !keep {
                continue;
            }
            matched += 1;
            if devices.len() < limit {
                devices.push(DeviceRow {
                    device: d.id.to_string(),
                    enrollment: d.enrollment,
                    online: d.online,
                    running: run,
                    hardware: d.hardware().to_string(),
                    agent: d.agent_version().to_string(),
                    key: d.key.key_id().to_string(),
                    labels: d
                        .labels()
                        .iter()
                        .map(|l| format!("{}={}", l.key, l.value))
                        .collect(),
                    last_seen: d.last_seen(),
                    takeovers: self.takeovers_of(slot),
                    incarnation: d.incarnation,
                });
            }
        }
        DeviceList { matched, devices }
    }
}
