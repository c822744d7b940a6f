//! Quick local figure for the coordinator's report ingest (the full fleet benchmark
//! is `BENCHMARKS.md`'s job): N enrolled devices each send one signed report, fed
//! through the engine (verify, replay check, registry, tracker, journal record) and
//! flushed once per 512 like the server loop does. Printed beside the baseline of
//! the same run: bare signature verification of the same reports.
//!
//! It also prints the engine's memory per device (growth of the resident set):
//! what enrolling the devices added (registry, store writes, sled's page cache)
//! and what one rollout over all of them added (its tracker).
//!
//! `cargo run --release -p swell-coordinator --example ingest_rate -- 20000`
#![allow(clippy::unwrap_used)]

/// Resident bytes of this process (Linux; 0 elsewhere).
fn in_use() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use swell_coordinator::engine::{Engine, ReplyTo, Settings};
use swell_coordinator::precheck;
use swell_coordinator::store::DiskStore;
use swell_protocol::envelope::{Audience, Stamp, UnverifiedEnvelope, seal};
use swell_protocol::messages::*;
use swell_protocol::testkeys::test_key;
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::topics::Topics;
use swell_protocol::{DeviceId, FleetId, RolloutId};

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let fleet = FleetId::new("bench").unwrap();
    let kl = KeyList {
        version: 1,
        expires_at: now + 3600,
        roots: vec![test_key("root-0").public()],
        root_threshold: 1,
        release_keys: vec![test_key("release-0").public()],
        release_threshold: 1,
        coordinator_keys: vec![test_key("coordinator-0").public()],
        operator_keys: vec![],
    };
    let mut signed_kl = ThresholdSigned::new(&kl).unwrap();
    signed_kl.sign(&test_key("root-0")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DiskStore::open(&dir.path().join("db")).unwrap());
    let settings = Settings {
        fleet: fleet.clone(),
        topics: Topics::default(),
        key: test_key("coordinator-0"),
        key_list: signed_kl,
        keys: kl,
        epoch: 1,
        enrollment_tokens: vec!["t".into()],
        beacon_ttl: Duration::from_secs(60),
        manifest_ttl: Duration::from_secs(3600),
        pending_expiry: Duration::from_secs(3 * 86_400),
    };
    let (mut engine, _) = Engine::start(settings, store, now).unwrap();
    let t = Topics::default();
    let keys: Vec<_> = (0..n).map(|i| test_key(&format!("bench-{i}"))).collect();
    let ids: Vec<_> = (0..n)
        .map(|i| DeviceId::new(format!("d{i}")).unwrap())
        .collect();
    let before_enroll = in_use();
    for i in 0..n as usize {
        let h = Hello {
            device: ids[i].clone(),
            fleet: fleet.clone(),
            key: keys[i].public(),
            labels: vec![],
            hardware: "sim".into(),
            agent_version: "b".into(),
            proto_min: 3,
            proto_max: 3,
            boot: 1,
            running: None,
            counter_floor: 0,
            incarnation: 1,
            enrollment_proof: Some(swell_protocol::enroll::prove(
                "t",
                &ids[i],
                &fleet,
                &keys[i].public(),
            )),
            confirmed: false,
        };
        let b = seal(
            &keys[i],
            Stamp {
                epoch: 1,
                seq: 1,
                issued_at: now,
                expires_at: 0,
                audience: Audience::Any,
            },
            &h,
        )
        .unwrap();
        engine
            .handle(&t.hello(&ids[i]), &b, ReplyTo::default(), now)
            .unwrap();
    }
    engine.flush().unwrap();
    let registry_bytes = in_use().saturating_sub(before_enroll);
    let rel = swell_protocol::fixtures::release(1, "1", b"a", "", "sim", &["release-0"], now);
    let cmd = json!({"op": "create", "spec": {"rollout": "r", "release": hex::encode(rel.encode().unwrap()), "waves": ["100%"], "bake": "1h"}});
    engine
        .handle(
            &t.ops_cmd(&fleet),
            cmd.to_string().as_bytes(),
            ReplyTo::default(),
            now,
        )
        .unwrap();
    let tracker_bytes = in_use().saturating_sub(before_enroll + registry_bytes);
    let rollout = RolloutId::new("r").unwrap();
    let sealed = |seq: u64| -> Vec<Vec<u8>> {
        (0..n as usize)
            .map(|i| {
                let r = Report {
                    device: ids[i].clone(),
                    rollout: Some(rollout.clone()),
                    release: rel.id(),
                    phase: Phase::Committed,
                    probes: vec![],
                    metrics: Metrics::default(),
                };
                seal(
                    &keys[i],
                    Stamp {
                        epoch: 1,
                        seq,
                        issued_at: now,
                        expires_at: 0,
                        audience: Audience::Any,
                    },
                    &r,
                )
                .unwrap()
            })
            .collect()
    };
    let reports = sealed(2);
    let again = sealed(3);

    let start = Instant::now();
    for (i, b) in reports.iter().enumerate() {
        let env = UnverifiedEnvelope::parse(b).unwrap();
        env.verify::<Report>(&keys[i].public(), now).unwrap();
    }
    let verify = start.elapsed();

    let start = Instant::now();
    for (i, b) in reports.iter().enumerate() {
        engine
            .handle(&t.report(&ids[i]), b, ReplyTo::default(), now)
            .unwrap();
        if i % 512 == 511 {
            engine.flush().unwrap();
        }
    }
    engine.flush().unwrap();
    let ingest = start.elapsed();

    // The server loop's way: batches of 512, their signatures checked on every
    // core in units of 64 while the engine applies the units already checked;
    // one flush per batch.
    let threads = precheck::default_threads();
    let topics: Vec<String> = ids.iter().map(|d| t.report(d)).collect();
    let start = Instant::now();
    for batch in (0..n as usize).collect::<Vec<_>>().chunks(512) {
        let msgs: Vec<(&str, &[u8])> = batch
            .iter()
            .map(|&i| (topics[i].as_str(), &again[i][..]))
            .collect();
        let (parsed, plans) = engine.plan_checks(&msgs);
        let mut parsed = parsed.into_iter();
        precheck::pipeline(plans, now, threads, true, 64, |first, checked| {
            let n = checked.len();
            for (((_, payload), topic), pre) in msgs[first..]
                .iter()
                .zip(parsed.by_ref().take(n))
                .zip(checked)
            {
                engine.handle_parsed(topic, payload, ReplyTo::default(), now, pre)?;
            }
            Ok::<(), swell_coordinator::engine::EngineError>(())
        })
        .unwrap();
        engine.flush().unwrap();
    }
    engine.flush().unwrap();
    let parallel = start.elapsed();
    assert_eq!(engine.counters.reports, 2 * u64::from(n));
    let status = engine.status(&rollout, now).unwrap();
    assert_eq!(status.waves[0].healthy, n);
    let rate = |d: Duration| f64::from(n) / d.as_secs_f64();
    println!("devices:             {n}");
    println!(
        "baseline verify:     {:>10.0} reports/s (parse + verify_strict only)",
        rate(verify)
    );
    println!(
        "engine ingest:       {:>10.0} reports/s (verify, replay floor, tracker, journal, flush/512)",
        rate(ingest)
    );
    println!(
        "ingest / verify:     {:>10.2}",
        verify.as_secs_f64() / ingest.as_secs_f64()
    );
    println!(
        "prechecked ingest:   {:>10.0} reports/s ({threads} verify threads, pipelined under the engine, batches of 512) = {:.2} x one thread",
        rate(parallel),
        ingest.as_secs_f64() / parallel.as_secs_f64()
    );
    let per = |b: usize| b as f64 / f64::from(n);
    println!(
        "memory per device:   {:>10.0} B enrolled (registry, store, sled cache) + {:.0} B per rollout (tracker, journal)",
        per(registry_bytes),
        per(tracker_bytes)
    );
}
