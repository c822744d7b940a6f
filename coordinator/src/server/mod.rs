//! The coordinator's event loop: carries the engine's decisions out over MQTT.
//!
//! Incoming messages are handled in batches: every message of a batch is applied,
//! the store is flushed once, and only then are the messages acknowledged
//! (MQTT-4, STATE-1). A QoS 1 redelivery of an acknowledged-late message is a
//! replay the engine already ignores (device `seq` floors).
//!
//! What leaves the loop goes through [`sink`]; readiness and the ingest probes
//! are in [`ingest`].

mod claim;
mod ingest;
mod sink;

use crate::engine::{Engine, EngineError, Forwarded, Out, Refusal, ReplyTo};
use crate::ingest_probe::{IngestProbe, ProbeConfig};
use crate::metrics::Metrics;
use crate::ops::Op;
use crate::precheck::{default_threads, pipeline};
use crate::presence::{self, Guard, Guarded, Heard, Presence};
use crate::status::{Answer, Reply, RolloutEvent};
use ingest::{Ingest, probe_effects, set_ready};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::LastWill;
use sink::{ACKS_NOT_SENT, PUBLISHES_DROPPED, Sink, publish};
use std::sync::Arc;
use std::time::Duration;
use swell_mqtt::{self as mqtt, Incoming, MqttConfig};
use swell_protocol::RolloutId;
use tokio::sync::watch;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Most messages handled before one flush and the acks.
pub const BATCH: usize = 512;

/// Timing of the loop.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub tick: Duration,
    pub beacon_interval: Duration,
    /// Threads that verify device signatures (0: one per core).
    pub verify_threads: usize,
    /// Each verify thread checks its reports' signatures as one batch
    /// (`swell_protocol::crypto::verify_batch`); false: one by one.
    pub batch_signatures: bool,
    /// Hand free heap pages back to the kernel this often
    /// ([`crate::memory`]); `None`: never.
    pub trim_every: Option<Duration>,
    /// The probes that prove each device filter delivers (MQTT-7).
    pub probe: ProbeConfig,
    /// This coordinator's instance id on its fleet's presence topic
    /// ([`crate::presence`]); `None`: one of its own for this process.
    pub instance: Option<String>,
    /// How often the presence is refreshed; a starter watches another
    /// instance's for [`presence::watch_window`] of it.
    pub presence_every: Duration,
    /// Testing hook: abort in the first batch with a device report.
    pub crash_at: Option<CrashAt>,
}

/// Where [`LoopConfig::crash_at`] aborts the process, as a power cut would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashAt {
    /// After the engine applied the batch, before its flush.
    Apply,
    /// After the flush, before the acks.
    Flush,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            tick: Duration::from_millis(200),
            beacon_interval: Duration::from_secs(30),
            verify_threads: 0,
            batch_signatures: true,
            trim_every: Some(crate::heap_trim::TRIM_EVERY),
            probe: ProbeConfig::default(),
            instance: None,
            presence_every: presence::REFRESH_EVERY,
            crash_at: None,
        }
    }
}

/// Longest a deposed coordinator waits for its DISCONNECT to be written.
const DEPOSED_GOODBYE: Duration = Duration::from_secs(5);

/// How often fleet gauges (a walk of the registry) are refreshed.
const GAUGE_EVERY: Duration = Duration::from_secs(5);

/// Outcome of a command applied for the controller: what it did and its
/// answer, or why it was refused.
pub type Applied = Result<(String, Answer), Refusal>;

/// Requests from inside the process (the Kubernetes controller) to the loop
/// that owns the engine.
#[derive(Debug)]
pub enum Control {
    Apply {
        op: Op,
        done: oneshot::Sender<Applied>,
    },
    /// Status of one rollout, `None` when the engine does not know it.
    Status {
        rollout: RolloutId,
        done: oneshot::Sender<Option<crate::status::RolloutStatus>>,
    },
    /// Halt and forget a rollout; `true` when it existed.
    Remove {
        rollout: RolloutId,
        done: oneshot::Sender<bool>,
    },
    /// Answer an operator command that was forwarded to the controller.
    Reply {
        id: Option<String>,
        reply_to: Option<String>,
        reply: ReplyTo,
        body: Box<Reply>,
    },
}

/// Optional connections of the loop to the rest of the process.
#[derive(Debug, Default)]
pub struct Hooks {
    pub control: Option<mpsc::Receiver<Control>>,
    /// Where rollout commands go in Kubernetes mode (see [`Engine::forward_rollout_ops`]).
    pub forward: Option<mpsc::Sender<Forwarded>>,
    /// Every rollout event (the JSON published on the events topic).
    pub events: Option<broadcast::Sender<RolloutEvent>>,
    pub metrics: Option<Arc<Metrics>>,
    /// Leadership: the loop stops, publishing nothing more, once this turns false.
    pub leading: Option<watch::Receiver<bool>>,
}

/// Reports between two evaluations of the active rollouts inside a batch.
const STEP_EVERY: usize = 64;

/// Evaluates the active rollouts after reports arrived; a manifest it
/// publishes counts towards gate-to-manifest latency from `since`.
fn step(
    engine: &mut Engine,
    sink: &Sink<'_>,
    manifest_prefix: &str,
    metrics: Option<&Metrics>,
    since: std::time::Instant,
    now: u64,
) -> Result<(), EngineError> {
    let stepped = engine.step_active(now)?;
    let moved = stepped.iter().any(|o| o.topic.starts_with(manifest_prefix));
    sink.send_all(stepped);
    if moved && let Some(m) = metrics {
        m.observe_gate_latency(since.elapsed());
    }
    // The opened wave is walked once its manifest is out.
    sink.send_all(engine.settle(now));
    Ok(())
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs until `cancel` fires. `ready` turns true once connected, subscribed and
/// the probes come back.
pub async fn run(
    engine: Engine,
    initial: Vec<Out>,
    mqtt_cfg: MqttConfig,
    cfg: LoopConfig,
    cancel: CancellationToken,
    ready: watch::Sender<bool>,
) -> Result<(), EngineError> {
    run_with(
        engine,
        initial,
        mqtt_cfg,
        cfg,
        cancel,
        ready,
        Hooks::default(),
    )
    .await
}

/// Disconnects without a goodbye and returns only once the session is over
/// (its task gone: no reconnect either), so once the caller learns it must
/// stop, nothing of this process reaches the broker. A DISCONNECT that cannot
/// be written in time gives way to dropping the link.
async fn end_session(
    client: &rumqttc::v5::AsyncClient,
    connected: watch::Receiver<bool>,
    stop_session: &CancellationToken,
) {
    let _ = client.try_disconnect();
    let over = |mut c: watch::Receiver<bool>| async move { while c.changed().await.is_ok() {} };
    if tokio::time::timeout(DEPOSED_GOODBYE, over(connected.clone()))
        .await
        .is_err()
    {
        stop_session.cancel();
        let _ = tokio::time::timeout(DEPOSED_GOODBYE, over(connected)).await;
    }
}

async fn until_deposed(leading: &mut Option<watch::Receiver<bool>>) {
    match leading {
        None => std::future::pending().await,
        Some(rx) => {
            if rx.wait_for(|l| !*l).await.is_err() {
                // The lease keeper is gone: nobody can vouch for our leadership.
                std::future::pending::<()>().await;
            }
        }
    }
}

async fn next_control(control: &mut Option<mpsc::Receiver<Control>>) -> Option<Control> {
    match control {
        None => std::future::pending().await,
        Some(rx) => rx.recv().await,
    }
}

/// [`run`] with the loop's optional connections.
pub async fn run_with(
    mut engine: Engine,
    initial: Vec<Out>,
    mqtt_cfg: MqttConfig,
    cfg: LoopConfig,
    cancel: CancellationToken,
    ready: watch::Sender<bool>,
    hooks: Hooks,
) -> Result<(), EngineError> {
    let Hooks {
        mut control,
        forward,
        events,
        metrics,
        mut leading,
    } = hooks;
    let verify_threads = match cfg.verify_threads {
        0 => default_threads(),
        n => n,
    };
    if forward.is_some() {
        engine.forward_rollout_ops(true);
    }
    if let Some(every) = cfg.trim_every {
        crate::heap_trim::spawn_trimmer(every, cancel.clone());
    }
    if let Some(m) = &metrics {
        m.set_epoch(engine.epoch());
        m.observe_gauges(&engine.gauges());
    }
    let presence_topic = engine.topics().coordinator(engine.fleet());
    let mut me = Presence {
        state: presence::State::Starting,
        fleet: engine.fleet().to_string(),
        // Without a state directory (and randomness), one for this process.
        instance: cfg.instance.clone().unwrap_or_else(|| {
            presence::new_instance_id().unwrap_or_else(|_| format!("{:016x}", std::process::id()))
        }),
        epoch: engine.epoch(),
        since: unix_now(),
        at: unix_now(),
    };
    let window = presence::watch_window(cfg.presence_every);
    let prefix = engine.topics().prefix().to_string();
    let Some(claimed) = claim::claim(
        &mqtt_cfg,
        &prefix,
        &presence_topic,
        me.clone(),
        window,
        &cancel,
        metrics.as_deref(),
    )
    .await?
    else {
        return Ok(());
    };
    me.since = unix_now();
    let guard = Guard::new(me.with(presence::State::Online, me.since));
    info!(fleet = %me.fleet, instance = %me.instance, epoch = me.epoch, "acting for the fleet");
    let mut subs: Vec<(String, QoS)> = engine
        .subscriptions()
        .into_iter()
        .map(|t| (t, QoS::AtLeastOnce))
        .collect();
    subs.push((presence_topic.clone(), QoS::AtLeastOnce));
    let presence_out = |state: presence::State| Out {
        topic: presence_topic.clone(),
        payload: guard.me().with(state, unix_now()).to_json(),
        retain: true,
        correlation: None,
        event: None,
    };
    let will = LastWill::new(
        presence_topic.clone(),
        guard
            .me()
            .with(presence::State::Offline, me.since)
            .to_json(),
        QoS::AtLeastOnce,
        true,
        None,
    );
    // The session outlives `cancel` by the goodbye below (a publish after the
    // session stopped was dropped, logged as an error on every shutdown); the
    // guard stops it on every way out of this function.
    let session_stop = CancellationToken::new();
    let _session_guard = session_stop.clone().drop_guard();
    let paths = {
        let t = engine.topics();
        ["hello", "report", "online"]
            .iter()
            .filter_map(|ch| {
                let filter = engine
                    .subscriptions()
                    .into_iter()
                    .find(|f| f.ends_with(&format!("/{ch}")))?;
                Some((filter, t.probe(ch)))
            })
            .collect()
    };
    let mut nonce = [0u8; 8];
    // Without randomness the probes still work; they only lose the guard
    // against an earlier process's probes coming back from its session.
    let _ = getrandom::fill(&mut nonce);
    let mut ingest = Ingest {
        probe: IngestProbe::new(cfg.probe, u64::from_le_bytes(nonce), paths),
        connected: false,
        subscriptions: swell_mqtt::Subscribed::default(),
        started: std::time::Instant::now(),
    };
    let stop_session = session_stop.clone();
    let mut session = mqtt::spawn(mqtt_cfg, subs, Some(will), session_stop);
    let client = session.client.clone();
    let mut subscribed = session.subscriptions.clone();
    let sink = Sink {
        client: &client,
        events: events.as_ref(),
        held: std::cell::RefCell::new(Some(Vec::new())),
    };
    let mut incoming = session.take_incoming();
    let manifest_prefix = engine
        .topics()
        .manifests(engine.fleet())
        .trim_end_matches('+')
        .to_string();
    let mut connected = session.connected.clone();
    let flow = session.flow.clone();
    // In order before anything a tick may publish: a restarted coordinator must
    // never publish an older manifest after a newer one. Held with everything
    // after them until the subscriptions are in place (`Sink::held`).
    sink.send_all(initial);
    let mut tick = tokio::time::interval(cfg.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beacon = tokio::time::interval(cfg.beacon_interval);
    beacon.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beacon.tick().await;
    let mut gauges = tokio::time::interval(GAUGE_EVERY);
    gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresh = tokio::time::interval(cfg.presence_every);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.tick().await;
    loop {
        if let Some(m) = &metrics {
            m.heartbeat();
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            () = until_deposed(&mut leading) => {
                // Fenced: nothing more goes out, not even the goodbye.
                error!("leader lease lost: stopping without publishing");
                let _ = ready.send(false);
                engine.flush()?;
                end_session(&client, connected, &stop_session).await;
                if let Some(m) = &metrics {
                    m.set_connected(false);
                }
                return Err(EngineError::Deposed);
            }
            changed = connected.changed() => {
                if changed.is_err() { break; }
                let up = *connected.borrow();
                ingest.connected = up;
                if let Some(m) = &metrics {
                    m.set_connected(up);
                }
                set_ready(&ingest, &ready, metrics.as_deref());
            }
            changed = subscribed.changed() => {
                if changed.is_err() { break; }
                let snapshot = subscribed.borrow().clone();
                let now = ingest.now_ms();
                if snapshot.connection != ingest.subscriptions.connection {
                    // Nothing sent before this connection's SUBACKs proves it.
                    ingest.probe.on_connected(now);
                }
                ingest.subscriptions = snapshot;
                if ingest.subscriptions.all_answered() {
                    sink.open();
                }
                if let Some(m) = &metrics {
                    m.observe_session(&[&claimed, &session.stats]);
                }
                // Granted just now: the first probes go out without waiting a tick.
                let effects = ingest.probe.tick(now, ingest.subscriptions.all_granted());
                probe_effects(effects, &mut ingest, &session, metrics.as_deref());
                set_ready(&ingest, &ready, metrics.as_deref());
            }
            ctl = next_control(&mut control) => {
                let Some(ctl) = ctl else {
                    control = None;
                    continue;
                };
                let now = unix_now();
                match ctl {
                    Control::Apply { op, done } => {
                        let (outs, result) = engine.apply_local(op, now);
                        sink.send_all(outs);
                        let _ = done.send(result);
                    }
                    Control::Status { rollout, done } => {
                        let _ = done.send(engine.status(&rollout, now));
                    }
                    Control::Remove { rollout, done } => {
                        let (existed, outs) = engine.remove(&rollout, now)?;
                        sink.send_all(outs);
                        let _ = done.send(existed);
                    }
                    Control::Reply { id, reply_to, reply, body } => {
                        sink.send_all(engine.reply_out(id.as_deref(), reply_to.as_deref(), &reply, *body));
                    }
                }
            }
            _ = gauges.tick() => {
                if let Some(m) = &metrics {
                    m.observe_gauges(&engine.gauges());
                    m.observe_mqtt(ACKS_NOT_SENT.total(), PUBLISHES_DROPPED.total(), &flow);
                }
            }
            msg = incoming.recv() => {
                let Some(msg) = msg else { break };
                let mut batch = vec![msg];
                while batch.len() < BATCH {
                    match incoming.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                let now = unix_now();
                let started = std::time::Instant::now();
                let size = batch.len();
                let mut outs = Vec::new();
                let mut acks = Vec::with_capacity(batch.len());
                let mut probes = Vec::new();
                let mut yielded = None;
                for m in batch {
                    match m {
                        Incoming::Connected { session_present } => {
                            publish(&client, presence_out(presence::State::Online));
                            debug!(session_present, "session ready");
                        }
                        Incoming::Publish(p) => {
                            let topic = String::from_utf8_lossy(&p.topic);
                            if topic == presence_topic {
                                let _ = client.try_ack(&p);
                                let Some(heard) = presence::parse(&p.payload) else {
                                    warn!(topic = %presence_topic, "not a coordinator presence: ignored");
                                    continue;
                                };
                                match guard.on_heard(&Heard { presence: heard, retained: p.retain }) {
                                    Guarded::Nothing => {}
                                    Guarded::Republish => publish(&client, presence_out(presence::State::Online)),
                                    Guarded::Yield(other) => yielded = Some(other),
                                }
                                continue;
                            }
                            if ingest.probe.is_probe_topic(&topic) {
                                probes.push(p);
                                continue;
                            }
                            if let Some(i) = ingest.probe.path_of(&topic) {
                                let now = ingest.now_ms();
                                ingest.probe.on_traffic(i, now);
                            }
                            acks.push(p);
                        }
                    }
                }
                for p in &probes {
                    let now = ingest.now_ms();
                    let effects = ingest.probe.on_probe(&String::from_utf8_lossy(&p.topic), &p.payload, now);
                    probe_effects(effects, &mut ingest, &session, metrics.as_deref());
                    // It changes no state: acknowledged at once.
                    let _ = client.try_ack(p);
                }
                if !probes.is_empty() {
                    set_ready(&ingest, &ready, metrics.as_deref());
                }
                if let Some(other) = yielded.take() {
                    // Nothing of this batch is acted on, nothing more goes out
                    // (not even the goodbye: the presence is the other's now),
                    // and unacknowledged messages stay with the broker.
                    error!(fleet = %me.fleet, "{other} became active for this fleet before this instance: stopping");
                    let _ = ready.send(false);
                    engine.flush()?;
                    end_session(&client, connected, &stop_session).await;
                    return Err(EngineError::AnotherCoordinator {
                        fleet: me.fleet.clone(),
                        prefix: prefix.clone(),
                        other: Box::new(other),
                    });
                }
                // Gates are evaluated every STEP_EVERY reports, not only once per
                // batch: the report that completes a gate moves the rollout after
                // at most that many more verifications, not a whole batch and flush.
                // The batch's signatures are checked on the verify threads while
                // the engine applies the units already checked.
                let topics: Vec<std::borrow::Cow<'_, str>> = acks.iter().map(|p| String::from_utf8_lossy(&p.topic)).collect();
                let msgs: Vec<(&str, &[u8])> = topics.iter().zip(&acks).map(|(t, p)| (t.as_ref(), &p.payload[..])).collect();
                let mut unit_started = std::time::Instant::now();
                let mut unstepped = 0;
                let (parsed, plans) = engine.plan_checks(&msgs);
                // Units arrive in order: each takes its topics from the front.
                let mut parsed = parsed.into_iter();
                pipeline(plans, now, verify_threads, cfg.batch_signatures, STEP_EVERY, |first, checked| {
                    let n = checked.len();
                    for ((p, topic), pre) in acks[first..].iter().zip(parsed.by_ref().take(n)).zip(checked) {
                        let reply = ReplyTo {
                            response_topic: p.properties.as_ref().and_then(|pr| pr.response_topic.clone()),
                            correlation: p.properties.as_ref().and_then(|pr| pr.correlation_data.as_ref().map(|b| b.to_vec())),
                        };
                        outs.extend(engine.handle_parsed(topic, &p.payload, reply, now, pre)?);
                    }
                    unstepped += n;
                    if unstepped >= STEP_EVERY {
                        // In order: what the unit produced (a create's first
                        // manifest) goes out before anything a step publishes.
                        sink.send_all(std::mem::take(&mut outs));
                        step(&mut engine, &sink, &manifest_prefix, metrics.as_deref(), unit_started, now)?;
                        unit_started = std::time::Instant::now();
                        unstepped = 0;
                    }
                    Ok::<(), EngineError>(())
                })?;
                let has_report = cfg.crash_at.is_some()
                    && topics.iter().any(|t| t.ends_with("/report"));
                if has_report && cfg.crash_at == Some(CrashAt::Apply) {
                    error!("crash hook: aborting after apply, before the flush");
                    std::process::abort();
                }
                engine.flush()?;
                if has_report && cfg.crash_at == Some(CrashAt::Flush) {
                    error!("crash hook: aborting after the flush, before the acks");
                    std::process::abort();
                }
                for p in &acks {
                    if let Err(e) = client.try_ack(p)
                        && let Some(g) = ACKS_NOT_SENT.hit()
                    {
                        // The broker redelivers it; the engine drops the replay.
                        warn!(error = %e, suppressed = g.suppressed, total = g.total, "ack not sent");
                    }
                }
                sink.send_all(outs);
                step(&mut engine, &sink, &manifest_prefix, metrics.as_deref(), unit_started, now)?;
                for f in engine.take_forwarded() {
                    if let Some(tx) = &forward
                        && let Err(e) = tx.try_send(f)
                    {
                        // Visible load shedding, with a reply: the controller is behind.
                        let f = match e {
                            mpsc::error::TrySendError::Full(f) | mpsc::error::TrySendError::Closed(f) => f,
                        };
                        warn!(op = f.op.name(), "controller busy: command refused");
                        let body = Reply::refused(Some(f.op.name()), "busy", "the Kubernetes controller is not keeping up; retry".into());
                        sink.send_all(engine.reply_out(f.id.as_deref(), f.reply_to.as_deref(), &f.reply, body));
                    }
                }
                if let Some(m) = &metrics {
                    m.observe_batch(&engine.counters, size, started.elapsed());
                }
            }
            _ = tick.tick() => {
                let now = ingest.now_ms();
                let granted = ingest.subscriptions.all_granted();
                let effects = ingest.probe.tick(now, ingest.connected && granted);
                probe_effects(effects, &mut ingest, &session, metrics.as_deref());
                set_ready(&ingest, &ready, metrics.as_deref());
                sink.send_all(engine.tick(unix_now())?);
                if let Some(m) = &metrics {
                    m.observe_counters(&engine.counters);
                    m.observe_session(&[&claimed, &session.stats]);
                }
            }
            _ = beacon.tick() => {
                sink.send_all(engine.beacon(unix_now())?);
            }
            _ = refresh.tick() => {
                publish(&client, presence_out(presence::State::Online));
            }
        }
    }
    if let Some(m) = &metrics {
        m.set_connected(false);
    }
    info!("shutting down: flushing state");
    engine.flush()?;
    // Say goodbye so the retained presence is not left at "online" (a normal
    // DISCONNECT discards the Last Will).
    sink.send(presence_out(presence::State::Offline));
    let _ = client.try_disconnect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}
