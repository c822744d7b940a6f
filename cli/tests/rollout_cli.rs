//! `swell rollout …`, `swell fleet`, `swell events` against a real coordinator
//! (in this test process) and simulated devices over the test's broker (the
//! embedded one, or the shipped Mosquitto when required), logged in as an
//! operator.
#![allow(clippy::unwrap_used)]

use serde_json::json;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;
use swell_agent::sim::{self, SimConfig};
use swell_broker::Role;
use swell_coordinator::assemble::Coordinator;
use swell_coordinator::engine::Settings;
use swell_coordinator::server::{LoopConfig, unix_now};
use swell_mqtt::MqttConfig;
use swell_protocol::FleetId;
use swell_protocol::messages::KeyList;
use swell_protocol::testkeys::test_key;
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::topics::Topics;

/// The operator's login (user, password file), as the CLI takes it from the
/// environment.
static LOGIN: std::sync::OnceLock<(String, std::path::PathBuf)> = std::sync::OnceLock::new();

fn swell(args: &[&str], broker: &str) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_swell"));
    cmd.args(args).args(["--broker", broker]);
    if let Some((user, file)) = LOGIN.get() {
        cmd.env("SWELL_USERNAME", user)
            .env("SWELL_PASSWORD_FILE", file);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_rollout_commands_against_a_coordinator() {
    let tb = swell_e2e::broker::TestBroker::start();
    let broker = tb.url();
    let (user, password) = tb.login(Role::Operator);
    let _ = LOGIN.set((user, tb.password_file("operator", &password)));
    let kl = KeyList {
        version: 1,
        expires_at: unix_now() + 3_600,
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
    let fleet = FleetId::new("f").unwrap();
    let settings = Settings {
        fleet: fleet.clone(),
        topics: Topics::default(),
        key: test_key("coordinator-0"),
        key_list: signed_kl,
        keys: kl.clone(),
        epoch: 1,
        enrollment_tokens: vec!["tok".into()],
        beacon_ttl: Duration::from_secs(3),
        manifest_ttl: Duration::from_secs(3_600),
        pending_expiry: Duration::from_secs(3 * 86_400),
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let (tx, _rx) = tokio::sync::watch::channel(false);
    let mqtt = MqttConfig {
        host: "127.0.0.1".into(),
        port: tb.port,
        client_id: "swell-coordinator-cli-test".into(),
        credentials: Some(tb.login(Role::Coordinator)),
        keep_alive: Duration::from_secs(30),
        max_packet: 256 * 1024,
        persistent: false,
        tls: None,
    };
    let c = cancel.clone();
    let mut coordinator = Coordinator::new(settings, dir.path().to_path_buf(), mqtt);
    coordinator.loop_cfg = LoopConfig {
        tick: Duration::from_millis(200),
        beacon_interval: Duration::from_secs(1),
        ..LoopConfig::default()
    };
    let started = coordinator.start(None).unwrap();
    tokio::spawn(async move {
        started
            .serve(c, tx, swell_coordinator::server::Hooks::default())
            .await
            .unwrap();
    });
    let fleet_sim = sim::start(SimConfig {
        host: "127.0.0.1".into(),
        port: tb.port,
        fleet,
        topics: Topics::default(),
        keys: kl,
        devices: 20,
        connections: 2,
        prefix: "d-".into(),
        seed: 3,
        enrollment_token: "tok".into(),
        labels: Arc::new(|i| {
            vec![swell_protocol::cohort::Label {
                key: "ring".into(),
                value: if i % 2 == 0 { "a" } else { "b" }.into(),
            }]
        }),
        hardware: "sim".into(),
        outcome: Arc::new(|_, _| true),
        initial: None,
        probation: Duration::from_secs(1),
        work: Duration::from_millis(50),
        fetch_concurrency: 0,
        credentials: Some(tb.login(Role::Gateway)),
    })
    .await
    .unwrap();

    // Wait (by asking) until all 20 devices are enrolled.
    let b = broker.clone();
    tokio::task::spawn_blocking(move || {
        for _ in 0..100 {
            let o = swell(&["fleet", "-o", "json"], &b);
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            if v["status"]["approved"] == 20 {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("devices did not enroll");
    })
    .await
    .unwrap();

    let rel =
        swell_protocol::fixtures::release(1, "1.0", b"a", "", "sim", &["release-0"], unix_now());
    let rel_path = dir.path().join("release.bin");
    std::fs::write(&rel_path, rel.encode().unwrap()).unwrap();
    let spec_path = dir.path().join("spec.json");
    let spec = json!({"rollout": "cli-1", "release": rel_path.display().to_string(), "waves": ["50%", "100%"], "bake": "1s", "install_timeout": "20s"});
    std::fs::write(&spec_path, spec.to_string()).unwrap();

    let b = broker.clone();
    let spec_s = spec_path.display().to_string();
    tokio::task::spawn_blocking(move || {
        let o = swell(&["rollout", "create", &spec_s], &b);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{out}{err}");
        assert!(out.contains("rollout cli-1 created"), "{out}");
        // Waits for the end: 0 = completed.
        let o = swell(
            &[
                "rollout",
                "status",
                "cli-1",
                "--wait",
                "--wait-timeout",
                "60s",
            ],
            &b,
        );
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{out}{err}");
        assert!(out.contains("phase completed"), "{out}");
        // Refused: one line, exit 1.
        let o = swell(&["rollout", "pause", "cli-1"], &b);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            err.starts_with("error: ") && err.lines().count() == 1,
            "{err}"
        );
        let o = swell(&["rollout", "abort", "no-such"], &b);
        assert_eq!(o.status.code(), Some(1));
        // Inventory and events.
        let o = swell(&["fleet"], &b);
        let (out, _) = text(&o);
        assert!(out.contains("devices 20  approved 20"), "{out}");
        let o = swell(&["rollout", "status", "-o", "json"], &b);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["status"][0]["rollout"], "cli-1");
        // Devices with filters, and the inventory per label.
        let o = swell(&["fleet", "devices", "--limit", "5"], &b);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{err}");
        assert_eq!(
            out.lines().filter(|l| l.starts_with("d-")).count(),
            5,
            "{out}"
        );
        assert!(out.contains("(5 of 20 shown"), "{out}");
        let o = swell(
            &["fleet", "devices", "-l", "ring=a", "--online", "-o", "json"],
            &b,
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["status"]["matched"], 10, "{v}");
        assert_eq!(v["status"]["devices"][0]["device"], "d-00000");
        let o = swell(&["fleet", "devices", "--release", "none", "-o", "json"], &b);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["status"]["matched"], 0, "all run the release now: {v}");
        let o = swell(
            &["fleet", "devices", "-l", "ring in (", "--timeout", "3s"],
            &b,
        );
        assert_eq!(o.status.code(), Some(1), "a bad selector is refused");
        let o = swell(&["fleet"], &b);
        let (out, _) = text(&o);
        assert!(out.contains("ring=a") && out.contains("ring=b"), "{out}");
        let o = swell(&["rollout", "status", "cli-1", "-o", "yaml"], &b);
        let (out, _) = text(&o);
        assert!(out.contains("phase: completed"), "{out}");
        // The list, and the live view of a finished rollout (exit 0 at once).
        let o = swell(&["rollout", "list"], &b);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{err}");
        let row = out
            .lines()
            .find(|l| l.starts_with("cli-1"))
            .unwrap_or_default();
        assert!(row.contains("completed") && row.contains("20"), "{out}");
        let o = swell(&["rollout", "watch", "cli-1"], &b);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{out}{err}");
        assert!(out.contains("cli-1 completed"), "{out}");
        assert!(out.contains("[####################]"), "{out}");
        let o = swell(&["rollout", "watch", "no-such"], &b);
        assert_eq!(o.status.code(), Some(1));
        // Enrollment (ENROLL-4): nobody pending; a device the rollout counts
        // is not removed; a purge of no pending device is a plain success.
        let o = swell(&["device", "pending", "-o", "json"], &b);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["status"]["matched"], 0, "{v}");
        let o = swell(&["device", "reject", "d-00001"], &b);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{out}{err}");
        assert!(err.contains("takes part in rollout cli-1"), "{err}");
        let o = swell(&["device", "reject", "--pending", "-o", "json"], &b);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["status"]["removed"], json!([]), "{v}");
        let o = swell(&["device", "reject"], &b);
        assert_eq!(
            o.status.code(),
            Some(2),
            "a device or --pending is required"
        );
    })
    .await
    .unwrap();

    // No coordinator there: a clear line, not a hang or a panic.
    let dead = format!("mqtt://127.0.0.1:{}", swell_e2e::mosquitto::free_port());
    let o = tokio::task::spawn_blocking(move || {
        swell(&["rollout", "status", "x", "--timeout", "1s"], &dead)
    })
    .await
    .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.starts_with("error: ") && !err.contains("panicked"),
        "{err}"
    );
    fleet_sim.stop().await;
    cancel.cancel();
}
