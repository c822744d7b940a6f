//! The health gate: counts in, verdict out. Pure.
//!
//! Counting rules (ROLL-1, ROLL-6): one vote per enrolled device, its latest report
//! for this rollout; devices outside the opened waves do not count. A wave's
//! `population` is the devices assigned to it that were online at some point since
//! it opened: offline devices do not block a wave, and late arrivals join the count
//! when they show up.
//!
//! Two checks:
//! - **breach**, any time, on cumulative counts over every opened wave: a critical
//!   failure, or a failure rate whose 95 % Wilson lower bound is above
//!   `max_failure_rate` (so one early failure among two reports is already enough
//!   evidence, one among fifty is not). This is how a late failure in an earlier
//!   wave stops the rollout.
//! - **gate**, after the bake: enough reports, success share at or above the
//!   threshold and failure share at or below the limit, on point estimates; once the
//!   install deadline has passed, silent and unfinished devices count as failed.
//!   A wave with planned members never passes on zero reports (ROLL-7): when
//!   none of them has been seen online since it opened (a broker restart before
//!   the retained online flags were read again, say) the gate holds and says
//!   so; only an operator's `promote` moves it on without evidence.

use super::spec::{GateSpec, SilentPolicy};
use serde::{Deserialize, Serialize};
use swell_protocol::cohort::PPM_FULL;

/// Device counts of one wave (or of several, added up). Each member is in at
/// most one of `healthy`, `failed`, `in_progress`, `waiting`, `not_eligible`,
/// `rolled_back` (its latest report); the rest of the population is silent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveCounts {
    /// Members assigned to the wave, online or not (0 in decisions stored
    /// before it was counted).
    #[serde(default)]
    pub planned: u32,
    /// Devices of the wave seen online since it opened.
    pub population: u32,
    pub healthy: u32,
    pub failed: u32,
    pub in_progress: u32,
    /// Failures whose reason is in the critical list.
    pub critical: u32,
    /// Refused for now, not for good: the device holds the manifest (no fresh
    /// beacon yet). Unfinished, like `in_progress`.
    #[serde(default)]
    pub waiting: u32,
    /// Refused because the release is not for it: exposure cap, hardware, a
    /// counter below its floor. Out of the gate's shares.
    #[serde(default)]
    pub not_eligible: u32,
    /// Rolled back because the rollout told it to (a fleet rollback obeyed).
    /// Out of the gate's shares.
    #[serde(default)]
    pub rolled_back: u32,
}

impl WaveCounts {
    /// Devices seen online that have not reported for this rollout yet.
    pub fn silent(&self) -> u32 {
        self.population.saturating_sub(
            self.healthy
                + self.failed
                + self.in_progress
                + self.waiting
                + self.not_eligible
                + self.rolled_back,
        )
    }

    /// Devices with a final report that counts for the gate.
    pub fn finished(&self) -> u32 {
        self.healthy + self.failed
    }

    /// Devices that reported and have not finished: installing, or waiting.
    pub fn unfinished(&self) -> u32 {
        self.in_progress + self.waiting
    }

    pub fn add(&mut self, o: &WaveCounts) {
        self.planned += o.planned;
        self.population += o.population;
        self.healthy += o.healthy;
        self.failed += o.failed;
        self.in_progress += o.in_progress;
        self.critical += o.critical;
        self.waiting += o.waiting;
        self.not_eligible += o.not_eligible;
        self.rolled_back += o.rolled_back;
    }
}

/// The gate's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Proceed,
    /// Not yet: the reason says what is missing.
    Hold(HoldReason),
    /// Stop: the reason says what breached.
    Halt(HaltReason),
}

/// Why a rollout stopped: what breached, with the counts that made it breach
/// (they are the evidence, kept as they were at that moment), or the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HaltReason {
    /// Devices failed with a reason the spec names critical.
    CriticalFailures { devices: u32 },
    /// Over the opened waves, the failure rate is above the limit at 95 %
    /// confidence (Wilson lower bound).
    FailureRate {
        failed: u32,
        reported: u32,
        lower_bound_ppm: u64,
        limit_ppm: u32,
    },
    /// The wave's failures, with its devices silent or unfinished past the
    /// install deadline (`late`), are above the limit.
    WaveFailures {
        failed: u32,
        considered: u32,
        late: u32,
        limit_ppm: u32,
    },
    /// Past the install deadline, too few of the wave are healthy.
    TooFewHealthy {
        healthy: u32,
        considered: u32,
        needed_ppm: u32,
    },
    /// An operator's `abort`.
    AbortedByOperator,
    /// An operator's `rollback`.
    RollbackByOperator,
}

impl std::fmt::Display for HaltReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HaltReason::CriticalFailures { devices } => {
                write!(f, "{devices} critical failure(s)")
            }
            HaltReason::FailureRate {
                failed,
                reported,
                lower_bound_ppm,
                limit_ppm,
            } => write!(
                f,
                "{failed} of {reported} devices failed: failure rate at least {} (95% confidence), limit {}",
                pct(*lower_bound_ppm),
                pct(u64::from(*limit_ppm))
            ),
            HaltReason::WaveFailures {
                failed,
                considered,
                late,
                limit_ppm,
            } => {
                write!(
                    f,
                    "{failed} of {considered} devices failed ({}",
                    pct(share_ppm(*failed, *considered))
                )?;
                if *late > 0 {
                    write!(f, ", {late} silent or unfinished past the install timeout")?;
                }
                write!(f, "), limit {}", pct(u64::from(*limit_ppm)))
            }
            HaltReason::TooFewHealthy {
                healthy,
                considered,
                needed_ppm,
            } => write!(
                f,
                "{healthy} of {considered} devices healthy ({}), {} needed",
                pct(share_ppm(*healthy, *considered)),
                pct(u64::from(*needed_ppm))
            ),
            HaltReason::AbortedByOperator => f.write_str("aborted by operator"),
            HaltReason::RollbackByOperator => f.write_str("rollback by operator"),
        }
    }
}

/// Why the gate holds a wave: the kind, and the gate's own limits, not the
/// counts that move while it holds (every status has those). So a hold is one
/// state and one decision in the audit log however often the counts change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HoldReason {
    /// ROLL-7: none of the wave's planned devices has been online since it opened.
    NoEvidence { planned: u32 },
    /// ROLL-7: past the deadline, no device of the wave has a report that
    /// counts (those online are not eligible, rolled back by the rollout, or
    /// silent with silence ignored).
    NoCountedReport,
    /// Fewer final reports than `min_devices` (or than the devices online, when
    /// fewer are).
    TooFewReports { min_devices: u32 },
    /// The healthy share is below the threshold, before the install deadline.
    TooFewHealthy { success_threshold_ppm: u32 },
}

impl std::fmt::Display for HoldReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HoldReason::NoEvidence { planned } => write!(
                f,
                "none of the wave's {planned} devices has been online since it opened: no evidence to pass on (promote to pass without it)"
            ),
            HoldReason::NoCountedReport => f.write_str(
                "no device of the wave has a report that counts (not eligible, rolled back, or silent with silence ignored): no evidence to pass on (promote to pass without it)"
            ),
            HoldReason::TooFewReports { min_devices } => write!(
                f,
                "waiting for final reports from {min_devices} devices (min_devices), or from every device online when fewer are"
            ),
            HoldReason::TooFewHealthy {
                success_threshold_ppm,
            } => write!(
                f,
                "healthy devices below {} (success_threshold); waiting for the rest to finish",
                pct(u64::from(*success_threshold_ppm))
            ),
        }
    }
}

fn pct(ppm: u64) -> String {
    swell_protocol::cohort::format_percent(ppm.min(u64::from(PPM_FULL)) as u32)
}

fn share_ppm(part: u32, whole: u32) -> u64 {
    if whole == 0 {
        return 0;
    }
    u64::from(part) * u64::from(PPM_FULL) / u64::from(whole)
}

/// 95 % Wilson score lower bound of `k` successes in `n` trials, in ppm.
pub fn wilson_lower_ppm(k: u32, n: u32) -> u64 {
    if n == 0 {
        return 0;
    }
    let z = 1.959_963_984_540_054_f64;
    let n_f = f64::from(n);
    let p = f64::from(k) / n_f;
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n_f);
    let margin = z * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt();
    let lower = ((centre - margin) / (1.0 + z2 / n_f)).max(0.0);
    (lower * f64::from(PPM_FULL)).floor() as u64
}

/// A breach on cumulative counts, if there is one: a critical failure at
/// once, a failure rate only once `min_breach_sample` eligible devices have
/// reported.
pub fn breach(gate: &GateSpec, cumulative: &WaveCounts) -> Option<HaltReason> {
    if cumulative.critical > 0 {
        return Some(HaltReason::CriticalFailures {
            devices: cumulative.critical,
        });
    }
    let reported = cumulative.finished() + cumulative.unfinished();
    if reported < gate.min_breach_sample {
        return None;
    }
    let lower = wilson_lower_ppm(cumulative.failed, reported);
    if lower > u64::from(gate.max_failure_rate_ppm) {
        return Some(HaltReason::FailureRate {
            failed: cumulative.failed,
            reported,
            lower_bound_ppm: lower,
            limit_ppm: gate.max_failure_rate_ppm,
        });
    }
    None
}

/// The gate for one wave after its bake. `timed_out`: the install deadline of the
/// wave has passed.
pub fn evaluate(
    gate: &GateSpec,
    wave: &WaveCounts,
    cumulative: &WaveCounts,
    timed_out: bool,
) -> Verdict {
    if let Some(reason) = breach(gate, cumulative) {
        return Verdict::Halt(reason);
    }
    let silent_counts = gate.silent == SilentPolicy::Fail;
    let silent = if timed_out && silent_counts {
        wave.silent()
    } else {
        0
    };
    let late = if timed_out {
        silent + wave.unfinished()
    } else {
        0
    };
    // ROLL-7: no pass without evidence. (With devices online and the deadline
    // past, their silence is the evidence: they count as failed below, unless
    // the spec says silence is ignored.)
    let reports = wave.finished() + wave.unfinished();
    if wave.planned > 0 && reports == 0 {
        if wave.population == 0 {
            return Verdict::Hold(HoldReason::NoEvidence {
                planned: wave.planned,
            });
        }
        if timed_out && silent == 0 {
            return Verdict::Hold(HoldReason::NoCountedReport);
        }
    }
    let failed = wave.failed + late;
    let considered = wave.healthy + wave.failed + wave.unfinished() + silent;
    let need = gate.min_devices.min(wave.population);
    // Past the deadline every device of the wave is final (silence is failure).
    if !timed_out && wave.finished() < need {
        return Verdict::Hold(HoldReason::TooFewReports {
            min_devices: gate.min_devices,
        });
    }
    if considered == 0 {
        return Verdict::Proceed;
    }
    let failure = share_ppm(failed, considered);
    if failure > u64::from(gate.max_failure_rate_ppm) {
        return Verdict::Halt(HaltReason::WaveFailures {
            failed,
            considered,
            late,
            limit_ppm: gate.max_failure_rate_ppm,
        });
    }
    let success = share_ppm(wave.healthy, considered);
    if success < u64::from(gate.success_threshold_ppm) {
        return if timed_out {
            Verdict::Halt(HaltReason::TooFewHealthy {
                healthy: wave.healthy,
                considered,
                needed_ppm: gate.success_threshold_ppm,
            })
        } else {
            Verdict::Hold(HoldReason::TooFewHealthy {
                success_threshold_ppm: gate.success_threshold_ppm,
            })
        };
    }
    Verdict::Proceed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> GateSpec {
        GateSpec {
            min_devices: 5,
            success_threshold_ppm: 900_000,
            max_failure_rate_ppm: 100_000,
            min_breach_sample: 1,
            ..GateSpec::default()
        }
    }

    fn c(population: u32, healthy: u32, failed: u32, in_progress: u32) -> WaveCounts {
        WaveCounts {
            planned: population,
            population,
            healthy,
            failed,
            in_progress,
            ..WaveCounts::default()
        }
    }

    #[test]
    fn health_gate_table() {
        let g = gate();
        let table: &[(WaveCounts, bool, &str)] = &[
            (c(10, 10, 0, 0), false, "proceed"),
            (c(10, 9, 1, 0), false, "proceed"),
            (c(10, 3, 0, 7), false, "hold"),   // 3 of 5 reports
            (c(3, 3, 0, 0), false, "proceed"), // min capped at population
            (c(0, 0, 0, 0), false, "proceed"), // empty wave
            (c(10, 8, 0, 2), false, "hold"),   // 80% healthy, waiting
            (c(10, 8, 0, 2), true, "halt"),    // the 2 count as failed now
            (c(10, 9, 0, 0), true, "proceed"), // 1 silent = 10%, at the limit
            (c(10, 7, 0, 0), true, "halt"),    // 3 silent = 30%
            (c(100, 88, 0, 12), false, "hold"),
        ];
        for (counts, timed_out, want) in table {
            let v = evaluate(&g, counts, counts, *timed_out);
            let got = match v {
                Verdict::Proceed => "proceed",
                Verdict::Hold(_) => "hold",
                Verdict::Halt(_) => "halt",
            };
            assert_eq!(got, *want, "{counts:?} timed_out={timed_out}: {v:?}");
        }
    }

    // RO-007 (ROLL-7): a wave with planned members never passes on zero reports.
    #[test]
    fn health_gate_holds_without_evidence() {
        let g = gate();
        let offline = WaveCounts {
            planned: 40,
            ..WaveCounts::default()
        };
        for timed_out in [false, true] {
            match evaluate(&g, &offline, &offline, timed_out) {
                Verdict::Hold(why) => {
                    assert_eq!(why, HoldReason::NoEvidence { planned: 40 });
                    assert!(why.to_string().contains("none of the wave's 40 devices"));
                }
                v => panic!("timed_out={timed_out}: {v:?}"),
            }
        }
        // A wave nobody was assigned to has nothing to wait for.
        assert_eq!(
            evaluate(&g, &WaveCounts::default(), &WaveCounts::default(), false),
            Verdict::Proceed
        );
        // Online and silent past the deadline: the silence is the evidence.
        let silent = WaveCounts {
            planned: 40,
            population: 40,
            ..WaveCounts::default()
        };
        assert!(matches!(
            evaluate(&g, &silent, &silent, true),
            Verdict::Halt(_)
        ));
        assert!(matches!(
            evaluate(&g, &silent, &silent, false),
            Verdict::Hold(_)
        ));
    }

    // RO-002: a breach halts whatever the wave's own numbers say.
    #[test]
    fn health_gate_breach_uses_confidence_bound() {
        let g = gate();
        // 1 failure of 2: lower bound ~9.5% > ... no: 1/2 lower bound is 9.45%, under 10%.
        assert_eq!(breach(&g, &c(2, 1, 1, 0)), None);
        assert!(breach(&g, &c(3, 1, 2, 0)).is_some());
        assert_eq!(breach(&g, &c(50, 49, 1, 0)), None);
        assert!(breach(&g, &c(100, 70, 30, 0)).is_some());
        let mut crit = c(100, 99, 1, 0);
        crit.critical = 1;
        assert_eq!(
            breach(&g, &crit).unwrap().to_string(),
            "1 critical failure(s)"
        );
        // A late failure in an earlier wave breaches through the cumulative counts.
        let wave = c(10, 10, 0, 0);
        let cumulative = c(20, 12, 8, 0);
        assert!(matches!(
            evaluate(&g, &wave, &cumulative, false),
            Verdict::Halt(_)
        ));
    }

    #[test]
    fn health_gate_wilson_bounds() {
        assert_eq!(wilson_lower_ppm(0, 10), 0);
        assert_eq!(wilson_lower_ppm(0, 0), 0);
        let b = wilson_lower_ppm(1, 2);
        assert!((94_000..96_000).contains(&b), "{b}");
        let b = wilson_lower_ppm(50, 100);
        assert!((403_000..405_000).contains(&b), "{b}");
    }

    // The typed reasons read as the sentences operators saw before them.
    #[test]
    fn gate_halt_reasons_in_words() {
        let wave = HaltReason::WaveFailures {
            failed: 3,
            considered: 10,
            late: 1,
            limit_ppm: 50_000,
        };
        assert_eq!(
            wave.to_string(),
            "3 of 10 devices failed (30%, 1 silent or unfinished past the install timeout), limit 5%"
        );
        let rate = HaltReason::FailureRate {
            failed: 8,
            reported: 100,
            lower_bound_ppm: 41_000,
            limit_ppm: 10_000,
        };
        assert_eq!(
            rate.to_string(),
            "8 of 100 devices failed: failure rate at least 4.1% (95% confidence), limit 1%"
        );
        let json = serde_json::to_string(&rate).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"failure_rate","failed":8,"reported":100,"lower_bound_ppm":41000,"limit_ppm":10000}"#
        );
        assert_eq!(serde_json::from_str::<HaltReason>(&json).unwrap(), rate);
    }

    // A failure rate stops the rollout only with enough evidence; a critical
    // failure needs none.
    #[test]
    fn gate_breach_needs_its_minimum_sample() {
        let g = GateSpec {
            min_breach_sample: 10,
            ..gate()
        };
        assert_eq!(breach(&g, &c(1, 0, 1, 0)), None, "1 of 1 is not enough");
        assert_eq!(breach(&g, &c(9, 0, 9, 0)), None, "9 of 9 is not enough");
        assert!(matches!(
            breach(&g, &c(10, 7, 3, 0)),
            Some(HaltReason::FailureRate { reported: 10, .. })
        ));
        let mut crit = c(1, 0, 1, 0);
        crit.critical = 1;
        assert!(matches!(
            breach(&g, &crit),
            Some(HaltReason::CriticalFailures { devices: 1 })
        ));
        // Refusals that mean "not for me" are not evidence either way.
        let mut refused = c(20, 0, 0, 0);
        refused.not_eligible = 20;
        assert_eq!(breach(&g, &refused), None);
    }

    // Not eligible, rolled back by the rollout, waiting: each its own count,
    // none a failure; waiting is unfinished (a failure only past the deadline).
    #[test]
    fn gate_outcomes_that_are_not_failures() {
        let g = gate();
        let mut w = c(18, 10, 0, 0);
        w.not_eligible = 5;
        w.rolled_back = 3;
        assert_eq!(w.silent(), 0);
        assert_eq!(evaluate(&g, &w, &w, false), Verdict::Proceed);
        assert_eq!(evaluate(&g, &w, &w, true), Verdict::Proceed);
        let mut waiting = c(10, 9, 0, 0);
        waiting.waiting = 1;
        assert_eq!(
            evaluate(&g, &waiting, &waiting, false),
            Verdict::Proceed,
            "9 of 10 healthy meets 90 %"
        );
        waiting.healthy = 8;
        waiting.waiting = 2;
        assert!(matches!(
            evaluate(&g, &waiting, &waiting, false),
            Verdict::Hold(HoldReason::TooFewHealthy { .. })
        ));
        assert!(matches!(
            evaluate(&g, &waiting, &waiting, true),
            Verdict::Halt(HaltReason::WaveFailures { late: 2, .. })
        ));
        // Every device online refused as not eligible: nothing to pass on.
        let mut none = c(4, 0, 0, 0);
        none.not_eligible = 4;
        assert!(matches!(
            evaluate(&g, &none, &none, false),
            Verdict::Hold(HoldReason::TooFewReports { .. })
        ));
        assert_eq!(
            evaluate(&g, &none, &none, true),
            Verdict::Hold(HoldReason::NoCountedReport)
        );
    }

    // Silence after the deadline: a failure by default, left out with `ignore`.
    #[test]
    fn gate_silence_counts_as_the_spec_says() {
        let w = c(10, 8, 0, 0);
        assert_eq!(w.silent(), 2);
        let fail = gate();
        assert!(matches!(
            evaluate(&fail, &w, &w, true),
            Verdict::Halt(HaltReason::WaveFailures { late: 2, .. })
        ));
        let ignore = GateSpec {
            silent: SilentPolicy::Ignore,
            ..gate()
        };
        assert_eq!(evaluate(&ignore, &w, &w, true), Verdict::Proceed);
        let quiet = c(10, 0, 0, 0);
        assert_eq!(
            evaluate(&ignore, &quiet, &quiet, true),
            Verdict::Hold(HoldReason::NoCountedReport)
        );
    }
}
