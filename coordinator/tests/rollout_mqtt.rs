//! Rollouts end to end over a real broker (embedded rumqttd, or Mosquitto when
//! `SWELL_TEST_MOSQUITTO=required`): scripted devices sign real reports, an
//! operator drives the coordinator with JSON commands and reads its replies.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;
use swell_coordinator::rollout::state::PauseReason;
use swell_coordinator::status::RolloutStatus;
use swell_protocol::RolloutId;
use swell_protocol::messages::ManifestState;

fn phase(s: &RolloutStatus) -> &str {
    &s.phase
}

fn paused_by(s: &RolloutStatus) -> Option<&PauseReason> {
    s.paused_by.as_ref()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_mqtt_healthy_rollout_completes() {
    let b = TestBroker::start();
    let _c = start_coordinator(&b, settings(1)).await;
    let devs = Devices::start(&b, 60, |_| (vec![("hw", "rev3".into())], Behavior::Healthy)).await;
    let mut op = Operator::start(&b).await;
    op.wait_enrolled(60).await;
    let rel = release(2, "2.0.0");
    let r = op
        .command(create_cmd(
            "fw-2",
            &rel,
            &["10%", "50%", "100%"],
            json!({"canary": ["dev-0000", "dev-0001"], "selector": "hw=rev3"}),
        ))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["status"]["members"], 60, "{r}");
    let s = op
        .wait_status("fw-2", 60, |s| phase(s) == "completed")
        .await;
    assert_eq!(s.opened_totals().0, 60, "{s:#?}");
    assert_eq!(s.opened_totals().1, 0);
    // What devices saw: seq strictly up, open_below never down, ends open to all.
    devs.wait_manifest("fw-2", 10, |_, ob| ob == u64::MAX).await;
    let ms: Vec<_> = devs
        .manifests()
        .into_iter()
        .filter(|m| m.0.as_str() == "fw-2")
        .collect();
    assert!(ms.len() >= 4, "{ms:?}");
    for w in ms.windows(2) {
        assert!(
            (w[1].1, w[1].2) > (w[0].1, w[0].2),
            "manifest (epoch, seq) went back: {w:?}"
        );
        assert!(w[1].3 >= w[0].3, "open_below shrank");
    }
    assert_eq!(ms.last().unwrap().3, u64::MAX);
    let opened: Vec<u64> = op
        .events
        .iter()
        .filter(|e| e["decision"] == "open_wave")
        .map(|e| e["wave"].as_u64().unwrap())
        .collect();
    assert_eq!(opened, vec![0, 1, 2, 3], "each wave opened once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_mqtt_breach_pauses() {
    let b = TestBroker::start();
    let _c = start_coordinator(&b, settings(1)).await;
    let devs = Devices::start(&b, 40, |i| {
        (
            vec![],
            if i % 3 == 0 {
                Behavior::Fails
            } else {
                Behavior::Healthy
            },
        )
    })
    .await;
    let mut op = Operator::start(&b).await;
    op.wait_enrolled(40).await;
    let r = op
        .command(create_cmd(
            "bad",
            &release(3, "3.0.0"),
            &["50%", "100%"],
            json!({}),
        ))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let s = op.wait_status("bad", 30, |s| phase(s) == "paused").await;
    assert!(
        matches!(paused_by(&s), Some(PauseReason::Breach(_))),
        "{s:#?}"
    );
    assert_eq!(s.wave, 0);
    assert!(s.halt_reason.as_deref().unwrap().contains("failed"));
    // Devices see it paused, and no manifest ever opened wave 1.
    devs.wait_manifest("bad", 10, |st, _| *st == ManifestState::Paused)
        .await;
    let ms: Vec<_> = devs
        .manifests()
        .into_iter()
        .filter(|m| m.0.as_str() == "bad")
        .collect();
    assert!(
        ms.iter()
            .all(|m| m.3 <= swell_protocol::cohort::open_below(500_000))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_mqtt_breach_with_rollback_policy() {
    let b = TestBroker::start();
    let _c = start_coordinator(&b, settings(1)).await;
    let devs = Devices::start(&b, 40, |i| {
        (
            vec![],
            if i % 2 == 0 {
                Behavior::Fails
            } else {
                Behavior::Healthy
            },
        )
    })
    .await;
    let mut op = Operator::start(&b).await;
    op.wait_enrolled(40).await;
    let r = op
        .command(create_cmd(
            "rb",
            &release(3, "3.0.0"),
            &["50%", "100%"],
            json!({"policy": "rollback"}),
        ))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let s = op
        .wait_status("rb", 30, |s| phase(s) == "rolled_back")
        .await;
    assert!(s.halt_reason.is_some());
    assert!(
        devs.manifests()
            .iter()
            .any(|m| m.0.as_str() == "rb" && m.4 == ManifestState::RollingBack)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_mqtt_silent_devices_fail_after_timeout() {
    let b = TestBroker::start();
    let _c = start_coordinator(&b, settings(1)).await;
    let _devs = Devices::start(&b, 40, |i| {
        (
            vec![],
            if i % 4 == 0 {
                Behavior::Silent
            } else {
                Behavior::Healthy
            },
        )
    })
    .await;
    let mut op = Operator::start(&b).await;
    op.wait_enrolled(40).await;
    let r = op
        .command(create_cmd(
            "quiet",
            &release(2, "2.0.0"),
            &["100%"],
            json!({"install_timeout": "2s"}),
        ))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let s = op.wait_status("quiet", 30, |s| phase(s) == "paused").await;
    assert!(
        s.halt_reason.as_deref().unwrap().contains("silent"),
        "{s:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_mqtt_late_failure_in_earlier_wave_halts() {
    let b = TestBroker::start();
    let _c = start_coordinator(&b, settings(1)).await;
    let devs = Devices::start(&b, 60, |_| (vec![], Behavior::Healthy)).await;
    let mut op = Operator::start(&b).await;
    op.wait_enrolled(60).await;
    let rel = release(2, "2.0.0");
    let r = op
        .command(create_cmd(
            "late",
            &rel,
            &["30%", "60%", "100%"],
            json!({"manual_gates": [1], "max_failure_rate": "5%"}),
        ))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    // Wave 1 passes and waits at its manual gate; then wave-0 devices fail late.
    op.wait_status("late", 30, |s| {
        paused_by(s) == Some(&PauseReason::ManualGate)
    })
    .await;
    let rollout = RolloutId::new("late").unwrap();
    for i in devs.in_wave(&rel.id(), &[300_000, 600_000, 1_000_000], 0) {
        devs.fail_now(i, &rollout, rel.id()).await;
    }
    let r = op
        .command(json!({"op": "promote", "rollout": "late"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let s = op
        .wait_status("late", 30, |s| {
            matches!(paused_by(s), Some(PauseReason::Breach(_)))
        })
        .await;
    assert!(s.opened_totals().1 > 0, "{s:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_mqtt_manual_gate_pause_resume_retry_abort() {
    let b = TestBroker::start();
    let _c = start_coordinator(&b, settings(1)).await;
    let devs = Devices::start(&b, 30, |_| (vec![], Behavior::Healthy)).await;
    let mut op = Operator::start(&b).await;
    op.wait_enrolled(30).await;
    let r = op
        .command(create_cmd(
            "gated",
            &release(2, "2.0.0"),
            &["20%", "100%"],
            json!({"manual_gates": [0]}),
        ))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    op.wait_status("gated", 30, |s| {
        paused_by(s) == Some(&PauseReason::ManualGate)
    })
    .await;
    let r = op
        .command(json!({"op": "resume", "rollout": "gated"}))
        .await;
    assert_eq!(r["ok"], false);
    assert!(r["message"].as_str().unwrap().contains("promote"), "{r}");
    let r = op
        .command(json!({"op": "promote", "rollout": "gated"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    op.wait_status("gated", 30, |s| phase(s) == "completed")
        .await;
    let r = op.command(json!({"op": "pause", "rollout": "gated"})).await;
    assert_eq!(r["ok"], false, "completed rollouts cannot be paused: {r}");

    // A second rollout on the same devices: pause, resume, retry after failures, abort.
    devs.set_behavior(|i| {
        if i % 2 == 0 {
            Behavior::Fails
        } else {
            Behavior::Healthy
        }
    });
    let r = op
        .command(create_cmd(
            "second",
            &release(3, "3.0.0"),
            &["100%"],
            json!({}),
        ))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    op.wait_status("second", 30, |s| {
        matches!(paused_by(s), Some(PauseReason::Breach(_)))
    })
    .await;
    devs.set_behavior(|_| Behavior::Healthy);
    let r = op
        .command(json!({"op": "retry", "rollout": "second"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["status"]["retry"], 1);
    op.wait_status("second", 30, |s| phase(s) == "completed")
        .await;
    let r = op
        .command(json!({"op": "abort", "rollout": "second"}))
        .await;
    assert_eq!(r["ok"], false, "{r}");

    let r = op
        .command(create_cmd(
            "third",
            &release(4, "4.0.0"),
            &["100%"],
            json!({"start_at": "2099-01-01T00:00:00Z"}),
        ))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let s = op.wait_status("third", 10, |s| s.waiting.is_some()).await;
    assert!(
        s.waiting.as_deref().unwrap().contains("scheduled to start"),
        "{s:#?}"
    );
    let r = op.command(json!({"op": "pause", "rollout": "third"})).await;
    assert_eq!(r["ok"], true, "{r}");
    let r = op.command(json!({"op": "abort", "rollout": "third"})).await;
    assert_eq!(r["ok"], true, "{r}");
    op.wait_status("third", 10, |s| phase(s) == "aborted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_mqtt_concurrent_disjoint_rollouts_and_overlap_refused() {
    let b = TestBroker::start();
    let _c = start_coordinator(&b, settings(1)).await;
    let _devs = Devices::start(&b, 40, |i| {
        (
            vec![("region", if i % 2 == 0 { "eu".into() } else { "us".into() })],
            Behavior::Healthy,
        )
    })
    .await;
    let mut op = Operator::start(&b).await;
    op.wait_enrolled(40).await;
    let r = op
        .command(create_cmd(
            "eu",
            &release(2, "2.0.0"),
            &["50%", "100%"],
            json!({"selector": "region=eu", "bake": "2s"}),
        ))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["status"]["members"], 20);
    let r = op
        .command(create_cmd(
            "everyone",
            &release(2, "2.0.0"),
            &["100%"],
            json!({}),
        ))
        .await;
    assert_eq!(r["ok"], false);
    assert_eq!(r["reason"], "overlap", "{r}");
    let r = op
        .command(create_cmd(
            "us",
            &release(2, "2.0.0"),
            &["50%", "100%"],
            json!({"selector": "region in (us)"}),
        ))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let eu = op.wait_status("eu", 30, |s| phase(s) == "completed").await;
    let us = op.wait_status("us", 30, |s| phase(s) == "completed").await;
    assert_eq!(eu.opened_totals().0, 20);
    assert_eq!(us.opened_totals().0, 20);
    // Once they are done, an overlapping rollout is fine.
    let r = op
        .command(create_cmd(
            "everyone",
            &release(5, "5.0.0"),
            &["100%"],
            json!({}),
        ))
        .await;
    assert_eq!(r["ok"], true, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_mqtt_command_rejections_change_nothing() {
    let b = TestBroker::start();
    let _c = start_coordinator(&b, settings(1)).await;
    let _devs = Devices::start(&b, 5, |_| (vec![], Behavior::Healthy)).await;
    let mut op = Operator::start(&b).await;
    op.wait_enrolled(5).await;
    op.command_raw(b"{not json").await;
    let r = op.next_reply().await;
    assert_eq!(r["ok"], false);
    assert_eq!(r["reason"], "malformed");
    let cases = [
        (json!({"op": "pause", "rollout": "nope"}), "unknown_rollout"),
        (
            json!({"op": "pause", "rollout": "x", "extra": 1}),
            "invalid",
        ),
        (json!({"op": "frobnicate"}), "invalid"),
        (
            create_cmd("r1", &release(2, "2"), &["10%", "5%"], json!({})),
            "invalid",
        ),
        (
            create_cmd(
                "r1",
                &release(2, "2"),
                &["100%"],
                json!({"selector": "a in ("}),
            ),
            "invalid",
        ),
        (
            create_cmd(
                "r1",
                &release(2, "2"),
                &["100%"],
                json!({"max_failure_rate": "150%"}),
            ),
            "invalid",
        ),
        (
            json!({"op": "approve", "device": "never-seen"}),
            "unknown_device",
        ),
    ];
    for (cmd, reason) in cases {
        let r = op.command(cmd.clone()).await;
        assert_eq!(r["ok"], false, "{cmd}: {r}");
        assert_eq!(r["reason"], reason, "{cmd}: {r}");
        assert!(r["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // A release signed by only one release key (threshold 2) is refused.
    let mut weak =
        swell_protocol::threshold::ThresholdSigned::new(&swell_protocol::messages::Release {
            counter: 9,
            version: "9".into(),
            created_at: 0,
            artifacts: vec![swell_protocol::messages::Artifact {
                name: "x".into(),
                kind: swell_protocol::messages::ArtifactKind::Bundle,
                digest: swell_protocol::Digest::sha256(b"x"),
                length: 1,
                urls: vec![],
            }],
            config: None,
            hardware: vec!["sim".into()],
            exposure: None,
            rollback: None,
        })
        .unwrap();
    weak.sign(&swell_protocol::testkeys::test_key("release-0"))
        .unwrap();
    let r = op
        .command(create_cmd("weak", &weak, &["100%"], json!({})))
        .await;
    assert_eq!(r["reason"], "unsigned", "{r}");
    // Nothing was created.
    let r = op.command(json!({"op": "status"})).await;
    assert_eq!(r["ok"], true);
    assert_eq!(r["status"], json!([]));
}

/// Over a real broker (embedded, or the shipped Mosquitto with
/// `SWELL_TEST_MOSQUITTO=required`): devices refusing a release whose exposure
/// cap or hardware is not for them are counted as not eligible and never as
/// failures; with them a third of the fleet, the rollout still completes on the
/// devices that took it (RO-009).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_mqtt_refusals_do_not_stop_a_rollout() {
    use swell_protocol::messages::reason;
    let b = TestBroker::start();
    let _c = start_coordinator(&b, settings(1)).await;
    let devs = Devices::start(&b, 30, |i| {
        let behavior = match i % 6 {
            0 => Behavior::Refuses(reason::EXPOSURE_CAP),
            1 => Behavior::Refuses(reason::HARDWARE_MISMATCH),
            _ => Behavior::Healthy,
        };
        (vec![], behavior)
    })
    .await;
    let mut op = Operator::start(&b).await;
    op.wait_enrolled(30).await;
    let rel = release(2, "2.0.0");
    let r = op
        .command(create_cmd(
            "refused",
            &rel,
            &["50%", "100%"],
            json!({"max_failure_rate": "5%", "min_breach_sample": 2}),
        ))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let s = op.wait_status("refused", 60, |s| s.finished).await;
    assert_eq!(s.phase, "completed", "{s:#?}");
    let not_eligible: u32 = s.waves.iter().map(|w| w.not_eligible).sum();
    let failed: u32 = s.waves.iter().map(|w| w.failed).sum();
    assert_eq!(
        (s.opened_totals().0, failed, not_eligible),
        (20, 0, 10),
        "{s:#?}"
    );
    drop(devs);
}
