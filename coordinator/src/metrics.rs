//! Prometheus metrics (`swell_` prefix). Labels are bounded sets: reject
//! reasons, command outcomes, rollout phases and rollout ids, never device ids
//! (a million-device fleet would be a million series).

use crate::engine::{Counters, FleetGauges};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhatLabel {
    what: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FilterLabel {
    filter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

/// Where this replica stands in leader election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Not in Kubernetes mode: no election.
    NotUsed,
    /// Standby: the lease API answers, another replica holds the lease.
    Waiting,
    Holding,
    /// The lease API fails (RBAC, API server down).
    Failing,
}

/// Every metric the coordinator exports, and the health facts the probes read.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reports: Counter,
    hellos: Counter,
    takeovers: Counter,
    possible_freezes: Counter,
    new_incarnations: Counter,
    devices_removed: Family<ReasonLabel, Counter>,
    manifests: Counter,
    commands: Family<ResultLabel, Counter>,
    rejected: Family<ReasonLabel, Counter>,
    devices: Family<StateLabel, Gauge>,
    rollouts: Family<PhaseLabel, Gauge>,
    connected: Gauge,
    leader: Gauge,
    epoch: Gauge,
    batch_seconds: Histogram,
    batch_size: Histogram,
    gate_latency: Histogram,
    mqtt_dropped: Family<WhatLabel, Counter>,
    mqtt_unacked: Gauge,
    mqtt_received: Counter,
    mqtt_acked: Counter,
    mqtt_subscribes: Counter,
    mqtt_refused: Counter,
    mqtt_takeovers: Counter,
    mqtt_errors: Counter,
    ingest_up: Family<FilterLabel, Gauge>,
    ingest_failures: Family<FilterLabel, Counter>,
    /// Why the ingest path is not proven (None: it is, or nothing to prove).
    ingest_problem: Mutex<Option<String>>,
    broker_refused: Family<ReasonLabel, Counter>,
    broker_connections: Counter,
    broker_dropped: Counter,
    /// The embedded broker's counts, read at every scrape.
    broker: Mutex<Option<Arc<swell_broker::BrokerStats>>>,
    /// Raw gate-to-manifest samples (seconds) for benchmarks, capped.
    gate_samples: Mutex<Vec<f64>>,
    last: Mutex<Counters>,
    /// Milliseconds from `created` to the last turn of the engine loop, plus
    /// one; 0 before it runs. Monotonic: a step of the wall clock (NTP) must
    /// not make a live loop look stalled.
    heartbeat: AtomicU64,
    created: std::time::Instant,
    lease: Mutex<LeaseState>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("swell");
        let m = Metrics {
            reports: Counter::default(),
            hellos: Counter::default(),
            takeovers: Counter::default(),
            possible_freezes: Counter::default(),
            new_incarnations: Counter::default(),
            devices_removed: Family::default(),
            manifests: Counter::default(),
            commands: Family::default(),
            rejected: Family::default(),
            devices: Family::default(),
            rollouts: Family::default(),
            connected: Gauge::default(),
            leader: Gauge::default(),
            epoch: Gauge::default(),
            batch_seconds: Histogram::new(exponential_buckets(0.000_1, 4.0, 9)),
            batch_size: Histogram::new(exponential_buckets(1.0, 4.0, 6)),
            gate_latency: Histogram::new(exponential_buckets(0.000_5, 2.0, 14)),
            mqtt_dropped: Family::default(),
            mqtt_unacked: Gauge::default(),
            mqtt_received: Counter::default(),
            mqtt_acked: Counter::default(),
            mqtt_subscribes: Counter::default(),
            mqtt_refused: Counter::default(),
            mqtt_takeovers: Counter::default(),
            mqtt_errors: Counter::default(),
            ingest_up: Family::default(),
            ingest_failures: Family::default(),
            ingest_problem: Mutex::new(None),
            broker_refused: Family::default(),
            broker_connections: Counter::default(),
            broker_dropped: Counter::default(),
            broker: Mutex::new(None),
            gate_samples: Mutex::new(Vec::new()),
            last: Mutex::new(Counters::default()),
            heartbeat: AtomicU64::new(0),
            created: std::time::Instant::now(),
            lease: Mutex::new(LeaseState::NotUsed),
            registry: Registry::default(),
        };
        r.register("reports", "Device reports accepted", m.reports.clone());
        r.register("hellos", "Device hellos accepted", m.hellos.clone());
        r.register(
            "device_takeovers",
            "Device connections taken over by another client with the device's id, as the devices' session notes report them (swell fleet devices shows which)",
            m.takeovers.clone(),
        );
        r.register(
            "device_possible_freezes",
            "Reports of devices that their last beacon expired and no fresh one came (FRESH-3): the beacon is not reaching them",
            m.possible_freezes.clone(),
        );
        r.register(
            "device_new_incarnations",
            "Hellos that started a device's new incarnation after its trust state was rebuilt (STATE-3)",
            m.new_incarnations.clone(),
        );
        r.register(
            "devices_removed",
            "Devices removed from the registry, by reason: rejected by an operator, or pending and silent too long (ENROLL-4)",
            m.devices_removed.clone(),
        );
        r.register(
            "manifests_published",
            "Signed manifests published",
            m.manifests.clone(),
        );
        r.register(
            "commands",
            "Operator commands by result (accepted, refused)",
            m.commands.clone(),
        );
        r.register(
            "rejected_messages",
            "Messages and commands rejected, by reason",
            m.rejected.clone(),
        );
        r.register(
            "devices",
            "Devices by state (approved, pending, online, taken_over: their agents said another client took their connection over)",
            m.devices.clone(),
        );
        r.register("rollouts", "Rollouts by phase", m.rollouts.clone());
        r.register(
            "broker_connected",
            "1 while the MQTT session is up",
            m.connected.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the leader lease (or runs without election)",
            m.leader.clone(),
        );
        r.register(
            "epoch",
            "Epoch carried by every signed message of this replica",
            m.epoch.clone(),
        );
        r.register(
            "ingest_batch_seconds",
            "Time to apply and persist one batch of incoming messages",
            m.batch_seconds.clone(),
        );
        r.register(
            "ingest_batch_messages",
            "Messages per ingest batch",
            m.batch_size.clone(),
        );
        r.register(
            "gate_to_manifest_seconds",
            "From receiving the batch of reports that let a rollout move to publishing its next manifest",
            m.gate_latency.clone(),
        );
        r.register(
            "mqtt_dropped",
            "Acks and publishes the MQTT session could not queue (its request queue was full)",
            m.mqtt_dropped.clone(),
        );
        r.register(
            "mqtt_unacked",
            "QoS 1 messages received from the broker and not yet acknowledged",
            m.mqtt_unacked.clone(),
        );
        r.register(
            "mqtt_received",
            "QoS 1 messages received from the broker",
            m.mqtt_received.clone(),
        );
        r.register(
            "mqtt_acked",
            "Acknowledgements written to the broker",
            m.mqtt_acked.clone(),
        );
        r.register(
            "mqtt_subscribes",
            "SUBSCRIBE packets sent: every filter on every connection (a restored session is not trusted), and repairs",
            m.mqtt_subscribes.clone(),
        );
        r.register(
            "mqtt_subscriptions_refused",
            "Subscriptions the broker refused or downgraded below QoS 1",
            m.mqtt_refused.clone(),
        );
        r.register(
            "mqtt_session_takeovers",
            "Times the broker closed the coordinator's session because another client connected with its client id",
            m.mqtt_takeovers.clone(),
        );
        r.register(
            "mqtt_connection_errors",
            "Connection attempts and connections to the broker that ended in an error (refused, TLS, network)",
            m.mqtt_errors.clone(),
        );
        r.register(
            "ingest_path_up",
            "1 while the coordinator's own probe comes back through the filter",
            m.ingest_up.clone(),
        );
        r.register(
            "ingest_probe_failures",
            "Times a filter's probe was lost (the filter was then subscribed again)",
            m.ingest_failures.clone(),
        );
        r.register(
            "embedded_broker_refused",
            "What the embedded broker refused, by reason (bad_credentials, client_id: another identity's client id, will, subscribe, publish)",
            m.broker_refused.clone(),
        );
        r.register(
            "embedded_broker_connections",
            "Connections the embedded broker authenticated",
            m.broker_connections.clone(),
        );
        r.register(
            "embedded_broker_dropped",
            "Messages the embedded broker accepted and could not hand to a subscriber (queue full, session closing)",
            m.broker_dropped.clone(),
        );
        let m = Metrics { registry: r, ..m };
        m.set_lease(LeaseState::NotUsed);
        m
    }

    /// Exports the embedded broker's counts from now on.
    pub fn watch_broker(&self, stats: Arc<swell_broker::BrokerStats>) {
        if let Ok(mut b) = self.broker.lock() {
            *b = Some(stats);
        }
    }

    fn observe_broker(&self) {
        let Some(stats) = self.broker.lock().ok().and_then(|b| b.clone()) else {
            return;
        };
        for (reason, total) in [
            ("bad_credentials", stats.bad_credentials()),
            ("client_id", stats.client_id_refused()),
            ("will", stats.will_refused()),
            ("subscribe", stats.subscribe_refused()),
            ("publish", stats.publish_refused()),
        ] {
            let c = self.broker_refused.get_or_create(&ReasonLabel {
                reason: reason.into(),
            });
            c.inc_by(total.saturating_sub(c.get()));
        }
        self.broker_connections.inc_by(
            stats
                .connections()
                .saturating_sub(self.broker_connections.get()),
        );
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        self.observe_broker();
        let mut buf = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut buf, &self.registry);
        buf
    }

    /// Adds what the engine counted since the last call.
    pub fn observe_counters(&self, c: &Counters) {
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        self.reports.inc_by(c.reports.saturating_sub(last.reports));
        self.hellos.inc_by(c.hellos.saturating_sub(last.hellos));
        self.takeovers
            .inc_by(c.takeovers.saturating_sub(last.takeovers));
        self.possible_freezes
            .inc_by(c.possible_freezes.saturating_sub(last.possible_freezes));
        self.new_incarnations
            .inc_by(c.new_incarnations.saturating_sub(last.new_incarnations));
        for (reason, now, before) in [
            ("rejected", c.devices_rejected, last.devices_rejected),
            ("expired", c.pending_expired, last.pending_expired),
        ] {
            self.devices_removed
                .get_or_create(&ReasonLabel {
                    reason: reason.into(),
                })
                .inc_by(now.saturating_sub(before));
        }
        self.manifests
            .inc_by(c.manifests.saturating_sub(last.manifests));
        self.commands
            .get_or_create(&ResultLabel {
                result: "accepted".into(),
            })
            .inc_by(c.commands_accepted.saturating_sub(last.commands_accepted));
        self.commands
            .get_or_create(&ResultLabel {
                result: "refused".into(),
            })
            .inc_by(c.commands_refused.saturating_sub(last.commands_refused));
        for (reason, n) in &c.rejected {
            let before = last.rejected.get(reason).copied().unwrap_or(0);
            if *n > before {
                self.rejected
                    .get_or_create(&ReasonLabel {
                        reason: (*reason).to_string(),
                    })
                    .inc_by(n - before);
            }
        }
        *last = c.clone();
    }

    /// One ingest batch: its size, its duration and the counters after it.
    pub fn observe_batch(&self, c: &Counters, messages: usize, took: Duration) {
        self.batch_seconds.observe(took.as_secs_f64());
        self.batch_size.observe(messages as f64);
        self.observe_counters(c);
    }

    /// A batch of reports moved a rollout (a gate passed, a wave widened):
    /// the time from receiving the batch to publishing the new manifest.
    pub fn observe_gate_latency(&self, took: Duration) {
        let secs = took.as_secs_f64();
        self.gate_latency.observe(secs);
        if let Ok(mut v) = self.gate_samples.lock()
            && v.len() < 100_000
        {
            v.push(secs);
        }
    }

    /// The raw gate-to-manifest samples so far (seconds).
    pub fn gate_samples(&self) -> Vec<f64> {
        self.gate_samples
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    pub fn observe_gauges(&self, g: &FleetGauges) {
        for (state, n) in [
            ("approved", g.approved),
            ("pending", g.pending),
            ("online", g.online),
            ("taken_over", g.taken_over),
        ] {
            self.devices
                .get_or_create(&StateLabel {
                    state: state.into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        // Phases that emptied must read 0, not keep their last value.
        self.rollouts.clear();
        for (phase, n) in &g.rollouts {
            self.rollouts
                .get_or_create(&PhaseLabel {
                    phase: (*phase).to_string(),
                })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }

    /// The MQTT session's totals: acks and publishes dropped, messages unacked.
    /// The session's counts: what it could not queue (totals), and its
    /// [`swell_mqtt::Flow`].
    pub fn observe_mqtt(&self, acks_dropped: u64, publishes_dropped: u64, flow: &swell_mqtt::Flow) {
        for (what, total) in [("ack", acks_dropped), ("publish", publishes_dropped)] {
            let c = self
                .mqtt_dropped
                .get_or_create(&WhatLabel { what: what.into() });
            c.inc_by(total.saturating_sub(c.get()));
        }
        for (c, total) in [
            (&self.mqtt_received, flow.received()),
            (&self.mqtt_acked, flow.acked()),
        ] {
            c.inc_by(total.saturating_sub(c.get()));
        }
        self.mqtt_unacked
            .set(i64::try_from(flow.unacked()).unwrap_or(i64::MAX));
    }

    /// The session's subscription and takeover totals.
    /// The MQTT counters: the totals of this process's sessions (the claim's
    /// connection, `crate::presence`, and the coordinator's own).
    pub fn observe_session(&self, sessions: &[&swell_mqtt::SessionStats]) {
        let sum =
            |f: fn(&swell_mqtt::SessionStats) -> u64| sessions.iter().map(|s| f(s)).sum::<u64>();
        for (c, total) in [
            (
                &self.mqtt_subscribes,
                sum(swell_mqtt::SessionStats::subscribes),
            ),
            (&self.mqtt_refused, sum(swell_mqtt::SessionStats::refused)),
            (
                &self.mqtt_takeovers,
                sum(swell_mqtt::SessionStats::taken_over),
            ),
            (&self.mqtt_errors, sum(swell_mqtt::SessionStats::errors)),
        ] {
            c.inc_by(total.saturating_sub(c.get()));
        }
    }

    /// Whether the probe comes back through `filter`.
    pub fn set_ingest_path(&self, filter: &str, up: bool) {
        self.ingest_up
            .get_or_create(&FilterLabel {
                filter: filter.into(),
            })
            .set(i64::from(up));
    }

    /// A probe on `filter` was lost.
    pub fn ingest_probe_failed(&self, filter: &str) {
        self.ingest_failures
            .get_or_create(&FilterLabel {
                filter: filter.into(),
            })
            .inc();
    }

    /// Why readiness must fail although the broker is connected (None: no reason).
    pub fn set_ingest_problem(&self, problem: Option<String>) {
        if let Ok(mut p) = self.ingest_problem.lock() {
            *p = problem;
        }
    }

    pub fn ingest_problem(&self) -> Option<String> {
        self.ingest_problem.lock().ok().and_then(|p| p.clone())
    }

    pub fn set_connected(&self, up: bool) {
        self.connected.set(i64::from(up));
    }

    pub fn broker_connected(&self) -> bool {
        self.connected.get() == 1
    }

    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.set(i64::try_from(epoch).unwrap_or(i64::MAX));
    }

    pub fn set_lease(&self, state: LeaseState) {
        self.leader.set(i64::from(matches!(
            state,
            LeaseState::Holding | LeaseState::NotUsed
        )));
        if let Ok(mut l) = self.lease.lock() {
            *l = state;
        }
    }

    pub fn lease(&self) -> LeaseState {
        self.lease.lock().map_or(LeaseState::Failing, |l| *l)
    }

    fn since_created_ms(&self) -> u64 {
        u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Marks the engine loop as alive.
    pub fn heartbeat(&self) {
        self.heartbeat
            .store(self.since_created_ms() + 1, Ordering::Relaxed);
    }

    /// How long ago the engine loop last turned; `None` before it runs.
    pub fn since_heartbeat(&self) -> Option<std::time::Duration> {
        let beat = self.heartbeat.load(Ordering::Relaxed);
        (beat != 0).then(|| {
            std::time::Duration::from_millis(self.since_created_ms().saturating_sub(beat - 1))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // /healthz reads this: monotonic, so a wall-clock step cannot fake a stall.
    #[test]
    fn metrics_heartbeat_age_is_monotonic_and_none_before_the_loop_runs() {
        let m = Metrics::new();
        assert_eq!(m.since_heartbeat(), None);
        m.heartbeat();
        let age = m.since_heartbeat().unwrap();
        assert!(age < std::time::Duration::from_secs(5), "{age:?}");
    }

    // Attacks are visible: the embedded broker's refusals reach /metrics.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_broker_refusals_are_exported_by_reason() {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{AsyncClient, Event, MqttOptions};
        let dir = tempfile::tempdir().unwrap();
        let creds = swell_broker::Credentials::load_or_create(dir.path()).unwrap();
        let broker = swell_broker::EmbeddedBroker::start(swell_broker::BrokerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            creds,
            swell_broker::Rules::new("swell/v1", None),
        ))
        .unwrap();
        let m = Metrics::new();
        m.watch_broker(broker.stats().clone());
        let mut o = MqttOptions::new("swell-agent-dev-1", "127.0.0.1", broker.addr().port());
        o.set_credentials("dev-1", "wrong-password-00000");
        let (_c, mut el) = AsyncClient::new(o, 10);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let text = m.encode();
        assert!(
            text.contains("swell_embedded_broker_refused_total{reason=\"bad_credentials\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("swell_embedded_broker_dropped_total 0"),
            "{text}"
        );
    }

    #[test]
    fn counters_are_added_as_deltas_and_phases_reset() {
        let m = Metrics::new();
        let mut c = Counters {
            reports: 5,
            ..Default::default()
        };
        c.rejected.insert("forged", 2);
        m.observe_counters(&c);
        c.reports = 8;
        c.rejected.insert("forged", 3);
        m.observe_counters(&c);
        let text = m.encode();
        assert!(text.contains("swell_reports_total 8"), "{text}");
        assert!(
            text.contains("swell_rejected_messages_total{reason=\"forged\"} 3"),
            "{text}"
        );
        let mut g = FleetGauges::default();
        g.rollouts.insert("baking", 1);
        m.observe_gauges(&g);
        g.rollouts.clear();
        g.rollouts.insert("completed", 1);
        m.observe_gauges(&g);
        let text = m.encode();
        assert!(!text.contains("phase=\"baking\""), "{text}");
        assert!(
            text.contains("swell_rollouts{phase=\"completed\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn mqtt_totals_become_counters_and_a_gauge() {
        use rumqttc::v5::Event;
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
        let m = Metrics::new();
        let flow = swell_mqtt::Flow::default();
        let publish = |pkid| {
            let mut p = Publish::new("t", QoS::AtLeastOnce, "x", None);
            p.pkid = pkid;
            Event::Incoming(Packet::Publish(p))
        };
        for pkid in 1..=7 {
            flow.note(&publish(pkid));
        }
        m.observe_mqtt(3, 0, &flow);
        flow.note(&Event::Outgoing(rumqttc::Outgoing::PubAck(1)));
        flow.note(&Event::Outgoing(rumqttc::Outgoing::PubAck(2)));
        m.observe_mqtt(10, 1, &flow);
        let text = m.encode();
        assert!(text.contains("swell_mqtt_received_total 7"), "{text}");
        assert!(text.contains("swell_mqtt_acked_total 2"), "{text}");
        assert!(
            text.contains("swell_mqtt_dropped_total{what=\"ack\"} 10"),
            "{text}"
        );
        assert!(
            text.contains("swell_mqtt_dropped_total{what=\"publish\"} 1"),
            "{text}"
        );
        assert!(text.contains("swell_mqtt_unacked 5"), "{text}");
    }
}
