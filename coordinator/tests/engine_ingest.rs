//! Every ingest rejection path, on the engine directly (no broker needed): each
//! is counted under its reason and changes nothing. The engine runs on the
//! in-memory store (`MemoryStore`, test-util) except where the disk store's
//! record layout is the subject.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{Value, json};
use std::sync::Arc;
use swell_coordinator::engine::{Engine, EngineError, Out, ReplyTo};
use swell_coordinator::fleet::registry::Enrollment;
use swell_coordinator::precheck::{Precheck, pipeline};
use swell_coordinator::server::unix_now;
use swell_coordinator::store::{DiskStore, MemoryStore};
use swell_protocol::envelope::{Audience, Stamp, seal};
use swell_protocol::messages::*;
use swell_protocol::testkeys::test_key;
use swell_protocol::{DeviceId, FleetId, ReleaseId, RolloutId, SecretKey};

struct T {
    e: Engine,
    now: u64,
}

fn dev(i: u32) -> DeviceId {
    DeviceId::new(format!("dev-{i:04}")).unwrap()
}

fn key(i: u32) -> SecretKey {
    test_key(&format!("device-{i}"))
}

fn hello(i: u32, k: &SecretKey, seq: u64, token: Option<&str>, fleet_name: &str) -> Vec<u8> {
    hello_in(i, k, 1, seq, token, fleet_name)
}

/// A Hello of device `i`'s incarnation `incarnation` (also its `epoch`).
fn hello_in(
    i: u32,
    k: &SecretKey,
    incarnation: u64,
    seq: u64,
    token: Option<&str>,
    fleet_name: &str,
) -> Vec<u8> {
    let h = Hello {
        device: dev(i),
        fleet: FleetId::new(fleet_name).unwrap(),
        key: k.public(),
        labels: vec![],
        hardware: "sim".into(),
        agent_version: "t".into(),
        proto_min: 3,
        proto_max: 3,
        boot: 1,
        running: None,
        counter_floor: 0,
        incarnation,
        enrollment_proof: token.map(|t| {
            swell_protocol::enroll::prove(
                t,
                &dev(i),
                &FleetId::new(fleet_name).unwrap(),
                &k.public(),
            )
        }),
        confirmed: false,
    };
    seal(
        k,
        Stamp {
            epoch: incarnation,
            seq,
            issued_at: unix_now(),
            expires_at: 0,
            audience: Audience::Any,
        },
        &h,
    )
    .unwrap()
}

fn report(
    i: u32,
    k: &SecretKey,
    seq: u64,
    rollout: &str,
    release: ReleaseId,
    phase: Phase,
    expires_at: u64,
) -> Vec<u8> {
    report_in(i, k, 1, seq, rollout, release, phase, expires_at)
}

#[allow(clippy::too_many_arguments)]
fn report_in(
    i: u32,
    k: &SecretKey,
    epoch: u64,
    seq: u64,
    rollout: &str,
    release: ReleaseId,
    phase: Phase,
    expires_at: u64,
) -> Vec<u8> {
    let r = Report {
        device: dev(i),
        rollout: Some(RolloutId::new(rollout).unwrap()),
        release,
        phase,
        probes: vec![],
        metrics: Metrics::default(),
    };
    seal(
        k,
        Stamp {
            epoch,
            seq,
            issued_at: unix_now(),
            expires_at,
            audience: Audience::Any,
        },
        &r,
    )
    .unwrap()
}

impl T {
    fn new() -> T {
        let (e, _) = Engine::start(settings(1), Arc::new(MemoryStore::new()), unix_now()).unwrap();
        T { e, now: unix_now() }
    }

    fn send(&mut self, topic: String, payload: &[u8]) {
        self.e
            .handle(&topic, payload, ReplyTo::default(), self.now)
            .unwrap();
    }

    fn command(&mut self, cmd: Value) -> Value {
        let mut cmd = cmd;
        cmd["reply_to"] = json!("replies");
        let topic = self.e.topics().ops_cmd(self.e.fleet());
        let out = self
            .e
            .handle(
                &topic,
                cmd.to_string().as_bytes(),
                ReplyTo::default(),
                self.now,
            )
            .unwrap();
        let reply = out.iter().find(|o| o.topic == "replies").expect("a reply");
        serde_json::from_slice(&reply.payload).unwrap()
    }

    fn rejected(&self, reason: &str) -> u64 {
        self.e.counters.rejected.get(reason).copied().unwrap_or(0)
    }

    fn healthy(&self, rollout: &str) -> u64 {
        let s = self
            .e
            .status(&RolloutId::new(rollout).unwrap(), self.now)
            .unwrap();
        s.waves
            .iter()
            .map(|w| u64::from(w.healthy + w.failed))
            .sum()
    }
}

/// Hands one message to the engine at `at`; what it publishes.
fn deliver(e: &mut Engine, at: u64, topic: String, payload: &[u8]) -> Vec<Out> {
    e.handle(&topic, payload, ReplyTo::default(), at).unwrap()
}

/// Sends a command (with `"reply_to": "replies"`) on the engine's command
/// topic at `at`; its reply.
fn ask(e: &mut Engine, at: u64, cmd: &[u8]) -> Value {
    let topic = e.topics().ops_cmd(e.fleet());
    let out = deliver(e, at, topic, cmd);
    let reply = out.iter().find(|o| o.topic == "replies").expect("a reply");
    serde_json::from_slice(&reply.payload).unwrap()
}

/// Device `i` says Hello with the fleet's enrollment token.
fn enroll(e: &mut Engine, at: u64, i: u32) {
    deliver(
        e,
        at,
        topic_hello(i),
        &hello(i, &key(i), 1, Some(TOKEN), "plant-7"),
    );
}

/// `create` as an operator sends it (the reply goes to `replies`).
fn create(
    e: &mut Engine,
    at: u64,
    rollout: &str,
    rel: &swell_protocol::threshold::ThresholdSigned,
    waves: &[&str],
    extra: Value,
) -> Vec<Out> {
    let mut cmd = create_cmd(rollout, rel, waves, extra);
    cmd["reply_to"] = json!("replies");
    let topic = e.topics().ops_cmd(e.fleet());
    deliver(e, at, topic, cmd.to_string().as_bytes())
}

fn topic_report(i: u32) -> String {
    format!("swell/v1/dev/{}/report", dev(i))
}
fn topic_hello(i: u32) -> String {
    format!("swell/v1/dev/{}/hello", dev(i))
}

#[test]
fn engine_ingest_rejections_are_counted_and_change_nothing() {
    let mut t = T::new();
    for i in 0..4 {
        t.send(
            topic_hello(i),
            &hello(i, &key(i), 1, Some(TOKEN), "plant-7"),
        );
    }
    assert_eq!(t.e.counters.hellos, 4);
    let rel = release(2, "2.0.0");
    let r = t.command(create_cmd("r", &rel, &["100%"], json!({})));
    assert_eq!(r["ok"], true, "{r}");
    let id = rel.id();
    let ok = |t: &T| t.healthy("r");

    // Malformed, oversized.
    t.send(topic_report(0), b"\x01\x02garbage");
    assert_eq!(t.rejected("malformed"), 1);
    t.send(topic_report(0), &vec![0u8; 70_000]);
    assert_eq!(t.rejected("oversized"), 1);
    // Signed by another device's key.
    t.send(
        topic_report(0),
        &report(0, &key(1), 5, "r", id, Phase::Committed, 0),
    );
    assert_eq!(t.rejected("forged"), 1);
    // Device 1's valid report published on device 0's topic.
    t.send(
        topic_report(0),
        &report(1, &key(1), 5, "r", id, Phase::Committed, 0),
    );
    assert_eq!(t.rejected("forged"), 2);
    // Expired.
    t.send(
        topic_report(0),
        &report(0, &key(0), 5, "r", id, Phase::Committed, t.now - 1),
    );
    assert_eq!(t.rejected("expired"), 1);
    // Unknown device.
    t.send(
        topic_report(9),
        &report(9, &key(9), 5, "r", id, Phase::Committed, 0),
    );
    assert_eq!(t.rejected("unknown_device"), 1);
    // A device-signed beacon-kind message on the report topic.
    let beacon = seal(
        &key(0),
        Stamp {
            epoch: 1,
            seq: 9,
            issued_at: t.now,
            expires_at: t.now + 60,
            audience: Audience::Any,
        },
        &Beacon {
            fleet: fleet(),
            key_list_version: 1,
        },
    )
    .unwrap();
    t.send(topic_report(0), &beacon);
    assert_eq!(t.rejected("wrong_kind"), 1);
    // Wildcards and strangers in the topic.
    t.send("swell/v1/dev/+/report".into(), b"x");
    t.send("swell/v1/dev/x/whatever".into(), b"x");
    assert_eq!(t.rejected("bad_topic"), 2);
    assert_eq!(ok(&t), 0, "no rejected report counted");

    // The valid one counts; the same again is a replay.
    let good = report(0, &key(0), 5, "r", id, Phase::Committed, 0);
    t.send(topic_report(0), &good);
    assert_eq!(ok(&t), 1);
    t.send(topic_report(0), &good);
    assert_eq!(t.rejected("replayed"), 1);
    t.send(
        topic_report(0),
        &report(
            0,
            &key(0),
            4,
            "r",
            id,
            Phase::Failed(Reason {
                code: 14,
                detail: String::new(),
            }),
            0,
        ),
    );
    assert_eq!(t.rejected("replayed"), 2);
    assert_eq!(ok(&t), 1);
    let s = t.e.status(&RolloutId::new("r").unwrap(), t.now).unwrap();
    assert_eq!(s.waves[0].failed, 0, "the replayed failure did not count");
    assert_eq!(t.e.device(&dev(0)).unwrap().last_seq, 5);
    // Another release's report does not count for this rollout.
    t.send(
        topic_report(1),
        &report(1, &key(1), 5, "r", ReleaseId([7; 32]), Phase::Committed, 0),
    );
    assert_eq!(ok(&t), 1);
    assert_eq!(t.e.counters.reports, 2);
}

#[test]
fn engine_hello_rejections() {
    let mut t = T::new();
    t.send(
        topic_hello(0),
        &hello(0, &key(0), 1, Some(TOKEN), "plant-7"),
    );
    // Re-enrolling device 0 under another key.
    t.send(
        topic_hello(0),
        &hello(0, &key(5), 2, Some(TOKEN), "plant-7"),
    );
    assert_eq!(t.rejected("forged"), 1);
    assert_eq!(t.e.device(&dev(0)).unwrap().key, key(0).public());
    // Announcing one key, signed by another (self-signature check).
    let mut forged = hello(1, &key(1), 1, Some(TOKEN), "plant-7");
    let other = hello(1, &key(2), 1, Some(TOKEN), "plant-7");
    let n = forged.len();
    forged[n - 64..].copy_from_slice(&other[other.len() - 64..]);
    t.send(topic_hello(1), &forged);
    assert_eq!(t.rejected("forged"), 2);
    assert!(t.e.device(&dev(1)).is_none());
    // Another fleet.
    t.send(
        topic_hello(2),
        &hello(2, &key(2), 1, Some(TOKEN), "other-fleet"),
    );
    assert_eq!(t.rejected("wrong_fleet"), 1);
    // Replayed hello.
    t.send(
        topic_hello(0),
        &hello(0, &key(0), 1, Some(TOKEN), "plant-7"),
    );
    assert_eq!(t.rejected("replayed"), 1);
    // Hello on another device's topic.
    t.send(
        topic_hello(3),
        &hello(0, &key(0), 7, Some(TOKEN), "plant-7"),
    );
    assert_eq!(t.rejected("forged"), 3);
    // Garbage online flag.
    t.send("swell/v1/dev/dev-0000/online".into(), b"yes");
    assert_eq!(t.rejected("malformed"), 1);
}

#[test]
fn engine_unapproved_devices_do_not_vote_until_approved() {
    let mut t = T::new();
    // No token: pending.
    t.send(topic_hello(0), &hello(0, &key(0), 1, None, "plant-7"));
    t.send(topic_hello(1), &hello(1, &key(1), 1, None, "plant-7"));
    let rel = release(2, "2.0.0");
    t.send(
        topic_report(0),
        &report(0, &key(0), 2, "r", rel.id(), Phase::Committed, 0),
    );
    assert_eq!(t.rejected("not_approved"), 1);
    // ENROLL-1: an approval names the key it approves; not the one pending.
    let other = test_key("other").key_id().to_string();
    let r = t.command(json!({"op": "approve", "device": "dev-0000", "key": other}));
    assert_eq!(r["reason"], "key_mismatch", "{r}");
    let mine = key(0).key_id().to_string();
    let r = t.command(json!({"op": "approve", "device": "dev-0000", "key": mine}));
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["message"].as_str().unwrap().contains(&mine), "{r}");
    let r = t.command(create_cmd("r", &rel, &["100%"], json!({})));
    assert_eq!(r["status"]["members"], 1, "only the approved device: {r}");
    t.send(
        topic_report(0),
        &report(0, &key(0), 3, "r", rel.id(), Phase::Committed, 0),
    );
    assert_eq!(t.healthy("r"), 1);
    // Approved after its wave opened: the wave's members were fixed then.
    let r = t.command(json!({"op": "approve", "device": "dev-0001"}));
    assert_eq!(r["ok"], true, "{r}");
    t.send(
        topic_report(1),
        &report(1, &key(1), 2, "r", rel.id(), Phase::Committed, 0),
    );
    assert_eq!(t.healthy("r"), 1);
}

// ROLL-6: devices outside the opened waves do not vote.
#[test]
fn engine_reports_from_unopened_waves_do_not_count() {
    let mut t = T::new();
    for i in 0..40 {
        t.send(
            topic_hello(i),
            &hello(i, &key(i), 1, Some(TOKEN), "plant-7"),
        );
    }
    let rel = release(2, "2.0.0");
    let r = t.command(create_cmd(
        "r",
        &rel,
        &["10%", "100%"],
        json!({"bake": "1h"}),
    ));
    assert_eq!(r["ok"], true);
    for i in 0..40 {
        t.send(
            topic_report(i),
            &report(i, &key(i), 2, "r", rel.id(), Phase::Committed, 0),
        );
    }
    let s = t.e.status(&RolloutId::new("r").unwrap(), t.now).unwrap();
    let in_first = s.waves[0].healthy;
    assert!(in_first > 0 && in_first < 15, "{s:#?}");
    assert_eq!(
        s.waves[1].healthy, 0,
        "wave 1 is not open: its reports do not count"
    );
}

/// RO-007 (ROLL-7): every member of the wave looks offline (a broker restart,
/// before the retained online flags are read again): the gate holds and says
/// why instead of passing an empty population; once devices come online and
/// report it moves on.
#[test]
fn engine_gate_holds_when_the_whole_wave_looks_offline() {
    let mut t = T::new();
    for i in 0..20 {
        t.send(
            topic_hello(i),
            &hello(i, &key(i), 1, Some(TOKEN), "plant-7"),
        );
        // Their Last Will: offline.
        t.send(format!("swell/v1/dev/{}/online", dev(i)), b"0");
    }
    let rel = release(2, "2.0.0");
    let r = t.command(create_cmd(
        "r",
        &rel,
        &["100%"],
        json!({"bake": "0s", "install_timeout": "1s"}),
    ));
    assert_eq!(r["ok"], true);
    let id = RolloutId::new("r").unwrap();
    // Well past the bake and the install deadline, nobody online, no report.
    for dt in [0, 5, 60, 3_600] {
        t.e.step_active(t.now + dt).unwrap();
        t.e.settle(t.now + dt);
    }
    let s = t.e.status(&id, t.now + 3_600).unwrap();
    assert_eq!(s.waves[0].planned, 20, "{s:#?}");
    assert_eq!(s.waves[0].population, 0);
    assert_ne!(s.phase, "completed", "{s:#?}");
    assert!(
        s.waiting
            .as_deref()
            .is_some_and(|w| w.contains("none of the wave's 20 devices has been online")),
        "{s:#?}"
    );
    // Evidence arrives: they come online and report; the gate passes.
    for i in 0..20 {
        t.send(format!("swell/v1/dev/{}/online", dev(i)), b"1");
        t.send(
            topic_report(i),
            &report(i, &key(i), 2, "r", rel.id(), Phase::Committed, 0),
        );
    }
    t.e.step_active(t.now + 3_601).unwrap();
    let s = t.e.status(&id, t.now + 3_601).unwrap();
    assert_eq!(s.phase, "completed", "{s:#?}");
}

/// A wave opens in O(1): the manifest comes out of `step_active` before the
/// opened wave is walked, and the status (with the new wave's population)
/// follows from `settle`. Gates never judge an unwalked wave.
#[test]
fn engine_opens_a_wave_before_walking_it() {
    let mut t = T::new();
    for i in 0..40 {
        t.send(
            topic_hello(i),
            &hello(i, &key(i), 1, Some(TOKEN), "plant-7"),
        );
        t.send(format!("swell/v1/dev/{}/online", dev(i)), b"1");
    }
    let rel = release(2, "2.0.0");
    let r = t.command(create_cmd(
        "r",
        &rel,
        &["10%", "100%"],
        json!({"bake": "0s"}),
    ));
    assert_eq!(r["ok"], true);
    let id = RolloutId::new("r").unwrap();
    let first = t.e.status(&id, t.now).unwrap().waves[0].population;
    assert!(first > 0 && first < 15, "{first}");
    for i in 0..40 {
        t.send(
            topic_report(i),
            &report(i, &key(i), 2, "r", rel.id(), Phase::Committed, 0),
        );
    }
    let out = t.e.step_active(t.now).unwrap();
    let status_topic = t.e.topics().ops_status(t.e.fleet(), &id);
    assert!(
        out.iter().any(|o| o.topic.contains("/manifest/")),
        "the next wave's manifest: {:?}",
        out.iter().map(|o| &o.topic).collect::<Vec<_>>()
    );
    assert!(!out.iter().any(|o| o.topic == status_topic));
    let s = t.e.status(&id, t.now).unwrap();
    assert!(s.waves[1].opened);
    assert_eq!(s.waves[1].population, 0, "not walked yet");
    let settled = t.e.settle(t.now);
    assert_eq!(settled.len(), 1);
    assert_eq!(settled[0].topic, status_topic);
    // What is published is the operator protocol's JSON of the status.
    let s: swell_coordinator::status::RolloutStatus =
        serde_json::from_slice(&settled[0].payload).unwrap();
    assert_eq!(s.waves[1].population, 40 - first);
    // Their reports came before the wave opened: they do not count (ROLL-6).
    assert_eq!(s.waves[1].healthy, 0);
    assert!(t.e.settle(t.now).is_empty());
}

/// A counted report is stored without rewriting its device record: the replay
/// floor it raised must still hold after a restart, and after its rollout (with
/// its stored reports) is deleted.
#[test]
fn engine_replay_floor_held_by_stored_reports_survives_restart_and_removal() {
    let dir = tempfile::tempdir().unwrap();
    let open = |now: u64| {
        let store = Arc::new(DiskStore::open(&dir.path().join("db")).unwrap());
        Engine::start(settings(1), store, now).unwrap().0
    };
    let now = unix_now();
    let k = key(1);
    let rel = release(2, "2.0.0");
    let id = RolloutId::new("r").unwrap();
    let replayed = |e: &Engine| e.counters.rejected.get("replayed").copied().unwrap_or(0);
    {
        let mut e = open(now);
        enroll(&mut e, now, 1);
        create(&mut e, now, "r", &rel, &["100%"], json!({"bake": "1h"}));
        // The first changes the running release (device record written), the
        // second only the stored report.
        for seq in [2, 5] {
            deliver(
                &mut e,
                now,
                topic_report(1),
                &report(1, &k, seq, "r", rel.id(), Phase::Committed, 0),
            );
        }
        assert_eq!(e.counters.reports, 2);
        e.flush().unwrap();
    }
    {
        let mut e = open(now);
        // Both stored reports replay; only the newer one's seq is a floor.
        for seq in [2, 5] {
            deliver(
                &mut e,
                now,
                topic_report(1),
                &report(1, &k, seq, "r", rel.id(), Phase::Committed, 0),
            );
        }
        assert_eq!(replayed(&e), 2);
        deliver(
            &mut e,
            now,
            topic_report(1),
            &report(1, &k, 6, "r", rel.id(), Phase::Committed, 0),
        );
        assert_eq!(e.counters.reports, 1);
        assert_eq!(e.device(&dev(1)).unwrap().last_seq, 6);
        let (existed, _) = e.remove(&id, now).unwrap();
        assert!(existed);
        e.flush().unwrap();
    }
    let mut e = open(now);
    assert!(e.rollout_state(&id).is_none());
    deliver(
        &mut e,
        now,
        topic_report(1),
        &report(1, &k, 6, "r", rel.id(), Phase::Committed, 0),
    );
    assert_eq!(replayed(&e), 1, "the floor outlived the rollout's reports");
    deliver(
        &mut e,
        now,
        topic_report(1),
        &report(1, &k, 7, "r", rel.id(), Phase::Committed, 0),
    );
    assert_eq!(e.counters.reports, 1);
}

/// STATE-1 at the engine: device facts are durable once flushed (the server
/// flushes before it acknowledges), and a crash before the flush loses them,
/// so the device's resend after the crash counts instead of being a replay.
#[test]
fn engine_device_facts_are_durable_once_flushed() {
    let store = Arc::new(MemoryStore::new());
    let now = unix_now();
    let start = || Engine::start(settings(1), store.clone(), now).unwrap().0;
    let k = key(1);
    let rel = release(2, "2.0.0");
    let mut e = start();
    enroll(&mut e, now, 1);
    create(&mut e, now, "r", &rel, &["100%"], json!({"bake": "1h"}));
    e.flush().unwrap();
    let committed = report(1, &k, 2, "r", rel.id(), Phase::Committed, 0);
    deliver(&mut e, now, topic_report(1), &committed);
    assert_eq!(e.counters.reports, 1);
    // Killed before the flush: the report was never acknowledged.
    store.crash();
    let mut e = start();
    assert!(
        e.rollout_state(&RolloutId::new("r").unwrap()).is_some(),
        "rollouts are durable at commit"
    );
    deliver(&mut e, now, topic_report(1), &committed);
    assert_eq!(
        e.counters.reports, 1,
        "the resend counts: nothing of it survived"
    );
    e.flush().unwrap();
    store.crash();
    let mut e = start();
    deliver(&mut e, now, topic_report(1), &committed);
    assert_eq!(e.counters.reports, 0);
    assert_eq!(
        e.counters.rejected.get("replayed"),
        Some(&1),
        "flushed: a replay now"
    );
    assert_eq!(store.durable_device(&dev(1)).map(|d| d.last_seq), Some(2));
}

/// A finished rollout's record never changes: later reports for it (a device
/// now on a higher counter refusing its manifest), devices enrolling after it,
/// ticks, and a restart all leave its status byte-identical; the later report
/// still updates the device's own record.
#[test]
fn engine_a_finished_rollout_is_final() {
    let store = Arc::new(MemoryStore::new());
    let now = unix_now();
    let start = |at: u64| Engine::start(settings(1), store.clone(), at).unwrap().0;
    let mut e = start(now);
    for i in 0..3 {
        enroll(&mut e, now, i);
        deliver(&mut e, now, format!("swell/v1/dev/{}/online", dev(i)), b"1");
    }
    let rel = release(2, "2.0.0");
    create(&mut e, now, "r", &rel, &["100%"], json!({"bake": "0s"}));
    for i in 0..3 {
        deliver(
            &mut e,
            now,
            topic_report(i),
            &report(i, &key(i), 2, "r", rel.id(), Phase::Committed, 0),
        );
    }
    e.tick(now + 1).unwrap();
    e.flush().unwrap();
    let id = RolloutId::new("r").unwrap();
    let fin = e.status(&id, now + 1).unwrap();
    assert_eq!(fin.phase, "completed", "{fin:?}");
    assert!(fin.finished);
    assert_eq!(fin.opened_totals(), (3, 0));
    let frozen = serde_json::to_string(&fin).unwrap();

    // An hour later device 0 runs a higher counter and refuses the manifest.
    let later = now + 3_600;
    let refusal = Phase::Rejected(Reason {
        code: reason::COUNTER_TOO_LOW,
        detail: "counter 2 below floor 3".into(),
    });
    deliver(
        &mut e,
        later,
        topic_report(0),
        &report(0, &key(0), 3, "r", rel.id(), refusal.clone(), 0),
    );
    assert_eq!(
        e.device(&dev(0)).unwrap().last_seq,
        3,
        "the device's own record moved on"
    );
    // A device enrolls after the rollout finished and installs the release
    // from the manifest that still stands; ticks go by.
    enroll(&mut e, later, 9);
    deliver(
        &mut e,
        later,
        topic_report(9),
        &report(9, &key(9), 2, "r", rel.id(), Phase::Committed, 0),
    );
    e.tick(later).unwrap();
    assert_eq!(
        serde_json::to_string(&e.status(&id, later).unwrap()).unwrap(),
        frozen
    );
    // It is in the fleet's inventory, not in the rollout's counts.
    let reply = ask(&mut e, later, br#"{"op":"fleet","reply_to":"replies"}"#);
    let desired = &reply["status"]["desired"];
    assert_eq!(
        desired,
        &json!([{"rollout": "r", "release": rel.id().to_string(), "selector": "",
                 "running": 4, "joined_after_completion": 1}]),
        "{reply}"
    );
    e.flush().unwrap();

    // After a restart, and more refusals.
    let mut e = start(later + 10);
    deliver(
        &mut e,
        later + 10,
        topic_report(1),
        &report(1, &key(1), 3, "r", rel.id(), refusal, 0),
    );
    assert_eq!(
        serde_json::to_string(&e.status(&id, later + 10).unwrap()).unwrap(),
        frozen
    );
}

/// Devices that refuse because the release is not for them (its exposure cap,
/// their hardware) or not yet (no fresh beacon), and devices that obeyed a
/// rollback, are counted apart and never as failures: 16 refusals and 2
/// rollbacks next to 2 healthy devices do not breach, and the wave passes on
/// the 2 that count. (Waiting devices are unfinished: past the deadline they
/// are late, like an install that never ends.)
#[test]
fn engine_refusals_are_not_failures() {
    let mut t = T::new();
    for i in 0..22 {
        t.send(
            topic_hello(i),
            &hello(i, &key(i), 1, Some(TOKEN), "plant-7"),
        );
        t.send(format!("swell/v1/dev/{}/online", dev(i)), b"1");
    }
    let rel = release(2, "2.0.0");
    let r = t.command(create_cmd("capped", &rel, &["100%"], json!({"bake": "0s"})));
    assert_eq!(r["ok"], true, "{r}");
    let refuse = |code| {
        Phase::Rejected(Reason {
            code,
            detail: String::new(),
        })
    };
    let id = RolloutId::new("capped").unwrap();
    let counts = |t: &T| {
        let s = t.e.status(&id, t.now).unwrap();
        let w = s.waves[0].clone();
        (
            s,
            (
                w.healthy,
                w.failed,
                w.not_eligible,
                w.waiting,
                w.rolled_back,
            ),
        )
    };
    for i in 0..22 {
        let phase = match i {
            0..12 => refuse(reason::EXPOSURE_CAP),
            12..16 => refuse(reason::HARDWARE_MISMATCH),
            16..18 => Phase::RolledBack(Reason {
                code: reason::OPERATOR,
                detail: "directive".into(),
            }),
            18..20 => refuse(reason::NO_FRESH_BEACON),
            _ => Phase::Committed,
        };
        t.send(
            topic_report(i),
            &report(i, &key(i), 2, "capped", rel.id(), phase, 0),
        );
    }
    t.e.tick(t.now).unwrap();
    let (s, c) = counts(&t);
    assert_eq!(c, (2, 0, 16, 2, 2), "{s:?}");
    assert!(
        matches!(s.phase.as_str(), "wave_open" | "baking"),
        "2 of 4 healthy: it waits for the waiting ones: {s:?}"
    );
    // The two that waited install.
    for i in 18..20 {
        t.send(
            topic_report(i),
            &report(i, &key(i), 3, "capped", rel.id(), Phase::Committed, 0),
        );
    }
    t.e.tick(t.now).unwrap();
    let (s, c) = counts(&t);
    assert_eq!(c, (4, 0, 16, 0, 2), "{s:?}");
    assert_eq!(s.phase, "completed", "{s:?}");
    assert!(s.finished);
}

/// The fleet's desired state: when a rollout completes, the finished rollouts
/// before it whose scope its selector covers are superseded: their retained
/// manifests are cleared at once and never published again (not on a tick,
/// not after a restart), while their records stay as they finished. A
/// narrower rollout supersedes nothing broader.
#[test]
fn engine_a_completed_rollout_supersedes_the_ones_it_covers() {
    let store = Arc::new(MemoryStore::new());
    let now = unix_now();
    let start = |at: u64| Engine::start(settings(1), store.clone(), at).unwrap();
    let (mut e, _) = start(now);
    for i in 0..2 {
        enroll(&mut e, now, i);
        deliver(&mut e, now, format!("swell/v1/dev/{}/online", dev(i)), b"1");
    }
    let fleet = FleetId::new("plant-7").unwrap();
    let manifest = |e: &Engine, r: &str| e.topics().manifest(&fleet, &RolloutId::new(r).unwrap());
    let mut seq = 1;
    // Creates `name` over `selector` and has both devices commit it; what the
    // completing tick published.
    let mut complete = |e: &mut Engine, name: &str, counter: u64, selector: &str| {
        let rel = release(counter, &format!("{counter}.0.0"));
        let mut cmd = create_cmd(
            name,
            &rel,
            &["100%"],
            json!({"bake": "0s", "selector": selector}),
        );
        cmd["reply_to"] = json!("replies");
        cmd["allow_overlap"] = json!(true);
        let topic = e.topics().ops_cmd(e.fleet());
        deliver(e, now, topic, cmd.to_string().as_bytes());
        seq += 1;
        for i in 0..2 {
            deliver(
                e,
                now,
                topic_report(i),
                &report(i, &key(i), seq, name, rel.id(), Phase::Committed, 0),
            );
        }
        let out = e.tick(now + 1).unwrap();
        assert_eq!(
            e.status(&RolloutId::new(name).unwrap(), now + 1)
                .unwrap()
                .phase,
            "completed"
        );
        out
    };
    complete(&mut e, "a", 2, "");
    let a = e.status(&RolloutId::new("a").unwrap(), now + 1).unwrap();
    let out = complete(&mut e, "b", 3, "");
    let cleared = |out: &[Out], topic: &str| {
        out.iter()
            .any(|o| o.topic == topic && o.retain && o.payload.is_empty())
    };
    assert!(cleared(&out, &manifest(&e, "a")), "a's manifest cleared");
    assert!(
        !out.iter()
            .any(|o| o.topic == manifest(&e, "b") && o.payload.is_empty())
    );
    assert_eq!(
        e.status(&RolloutId::new("a").unwrap(), now + 1).unwrap(),
        a,
        "a's record stays"
    );
    // A narrower rollout does not supersede the whole-fleet one.
    let out = complete(&mut e, "c", 4, "hw=sim");
    assert!(!cleared(&out, &manifest(&e, "b")));
    // Half a manifest lifetime later only b and c are re-signed.
    let later = now + settings(1).manifest_ttl.as_secs();
    let out = e.tick(later).unwrap();
    let signed = |out: &[Out], r: &str| {
        out.iter()
            .any(|o| o.topic == manifest(&e, r) && !o.payload.is_empty())
    };
    assert!(signed(&out, "b") && signed(&out, "c") && !signed(&out, "a"));
    e.flush().unwrap();
    // A restart republishes b and c, not a.
    let (e, out) = start(later);
    assert!(signed(&out, "b") && signed(&out, "c") && !signed(&out, "a"));
    drop(e);
}

/// Hello and Report travel on different topics; MQTT orders only within a topic./// Hello and Report travel on different topics; MQTT orders only within a topic./// Hello and Report travel on different topics; MQTT orders only within a topic.
/// A Hello processed before an older Report must not make that Report a replay.
#[test]
fn engine_hello_and_report_sequences_are_independent() {
    let mut t = T::new();
    t.send(
        topic_hello(0),
        &hello(0, &key(0), 1, Some(TOKEN), "plant-7"),
    );
    let rel = release(2, "2.0.0");
    t.command(create_cmd("r", &rel, &["100%"], json!({})));
    // The device sent report seq 5 then hello seq 6; the hello arrives first.
    t.send(
        topic_hello(0),
        &hello(0, &key(0), 6, Some(TOKEN), "plant-7"),
    );
    t.send(
        topic_report(0),
        &report(0, &key(0), 5, "r", rel.id(), Phase::Committed, 0),
    );
    assert_eq!(t.rejected("replayed"), 0);
    assert_eq!(t.healthy("r"), 1);
}

/// One batch through `pipeline` (several threads) and `handle_checked`.
fn send_chunk(t: &mut T, msgs: &[(String, Vec<u8>)], threads: usize, batch: bool) -> Vec<bool> {
    let refs: Vec<(&str, &[u8])> = msgs.iter().map(|(t, p)| (t.as_str(), &p[..])).collect();
    let (parsed, plans) = t.e.plan_checks(&refs);
    let mut parsed = parsed.into_iter();
    let mut used = Vec::new();
    let mut units = 0;
    let now = t.now;
    pipeline(plans, now, threads, batch, 4, |first, checked| {
        assert_eq!(first, used.len(), "units arrive in order");
        units += 1;
        let n = checked.len();
        for (((_, payload), topic), pre) in refs[first..]
            .iter()
            .zip(parsed.by_ref().take(n))
            .zip(checked)
        {
            used.push(!matches!(pre, Precheck::None));
            t.e.handle_parsed(topic, payload, ReplyTo::default(), now, pre)?;
        }
        Ok::<(), EngineError>(())
    })
    .unwrap();
    assert_eq!(used.len(), msgs.len());
    assert_eq!(
        units > 1,
        threads > 1,
        "several threads check the batch in units"
    );
    used
}

// Signatures checked on other threads must not change a single decision: the
// same chunk, one message at a time and prechecked on 4 threads, ends in the
// same counters, registry and rollout state. The chunk has the cases where a
// precheck goes stale inside the chunk (a device enrolled earlier in it; a
// second Hello for it under another key, self-signed and "valid" when checked).
#[test]
fn engine_prechecked_chunk_decides_exactly_like_one_at_a_time() {
    let rel = release(2, "2.0.0");
    let id = rel.id();
    let setup = |t: &mut T| {
        for i in 0..20 {
            t.send(
                topic_hello(i),
                &hello(i, &key(i), 1, Some(TOKEN), "plant-7"),
            );
        }
        let r = t.command(create_cmd("r", &rel, &["100%"], json!({})));
        assert_eq!(r["ok"], true, "{r}");
    };
    // First a report whose signature is bad under the right key: the batch
    // holding it fails and is checked again one by one.
    let mut bad_sig = report(8, &key(8), 3, "r", id, Phase::Committed, 0);
    if let Some(b) = bad_sig.last_mut() {
        *b ^= 1;
    }
    let mut chunk: Vec<(String, Vec<u8>)> = vec![(topic_report(8), bad_sig)];
    for i in 0..20 {
        chunk.push((
            topic_report(i),
            report(i, &key(i), 2, "r", id, Phase::Committed, 0),
        ));
    }
    // New device 30 enrolls and reports in the same chunk; an impostor's
    // self-signed Hello for it follows.
    chunk.push((
        topic_hello(30),
        hello(30, &key(30), 1, Some(TOKEN), "plant-7"),
    ));
    chunk.push((
        topic_report(30),
        report(30, &key(30), 2, "r", id, Phase::Committed, 0),
    ));
    chunk.push((
        topic_hello(30),
        hello(30, &key(31), 2, Some(TOKEN), "plant-7"),
    ));
    // Replay inside the chunk, forgery, expiry, unknown device, garbage.
    chunk.push((
        topic_report(3),
        report(3, &key(3), 2, "r", id, Phase::Committed, 0),
    ));
    chunk.push((
        topic_report(4),
        report(4, &key(5), 3, "r", id, Phase::Committed, 0),
    ));
    let now = unix_now();
    chunk.push((
        topic_report(6),
        report(6, &key(6), 3, "r", id, Phase::Committed, now - 1),
    ));
    chunk.push((
        topic_report(40),
        report(40, &key(40), 2, "r", id, Phase::Committed, 0),
    ));
    chunk.push((topic_report(7), b"\x01garbage".to_vec()));

    let mut one = T::new();
    setup(&mut one);
    for (topic, payload) in &chunk {
        one.send(topic.clone(), payload);
    }
    // One thread: the chunk's reports in one signature batch; four: in four;
    // and one by one (`--strict-signatures`).
    for (threads, batch) in [(1, true), (4, true), (4, false)] {
        let mut many = T::new();
        setup(&mut many);
        let used = send_chunk(&mut many, &chunk, threads, batch);
        assert!(
            used[..21].iter().all(|u| *u),
            "known devices' reports were prechecked"
        );
        same_decisions(&one, &many);
    }
}

fn same_decisions(one: &T, many: &T) {
    assert_eq!(many.e.counters.reports, one.e.counters.reports);
    assert_eq!(many.e.counters.hellos, one.e.counters.hellos);
    assert_eq!(many.e.counters.rejected, one.e.counters.rejected);
    assert_eq!(many.healthy("r"), one.healthy("r"));
    assert_eq!(many.e.device(&dev(30)).unwrap().key, key(30).public());
    assert_eq!(one.e.device(&dev(30)).unwrap().key, key(30).public());
    assert_eq!(
        many.healthy("r"),
        20,
        "20 known devices; the one enrolled in the chunk came after its wave opened"
    );
    assert!(
        many.rejected("forged") >= 2,
        "a bad signature and a wrong key"
    );
    for reason in [
        "forged",
        "replayed",
        "expired",
        "unknown_device",
        "malformed",
    ] {
        assert!(
            many.rejected(reason) >= 1,
            "{reason}: {:?}",
            many.e.counters.rejected
        );
    }
}

// A precheck counts only with the key the device has when it is applied.
#[test]
fn engine_ignores_a_precheck_made_with_another_key() {
    let mut t = T::new();
    t.send(
        topic_hello(0),
        &hello(0, &key(0), 1, Some(TOKEN), "plant-7"),
    );
    let rel = release(2, "2.0.0");
    let r = t.command(create_cmd("r", &rel, &["100%"], json!({})));
    assert_eq!(r["ok"], true, "{r}");
    // Signed by key 5; "verified" with key 5 by a stale or wrong precheck.
    let forged = report(0, &key(5), 2, "r", rel.id(), Phase::Committed, 0);
    let env = swell_protocol::envelope::UnverifiedEnvelope::parse(&forged).unwrap();
    let pre = Precheck::Report {
        key: key(5).public(),
        result: env.verify::<Report>(&key(5).public(), t.now),
    };
    assert!(matches!(&pre, Precheck::Report { result: Ok(_), .. }));
    t.e.handle_checked(&topic_report(0), &forged, ReplyTo::default(), t.now, pre)
        .unwrap();
    assert_eq!(t.rejected("forged"), 1);
    assert_eq!(t.healthy("r"), 0);
    assert_eq!(t.e.counters.reports, 0);
}

fn note(i: u32, k: &SecretKey, seq: u64, takeovers: u32) -> Vec<u8> {
    let n = SessionNote {
        device: dev(i),
        takeovers,
        last_takeover: unix_now(),
    };
    let stamp = Stamp {
        epoch: 1,
        seq,
        issued_at: unix_now(),
        expires_at: 0,
        audience: Audience::Any,
    };
    seal(k, stamp, &n).unwrap()
}

/// The `devices` command's takeover count for device `i`.
fn takeovers(e: &mut Engine, at: u64, i: u32) -> Value {
    let reply = ask(e, at, br#"{"op":"devices","reply_to":"replies"}"#);
    let id = dev(i).to_string();
    reply["status"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == id.as_str())
        .map_or(Value::Null, |d| d["takeovers"].clone())
}

/// A device's agent says how often its connection was taken over (a protocol
/// 2 session note on its report topic): kept per device for `devices` and
/// counted for `/metrics`, with the checks of a report (signature, topic,
/// replay, enrollment); a count below the last one is a new agent start.
#[test]
fn engine_counts_takeovers_its_devices_report() {
    let store = Arc::new(MemoryStore::new());
    let now = unix_now();
    let mut e = Engine::start(settings(1), store, now).unwrap().0;
    enroll(&mut e, now, 0);
    enroll(&mut e, now, 1);
    assert_eq!(takeovers(&mut e, now, 0), json!(0));

    deliver(&mut e, now, topic_report(0), &note(0, &key(0), 5, 2));
    assert_eq!(takeovers(&mut e, now, 0), json!(2));
    assert_eq!(e.counters.takeovers, 2);
    assert_eq!(e.gauges().taken_over, 1);
    deliver(&mut e, now, topic_report(0), &note(0, &key(0), 6, 3));
    assert_eq!(e.counters.takeovers, 3);

    // Refused like a report would be, and nothing changes.
    let before = e.counters.rejected.clone();
    let refused = [
        ("replayed", note(0, &key(0), 6, 9)),
        ("forged", note(0, &key(1), 7, 9)),
        ("forged", note(1, &key(1), 7, 9)),
    ];
    for (why, bytes) in refused {
        deliver(&mut e, now, topic_report(0), &bytes);
        assert!(
            e.counters.rejected.get(why) > before.get(why),
            "{why}: {:?}",
            e.counters.rejected
        );
    }
    assert_eq!(takeovers(&mut e, now, 0), json!(3));
    assert_eq!(e.counters.takeovers, 3);

    // The agent started again and counts from 1.
    deliver(&mut e, now, topic_report(0), &note(0, &key(0), 8, 1));
    assert_eq!(takeovers(&mut e, now, 0), json!(1));
    assert_eq!(e.counters.takeovers, 4);
    assert_eq!(takeovers(&mut e, now, 1), json!(0));
}

/// OPS-2 at the engine, on the disk store: a signed command accepted before a
/// restart is refused after it (its key's high-water mark of `issued_at` was
/// stored before it took effect), and a fresh one is accepted.
#[test]
fn engine_ops_2_a_signed_command_is_not_accepted_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let op = test_key("operator-0");
    let with_operator = || {
        let mut s = settings(1);
        s.keys.operator_keys = vec![op.public()];
        s.key_list = key_list(&s.keys);
        s
    };
    let now = unix_now();
    let sign = |nonce: &str, at: u64| {
        let text = json!({"op": "fleet", "issued_at": at, "nonce": nonce,
                          "to": "swell/v1/ops/plant-7/cmd", "reply_to": "replies"})
        .to_string();
        let sig = op.sign(swell_coordinator::ops::OPS_DOMAIN, &[text.as_bytes()]);
        json!({"signed": text, "key_id": op.key_id().to_string(), "sig": sig.to_string()})
            .to_string()
    };
    let answer = |e: &mut Engine, at: u64, cmd: &str| ask(e, at, cmd.as_bytes());
    let cmd = sign("n1", now);
    {
        let store = Arc::new(DiskStore::open(&dir.path().join("db")).unwrap());
        let mut e = Engine::start(with_operator(), store, now).unwrap().0;
        let r = answer(&mut e, now, &cmd);
        assert_eq!(r["ok"], true, "{r}");
    }
    // 73 s later, the coordinator started again.
    let store = Arc::new(DiskStore::open(&dir.path().join("db")).unwrap());
    let mut e = Engine::start(with_operator(), store, now + 73).unwrap().0;
    let r = answer(&mut e, now + 73, &cmd);
    assert_eq!(
        (r["ok"].clone(), r["reason"].clone()),
        (json!(false), json!("replayed")),
        "{r}"
    );
    let r = answer(&mut e, now + 73, &sign("n2", now + 70));
    assert_eq!(r["ok"], true, "{r}");
}

/// ENROLL-1: a Hello without a valid enrollment token binds a key only
/// provisionally. A squatter's Hello for a device id leaves it pending; the
/// genuine device's Hello with a valid token (and a lower counter) replaces the
/// squatter's key and enrolls; the squatter is forged from then on.
#[test]
fn engine_enroll_1_a_squatter_cannot_keep_a_device_id() {
    let store = Arc::new(MemoryStore::new());
    let now = unix_now();
    let mut e = Engine::start(settings(1), store, now).unwrap().0;
    let squatter = test_key("squatter");
    deliver(
        &mut e,
        now,
        topic_hello(5),
        &hello(5, &squatter, 50, None, "plant-7"),
    );
    let d = e.device(&dev(5)).unwrap();
    assert_eq!(
        (d.enrollment, d.key),
        (Enrollment::Pending, squatter.public())
    );
    // The pending list shows the key it is pending with.
    let cmd = br#"{"op":"devices","enrollment":"pending","reply_to":"replies"}"#;
    let reply = ask(&mut e, now, cmd);
    assert_eq!(reply["status"]["matched"], 1, "{reply}");
    assert_eq!(
        reply["status"]["devices"][0]["key"],
        squatter.key_id().to_string(),
        "{reply}"
    );
    // A second claimant without a token does not take the pending binding.
    let other = test_key("other");
    deliver(
        &mut e,
        now,
        topic_hello(5),
        &hello(5, &other, 60, None, "plant-7"),
    );
    assert_eq!(e.device(&dev(5)).unwrap().key, squatter.public());
    // The genuine device, with the token.
    deliver(
        &mut e,
        now,
        topic_hello(5),
        &hello(5, &key(5), 1, Some(TOKEN), "plant-7"),
    );
    let d = e.device(&dev(5)).unwrap();
    assert_eq!(
        (d.enrollment, d.key),
        (Enrollment::Approved, key(5).public())
    );
    // Its reports count from its own counter; the squatter is forged now.
    let forged = |e: &Engine| e.counters.rejected.get("forged").copied().unwrap_or(0);
    let before = forged(&e);
    deliver(
        &mut e,
        now,
        topic_hello(5),
        &hello(5, &squatter, 70, None, "plant-7"),
    );
    assert_eq!(forged(&e), before + 1);
    assert_eq!(e.device(&dev(5)).unwrap().key, key(5).public());
    let reports = e.counters.reports;
    let rel = release(2, "2.0.0");
    deliver(
        &mut e,
        now,
        topic_report(5),
        &report(5, &key(5), 2, "none", rel.id(), Phase::Committed, 0),
    );
    assert_eq!(e.counters.reports, reports + 1);
}

/// FRESH-3 at the coordinator: a device's report that its beacon expired with
/// no fresh one (no rollout, rejected for want of a beacon) is counted for
/// `/metrics`; one about a rollout's manifest is a rollout outcome instead.
#[test]
fn engine_fresh_3_counts_devices_that_say_their_beacon_stopped() {
    let store = Arc::new(MemoryStore::new());
    let now = unix_now();
    let mut e = Engine::start(settings(1), store, now).unwrap().0;
    enroll(&mut e, now, 0);
    let frozen = Report {
        device: dev(0),
        rollout: None,
        release: ReleaseId([0; 32]),
        phase: Phase::Rejected(Reason {
            code: reason::NO_FRESH_BEACON,
            detail: "beacon expired at 1".into(),
        }),
        probes: vec![],
        metrics: Metrics::default(),
    };
    let stamp = Stamp {
        epoch: 1,
        seq: 5,
        issued_at: now,
        expires_at: 0,
        audience: Audience::Any,
    };
    deliver(
        &mut e,
        now,
        topic_report(0),
        &seal(&key(0), stamp, &frozen).unwrap(),
    );
    assert_eq!(e.counters.possible_freezes, 1);
    let rel = release(2, "2.0.0");
    let waiting = Phase::Rejected(Reason {
        code: reason::NO_FRESH_BEACON,
        detail: String::new(),
    });
    deliver(
        &mut e,
        now,
        topic_report(0),
        &report(0, &key(0), 6, "r", rel.id(), waiting, 0),
    );
    assert_eq!(e.counters.possible_freezes, 1);
}

/// ENROLL-2: a proof copied off the wire proves nothing for another key or
/// another device id; the Hello never carries the token.
#[test]
fn engine_enroll_2_a_copied_proof_enrolls_no_one_else() {
    let now = unix_now();
    let mut e = Engine::start(settings(1), Arc::new(MemoryStore::new()), now)
        .unwrap()
        .0;
    let genuine = hello(5, &key(5), 1, Some(TOKEN), "plant-7");
    assert!(
        !genuine.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
        "the token travels in clear"
    );
    // The genuine Hello's proof, under a squatter's key for the same id.
    let env = swell_protocol::envelope::UnverifiedEnvelope::parse(&genuine).unwrap();
    let proof = Hello::verify_self_signed(&env, now)
        .unwrap()
        .body
        .enrollment_proof;
    let squatter = test_key("squatter");
    let mut h = Hello::verify_self_signed(&env, now).unwrap().body;
    h.key = squatter.public();
    h.enrollment_proof = proof;
    let stamp = Stamp {
        epoch: 1,
        seq: 9,
        issued_at: now,
        expires_at: 0,
        audience: Audience::Any,
    };
    deliver(
        &mut e,
        now,
        topic_hello(5),
        &seal(&squatter, stamp.clone(), &h).unwrap(),
    );
    assert_eq!(
        e.device(&dev(5)).map(|d| d.enrollment),
        Some(Enrollment::Pending)
    );
    // The same proof for another device id (with the genuine key).
    let mut h6 = Hello::verify_self_signed(&env, now).unwrap().body;
    h6.device = dev(6);
    deliver(
        &mut e,
        now,
        topic_hello(6),
        &seal(&key(5), stamp, &h6).unwrap(),
    );
    assert_eq!(
        e.device(&dev(6)).map(|d| d.enrollment),
        Some(Enrollment::Pending)
    );
    // The genuine Hello enrolls its own device and replaces the squatter.
    deliver(&mut e, now, topic_hello(5), &genuine);
    let d = e.device(&dev(5)).unwrap();
    assert_eq!(
        (d.enrollment, d.key),
        (Enrollment::Approved, key(5).public())
    );
}

/// ENROLL-3: the coordinator answers a Hello on the device's `enrolled`
/// topic, not retained, when the device's `confirmed` is not the truth: a
/// signed confirmation for an approved device that lacks one (also on
/// approval), an empty message for a pending one that thinks it is enrolled;
/// a Hello of an earlier incarnation is answered with the present one's
/// confirmation.
#[test]
fn engine_enroll_3_confirms_enrollment_for_the_key_and_incarnation() {
    let now = unix_now();
    let mut e = Engine::start(settings(1), Arc::new(MemoryStore::new()), now)
        .unwrap()
        .0;
    let confirmation = |out: &[Out], i: u32| -> Option<Enrolled> {
        let o = out
            .iter()
            .find(|o| o.topic == format!("swell/v1/dev/{}/enrolled", dev(i)))?;
        assert!(!o.retain);
        if o.payload.is_empty() {
            return None;
        }
        let env = swell_protocol::envelope::UnverifiedEnvelope::parse(&o.payload).unwrap();
        Some(
            env.verify::<Enrolled>(&test_key("coordinator-0").public(), now)
                .unwrap()
                .body,
        )
    };
    let out = deliver(
        &mut e,
        now,
        topic_hello(1),
        &hello_in(1, &key(1), 7, 1, Some(TOKEN), "plant-7"),
    );
    let c = confirmation(&out, 1).expect("a confirmation");
    assert_eq!(
        (c.device, c.key, c.incarnation),
        (dev(1), key(1).public(), 7)
    );
    let out = deliver(
        &mut e,
        now,
        topic_hello(2),
        &hello(2, &key(2), 1, None, "plant-7"),
    );
    assert!(
        !out.iter().any(|o| o.topic.ends_with("/enrolled")),
        "pending, and it does not think otherwise: nothing to say"
    );
    let cmd = format!(
        r#"{{"op":"approve","device":"{}","reply_to":"replies"}}"#,
        dev(2)
    );
    let topic = e.topics().ops_cmd(e.fleet());
    let out = deliver(&mut e, now, topic, cmd.as_bytes());
    let c = confirmation(&out, 2).expect("a confirmation on approval");
    assert_eq!((c.key, c.incarnation), (key(2).public(), 1));
    // An earlier incarnation's Hello (a trust state rebuilt with a clock
    // behind): refused, and answered with where to go on from.
    let out = deliver(
        &mut e,
        now,
        topic_hello(1),
        &hello_in(1, &key(1), 3, 1, Some(TOKEN), "plant-7"),
    );
    assert_eq!(confirmation(&out, 1).map(|c| c.incarnation), Some(7));
    assert_eq!(
        e.counters.rejected.get("stale_incarnation").copied(),
        Some(1)
    );
    // A device that holds its confirmation is not answered (a fleet
    // reconnecting at once); one that believes it is enrolled while it is
    // pending is told it is not.
    let confirmed = |i: u32, seq: u64| {
        let env_bytes = hello_in(i, &key(i), 1, seq, None, "plant-7");
        let env = swell_protocol::envelope::UnverifiedEnvelope::parse(&env_bytes).unwrap();
        let mut h = Hello::verify_self_signed(&env, now).unwrap().body;
        h.confirmed = true;
        let stamp = Stamp {
            epoch: 1,
            seq,
            issued_at: now,
            expires_at: 0,
            audience: Audience::Any,
        };
        seal(&key(i), stamp, &h).unwrap()
    };
    let out = deliver(&mut e, now, topic_hello(2), &confirmed(2, 5));
    assert!(
        !out.iter().any(|o| o.topic.ends_with("/enrolled")),
        "{out:?}"
    );
    deliver(
        &mut e,
        now,
        topic_hello(4),
        &hello(4, &key(4), 1, None, "plant-7"),
    );
    let out = deliver(&mut e, now, topic_hello(4), &confirmed(4, 2));
    assert!(
        out.iter()
            .any(|o| o.topic.ends_with(&format!("{}/enrolled", dev(4))) && o.payload.is_empty())
    );
}

/// STATE-3: a device whose trust state was rebuilt starts a new incarnation
/// with its counter at 1. With a valid proof it is admitted again at once,
/// with fresh floors, and its reports (its `store_rebuilt` report first)
/// count; messages of its earlier incarnation are refused as stale, also
/// after a restart (stored reports of the earlier incarnation are no floor).
#[test]
fn engine_state_3_a_rebuilt_device_is_readmitted_with_fresh_floors() {
    let dir = tempfile::tempdir().unwrap();
    let open = |now: u64| {
        let store = Arc::new(DiskStore::open(&dir.path().join("db")).unwrap());
        Engine::start(settings(1), store, now).unwrap().0
    };
    let now = unix_now();
    let k = key(1);
    let rel = release(2, "2.0.0");
    let stale = |e: &Engine| {
        e.counters
            .rejected
            .get("stale_incarnation")
            .copied()
            .unwrap_or(0)
    };
    let old_report = report_in(1, &k, 100, 28, "r", rel.id(), Phase::Committed, 0);
    {
        let mut e = open(now);
        deliver(
            &mut e,
            now,
            topic_hello(1),
            &hello_in(1, &k, 100, 27, Some(TOKEN), "plant-7"),
        );
        create(&mut e, now, "r", &rel, &["100%"], json!({"bake": "1h"}));
        deliver(&mut e, now, topic_report(1), &old_report);
        assert_eq!(e.counters.reports, 1);
        // The trust file is lost: incarnation 200, counter from 1.
        deliver(
            &mut e,
            now,
            topic_hello(1),
            &hello_in(1, &k, 200, 1, Some(TOKEN), "plant-7"),
        );
        assert_eq!(e.counters.new_incarnations, 1);
        let d = e.device(&dev(1)).unwrap();
        assert_eq!((d.enrollment, d.incarnation), (Enrollment::Approved, 200));
        let rebuilt = Phase::Failed(Reason {
            code: reason::STORE_REBUILT,
            detail: "trust file rebuilt".into(),
        });
        deliver(
            &mut e,
            now,
            topic_report(1),
            &report_in(1, &k, 200, 2, "r", rel.id(), rebuilt, 0),
        );
        assert_eq!(e.counters.reports, 2, "its store_rebuilt report arrives");
        deliver(
            &mut e,
            now,
            topic_report(1),
            &report_in(1, &k, 200, 3, "r", rel.id(), Phase::Committed, 0),
        );
        assert_eq!(e.counters.reports, 3);
        // The earlier life, replayed: its Hello and its reports.
        deliver(&mut e, now, topic_report(1), &old_report);
        deliver(
            &mut e,
            now,
            topic_report(1),
            &report_in(1, &k, 100, 29, "r", rel.id(), Phase::Committed, 0),
        );
        deliver(
            &mut e,
            now,
            topic_hello(1),
            &hello_in(1, &k, 100, 30, Some(TOKEN), "plant-7"),
        );
        assert_eq!(stale(&e), 3);
        assert_eq!(e.counters.reports, 3);
        e.flush().unwrap();
    }
    let mut e = open(now);
    assert_eq!(e.device(&dev(1)).unwrap().last_seq, 3);
    deliver(
        &mut e,
        now,
        topic_report(1),
        &report_in(1, &k, 200, 4, "r", rel.id(), Phase::Committed, 0),
    );
    assert_eq!(
        e.counters.reports, 1,
        "the old incarnation's seq 28 is no floor"
    );
}

/// STATE-3 without a proof (a fleet that enrolls by approval): the new
/// incarnation waits for an operator; until then its reports are refused.
#[test]
fn engine_state_3_without_a_proof_a_new_incarnation_waits_for_approval() {
    let now = unix_now();
    let mut e = Engine::start(settings(1), Arc::new(MemoryStore::new()), now)
        .unwrap()
        .0;
    let k = key(3);
    deliver(
        &mut e,
        now,
        topic_hello(3),
        &hello_in(3, &k, 10, 40, None, "plant-7"),
    );
    let cmd = format!(
        r#"{{"op":"approve","device":"{}","reply_to":"replies"}}"#,
        dev(3)
    );
    assert_eq!(ask(&mut e, now, cmd.as_bytes())["ok"], true);
    deliver(
        &mut e,
        now,
        topic_hello(3),
        &hello_in(3, &k, 11, 1, None, "plant-7"),
    );
    assert_eq!(
        e.device(&dev(3)).map(|d| (d.enrollment, d.incarnation)),
        Some((Enrollment::Pending, 11))
    );
    let rel = release(2, "2.0.0");
    deliver(
        &mut e,
        now,
        topic_report(3),
        &report_in(3, &k, 11, 2, "none", rel.id(), Phase::Committed, 0),
    );
    assert_eq!(e.counters.reports, 0);
    assert_eq!(ask(&mut e, now, cmd.as_bytes())["ok"], true);
    deliver(
        &mut e,
        now,
        topic_report(3),
        &report_in(3, &k, 11, 3, "none", rel.id(), Phase::Committed, 0),
    );
    assert_eq!(e.counters.reports, 1);
}

/// An agent of protocol 1 or 2 meeting this coordinator hears why it is not
/// heard: a signed `Unsupported` on its `desired` topic, once a minute at most.
#[test]
fn engine_answers_an_older_agent_with_unsupported() {
    let now = unix_now();
    let mut e = Engine::start(settings(1), Arc::new(MemoryStore::new()), now)
        .unwrap()
        .0;
    let golden = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../protocol/tests/golden/v1/hello.bin"),
    )
    .unwrap();
    let topic = "swell/v1/dev/rpi-0042/hello".to_string();
    let out = deliver(&mut e, now, topic.clone(), &golden);
    let answer = out
        .iter()
        .find(|o| o.topic == "swell/v1/dev/rpi-0042/desired")
        .expect("an answer");
    assert!(!answer.retain);
    let env = swell_protocol::envelope::UnverifiedEnvelope::parse(&answer.payload).unwrap();
    let u = env
        .verify::<Unsupported>(&test_key("coordinator-0").public(), now)
        .unwrap()
        .body;
    assert_eq!((u.kind, u.proto, u.proto_min, u.proto_max), (4, 1, 3, 3));
    assert_eq!(e.counters.rejected.get("unsupported").copied(), Some(1));
    assert!(deliver(&mut e, now + 30, topic.clone(), &golden).is_empty());
    assert!(!deliver(&mut e, now + 61, topic, &golden).is_empty());
}

/// ENROLL-4: a squatter's pending binding is removed by `reject` (the genuine
/// device's id is free again), `reject` with `pending` purges every pending
/// device (a flood of fresh ids no longer blocks approval for good), a device
/// a rollout counts is not removed, and the removal survives a restart and
/// the store's fold.
#[test]
fn engine_enroll_4_pending_devices_are_rejected_and_purged() {
    let dir = tempfile::tempdir().unwrap();
    let open = |now: u64| {
        let store = Arc::new(DiskStore::open(&dir.path().join("db")).unwrap());
        Engine::start(settings(1), store, now).unwrap().0
    };
    let now = unix_now();
    let squatter = test_key("squatter");
    {
        let mut e = open(now);
        deliver(
            &mut e,
            now,
            topic_hello(5),
            &hello(5, &squatter, 50, None, "plant-7"),
        );
        for i in 100..140 {
            deliver(
                &mut e,
                now,
                topic_hello(i),
                &hello(i, &key(i), 1, None, "plant-7"),
            );
        }
        assert_eq!(e.gauges().pending, 41);
        // Another key named: refused, nothing removed.
        let cmd = format!(
            r#"{{"op":"reject","device":"{}","key":"{}","reply_to":"replies"}}"#,
            dev(5),
            key(5).key_id()
        );
        assert_eq!(ask(&mut e, now, cmd.as_bytes())["reason"], "key_mismatch");
        let cmd = format!(
            r#"{{"op":"reject","device":"{}","key":"{}","reply_to":"replies"}}"#,
            dev(5),
            squatter.key_id()
        );
        let topic = e.topics().ops_cmd(e.fleet());
        let out = deliver(&mut e, now, topic, cmd.as_bytes());
        let reply: Value =
            serde_json::from_slice(&out.iter().find(|o| o.topic == "replies").unwrap().payload)
                .unwrap();
        assert_eq!(reply["ok"], true, "{reply}");
        assert_eq!(reply["status"]["removed"], json!([dev(5).to_string()]));
        // Its enrollment confirmation, if it had one, is withdrawn.
        assert!(
            out.iter()
                .any(|o| o.topic == format!("swell/v1/dev/{}/enrolled", dev(5))
                    && !o.retain
                    && o.payload.is_empty())
        );
        assert!(e.device(&dev(5)).is_none());
        assert_eq!(e.counters.devices_rejected, 1);
        // An approved device a rollout counts stays.
        enroll(&mut e, now, 1);
        let rel = release(2, "2.0.0");
        create(&mut e, now, "r", &rel, &["100%"], json!({"bake": "1h"}));
        let cmd = format!(
            r#"{{"op":"reject","device":"{}","reply_to":"replies"}}"#,
            dev(1)
        );
        assert_eq!(ask(&mut e, now, cmd.as_bytes())["reason"], "in_rollout");
        // The flood, purged at once.
        let r = ask(
            &mut e,
            now,
            br#"{"op":"reject","pending":true,"reply_to":"replies"}"#,
        );
        assert_eq!(r["status"]["removed"].as_array().unwrap().len(), 40, "{r}");
        assert_eq!(e.gauges().pending, 0);
        // The genuine device takes its id with the token.
        deliver(
            &mut e,
            now,
            topic_hello(5),
            &hello(5, &key(5), 1, Some(TOKEN), "plant-7"),
        );
        assert_eq!(
            e.device(&dev(5)).map(|d| (d.enrollment, d.key)),
            Some((Enrollment::Approved, key(5).public()))
        );
    }
    // Across a restart (the fold drops the tombstones), twice.
    for _ in 0..2 {
        let e = open(now);
        assert_eq!(e.gauges().pending, 0);
        assert_eq!(e.gauges().approved + e.gauges().pending, 2);
        assert!(e.device(&dev(120)).is_none());
        assert_eq!(e.device(&dev(5)).map(|d| d.key), Some(key(5).public()));
    }
}

/// ENROLL-4: pending devices silent for `pending_expiry` are removed by the
/// engine's tick; approved devices and recent pending ones stay.
#[test]
fn engine_enroll_4_pending_devices_expire() {
    let now = unix_now();
    let mut s = settings(1);
    s.pending_expiry = std::time::Duration::from_secs(3_600);
    let mut e = Engine::start(s, Arc::new(MemoryStore::new()), now)
        .unwrap()
        .0;
    deliver(
        &mut e,
        now,
        topic_hello(7),
        &hello(7, &key(7), 1, None, "plant-7"),
    );
    enroll(&mut e, now, 8);
    deliver(
        &mut e,
        now + 3_000,
        topic_hello(9),
        &hello(9, &key(9), 1, None, "plant-7"),
    );
    e.tick(now + 3_000).unwrap();
    assert_eq!(e.gauges().pending, 2);
    let out = e.tick(now + 3_700).unwrap();
    assert!(e.device(&dev(7)).is_none(), "silent for more than an hour");
    assert!(e.device(&dev(8)).is_some() && e.device(&dev(9)).is_some());
    assert_eq!(e.counters.pending_expired, 1);
    assert!(
        out.iter()
            .any(|o| o.topic.ends_with(&format!("{}/enrolled", dev(7))))
    );
}
