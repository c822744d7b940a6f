//! The rollout state machine. Pure: `step(spec, state, observations)` and
//! `command(spec, state, command, now)` return the next state and the decisions
//! taken; the caller stores them (with their inputs, ROLL-5) before publishing
//! anything (STATE-1).
//!
//! ```text
//! Pending(0) → WaveOpen(0) → Baking(0) → [gate] → Pending(1)* → WaveOpen(1) … → Completed
//!        any active state → Paused (operator, manual gate, breach with policy pause)
//!        any active state → RollingBack → RolledBack (breach with policy rollback, operator)
//!        any non-final state → Aborted
//! ```
//! `*` only while the schedule (start time, not-before, maintenance window) keeps
//! the next wave shut; otherwise the next wave opens in the same step.
//!
//! Invariants (docs/rollout-state-machine.md):
//! - RO-001 waves open in order, each exactly once (a retry reopens the current one).
//! - RO-002 a breach pauses or rolls back within one evaluation; nothing widens after.
//! - RO-003 a paused, aborted or rolled-back rollout never widens.
//! - RO-004 `open_below` never shrinks while the rollout is active.

use super::health_gate::{self, HaltReason, Verdict, WaveCounts};
use super::schedule;
use super::spec::{BreachPolicy, RolloutSpec};
use serde::{Deserialize, Serialize};
use swell_protocol::messages::ManifestState;

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum RolloutPhase {
    /// Waiting for the schedule to let wave `next` open.
    Pending {
        next: u16,
    },
    /// Wave `wave` is open and its devices are installing.
    WaveOpen {
        wave: u16,
    },
    /// Wave `wave` finished installing; baking since `since`.
    Baking {
        wave: u16,
        since: u64,
    },
    /// Stopped until an operator acts.
    Paused {
        wave: u16,
        reason: PauseReason,
    },
    Completed,
    Aborted,
    RollingBack,
    RolledBack,
}

/// Why a rollout is paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", content = "detail", rename_all = "snake_case")]
pub enum PauseReason {
    Operator,
    /// Wave passed its gate; the next one waits for `promote`.
    ManualGate,
    Breach(HaltReason),
}

/// Everything the machine remembers about one rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    pub phase: RolloutPhase,
    /// `open_below` the manifest carries now.
    pub open_below: u64,
    /// Newest opened wave (what the manifest calls `wave`).
    pub wave: u16,
    /// Whether any wave has opened (before that no manifest exists).
    pub started: bool,
    /// When the current wave last opened or widened (install deadline base).
    pub widened_at: u64,
    pub retry: u32,
    /// Why the rollout is not moving, for the status.
    pub waiting: Option<String>,
    /// Why it stopped, once it has.
    pub halt_reason: Option<HaltReason>,
}

impl RolloutState {
    pub fn new() -> Self {
        RolloutState {
            phase: RolloutPhase::Pending { next: 0 },
            open_below: 0,
            wave: 0,
            started: false,
            widened_at: 0,
            retry: 0,
            waiting: None,
            halt_reason: None,
        }
    }

    /// The manifest state devices see.
    pub fn manifest_state(&self) -> ManifestState {
        match self.phase {
            RolloutPhase::Pending { .. }
            | RolloutPhase::WaveOpen { .. }
            | RolloutPhase::Baking { .. }
            | RolloutPhase::Completed => ManifestState::Active,
            RolloutPhase::Paused { .. } => ManifestState::Paused,
            RolloutPhase::Aborted => ManifestState::Halted,
            RolloutPhase::RollingBack | RolloutPhase::RolledBack => ManifestState::RollingBack,
        }
    }

    /// Whether the rollout has reached an end.
    pub fn is_final(&self) -> bool {
        matches!(
            self.phase,
            RolloutPhase::Completed | RolloutPhase::Aborted | RolloutPhase::RolledBack
        )
    }

    /// Short phase name for status and metrics.
    pub fn phase_name(&self) -> &'static str {
        match self.phase {
            RolloutPhase::Pending { .. } => "pending",
            RolloutPhase::WaveOpen { .. } => "wave_open",
            RolloutPhase::Baking { .. } => "baking",
            RolloutPhase::Paused { .. } => "paused",
            RolloutPhase::Completed => "completed",
            RolloutPhase::Aborted => "aborted",
            RolloutPhase::RollingBack => "rolling_back",
            RolloutPhase::RolledBack => "rolled_back",
        }
    }
}

impl Default for RolloutState {
    fn default() -> Self {
        Self::new()
    }
}

/// What the engine observed, computed by the fleet tracker.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Observations {
    pub now: u64,
    /// Counts of every wave, by index (waves not opened yet count nothing).
    pub waves: Vec<WaveCounts>,
    /// With `max_in_flight`: the next `open_below` for the current wave if more
    /// of its devices may start now, `None` when the budget is used up.
    pub next_step: Option<u64>,
    /// Devices still running this rollout's release while rolling back.
    pub still_installed: u32,
}

impl Observations {
    pub fn cumulative(&self) -> WaveCounts {
        let mut total = WaveCounts::default();
        for w in &self.waves {
            total.add(w);
        }
        total
    }

    fn wave(&self, k: u16) -> WaveCounts {
        self.waves.get(usize::from(k)).copied().unwrap_or_default()
    }
}

/// A decision, as stored in the audit log and published as an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    OpenWave {
        wave: u16,
        open_below: u64,
    },
    Widen {
        wave: u16,
        open_below: u64,
    },
    StartBake {
        wave: u16,
    },
    GatePassed {
        wave: u16,
    },
    Wait {
        reason: String,
    },
    Pause {
        reason: PauseReason,
    },
    Resume {
        wave: u16,
    },
    Breach {
        reason: HaltReason,
        policy: BreachPolicy,
    },
    StartRollback {
        reason: HaltReason,
    },
    RollbackDone,
    Complete,
    Abort {
        reason: HaltReason,
    },
    Retry {
        retry: u32,
    },
}

/// Result of a step: the next state and what was decided on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub next: RolloutState,
    pub decisions: Vec<Decision>,
}

/// Operator commands the machine understands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Pause,
    Resume,
    Promote,
    Abort,
    Rollback,
    Retry,
}

fn target(spec: &RolloutSpec, wave: u16) -> u64 {
    spec.plan.open_below(usize::from(wave)).unwrap_or(u64::MAX)
}

fn last_wave(spec: &RolloutSpec) -> u16 {
    (spec.plan.wave_count().saturating_sub(1)) as u16
}

/// Opens `wave` if the schedule allows, else records why not.
fn open_wave(
    spec: &RolloutSpec,
    s: &mut RolloutState,
    wave: u16,
    obs: &Observations,
    out: &mut Vec<Decision>,
) {
    if let Some(reason) = schedule::blocked(spec, wave, obs.now) {
        s.phase = RolloutPhase::Pending { next: wave };
        if s.waiting.as_ref() != Some(&reason) {
            out.push(Decision::Wait {
                reason: reason.clone(),
            });
        }
        s.waiting = Some(reason);
        return;
    }
    s.waiting = None;
    let full = target(spec, wave);
    // With a cap on devices in flight the wave opens in sub-steps; the first one
    // is computed from the tracker on the next step (it knows the buckets).
    let ob = if spec.max_in_flight.is_some() {
        s.open_below
    } else {
        full
    };
    s.phase = RolloutPhase::WaveOpen { wave };
    s.wave = wave;
    s.started = true;
    s.open_below = s.open_below.max(ob);
    s.widened_at = obs.now;
    out.push(Decision::OpenWave {
        wave,
        open_below: s.open_below,
    });
}

fn start_rollback(s: &mut RolloutState, now: u64) {
    s.phase = RolloutPhase::RollingBack;
    // The rollback deadline base: devices that never come back cannot hold the
    // rollout in RollingBack forever.
    s.widened_at = now;
}

fn breach_policy(
    spec: &RolloutSpec,
    s: &mut RolloutState,
    reason: HaltReason,
    now: u64,
    out: &mut Vec<Decision>,
) {
    out.push(Decision::Breach {
        reason: reason.clone(),
        policy: spec.policy,
    });
    s.halt_reason = Some(reason.clone());
    match spec.policy {
        BreachPolicy::Pause => {
            s.phase = RolloutPhase::Paused {
                wave: s.wave,
                reason: PauseReason::Breach(reason.clone()),
            };
            out.push(Decision::Pause {
                reason: PauseReason::Breach(reason),
            });
        }
        BreachPolicy::Rollback => {
            start_rollback(s, now);
            out.push(Decision::StartRollback { reason });
        }
    }
}

/// After wave `wave` passed its gate: manual gate, completion, or the next wave.
fn after_gate(
    spec: &RolloutSpec,
    s: &mut RolloutState,
    wave: u16,
    obs: &Observations,
    out: &mut Vec<Decision>,
) {
    out.push(Decision::GatePassed { wave });
    if wave >= last_wave(spec) {
        s.phase = RolloutPhase::Completed;
        out.push(Decision::Complete);
        return;
    }
    if spec.manual_gates.contains(&wave) {
        s.phase = RolloutPhase::Paused {
            wave,
            reason: PauseReason::ManualGate,
        };
        out.push(Decision::Pause {
            reason: PauseReason::ManualGate,
        });
        return;
    }
    open_wave(spec, s, wave + 1, obs, out);
}

/// One evaluation of the rollout against what was observed. Transitions that need
/// no new observations (a zero bake, a passed gate) chain within the step; after a
/// wave opens or widens the step ends, since its devices have not been observed.
pub fn step(spec: &RolloutSpec, state: &RolloutState, obs: &Observations) -> Step {
    let mut current = state.clone();
    let mut decisions = Vec::new();
    // Bounded: each pass either changes phase towards the end or stops.
    for _ in 0..8 {
        let st = step_once(spec, &current, obs);
        let moved = st.next.phase != current.phase;
        // Stop where fresh observations are needed: after a wave opens or widens
        // (its devices are unobserved) and after a breach or rollback starts.
        let needs_fresh = st.decisions.iter().any(|d| {
            matches!(
                d,
                Decision::OpenWave { .. }
                    | Decision::Widen { .. }
                    | Decision::Breach { .. }
                    | Decision::StartRollback { .. }
            )
        });
        decisions.extend(st.decisions);
        current = st.next;
        if !moved || needs_fresh {
            break;
        }
    }
    Step {
        next: current,
        decisions,
    }
}

fn step_once(spec: &RolloutSpec, state: &RolloutState, obs: &Observations) -> Step {
    let mut s = state.clone();
    let mut out = Vec::new();
    let gate = &spec.gate;

    // RO-002: breach is checked first, on every evaluation of an active rollout.
    if matches!(
        s.phase,
        RolloutPhase::WaveOpen { .. } | RolloutPhase::Baking { .. } | RolloutPhase::Pending { .. }
    ) && s.started
        && let Some(reason) = health_gate::breach(gate, &obs.cumulative())
    {
        breach_policy(spec, &mut s, reason, obs.now, &mut out);
        return Step {
            next: s,
            decisions: out,
        };
    }

    match s.phase.clone() {
        RolloutPhase::Pending { next } => open_wave(spec, &mut s, next, obs, &mut out),
        RolloutPhase::WaveOpen { wave } => {
            let full = target(spec, wave);
            if s.open_below < full {
                if let Some(next) = obs.next_step {
                    let next = next.min(full).max(s.open_below);
                    if next > s.open_below {
                        s.open_below = next;
                        s.widened_at = obs.now;
                        out.push(Decision::Widen {
                            wave,
                            open_below: next,
                        });
                    }
                }
            } else {
                let c = obs.wave(wave);
                let all_done = c.in_progress == 0 && c.silent() == 0;
                let timed_out = obs.now >= s.widened_at.saturating_add(gate.install_timeout_secs);
                if all_done || timed_out {
                    s.phase = RolloutPhase::Baking {
                        wave,
                        since: obs.now,
                    };
                    out.push(Decision::StartBake { wave });
                }
            }
        }
        RolloutPhase::Baking { wave, since } => {
            if obs.now >= since.saturating_add(gate.bake_secs) {
                let timed_out = obs.now >= s.widened_at.saturating_add(gate.install_timeout_secs);
                match health_gate::evaluate(gate, &obs.wave(wave), &obs.cumulative(), timed_out) {
                    Verdict::Proceed => {
                        s.waiting = None;
                        after_gate(spec, &mut s, wave, obs, &mut out);
                    }
                    Verdict::Hold(reason) => {
                        let reason = reason.to_string();
                        if s.waiting.as_ref() != Some(&reason) {
                            out.push(Decision::Wait {
                                reason: reason.clone(),
                            });
                        }
                        s.waiting = Some(reason);
                    }
                    Verdict::Halt(reason) => breach_policy(spec, &mut s, reason, obs.now, &mut out),
                }
            }
        }
        RolloutPhase::RollingBack => {
            let deadline = s.widened_at.saturating_add(gate.install_timeout_secs);
            if obs.still_installed == 0 || obs.now >= deadline {
                s.phase = RolloutPhase::RolledBack;
                out.push(Decision::RollbackDone);
            }
        }
        RolloutPhase::Paused { .. }
        | RolloutPhase::Completed
        | RolloutPhase::Aborted
        | RolloutPhase::RolledBack => {}
    }
    Step {
        next: s,
        decisions: out,
    }
}

/// Applies an operator command. `Err` says, for a person, why it was refused.
pub fn command(
    spec: &RolloutSpec,
    state: &RolloutState,
    cmd: &Command,
    now: u64,
) -> Result<Step, String> {
    let mut s = state.clone();
    let mut out = Vec::new();
    let obs = Observations {
        now,
        ..Observations::default()
    };
    let final_refusal = || {
        format!(
            "rollout {} is {} and cannot change",
            spec.id,
            state.phase_name()
        )
    };
    match cmd {
        Command::Pause => match s.phase {
            RolloutPhase::Pending { next } => {
                s.phase = RolloutPhase::Paused {
                    wave: next,
                    reason: PauseReason::Operator,
                };
                out.push(Decision::Pause {
                    reason: PauseReason::Operator,
                });
            }
            RolloutPhase::WaveOpen { wave } | RolloutPhase::Baking { wave, .. } => {
                s.phase = RolloutPhase::Paused {
                    wave,
                    reason: PauseReason::Operator,
                };
                out.push(Decision::Pause {
                    reason: PauseReason::Operator,
                });
            }
            RolloutPhase::Paused { .. } => {
                return Err(format!("rollout {} is already paused", spec.id));
            }
            RolloutPhase::RollingBack => {
                return Err(format!(
                    "rollout {} is rolling back; abort it to stop",
                    spec.id
                ));
            }
            _ => return Err(final_refusal()),
        },
        Command::Resume => match s.phase.clone() {
            RolloutPhase::Paused {
                reason: PauseReason::ManualGate,
                ..
            } => {
                return Err(format!(
                    "rollout {} waits at a manual gate: use promote",
                    spec.id
                ));
            }
            RolloutPhase::Paused { wave, .. } => {
                s.halt_reason = None;
                out.push(Decision::Resume { wave });
                if !s.started {
                    open_wave(spec, &mut s, wave, &obs, &mut out);
                } else {
                    // Re-enter the wave: devices finish, then a fresh bake and gate.
                    s.phase = RolloutPhase::WaveOpen { wave };
                    s.widened_at = now;
                }
            }
            _ => {
                return Err(format!(
                    "rollout {} is {}, not paused",
                    spec.id,
                    state.phase_name()
                ));
            }
        },
        Command::Promote => match s.phase.clone() {
            RolloutPhase::Paused {
                wave,
                reason: PauseReason::ManualGate,
            }
            | RolloutPhase::WaveOpen { wave }
            | RolloutPhase::Baking { wave, .. } => {
                if wave >= last_wave(spec) {
                    s.phase = RolloutPhase::Completed;
                    out.push(Decision::Complete);
                } else {
                    open_wave(spec, &mut s, wave + 1, &obs, &mut out);
                }
            }
            RolloutPhase::Paused { .. } => {
                return Err(format!("rollout {} is paused: resume it first", spec.id));
            }
            RolloutPhase::Pending { next } => {
                return Err(format!(
                    "rollout {} is waiting to open wave {next}: {}",
                    spec.id,
                    s.waiting.clone().unwrap_or_default()
                ));
            }
            _ => return Err(final_refusal()),
        },
        Command::Abort => {
            if s.is_final() {
                return Err(final_refusal());
            }
            s.phase = RolloutPhase::Aborted;
            s.halt_reason = Some(HaltReason::AbortedByOperator);
            out.push(Decision::Abort {
                reason: HaltReason::AbortedByOperator,
            });
        }
        Command::Rollback => {
            if s.is_final() || s.phase == RolloutPhase::RollingBack {
                return Err(final_refusal());
            }
            if !s.started {
                return Err(format!(
                    "rollout {} has not opened a wave; abort it instead",
                    spec.id
                ));
            }
            start_rollback(&mut s, now);
            s.halt_reason = Some(HaltReason::RollbackByOperator);
            out.push(Decision::StartRollback {
                reason: HaltReason::RollbackByOperator,
            });
        }
        Command::Retry => match s.phase.clone() {
            RolloutPhase::WaveOpen { wave }
            | RolloutPhase::Baking { wave, .. }
            | RolloutPhase::Paused { wave, .. }
                if s.started =>
            {
                s.retry += 1;
                s.halt_reason = None;
                s.phase = RolloutPhase::WaveOpen { wave };
                s.widened_at = now;
                out.push(Decision::Retry { retry: s.retry });
            }
            _ => {
                return Err(format!(
                    "rollout {} is {}; retry needs an opened wave",
                    spec.id,
                    state.phase_name()
                ));
            }
        },
    }
    Ok(Step {
        next: s,
        decisions: out,
    })
}
