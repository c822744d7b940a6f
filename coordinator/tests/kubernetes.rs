//! The Kubernetes face, tested the honest way without an API server (none can
//! run here): `kube::Client` over a `tower-test` mock that checks every request
//! the controller makes (method, path, query, body) and answers with
//! API-shaped JSON. Everything else is real: the engine, its sled store, the
//! MQTT broker, devices signing reports, and the HTTP port.
//!
//! `controller_against_a_real_cluster` at the end needs K3s and is ignored; see
//! docs/kubernetes.md for how to run it.
#![cfg(feature = "kube")]
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use swell_coordinator::engine::EngineError;
use swell_coordinator::k8s::controller::{self, Ctx, EngineHandle};
use swell_coordinator::k8s::crd::{Rollout, RolloutResourceSpec};
use swell_coordinator::k8s::lease::{Attempt, Elector, LeaseConfig};
use swell_coordinator::k8s::{bridge, crd};
use swell_coordinator::metrics::{LeaseState, Metrics};
use swell_coordinator::server::{Hooks, LoopConfig, unix_now};
use swell_coordinator::status::RolloutEvent;
use swell_protocol::RolloutId;
use swell_protocol::messages::ManifestState;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

type ApiHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const NS: &str = "swell";
const BASE: &str = "/apis/swell.dev/v1alpha1/namespaces/swell/rollouts";

fn mock() -> (Client, ApiHandle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, NS), handle)
}

/// One request as the mock saw it.
#[derive(Debug)]
struct Seen {
    method: Method,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

async fn next(handle: &mut ApiHandle) -> (Seen, tower_test::mock::SendResponse<Response<Body>>) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("the controller made no request")
        .expect("mock closed");
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let content_type = req
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (
        Seen {
            method,
            path,
            query,
            content_type,
            body,
        },
        send,
    )
}

fn reply(send: tower_test::mock::SendResponse<Response<Body>>, code: u16, body: &Value) {
    send.send_response(
        Response::builder()
            .status(StatusCode::from_u16(code).unwrap())
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

fn status_err(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// A coordinator in this process, wired like Kubernetes mode.
struct Wired {
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), EngineError>>,
    engine: EngineHandle,
    events: broadcast::Sender<RolloutEvent>,
    forwarded: Option<mpsc::Receiver<swell_coordinator::engine::Forwarded>>,
    metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
}

async fn start_wired(
    b: &TestBroker,
    leading: Option<watch::Receiver<bool>>,
    beacon: Duration,
) -> Wired {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let (control_tx, control_rx) = mpsc::channel(64);
    let (forward_tx, forward_rx) = mpsc::channel(64);
    let (events, _) = broadcast::channel(1024);
    let metrics = Arc::new(Metrics::new());
    let hooks = Hooks {
        control: Some(control_rx),
        forward: Some(forward_tx),
        events: Some(events.clone()),
        metrics: Some(metrics.clone()),
        leading,
    };
    let cancel = CancellationToken::new();
    let (ready_tx, mut ready_rx) = watch::channel(false);
    let cfg = mqtt_config(b, &format!("coord-k8s-{}", std::process::id()));
    let started = assembled(
        dir.path(),
        settings(1),
        cfg,
        LoopConfig {
            tick: Duration::from_millis(200),
            beacon_interval: beacon,
            ..LoopConfig::default()
        },
    );
    let c = cancel.clone();
    let handle = tokio::spawn(async move { started.serve(c, ready_tx, hooks).await });
    tokio::time::timeout(Duration::from_secs(10), ready_rx.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();
    Wired {
        cancel,
        handle,
        engine: EngineHandle::new(control_tx),
        events,
        forwarded: Some(forward_rx),
        metrics,
        _dir: dir,
    }
}

/// An event as the operator protocol writes it.
fn event(v: serde_json::Value) -> RolloutEvent {
    serde_json::from_value(v).unwrap()
}

fn spec(rel: &swell_protocol::threshold::ThresholdSigned) -> RolloutResourceSpec {
    serde_json::from_value(json!({
        "release": release_hex(rel),
        "waves": ["50%", "100%"],
        "minDevices": 1,
        "successThreshold": "90%",
        "maxFailureRate": "10%",
        "bake": "0s",
        "installTimeout": "30s",
    }))
    .unwrap()
}

fn object(name: &str, spec: RolloutResourceSpec) -> Rollout {
    let mut o = Rollout::new(name, spec);
    o.metadata.namespace = Some(NS.into());
    o.metadata.uid = Some(format!("uid-{name}"));
    o.metadata.generation = Some(1);
    o.metadata.resource_version = Some("100".into());
    o
}

fn with_finalizer(mut o: Rollout) -> Rollout {
    o.metadata.finalizers = Some(vec![controller::FINALIZER.into()]);
    o
}

fn ctx(client: Client, w: &Wired) -> Arc<Ctx> {
    Arc::new(Ctx::new(client, w.engine.clone(), "test-0".into()))
}

/// Serves one status patch: checks it is server-side apply by `swell` on the
/// status subresource and returns the status written.
async fn expect_status_patch(api: &mut ApiHandle, obj: &Rollout) -> Value {
    let (seen, send) = next(api).await;
    assert_eq!(seen.method, Method::PATCH, "{seen:?}");
    assert_eq!(
        seen.path,
        format!("{BASE}/{}/status", obj.metadata.name.as_deref().unwrap())
    );
    assert!(seen.query.contains("fieldManager=swell"), "{seen:?}");
    assert!(seen.query.contains("force=true"), "{seen:?}");
    assert_eq!(seen.content_type, "application/apply-patch+yaml");
    assert_eq!(seen.body["apiVersion"], "swell.dev/v1alpha1");
    assert_eq!(seen.body["kind"], "Rollout");
    let mut answer = serde_json::to_value(obj).unwrap();
    answer["status"] = seen.body["status"].clone();
    reply(send, 200, &answer);
    seen.body["status"].clone()
}

fn condition<'a>(status: &'a Value, t: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == t)
        .unwrap_or_else(|| panic!("no {t} condition in {status:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_creates_pauses_acts_and_cleans_up() {
    let b = TestBroker::start();
    let w = start_wired(&b, None, Duration::from_secs(10)).await;
    let devs = Devices::start(&b, 8, |_| (vec![], Behavior::Healthy)).await;
    let mut op = Operator::start(&b).await;
    op.wait_enrolled(8).await;
    let (client, mut api) = mock();
    let ctx = ctx(client, &w);
    let rel = release(2, "2.0.0");
    let id = RolloutId::new("fw-2").unwrap();

    // A new resource: the finalizer goes on first (JSON patch with a test op).
    let obj = object("fw-2", spec(&rel));
    let task = tokio::spawn(controller::reconcile(Arc::new(obj.clone()), ctx.clone()));
    let (seen, send) = next(&mut api).await;
    assert_eq!(seen.method, Method::PATCH);
    assert_eq!(seen.path, format!("{BASE}/fw-2"));
    assert_eq!(seen.content_type, "application/json-patch+json");
    assert_eq!(seen.body[1]["op"], "add", "{:#}", seen.body);
    assert_eq!(seen.body[1]["value"], json!([controller::FINALIZER]));
    let obj = with_finalizer(obj);
    reply(send, 200, &serde_json::to_value(&obj).unwrap());
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    assert!(
        w.engine.status(&id).await.unwrap().is_none(),
        "not started before the finalizer"
    );

    // With the finalizer: the engine creates the rollout, status is written.
    let task = tokio::spawn(controller::reconcile(Arc::new(obj.clone()), ctx.clone()));
    let st = expect_status_patch(&mut api, &obj).await;
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(controller::REFRESH)
    );
    assert!(
        matches!(
            st["phase"].as_str(),
            Some("wave_open" | "baking" | "pending" | "completed")
        ),
        "{st:#}"
    );
    assert_eq!(st["observedGeneration"], 1);
    assert_eq!(st["members"], 8);
    for t in ["Progressing", "Paused", "Degraded", "Completed"] {
        let c = condition(&st, t);
        assert!(
            c["lastTransitionTime"].as_str().unwrap().ends_with('Z'),
            "{c}"
        );
        assert_eq!(c["observedGeneration"], 1);
    }
    assert_eq!(condition(&st, "Degraded")["status"], "False");
    // Devices really got a signed manifest.
    devs.wait_manifest("fw-2", 10, |_, ob| ob > 0).await;

    // spec.paused → the engine pauses; devices see a paused manifest.
    let mut paused = obj.clone();
    paused.spec.paused = true;
    paused.metadata.generation = Some(2);
    let task = tokio::spawn(controller::reconcile(Arc::new(paused.clone()), ctx.clone()));
    let st = expect_status_patch(&mut api, &paused).await;
    task.await.unwrap().unwrap();
    assert_eq!(st["phase"], "paused", "{st:#}");
    assert_eq!(st["observedGeneration"], 2);
    assert_eq!(condition(&st, "Paused")["status"], "True");
    assert_eq!(condition(&st, "Paused")["reason"], "Operator");
    assert_eq!(condition(&st, "Progressing")["status"], "False");
    devs.wait_manifest("fw-2", 10, |s, _| *s == ManifestState::Paused)
        .await;

    // A one-shot action through the annotation: abort. Applied once.
    let mut acted = paused.clone();
    acted.status = Some(serde_json::from_value(st).unwrap());
    acted
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(controller::ACTION_ANNOTATION.into(), "abort/n1".into());
    let task = tokio::spawn(controller::reconcile(Arc::new(acted.clone()), ctx.clone()));
    let st = expect_status_patch(&mut api, &acted).await;
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    assert_eq!(st["phase"], "aborted", "{st:#}");
    assert_eq!(st["lastAction"], "abort/n1");
    assert!(
        st["lastActionResult"].as_str().unwrap().contains("abort"),
        "{st:#}"
    );
    assert_eq!(condition(&st, "Degraded")["status"], "True");
    devs.wait_manifest("fw-2", 10, |s, _| *s == ManifestState::Halted)
        .await;
    // The same annotation again is not carried out twice. (Counts may still
    // move as late reports land, so a status write is allowed, but it must
    // show the same action and its first result.)
    let first_result = st["lastActionResult"].clone();
    acted.status = Some(serde_json::from_value(st).unwrap());
    let task = tokio::spawn(controller::reconcile(Arc::new(acted.clone()), ctx.clone()));
    if let Ok(Some((req, send))) =
        tokio::time::timeout(Duration::from_millis(500), api.next_request()).await
    {
        assert!(
            req.uri().path().ends_with("/fw-2/status"),
            "{:?}",
            req.uri()
        );
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["status"]["lastAction"], "abort/n1");
        assert_eq!(body["status"]["lastActionResult"], first_result);
        assert_eq!(body["status"]["phase"], "aborted");
        let mut answer = serde_json::to_value(&acted).unwrap();
        answer["status"] = body["status"].clone();
        reply(send, 200, &answer);
    }
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());

    // Deletion: the finalizer halts and forgets the rollout, then lets go.
    let mut deleting = acted.clone();
    deleting.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let task = tokio::spawn(controller::reconcile(
        Arc::new(deleting.clone()),
        ctx.clone(),
    ));
    let (seen, send) = next(&mut api).await;
    assert_eq!(seen.method, Method::PATCH);
    assert_eq!(seen.path, format!("{BASE}/fw-2"));
    assert_eq!(seen.body[0]["op"], "test");
    assert_eq!(seen.body[0]["value"], controller::FINALIZER);
    assert_eq!(seen.body[1]["op"], "remove");
    assert_eq!(seen.body[1]["path"], "/metadata/finalizers/0");
    // The engine already forgot it when the finalizer is removed.
    assert!(w.engine.status(&id).await.unwrap().is_none());
    let mut gone = deleting.clone();
    gone.metadata.finalizers = None;
    reply(send, 200, &serde_json::to_value(&gone).unwrap());
    task.await.unwrap().unwrap();
    // Late subscribers no longer get a retained manifest or status for it.
    let t = swell_protocol::topics::Topics::default();
    // (The clearing publishes are on their way once the engine has removed it.)
    for topic in [t.manifest(&fleet(), &id), t.ops_status(&fleet(), &id)] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !retained(&b, &topic).await.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{topic} still retained after the rollout was deleted"
            );
        }
    }
    drop(devs);
    w.cancel.cancel();
    w.handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_reports_an_invalid_spec_and_retries_conflicts() {
    let b = TestBroker::start();
    let w = start_wired(&b, None, Duration::from_secs(10)).await;
    let (client, mut api) = mock();
    let ctx = ctx(client, &w);

    // A spec the engine refuses: Degraded with the reason, no rollout.
    let mut bad = spec(&release(2, "2.0.0"));
    bad.waves = vec!["150%".into()];
    let obj = with_finalizer(object("fw-bad", bad));
    let task = tokio::spawn(controller::reconcile(Arc::new(obj.clone()), ctx.clone()));
    let st = expect_status_patch(&mut api, &obj).await;
    // The refusal is also a Warning Event on the resource.
    let (seen, send) = next(&mut api).await;
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.path, "/apis/events.k8s.io/v1/namespaces/swell/events");
    assert_eq!(seen.body["type"], "Warning");
    assert_eq!(seen.body["reason"], "Refused");
    assert_eq!(seen.body["regarding"]["name"], "fw-bad");
    reply(send, 201, &seen.body);
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(Duration::from_secs(30))
    );
    assert_eq!(st["phase"], "invalid");
    assert!(st["message"].as_str().unwrap().contains("150%"), "{st:#}");
    assert_eq!(condition(&st, "Degraded")["status"], "True");
    assert!(
        w.engine
            .status(&RolloutId::new("fw-bad").unwrap())
            .await
            .unwrap()
            .is_none()
    );

    // 409 on the status write: written again.
    let obj = with_finalizer(object("fw-3", spec(&release(3, "3.0.0"))));
    let task = tokio::spawn(controller::reconcile(Arc::new(obj.clone()), ctx.clone()));
    let (seen, send) = next(&mut api).await;
    assert!(seen.path.ends_with("/fw-3/status"));
    reply(
        send,
        409,
        &status_err(409, "Conflict", "the object has been modified"),
    );
    let st = expect_status_patch(&mut api, &obj).await;
    task.await.unwrap().unwrap();
    assert!(st["phase"].is_string());

    // A name that cannot be a rollout id (over 63 bytes) is reported, not created.
    let long = "x".repeat(70);
    let obj = with_finalizer(object(&long, spec(&release(4, "4.0.0"))));
    let task = tokio::spawn(controller::reconcile(Arc::new(obj.clone()), ctx.clone()));
    let st = expect_status_patch(&mut api, &obj).await;
    task.await.unwrap().unwrap();
    assert_eq!(condition(&st, "Degraded")["reason"], "InvalidName");
    w.cancel.cancel();
    w.handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_commands_become_resource_writes() {
    let b = TestBroker::start();
    let mut w = start_wired(&b, None, Duration::from_secs(10)).await;
    let (client, mut api) = mock();
    let rollouts: kube::Api<Rollout> = kube::Api::namespaced(client, NS);
    tokio::spawn(bridge::run(
        rollouts,
        w.forwarded.take().unwrap(),
        w.engine.clone(),
    ));
    let mut op = Operator::start(&b).await;
    let rel = release(5, "5.0.0");

    // create → POST of a Rollout resource carrying the same spec.
    let cmd = create_cmd(
        "fw-5",
        &rel,
        &["10%", "100%"],
        json!({"selector": "hw=rev3"}),
    );
    let reply_task = tokio::spawn(async move {
        let r = op.command(cmd).await;
        (op, r)
    });
    let (seen, send) = next(&mut api).await;
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.path, BASE);
    assert!(seen.query.contains("fieldManager=swell"));
    assert_eq!(seen.body["metadata"]["name"], "fw-5");
    assert_eq!(seen.body["spec"]["selector"], "hw=rev3");
    assert_eq!(seen.body["spec"]["waves"], json!(["10%", "100%"]));
    assert_eq!(seen.body["spec"]["release"], release_hex(&rel));
    assert_eq!(seen.body["spec"]["bake"], "1s");
    // What the command carried round-trips into the engine's own create spec.
    let rs: RolloutResourceSpec = serde_json::from_value(seen.body["spec"].clone()).unwrap();
    let cs = rs.to_create_spec("fw-5").unwrap();
    assert_eq!(cs.install_timeout, "5s");
    assert_eq!(cs.success_threshold, "90%");
    let mut created = seen.body.clone();
    created["metadata"]["namespace"] = json!(NS);
    created["metadata"]["resourceVersion"] = json!("7");
    reply(send, 201, &created);
    let (mut op, r) = reply_task.await.unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["message"].as_str().unwrap().contains("swell/fw-5"), "{r}");
    // The engine itself was not touched: the controller starts it from the resource.
    assert!(
        w.engine
            .status(&RolloutId::new("fw-5").unwrap())
            .await
            .unwrap()
            .is_none()
    );

    // pause → GET then a merge patch with resourceVersion; a 409 makes it re-read.
    let reply_task = tokio::spawn(async move {
        let r = op.command(json!({"op": "pause", "rollout": "fw-5"})).await;
        (op, r)
    });
    for rv in ["7", "8"] {
        let (seen, send) = next(&mut api).await;
        assert_eq!(
            (seen.method.clone(), seen.path.as_str()),
            (
                Method::GET,
                "/apis/swell.dev/v1alpha1/namespaces/swell/rollouts/fw-5"
            )
        );
        let mut cur = created.clone();
        cur["metadata"]["resourceVersion"] = json!(rv);
        reply(send, 200, &cur);
        let (seen, send) = next(&mut api).await;
        assert_eq!(seen.method, Method::PATCH);
        assert_eq!(seen.content_type, "application/merge-patch+json");
        assert_eq!(seen.body["spec"]["paused"], true);
        assert_eq!(seen.body["metadata"]["resourceVersion"], rv);
        if rv == "7" {
            reply(
                send,
                409,
                &status_err(409, "Conflict", "the object has been modified"),
            );
        } else {
            reply(send, 200, &cur);
        }
    }
    let (mut op, r) = reply_task.await.unwrap();
    assert_eq!(r["ok"], true, "{r}");

    // promote → the action annotation with a nonce.
    let reply_task = tokio::spawn(async move {
        let r = op
            .command(json!({"op": "promote", "rollout": "fw-5"}))
            .await;
        (op, r)
    });
    let (_, send) = next(&mut api).await;
    reply(send, 200, &created);
    let (seen, send) = next(&mut api).await;
    let action = seen.body["metadata"]["annotations"][controller::ACTION_ANNOTATION]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        action.starts_with("promote/") && action.len() > 10,
        "{action}"
    );
    reply(send, 200, &created);
    let (mut op, r) = reply_task.await.unwrap();
    assert_eq!(r["ok"], true, "{r}");

    // An unknown rollout: the API's 404 becomes the usual refusal.
    let reply_task =
        tokio::spawn(async move { op.command(json!({"op": "abort", "rollout": "nope"})).await });
    let (_, send) = next(&mut api).await;
    reply(
        send,
        404,
        &status_err(404, "NotFound", "rollouts.swell.dev \"nope\" not found"),
    );
    let r = reply_task.await.unwrap();
    assert_eq!(r["ok"], false);
    assert_eq!(r["reason"], "unknown_rollout");
    w.cancel.cancel();
    w.handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn engine_events_become_kubernetes_events_and_refreshes() {
    use kube::Resource as _;
    let (client, mut api) = mock();
    let (control_tx, _control_rx) = mpsc::channel(1);
    let ctx = Arc::new(Ctx::new(
        client,
        EngineHandle::new(control_tx),
        "test-0".into(),
    ));
    let obj = object("fw-7", spec(&release(7, "7.0.0")));
    ctx.refs
        .lock()
        .unwrap()
        .insert("fw-7".into(), obj.object_ref(&()));
    let (tx, rx) = broadcast::channel(16);
    let (refresh_tx, mut refresh_rx) = mpsc::channel(1);
    tokio::spawn(swell_coordinator::k8s::relay_events(ctx, rx, refresh_tx));
    // Widening is routine (no Event); opening a wave and a breach are not.
    tx.send(event(json!({"at": 1, "epoch": 1, "rollout": "fw-7", "decision": "widen", "wave": 1, "open_below": 5})))
        .unwrap();
    tx.send(event(json!({"at": 1, "epoch": 1, "rollout": "fw-7", "decision": "open_wave", "wave": 1, "open_below": 9})))
        .unwrap();
    let (seen, send) = next(&mut api).await;
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.path, "/apis/events.k8s.io/v1/namespaces/swell/events");
    assert_eq!(seen.body["reason"], "WaveOpened");
    assert_eq!(seen.body["type"], "Normal");
    assert_eq!(seen.body["note"], "wave 1 opened");
    assert_eq!(seen.body["regarding"]["kind"], "Rollout");
    assert_eq!(seen.body["regarding"]["uid"], "uid-fw-7");
    assert_eq!(seen.body["reportingController"], "swell-coordinator");
    reply(send, 201, &seen.body);
    tx.send(event(
        json!({"at": 2, "epoch": 1, "rollout": "fw-7", "decision": "breach",
                   "reason": {"kind": "wave_failures", "failed": 3, "considered": 10,
                              "late": 0, "limit_ppm": 100_000},
                   "policy": "rollback"}),
    ))
    .unwrap();
    let (seen, send) = next(&mut api).await;
    assert_eq!(seen.body["reason"], "Breach");
    assert_eq!(seen.body["type"], "Warning");
    assert!(
        seen.body["note"]
            .as_str()
            .unwrap()
            .contains("3 of 10 devices failed (30%)"),
        "{:#}",
        seen.body
    );
    reply(send, 201, &seen.body);
    // Each event also asked the controller for a status refresh.
    tokio::time::timeout(Duration::from_secs(5), refresh_rx.recv())
        .await
        .unwrap()
        .unwrap();
}

fn lease_json(holder: &str, renewed_secs_ago: i64, transitions: i32, rv: &str) -> Value {
    let renewed = k8s_openapi::jiff::Timestamp::now()
        - k8s_openapi::jiff::SignedDuration::from_secs(renewed_secs_ago);
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "swell-coordinator-plant-7", "namespace": NS, "resourceVersion": rv},
        "spec": {
            "holderIdentity": holder, "leaseDurationSeconds": 15,
            "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            "leaseTransitions": transitions,
        }
    })
}

const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/swell/leases/swell-coordinator-plant-7";

fn elector(client: Client, renew: Duration) -> Elector {
    let mut cfg = LeaseConfig::new("swell-coordinator-plant-7", "pod-a");
    cfg.renew_every = renew;
    Elector::new(kube::Api::namespaced(client, NS), cfg)
}

#[tokio::test]
async fn lease_is_created_taken_when_expired_and_respected_when_held() {
    let (client, mut api) = mock();
    let e = elector(client, Duration::from_secs(5));

    // No Lease yet: created with us as holder, term 1.
    let t = tokio::spawn({
        let e = e.clone();
        async move { e.try_acquire().await.unwrap() }
    });
    let (seen, send) = next(&mut api).await;
    assert_eq!((seen.method, seen.path.as_str()), (Method::GET, LEASE));
    reply(send, 404, &status_err(404, "NotFound", "not found"));
    let (seen, send) = next(&mut api).await;
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.body["spec"]["holderIdentity"], "pod-a");
    assert_eq!(seen.body["spec"]["leaseTransitions"], 1);
    reply(send, 201, &seen.body);
    assert_eq!(t.await.unwrap(), Attempt::Acquired { transitions: 1 });

    // Held by a live replica: we stand by, and write nothing.
    let t = tokio::spawn({
        let e = e.clone();
        async move { e.try_acquire().await.unwrap() }
    });
    let (_, send) = next(&mut api).await;
    reply(send, 200, &lease_json("pod-b", 2, 4, "40"));
    assert_eq!(t.await.unwrap(), Attempt::HeldBy("pod-b".into()));

    // Expired: taken over in one write that also counts the transition and
    // carries the resourceVersion (so a racing standby gets 409).
    let t = tokio::spawn({
        let e = e.clone();
        async move { e.try_acquire().await.unwrap() }
    });
    let (_, send) = next(&mut api).await;
    reply(send, 200, &lease_json("pod-b", 60, 4, "41"));
    let (seen, send) = next(&mut api).await;
    assert_eq!(
        (seen.method.clone(), seen.path.as_str()),
        (Method::PUT, LEASE)
    );
    assert_eq!(seen.body["metadata"]["resourceVersion"], "41");
    assert_eq!(seen.body["spec"]["holderIdentity"], "pod-a");
    assert_eq!(seen.body["spec"]["leaseTransitions"], 5);
    reply(send, 200, &seen.body);
    assert_eq!(t.await.unwrap(), Attempt::Acquired { transitions: 5 });

    // Lost the race for it: 409 means another replica won.
    let t = tokio::spawn({
        let e = e.clone();
        async move { e.try_acquire().await.unwrap() }
    });
    let (_, send) = next(&mut api).await;
    reply(send, 200, &lease_json("", 0, 5, "50"));
    let (_, send) = next(&mut api).await;
    reply(send, 409, &status_err(409, "Conflict", "modified"));
    assert!(matches!(t.await.unwrap(), Attempt::HeldBy(_)));
}

/// The lease is lost: the engine loop stops at once and publishes nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_lost_stops_the_engine_publishing() {
    let b = TestBroker::start();
    let (leading_tx, leading_rx) = watch::channel(true);
    let w = start_wired(&b, Some(leading_rx), Duration::from_millis(200)).await;
    let devs = Devices::start(&b, 4, |_| (vec![], Behavior::Healthy)).await;
    let mut op = Operator::start(&b).await;
    op.wait_enrolled(4).await;
    let (client, mut api) = mock();
    let ctx = ctx(client, &w);
    let obj = with_finalizer(object("fw-6", spec(&release(6, "6.0.0"))));
    let task = tokio::spawn(controller::reconcile(Arc::new(obj.clone()), ctx.clone()));
    expect_status_patch(&mut api, &obj).await;
    task.await.unwrap().unwrap();
    devs.wait_manifest("fw-6", 10, |_, ob| ob > 0).await;

    // A beacon watcher: beacons come every 200 ms while leading.
    let (lease_client, mut lease_api) = mock();
    let keeper = elector(lease_client, Duration::from_millis(100));
    let metrics = w.metrics.clone();
    let keep = tokio::spawn(keeper.keep(leading_tx, metrics.clone(), CancellationToken::new()));
    // First renewal: still ours.
    let (seen, send) = next(&mut lease_api).await;
    assert_eq!(seen.method, Method::GET);
    reply(send, 200, &lease_json("pod-a", 1, 3, "60"));
    let (seen, send) = next(&mut lease_api).await;
    assert_eq!(seen.method, Method::PUT);
    assert_eq!(seen.body["metadata"]["resourceVersion"], "60");
    reply(send, 200, &seen.body);
    // Second: another replica holds it now.
    let (_, send) = next(&mut lease_api).await;
    reply(send, 200, &lease_json("pod-b", 0, 4, "61"));
    keep.await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), w.handle)
        .await
        .expect("the engine loop must stop when the lease is lost")
        .unwrap();
    assert!(matches!(ended, Err(EngineError::Deposed)), "{ended:?}");
    assert_eq!(metrics.lease(), LeaseState::Waiting);

    // Nothing more from the deposed coordinator: the loop returned only once
    // its MQTT session was over (no connection, no reconnect), so nothing of
    // it can reach the broker any more.
    assert!(
        !metrics.broker_connected(),
        "the deposed coordinator's connection is closed"
    );
    // The engine refuses further control: the loop is gone.
    assert!(
        w.engine
            .status(&RolloutId::new("fw-6").unwrap())
            .await
            .is_err()
    );
}

/// Retained, non-empty messages a new subscriber to `topic` receives.
async fn retained(b: &TestBroker, topic: &str) -> Vec<Vec<u8>> {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event};
    let id = format!("retained-{}-{}", std::process::id(), unix_now());
    let (client, mut el) = AsyncClient::new(options(b, Role::Operator, &id), 100);
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(800);
    while let Ok(ev) = tokio::time::timeout_at(deadline, el.poll()).await {
        if let Ok(Event::Incoming(Packet::Publish(p))) = ev
            && p.retain
            && !p.payload.is_empty()
        {
            out.push(p.payload.to_vec());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_is_scraped_and_parsed() {
    let b = TestBroker::start();
    let w = start_wired(&b, None, Duration::from_secs(10)).await;
    let devs = Devices::start(&b, 5, |_| (vec![], Behavior::Healthy)).await;
    let mut op = Operator::start(&b).await;
    op.wait_enrolled(5).await;
    // One forged message (a report under an unknown device) for the reject counter.
    devs.publish_raw(
        devs.topics()
            .report(&swell_protocol::DeviceId::new("ghost").unwrap()),
        b"not an envelope".to_vec(),
    )
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(swell_coordinator::http::serve(
        listener,
        w.metrics.clone(),
        stop.clone(),
    ));
    let http = reqwest::Client::new();
    let scrape = || async {
        let r = http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        parse_exposition(&r.text().await.unwrap())
    };
    // Gauges refresh every few seconds; counters after each batch.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let samples = loop {
        let s = scrape().await;
        if s.iter()
            .any(|(n, v)| n == "swell_devices{state=\"approved\"}" && *v == 5.0)
            && s.iter()
                .any(|(n, _)| n.starts_with("swell_rejected_messages_total{"))
        {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never showed the fleet: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let value = |name: &str| {
        samples
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("{name} missing: {samples:?}"))
    };
    assert!(value("swell_hellos_total") >= 5.0);
    assert_eq!(value("swell_broker_connected"), 1.0);
    assert_eq!(
        value("swell_leader"),
        1.0,
        "without an election the single replica leads"
    );
    assert_eq!(value("swell_epoch"), 1.0);
    assert!(value("swell_ingest_batch_seconds_count") >= 1.0);
    // No per-device series, whatever the fleet size.
    assert!(
        samples.iter().all(|(n, _)| !n.contains("dev-")),
        "{samples:?}"
    );

    // Probes: live and ready (broker up, no election).
    let get = |p: &'static str| {
        let http = http.clone();
        async move {
            http.get(format!("http://{addr}{p}"))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(get("/healthz").await, 200);
    w.metrics.set_lease(LeaseState::NotUsed);
    assert_eq!(get("/readyz").await, 200);
    w.metrics.set_lease(LeaseState::Waiting);
    assert_eq!(get("/readyz").await, 200, "a connected standby is ready");
    w.metrics.set_lease(LeaseState::Failing);
    assert_eq!(get("/readyz").await, 503);
    w.metrics.set_lease(LeaseState::Holding);
    w.cancel.cancel();
    w.handle.await.unwrap().unwrap();
    assert_eq!(
        get("/readyz").await,
        503,
        "not ready once the broker session is gone"
    );
    stop.cancel();
}

/// Parses the text exposition format strictly enough to catch a malformed
/// line: every sample is `name{labels} value` with a float value, and every
/// family has HELP and TYPE lines.
fn parse_exposition(text: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap().to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let family = name.split('{').next().unwrap();
        let known = typed.iter().any(|t| {
            family == t
                || ["_total", "_bucket", "_sum", "_count", "_created"]
                    .iter()
                    .any(|s| family.strip_suffix(s) == Some(t.as_str()))
        });
        assert!(known, "sample {name} has no TYPE line");
        assert!(
            family.starts_with("swell_"),
            "{family} lacks the swell_ prefix"
        );
        out.push((name.to_string(), v));
    }
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    out
}

#[test]
fn committed_crd_equals_the_generated_one() {
    let committed = include_str!("../../deploy/k3s/crds/rollout.yaml");
    let generated = crd::crd_yaml().unwrap();
    assert!(
        committed == generated,
        "deploy/k3s/crds/rollout.yaml is stale: run `cargo run -p swell-coordinator -- crd > deploy/k3s/crds/rollout.yaml`"
    );
}

/// Against a real cluster (K3s): `SWELL_K8S_NAMESPACE=swell cargo test -p
/// swell-coordinator --test kubernetes -- --ignored` with a kubeconfig whose
/// user may manage rollouts and leases in that namespace and the CRD applied.
#[tokio::test]
#[ignore = "needs a Kubernetes API server"]
async fn controller_against_a_real_cluster() {
    let ns = std::env::var("SWELL_K8S_NAMESPACE").unwrap_or_else(|_| "swell".into());
    let client = Client::try_default().await.unwrap();
    let b = TestBroker::start();
    let mut w = start_wired(&b, None, Duration::from_secs(10)).await;
    let devs = Devices::start(&b, 4, |_| (vec![], Behavior::Healthy)).await;
    let mut op = Operator::start(&b).await;
    op.wait_enrolled(4).await;
    let stop = CancellationToken::new();
    let (_, events_rx) = (0, w.events.subscribe());
    tokio::spawn(swell_coordinator::k8s::run(
        client.clone(),
        ns.clone(),
        "test".into(),
        w.engine.clone(),
        events_rx,
        w.forwarded.take().unwrap(),
        stop.clone(),
    ));
    let api: kube::Api<Rollout> = kube::Api::namespaced(client, &ns);
    let _ = api.delete("fw-k3s", &Default::default()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    api.create(
        &Default::default(),
        &Rollout::new("fw-k3s", spec(&release(9, "9.0.0"))),
    )
    .await
    .unwrap();
    devs.wait_manifest("fw-k3s", 30, |_, ob| ob == u64::MAX)
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let o = api.get("fw-k3s").await.unwrap();
        if o.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("completed") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{:?}", o.status);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    api.delete("fw-k3s", &Default::default()).await.unwrap();
    stop.cancel();
}
