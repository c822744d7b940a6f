//! State machine scenarios over a small simulated fleet (pure: no I/O, no clock).

use super::health_gate::{HaltReason, WaveCounts};
use super::planner::WavePlan;
use super::spec::{BreachPolicy, GateSpec, MaintenanceWindows, RolloutSpec, SilentPolicy};
use super::state::*;
use swell_protocol::cohort::{self, PPM_FULL, Selector};
use swell_protocol::messages::ManifestState;
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::{DeviceId, FleetId, RolloutId};

fn release() -> ThresholdSigned {
    swell_protocol::fixtures::release(2, "2.0", b"app", "", "sim", &["release-0"], 0)
}

pub(crate) fn spec(
    canary: usize,
    steps: &[u32],
    gate: GateSpec,
    policy: BreachPolicy,
) -> RolloutSpec {
    RolloutSpec {
        id: RolloutId::new("sim").unwrap(),
        fleet: FleetId::new("f").unwrap(),
        release: release(),
        selector: Selector::all(),
        plan: WavePlan::new((0..canary).map(|i| dev(i as u32)).collect(), steps.to_vec()).unwrap(),
        gate,
        policy,
        manual_gates: vec![],
        max_in_flight: None,
        start_at: None,
        not_before: vec![],
        windows: None,
        exposure: None,
        hardware: vec![],
    }
}

fn dev(i: u32) -> DeviceId {
    DeviceId::new(format!("d{i}")).unwrap()
}

fn gate(bake: u64, timeout: u64) -> GateSpec {
    GateSpec {
        min_devices: 2,
        success_threshold_ppm: 900_000,
        max_failure_rate_ppm: 100_000,
        bake_secs: bake,
        install_timeout_secs: timeout,
        critical_reasons: vec![],
        min_breach_sample: 1,
        silent: SilentPolicy::Fail,
    }
}

/// A simulated device: online or not, and what it reports how long after its
/// wave opens it.
#[derive(Clone, Debug)]
struct SimDev {
    id: DeviceId,
    online: bool,
    /// (seconds after open, healthy?) — None: never reports.
    outcome: Option<(u64, bool)>,
    /// A failure after the commit: (seconds after open).
    late_failure: Option<u64>,
    opened_at: Option<u64>,
    retried_at: Option<u64>,
}

struct Sim {
    spec: RolloutSpec,
    state: RolloutState,
    devs: Vec<SimDev>,
    now: u64,
    log: Vec<(RolloutState, Observations, Vec<Decision>)>,
}

impl Sim {
    fn new(spec: RolloutSpec, n: u32, outcome: impl Fn(u32) -> Option<(u64, bool)>) -> Sim {
        let devs = (0..n)
            .map(|i| SimDev {
                id: dev(i),
                online: true,
                outcome: outcome(i),
                late_failure: None,
                opened_at: None,
                retried_at: None,
            })
            .collect();
        Sim {
            spec,
            state: RolloutState::new(),
            devs,
            now: 1_000,
            log: vec![],
        }
    }

    fn is_open(&self, d: &SimDev) -> bool {
        self.state.started
            && (self.spec.plan.canary().contains(&d.id)
                || cohort::is_open(
                    cohort::bucket(&self.spec.release_id(), &d.id),
                    self.state.open_below,
                ))
    }

    fn observe(&mut self) -> Observations {
        let mut waves = vec![WaveCounts::default(); self.spec.plan.wave_count()];
        let mut still_installed = 0;
        for i in 0..self.devs.len() {
            let open = self.is_open(&self.devs[i]);
            let d = &mut self.devs[i];
            if !open || !d.online {
                continue;
            }
            let opened = *d.opened_at.get_or_insert(self.now);
            let since = self.now - d.retried_at.unwrap_or(opened);
            let w = self
                .spec
                .plan
                .wave_of(&self.spec.release_id(), &d.id)
                .unwrap();
            let c = &mut waves[w];
            c.population += 1;
            match d.outcome {
                Some((after, healthy)) if since >= after => {
                    let late = d.late_failure.is_some_and(|t| self.now - opened >= t);
                    if healthy && !late {
                        c.healthy += 1;
                        still_installed += 1;
                    } else {
                        c.failed += 1;
                    }
                }
                Some(_) => c.in_progress += 1,
                None => {}
            }
        }
        if self.state.phase == RolloutPhase::RollingBack {
            // Devices roll back as soon as they see the manifest.
            still_installed = 0;
        }
        let next_step = self.spec.max_in_flight.map(|cap| {
            let in_flight = waves
                .iter()
                .map(|c| c.in_progress + c.silent())
                .sum::<u32>();
            let budget = cap.saturating_sub(in_flight) as usize;
            let mut closed: Vec<u64> = self
                .devs
                .iter()
                .filter(|d| !self.is_open(d))
                .map(|d| cohort::bucket(&self.spec.release_id(), &d.id))
                .collect();
            closed.sort_unstable();
            if budget == 0 {
                self.state.open_below
            } else {
                closed.get(budget).copied().unwrap_or(u64::MAX)
            }
        });
        Observations {
            now: self.now,
            waves,
            next_step,
            still_installed,
        }
    }

    /// Runs until the rollout is final, paused, or `max_steps` pass.
    fn run(&mut self, max_steps: usize, tick: u64) {
        for _ in 0..max_steps {
            let obs = self.observe();
            let st = step(&self.spec, &self.state, &obs);
            self.check_invariants(&st);
            self.log
                .push((self.state.clone(), obs, st.decisions.clone()));
            self.state = st.next;
            if self.state.is_final()
                || matches!(
                    self.state.phase,
                    RolloutPhase::Paused { .. } | RolloutPhase::RollingBack
                )
            {
                return;
            }
            self.now += tick;
        }
    }

    fn check_invariants(&self, st: &Step) {
        // RO-004: open_below never shrinks while active.
        assert!(
            st.next.open_below >= self.state.open_below,
            "open_below shrank"
        );
        // RO-003: nothing widens out of a stopped state.
        if matches!(
            self.state.phase,
            RolloutPhase::Paused { .. }
                | RolloutPhase::Aborted
                | RolloutPhase::RolledBack
                | RolloutPhase::RollingBack
        ) {
            assert_eq!(st.next.open_below, self.state.open_below);
        }
        // RO-001: waves open in order.
        for d in &st.decisions {
            if let Decision::OpenWave { wave, .. } = d {
                assert!(
                    *wave == 0 || *wave == self.state.wave + 1,
                    "wave {wave} opened after {}",
                    self.state.wave
                );
            }
        }
    }

    fn decisions(&self) -> Vec<Decision> {
        self.log.iter().flat_map(|(_, _, d)| d.clone()).collect()
    }

    fn opened_waves(&self) -> Vec<u16> {
        self.decisions()
            .iter()
            .filter_map(|d| {
                if let Decision::OpenWave { wave, .. } = d {
                    Some(*wave)
                } else {
                    None
                }
            })
            .collect()
    }
}

#[test]
fn state_healthy_four_wave_rollout_completes() {
    let s = spec(
        2,
        &[100_000, 500_000, PPM_FULL],
        gate(60, 600),
        BreachPolicy::Pause,
    );
    let mut sim = Sim::new(s, 200, |i| Some((10 + u64::from(i % 7) * 5, true)));
    sim.run(500, 10);
    assert_eq!(
        sim.state.phase,
        RolloutPhase::Completed,
        "{:?}",
        sim.decisions()
    );
    assert_eq!(sim.opened_waves(), vec![0, 1, 2, 3]);
    assert_eq!(sim.state.open_below, u64::MAX);
    assert_eq!(sim.state.manifest_state(), ManifestState::Active);
    assert!(sim.devs.iter().all(|d| d.opened_at.is_some()));
}

// RO-002
#[test]
fn state_breach_pauses_and_nothing_widens() {
    let s = spec(0, &[200_000, PPM_FULL], gate(60, 600), BreachPolicy::Pause);
    // A third of the devices fail.
    let mut sim = Sim::new(s, 100, |i| Some((20, i % 3 != 0)));
    sim.run(200, 10);
    assert!(
        matches!(
            &sim.state.phase,
            RolloutPhase::Paused {
                wave: 0,
                reason: PauseReason::Breach(_)
            }
        ),
        "{:?}",
        sim.state.phase
    );
    assert_eq!(sim.state.manifest_state(), ManifestState::Paused);
    assert_eq!(sim.opened_waves(), vec![0]);
    let open = sim.state.open_below;
    sim.run(50, 10);
    assert_eq!(sim.state.open_below, open);
}

#[test]
fn state_breach_with_rollback_policy_rolls_back() {
    let s = spec(
        0,
        &[200_000, PPM_FULL],
        gate(60, 600),
        BreachPolicy::Rollback,
    );
    let mut sim = Sim::new(s, 100, |i| Some((20, i % 3 != 0)));
    sim.run(200, 10);
    assert_eq!(sim.state.phase, RolloutPhase::RollingBack);
    assert_eq!(sim.state.manifest_state(), ManifestState::RollingBack);
    let obs = Observations {
        now: sim.now + 10,
        still_installed: 5,
        ..Observations::default()
    };
    let st = step(&sim.spec, &sim.state, &obs);
    assert_eq!(
        st.next.phase,
        RolloutPhase::RollingBack,
        "5 devices still run the release"
    );
    assert!(st.decisions.is_empty());
    sim.now += 10;
    sim.run(5, 10);
    assert_eq!(sim.state.phase, RolloutPhase::RolledBack);
    assert!(sim.decisions().contains(&Decision::RollbackDone));
}

#[test]
fn state_silent_devices_fail_after_timeout() {
    let s = spec(0, &[500_000, PPM_FULL], gate(30, 300), BreachPolicy::Pause);
    // Every 5th device never reports: 20% silent.
    let mut sim = Sim::new(s, 100, |i| if i % 5 == 0 { None } else { Some((10, true)) });
    sim.run(200, 10);
    match &sim.state.phase {
        RolloutPhase::Paused {
            reason: PauseReason::Breach(r),
            ..
        } => {
            assert!(
                matches!(r, HaltReason::WaveFailures { late, .. } if *late > 0),
                "{r:?}"
            );
            assert!(r.to_string().contains("silent"), "{r}");
        }
        other => panic!("{other:?}: {:?}", sim.decisions()),
    }
    // Not before the timeout: the first bake can only start at the deadline.
    let bake_at = sim
        .log
        .iter()
        .position(|(_, _, d)| d.iter().any(|d| matches!(d, Decision::StartBake { .. })))
        .unwrap();
    assert!(sim.log[bake_at].1.now >= 1_000 + 300);
}

#[test]
fn state_offline_devices_do_not_block() {
    let s = spec(0, &[500_000, PPM_FULL], gate(30, 300), BreachPolicy::Pause);
    let mut sim = Sim::new(s, 100, |_| Some((10, true)));
    for d in sim.devs.iter_mut().step_by(4) {
        d.online = false;
    }
    sim.run(200, 10);
    assert_eq!(
        sim.state.phase,
        RolloutPhase::Completed,
        "{:?}",
        sim.decisions()
    );
}

#[test]
fn state_late_failure_in_earlier_wave_halts() {
    let s = spec(
        0,
        &[300_000, 600_000, PPM_FULL],
        gate(100, 300),
        BreachPolicy::Pause,
    );
    let mut sim = Sim::new(s, 100, |_| Some((10, true)));
    // Devices of wave 0 fail 200 s after their commit.
    let plan = sim.spec.plan.clone();
    let release = sim.spec.release_id();
    for d in sim.devs.iter_mut() {
        if plan.wave_of(&release, &d.id) == Some(0) {
            d.late_failure = Some(200);
        }
    }
    sim.run(300, 10);
    assert!(
        matches!(
            sim.state.phase,
            RolloutPhase::Paused {
                reason: PauseReason::Breach(_),
                ..
            }
        ),
        "{:?}",
        sim.state.phase
    );
    assert!(
        sim.opened_waves().len() >= 2,
        "wave 0 passed before it failed late"
    );
    assert!(!sim.opened_waves().contains(&2));
}

#[test]
fn state_manual_gate_and_promote() {
    let mut s = spec(0, &[500_000, PPM_FULL], gate(0, 300), BreachPolicy::Pause);
    s.manual_gates = vec![0];
    let mut sim = Sim::new(s, 50, |_| Some((10, true)));
    sim.run(100, 10);
    assert_eq!(
        sim.state.phase,
        RolloutPhase::Paused {
            wave: 0,
            reason: PauseReason::ManualGate
        }
    );
    assert!(command(&sim.spec, &sim.state, &Command::Resume, sim.now).is_err());
    let st = command(&sim.spec, &sim.state, &Command::Promote, sim.now).unwrap();
    assert!(
        st.decisions
            .iter()
            .any(|d| matches!(d, Decision::OpenWave { wave: 1, .. }))
    );
    sim.state = st.next;
    sim.run(100, 10);
    assert_eq!(sim.state.phase, RolloutPhase::Completed);
}

#[test]
fn state_pause_resume_abort_retry() {
    let s = spec(0, &[500_000, PPM_FULL], gate(30, 300), BreachPolicy::Pause);
    let mut sim = Sim::new(s, 50, |_| Some((100, true)));
    sim.run(3, 10);
    let paused = command(&sim.spec, &sim.state, &Command::Pause, sim.now)
        .unwrap()
        .next;
    assert_eq!(paused.manifest_state(), ManifestState::Paused);
    assert!(command(&sim.spec, &paused, &Command::Pause, sim.now).is_err());
    let resumed = command(&sim.spec, &paused, &Command::Resume, sim.now)
        .unwrap()
        .next;
    assert!(matches!(resumed.phase, RolloutPhase::WaveOpen { wave: 0 }));
    let retried = command(&sim.spec, &resumed, &Command::Retry, sim.now).unwrap();
    assert_eq!(retried.next.retry, 1);
    let aborted = command(&sim.spec, &retried.next, &Command::Abort, sim.now)
        .unwrap()
        .next;
    assert_eq!(aborted.phase, RolloutPhase::Aborted);
    assert_eq!(aborted.manifest_state(), ManifestState::Halted);
    for c in [
        Command::Pause,
        Command::Resume,
        Command::Promote,
        Command::Abort,
        Command::Rollback,
        Command::Retry,
    ] {
        assert!(
            command(&sim.spec, &aborted, &c, sim.now).is_err(),
            "{c:?} on aborted"
        );
    }
}

#[test]
fn state_retry_after_breach_reopens_the_wave() {
    let s = spec(0, &[500_000, PPM_FULL], gate(30, 300), BreachPolicy::Pause);
    let mut sim = Sim::new(s, 60, |i| Some((10, i % 2 == 0)));
    sim.run(100, 10);
    assert!(matches!(
        sim.state.phase,
        RolloutPhase::Paused {
            reason: PauseReason::Breach(_),
            ..
        }
    ));
    // The operator fixes the cause; failed devices try again and succeed.
    let st = command(&sim.spec, &sim.state, &Command::Retry, sim.now).unwrap();
    sim.state = st.next;
    for d in sim.devs.iter_mut() {
        d.outcome = Some((10, true));
        d.retried_at = Some(sim.now);
    }
    sim.run(200, 10);
    assert_eq!(
        sim.state.phase,
        RolloutPhase::Completed,
        "{:?}",
        sim.decisions()
    );
    assert_eq!(sim.state.retry, 1);
}

#[test]
fn state_schedule_waits_and_says_why() {
    let mut s = spec(0, &[500_000, PPM_FULL], gate(0, 300), BreachPolicy::Pause);
    s.start_at = Some(2_000);
    s.not_before = vec![(1, 5_000)];
    let mut sim = Sim::new(s, 40, |_| Some((10, true)));
    sim.run(1, 10);
    assert!(matches!(sim.state.phase, RolloutPhase::Pending { next: 0 }));
    assert!(sim.state.waiting.as_deref().unwrap().contains("start"));
    assert!(!sim.state.started);
    sim.now = 2_000;
    sim.run(20, 10);
    assert!(
        matches!(sim.state.phase, RolloutPhase::Pending { next: 1 }),
        "{:?}",
        sim.state.phase
    );
    assert!(
        sim.state
            .waiting
            .as_deref()
            .unwrap()
            .contains("wave 1 not before")
    );
    sim.now = 5_000;
    sim.run(50, 10);
    assert_eq!(sim.state.phase, RolloutPhase::Completed);
}

/// ROLL-3 at the coordinator: a wave wider than the release's exposure
/// schedule allows now waits, saying until when, and opens once it allows it.
#[test]
fn state_waves_open_within_the_exposure_cap() {
    use swell_protocol::messages::{ExposureSchedule, ExposureStep};
    let mut s = spec(0, &[50_000, PPM_FULL], gate(0, 300), BreachPolicy::Pause);
    s.exposure = Some(ExposureSchedule {
        start: 1_000,
        steps: vec![
            ExposureStep {
                after_secs: 0,
                max_ppm: 50_000,
            },
            ExposureStep {
                after_secs: 3_600,
                max_ppm: PPM_FULL,
            },
        ],
    });
    let mut sim = Sim::new(s, 40, |_| Some((10, true)));
    sim.now = 1_000;
    sim.run(30, 10);
    // Wave 0 (5 %) fits the cap and passed; wave 1 (100 %) waits.
    assert!(
        matches!(sim.state.phase, RolloutPhase::Pending { next: 1 }),
        "{:?}",
        sim.state.phase
    );
    let why = sim.state.waiting.clone().unwrap();
    assert!(
        why.starts_with("exposure cap: 5% until 1970-01-01T01:16:40Z"),
        "{why}"
    );
    sim.now = 4_600;
    sim.run(50, 10);
    assert_eq!(sim.state.phase, RolloutPhase::Completed);
}

#[test]
fn state_maintenance_window_keeps_waves_shut() {
    let mut s = spec(0, &[PPM_FULL], gate(0, 300), BreachPolicy::Pause);
    // 02:00-03:00 UTC only.
    s.windows = Some(MaintenanceWindows {
        tz: "UTC".into(),
        daily: vec![(120, 180)],
    });
    let mut sim = Sim::new(s, 10, |_| Some((10, true)));
    sim.now = 1_795_651_200; // 00:00 UTC
    sim.run(1, 10);
    assert!(
        sim.state
            .waiting
            .as_deref()
            .unwrap()
            .contains("outside maintenance windows 02:00-03:00 UTC")
    );
    sim.now = 1_795_651_200 + 2 * 3_600 + 60;
    sim.run(50, 10);
    assert_eq!(sim.state.phase, RolloutPhase::Completed);
}

#[test]
fn state_max_in_flight_widens_in_substeps() {
    let mut s = spec(0, &[PPM_FULL], gate(0, 3_000), BreachPolicy::Pause);
    s.max_in_flight = Some(10);
    let mut sim = Sim::new(s, 100, |_| Some((30, true)));
    sim.run(500, 10);
    assert_eq!(
        sim.state.phase,
        RolloutPhase::Completed,
        "{:?}",
        sim.decisions()
    );
    let widens = sim
        .decisions()
        .iter()
        .filter(|d| matches!(d, Decision::Widen { .. }))
        .count();
    assert!(
        widens >= 9,
        "{widens} widen steps for 100 devices at 10 in flight"
    );
    // Never more than 10 installing at once.
    for (_, obs, _) in &sim.log {
        let busy: u32 = obs.waves.iter().map(|c| c.in_progress + c.silent()).sum();
        assert!(busy <= 10, "{busy} in flight");
    }
}

// ROLL-5: replaying the stored (state, observations) log gives the same decisions.
#[test]
fn state_decisions_replay_identically() {
    let s = spec(
        2,
        &[100_000, 500_000, PPM_FULL],
        gate(20, 300),
        BreachPolicy::Rollback,
    );
    let mut sim = Sim::new(s, 120, |i| Some((10 + u64::from(i % 5) * 7, i % 11 != 0)));
    sim.run(500, 10);
    assert!(!sim.log.is_empty());
    for (state, obs, decisions) in &sim.log {
        // Through JSON, as the store keeps them.
        let state: RolloutState =
            serde_json::from_str(&serde_json::to_string(state).unwrap()).unwrap();
        let obs: Observations = serde_json::from_str(&serde_json::to_string(obs).unwrap()).unwrap();
        assert_eq!(&step(&sim.spec, &state, &obs).decisions, decisions);
    }
}

// A hold is one decision however its counts move: the engine writes an audit
// log entry (and syncs it) for every change of state or decisions, and the
// counts used to be in the hold's sentence.
#[test]
fn state_a_hold_is_one_decision_while_its_counts_move() {
    let mut g = gate(0, 100_000);
    g.success_threshold_ppm = 950_000;
    let s = spec(0, &[PPM_FULL], g, BreachPolicy::Pause);
    // 36 healthy, 3 failed (92 % healthy: under 95 %, failures under 10 %),
    // and 10 more that come online one by one, healthy.
    let mut sim = Sim::new(s, 49, |i| Some((0, !(36..39).contains(&i))));
    for d in &mut sim.devs[39..] {
        d.online = false;
    }
    sim.run(5, 10);
    assert!(
        matches!(sim.state.phase, RolloutPhase::Baking { .. }),
        "{:?}",
        sim.state.phase
    );
    let waiting = sim.state.waiting.clone();
    assert!(
        waiting.as_deref().is_some_and(|w| w.contains("95%")),
        "{waiting:?}"
    );
    for i in 39..49 {
        sim.devs[i].online = true;
        let before = sim.state.clone();
        sim.run(1, 10);
        assert_eq!(sim.state, before, "the counts moved, the state did not");
    }
    let waits = sim
        .decisions()
        .iter()
        .filter(|d| matches!(d, Decision::Wait { .. }))
        .count();
    assert_eq!(waits, 1, "{:?}", sim.decisions());
}
