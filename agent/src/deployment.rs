//! The install state machine (DESIGN §6), pure: `step(job, event, policy)` returns
//! the next job and the actions to carry out. The caller journals the new job
//! durably **before** carrying out its actions, so a SIGKILL or power cut at any
//! point resumes from the journal: [`recover`] turns the journaled stage into the
//! safe next step and counts the attempt (INST-3).
//!
//! ```text
//! Downloading ──(verified: reports downloaded)──> Installing → Probation → Committed
//!      │                                              │            │
//!      └──> Failed                                    └────────────┴──> RollingBack → RolledBack
//! ```
//! Commit needs both (INST-2): probes passing for the whole probation, and a fresh
//! signed message from the coordinator verified after activation — a version that
//! cannot reach the coordinator is not healthy, whatever its probes say.

use serde::{Deserialize, Serialize};
use swell_protocol::messages::{Phase, Reason, reason};
use swell_protocol::{ReleaseId, RolloutId};

/// Where an install is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    Downloading,
    /// Downloaded and verified; installing (installers are idempotent, so an
    /// interrupted install is simply run again).
    Installing,
    /// Activated at `since`; `fresh_after_activation` once a verified coordinator
    /// message arrived after activation.
    Probation {
        since: u64,
        fresh_after_activation: bool,
    },
    Committed,
    RollingBack {
        reason: Reason,
    },
    /// Final: back on the previous release.
    RolledBack {
        reason: Reason,
    },
    /// Final: refused or failed before anything was activated.
    Failed {
        reason: Reason,
    },
}

/// One install, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub rollout: RolloutId,
    pub release: ReleaseId,
    pub counter: u64,
    pub retry: u32,
    /// What ran before (the rollback target), if anything.
    pub previous: Option<ReleaseId>,
    pub stage: Stage,
    /// Starts of this job (first start and every recovery), INST-3.
    pub attempt: u16,
}

/// Install policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub probation_secs: u64,
    /// Recoveries after which an unfinished install is abandoned (INST-3).
    pub max_attempts: u16,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Downloaded,
    DownloadFailed(Reason),
    Installed {
        now: u64,
    },
    InstallFailed(Reason),
    /// All probes passed at `now`.
    ProbesOk {
        now: u64,
    },
    ProbeFailed(Reason),
    /// A verified coordinator message (manifest or beacon) arrived at `now`.
    FreshMessage {
        now: u64,
    },
    /// The coordinator asked to roll back (manifest `RollingBack`, directive).
    RollbackRequested(Reason),
    RolledBack,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fetch and verify the artifacts (resuming what is there).
    Download,
    /// Install and activate the downloaded release.
    Install,
    /// Make the new release permanent; raise the counter floor.
    Commit,
    /// Return to `previous`.
    RollBack,
    /// Report this phase.
    Report(Phase),
}

impl Job {
    /// A new install, journaled as `Downloading`.
    pub fn start(
        rollout: RolloutId,
        release: ReleaseId,
        counter: u64,
        retry: u32,
        previous: Option<ReleaseId>,
    ) -> (Job, Vec<Action>) {
        let job = Job {
            rollout,
            release,
            counter,
            retry,
            previous,
            stage: Stage::Downloading,
            attempt: 1,
        };
        (
            job,
            vec![Action::Report(Phase::Downloading), Action::Download],
        )
    }

    /// Whether the job is over.
    pub fn is_final(&self) -> bool {
        matches!(
            self.stage,
            Stage::Committed | Stage::RolledBack { .. } | Stage::Failed { .. }
        )
    }

    /// Whether the new release may be running (so a failure must roll back).
    fn activated(&self) -> bool {
        matches!(self.stage, Stage::Installing | Stage::Probation { .. })
    }
}

fn roll_back(job: &mut Job, reason: Reason, out: &mut Vec<Action>) {
    job.stage = Stage::RollingBack { reason };
    out.push(Action::RollBack);
}

fn fail(job: &mut Job, reason: Reason, out: &mut Vec<Action>) {
    out.push(Action::Report(Phase::Failed(reason.clone())));
    job.stage = Stage::Failed { reason };
}

/// One transition. Events that do not apply to the current stage change nothing.
pub fn step(job: &Job, event: Event, policy: &Policy) -> (Job, Vec<Action>) {
    let mut j = job.clone();
    let mut out = Vec::new();
    match (&job.stage, event) {
        (_, Event::RollbackRequested(r))
            if !job.is_final() && !matches!(job.stage, Stage::RollingBack { .. }) =>
        {
            if job.activated() {
                roll_back(&mut j, r, &mut out);
            } else {
                fail(&mut j, r, &mut out);
            }
        }
        (Stage::Committed, Event::RollbackRequested(r)) => roll_back(&mut j, r, &mut out),
        (Stage::Downloading, Event::Downloaded) => {
            // Verified bytes on disk: straight to installing (journaled first).
            j.stage = Stage::Installing;
            out.extend([
                Action::Report(Phase::Downloaded),
                Action::Report(Phase::Installing),
                Action::Install,
            ]);
        }
        (Stage::Downloading, Event::DownloadFailed(r)) => fail(&mut j, r, &mut out),
        (Stage::Installing, Event::Installed { now }) => {
            j.stage = Stage::Probation {
                since: now,
                fresh_after_activation: false,
            };
            out.push(Action::Report(Phase::Probation));
        }
        (Stage::Installing, Event::InstallFailed(r)) => roll_back(&mut j, r, &mut out),
        (Stage::Probation { since, .. }, Event::FreshMessage { now }) if now >= *since => {
            j.stage = Stage::Probation {
                since: *since,
                fresh_after_activation: true,
            };
        }
        (
            Stage::Probation {
                since,
                fresh_after_activation,
            },
            Event::ProbesOk { now },
        ) if now >= since.saturating_add(policy.probation_secs) && *fresh_after_activation => {
            j.stage = Stage::Committed;
            out.extend([Action::Commit, Action::Report(Phase::Committed)]);
        }
        (Stage::Probation { .. }, Event::ProbeFailed(r)) => roll_back(&mut j, r, &mut out),
        (Stage::RollingBack { reason }, Event::RolledBack) => {
            out.push(Action::Report(Phase::RolledBack(reason.clone())));
            j.stage = Stage::RolledBack {
                reason: reason.clone(),
            };
        }
        _ => {}
    }
    (j, out)
}

/// After a restart: the journaled job and what to do to continue safely. Counts
/// the attempt; past `max_attempts` an unfinished install is abandoned and rolled
/// back (INST-3). A half-done install is never reported healthy: an interrupted
/// `Installing` is retried or rolled back, an interrupted probation starts over.
pub fn recover(job: &Job, policy: &Policy, now: u64) -> (Job, Vec<Action>) {
    let mut j = job.clone();
    let mut out = Vec::new();
    if job.is_final() {
        return (j, out);
    }
    if let Stage::RollingBack { .. } = job.stage {
        out.push(Action::RollBack);
        return (j, out);
    }
    j.attempt = job.attempt.saturating_add(1);
    if j.attempt > policy.max_attempts {
        let r = Reason {
            code: reason::CRASH_LOOP,
            detail: format!("{} starts without finishing", job.attempt),
        };
        if job.activated() {
            roll_back(&mut j, r, &mut out);
        } else {
            fail(&mut j, r, &mut out);
        }
        return (j, out);
    }
    match job.stage {
        Stage::Downloading => out.push(Action::Download),
        Stage::Installing => {
            // Installers are idempotent: installing again over a half-done install
            // is how it is finished (the inactive slot is rewritten from scratch).
            out.push(Action::Install);
        }
        Stage::Probation { .. } => {
            // The probation restarts: a reboot in the middle proves nothing yet.
            j.stage = Stage::Probation {
                since: now,
                fresh_after_activation: false,
            };
        }
        _ => {}
    }
    (j, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy {
        probation_secs: 60,
        max_attempts: 3,
    };

    fn job() -> Job {
        Job::start(
            RolloutId::new("r").unwrap(),
            ReleaseId([2; 32]),
            7,
            0,
            Some(ReleaseId([1; 32])),
        )
        .0
    }

    fn r(code: u16) -> Reason {
        Reason {
            code,
            detail: String::new(),
        }
    }

    fn reports(actions: &[Action]) -> Vec<&'static str> {
        actions
            .iter()
            .filter_map(|a| {
                if let Action::Report(p) = a {
                    Some(p.name())
                } else {
                    None
                }
            })
            .collect()
    }

    #[test]
    fn deployment_happy_path_needs_probes_and_a_fresh_message() {
        let (j, a) = step(&job(), Event::Downloaded, &P);
        assert_eq!(reports(&a), ["downloaded", "installing"]);
        assert!(a.contains(&Action::Install));
        let (j, a) = step(&j, Event::Installed { now: 100 }, &P);
        assert_eq!(reports(&a), ["probation"]);
        // Probes pass long enough, but no fresh coordinator message yet (INST-2).
        let (j, a) = step(&j, Event::ProbesOk { now: 200 }, &P);
        assert!(a.is_empty());
        assert!(matches!(j.stage, Stage::Probation { .. }));
        // A message from before activation does not count; one after does.
        let (j, _) = step(&j, Event::FreshMessage { now: 99 }, &P);
        assert!(matches!(
            j.stage,
            Stage::Probation {
                fresh_after_activation: false,
                ..
            }
        ));
        let (j, _) = step(&j, Event::FreshMessage { now: 120 }, &P);
        // Fresh, but probation not over.
        let (j2, a) = step(&j, Event::ProbesOk { now: 150 }, &P);
        assert!(a.is_empty() && !j2.is_final());
        let (j, a) = step(&j, Event::ProbesOk { now: 160 }, &P);
        assert_eq!(j.stage, Stage::Committed);
        assert_eq!(a, vec![Action::Commit, Action::Report(Phase::Committed)]);
    }

    #[test]
    fn deployment_probe_failure_rolls_back() {
        let (j, _) = step(&job(), Event::Downloaded, &P);
        let (j, _) = step(&j, Event::Installed { now: 100 }, &P);
        let (j, a) = step(&j, Event::ProbeFailed(r(reason::PROBE_FAILED)), &P);
        assert_eq!(a, vec![Action::RollBack]);
        let (j, a) = step(&j, Event::RolledBack, &P);
        assert_eq!(reports(&a), ["rolled_back"]);
        assert!(j.is_final());
    }

    #[test]
    fn deployment_download_failure_fails_without_rollback() {
        let (j, a) = step(
            &job(),
            Event::DownloadFailed(r(reason::DIGEST_MISMATCH)),
            &P,
        );
        assert_eq!(reports(&a), ["failed"]);
        assert!(!a.contains(&Action::RollBack));
        assert!(j.is_final());
    }

    #[test]
    fn deployment_rollback_requested() {
        let (j, a) = step(&job(), Event::RollbackRequested(r(reason::OPERATOR)), &P);
        assert_eq!(
            reports(&a),
            ["failed"],
            "nothing activated yet: nothing to roll back"
        );
        assert!(j.is_final());
        let (j, _) = step(&job(), Event::Downloaded, &P);
        let (j, _) = step(&j, Event::Installed { now: 1 }, &P);
        let (j, _) = step(&j, Event::FreshMessage { now: 2 }, &P);
        let (j, _) = step(&j, Event::ProbesOk { now: 100 }, &P);
        assert_eq!(j.stage, Stage::Committed);
        let (_, a) = step(&j, Event::RollbackRequested(r(reason::OPERATOR)), &P);
        assert_eq!(a, vec![Action::RollBack]);
    }

    /// Every journaled stage, recovered after a crash, ends committed or rolled
    /// back — never reported healthy from a half-done state — and a crash loop ends.
    #[test]
    fn deployment_recovery_from_every_stage() {
        let stages = [
            Stage::Downloading,
            Stage::Installing,
            Stage::Probation {
                since: 5,
                fresh_after_activation: true,
            },
            Stage::RollingBack {
                reason: r(reason::PROBE_FAILED),
            },
        ];
        for stage in stages {
            let crashed = Job {
                stage: stage.clone(),
                ..job()
            };
            let (j, a) = recover(&crashed, &P, 1_000);
            assert!(!a.contains(&Action::Report(Phase::Committed)), "{stage:?}");
            assert!(!a.contains(&Action::Commit), "{stage:?}");
            if let Stage::Probation {
                since,
                fresh_after_activation,
            } = j.stage
            {
                assert_eq!(
                    (since, fresh_after_activation),
                    (1_000, false),
                    "probation starts over"
                );
            }
        }
        // Keep crashing in Installing: the attempt counter ends it.
        let mut j = Job {
            stage: Stage::Installing,
            ..job()
        };
        let mut rolled = false;
        for _ in 0..10 {
            let (next, a) = recover(&j, &P, 0);
            j = next;
            if a.contains(&Action::RollBack) {
                rolled = true;
                break;
            }
        }
        assert!(rolled);
        assert!(
            matches!(&j.stage, Stage::RollingBack { reason } if reason.code == reason::CRASH_LOOP)
        );
        assert_eq!(j.attempt, P.max_attempts + 1);
    }

    #[test]
    fn deployment_stray_events_change_nothing() {
        let j = job();
        for e in [
            Event::Installed { now: 1 },
            Event::ProbesOk { now: 1 },
            Event::RolledBack,
            Event::FreshMessage { now: 1 },
        ] {
            let (n, a) = step(&j, e, &P);
            assert_eq!(n, j);
            assert!(a.is_empty());
        }
    }
}
