//! The install job: journaled before its actions run, one task at a time,
//! `Committed` journaled only after the installer's commit worked, the INST-2
//! reach deadline, probe rounds during probation, heartbeats, and recovery
//! after a restart.

use super::{Clock, DeviceCore, Effect, JobKey, Running, Task, Work};
use crate::deployment::{self, Action, Event, Job, Stage};
use swell_protocol::ReleaseId;
use swell_protocol::messages::{Phase, Reason, reason};
use tracing::{debug, error, info, info_span, warn};

impl DeviceCore {
    /// Journals `job`, then carries out `actions` (the order that makes every
    /// crash recoverable).
    pub(super) fn commit_step(
        &mut self,
        job: Job,
        actions: Vec<Action>,
        clock: Clock,
        out: &mut Vec<Effect>,
    ) {
        out.push(Effect::Journal(job.clone()));
        let entering_probation = matches!(job.stage, Stage::Probation { .. })
            && !matches!(
                self.job.as_ref().map(|j| &j.stage),
                Some(Stage::Probation { .. })
            );
        if entering_probation {
            self.last_probe_ms = clock.mono_ms;
        }
        let done = job.is_final();
        self.job = Some(job);
        for a in actions {
            self.carry_out(a, clock, out);
        }
        if done {
            self.retry_held(clock, out);
        }
    }

    pub(super) fn apply(&mut self, ev: Event, clock: Clock, out: &mut Vec<Effect>) {
        let Some(job) = self.job.clone() else {
            return;
        };
        if self.committing.is_some() {
            // A commit is with the installer: its result moves the job on first,
            // then what arrived meanwhile.
            self.held_events.push(ev);
            return;
        }
        let (next, actions) = deployment::step(&job, ev, &self.s.policy);
        if next == job && actions.is_empty() {
            return;
        }
        if next.stage == Stage::Committed && job.stage != Stage::Committed {
            // Commit with the installer first; journal `Committed` only if it worked.
            self.committing = Some(Box::new((next, actions)));
            self.queue.push_front(Task::Commit);
            self.next_task(clock, out);
            return;
        }
        self.commit_step(next, actions, clock, out);
    }

    fn carry_out(&mut self, a: Action, clock: Clock, out: &mut Vec<Effect>) {
        let Some(job) = self.job.clone() else {
            return;
        };
        match a {
            Action::Download => self.enqueue(Task::Download, clock, out),
            Action::Install => self.enqueue(Task::Install, clock, out),
            Action::RollBack => self.enqueue(Task::RollBack, clock, out),
            Action::Commit => {
                // Done by the installer before the journal said so (see `apply`).
                self.installed.previous = self.installed.running.take();
                self.installed.running = Some(Running {
                    release: job.release,
                    rollout: Some(job.rollout.clone()),
                    counter: job.counter,
                    version: self
                        .job_release
                        .as_ref()
                        .map(|r| r.version.clone())
                        .unwrap_or_default(),
                });
                self.save_installed(out);
                self.trust.raise_counter_floor(job.counter);
                self.persist_trust(out);
                out.push(Effect::PruneBlobs(self.blobs_to_keep()));
            }
            Action::Report(phase) => {
                let rolled_back = matches!(phase, Phase::RolledBack(_));
                if let Phase::RolledBack(_) | Phase::Failed(_) = &phase {
                    if rolled_back
                        && self
                            .installed
                            .running
                            .as_ref()
                            .is_some_and(|r| r.release == job.release)
                    {
                        self.installed.running = self.installed.previous.take();
                    }
                    self.installed.failed = Some((job.rollout.clone(), job.release, job.retry));
                    self.save_installed(out);
                }
                self.report(
                    Some(job.rollout.clone()),
                    job.release,
                    phase,
                    false,
                    clock,
                    out,
                );
                // What it runs changed: the inventory learns it from a Hello (a
                // Committed report already says what runs).
                if rolled_back {
                    self.hello(clock, out);
                }
            }
        }
    }

    /// Digests of the blobs the current job still needs.
    fn blobs_to_keep(&self) -> Vec<swell_protocol::Digest> {
        let mut keep = Vec::new();
        if let Some(r) = &self.job_release {
            keep.extend(r.artifacts.iter().map(|a| a.digest));
            keep.extend(r.config.iter().map(|c| c.digest));
        }
        keep
    }

    fn enqueue(&mut self, t: Task, clock: Clock, out: &mut Vec<Effect>) {
        self.queue.push_back(t);
        self.next_task(clock, out);
    }

    /// Starts the next task when no other runs.
    fn next_task(&mut self, clock: Clock, out: &mut Vec<Effect>) {
        if self.busy {
            return;
        }
        let Some(task) = self.queue.pop_front() else {
            return;
        };
        if let Some(failed) = self.cannot_run(task) {
            error!(?task, "journaled job without its release; abandoning it");
            let key = self.job_key();
            self.work_done(key, failed, clock, out);
            return;
        }
        self.busy = true;
        out.push(Effect::Start(task));
    }

    /// Without its release (a rebuilt store) a job can still be rolled back,
    /// but nothing can be downloaded, installed or committed: what such a task
    /// ends with, at once.
    fn cannot_run(&self, task: Task) -> Option<Work> {
        let missing = self
            .job_release
            .as_ref()
            .is_none_or(|r| r.artifacts.is_empty());
        if !missing {
            return None;
        }
        let r = Reason {
            code: reason::STORE_REBUILT,
            detail: "release of the job is missing".into(),
        };
        match task {
            Task::Download => Some(Work::Downloaded(Err(r))),
            Task::Install => Some(Work::Installed(Err(r))),
            Task::Commit => Some(Work::Committed(Err(r))),
            Task::RollBack | Task::Probe => None,
        }
    }

    /// The job a started task works for.
    pub fn job_key(&self) -> Option<JobKey> {
        self.job.as_ref().map(|j| (j.rollout.clone(), j.release))
    }

    /// A task finished, for the job it was started for.
    pub fn work_done(
        &mut self,
        for_job: Option<JobKey>,
        work: Work,
        clock: Clock,
        out: &mut Vec<Effect>,
    ) {
        self.busy = false;
        if for_job != self.job_key() {
            debug!("result of an earlier job; ignored");
            self.next_task(clock, out);
            return;
        }
        let now = self.trust.trusted_now(clock.unix);
        match work {
            Work::Downloaded(Ok(())) => self.apply(Event::Downloaded, clock, out),
            Work::Downloaded(Err(r)) => self.apply(Event::DownloadFailed(r), clock, out),
            Work::Installed(Ok(())) => self.apply(Event::Installed { now }, clock, out),
            Work::Installed(Err(r)) => {
                warn!(detail = %r.detail, "install failed");
                self.apply(Event::InstallFailed(r), clock, out);
            }
            Work::RolledBack(Ok(())) => self.apply(Event::RolledBack, clock, out),
            Work::RolledBack(Err(r)) => {
                // Keep trying: a device must end on its previous release.
                error!(detail = %r.detail, "rollback failed; retrying");
                self.queue.push_back(Task::RollBack);
            }
            Work::Committed(r) => {
                if let Some(pending) = self.committing.take() {
                    let (next, actions) = *pending;
                    match r {
                        Ok(()) => self.commit_step(next, actions, clock, out),
                        Err(r) => {
                            warn!(detail = %r.detail, "commit failed; rolling back");
                            self.apply(Event::ProbeFailed(r), clock, out);
                        }
                    }
                    for ev in std::mem::take(&mut self.held_events) {
                        self.apply(ev, clock, out);
                    }
                }
            }
            Work::Probed { results, failure } => {
                self.probes = results;
                match failure {
                    Some(r) => {
                        warn!(detail = %r.detail, "probe failed");
                        self.apply(Event::ProbeFailed(r), clock, out);
                    }
                    None => self.apply(Event::ProbesOk { now }, clock, out),
                }
            }
        }
        self.next_task(clock, out);
    }

    /// Time passing: the INST-2 reach deadline, a probe round when one is due
    /// during probation, a heartbeat when one is due.
    pub fn tick(&mut self, clock: Clock, out: &mut Vec<Effect>) {
        let now = self.trust.trusted_now(clock.unix);
        if let Some(Job {
            stage:
                Stage::Probation {
                    since,
                    fresh_after_activation,
                },
            ..
        }) = self.job.clone()
        {
            let deadline = since + self.s.policy.probation_secs + self.s.reach_timeout_secs;
            if !fresh_after_activation && now > deadline {
                // INST-2: healthy means still manageable.
                self.apply(
                    Event::ProbeFailed(Reason {
                        code: reason::UNREACHABLE_AFTER_ACTIVATE,
                        detail: "no coordinator message after activation".into(),
                    }),
                    clock,
                    out,
                );
            } else if !self.busy
                && self.committing.is_none()
                && clock.mono_ms.saturating_sub(self.last_probe_ms) >= self.s.probe_interval_ms
            {
                self.last_probe_ms = clock.mono_ms;
                self.enqueue(Task::Probe, clock, out);
            }
        }
        // FRESH-3: the beacon expired and no fresh one came. No install starts
        // without one (the manifests wait); the device says so, once per gap.
        if self.connected
            && !self.freeze_reported
            && self.beacon_until != 0
            && now >= self.beacon_until
        {
            self.freeze_reported = true;
            self.counters.possible_freezes += 1;
            warn!(
                expired_at = self.beacon_until,
                "no fresh beacon since the last one expired: the coordinator is down, or its beacon is withheld (a possible freeze); no install starts until one arrives"
            );
            let release = self.running_or_none();
            let reason = Reason {
                code: reason::NO_FRESH_BEACON,
                detail: format!("beacon expired at {}", self.beacon_until),
            };
            self.report(None, release, Phase::Rejected(reason), true, clock, out);
        }
        // ENROLL-3: no answer to the Hello yet; say it again.
        if self.connected
            && !self.enrolled()
            && self.hello_again.is_some_and(|(at, _)| clock.mono_ms >= at)
        {
            self.hello(clock, out);
        }
        if let Some(every) = self.s.heartbeat_ms
            && clock.mono_ms.saturating_sub(self.last_heartbeat_ms) >= every
        {
            self.last_heartbeat_ms = clock.mono_ms;
            let phase = match &self.installed.running {
                Some(_) => Phase::Committed,
                None => Phase::Init,
            };
            self.report(None, self.running_or_none(), phase, true, clock, out);
        }
    }

    /// The release a report about no rollout names: what runs, or 32 zero
    /// bytes when nothing does (docs/protocol.md section 12).
    fn running_or_none(&self) -> ReleaseId {
        self.installed
            .running
            .as_ref()
            .map_or(ReleaseId([0; 32]), |r| r.release)
    }

    /// When [`DeviceCore::tick`] next has something to do, on the monotonic
    /// clock: the simulator sets a timer for it instead of ticking every device.
    pub fn wake_at(&self, clock: Clock) -> Option<u64> {
        // Not the beacon's expiry: a simulated fleet of a million would wake
        // every device at each one; the agent ticks every 250 ms anyway.
        let mut at: Option<u64> = self.s.heartbeat_ms.map(|e| self.last_heartbeat_ms + e);
        if self.connected
            && !self.enrolled()
            && let Some((again, _)) = self.hello_again
        {
            at = Some(at.map_or(again, |a| a.min(again)));
        }
        if let Some(Job {
            stage:
                Stage::Probation {
                    since,
                    fresh_after_activation,
                },
            ..
        }) = &self.job
        {
            let probe = self.last_probe_ms + self.s.probe_interval_ms;
            at = Some(at.map_or(probe, |a| a.min(probe)));
            if !fresh_after_activation {
                let deadline = since + self.s.policy.probation_secs + self.s.reach_timeout_secs + 1;
                let now = self.trust.trusted_now(clock.unix);
                let reach = clock.mono_ms + deadline.saturating_sub(now) * 1000;
                at = Some(at.map_or(reach, |a| a.min(reach)));
            }
        }
        at
    }

    /// After a restart: finish what a crash interrupted (DESIGN §6, INST-3).
    pub(super) fn recover(&mut self, clock: Clock, out: &mut Vec<Effect>) {
        let Some(job) = self.job.clone() else {
            return;
        };
        let _span = info_span!("recover", rollout = %job.rollout).entered();
        // A final job whose bookkeeping was cut short.
        match &job.stage {
            Stage::Committed => {
                if self.installed.running.as_ref().map(|r| r.release) != Some(job.release) {
                    info!("finishing an interrupted commit");
                    self.carry_out(Action::Commit, clock, out);
                }
                return;
            }
            Stage::RolledBack { .. } | Stage::Failed { .. } => {
                if self.installed.failed.as_ref().map(|f| (&f.0, f.1))
                    != Some((&job.rollout, job.release))
                {
                    if self
                        .installed
                        .running
                        .as_ref()
                        .is_some_and(|r| r.release == job.release)
                        && matches!(job.stage, Stage::RolledBack { .. })
                    {
                        self.installed.running = self.installed.previous.take();
                    }
                    self.installed.failed = Some((job.rollout.clone(), job.release, job.retry));
                    self.save_installed(out);
                }
                return;
            }
            _ => {}
        }
        let now = self.trust.trusted_now(clock.unix);
        let (next, actions) = deployment::recover(&job, &self.s.policy, now);
        info!(stage = ?next.stage, attempt = next.attempt, "resuming an interrupted install");
        self.commit_step(next, actions, clock, out);
    }
}
