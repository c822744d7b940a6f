//! Per-rollout membership and counts, updated in O(1) per report (no rescans on
//! the hot path). A device is a member when it is approved, its labels match the
//! selector and a wave reaches it. It counts once (its latest report, ROLL-6), and
//! only after its wave opened; it joins its wave's population when seen online
//! after the opening.
//!
//! Opening a wave is two steps so the manifest is not held up by the size of the
//! wave: [`Tracker::open`] only raises the bound (O(1): from then on a report of
//! a newly opened member counts), and [`Tracker::settle`] walks the newly opened
//! members to add the ones already online to their wave's population. The engine
//! settles right after the manifest is handed over, and before counts are read.
//!
//! Members are addressed by their registry slot (stable: the registry only
//! appends), so membership is a dense array of 16-byte entries rather than a
//! map keyed by device id: at a million devices that is 16 MB per rollout
//! instead of ~70 MB, and a report costs one index instead of a hash lookup.

use crate::rollout::health_gate::WaveCounts;
use crate::rollout::planner::WavePlan;
use crate::rollout::state::Observations;
use std::collections::BTreeSet;
use swell_protocol::cohort::{self, Selector};
use swell_protocol::messages::{Phase, reason};
use swell_protocol::{DeviceId, ReleaseId};

/// How a member is doing in this rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    NoReport,
    InProgress,
    Healthy,
    Failed {
        critical: bool,
    },
    /// Refused for now (no fresh beacon yet): it will try again.
    Waiting,
    /// Refused for good: the release is not for it.
    NotEligible,
    /// Rolled back because the rollout (or a directive) said so.
    RolledBack,
}

impl Class {
    /// The class of a report's phase. A refusal is a failure only when it
    /// says something is wrong (a bad signature, an expired message); one
    /// that says "not yet" or "not for me" is not, and neither is a rollback
    /// the device was told to make.
    pub fn of(phase: &Phase, critical: &[u16]) -> Class {
        match phase {
            Phase::Committed => Class::Healthy,
            Phase::Rejected(r) if r.code == reason::NO_FRESH_BEACON => Class::Waiting,
            Phase::Rejected(r)
                if matches!(
                    r.code,
                    reason::EXPOSURE_CAP | reason::HARDWARE_MISMATCH | reason::COUNTER_TOO_LOW
                ) =>
            {
                Class::NotEligible
            }
            Phase::RolledBack(r) if r.code == reason::OPERATOR => Class::RolledBack,
            Phase::Failed(r) | Phase::RolledBack(r) | Phase::Rejected(r) => Class::Failed {
                critical: critical.contains(&r.code),
            },
            _ => Class::InProgress,
        }
    }
}

#[derive(Debug, Clone)]
struct Member {
    bucket: u64,
    /// [`NOT_MEMBER`] for a slot that is not a member.
    wave: u16,
    class: Class,
    canary: bool,
    /// Counted in its wave's population.
    seen: bool,
}

const NOT_MEMBER: u16 = u16::MAX;

impl Member {
    const NONE: Member = Member {
        bucket: 0,
        wave: NOT_MEMBER,
        class: Class::NoReport,
        canary: false,
        seen: false,
    };

    fn is_member(&self) -> bool {
        self.wave != NOT_MEMBER
    }
}

/// Membership and counts of one rollout.
#[derive(Debug, Clone)]
pub struct Tracker {
    release: ReleaseId,
    plan: WavePlan,
    selector: Selector,
    critical: Vec<u16>,
    /// The release's hardware ids: a device announcing another is not a member.
    hardware: Vec<String>,
    open_below: u64,
    started: bool,
    /// Opened members not walked yet: the canaries (first opening) and the
    /// `closed` entries below `open_below`.
    unwalked: bool,
    canaries_walked: bool,
    /// By registry slot.
    members: Vec<Member>,
    member_count: usize,
    /// Members not opened yet (bucket, slot), by bucket (for `max_in_flight`
    /// sub-steps; bucket ties open together).
    closed: BTreeSet<(u64, u32)>,
    counts: Vec<WaveCounts>,
}

impl Tracker {
    pub fn new(
        release: ReleaseId,
        plan: WavePlan,
        selector: Selector,
        critical: Vec<u16>,
        hardware: Vec<String>,
    ) -> Self {
        let waves = plan.wave_count();
        Tracker {
            release,
            plan,
            selector,
            critical,
            hardware,
            open_below: 0,
            started: false,
            unwalked: false,
            canaries_walked: false,
            members: Vec::new(),
            member_count: 0,
            closed: BTreeSet::new(),
            counts: vec![WaveCounts::default(); waves],
        }
    }

    fn is_open(&self, m: &Member) -> bool {
        m.is_member() && self.started && (m.canary || cohort::is_open(m.bucket, self.open_below))
    }

    fn member(&self, slot: usize) -> Option<&Member> {
        self.members.get(slot).filter(|m| m.is_member())
    }

    /// Adds (or refreshes) the approved device in registry `slot` with
    /// `labels` and `hardware`; returns whether it is a member. Eligibility
    /// before membership: a device whose hardware the release is not for is
    /// not a member. Membership is fixed when a wave opens: a device that
    /// would land in a wave already open (new, or re-announcing its labels)
    /// does not join it, and a member never leaves (its vote stays), even if
    /// its labels change.
    pub fn consider(
        &mut self,
        slot: usize,
        device: &DeviceId,
        labels: &[swell_protocol::cohort::Label],
        hardware: &str,
        online: bool,
    ) -> bool {
        if self.member(slot).is_some() {
            if online {
                self.mark_seen(slot);
            }
            return true;
        }
        let Ok(slot32) = u32::try_from(slot) else {
            return false;
        };
        if !self.selector.matches(labels) {
            return false;
        }
        if !self.hardware.is_empty() && !self.hardware.iter().any(|h| h == hardware) {
            return false;
        }
        let Some(wave) = self.plan.wave_of(&self.release, device) else {
            return false;
        };
        let Ok(wave) = u16::try_from(wave) else {
            return false;
        };
        if wave == NOT_MEMBER {
            return false;
        }
        let m = Member {
            bucket: cohort::bucket(&self.release, device),
            wave,
            class: Class::NoReport,
            canary: self.plan.canary().contains(device),
            seen: false,
        };
        let open = self.is_open(&m);
        if open {
            // Its wave opened without it: the wave's members were fixed then.
            return false;
        }
        self.closed.insert((m.bucket, slot32));
        if self.members.len() <= slot {
            self.members.resize(slot + 1, Member::NONE);
        }
        self.counts[usize::from(m.wave)].planned += 1;
        self.members[slot] = m;
        self.member_count += 1;
        true
    }

    fn mark_seen(&mut self, slot: usize) {
        let open = match self.members.get(slot) {
            Some(m) => self.is_open(m),
            None => return,
        };
        if let Some(m) = self.members.get_mut(slot)
            && open
            && !m.seen
        {
            m.seen = true;
            self.counts[usize::from(m.wave)].population += 1;
        }
    }

    /// The member in registry `slot` came online.
    pub fn on_online(&mut self, slot: usize) {
        self.mark_seen(slot);
    }

    /// Applies the manifest's `open_below` (it only grows). O(1): the newly
    /// opened members vote from now on, and join their wave's population when
    /// they report, come online, or [`Tracker::settle`] finds them online.
    pub fn open(&mut self, open_below: u64) {
        if !self.started || open_below > self.open_below {
            self.started = true;
            self.open_below = self.open_below.max(open_below);
            self.unwalked = true;
        }
    }

    /// Whether every opened member was walked (counts are complete).
    pub fn settled(&self) -> bool {
        !self.unwalked
    }

    /// Walks the members opened since the last call; `online` says which
    /// registry slots are online now. Returns how many it walked. Until this
    /// ran after an [`Tracker::open`], populations miss the silent online
    /// members of the newly opened buckets.
    pub fn settle(&mut self, online: impl Fn(usize) -> bool) -> usize {
        if !self.unwalked {
            return 0;
        }
        self.unwalked = false;
        let mut newly: Vec<usize> = Vec::new();
        if !self.canaries_walked {
            self.canaries_walked = true;
            newly.extend(
                self.members
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| m.is_member() && m.canary)
                    .map(|(slot, _)| slot),
            );
        }
        let limit = self.open_below;
        if limit == u64::MAX {
            newly.extend(
                std::mem::take(&mut self.closed)
                    .into_iter()
                    .map(|(_, slot)| slot as usize),
            );
        } else {
            while self.closed.first().is_some_and(|(b, _)| *b < limit) {
                if let Some((_, slot)) = self.closed.pop_first() {
                    newly.push(slot as usize);
                }
            }
        }
        let walked = newly.len();
        for slot in newly {
            if online(slot) {
                self.mark_seen(slot);
            }
        }
        walked
    }

    /// A verified report for this rollout from the device in registry `slot`.
    /// Returns whether it counted.
    pub fn on_report(&mut self, slot: usize, release: &ReleaseId, phase: &Phase) -> bool {
        if release != &self.release {
            return false;
        }
        let Some(m) = self.members.get(slot) else {
            return false;
        };
        // ROLL-6: devices outside the opened waves do not vote.
        if !self.is_open(m) {
            return false;
        }
        self.mark_seen(slot);
        let new = Class::of(phase, &self.critical);
        let Some(m) = self.members.get_mut(slot) else {
            return false;
        };
        let c = &mut self.counts[usize::from(m.wave)];
        remove(c, m.class);
        add(c, new);
        m.class = new;
        true
    }

    /// The operator's retry: failed members go back to "no report yet".
    pub fn retry(&mut self) {
        for m in self.members.iter_mut().filter(|m| m.is_member()) {
            if let Class::Failed { .. } = m.class {
                let c = &mut self.counts[usize::from(m.wave)];
                remove(c, m.class);
                m.class = Class::NoReport;
            }
        }
    }

    pub fn counts(&self) -> &[WaveCounts] {
        &self.counts
    }

    pub fn members(&self) -> usize {
        self.member_count
    }

    /// Whether the device in registry slot `slot` is a member.
    pub fn is_member(&self, slot: usize) -> bool {
        self.members.get(slot).is_some_and(Member::is_member)
    }

    /// The registry slots of the members.
    pub fn member_slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.is_member())
            .map(|(slot, _)| slot)
    }

    /// Members still running (or installing) the release.
    pub fn still_installed(&self) -> u32 {
        self.counts.iter().map(|c| c.healthy + c.in_progress).sum()
    }

    /// With `max_in_flight`: the next `open_below` so that at most `cap` opened
    /// devices are unfinished, or `None` when none may start now.
    pub fn next_step(&self, cap: u32, wave_target: u64) -> Option<u64> {
        let busy: u32 = self
            .counts
            .iter()
            .map(|c| c.unfinished() + c.silent())
            .sum();
        let budget = cap.saturating_sub(busy) as usize;
        if budget == 0 {
            return None;
        }
        // The bucket of the first device that must stay shut: opening below it
        // starts exactly `budget` more devices (bucket ties open together).
        let next = self
            .closed
            .iter()
            .map(|(b, _)| *b)
            .skip_while(|b| *b < self.open_below)
            .nth(budget);
        Some(next.map_or(wave_target, |b| b.min(wave_target)))
    }

    /// Observations for the state machine.
    pub fn observe(&self, now: u64, max_in_flight: Option<u32>, wave_target: u64) -> Observations {
        Observations {
            now,
            waves: self.counts.clone(),
            next_step: max_in_flight.and_then(|cap| self.next_step(cap, wave_target)),
            still_installed: self.still_installed(),
        }
    }
}

/// The count a class is kept in (`None`: no report).
fn count(c: &mut WaveCounts, class: Class) -> Option<&mut u32> {
    Some(match class {
        Class::NoReport => return None,
        Class::InProgress => &mut c.in_progress,
        Class::Healthy => &mut c.healthy,
        Class::Failed { .. } => &mut c.failed,
        Class::Waiting => &mut c.waiting,
        Class::NotEligible => &mut c.not_eligible,
        Class::RolledBack => &mut c.rolled_back,
    })
}

fn add(c: &mut WaveCounts, class: Class) {
    if let Class::Failed { critical: true } = class {
        c.critical += 1;
    }
    if let Some(n) = count(c, class) {
        *n += 1;
    }
}

fn remove(c: &mut WaveCounts, class: Class) {
    if let Class::Failed { critical: true } = class {
        c.critical -= 1;
    }
    if let Some(n) = count(c, class) {
        *n -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swell_protocol::cohort::{Label, PPM_FULL};
    use swell_protocol::messages::{Reason, reason};

    fn dev(i: u32) -> DeviceId {
        DeviceId::new(format!("d{i}")).unwrap()
    }

    fn tracker(canary: usize, steps: &[u32], selector: &str) -> Tracker {
        Tracker::new(
            ReleaseId([1; 32]),
            WavePlan::new((0..canary).map(|i| dev(i as u32)).collect(), steps.to_vec()).unwrap(),
            Selector::parse(selector).unwrap(),
            vec![reason::CRASH_LOOP],
            vec!["hw".into()],
        )
    }

    fn labels(hw: &str) -> Vec<Label> {
        vec![Label {
            key: "hw".into(),
            value: hw.into(),
        }]
    }

    #[test]
    fn tracker_counts_only_opened_members_once() {
        let mut t = tracker(0, &[500_000, PPM_FULL], "hw=a");
        for i in 0..100 {
            t.consider(
                i as usize,
                &dev(i),
                &labels(if i % 10 == 0 { "b" } else { "a" }),
                "hw",
                true,
            );
        }
        assert_eq!(t.members(), 90);
        let release = ReleaseId([1; 32]);
        // Before anything opens no report counts (ROLL-6).
        assert!(!t.on_report(1, &release, &Phase::Committed));
        t.open(cohort::open_below(500_000));
        t.settle(|_| true);
        let wave0 = t.counts()[0].population;
        assert!(wave0 > 30 && wave0 < 60, "{wave0}");
        assert_eq!(t.counts()[1].population, 0);
        let (mut counted, mut refused) = (0, 0);
        for i in 0..100 {
            // Twice: the second report replaces the first.
            t.on_report(i, &release, &Phase::Installing);
            if t.on_report(i, &release, &Phase::Committed) {
                counted += 1;
            } else {
                refused += 1;
            }
        }
        assert_eq!(counted, wave0);
        assert_eq!(refused, 100 - wave0);
        assert_eq!(t.counts()[0].healthy, wave0);
        assert_eq!(t.counts()[0].in_progress, 0);
        // Another release's report does not count.
        assert!(!t.on_report(1, &ReleaseId([2; 32]), &Phase::Committed));
    }

    #[test]
    fn tracker_open_is_o1_and_settle_counts_each_member_once() {
        let mut t = tracker(0, &[500_000, PPM_FULL], "");
        for i in 0..200 {
            t.consider(i as usize, &dev(i), &[], "hw", true);
        }
        let release = ReleaseId([1; 32]);
        t.open(cohort::open_below(500_000));
        assert!(!t.settled());
        // Nothing walked yet: no population, but opened members already vote.
        assert_eq!(t.counts()[0].population, 0);
        let opened: Vec<u32> = (0..200)
            .filter(|i| cohort::is_open(cohort::bucket(&t.release, &dev(*i)), t.open_below))
            .collect();
        assert!(opened.len() > 60 && opened.len() < 140, "{}", opened.len());
        assert!(t.on_report(opened[0] as usize, &release, &Phase::Committed));
        assert_eq!(t.counts()[0].population, 1);
        // A device announcing itself after its wave opened does not join it
        // (the wave's members were fixed when it opened); one whose bucket
        // is still shut joins the later opening.
        let late_open = cohort::is_open(cohort::bucket(&t.release, &dev(1000)), t.open_below);
        assert_eq!(t.consider(1000, &dev(1000), &[], "hw", true), !late_open);
        let walked = t.settle(|_| true);
        assert!(t.settled());
        assert_eq!(walked, opened.len());
        assert_eq!(t.counts()[0].population as usize, opened.len());
        assert_eq!(t.counts()[0].healthy, 1);
        assert_eq!(t.settle(|_| true), 0);
        // The closed ones are still closed: they neither count nor vote.
        let shut = (0..200).find(|i| !opened.contains(i)).unwrap();
        assert!(!t.on_report(shut as usize, &release, &Phase::Committed));
    }

    #[test]
    fn tracker_late_failure_and_critical() {
        let mut t = tracker(2, &[PPM_FULL], "");
        t.consider(0, &dev(0), &[], "hw", true);
        t.consider(1, &dev(1), &[], "hw", false);
        t.open(0);
        t.settle(|slot| slot == 0);
        assert_eq!(
            t.counts()[0].population,
            1,
            "offline canary not counted yet"
        );
        t.on_online(1);
        assert_eq!(t.counts()[0].population, 2);
        let r = ReleaseId([1; 32]);
        t.on_report(0, &r, &Phase::Committed);
        t.on_report(
            0,
            &r,
            &Phase::Failed(Reason {
                code: reason::CRASH_LOOP,
                detail: String::new(),
            }),
        );
        assert_eq!(t.counts()[0].healthy, 0);
        assert_eq!(t.counts()[0].failed, 1);
        assert_eq!(t.counts()[0].critical, 1);
        t.retry();
        assert_eq!(t.counts()[0].failed, 0);
        assert_eq!(t.counts()[0].critical, 0);
        assert_eq!(t.counts()[0].silent(), 2);
    }

    #[test]
    fn tracker_next_step_respects_budget() {
        let mut t = tracker(0, &[PPM_FULL], "");
        for i in 0..50 {
            t.consider(i as usize, &dev(i), &[], "hw", true);
        }
        t.open(0);
        t.settle(|_| true);
        let step = t.next_step(5, u64::MAX).unwrap();
        t.open(step);
        t.settle(|_| true);
        let busy: u32 = t.counts().iter().map(|c| c.silent() + c.in_progress).sum();
        assert_eq!(busy, 5);
        assert_eq!(t.next_step(5, u64::MAX), None);
    }

    // What each report says about the device: refusals that mean "not yet"
    // or "not for me", and a rollback the rollout asked for, are not failures.
    #[test]
    fn tracker_classes_of_reports() {
        let r = |code| Reason {
            code,
            detail: String::new(),
        };
        let crit = [reason::CRASH_LOOP];
        assert_eq!(Class::of(&Phase::Committed, &crit), Class::Healthy);
        assert_eq!(Class::of(&Phase::Installing, &crit), Class::InProgress);
        assert_eq!(
            Class::of(&Phase::Rejected(r(reason::NO_FRESH_BEACON)), &crit),
            Class::Waiting
        );
        for code in [
            reason::EXPOSURE_CAP,
            reason::HARDWARE_MISMATCH,
            reason::COUNTER_TOO_LOW,
        ] {
            assert_eq!(
                Class::of(&Phase::Rejected(r(code)), &crit),
                Class::NotEligible
            );
        }
        assert_eq!(
            Class::of(&Phase::RolledBack(r(reason::OPERATOR)), &crit),
            Class::RolledBack
        );
        assert_eq!(
            Class::of(&Phase::RolledBack(r(reason::PROBE_FAILED)), &crit),
            Class::Failed { critical: false }
        );
        assert_eq!(
            Class::of(&Phase::Failed(r(reason::CRASH_LOOP)), &crit),
            Class::Failed { critical: true }
        );
        assert_eq!(
            Class::of(&Phase::Rejected(r(reason::BAD_SIGNATURE)), &crit),
            Class::Failed { critical: false }
        );
    }

    // Eligibility before membership: hardware the release is not for keeps a
    // device out; labels re-announced into the selector after the wave
    // opened do not move it in.
    #[test]
    fn tracker_members_are_eligible_and_fixed_when_their_wave_opens() {
        let mut t = tracker(0, &[PPM_FULL], "hw=a");
        assert!(!t.consider(0, &dev(0), &labels("a"), "other-board", true));
        assert!(t.consider(1, &dev(1), &labels("a"), "hw", true));
        assert!(!t.consider(2, &dev(2), &labels("b"), "hw", true));
        t.open(u64::MAX);
        t.settle(|_| true);
        assert_eq!(t.members(), 1);
        // Device 2 now says it is hw=a: its wave is open, it stays out, and
        // its reports do not count.
        assert!(!t.consider(2, &dev(2), &labels("a"), "hw", true));
        assert!(!t.on_report(2, &ReleaseId([1; 32]), &Phase::Committed));
        assert_eq!(t.counts()[0].healthy, 0);
        assert_eq!(t.members(), 1);
    }
}
