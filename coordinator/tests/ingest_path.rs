//! Every report a device sends reaches the gate (MQTT-7, MQTT-8), over the
//! test's broker (the embedded one, or the shipped Mosquitto when required):
//!
//! - clients that connect with the coordinator's client id while reports flow
//!   are refused; the coordinator keeps its session and the rollout counts
//!   every device (on rumqttd, the broker before, the first such client took
//!   the session over and its router panicked: every later connection failed);
//! - the coordinator subscribes without `$share`, so a second subscriber in a
//!   share group on its report filter (a rogue replica with the coordinator's
//!   own login) takes nothing from it: its probes all come back.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use swell_coordinator::ingest_probe::ProbeConfig;
use swell_coordinator::metrics::Metrics;
use swell_coordinator::server::{Hooks, LoopConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The coordinator in this process, with its metrics and readiness.
struct Running {
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
    client_id: String,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn start(b: &TestBroker, probe: ProbeConfig) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let (ready_tx, ready) = watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    let cfg = mqtt_config(b, &format!("ingest-{}", std::process::id()));
    let client_id = cfg.client_id.clone();
    let hooks = Hooks {
        metrics: Some(metrics.clone()),
        ..Hooks::default()
    };
    let started = assembled(
        dir.path(),
        settings(1),
        cfg,
        LoopConfig {
            tick: Duration::from_millis(100),
            beacon_interval: Duration::from_secs(10),
            probe,
            ..LoopConfig::default()
        },
    );
    let c = cancel.clone();
    tokio::spawn(async move {
        started.serve(c, ready_tx, hooks).await.unwrap();
    });
    let mut r = Running {
        cancel,
        metrics,
        ready,
        client_id,
        _dir: dir,
    };
    wait_ready(&mut r.ready, true, 20).await;
    r
}

async fn wait_ready(ready: &mut watch::Receiver<bool>, want: bool, secs: u64) {
    tokio::time::timeout(Duration::from_secs(secs), ready.wait_for(|r| *r == want))
        .await
        .unwrap_or_else(|_| panic!("readiness did not become {want} within {secs} s"))
        .unwrap();
}

/// Tries to connect; whether the broker accepted.
async fn try_connect(b: &TestBroker, client_id: &str, login: Option<(String, String)>) -> bool {
    let mut opts = MqttOptions::new(client_id, b.host.clone(), b.port);
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    let (_client, mut el) = AsyncClient::new(opts, 10);
    let accepted = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    return a.code == ConnectReturnCode::Success;
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    // Whatever happened, the attempt is over; an accepted one stays a moment
    // (long enough to take a session over), then goes.
    if accepted {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    accepted
}

// MQTT-8: the coordinator-client-id takeover during reports (fails on rumqttd).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_coordinator_client_id_cannot_be_taken_while_reports_flow() {
    let b = TestBroker::start();
    let c = start(&b, ProbeConfig::default()).await;
    // One device's own login is the attacker's: a hostile device of the fleet.
    b.add_devices(&["dev-0007".into()]).await;
    let devs = Devices::start(&b, 40, |_| (vec![("hw", "rev3".into())], Behavior::Healthy)).await;
    let mut op = Operator::start(&b).await;
    op.wait_enrolled(40).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (attempts, accepted) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let attackers = {
        let (stop, attempts, accepted) = (stop.clone(), attempts.clone(), accepted.clone());
        let id = c.client_id.clone();
        let mut logins = vec![None, Some(b.device_login("dev-0007"))];
        // Mosquitto cannot keep an operator off the coordinator's id
        // (swell-broker's mosquitto module); the embedded broker can.
        if !b.is_mosquitto() {
            logins.push(Some(b.login(Role::Operator)));
        }
        let host = (b.host.clone(), b.port);
        tokio::spawn(async move {
            let b = host;
            while !stop.load(Ordering::Relaxed) {
                for login in &logins {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    let mut opts = MqttOptions::new(id.clone(), b.0.clone(), b.1);
                    if let Some((u, p)) = login {
                        opts.set_credentials(u.clone(), p.clone());
                    }
                    let (_client, mut el) = AsyncClient::new(opts, 10);
                    let ok = tokio::time::timeout(Duration::from_secs(5), async {
                        loop {
                            match el.poll().await {
                                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                                    return a.code == ConnectReturnCode::Success;
                                }
                                Ok(_) => {}
                                Err(_) => return false,
                            }
                        }
                    })
                    .await
                    .unwrap_or(false);
                    if ok {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        })
    };

    let rel = release(2, "2.0.0");
    let r = op
        .command(create_cmd(
            "takeover",
            &rel,
            &["25%", "100%"],
            json!({"selector": "hw=rev3"}),
        ))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let s = op
        .wait_status("takeover", 60, |s| s.phase == "completed")
        .await;
    stop.store(true, Ordering::Relaxed);
    attackers.await.unwrap();
    let (healthy, _) = s.opened_totals();
    assert_eq!(
        healthy, 40,
        "every device's report reached the gate: {s:#?}"
    );
    assert!(attempts.load(Ordering::Relaxed) >= 3);
    assert_eq!(
        accepted.load(Ordering::Relaxed),
        0,
        "a client was accepted with the coordinator's client id"
    );
    assert_eq!(
        metric(&c.metrics, "swell_mqtt_session_takeovers_total"),
        0.0,
        "the coordinator's session was taken over"
    );
    if let Some(broker) = b.embedded_broker() {
        assert!(broker.stats().client_id_refused() + broker.stats().bad_credentials() > 0);
    }
    // The broker still serves new clients.
    assert!(try_connect(&b, "swell-ops-after", Some(b.login(Role::Operator))).await);
    let mut op2 = Operator::start(&b).await;
    let r = op2
        .command(json!({"op": "status", "rollout": "takeover"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    drop(devs);
}

// MQTT-7, MQTT-8: the coordinator's subscriptions are plain, so a second
// subscriber in a share group on its filter (here a rogue with the
// coordinator's own login, the one role allowed `$share`) gets copies and takes
// nothing from it: every probe still comes back, readiness never falls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_share_group_on_the_coordinators_filter_takes_nothing_from_it() {
    let b = TestBroker::start();
    let c = start(
        &b,
        ProbeConfig {
            interval_ms: 200,
            timeout_ms: 5_000,
        },
    )
    .await;
    assert_eq!(metric(&c.metrics, "swell_ingest_probe_failures_total"), 0.0);
    assert!(metric(&c.metrics, "swell_mqtt_subscribes_total") >= 4.0);
    let mut ready = c.ready.clone();
    let fell = Arc::new(AtomicBool::new(false));
    let watch_fall = {
        let fell = fell.clone();
        tokio::spawn(async move {
            if ready.wait_for(|r| !*r).await.is_ok() {
                fell.store(true, Ordering::Relaxed);
            }
        })
    };

    let mut opts = options(&b, Role::Coordinator, "swell-coordinator-rogue");
    opts.set_clean_start(true);
    let (rogue, mut el) = AsyncClient::new(opts, 100);
    let taken = Arc::new(AtomicU64::new(0));
    let t = taken.clone();
    let rogue_loop = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for share in [
                        "$share/swell-report/swell/v1/dev/+/report",
                        "$share/swell/swell/v1/dev/+/report",
                    ] {
                        let _ = rogue.try_subscribe(share, QoS::AtLeastOnce);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    t.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    // The rogue's groups receive the probes (ten of them: 2 s of probing); a
    // probe it took away from the coordinator would have been overtaken by the
    // next one and declared lost at once.
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        while taken.load(Ordering::Relaxed) < 10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        got.is_ok(),
        "the rogue's share groups got {} probes",
        taken.load(Ordering::Relaxed)
    );
    rogue_loop.abort();
    let _ = rogue_loop.await;
    assert!(
        !fell.load(Ordering::Relaxed),
        "readiness fell: {}",
        c.metrics.encode()
    );
    watch_fall.abort();
    assert_eq!(
        metric(&c.metrics, "swell_ingest_probe_failures_total"),
        0.0,
        "{}",
        c.metrics.encode()
    );
    let text = c.metrics.encode();
    assert!(
        text.contains("swell_ingest_path_up{filter=\"swell/v1/dev/+/report\"} 1"),
        "{text}"
    );
    assert!(c.metrics.ingest_problem().is_none());
}
