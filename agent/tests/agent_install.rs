//! The real `swell-agent` process against a real broker and a real HTTP server:
//! the happy path with the slots backend, rollback on a failing probe, and every
//! refusal reported with its reason and nothing installed.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use swell_protocol::DeviceId;
use swell_protocol::messages::{DeviceDirective, ManifestState, reason};

/// A bundle that is also the supervised program: it runs until killed.
fn program(version: &str) -> Vec<u8> {
    format!("#!/bin/sh\n# app {version}\nexec sleep 60\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_installs_with_slots_then_rolls_back_a_failing_release() {
    let broker = Broker::start();
    let files = ArtifactServer::start().await;
    let control = Control::start(&broker).await;
    control.publish_keys().await;
    control.start_beacons();
    let dir = tempfile::tempdir().unwrap();
    let mut spec = broker.agent_spec("dev-1").await;
    spec.backend
        .push_str("[install.slots]\nrun = [\"artifact-0\"]\n");
    // Healthy while the supervised program runs and its bundle is not marked bad.
    spec.probes = format!(
        "[[probes]]\nkind = \"process\"\n[[probes]]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"! grep -q BAD {}/state/slots/current/artifact-0\"]\n",
        dir.path().display()
    );
    let mut agent = AgentProc::start(&spec, dir.path());
    control.wait_hello("dev-1", 20).await;

    // v2: verify, download, switch, probation, commit.
    let v2 = program("2.0");
    let url = files.put("v2", v2.clone(), Mode::Normal);
    let r2 = release(2, "2.0", &v2, &url);
    control
        .publish_manifest("r-v2", control.manifest("r-v2", &r2, ManifestState::Active))
        .await;
    agent
        .phase(&control, "dev-1", "r-v2", "committed", 30)
        .await;
    if control.phases("dev-1", "r-v2")[0] == "rejected" {
        eprintln!("AGENTLOG\n{}", agent.log_text());
    }
    assert_eq!(
        control.phases("dev-1", "r-v2"),
        [
            "downloading",
            "downloaded",
            "installing",
            "probation",
            "committed"
        ]
    );
    assert_eq!(
        agent.active_slot_release().as_deref(),
        Some(release_hex_id(&r2).as_str())
    );
    assert_eq!(
        std::fs::read(agent.state.join("slots/current/artifact-0")).unwrap(),
        v2
    );
    let s = agent
        .wait_status("running 2.0", 5, |s| s["running"]["version"] == "2.0")
        .await;
    assert_eq!(s["counter_floor"], 2);
    // The blob is stored by digest only.
    let blob = agent
        .state
        .join("blobs/sha256")
        .join(hex::encode(swell_protocol::Digest::sha256(&v2).0));
    assert!(blob.is_file());

    // The same manifest again (a retained re-delivery after reconnect): no second install.
    let seen = agent.status()["counters"]["manifests_evaluated"]
        .as_u64()
        .unwrap();
    control
        .publish_manifest("r-v2", control.manifest("r-v2", &r2, ManifestState::Active))
        .await;
    agent
        .wait_status("the manifest again, evaluated", 10, |s| {
            s["counters"]["manifests_evaluated"].as_u64() > Some(seen)
        })
        .await;
    assert_eq!(control.phases("dev-1", "r-v2").len(), 5);

    // v3 fails its probe in probation: back to v2, rolled_back(probe_failed).
    let mut v3 = program("3.0");
    v3.extend_from_slice(b"# BAD\n");
    let url = files.put("v3", v3.clone(), Mode::Normal);
    let r3 = release(3, "3.0", &v3, &url);
    control
        .publish_manifest("r-v3", control.manifest("r-v3", &r3, ManifestState::Active))
        .await;
    let rb = agent
        .phase(&control, "dev-1", "r-v3", "rolled_back", 30)
        .await;
    assert_eq!(rb.code, Some(reason::PROBE_FAILED));
    assert!(
        !control
            .phases("dev-1", "r-v3")
            .contains(&"committed".to_string())
    );
    assert_eq!(
        agent.active_slot_release().as_deref(),
        Some(release_hex_id(&r2).as_str())
    );
    let s = agent
        .wait_status("running v2 again", 10, |s| {
            s["running"]["version"] == "2.0" && s["job"]["stage"] == "rolled_back"
        })
        .await;
    assert_eq!(s["job"]["stage"], "rolled_back");

    // A counter below the floor is refused before any download.
    let v1 = program("1.5");
    let url = files.put("v1", v1.clone(), Mode::Normal);
    let r1 = release(1, "1.5", &v1, &url);
    control
        .publish_manifest(
            "r-old",
            control.manifest("r-old", &r1, ManifestState::Active),
        )
        .await;
    let rej = agent
        .phase(&control, "dev-1", "r-old", "rejected", 10)
        .await;
    assert_eq!(rej.code, Some(reason::COUNTER_TOO_LOW));
    assert!(files.requests_for("v1").is_empty());

    // The rollout of v2 rolls back: the device returns to what ran before v2
    // (nothing: the slot link is removed).
    control
        .publish_manifest(
            "r-v2",
            control.manifest("r-v2", &r2, ManifestState::RollingBack),
        )
        .await;
    let rb = agent
        .phase(&control, "dev-1", "r-v2", "rolled_back", 20)
        .await;
    assert_eq!(rb.code, Some(reason::OPERATOR));
    agent.stop();
    assert!(agent.active_slot_release().is_none());

    // Reports carry a strictly increasing counter (MQTT-6).
    let seqs: Vec<u64> = control.reports_of("dev-1").iter().map(|s| s.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // VER-2: wiping the agent's store (journal, outbox, install bookkeeping)
    // does not lower the floor: it lives in the trust file beside it.
    std::fs::remove_dir_all(agent.state.join("db")).unwrap();
    let mut agent = AgentProc::start(&spec, dir.path());
    control
        .publish_manifest(
            "r-old-again",
            control.manifest("r-old-again", &r1, ManifestState::Active),
        )
        .await;
    let rej = agent
        .phase(&control, "dev-1", "r-old-again", "rejected", 20)
        .await;
    assert_eq!(rej.code, Some(reason::COUNTER_TOO_LOW));
    assert!(files.requests_for("v1").is_empty());
    agent.stop();
}

/// Every refusal, each with its reason; nothing is installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_bad_manifests_with_reasons_and_installs_nothing() {
    let broker = Broker::start();
    let files = ArtifactServer::start().await;
    let control = Control::start(&broker).await;
    control.publish_keys().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProc::start(&broker.agent_spec("dev-2").await, dir.path());
    control.wait_hello("dev-2", 20).await;
    let good = program("2.0");

    // No fresh beacon yet: no install starts (FRESH-3).
    let url = files.put("a", good.clone(), Mode::Normal);
    let r = release(2, "2.0", &good, &url);
    control
        .publish_manifest(
            "r-nobeacon",
            control.manifest("r-nobeacon", &r, ManifestState::Active),
        )
        .await;
    let s = agent
        .phase(&control, "dev-2", "r-nobeacon", "rejected", 10)
        .await;
    assert_eq!(s.code, Some(reason::NO_FRESH_BEACON));
    // Held, not dropped: it would install once beacons come. Halt it first.
    control
        .publish_manifest(
            "r-nobeacon",
            control.manifest("r-nobeacon", &r, ManifestState::Halted),
        )
        .await;
    control.start_beacons();
    // A beacon came: the held manifest was evaluated again (and, halted, let go).
    agent
        .wait_status("the held manifest let go", 10, |s| s["held_manifests"] == 0)
        .await;

    // Wrong hardware id.
    let r = release_with(
        2,
        "2.0",
        &good,
        &url,
        "other-board",
        &["release-0", "release-1"],
    );
    control
        .publish_manifest("r-hw", control.manifest("r-hw", &r, ManifestState::Active))
        .await;
    let s = agent.phase(&control, "dev-2", "r-hw", "rejected", 10).await;
    assert_eq!(s.code, Some(reason::HARDWARE_MISMATCH));

    // Signed by the coordinator key alone (no release-key threshold): SIG-1.
    let r = release_with(2, "2.0", &good, &url, HW, &["coordinator-0"]);
    control
        .publish_manifest(
            "r-sig",
            control.manifest("r-sig", &r, ManifestState::Active),
        )
        .await;
    let s = agent
        .phase(&control, "dev-2", "r-sig", "rejected", 10)
        .await;
    assert_eq!(s.code, Some(reason::BAD_SIGNATURE));

    // One release key short of the threshold.
    let r = release_with(2, "2.0", &good, &url, HW, &["release-0"]);
    control
        .publish_manifest(
            "r-thr",
            control.manifest("r-thr", &r, ManifestState::Active),
        )
        .await;
    let s = agent
        .phase(&control, "dev-2", "r-thr", "rejected", 10)
        .await;
    assert_eq!(s.code, Some(reason::BAD_SIGNATURE));

    // Replayed: an older (epoch, seq) for a rollout after a newer one.
    let url_x = files.put("x", good.clone(), Mode::Missing);
    let rx = release(2, "2.0", &good, &url_x);
    let older = control.manifest("r-replay", &rx, ManifestState::Paused);
    let newer = control.manifest("r-replay", &rx, ManifestState::Paused);
    // One topic, one publisher: delivered in this order (MQTT 5 §4.6).
    control.publish_manifest("r-replay", newer).await;
    control.publish_manifest("r-replay", older).await;
    let s = agent
        .phase(&control, "dev-2", "r-replay", "rejected", 10)
        .await;
    assert_eq!(s.code, Some(reason::REPLAYED));

    // Expired, and signed by an unknown key: no rollout can be trusted from them,
    // so they are counted and logged rather than reported.
    // Five refusals so far: no beacon, hardware, two signatures, replay.
    let before = 5;
    agent
        .wait_status("five refusals counted", 10, |s| {
            s["counters"]["rejected_manifests"].as_u64() == Some(before)
        })
        .await;
    control
        .publish_manifest("r-exp", control.expired_manifest("r-exp", &r))
        .await;
    control
        .publish_manifest(
            "r-unk",
            control.manifest_signed("r-unk", &r, ManifestState::Active, "intruder", 600),
        )
        .await;
    control
        .client
        .publish(
            control
                .topics
                .manifest(&fleet(), &swell_protocol::RolloutId::new("r-junk").unwrap()),
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            vec![0xff; 300],
        )
        .await
        .unwrap();
    agent
        .wait_status("three more refusals counted", 10, |s| {
            s["counters"]["rejected_manifests"].as_u64() == Some(before + 3)
        })
        .await;
    let log = agent.log_text();
    assert!(log.contains("expired"), "{log}");

    // A directive for another device on this device's topic (MQTT-3).
    control
        .publish_directive(
            "dev-2",
            &DeviceDirective {
                device: DeviceId::new("dev-9").unwrap(),
                pin: None,
                exclude: true,
                force_rollback: None,
            },
        )
        .await;
    agent
        .wait_status("directive refused", 10, |s| {
            s["counters"]["rejected_directives"] == 1
        })
        .await;

    // Downloads that go wrong: digest mismatch, length overrun, unlisted (404).
    // Same length, other bytes.
    let wrong: Vec<u8> = good.iter().map(|b| b ^ 1).collect();
    let url = files.put("wrong", wrong, Mode::Normal);
    let r = release(2, "2.0", &good, &url);
    control
        .publish_manifest(
            "r-digest",
            control.manifest("r-digest", &r, ManifestState::Active),
        )
        .await;
    let s = agent
        .phase(&control, "dev-2", "r-digest", "failed", 20)
        .await;
    assert_eq!(s.code, Some(reason::DIGEST_MISMATCH));

    let good3 = program("3.0");
    let url = files.put("long", good3.clone(), Mode::Overrun(5000));
    let r = release(3, "3.0", &good3, &url);
    control
        .publish_manifest(
            "r-long",
            control.manifest("r-long", &r, ManifestState::Active),
        )
        .await;
    let s = agent.phase(&control, "dev-2", "r-long", "failed", 20).await;
    assert_eq!(s.code, Some(reason::LENGTH_MISMATCH));

    let good4 = program("4.0");
    let url = files.put("gone", good4.clone(), Mode::Missing);
    let r = release(4, "4.0", &good4, &url);
    control
        .publish_manifest(
            "r-404",
            control.manifest("r-404", &r, ManifestState::Active),
        )
        .await;
    let s = agent.phase(&control, "dev-2", "r-404", "failed", 20).await;
    assert_eq!(s.code, Some(reason::DOWNLOAD_FAILED));

    // Nothing was installed and nothing half-downloaded is kept.
    assert!(agent.active_slot_release().is_none());
    assert!(agent.status()["running"].is_null());
    let blobs: Vec<_> = std::fs::read_dir(agent.state.join("blobs/sha256"))
        .unwrap()
        .collect();
    assert!(blobs.is_empty(), "{blobs:?}");
    for phase in ["committed", "probation", "installing"] {
        assert!(
            !control.reports_of("dev-2").iter().any(|s| s.phase == phase),
            "nothing may reach {phase}"
        );
    }
}

/// The key list arriving after the beacon and a manifest (retained messages of
/// different subscriptions come in any order on the embedded broker): both are
/// kept until the key list is accepted, then checked, and the install goes
/// ahead at once, with no refusal for want of a beacon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_checks_the_beacon_and_manifests_that_came_before_the_key_list() {
    let broker = Broker::start();
    let files = ArtifactServer::start().await;
    let control = Control::start(&broker).await;
    let dir = tempfile::tempdir().unwrap();
    let v2 = program("2.0");
    let url = files.put("v2", v2.clone(), Mode::Normal);
    let r2 = release(2, "2.0", &v2, &url);
    // One beacon only: a later one would hide a beacon that was lost.
    control.beacon().await;
    control
        .publish_manifest("r-v2", control.manifest("r-v2", &r2, ManifestState::Active))
        .await;
    let agent = AgentProc::start(&broker.agent_spec("dev-3").await, dir.path());
    agent
        .wait_status(
            "beacon, manifest and enrollment confirmation waiting for a key list",
            20,
            |s| s["waiting_for_key_list"] == 3 && s["key_list_version"].is_null(),
        )
        .await;
    control.publish_keys().await;
    agent
        .phase(&control, "dev-3", "r-v2", "probation", 30)
        .await;
    // Commit needs a coordinator message after activation (INST-2).
    control.start_beacons();
    agent
        .phase(&control, "dev-3", "r-v2", "committed", 30)
        .await;
    assert_eq!(
        control.phases("dev-3", "r-v2"),
        [
            "downloading",
            "downloaded",
            "installing",
            "probation",
            "committed"
        ]
    );
    let s = agent
        .wait_status("nothing left waiting", 5, |s| {
            s["waiting_for_key_list"] == 0
        })
        .await;
    assert_eq!(s["counters"]["dropped_before_keys"], 0);
}
