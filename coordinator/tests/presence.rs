//! One coordinator per fleet and prefix (RO-014), in-process over the test's
//! broker (embedded, or the shipped Mosquitto when required): a coordinator
//! takes over from a presence whose instance is gone without its Last Will,
//! refuses to start beside one that answers, and of two that became active in
//! the same instant the later one stops. (Separate processes:
//! `tests/tests/one_coordinator.rs`.)
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use rumqttc::v5::AsyncClient;
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;
use swell_coordinator::engine::EngineError;
use swell_coordinator::presence::{self, Presence, State};
use swell_coordinator::server::{Hooks, LoopConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Refresh of a test that waits out the watch window (750 ms).
const SHORT: Duration = Duration::from_millis(300);
/// Refresh of a test whose answers must come within the window (25 s).
const LONG: Duration = Duration::from_secs(10);

fn other(state: State, since: u64) -> Presence {
    Presence {
        state,
        fleet: fleet().to_string(),
        instance: "0123456789abcdef".into(),
        epoch: 9,
        since,
        at: since,
    }
}

/// A client with the coordinator's login that speaks as another instance.
async fn impostor(
    b: &TestBroker,
) -> (
    AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>,
) {
    let (c, rx) = client(b, Role::Coordinator, "swell-coordinator-other-instance").await;
    c.subscribe(topic(), QoS::AtLeastOnce).await.unwrap();
    (c, rx)
}

/// The impostor publishes `p` as the retained presence.
async fn say(imp: &AsyncClient, p: &Presence) {
    imp.publish(topic(), QoS::AtLeastOnce, true, p.to_json())
        .await
        .unwrap();
}

fn topic() -> String {
    swell_protocol::topics::Topics::default().coordinator(&fleet())
}

struct Run {
    cancel: CancellationToken,
    ready: watch::Receiver<bool>,
    done: tokio::task::JoinHandle<Result<(), EngineError>>,
    instance: String,
    _dir: tempfile::TempDir,
}

fn start(b: &TestBroker, every: Duration) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let (ready_tx, ready) = watch::channel(false);
    let started = assembled(
        dir.path(),
        settings(1),
        mqtt_config(b, "presence"),
        LoopConfig {
            tick: Duration::from_millis(100),
            presence_every: every,
            ..LoopConfig::default()
        },
    );
    let instance = presence::instance_id(dir.path()).unwrap();
    let c = cancel.clone();
    let done = tokio::spawn(async move { started.serve(c, ready_tx, Hooks::default()).await });
    Run {
        cancel,
        ready,
        done,
        instance,
        _dir: dir,
    }
}

async fn until_ready(r: &mut Run) {
    tokio::time::timeout(Duration::from_secs(30), r.ready.wait_for(|r| *r))
        .await
        .expect("ready in time")
        .unwrap();
}

/// The next presence on the topic that satisfies `pred`.
async fn heard(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>,
    pred: impl Fn(&Presence) -> bool,
) -> Presence {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let p = rx.recv().await.unwrap();
            if let Some(p) = presence::parse(&p.payload)
                && pred(&p)
            {
                return p;
            }
        }
    })
    .await
    .expect("presence in time")
}

#[tokio::test]
async fn presence_a_gone_instance_is_taken_over() {
    let b = TestBroker::start();
    let (imp, mut rx) = impostor(&b).await;
    // An instance that died without its Last Will reaching the broker.
    say(&imp, &other(State::Online, 1)).await;
    heard(&mut rx, |p| p.instance == "0123456789abcdef").await;
    let mut r = start(&b, SHORT);
    until_ready(&mut r).await;
    let mine = heard(&mut rx, |p| {
        p.state == State::Online && p.instance == r.instance
    })
    .await;
    assert_eq!(mine.fleet, fleet().to_string());
    // It refreshes its presence.
    let again = heard(&mut rx, |p| p.instance == r.instance && p.at >= mine.at).await;
    assert_eq!(again.since, mine.since);
    // Its goodbye.
    r.cancel.cancel();
    r.done.await.unwrap().unwrap();
    heard(&mut rx, |p| {
        p.state == State::Offline && p.instance == r.instance
    })
    .await;
}

#[tokio::test]
async fn presence_a_live_instance_keeps_its_fleet() {
    let b = TestBroker::start();
    let (imp, mut rx) = impostor(&b).await;
    let alive = other(State::Online, 1);
    say(&imp, &alive).await;
    // Retained at the broker before the starter looks (a publish call only
    // queues it; under load the starter could otherwise claim first).
    heard(&mut rx, |p| p.instance == alive.instance).await;
    let r = start(&b, LONG);
    // Answer the starter as an active coordinator does.
    let starting = heard(&mut rx, |p| p.state == State::Starting).await;
    assert_eq!(starting.instance, r.instance);
    say(&imp, &alive).await;
    let result = tokio::time::timeout(Duration::from_secs(30), r.done)
        .await
        .expect("it stops")
        .unwrap();
    match result {
        Err(EngineError::AnotherCoordinator {
            fleet: f, other, ..
        }) => {
            assert_eq!(f, fleet().to_string());
            assert_eq!(other.instance, alive.instance);
        }
        other => panic!("{other:?}"),
    }
    assert!(!*r.ready.borrow());
}

#[tokio::test]
async fn presence_of_two_active_at_once_the_later_stops() {
    let b = TestBroker::start();
    let (imp, mut rx) = impostor(&b).await;
    let mut r = start(&b, LONG);
    until_ready(&mut r).await;
    let mine = heard(&mut rx, |p| {
        p.state == State::Online && p.instance == r.instance
    })
    .await;
    // Active since later than it: it says again that the fleet is its.
    say(&imp, &other(State::Online, mine.since + 10)).await;
    heard(&mut rx, |p| p.instance == r.instance && p.at >= mine.at).await;
    assert!(!r.done.is_finished());
    // Active since before it: it stops.
    say(&imp, &other(State::Online, 1)).await;
    let result = tokio::time::timeout(Duration::from_secs(30), r.done)
        .await
        .expect("it stops")
        .unwrap();
    assert!(
        matches!(result, Err(EngineError::AnotherCoordinator { .. })),
        "{result:?}"
    );
}
