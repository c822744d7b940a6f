//! Harness for coordinator tests over a real broker: the coordinator in-process
//! (or as a process), scripted devices that sign real Hellos and Reports with their
//! own keys, and an operator client that sends JSON commands and reads replies.
#![allow(dead_code, clippy::unwrap_used)]

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use swell_coordinator::engine::Settings;
use swell_coordinator::server::{self, LoopConfig, unix_now};
use swell_coordinator::status::RolloutStatus;
use swell_mqtt::MqttConfig;
use swell_protocol::cohort::{self, Label};
use swell_protocol::envelope::{Audience, Stamp, UnverifiedEnvelope, seal};
use swell_protocol::messages::*;
use swell_protocol::testkeys::test_key;
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::topics::Topics;
use swell_protocol::{DeviceId, FleetId, ReleaseId, RolloutId, SecretKey, enroll};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "enroll-me-0123456789";

pub fn fleet() -> FleetId {
    FleetId::new("plant-7").unwrap()
}

pub fn key_list_body() -> KeyList {
    swell_protocol::fixtures::key_list(unix_now())
}

pub fn key_list(body: &KeyList) -> ThresholdSigned {
    let mut k = ThresholdSigned::new(body).unwrap();
    k.sign(&test_key("root-0")).unwrap();
    k
}

/// A release signed by release keys 0 and 1 (threshold 2).
pub fn release(counter: u64, version: &str) -> ThresholdSigned {
    swell_protocol::fixtures::release(
        counter,
        version,
        version.as_bytes(),
        "",
        "sim",
        &["release-0", "release-1"],
        unix_now(),
    )
}

pub fn release_hex(r: &ThresholdSigned) -> String {
    hex::encode(r.encode().unwrap())
}

pub use swell_broker::Role;
pub use swell_e2e::broker::TestBroker;

/// Where the test operator's replies come: under its user, as the rules
/// require (`swell-ops/{user}/#`).
pub const REPLIES: &str = "swell-ops/operator/test/replies";

pub fn settings(epoch: u64) -> Settings {
    let body = key_list_body();
    Settings {
        fleet: fleet(),
        topics: Topics::default(),
        key: test_key("coordinator-0"),
        key_list: key_list(&body),
        keys: body,
        epoch,
        enrollment_tokens: vec![TOKEN.into()],
        beacon_ttl: Duration::from_secs(30),
        manifest_ttl: Duration::from_secs(3_600),
        pending_expiry: Duration::from_secs(3 * 86_400),
    }
}

/// The coordinator's session: its user and a client id of its own prefix.
pub fn mqtt_config(b: &TestBroker, client_id: &str) -> MqttConfig {
    MqttConfig {
        host: b.host.clone(),
        port: b.port,
        client_id: format!("swell-coordinator-{client_id}"),
        credentials: Some(b.login(Role::Coordinator)),
        keep_alive: Duration::from_secs(10),
        max_packet: 256 * 1024,
        persistent: true,
        tls: None,
    }
}

/// The coordinator running in this process.
pub struct Coord {
    pub cancel: CancellationToken,
    pub handle: tokio::task::JoinHandle<()>,
    pub dir: tempfile::TempDir,
}

pub async fn start_coordinator(b: &TestBroker, s: Settings) -> Coord {
    let dir = tempfile::tempdir().unwrap();
    start_coordinator_in(b, s, dir).await
}

pub async fn start_coordinator_in(b: &TestBroker, s: Settings, dir: tempfile::TempDir) -> Coord {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let cancel = CancellationToken::new();
    let (ready_tx, mut ready_rx) = tokio::sync::watch::channel(false);
    let cfg = mqtt_config(b, &format!("coord-{}", std::process::id()));
    let started = assembled(
        dir.path(),
        s,
        cfg,
        LoopConfig {
            tick: Duration::from_millis(200),
            beacon_interval: Duration::from_secs(10),
            ..LoopConfig::default()
        },
    );
    let c = cancel.clone();
    let handle = tokio::spawn(async move {
        started
            .serve(c, ready_tx, server::Hooks::default())
            .await
            .unwrap();
    });
    tokio::time::timeout(Duration::from_secs(10), async {
        while !*ready_rx.borrow() {
            ready_rx.changed().await.unwrap();
        }
    })
    .await
    .expect("coordinator connected");
    Coord {
        cancel,
        handle,
        dir,
    }
}

/// Options of a connection as `role` (a gateway's client id gets its prefix).
pub fn options(b: &TestBroker, role: Role, id: &str) -> MqttOptions {
    let prefix = match role {
        Role::Gateway => "swell-gw-",
        _ => "",
    };
    let mut opts = MqttOptions::new(format!("{prefix}{id}"), b.host.clone(), b.port);
    let (user, password) = b.login(role);
    opts.set_credentials(user, password);
    opts
}

/// A connection as `role` (the gateway for scripted devices, an operator).
pub async fn client(
    b: &TestBroker,
    role: Role,
    id: &str,
) -> (
    AsyncClient,
    mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>,
) {
    let mut opts = options(b, role, id);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_max_packet_size(Some(1 << 20));
    let (client, mut eventloop) = AsyncClient::new(opts, 100_000);
    let (tx, rx) = mpsc::unbounded_channel();
    let (conn_tx, conn_rx) = tokio::sync::oneshot::channel();
    let mut conn_tx = Some(conn_tx);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(t) = conn_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), conn_rx)
        .await
        .unwrap()
        .unwrap();
    (client, rx)
}

/// How a scripted device behaves in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    Healthy,
    Fails,
    Silent,
    /// Refuses the manifest with this reason code (exposure cap, hardware…).
    Refuses(u16),
}

struct SimDevice {
    id: DeviceId,
    key: SecretKey,
    labels: Vec<Label>,
    behavior: Behavior,
    seq: u64,
}

/// Scripted devices sharing one MQTT connection, each signing with its own key.
pub struct Devices {
    client: AsyncClient,
    inner: Arc<Mutex<DevState>>,
    topics: Topics,
}

struct DevState {
    devs: Vec<SimDevice>,
    /// (rollout, retry, device index) already acted on.
    acted: HashSet<(RolloutId, u32, usize)>,
    rolled_back: HashSet<(RolloutId, usize)>,
    pub manifests: Vec<(RolloutId, u64, u64, u64, ManifestState)>,
    pub reports_sent: u64,
}

impl Devices {
    /// Starts `n` devices; `setup(i)` gives each its labels and behavior.
    pub async fn start(
        b: &TestBroker,
        n: usize,
        setup: impl Fn(usize) -> (Vec<(&'static str, String)>, Behavior),
    ) -> Devices {
        let (client, mut rx) =
            client(b, Role::Gateway, &format!("sim-{}", std::process::id())).await;
        let topics = Topics::default();
        let devs = (0..n)
            .map(|i| {
                let (labels, behavior) = setup(i);
                SimDevice {
                    id: DeviceId::new(format!("dev-{i:04}")).unwrap(),
                    key: test_key(&format!("device-{i}")),
                    labels: labels
                        .into_iter()
                        .map(|(k, v)| Label {
                            key: k.into(),
                            value: v,
                        })
                        .collect(),
                    behavior,
                    seq: 0,
                }
            })
            .collect();
        let inner = Arc::new(Mutex::new(DevState {
            devs,
            acted: HashSet::new(),
            rolled_back: HashSet::new(),
            manifests: vec![],
            reports_sent: 0,
        }));
        client
            .subscribe(topics.manifests(&fleet()), QoS::AtLeastOnce)
            .await
            .unwrap();
        let d = Devices {
            client: client.clone(),
            inner: inner.clone(),
            topics: topics.clone(),
        };
        client
            .subscribe(topics.beacon(&fleet()), QoS::AtLeastOnce)
            .await
            .unwrap();
        // Hello from everyone, online flags.
        for (t, p, online) in hellos(&inner, &topics) {
            client.publish(t, QoS::AtLeastOnce, false, p).await.unwrap();
            client
                .publish(online, QoS::AtLeastOnce, true, "1")
                .await
                .unwrap();
        }
        let c2 = client.clone();
        let t2 = topics.clone();
        tokio::spawn(async move {
            let mut epoch_seen = 0;
            while let Some(p) = rx.recv().await {
                if p.topic.ends_with(b"/beacon") {
                    // A coordinator epoch not seen before: it restarted and may
                    // have missed our Hellos, so say hello again (as agents do).
                    let coord = test_key("coordinator-0").public();
                    if let Ok(env) = UnverifiedEnvelope::parse(&p.payload)
                        && let Ok(v) = env.verify::<Beacon>(&coord, unix_now())
                        && v.header.epoch > epoch_seen
                    {
                        for (t, payload, _) in hellos(&inner, &t2) {
                            let _ = c2.publish(t, QoS::AtLeastOnce, false, payload).await;
                        }
                        epoch_seen = v.header.epoch;
                    }
                    continue;
                }
                let outs = on_manifest(&inner, &t2, &p.payload);
                for (topic, payload) in outs {
                    let _ = c2.publish(topic, QoS::AtLeastOnce, false, payload).await;
                }
            }
        });
        d
    }

    pub fn manifests(&self) -> Vec<(RolloutId, u64, u64, u64, ManifestState)> {
        self.inner.lock().unwrap().manifests.clone()
    }

    /// Waits until the newest manifest devices saw for `rollout` satisfies `pred`.
    pub async fn wait_manifest(
        &self,
        rollout: &str,
        secs: u64,
        pred: impl Fn(&ManifestState, u64) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let last = self
                .manifests()
                .into_iter()
                .rfind(|m| m.0.as_str() == rollout);
            if let Some(m) = &last
                && pred(&m.4, m.3)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "devices never saw the expected manifest of {rollout}; last {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn set_behavior(&self, f: impl Fn(usize) -> Behavior) {
        let mut st = self.inner.lock().unwrap();
        for (i, d) in st.devs.iter_mut().enumerate() {
            d.behavior = f(i);
        }
    }

    /// Raw publish, for the rejection tests.
    pub async fn publish_raw(&self, topic: String, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }
}

fn hellos(inner: &Arc<Mutex<DevState>>, topics: &Topics) -> Vec<(String, Vec<u8>, String)> {
    let mut st = inner.lock().unwrap();
    st.devs
        .iter_mut()
        .map(|dv| {
            dv.seq += 1;
            let hello = Hello {
                device: dv.id.clone(),
                fleet: fleet(),
                key: dv.key.public(),
                labels: dv.labels.clone(),
                hardware: "sim".into(),
                agent_version: "test".into(),
                proto_min: 3,
                proto_max: 3,
                boot: 1,
                running: None,
                counter_floor: 0,
                incarnation: 1,
                enrollment_proof: Some(enroll::prove(TOKEN, &dv.id, &fleet(), &dv.key.public())),
                confirmed: false,
            };
            let stamp = Stamp {
                epoch: 1,
                seq: dv.seq,
                issued_at: unix_now(),
                expires_at: 0,
                audience: Audience::Any,
            };
            (
                topics.hello(&dv.id),
                seal(&dv.key, stamp, &hello).unwrap(),
                topics.online(&dv.id),
            )
        })
        .collect()
}

fn report_bytes(
    d: &mut SimDevice,
    rollout: &RolloutId,
    release: ReleaseId,
    phase: Phase,
) -> Vec<u8> {
    d.seq += 1;
    let r = Report {
        device: d.id.clone(),
        rollout: Some(rollout.clone()),
        release,
        phase,
        probes: vec![],
        metrics: Metrics::default(),
    };
    let stamp = Stamp {
        epoch: 1,
        seq: d.seq,
        issued_at: unix_now(),
        expires_at: 0,
        audience: Audience::Any,
    };
    seal(&d.key, stamp, &r).unwrap()
}

fn on_manifest(
    inner: &Arc<Mutex<DevState>>,
    topics: &Topics,
    payload: &[u8],
) -> Vec<(String, Vec<u8>)> {
    let env = match UnverifiedEnvelope::parse(payload) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("sim: manifest does not parse: {e}");
            return vec![];
        }
    };
    let v = match env.verify::<Manifest>(&test_key("coordinator-0").public(), unix_now()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("sim: manifest refused: {e}");
            return vec![];
        }
    };
    let m = v.body;
    let release_id = m.release_id();
    let mut st = inner.lock().unwrap();
    st.manifests.push((
        m.rollout.clone(),
        v.header.epoch,
        v.header.seq,
        m.open_below,
        m.state,
    ));
    let mut outs = Vec::new();
    for i in 0..st.devs.len() {
        let d = &st.devs[i];
        let bucket = cohort::bucket(&release_id, &d.id);
        if !m.selector.matches(&d.labels) || !m.opens_for(&d.id, bucket) {
            continue;
        }
        match m.state {
            ManifestState::Active => {
                let key = (m.rollout.clone(), m.retry, i);
                let behavior = d.behavior;
                if st.acted.contains(&key) || behavior == Behavior::Silent {
                    continue;
                }
                st.acted.insert(key);
                let d = &mut st.devs[i];
                let topic = topics.report(&d.id);
                if let Behavior::Refuses(code) = behavior {
                    let ph = Phase::Rejected(Reason {
                        code,
                        detail: reason::name(code).into(),
                    });
                    outs.push((topic, report_bytes(d, &m.rollout, release_id, ph)));
                    st.reports_sent += 1;
                    continue;
                }
                outs.push((
                    topic.clone(),
                    report_bytes(d, &m.rollout, release_id, Phase::Installing),
                ));
                let end = match behavior {
                    Behavior::Healthy => Phase::Committed,
                    _ => Phase::Failed(Reason {
                        code: reason::PROBE_FAILED,
                        detail: "probe".into(),
                    }),
                };
                outs.push((topic, report_bytes(d, &m.rollout, release_id, end)));
                st.reports_sent += 2;
            }
            ManifestState::RollingBack
                if st.rolled_back.insert((m.rollout.clone(), i))
                    && st.acted.iter().any(|(r, _, j)| r == &m.rollout && *j == i) =>
            {
                let d = &mut st.devs[i];
                let topic = topics.report(&d.id);
                let ph = Phase::RolledBack(Reason {
                    code: reason::OPERATOR,
                    detail: String::new(),
                });
                outs.push((topic, report_bytes(d, &m.rollout, release_id, ph)));
            }
            _ => {}
        }
    }
    outs
}

/// An operator: sends JSON commands, reads replies, statuses and events.
pub struct Operator {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>,
    pub statuses: HashMap<String, RolloutStatus>,
    pub events: Vec<Value>,
    n: u64,
}

impl Operator {
    pub async fn start(b: &TestBroker) -> Operator {
        let (client, rx) = client(
            b,
            Role::Operator,
            &format!("operator-{}", std::process::id()),
        )
        .await;
        let t = Topics::default();
        client.subscribe(REPLIES, QoS::AtLeastOnce).await.unwrap();
        client
            .subscribe(t.ops_statuses(&fleet()), QoS::AtLeastOnce)
            .await
            .unwrap();
        client
            .subscribe(t.ops_events(&fleet()), QoS::AtLeastOnce)
            .await
            .unwrap();
        Operator {
            client,
            rx,
            statuses: HashMap::new(),
            events: vec![],
            n: 0,
        }
    }

    fn absorb(&mut self, p: &rumqttc::v5::mqttbytes::v5::Publish) -> Option<Value> {
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let v: Value = serde_json::from_slice(&p.payload).ok()?;
        if topic.ends_with("/status") {
            // The retained status as clients read it: the typed status.
            if let Ok(s) = serde_json::from_value::<RolloutStatus>(v.clone()) {
                self.statuses.insert(s.rollout.clone(), s);
            }
        } else if topic.ends_with("/events") {
            self.events.push(v.clone());
        }
        Some(v)
    }

    /// Sends `cmd` with an MQTT 5 response topic and waits for the reply.
    pub async fn command(&mut self, cmd: Value) -> Value {
        let id = self.send(cmd).await;
        self.command_reply(&id).await
    }

    /// Publishes `cmd` with a fresh `id` and the reply topic; returns the id.
    async fn send(&mut self, mut cmd: Value) -> String {
        self.n += 1;
        let id = format!("req-{}", self.n);
        cmd["id"] = json!(id);
        let props = PublishProperties {
            response_topic: Some(REPLIES.into()),
            ..Default::default()
        };
        self.client
            .publish_with_properties(
                Topics::default().ops_cmd(&fleet()),
                QoS::AtLeastOnce,
                false,
                cmd.to_string(),
                props,
            )
            .await
            .unwrap();
        id
    }

    /// Waits until the coordinator knows devices `dev-0000` … `dev-{n-1}` (the
    /// Hellos and this command travel on different topics, so order is not given).
    pub async fn wait_enrolled(&mut self, n: usize) {
        for i in 0..n {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let r = self
                    .command(json!({"op": "approve", "device": format!("dev-{i:04}")}))
                    .await;
                if r["reason"] == "already" {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "device {i} never enrolled: {r}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Publishes raw bytes on the command topic with a reply topic in the body.
    pub async fn command_raw(&mut self, payload: &[u8]) {
        let props = PublishProperties {
            response_topic: Some(REPLIES.into()),
            ..Default::default()
        };
        self.client
            .publish_with_properties(
                Topics::default().ops_cmd(&fleet()),
                QoS::AtLeastOnce,
                false,
                payload.to_vec(),
                props,
            )
            .await
            .unwrap();
    }

    /// Sends `cmd` until a reply comes (a coordinator that is still starting has
    /// not subscribed yet, and commands are not retained).
    pub async fn command_when_up(&mut self, cmd: Value, secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let id = self.send(cmd.clone()).await;
            let attempt = tokio::time::Instant::now() + Duration::from_millis(300);
            while let Ok(Some(p)) = tokio::time::timeout_at(attempt, self.rx.recv()).await {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                if let Some(v) = self.absorb(&p)
                    && topic == REPLIES
                    && v["id"] == id
                {
                    return v;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no reply to {cmd} within {secs} s"
            );
        }
    }

    pub async fn next_reply(&mut self) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let p = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .expect("reply in time")
                .unwrap();
            let topic = String::from_utf8_lossy(&p.topic).into_owned();
            if let Some(v) = self.absorb(&p)
                && topic == REPLIES
            {
                return v;
            }
        }
    }

    async fn command_reply(&mut self, id: &str) -> Value {
        loop {
            let v = self.next_reply().await;
            if v["id"] == id {
                return v;
            }
        }
    }

    /// Waits until the status of `rollout` satisfies `pred`.
    pub async fn wait_status(
        &mut self,
        rollout: &str,
        secs: u64,
        pred: impl Fn(&RolloutStatus) -> bool,
    ) -> RolloutStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = self.statuses.get(rollout)
                && pred(s)
            {
                return s.clone();
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(p)) => {
                    self.absorb(&p);
                }
                _ => panic!(
                    "status of {rollout} did not get there in {secs} s; last: {:#?}",
                    self.statuses.get(rollout)
                ),
            }
        }
    }
}

/// A rollout spec for `create`, with test-friendly timings.
pub fn create_cmd(rollout: &str, rel: &ThresholdSigned, waves: &[&str], extra: Value) -> Value {
    let mut spec = json!({
        "rollout": rollout,
        "release": release_hex(rel),
        "waves": waves,
        "min_devices": 1,
        "success_threshold": "90%",
        "max_failure_rate": "10%",
        "bake": "1s",
        "install_timeout": "5s",
    });
    if let (Value::Object(s), Value::Object(e)) = (&mut spec, extra) {
        s.extend(e);
    }
    json!({"op": "create", "spec": spec})
}

impl Devices {
    /// Sends a late `Failed` report for device `i` (after it committed).
    pub async fn fail_now(&self, i: usize, rollout: &RolloutId, release: ReleaseId) {
        let (topic, bytes) = {
            let mut st = self.inner.lock().unwrap();
            let d = &mut st.devs[i];
            let ph = Phase::Failed(Reason {
                code: reason::PROBE_FAILED,
                detail: "late".into(),
            });
            (
                self.topics.report(&d.id),
                report_bytes(d, rollout, release, ph),
            )
        };
        self.client
            .publish(topic, QoS::AtLeastOnce, false, bytes)
            .await
            .unwrap();
    }

    /// Index of the devices whose planned wave for `release` over `steps` is `wave`.
    pub fn in_wave(&self, release: &ReleaseId, steps: &[u32], wave: usize) -> Vec<usize> {
        let st = self.inner.lock().unwrap();
        st.devs
            .iter()
            .enumerate()
            .filter(|(_, d)| cohort::wave_of(cohort::bucket(release, &d.id), steps) == Some(wave))
            .map(|(i, _)| i)
            .collect()
    }
}

/// A metric's value in the exposition text (summed over its series).
pub fn metric(m: &swell_coordinator::metrics::Metrics, name: &str) -> f64 {
    m.encode()
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The coordinator as production assembles it (`swell_coordinator::assemble`),
/// its state in `dir`, started and ready to serve.
pub fn assembled(
    dir: &std::path::Path,
    s: Settings,
    mqtt: MqttConfig,
    loop_cfg: LoopConfig,
) -> swell_coordinator::assemble::Started {
    let mut c = swell_coordinator::assemble::Coordinator::new(s, dir.to_path_buf(), mqtt);
    c.loop_cfg = loop_cfg;
    c.start(None).unwrap()
}
