//! Harness for tests of the real `swell-agent` process: a real broker (Mosquitto
//! when required, else the embedded rumqttd), a real HTTP artifact server that can
//! misbehave on purpose, and a coordinator stand-in that signs key lists, beacons
//! and manifests with the test keys and collects the agent's reports — verified
//! with the key from its Hello. The proxy that cuts the agent's broker link is
//! `swell_e2e::link::Proxy`.
#![allow(dead_code, clippy::unwrap_used, clippy::type_complexity)]

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use swell_protocol::envelope::{Audience, Stamp, UnverifiedEnvelope, seal};
use swell_protocol::messages::*;
use swell_protocol::testkeys::test_key;
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::topics::Topics;
use swell_protocol::{DeviceId, FleetId, PublicKey, ReleaseId, RolloutId};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

pub const FLEET: &str = "plant-7";
pub const HW: &str = "rpi4";

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn fleet() -> FleetId {
    FleetId::new(FLEET).unwrap()
}

pub fn root_hex() -> String {
    hex::encode(test_key("root-0").public().0)
}

// ---------------------------------------------------------------- broker

/// A broker for one test, configured as shipped: Mosquitto when required,
/// else the embedded broker. Every client logs in.
pub struct Broker {
    pub port: u16,
    pub inner: swell_e2e::broker::TestBroker,
}

impl Broker {
    pub fn start() -> Broker {
        let inner = swell_e2e::broker::TestBroker::start();
        Broker {
            port: inner.port,
            inner,
        }
    }

    /// An agent's spec with its own login, the device made known to the broker.
    pub async fn agent_spec(&self, device: &str) -> AgentSpec {
        self.inner.add_devices(&[device.to_string()]).await;
        let (user, password) = self.inner.device_login(device);
        let mut spec = AgentSpec::new(device, self.port);
        spec.login = Some((user, self.inner.password_file(device, &password)));
        spec
    }
}

// ---------------------------------------------------------------- artifacts

/// How the artifact server answers for one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Sends the headers and this many bytes, then drops the connection — once.
    DropOnceAfter(usize),
    /// Sends this many bytes per second.
    Slow(usize),
    /// Sends this many extra bytes beyond the file (with a matching Content-Length).
    Overrun(usize),
    /// 404.
    Missing,
}

#[derive(Clone, Default)]
pub struct ArtifactServer {
    pub port: u16,
    files: Arc<Mutex<HashMap<String, (Vec<u8>, Mode)>>>,
    /// (path, Range header) of every request.
    pub requests: Arc<Mutex<Vec<(String, Option<String>)>>>,
}

impl ArtifactServer {
    pub async fn start() -> ArtifactServer {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = ArtifactServer {
            port: l.local_addr().unwrap().port(),
            ..ArtifactServer::default()
        };
        let srv = s.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = l.accept().await else {
                    return;
                };
                let srv = srv.clone();
                tokio::spawn(async move {
                    let _ = srv.serve(sock).await;
                });
            }
        });
        s
    }

    /// Serves `data` at `/{name}`; returns its URL.
    pub fn put(&self, name: &str, data: Vec<u8>, mode: Mode) -> String {
        self.files
            .lock()
            .unwrap()
            .insert(format!("/{name}"), (data, mode));
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    pub fn requests_for(&self, name: &str) -> Vec<Option<String>> {
        let p = format!("/{name}");
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(path, _)| *path == p)
            .map(|(_, r)| r.clone())
            .collect()
    }

    async fn serve(&self, mut sock: TcpStream) -> std::io::Result<()> {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = sock.read(&mut buf).await?;
            if n == 0 || head.len() > 16 * 1024 {
                return Ok(());
            }
            head.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
        let range = text.lines().find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("range: ")
                .map(|v| v.trim().to_string())
        });
        self.requests
            .lock()
            .unwrap()
            .push((path.clone(), range.clone()));
        let entry = self.files.lock().unwrap().get(&path).cloned();
        let Some((data, mode)) = entry.filter(|(_, m)| *m != Mode::Missing) else {
            sock.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await?;
            return Ok(());
        };
        let start = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
        let (status, body) = match start {
            Some(s) if s < data.len() => (
                format!(
                    "206 Partial Content\r\nContent-Range: bytes {s}-{}/{}",
                    data.len() - 1,
                    data.len()
                ),
                data[s..].to_vec(),
            ),
            _ => ("200 OK".to_string(), data.clone()),
        };
        let body = match mode {
            Mode::Overrun(extra) => {
                let mut b = body;
                b.extend(std::iter::repeat_n(0x5a, extra));
                b
            }
            _ => body,
        };
        sock.write_all(
            format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await?;
        match mode {
            Mode::DropOnceAfter(n) => {
                sock.write_all(&body[..n.min(body.len())]).await?;
                sock.flush().await?;
                self.files
                    .lock()
                    .unwrap()
                    .insert(path, (data, Mode::Normal));
                // Dropped: the connection ends mid-body.
            }
            Mode::Slow(bps) => {
                let step = (bps / 10).max(1);
                for chunk in body.chunks(step) {
                    sock.write_all(chunk).await?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            _ => sock.write_all(&body).await?,
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- releases

/// A release with one artifact, signed by `signers` (threshold is 2 of the
/// release keys).
pub fn release_with(
    counter: u64,
    version: &str,
    artifact: &[u8],
    url: &str,
    hardware: &str,
    signers: &[&str],
) -> ThresholdSigned {
    swell_protocol::fixtures::release(counter, version, artifact, url, hardware, signers, now())
}

pub fn release(counter: u64, version: &str, artifact: &[u8], url: &str) -> ThresholdSigned {
    release_with(
        counter,
        version,
        artifact,
        url,
        HW,
        &["release-0", "release-1"],
    )
}

// ---------------------------------------------------------------- coordinator stand-in

/// A report as the stand-in saw it (signature checked with the Hello's key).
#[derive(Debug, Clone)]
pub struct Seen {
    pub device: String,
    pub seq: u64,
    pub rollout: Option<String>,
    pub release: ReleaseId,
    pub phase: String,
    pub code: Option<u16>,
}

pub struct Control {
    pub client: AsyncClient,
    pub topics: Topics,
    pub reports: Arc<Mutex<Vec<Seen>>>,
    pub hellos: Arc<Mutex<Vec<(String, u64)>>>,
    seq: AtomicU64,
    beacons: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Control {
    /// Stands in for the coordinator, with its login.
    pub async fn start(broker: &Broker) -> Arc<Control> {
        let mut o = MqttOptions::new(
            format!("swell-coordinator-control-{}", std::process::id()),
            "127.0.0.1",
            broker.port,
        );
        let (user, password) = broker.inner.login(swell_broker::Role::Coordinator);
        o.set_credentials(user, password);
        o.set_keep_alive(Duration::from_secs(10));
        o.set_max_packet_size(Some(1 << 20));
        let (client, mut el) = AsyncClient::new(o, 1000);
        let topics = Topics::default();
        let c = Arc::new(Control {
            client,
            topics: topics.clone(),
            reports: Arc::default(),
            hellos: Arc::default(),
            seq: AtomicU64::new(1),
            beacons: Mutex::new(None),
        });
        let (reports, hellos) = (c.reports.clone(), c.hellos.clone());
        let sub = c.client.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        tokio::spawn(async move {
            let mut keys: HashMap<String, PublicKey> = HashMap::new();
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        sub.subscribe(topics.all_devices("report"), QoS::AtLeastOnce)
                            .await
                            .unwrap();
                        sub.subscribe(topics.all_devices("hello"), QoS::AtLeastOnce)
                            .await
                            .unwrap();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(t) = ready_tx.take() {
                            let _ = t.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        let Ok(env) = UnverifiedEnvelope::parse(&p.payload) else {
                            continue;
                        };
                        if topic.ends_with("/hello") {
                            if let Ok(v) = Hello::verify_self_signed(&env, now()) {
                                keys.insert(v.body.device.to_string(), v.body.key);
                                // Enrolled as a coordinator does it (ENROLL-3).
                                let confirmation = swell_protocol::fixtures::enrolled(
                                    &v.body.device,
                                    &v.body.fleet,
                                    v.body.key,
                                    v.body.incarnation,
                                    Stamp {
                                        epoch: 1,
                                        seq: now(),
                                        issued_at: now(),
                                        expires_at: 0,
                                        audience: Audience::Any,
                                    },
                                );
                                let _ = sub.try_publish(
                                    topics.enrolled(&v.body.device),
                                    QoS::AtLeastOnce,
                                    false,
                                    confirmation,
                                );
                                hellos
                                    .lock()
                                    .unwrap()
                                    .push((v.body.device.to_string(), v.header.seq));
                            }
                        } else if let Some(dev) = topic.split('/').nth(3)
                            && let Some(k) = keys.get(dev)
                            && let Ok(v) = env.verify::<Report>(k, now())
                        {
                            reports.lock().unwrap().push(Seen {
                                device: v.body.device.to_string(),
                                seq: v.header.seq,
                                rollout: v.body.rollout.map(|r| r.to_string()),
                                release: v.body.release,
                                phase: v.body.phase.name().to_string(),
                                code: v.body.phase.reason().map(|r| r.code),
                            });
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .unwrap()
            .unwrap();
        c
    }

    pub fn key_list_body() -> KeyList {
        swell_protocol::fixtures::key_list(now())
    }

    /// Publishes the root-signed key list, retained.
    pub async fn publish_keys(&self) {
        let mut k = ThresholdSigned::new(&Self::key_list_body()).unwrap();
        k.sign(&test_key("root-0")).unwrap();
        self.client
            .publish(
                self.topics.keys(&fleet()),
                QoS::AtLeastOnce,
                true,
                k.encode().unwrap(),
            )
            .await
            .unwrap();
    }

    fn stamp(&self, ttl: u64, audience: Audience) -> Stamp {
        Stamp {
            epoch: 1,
            seq: self.seq.fetch_add(1, Ordering::SeqCst),
            issued_at: now(),
            expires_at: now() + ttl,
            audience,
        }
    }

    /// Publishes a beacon every 300 ms (expiry 5 s) until stopped.
    pub fn start_beacons(self: &Arc<Self>) {
        let me = self.clone();
        let h = tokio::spawn(async move {
            loop {
                me.beacon().await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        if let Some(old) = self.beacons.lock().unwrap().replace(h) {
            old.abort();
        }
    }

    pub fn stop_beacons(&self) {
        if let Some(h) = self.beacons.lock().unwrap().take() {
            h.abort();
        }
    }

    pub async fn beacon(&self) {
        let b = Beacon {
            fleet: fleet(),
            key_list_version: 1,
        };
        let bytes = seal(
            &test_key("coordinator-0"),
            self.stamp(5, Audience::Fleet(fleet())),
            &b,
        )
        .unwrap();
        let _ = self
            .client
            .publish(self.topics.beacon(&fleet()), QoS::AtLeastOnce, true, bytes)
            .await;
    }

    /// A sealed manifest opening every device of the fleet (next seq).
    pub fn manifest(
        &self,
        rollout: &str,
        release: &ThresholdSigned,
        state: ManifestState,
    ) -> Vec<u8> {
        self.manifest_signed(rollout, release, state, "coordinator-0", 3_600)
    }

    pub fn manifest_signed(
        &self,
        rollout: &str,
        release: &ThresholdSigned,
        state: ManifestState,
        key: &str,
        ttl: u64,
    ) -> Vec<u8> {
        let m = Manifest {
            rollout: RolloutId::new(rollout).unwrap(),
            fleet: fleet(),
            selector: swell_protocol::cohort::Selector::all(),
            canary: vec![],
            wave: 1,
            open_below: u64::MAX,
            state,
            release: release.clone(),
            retry: 0,
        };
        seal(
            &test_key(key),
            self.stamp(ttl, Audience::Fleet(fleet())),
            &m,
        )
        .unwrap()
    }

    /// A sealed manifest whose expiry is already past.
    pub fn expired_manifest(&self, rollout: &str, release: &ThresholdSigned) -> Vec<u8> {
        let m = Manifest {
            rollout: RolloutId::new(rollout).unwrap(),
            fleet: fleet(),
            selector: swell_protocol::cohort::Selector::all(),
            canary: vec![],
            wave: 1,
            open_below: u64::MAX,
            state: ManifestState::Active,
            release: release.clone(),
            retry: 0,
        };
        let mut s = self.stamp(0, Audience::Fleet(fleet()));
        s.issued_at = now() - 100;
        s.expires_at = now() - 50;
        seal(&test_key("coordinator-0"), s, &m).unwrap()
    }

    pub async fn publish_manifest(&self, rollout: &str, bytes: Vec<u8>) {
        let topic = self
            .topics
            .manifest(&fleet(), &RolloutId::new(rollout).unwrap());
        self.client
            .publish(topic, QoS::AtLeastOnce, true, bytes)
            .await
            .unwrap();
    }

    /// Clears a rollout's retained manifest (what a coordinator does when a
    /// rollout is over; rumqttd delivers at most 100 retained messages per
    /// subscription and drops the rest).
    pub async fn clear_manifest(&self, rollout: &str) {
        let topic = self
            .topics
            .manifest(&fleet(), &RolloutId::new(rollout).unwrap());
        self.client
            .publish(topic, QoS::AtLeastOnce, true, Vec::<u8>::new())
            .await
            .unwrap();
    }

    pub async fn publish_directive(&self, device_in_topic: &str, d: &DeviceDirective) {
        let bytes = seal(
            &test_key("coordinator-0"),
            self.stamp(600, Audience::Device(d.device.clone())),
            d,
        )
        .unwrap();
        let topic = self
            .topics
            .desired(&DeviceId::new(device_in_topic).unwrap());
        self.client
            .publish(topic, QoS::AtLeastOnce, true, bytes)
            .await
            .unwrap();
    }

    /// Reports from `device` in arrival order, each counter once: a QoS 1
    /// redelivery (PUBACK lost with the link) is dropped here as the coordinator
    /// drops it.
    pub fn reports_of(&self, device: &str) -> Vec<Seen> {
        let mut seen = std::collections::HashSet::new();
        self.reports
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.device == device && seen.insert(s.seq))
            .cloned()
            .collect()
    }

    /// Phases reported for `rollout`, in order.
    pub fn phases(&self, device: &str, rollout: &str) -> Vec<String> {
        self.reports_of(device)
            .into_iter()
            .filter(|s| s.rollout.as_deref() == Some(rollout))
            .map(|s| s.phase)
            .collect()
    }

    /// Waits for a report of `phase` for `rollout`.
    pub async fn wait_phase(&self, device: &str, rollout: &str, phase: &str, secs: u64) -> Seen {
        self.wait_phase_or(device, rollout, phase, secs, "").await
    }

    /// Like [`Control::wait_phase`]; `context` (an agent log) goes into the failure.
    pub async fn wait_phase_or(
        &self,
        device: &str,
        rollout: &str,
        phase: &str,
        secs: u64,
        context: &str,
    ) -> Seen {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = self
                .reports_of(device)
                .into_iter()
                .find(|s| s.rollout.as_deref() == Some(rollout) && s.phase == phase)
            {
                return s;
            }
            assert!(
                Instant::now() < until,
                "no {phase} for {rollout} within {secs} s; saw {:?}\n{context}",
                self.reports_of(device)
                    .iter()
                    .map(|s| (s.rollout.clone(), s.phase.clone(), s.code))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_hello(&self, device: &str, secs: u64) {
        let until = Instant::now() + Duration::from_secs(secs);
        while !self.hellos.lock().unwrap().iter().any(|(d, _)| d == device) {
            assert!(Instant::now() < until, "no hello from {device}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ---------------------------------------------------------------- the agent process

/// Settings for one agent's `agent.toml`.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub device: String,
    pub broker_port: u16,
    pub backend: String,
    pub probes: String,
    pub probation: &'static str,
    pub download: String,
    pub heartbeat: &'static str,
    pub extra: String,
    /// User name and password file.
    pub login: Option<(String, PathBuf)>,
}

impl AgentSpec {
    pub fn new(device: &str, broker_port: u16) -> AgentSpec {
        AgentSpec {
            device: device.into(),
            broker_port,
            backend: "[install]\nbackend = \"slots\"\nprobation = \"1s\"\nprobe_interval = \"200ms\"\nreach_timeout = \"20s\"\n".into(),
            probes: String::new(),
            probation: "1s",
            download: "[download]\nmin_bytes_per_sec = 1000\nwatchdog = \"2s\"\ndeadline = \"20s\"\n".into(),
            heartbeat: "1h",
            extra: String::new(),
            login: None,
        }
    }

    pub fn toml(&self, state_dir: &Path) -> String {
        format!(
            "device_id = \"{}\"\nfleet = \"{FLEET}\"\nhardware = \"{HW}\"\nbroker = \"mqtt://127.0.0.1:{}\"\n\
             state_dir = \"{}\"\nheartbeat = \"{}\"\n{}\n[labels]\nring = \"beta\"\n[trust]\nroots = [\"{}\"]\n\
             [mqtt]\nkeep_alive = \"5s\"\n{}\n{}\n{}\n{}\n",
            self.device,
            self.broker_port,
            state_dir.display(),
            self.heartbeat,
            self.extra,
            root_hex(),
            self.login.as_ref().map_or(String::new(), |(u, f)| format!(
                "username = \"{u}\"\npassword_file = \"{}\"",
                f.display()
            )),
            self.download,
            self.backend,
            self.probes,
        )
    }
}

/// A running `swell-agent` process; SIGKILLed on drop.
pub struct AgentProc {
    child: Option<Child>,
    pub state: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    envs: Vec<(String, String)>,
}

impl AgentProc {
    pub fn start(spec: &AgentSpec, dir: &Path) -> AgentProc {
        Self::start_env(spec, dir, vec![])
    }

    pub fn start_env(spec: &AgentSpec, dir: &Path, envs: Vec<(String, String)>) -> AgentProc {
        let state = dir.join("state");
        let config = dir.join("agent.toml");
        std::fs::write(&config, spec.toml(&state)).unwrap();
        let mut a = AgentProc {
            child: None,
            state,
            config,
            log: dir.join("agent.log"),
            envs,
        };
        a.spawn();
        a
    }

    /// Starts the process (again), appending to the same log.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // SWELL_AGENT_BIN runs another build (an ARM one, say) and
        // SWELL_AGENT_RUNNER a command in front of it (`qemu-aarch64`).
        let bin = std::env::var("SWELL_AGENT_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_swell-agent").to_string());
        let runner: Vec<String> = std::env::var("SWELL_AGENT_RUNNER")
            .map(|r| r.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let mut cmd = match runner.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("SWELL_AGENT_LOG", "info,swell_agent=debug")
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL, as a power cut would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn status(&self) -> serde_json::Value {
        std::fs::read(self.state.join("status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The release the active slot holds (slots backend).
    pub fn active_slot_release(&self) -> Option<String> {
        std::fs::read_to_string(self.state.join("slots/current/release")).ok()
    }

    pub async fn wait_status(
        &self,
        what: &str,
        secs: u64,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status();
            if f(&s) {
                return s;
            }
            assert!(
                Instant::now() < until,
                "{what}: status {s}\nlog:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl AgentProc {
    /// Waits for `phase` of `rollout` from this agent; the failure shows its log.
    pub async fn phase(
        &self,
        control: &Control,
        device: &str,
        rollout: &str,
        phase: &str,
        secs: u64,
    ) -> Seen {
        // The log is read lazily: only a failure needs it.
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = control
                .reports_of(device)
                .into_iter()
                .find(|s| s.rollout.as_deref() == Some(rollout) && s.phase == phase)
            {
                return s;
            }
            if Instant::now() >= until {
                return control
                    .wait_phase_or(device, rollout, phase, 0, &self.log_text())
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn release_hex_id(r: &ThresholdSigned) -> String {
    hex::encode(r.id().0)
}
