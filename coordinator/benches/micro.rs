//! Micro-benchmarks of the coordinator's hot paths (criterion):
//! `cargo bench -p swell-coordinator --bench micro`. Results and method:
//! BENCHMARKS.md. Every figure is per item; `one_by_one_512` is 512 distinct
//! devices' envelopes verified one at a time, `batch_N` the first N of them
//! through one batch equation (`UnverifiedEnvelope::verify_all`).
#![allow(clippy::unwrap_used, missing_docs)]

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use swell_coordinator::engine::{Engine, ReplyTo, Settings};
use swell_coordinator::rollout::health_gate::{self, WaveCounts};
use swell_coordinator::rollout::spec::GateSpec;
use swell_coordinator::store::DiskStore;
use swell_protocol::cohort::{self, Label, Selector};
use swell_protocol::envelope::{Audience, Stamp, UnverifiedEnvelope, seal};
use swell_protocol::messages::*;
use swell_protocol::testkeys::test_key;
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::topics::Topics;
use swell_protocol::{DeviceId, FleetId, RolloutId, SecretKey};

const NOW: u64 = 1_800_000_000;

fn stamp(seq: u64) -> Stamp {
    Stamp {
        epoch: 1,
        seq,
        issued_at: NOW,
        expires_at: 0,
        audience: Audience::Any,
    }
}

fn report(device: &DeviceId, rollout: &RolloutId, release: swell_protocol::ReleaseId) -> Report {
    Report {
        device: device.clone(),
        rollout: Some(rollout.clone()),
        release,
        phase: Phase::Committed,
        probes: vec![],
        metrics: Metrics::default(),
    }
}

fn signed_release() -> ThresholdSigned {
    swell_protocol::fixtures::release(1, "1.0.0", b"a", "", "sim", &["release-0"], NOW)
}

fn verify(c: &mut Criterion) {
    let rollout = RolloutId::new("fw-2").unwrap();
    let rel = signed_release().id();
    let devs: Vec<(DeviceId, SecretKey)> = (0..512)
        .map(|i| {
            (
                DeviceId::new(format!("dev-{i:05}")).unwrap(),
                test_key(&format!("bench-{i}")),
            )
        })
        .collect();
    let envs: Vec<Vec<u8>> = devs
        .iter()
        .map(|(d, k)| seal(k, stamp(2), &report(d, &rollout, rel)).unwrap())
        .collect();
    let pks: Vec<_> = devs.iter().map(|(_, k)| k.public()).collect();
    let mut g = c.benchmark_group("envelope_verify");
    g.throughput(Throughput::Elements(1));
    g.bench_function("single", |b| {
        b.iter(|| {
            let env = UnverifiedEnvelope::parse(black_box(&envs[0])).unwrap();
            env.verify::<Report>(&pks[0], NOW).unwrap()
        })
    });
    // The baseline for the batches: the same envelopes checked one by one.
    g.throughput(Throughput::Elements(512));
    g.bench_function("one_by_one_512", |b| {
        b.iter(|| {
            for (e, pk) in envs.iter().zip(&pks) {
                let env = UnverifiedEnvelope::parse(black_box(e)).unwrap();
                black_box(env.verify::<Report>(pk, NOW).unwrap());
            }
        })
    });
    // Batch equations of the sizes the server makes: a chunk of 64 reports
    // split over 1, 2 or 4 verify threads; 512 for the trend.
    for n in [16usize, 32, 64, 512] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("batch_{n}"), |b| {
            b.iter(|| {
                let parsed: Vec<_> = envs[..n]
                    .iter()
                    .map(|e| UnverifiedEnvelope::parse(black_box(e)).unwrap())
                    .collect();
                let items: Vec<_> = parsed.iter().zip(&pks).collect();
                let out = UnverifiedEnvelope::verify_all::<Report>(&items, NOW);
                assert!(out.iter().all(Result::is_ok));
                black_box(out)
            })
        });
    }
    g.finish();
    // Decoding alone: what a report costs before (and besides) its signature.
    let body = swell_protocol::codec::encode("report", &report(&devs[0].0, &rollout, rel)).unwrap();
    c.bench_function("report_decode", |b| {
        b.iter(|| {
            swell_protocol::codec::decode_exact::<Report>("report", black_box(&body), 4096).unwrap()
        })
    });
}

fn cohorts(c: &mut Criterion) {
    let release = swell_protocol::ReleaseId::of_body(b"fw-2");
    let device = DeviceId::new("dev-00042").unwrap();
    c.bench_function("bucket", |b| {
        b.iter(|| cohort::bucket(black_box(&release), black_box(&device)))
    });
    let sel = Selector::parse("hw=rpi4,region in (eu,us),ring notin (canary),!quarantine").unwrap();
    let labels: Vec<Label> = [
        ("hw", "rpi4"),
        ("region", "us"),
        ("ring", "beta"),
        ("site", "x"),
    ]
    .iter()
    .map(|(k, v)| Label {
        key: (*k).into(),
        value: (*v).into(),
    })
    .collect();
    c.bench_function("selector_match", |b| {
        b.iter(|| black_box(&sel).matches(black_box(&labels)))
    });
}

fn gate(c: &mut Criterion) {
    let spec = GateSpec {
        min_devices: 10,
        success_threshold_ppm: 950_000,
        max_failure_rate_ppm: 50_000,
        bake_secs: 0,
        install_timeout_secs: 600,
        critical_reasons: vec![],
        ..GateSpec::default()
    };
    let wave = WaveCounts {
        planned: 10_000,
        population: 10_000,
        healthy: 9_700,
        failed: 100,
        in_progress: 150,
        critical: 0,
        ..WaveCounts::default()
    };
    let cumulative = WaveCounts {
        planned: 11_000,
        population: 11_000,
        healthy: 10_650,
        failed: 110,
        in_progress: 150,
        critical: 0,
        ..WaveCounts::default()
    };
    c.bench_function("gate_evaluate", |b| {
        b.iter(|| health_gate::evaluate(black_box(&spec), &wave, &cumulative, false))
    });
}

/// One report through the engine: parse, verify, replay floor, registry,
/// tracker, journal record (flushed every 512 like the server loop).
fn registry(c: &mut Criterion) {
    let fleet = FleetId::new("bench").unwrap();
    let kl = KeyList {
        version: 1,
        expires_at: NOW + 3600,
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
    let (mut engine, _) = Engine::start(settings, store, NOW).unwrap();
    let t = Topics::default();
    let key = test_key("bench-0");
    let device = DeviceId::new("dev-00000").unwrap();
    let hello = Hello {
        device: device.clone(),
        fleet: fleet.clone(),
        key: key.public(),
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
            &device,
            &fleet,
            &key.public(),
        )),
        confirmed: false,
    };
    let h = seal(&key, stamp(1), &hello).unwrap();
    engine
        .handle(&t.hello(&device), &h, ReplyTo::default(), NOW)
        .unwrap();
    let rel = signed_release();
    let cmd = json!({"op": "create", "spec": {"rollout": "r", "release": hex::encode(rel.encode().unwrap()), "waves": ["100%"], "bake": "1h"}});
    engine
        .handle(
            &t.ops_cmd(&fleet),
            cmd.to_string().as_bytes(),
            ReplyTo::default(),
            NOW,
        )
        .unwrap();
    let rollout = RolloutId::new("r").unwrap();
    let topic = t.report(&device);
    let mut seq = 1u64;
    let mut n = 0u64;
    c.bench_function("registry_update", |b| {
        b.iter_batched(
            || {
                seq += 1;
                seal(&key, stamp(seq), &report(&device, &rollout, rel.id())).unwrap()
            },
            |env| {
                engine
                    .handle(&topic, &env, ReplyTo::default(), NOW)
                    .unwrap();
                n += 1;
                if n.is_multiple_of(512) {
                    engine.flush().unwrap();
                }
            },
            BatchSize::SmallInput,
        )
    });
    // Every report sent was taken (none when a filter skipped this bench).
    assert_eq!(engine.counters.reports, n);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = verify, cohorts, gate, registry
}
criterion_main!(benches);
