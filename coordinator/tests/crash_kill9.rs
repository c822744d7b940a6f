//! Crash safety (STATE-4): the real `swell-coordinator` binary is killed with
//! SIGKILL at random points of running rollouts, again and again, and restarted
//! on the same state directory. Afterwards the audit log must be one unbroken
//! chain (no transition lost), every wave must have opened exactly once and in
//! order, and what devices saw must never go backwards.
//!
//! Cycles: `SWELL_CRASH_CYCLES` (default 12; .ci/run sets more, and 200+ runs the
//! full soak). Seed: `SWELL_CRASH_SEED`. And at two chosen points (the binary's
//! `SWELL_COORDINATOR_CRASH_AT` hook): a report is acknowledged only once it is
//! durable (MQTT-4).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use swell_coordinator::keyfile::{PublicFile, Role, SecretFile};
use swell_coordinator::rollout::state::Decision;
use swell_coordinator::store::{DiskStore, Store};
use swell_protocol::RolloutId;
use swell_protocol::testkeys::test_key;

struct Files {
    key: String,
    key_list: String,
    root: String,
}

fn write_files(dir: &Path) -> Files {
    let key = dir.join("coordinator.key");
    std::fs::write(
        &key,
        serde_json::to_string(&SecretFile::new(
            Role::Coordinator,
            &test_key("coordinator-0"),
        ))
        .unwrap(),
    )
    .unwrap();
    let root = dir.join("root.pub");
    std::fs::write(
        &root,
        serde_json::to_string(&PublicFile::new(Role::Root, &test_key("root-0").public())).unwrap(),
    )
    .unwrap();
    let kl = dir.join("keys.bin");
    std::fs::write(&kl, key_list(&key_list_body()).encode().unwrap()).unwrap();
    let s = |p: &Path| p.display().to_string();
    Files {
        key: s(&key),
        key_list: s(&kl),
        root: s(&root),
    }
}

/// Kills the process on drop, so a failing test leaves nothing running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(b: &TestBroker, f: &Files, state: &Path) -> Proc {
    spawn_crashing(b, f, state, None)
}

/// [`spawn`], aborting at `crash_at` (`apply` or `flush`) in its first batch
/// with a device report.
fn spawn_crashing(b: &TestBroker, f: &Files, state: &Path, crash_at: Option<&str>) -> Proc {
    let (user, password) = b.login(swell_broker::Role::Coordinator);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_swell-coordinator"));
    if let Some(at) = crash_at {
        cmd.env("SWELL_COORDINATOR_CRASH_AT", at);
    }
    Proc(
        cmd.args([
            "--broker",
            &b.url(),
            "--username",
            &user,
            "--password",
            &password,
            "--fleet",
            "plant-7",
            "--key",
            &f.key,
            "--key-list",
            &f.key_list,
        ])
        .args([
            "--root-key",
            &f.root,
            "--enrollment-token",
            TOKEN,
            "--tick",
            "100ms",
            "--client-id",
            "swell-coordinator-crash",
        ])
        .arg("--state-dir")
        .arg(state)
        .env(
            "RUST_LOG",
            std::env::var("SWELL_CRASH_LOG").unwrap_or_else(|_| "off".into()),
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap(),
    )
}

/// xorshift: reproducible kill points.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_survives_sigkill_at_random_points() {
    let cycles: u32 = std::env::var("SWELL_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let mut seed: u64 = std::env::var("SWELL_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_1234_abcd_ef01);
    let b = TestBroker::start();
    let dir = tempfile::tempdir().unwrap();
    let files = write_files(dir.path());
    let state = dir.path().join("state");
    let devs = Devices::start(&b, 30, |_| (vec![], Behavior::Healthy)).await;
    let mut op = Operator::start(&b).await;
    let waves = [
        "10%", "20%", "30%", "40%", "50%", "60%", "70%", "80%", "90%", "100%",
    ];
    let mut rollouts: Vec<String> = Vec::new();
    let mut enrolled = false;
    for cycle in 0..cycles {
        let mut child = spawn(&b, &files, &state);
        // Serving: answers a command.
        let r = op.command_when_up(json!({"op": "status"}), 20).await;
        assert_eq!(r["ok"], true, "cycle {cycle}: {r}");
        if !enrolled {
            op.wait_enrolled(30).await;
            enrolled = true;
        }
        let current_done = rollouts
            .last()
            .is_none_or(|id| op.statuses.get(id).is_some_and(|s| s.phase == "completed"));
        if current_done {
            let id = format!("r{}", rollouts.len());
            let r = op
                .command(create_cmd(
                    &id,
                    &release(10 + rollouts.len() as u64, &id),
                    &waves,
                    // A deadline far beyond a restart on a loaded machine:
                    // the downtime after a SIGKILL counts against it, and a
                    // device unfinished at the deadline counts as failed.
                    json!({"bake": "1s", "min_devices": 1, "install_timeout": "60s"}),
                ))
                .await;
            assert_eq!(r["ok"], true, "cycle {cycle}: {r}");
            rollouts.push(id);
        }
        let wait = 50 + next(&mut seed) % 1_200;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        child.0.kill().unwrap(); // SIGKILL
        child.0.wait().unwrap();
    }
    // Last start: let everything finish, then stop it gracefully (SIGTERM).
    let mut child = spawn(&b, &files, &state);
    op.command_when_up(json!({"op": "status"}), 20).await;
    for id in &rollouts {
        op.wait_status(id, 120, |s| s.phase == "completed").await;
    }
    #[cfg(unix)]
    {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.0.id().to_string())
            .status();
    }
    let status = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success() || cfg!(not(unix)),
        "graceful stop: {status}"
    );

    let epoch = std::fs::read_to_string(state.join("epoch")).unwrap();
    assert_eq!(
        epoch.trim(),
        format!("swell-epoch {} {}", cycles + 1, cycles + 1)
    );

    let store = DiskStore::open(&state.join("db")).unwrap();
    for id in &rollouts {
        let log = store
            .decisions(&RolloutId::new(id.as_str()).unwrap())
            .unwrap();
        assert!(!log.is_empty());
        // One unbroken chain: each entry starts where the previous one ended.
        for w in log.windows(2) {
            assert_eq!(
                w[1].before, w[0].after,
                "{id}: a transition is missing between two log entries"
            );
        }
        let opened: Vec<u16> = log
            .iter()
            .flat_map(|e| e.decisions.iter())
            .filter_map(|d| {
                if let Decision::OpenWave { wave, .. } = d {
                    Some(*wave)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(
            opened,
            (0..waves.len() as u16).collect::<Vec<_>>(),
            "{id}: waves opened {opened:?}"
        );
        assert!(
            log.last().unwrap().decisions.contains(&Decision::Complete)
                || log
                    .iter()
                    .any(|e| e.decisions.contains(&Decision::Complete))
        );
        // What devices saw never went backwards.
        let seen: Vec<_> = devs
            .manifests()
            .into_iter()
            .filter(|m| m.0.as_str() == id.as_str())
            .collect();
        for w in seen.windows(2) {
            assert!(
                (w[1].1, w[1].2) >= (w[0].1, w[0].2),
                "{id}: manifest (epoch, seq) went back: {w:?}"
            );
            assert!(w[1].3 >= w[0].3, "{id}: open_below shrank: {w:?}");
        }
    }
    eprintln!(
        "{cycles} SIGKILL cycles, {} rollouts completed",
        rollouts.len()
    );
}

/// MQTT-4 (STATE-1): the coordinator acknowledges a device's report to the
/// broker only once what it changed is durable. Killed after applying the
/// first report but before the flush, it had acknowledged nothing: the report
/// is not on disk, the broker delivers it again to the restarted coordinator,
/// and the device counts. Killed after the flush but before the ack, the
/// report is on disk already, and its delivery again has no second effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_acks_a_report_only_once_it_is_durable() {
    for crash_at in ["apply", "flush"] {
        let b = TestBroker::start();
        let dir = tempfile::tempdir().unwrap();
        let files = write_files(dir.path());
        let state = dir.path().join("state");
        let _devs = Devices::start(&b, 1, |_| (vec![], Behavior::Healthy)).await;
        let mut op = Operator::start(&b).await;
        let mut child = spawn_crashing(&b, &files, &state, Some(crash_at));
        let r = op.command_when_up(json!({"op": "status"}), 20).await;
        assert_eq!(r["ok"], true, "{crash_at}: {r}");
        op.wait_enrolled(1).await;
        let r = op
            .command(create_cmd(
                "m4",
                &release(10, "m4"),
                &["100%"],
                json!({"bake": "0s", "min_devices": 1, "install_timeout": "60s"}),
            ))
            .await;
        assert_eq!(r["ok"], true, "{crash_at}: {r}");
        // The device's first report makes it abort.
        let status = tokio::task::spawn_blocking(move || {
            let until = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(s) = child.0.try_wait().unwrap() {
                    return Some(s);
                }
                if std::time::Instant::now() > until {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .await
        .unwrap();
        assert!(
            status.is_some_and(|s| !s.success()),
            "{crash_at}: the coordinator did not abort: {status:?}"
        );
        let durable = {
            let store = DiskStore::open(&state.join("db")).unwrap();
            let loaded = store.load().unwrap();
            loaded
                .reports
                .iter()
                .any(|(r, d, _)| r.as_str() == "m4" && d.as_str() == "dev-0000")
        };
        assert_eq!(
            durable,
            crash_at == "flush",
            "{crash_at}: the report's durability at the crash"
        );
        // Started again: the report arrives again (it was never acknowledged)
        // and the rollout completes on it.
        let _child = spawn(&b, &files, &state);
        let s = op.wait_status("m4", 60, |s| s.phase == "completed").await;
        assert_eq!(s.opened_totals(), (1, 0), "{crash_at}: {s:?}");
    }
}
