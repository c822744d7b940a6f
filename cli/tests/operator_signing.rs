//! Operator-signed commands from the CLI: a coordinator whose key list names an
//! operator key refuses unsigned commands and commands signed by anyone else,
//! and accepts `--operator-key`.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};
use std::time::Duration;
use swell_coordinator::assemble::Coordinator;
use swell_coordinator::engine::Settings;
use swell_coordinator::keyfile::{Role, read_public};
use swell_coordinator::server::{LoopConfig, unix_now};
use swell_mqtt::MqttConfig;
use swell_protocol::FleetId;
use swell_protocol::messages::KeyList;
use swell_protocol::testkeys::test_key;
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::topics::Topics;

/// The operator's login (user, password file) for the broker.
static LOGIN: std::sync::OnceLock<(String, std::path::PathBuf)> = std::sync::OnceLock::new();

fn swell(dir: &std::path::Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_swell"));
    cmd.current_dir(dir).args(args);
    if let Some((user, file)) = LOGIN.get() {
        cmd.env("SWELL_USERNAME", user)
            .env("SWELL_PASSWORD_FILE", file);
    }
    cmd.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_signs_commands_with_the_operator_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    for (role, name) in [
        ("operator", "op"),
        ("operator", "other"),
        ("release", "rel"),
    ] {
        let o = swell(&d, &["keys", "gen", role, "--out", &format!("{name}.key")]);
        assert!(o.status.success());
    }
    let (role, op_pub) = read_public(&d.join("op.key.pub")).unwrap();
    assert_eq!(role, Role::Operator);
    let tb = swell_e2e::broker::TestBroker::start();
    let broker = tb.url();
    let (user, password) = tb.login(swell_broker::Role::Operator);
    let _ = LOGIN.set((user, tb.password_file("operator", &password)));
    let kl = KeyList {
        version: 1,
        expires_at: unix_now() + 3_600,
        roots: vec![test_key("root-0").public()],
        root_threshold: 1,
        release_keys: vec![test_key("release-0").public()],
        release_threshold: 1,
        coordinator_keys: vec![test_key("coordinator-0").public()],
        operator_keys: vec![op_pub],
    };
    let mut signed_kl = ThresholdSigned::new(&kl).unwrap();
    signed_kl.sign(&test_key("root-0")).unwrap();
    let settings = Settings {
        fleet: FleetId::new("f").unwrap(),
        topics: Topics::default(),
        key: test_key("coordinator-0"),
        key_list: signed_kl,
        keys: kl,
        epoch: 1,
        enrollment_tokens: vec![],
        beacon_ttl: Duration::from_secs(3),
        manifest_ttl: Duration::from_secs(3_600),
        pending_expiry: Duration::from_secs(3 * 86_400),
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let (tx, _rx) = tokio::sync::watch::channel(false);
    let mqtt = MqttConfig {
        host: "127.0.0.1".into(),
        port: tb.port,
        client_id: "swell-coordinator-signing-test".into(),
        credentials: Some(tb.login(swell_broker::Role::Coordinator)),
        keep_alive: Duration::from_secs(30),
        max_packet: 256 * 1024,
        persistent: false,
        tls: None,
    };
    let c = cancel.clone();
    let mut coordinator = Coordinator::new(settings, d.to_path_buf(), mqtt);
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

    tokio::task::spawn_blocking(move || {
        let run = |extra: &[&str]| {
            let mut args = vec!["fleet", "--broker", &broker];
            args.extend_from_slice(extra);
            swell(&d, &args)
        };
        let err = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();
        // Unsigned: refused with a reason (the first command also waits for the
        // coordinator to come up).
        let o = run(&["--timeout", "20s"]);
        assert_eq!(o.status.code(), Some(1), "{}", err(&o));
        assert!(err(&o).contains("sign"), "{}", err(&o));
        // Signed by an operator key the key list does not name: forged.
        let o = run(&["--operator-key", "other.key", "--timeout", "5s"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(err(&o).contains("forged"), "{}", err(&o));
        // A release key is not an operator key: refused before sending.
        let o = run(&["--operator-key", "rel.key", "--timeout", "5s"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(err(&o).contains("operator"), "{}", err(&o));
        // The operator key: accepted, and repeated commands (new nonces) too.
        for _ in 0..2 {
            let o = run(&["--operator-key", "op.key", "--timeout", "5s"]);
            assert!(o.status.success(), "{}", err(&o));
        }
        // OPS-1: a signed create, a whole release inside the signed text.
        let rel = swell_protocol::fixtures::release(
            2,
            "2.0.0",
            b"app",
            "",
            "sim",
            &["release-0"],
            unix_now(),
        );
        std::fs::write(d.join("release.bin"), rel.encode().unwrap()).unwrap();
        std::fs::write(
            d.join("spec.json"),
            r#"{"rollout":"signed-1","release":"release.bin","waves":["100%"]}"#,
        )
        .unwrap();
        let o = swell(
            &d,
            &[
                "rollout",
                "create",
                "spec.json",
                "--broker",
                &broker,
                "--operator-key",
                "op.key",
                "--timeout",
                "10s",
            ],
        );
        assert!(o.status.success(), "{}", err(&o));
    })
    .await
    .unwrap();
    cancel.cancel();
}
