//! The agent and the simulator are one device: a real `swell-agent` process
//! (slots installer, real probes) and a simulated device (`swell_agent::sim`,
//! simulated installer) run the same `DeviceCore`, so the same messages give
//! the same reports. Both get the same manifests from the same coordinator
//! stand-in: first before any beacon (held, and said so), then with beacons
//! (installed and committed), then a release whose probes fail on both
//! (rolled back).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::sync::Arc;
use std::time::Duration;
use swell_agent::sim::{self, SimConfig};
use swell_protocol::messages::ManifestState;
use swell_protocol::topics::Topics;
use swell_protocol::{DeviceId, ReleaseId};

fn program(version: &str) -> Vec<u8> {
    format!("#!/bin/sh\n# app {version}\nexec sleep 60\n").into_bytes()
}

/// (phase, reason code) of every report of `device` for `rollout`.
fn reports(control: &Control, device: &str, rollout: &str) -> Vec<(String, Option<u16>)> {
    control
        .reports_of(device)
        .into_iter()
        .filter(|s| s.rollout.as_deref() == Some(rollout))
        .map(|s| (s.phase, s.code))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_simulator_report_the_same_for_the_same_messages() {
    let broker = Broker::start();
    let files = ArtifactServer::start().await;
    let control = Arc::new(Control::start(&broker).await);
    control.publish_keys().await;
    let dir = tempfile::tempdir().unwrap();

    // The agent: healthy while its bundle is not marked bad.
    let mut spec = broker.agent_spec("dev-1").await;
    spec.probes = format!(
        "[[probes]]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"! grep -q BAD {}/state/slots/current/artifact-0\"]\n",
        dir.path().display()
    );
    let agent = AgentProc::start(&spec, dir.path());

    // The simulated device: the same verdict on the same releases.
    let v2 = program("2.0");
    let mut v3 = program("3.0");
    v3.extend_from_slice(b"# BAD\n");
    let r2 = release(2, "2.0", &v2, &files.put("v2", v2.clone(), Mode::Normal));
    let r3 = release(3, "3.0", &v3, &files.put("v3", v3.clone(), Mode::Normal));
    let bad = r3.id();
    let fleet_sim = sim::start(SimConfig {
        host: "127.0.0.1".into(),
        port: broker.port,
        fleet: fleet(),
        topics: Topics::default(),
        keys: Control::key_list_body(),
        devices: 1,
        connections: 1,
        prefix: "sim-".into(),
        seed: 7,
        enrollment_token: "t".into(),
        labels: Arc::new(|_| vec![]),
        hardware: HW.into(),
        outcome: Arc::new(move |_: &DeviceId, r: &ReleaseId| *r != bad),
        initial: None,
        probation: Duration::from_secs(1),
        work: Duration::ZERO,
        fetch_concurrency: 1,
        credentials: Some(broker.inner.login(swell_broker::Role::Gateway)),
    })
    .await
    .unwrap();
    let sim_dev = "sim-00000";
    control.wait_hello("dev-1", 20).await;
    control.wait_hello(sim_dev, 20).await;

    // No beacon yet: both hold the manifest and say why, then install once
    // beacons come.
    control
        .publish_manifest("r-v2", control.manifest("r-v2", &r2, ManifestState::Active))
        .await;
    for d in ["dev-1", sim_dev] {
        control.wait_phase(d, "r-v2", "rejected", 20).await;
    }
    control.start_beacons();
    for d in ["dev-1", sim_dev] {
        control
            .wait_phase_or(d, "r-v2", "committed", 30, &agent.log_text())
            .await;
    }
    let a = reports(&control, "dev-1", "r-v2");
    assert_eq!(a, reports(&control, sim_dev, "r-v2"));
    assert_eq!(
        a.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
        [
            "rejected",
            "downloading",
            "downloaded",
            "installing",
            "probation",
            "committed"
        ]
    );

    // A release whose probes fail: both roll back, for the same reason.
    control
        .publish_manifest("r-v3", control.manifest("r-v3", &r3, ManifestState::Active))
        .await;
    for d in ["dev-1", sim_dev] {
        control
            .wait_phase_or(d, "r-v3", "rolled_back", 30, &agent.log_text())
            .await;
    }
    let a = reports(&control, "dev-1", "r-v3");
    assert_eq!(a, reports(&control, sim_dev, "r-v3"));
    assert_eq!(
        a.last(),
        Some(&(
            "rolled_back".to_string(),
            Some(swell_protocol::messages::reason::PROBE_FAILED)
        ))
    );
    fleet_sim.stop().await;
}
