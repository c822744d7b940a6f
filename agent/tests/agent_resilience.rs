//! The real `swell-agent` process when things go wrong: downloads cut mid-way
//! and resumed, a slow server given up on in bounded time, a device offline
//! whose outbox drains in order afterwards (across a SIGKILL), and SIGKILL at
//! every journal state in a loop.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use swell_agent::deployment::Stage;
use swell_e2e::link::Proxy;
use swell_protocol::messages::{ManifestState, reason};

fn bundle(version: &str, size: usize, bad: bool) -> Vec<u8> {
    let mut b = format!("bundle {version}\n").into_bytes();
    if bad {
        b.extend_from_slice(b"BAD\n");
    }
    // Deterministic filler so every version differs.
    let mut x: u32 = version.bytes().map(u32::from).sum::<u32>() | 1;
    while b.len() < size {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        b.push(b'a' + (x % 26) as u8);
    }
    b
}

fn content_probe(dir: &std::path::Path) -> String {
    format!(
        "[[probes]]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"! grep -q BAD {}/state/slots/current/artifact-0\"]\n",
        dir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_resumes_an_interrupted_download_with_range() {
    let broker = Broker::start();
    let files = ArtifactServer::start().await;
    let control = Control::start(&broker).await;
    control.publish_keys().await;
    control.start_beacons();
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProc::start(&broker.agent_spec("dev-r").await, dir.path());
    control.wait_hello("dev-r", 20).await;

    let data = bundle("2.0", 256 * 1024, false);
    let url = files.put("big", data.clone(), Mode::DropOnceAfter(100_000));
    let r = release(2, "2.0", &data, &url);
    control
        .publish_manifest(
            "r-resume",
            control.manifest("r-resume", &r, ManifestState::Active),
        )
        .await;
    agent
        .phase(&control, "dev-r", "r-resume", "committed", 30)
        .await;
    let reqs = files.requests_for("big");
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0], None);
    assert_eq!(
        reqs[1].as_deref(),
        Some("bytes=100000-"),
        "resumed where it stopped"
    );
    assert_eq!(
        std::fs::read(agent.state.join("slots/current/artifact-0")).unwrap(),
        data
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_gives_up_on_a_slow_server_in_bounded_time() {
    let broker = Broker::start();
    let files = ArtifactServer::start().await;
    let control = Control::start(&broker).await;
    control.publish_keys().await;
    control.start_beacons();
    let dir = tempfile::tempdir().unwrap();
    let mut spec = broker.agent_spec("dev-s").await;
    spec.download =
        "[download]\nmin_bytes_per_sec = 5000\nwatchdog = \"1s\"\ndeadline = \"4s\"\n".into();
    let agent = AgentProc::start(&spec, dir.path());
    control.wait_hello("dev-s", 20).await;

    let data = bundle("2.0", 64 * 1024, false);
    let url = files.put("slow", data.clone(), Mode::Slow(500));
    let r = release(2, "2.0", &data, &url);
    let start = Instant::now();
    control
        .publish_manifest(
            "r-slow",
            control.manifest("r-slow", &r, ManifestState::Active),
        )
        .await;
    let s = agent.phase(&control, "dev-s", "r-slow", "failed", 30).await;
    let took = start.elapsed();
    assert_eq!(s.code, Some(reason::SLOW_RETRIEVAL));
    // Bounded by the 4 s deadline (plus one watchdog period and scheduling).
    assert!(took < Duration::from_secs(12), "gave up after {took:?}");
    // It kept resuming rather than starting over.
    assert!(
        files
            .requests_for("slow")
            .iter()
            .skip(1)
            .all(|r| r.is_some())
    );
    assert!(agent.active_slot_release().is_none());
}

/// Offline for a while (and SIGKILLed meanwhile): the reports queued in the
/// outbox arrive in order after the link is back, none lost, none reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_outbox_drains_in_order_after_an_offline_period() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port).await.unwrap();
    let files = ArtifactServer::start().await;
    let control = Control::start(&broker).await;
    control.publish_keys().await;
    control.start_beacons();
    let dir = tempfile::tempdir().unwrap();
    let mut spec = {
        let mut s = broker.agent_spec("dev-o").await;
        s.broker_port = proxy.port;
        s
    };
    spec.heartbeat = "300ms";
    let mut agent = AgentProc::start(&spec, dir.path());
    control.wait_hello("dev-o", 20).await;

    // A download slow enough to still be running when the link goes.
    let data = bundle("2.0", 48 * 1024, false);
    let url = files.put("v2", data.clone(), Mode::Slow(40_000));
    let r = release(2, "2.0", &data, &url);
    control
        .publish_manifest(
            "r-off",
            control.manifest("r-off", &r, ManifestState::Active),
        )
        .await;
    agent
        .phase(&control, "dev-o", "r-off", "downloading", 20)
        .await;
    proxy.set_up(false);
    // Offline: the install goes on, reports and heartbeats pile up.
    agent
        .wait_status("probation while offline", 20, |s| {
            s["job"]["stage"] == "probation" && s["outbox"].as_u64() >= Some(5)
        })
        .await;
    let boot = agent.status()["boot"].as_u64().unwrap();
    agent.kill9();
    agent.spawn();
    let s = agent
        .wait_status("started again", 20, |s| s["boot"].as_u64() > Some(boot))
        .await;
    let queued = s["outbox"].as_u64().unwrap();
    assert!(queued >= 5, "the outbox survived the restart: {queued}");
    assert!(
        !control
            .phases("dev-o", "r-off")
            .contains(&"downloaded".to_string()),
        "nothing got through while offline"
    );
    proxy.set_up(true);
    agent
        .phase(&control, "dev-o", "r-off", "committed", 30)
        .await;
    agent
        .wait_status("outbox drained", 20, |s| s["outbox"] == 0)
        .await;
    assert_eq!(
        control.phases("dev-o", "r-off"),
        [
            "downloading",
            "downloaded",
            "installing",
            "probation",
            "committed"
        ]
    );
    // Every report the agent queued arrived (nothing lost across the outage
    // and the SIGKILL), first arrivals in counter order. Hellos share the
    // counter but are not queued durably, so only reports are counted.
    let log = agent.log_text();
    let queued = queued_report_seqs(&log);
    assert!(
        queued.len() >= 6,
        "the log names the queued reports: {queued:?}"
    );
    let reports: Vec<u64> = control.reports_of("dev-o").iter().map(|s| s.seq).collect();
    assert!(
        reports.windows(2).all(|w| w[0] < w[1]),
        "in order: {reports:?}"
    );
    let arrived: std::collections::BTreeSet<u64> = reports.iter().copied().collect();
    let missing: Vec<u64> = queued.difference(&arrived).copied().collect();
    assert!(
        missing.is_empty(),
        "lost reports {missing:?} of {queued:?}\nlog:\n{log}"
    );
    let hellos: std::collections::BTreeSet<u64> = control
        .hellos
        .lock()
        .unwrap()
        .iter()
        .filter(|(d, _)| d == "dev-o")
        .map(|(_, s)| *s)
        .collect();
    assert!(
        hellos.is_disjoint(&arrived),
        "one counter for hellos and reports: {hellos:?} / {arrived:?}"
    );
}

/// Counters of the reports an agent log says were sealed and queued.
fn queued_report_seqs(log: &str) -> std::collections::BTreeSet<u64> {
    log.lines()
        .filter(|l| l.contains(": report "))
        .filter_map(|l| {
            let rest = &l[l.find(" seq=")? + 5..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// SIGKILL at random points of many installs (every third one fails its probe):
/// after a restart each ends committed-and-healthy or rolled back to the previous
/// release — never a bad release committed, never anything in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_survives_sigkill_at_every_journal_state() {
    let cycles: u64 = std::env::var("SWELL_AGENT_KILL_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let broker = Broker::start();
    let files = ArtifactServer::start().await;
    let control = Control::start(&broker).await;
    control.publish_keys().await;
    control.start_beacons();
    let dir = tempfile::tempdir().unwrap();
    let mut spec = broker.agent_spec("dev-k").await;
    spec.probes = content_probe(dir.path());
    let mut agent = AgentProc::start(&spec, dir.path());
    control.wait_hello("dev-k", 20).await;

    // First, deterministically: die right after journaling each stage (the
    // agent's crash hook aborts the process there), then restart normally.
    let mut good_running: Option<String> = None;
    let stages = [
        ("downloading", false),
        ("installing", false),
        ("probation", false),
        ("committed", false),
        ("installing", true),
        ("probation", true),
        ("rolling_back", true),
    ];
    for (n, (stage, bad)) in stages.into_iter().enumerate() {
        agent.kill9();
        let mut crashing = AgentProc::start_env(
            &spec,
            dir.path(),
            vec![("SWELL_AGENT_ABORT_AFTER".into(), stage.into())],
        );
        let n = n as u64 + 1;
        let version = format!("0.{n}");
        let data = bundle(&version, 24 * 1024, bad);
        let url = files.put(&format!("d{n}"), data.clone(), Mode::Normal);
        let r = release(n, &version, &data, &url);
        let rollout = format!("d-{n}");
        control
            .publish_manifest(
                &rollout,
                control.manifest(&rollout, &r, ManifestState::Active),
            )
            .await;
        let until = Instant::now() + Duration::from_secs(20);
        while crashing.running() {
            assert!(
                Instant::now() < until,
                "never reached {stage}:\n{}",
                crashing.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(crashing.log_text().contains("aborting"), "died in {stage}");
        drop(crashing);
        agent.spawn();
        let s = agent
            .wait_status(&format!("after a crash in {stage}"), 30, |s| {
                s["job"]["rollout"] == rollout.as_str()
                    && ["committed", "rolled_back", "failed"]
                        .contains(&s["job"]["stage"].as_str().unwrap_or(""))
            })
            .await;
        let end = s["job"]["stage"].as_str().unwrap();
        control.clear_manifest(&rollout).await;
        if bad {
            assert_eq!(end, "rolled_back", "crash in {stage}: {s}");
            assert_eq!(
                agent.active_slot_release(),
                good_running,
                "crash in {stage}"
            );
        } else {
            assert_eq!(end, "committed", "crash in {stage}: {s}");
            good_running = Some(release_hex_id(&r));
            assert_eq!(
                agent.active_slot_release(),
                good_running,
                "crash in {stage}"
            );
        }
    }
    let base = stages.len() as u64;

    // Then SIGKILL at random moments.
    let mut killed_in: BTreeMap<String, u32> = BTreeMap::new();
    let mut outcomes: BTreeMap<&str, u32> = BTreeMap::new();
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 1..=cycles {
        let bad = i % 3 == 0;
        let counter = base + i;
        let version = format!("{counter}.0");
        let data = bundle(&version, 24 * 1024, bad);
        // ~0.4 s of download at this rate, then install, then 1 s of probation.
        let url = files.put(&format!("v{i}"), data.clone(), Mode::Slow(60_000));
        let r = release(counter, &version, &data, &url);
        let id = release_hex_id(&r);
        let rollout = format!("r-{i}");
        control
            .publish_manifest(
                &rollout,
                control.manifest(&rollout, &r, ManifestState::Active),
            )
            .await;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(rng % 2200)).await;
        agent.kill9();
        // What the journal said at the moment of the kill.
        let stage = {
            let (store, _) =
                swell_agent::store::AgentStore::open(&agent.state.join("db"), 16).unwrap();
            match store.load_job().unwrap() {
                Some(j) if j.rollout.as_str() == rollout => match j.stage {
                    Stage::Downloading => "downloading",
                    Stage::Installing => "installing",
                    Stage::Probation { .. } => "probation",
                    Stage::Committed => "committed",
                    Stage::RollingBack { .. } => "rolling_back",
                    Stage::RolledBack { .. } => "rolled_back",
                    Stage::Failed { .. } => "failed",
                },
                _ => "before_job",
            }
        };
        *killed_in.entry(stage.to_string()).or_default() += 1;
        agent.spawn();
        let s = agent
            .wait_status(&format!("cycle {i} ends"), 40, |s| {
                s["job"]["rollout"] == rollout.as_str()
                    && ["committed", "rolled_back", "failed"]
                        .contains(&s["job"]["stage"].as_str().unwrap_or(""))
            })
            .await;
        let end = s["job"]["stage"].as_str().unwrap().to_string();
        control.clear_manifest(&rollout).await;
        let active = agent.active_slot_release();
        match end.as_str() {
            "committed" => {
                assert!(
                    !bad,
                    "cycle {i}: a failing release was committed (killed in {stage})"
                );
                assert_eq!(active.as_deref(), Some(id.as_str()), "cycle {i}");
                assert_eq!(s["running"]["version"], version.as_str());
                good_running = Some(id);
                *outcomes.entry("committed").or_default() += 1;
            }
            _ => {
                assert!(
                    bad || s["job"]["reason"]
                        .as_str()
                        .is_some_and(|r| r.starts_with("crash_loop")),
                    "cycle {i}: a good release ended {end}: {s}"
                );
                assert_eq!(
                    active, good_running,
                    "cycle {i}: back on the previous release"
                );
                *outcomes.entry("rolled_back").or_default() += 1;
            }
        }
        assert!(
            !control
                .reports_of("dev-k")
                .iter()
                .any(|s| s.rollout.as_deref() == Some(rollout.as_str())
                    && s.phase == "committed"
                    && bad),
            "cycle {i}: committed reported for a failing release"
        );
    }
    println!("killed in: {killed_in:?}; outcomes: {outcomes:?}");
    assert!(
        killed_in.len() >= 3,
        "kills spread over several stages: {killed_in:?}"
    );
}

/// Two agents with one device id (a cloned SD card, say): each connection
/// takes the other's session over. Each agent recognises it, says why in its
/// log and its status, and backs off more with every takeover in a row
/// instead of reconnecting at once forever (the backoff itself is
/// `swell_mqtt::reconnect`'s unit tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_backs_off_when_another_client_has_its_device_id() {
    let broker = Broker::start();
    let control = Control::start(&broker).await;
    control.publish_keys().await;
    let spec = broker.agent_spec("dev-twin").await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = AgentProc::start(&spec, d1.path());
    a.wait_status("first twin connected", 20, |s| s["connected"] == true)
        .await;
    let b = AgentProc::start(&spec, d2.path());
    // Connections closed soon, in a row, climb past the slow-backoff mark on
    // at least one twin: neither holds its connection long enough to end
    // the streak.
    let twice = |s: &serde_json::Value| s["closed_soon_in_a_row"].as_u64().is_some_and(|n| n >= 3);
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if twice(&a.status()) || twice(&b.status()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "no twin saw three connections closed soon in a row:\n{}\n{}\n{}\n{}",
            a.status(),
            b.status(),
            a.log_text(),
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = a.log_text() + &b.log_text();
    assert!(
        logs.contains("keeps closing this connection soon after it opens"),
        "the log names the cause:\n{logs}"
    );
}
