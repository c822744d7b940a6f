//! The device core on its own: scripted messages, work results and ticks in,
//! effects out, time moved by hand. `trust`: what a hostile coordinator key,
//! a lost trust state or an unconfirmed enrollment can and cannot do.

mod trust;

use super::*;
use crate::deployment::Stage;
use swell_protocol::fixtures;
use swell_protocol::messages::{ManifestState, ProbeResult, reason};
use swell_protocol::testkeys::test_key;
use swell_protocol::threshold::ThresholdSigned;

const T0: u64 = 1_800_000_000;
const HW: &str = "rpi4";

fn fleet() -> FleetId {
    FleetId::new("lab").unwrap()
}

fn rollout(name: &str) -> RolloutId {
    RolloutId::new(name).unwrap()
}

fn settings() -> Settings {
    Settings {
        fleet: fleet(),
        hardware: HW.into(),
        agent_version: "test".into(),
        enrollment_token: None,
        roots: RootOfTrust {
            roots: vec![test_key("root-0").public()],
            threshold: 1,
        },
        policy: Policy {
            probation_secs: 10,
            max_attempts: 3,
        },
        reach_timeout_secs: 30,
        probe_interval_ms: 1_000,
        heartbeat_ms: Some(60_000),
    }
}

fn release(counter: u64) -> ThresholdSigned {
    fixtures::release(
        counter,
        &format!("{counter}.0"),
        format!("app {counter}").as_bytes(),
        "http://127.0.0.1:1/app",
        HW,
        &["release-0", "release-1"],
        T0,
    )
}

/// A device, a coordinator stand-in and a clock.
struct Rig {
    core: DeviceCore,
    unix: u64,
    ms: u64,
    seq: u64,
}

impl Rig {
    fn new() -> Rig {
        Rig::with(Restored {
            keys: Some(Arc::new(fixtures::key_list(T0))),
            ..Restored::default()
        })
    }

    fn with(restored: Restored) -> Rig {
        let mut rig = Rig::unconfirmed(restored);
        rig.enrolled();
        rig
    }

    /// A device whose enrollment the coordinator has not confirmed yet.
    fn unconfirmed(restored: Restored) -> Rig {
        let clock = Clock {
            unix: T0,
            mono_ms: 0,
        };
        let mut core = DeviceCore::new(
            Arc::new(settings()),
            DeviceId::new("dev-1").unwrap(),
            vec![],
            test_key("device-1"),
            restored,
            clock,
        );
        let mut out = Vec::new();
        core.start(clock, &mut out);
        core.connected(clock, &mut out);
        Rig {
            core,
            unix: T0,
            ms: 0,
            seq: 1,
        }
    }

    /// The coordinator's confirmation of the device's enrollment in its
    /// present incarnation (kept until the key list when there is none yet).
    fn enrolled(&mut self) -> Vec<Effect> {
        let incarnation = self.core.trust().incarnation;
        self.enrolled_in(incarnation)
    }

    fn enrolled_in(&mut self, incarnation: u64) -> Vec<Effect> {
        let stamp = self.stamp(0);
        let bytes = fixtures::enrolled(
            &DeviceId::new("dev-1").unwrap(),
            &fleet(),
            test_key("device-1").public(),
            incarnation,
            stamp,
        );
        let mut out = Vec::new();
        let clock = self.clock();
        self.core.on_enrolled("e", &bytes, clock, &mut out);
        out
    }

    fn clock(&self) -> Clock {
        Clock {
            unix: self.unix,
            mono_ms: self.ms,
        }
    }

    fn advance_secs(&mut self, s: u64) {
        self.unix += s;
        self.ms += s * 1_000;
    }

    fn stamp(&mut self, ttl: u64) -> swell_protocol::envelope::Stamp {
        self.seq += 1;
        fixtures::stamp(1, self.seq, self.unix, ttl, &fleet())
    }

    /// A beacon as published while the device is subscribed.
    fn beacon(&mut self) -> Vec<Effect> {
        self.beacon_of(1, false)
    }

    fn beacon_of(&mut self, epoch: u64, retained: bool) -> Vec<Effect> {
        self.seq += 1;
        let stamp = fixtures::stamp(epoch, self.seq, self.unix, 600, &fleet());
        let b = fixtures::beacon(&fleet(), stamp);
        let mut out = Vec::new();
        let clock = self.clock();
        self.core.on_beacon("b", &b, retained, clock, &mut out);
        out
    }

    fn manifest_bytes(
        &mut self,
        name: &str,
        rel: &ThresholdSigned,
        state: ManifestState,
    ) -> Vec<u8> {
        let stamp = self.stamp(3_600);
        fixtures::manifest(&rollout(name), &fleet(), rel, state, stamp)
    }

    fn deliver(&mut self, name: &str, bytes: &[u8]) -> Vec<Effect> {
        let mut out = Vec::new();
        let clock = self.clock();
        self.core
            .on_manifest(&format!("m/{name}"), bytes, clock, &mut out);
        out
    }

    fn manifest(&mut self, name: &str, rel: &ThresholdSigned, state: ManifestState) -> Vec<Effect> {
        let bytes = self.manifest_bytes(name, rel, state);
        self.deliver(name, &bytes)
    }

    fn work(&mut self, w: Work) -> Vec<Effect> {
        let mut out = Vec::new();
        let key = self.core.job_key();
        let clock = self.clock();
        self.core.work_done(key, w, clock, &mut out);
        out
    }

    fn tick(&mut self) -> Vec<Effect> {
        let mut out = Vec::new();
        let clock = self.clock();
        self.core.tick(clock, &mut out);
        out
    }

    fn stage(&self) -> Option<&Stage> {
        self.core.job().map(|j| &j.stage)
    }

    /// A release installed and in probation, the probation over, a fresh
    /// beacon seen after activation: the next good probe round commits.
    fn through_probation(&mut self, name: &str, rel: &ThresholdSigned) {
        self.beacon();
        self.manifest(name, rel, ManifestState::Active);
        self.work(Work::Downloaded(Ok(())));
        self.work(Work::Installed(Ok(())));
        assert!(matches!(self.stage(), Some(Stage::Probation { .. })));
        self.advance_secs(11);
        self.beacon();
    }
}

fn phases(out: &[Effect]) -> Vec<&'static str> {
    out.iter()
        .filter_map(|e| match e {
            Effect::Send(Outgoing::Report { phase, .. }) => Some(phase.name()),
            _ => None,
        })
        .collect()
}

fn hellos(out: &[Effect]) -> usize {
    out.iter()
        .filter(|e| matches!(e, Effect::Send(Outgoing::Hello { .. })))
        .count()
}

fn started(out: &[Effect]) -> Vec<Task> {
    out.iter()
        .filter_map(|e| match e {
            Effect::Start(t) => Some(*t),
            _ => None,
        })
        .collect()
}

fn journaled(out: &[Effect]) -> Vec<&Stage> {
    out.iter()
        .filter_map(|e| match e {
            Effect::Journal(j) => Some(&j.stage),
            _ => None,
        })
        .collect()
}

fn probed_ok() -> Work {
    Work::Probed {
        results: vec![ProbeResult { index: 0, ok: true }],
        failure: None,
    }
}

#[test]
fn device_installs_journaling_each_stage_before_its_work() {
    let mut r = Rig::new();
    r.beacon();
    let out = r.manifest("r1", &release(2), ManifestState::Active);
    assert_eq!(phases(&out), ["downloading"]);
    let journal = out.iter().position(|e| matches!(e, Effect::Journal(_)));
    let start = out
        .iter()
        .position(|e| matches!(e, Effect::Start(Task::Download)));
    assert!(journal < start, "journal before the download: {out:?}");
    assert!(matches!(out[0], Effect::SaveRelease(Some(_))), "{out:?}");

    let out = r.work(Work::Downloaded(Ok(())));
    assert_eq!(phases(&out), ["downloaded", "installing"]);
    assert_eq!(journaled(&out), [&Stage::Installing]);
    assert_eq!(started(&out), [Task::Install]);

    let out = r.work(Work::Installed(Ok(())));
    assert_eq!(phases(&out), ["probation"]);
    assert!(started(&out).is_empty());
}

#[test]
fn device_commits_only_after_the_installer_did_and_says_no_hello_for_it() {
    let mut r = Rig::new();
    r.through_probation("r1", &release(2));
    r.ms += 1_000;
    assert_eq!(started(&r.tick()), [Task::Probe]);
    // The round passes: the installer commits first, `Committed` is not
    // journaled yet.
    let out = r.work(probed_ok());
    assert_eq!(started(&out), [Task::Commit]);
    assert!(journaled(&out).is_empty(), "{out:?}");
    assert!(phases(&out).is_empty());

    let out = r.work(Work::Committed(Ok(())));
    assert_eq!(journaled(&out), [&Stage::Committed]);
    assert_eq!(phases(&out), ["committed"]);
    assert_eq!(hellos(&out), 0, "a Committed report says what runs");
    assert!(out.iter().any(|e| matches!(e, Effect::SaveInstalled(i) if i.running.as_ref().map(|r| r.counter) == Some(2))));
    assert_eq!(r.core.trust().counter_floor, 2);
}

#[test]
fn device_rolls_back_when_the_installer_cannot_commit() {
    let mut r = Rig::new();
    r.through_probation("r1", &release(2));
    r.ms += 1_000;
    r.tick();
    r.work(probed_ok());
    let out = r.work(Work::Committed(Err(Reason {
        code: reason::INSTALL_FAILED,
        detail: "commit hook".into(),
    })));
    assert_eq!(started(&out), [Task::RollBack]);
    let out = r.work(Work::RolledBack(Ok(())));
    assert_eq!(phases(&out), ["rolled_back"]);
    assert_eq!(hellos(&out), 1, "what runs changed: a Hello says so");
}

#[test]
fn device_applies_what_arrived_during_a_commit_after_it() {
    let mut r = Rig::new();
    let rel = release(2);
    r.through_probation("r1", &rel);
    r.ms += 1_000;
    r.tick();
    r.work(probed_ok());
    // The rollout rolls back while the installer commits.
    let out = r.manifest("r1", &rel, ManifestState::RollingBack);
    assert!(
        journaled(&out).is_empty(),
        "held until the commit ends: {out:?}"
    );
    let out = r.work(Work::Committed(Ok(())));
    assert_eq!(
        journaled(&out),
        [
            &Stage::Committed,
            &Stage::RollingBack {
                reason: Reason {
                    code: reason::OPERATOR,
                    detail: "rollout rolling back".into()
                }
            }
        ]
    );
    assert_eq!(started(&out), [Task::RollBack]);
}

#[test]
fn device_holds_a_manifest_until_a_fresh_beacon() {
    let mut r = Rig::new();
    let bytes = r.manifest_bytes("r1", &release(2), ManifestState::Active);
    let out = r.deliver("r1", &bytes);
    assert_eq!(phases(&out), ["rejected"], "deferred, and said so once");
    assert!(started(&out).is_empty());
    assert_eq!(r.core.held_manifests(), 1);
    // The same bytes again (a retained re-delivery): no second report.
    assert!(phases(&r.deliver("r1", &bytes)).is_empty());
    let out = r.beacon();
    assert_eq!(phases(&out), ["downloading"]);
    assert_eq!(started(&out), [Task::Download]);
    assert_eq!(r.core.held_manifests(), 0);
}

#[test]
fn device_holds_a_second_manifest_while_an_install_runs() {
    let mut r = Rig::new();
    r.beacon();
    r.manifest("r1", &release(2), ManifestState::Active);
    let out = r.manifest("r2", &release(3), ManifestState::Active);
    assert!(
        phases(&out).is_empty() && started(&out).is_empty(),
        "{out:?}"
    );
    assert_eq!(r.core.held_manifests(), 1);
    // r1 fails its download: r2 is evaluated at once.
    let out = r.work(Work::Downloaded(Err(Reason {
        code: reason::DOWNLOAD_FAILED,
        detail: "404".into(),
    })));
    assert_eq!(phases(&out), ["failed", "downloading"]);
    assert_eq!(r.core.job().map(|j| j.rollout.as_str()), Some("r2"));
}

#[test]
fn device_rolls_back_a_release_that_cannot_reach_the_coordinator() {
    let mut r = Rig::new();
    r.beacon();
    r.manifest("r1", &release(2), ManifestState::Active);
    r.work(Work::Downloaded(Ok(())));
    r.work(Work::Installed(Ok(())));
    // Probation (10 s) plus the reach timeout (30 s) without a verified
    // coordinator message: INST-2.
    r.advance_secs(40);
    let out = r.tick();
    assert_eq!(started(&out), [Task::Probe], "not yet: {out:?}");
    // The probes pass, but that is not enough.
    assert!(journaled(&r.work(probed_ok())).is_empty());
    r.advance_secs(1);
    let out = r.tick();
    assert!(
        matches!(journaled(&out)[..], [Stage::RollingBack { .. }]),
        "{out:?}"
    );
    assert_eq!(started(&out), [Task::RollBack]);
    let out = r.work(Work::RolledBack(Ok(())));
    let Some(Stage::RolledBack { reason }) = r.stage() else {
        panic!("{out:?}");
    };
    assert_eq!(reason.code, reason::UNREACHABLE_AFTER_ACTIVATE);
}

#[test]
fn device_probes_at_its_interval_during_probation_only() {
    let mut r = Rig::new();
    r.ms += 5_000;
    assert!(started(&r.tick()).is_empty(), "no job: no probes");
    r.beacon();
    r.manifest("r1", &release(2), ManifestState::Active);
    r.work(Work::Downloaded(Ok(())));
    r.work(Work::Installed(Ok(())));
    r.ms += 999;
    assert!(started(&r.tick()).is_empty());
    r.ms += 1;
    assert_eq!(started(&r.tick()), [Task::Probe]);
    // One at a time: none while the round runs.
    r.ms += 5_000;
    assert!(started(&r.tick()).is_empty());
}

#[test]
fn device_sends_a_heartbeat_at_its_interval() {
    let mut r = Rig::new();
    r.ms += 59_999;
    assert!(phases(&r.tick()).is_empty());
    r.ms += 1;
    let out = r.tick();
    assert_eq!(phases(&out), ["init"]);
    assert!(matches!(
        out.last(),
        Some(Effect::Send(Outgoing::Report {
            heartbeat: true,
            rollout: None,
            ..
        }))
    ));
    assert_eq!(r.core.wake_at(r.clock()), Some(r.ms + 60_000));
}

#[test]
fn device_rolls_back_when_its_directive_forces_it() {
    let mut r = Rig::new();
    r.through_probation("r1", &release(2));
    r.ms += 1_000;
    r.tick();
    r.work(probed_ok());
    r.work(Work::Committed(Ok(())));
    let d = swell_protocol::messages::DeviceDirective {
        device: r.core.id().clone(),
        pin: None,
        exclude: false,
        force_rollback: Some(rollout("r1")),
    };
    let stamp = r.stamp(600);
    let bytes = fixtures::directive(r.core.id(), d, stamp);
    let mut out = Vec::new();
    let clock = r.clock();
    r.core.on_directive("d", &bytes, clock, &mut out);
    assert_eq!(started(&out), [Task::RollBack], "{out:?}");
}

#[test]
fn device_abandons_a_journaled_job_whose_release_is_gone() {
    let (job, _) = crate::deployment::Job::start(rollout("r1"), ReleaseId([7; 32]), 2, 0, None);
    let r = Rig::with(Restored {
        keys: Some(Arc::new(fixtures::key_list(T0))),
        job: Some(job),
        rebuilt: Some("agent store rebuilt".into()),
        ..Restored::default()
    });
    let Some(Stage::Failed { reason }) = r.stage() else {
        panic!("{:?}", r.stage());
    };
    assert_eq!(reason.code, reason::STORE_REBUILT);
}

#[test]
fn device_checks_the_beacon_and_manifests_that_came_before_the_key_list() {
    let mut r = Rig::with(Restored::default());
    r.beacon();
    let out = r.manifest("r1", &release(2), ManifestState::Active);
    assert!(out.is_empty(), "{out:?}");
    // The beacon, the manifest and the enrollment confirmation.
    assert_eq!(r.core.waiting_for_key_list(), 3);
    let mut out = Vec::new();
    let clock = r.clock();
    r.core
        .on_key_list(&fixtures::signed_key_list(T0), clock, &mut out);
    assert!(matches!(out[0], Effect::StoreKeyList(_)));
    assert_eq!(
        phases(&out),
        ["downloading"],
        "no refusal for want of a beacon"
    );
    assert_eq!(r.core.waiting_for_key_list(), 0);
}

#[test]
fn device_says_hello_on_connect_and_on_a_live_beacon_of_a_new_epoch_only() {
    let mut r = Rig::new();
    let mut out = Vec::new();
    let clock = r.clock();
    r.core.connected(clock, &mut out);
    assert_eq!(hellos(&out), 1);
    // The retained beacon read on subscribing was there before the Hello,
    // from a coordinator that subscribed before it published it.
    assert_eq!(hellos(&r.beacon_of(1, true)), 0);
    assert_eq!(hellos(&r.beacon_of(1, false)), 0, "an epoch seen before");
    // A coordinator that started since: it may have missed the Hello.
    assert_eq!(hellos(&r.beacon_of(2, false)), 1);
    assert_eq!(hellos(&r.beacon_of(2, false)), 0);
    r.core.disconnected();
    assert_eq!(hellos(&r.beacon_of(3, false)), 0, "not while disconnected");
}

#[test]
fn device_tells_the_coordinator_its_connections_were_taken_over() {
    let mut r = Rig::new();
    let notes = |out: &[Effect]| -> Vec<Vec<u8>> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Send(Outgoing::Note { bytes, .. }) => Some(bytes.clone()),
                _ => None,
            })
            .collect()
    };
    let mut out = Vec::new();
    let clock = r.clock();
    r.core.connected(clock, &mut out);
    assert!(notes(&out).is_empty(), "nothing to tell: {out:?}");
    r.core.disconnected();
    let clock = r.clock();
    r.core.taken_over(clock);
    r.core.taken_over(clock);
    let mut out = Vec::new();
    r.core.connected(clock, &mut out);
    assert_eq!(hellos(&out), 1);
    let sent = notes(&out);
    assert_eq!(sent.len(), 1, "a note after the Hello: {out:?}");
    let env = swell_protocol::envelope::UnverifiedEnvelope::parse(&sent[0]).unwrap();
    assert_eq!(env.header.proto, 2);
    let note = env
        .verify::<SessionNote>(&test_key("device-1").public(), clock.unix)
        .unwrap()
        .body;
    assert_eq!((note.takeovers, note.last_takeover), (2, clock.unix));
    // On every Hello from now on, with the next counter.
    let again = notes(&r.beacon_of(2, false));
    assert_eq!(again.len(), 1);
    let later = swell_protocol::envelope::UnverifiedEnvelope::parse(&again[0]).unwrap();
    assert!(later.header.seq > env.header.seq);
}

/// FRESH-3: the beacon expires and no fresh one comes: no install starts, and
/// the device says so once per gap (a report refusing for want of a beacon,
/// no rollout, and a counter); a fresh beacon ends the gap.
#[test]
fn device_reports_a_possible_freeze_once_per_gap() {
    let mut r = Rig::new();
    r.beacon();
    let freezes = |out: &[Effect]| {
        out.iter()
            .filter(|e| {
                matches!(e, Effect::Send(Outgoing::Report { rollout: None, phase: Phase::Rejected(reason), .. })
                    if reason.code == reason::NO_FRESH_BEACON)
            })
            .count()
    };
    assert_eq!(freezes(&r.tick()), 0, "fresh");
    r.advance_secs(601);
    assert_eq!(freezes(&r.tick()), 1, "expired");
    assert_eq!(freezes(&r.tick()), 0, "once per gap");
    assert_eq!(r.core.counters().possible_freezes, 1);
    // A manifest now waits for a beacon.
    let rel = release(2);
    r.manifest("r1", &rel, ManifestState::Active);
    assert!(r.stage().is_none(), "no install without a fresh beacon");
    r.beacon();
    r.advance_secs(601);
    assert_eq!(freezes(&r.tick()), 1, "a second gap");
    assert_eq!(r.core.counters().possible_freezes, 2);
}
