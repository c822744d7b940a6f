//! Swell's MQTT session, shared by the coordinator and the agent: rumqttc (MQTT 5)
//! driven by a task that backs off with jitter after errors and subscribes again
//! on every connection, checking each SUBACK (MQTT-5, MQTT-7) — rumqttc does
//! neither by itself. [`options`], [`backoff`] and [`Subscriptions`] are public
//! for callers that drive their own event loop (the agent tracks PUBACKs of its
//! outbox).

pub mod log_throttle;
pub mod reconnect;
mod subscriptions;

pub use subscriptions::{FilterState, SubAckOutcome, Subscriptions};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub credentials: Option<(String, String)>,
    pub keep_alive: Duration,
    /// Largest packet accepted from the broker (DL-1).
    pub max_packet: u32,
    /// Keep the session (subscriptions, queued QoS 1) across reconnects.
    pub persistent: bool,
    /// TLS (rustls with ring), for `mqtts://` brokers.
    pub tls: Option<TlsPem>,
}

/// PEM material for TLS: the CA that signed the broker's certificate, and
/// optionally a client certificate and key for mutual TLS.
#[derive(Clone)]
pub struct TlsPem {
    pub ca: Vec<u8>,
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(
            f,
            "TlsPem {{ ca: {} bytes, client auth: {} }}",
            self.ca.len(),
            self.client.is_some()
        )
    }
}

/// Why a broker URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("broker URL {url:?}: {reason}")]
pub struct UrlError {
    pub url: String,
    pub reason: &'static str,
}

/// A parsed broker URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// Parses `mqtt://host:port` (default port 1883) or `mqtts://host:port` (TLS,
/// default 8883); `[::1]:1883` for IPv6.
pub fn parse_url(url: &str) -> Result<BrokerUrl, UrlError> {
    let err = |reason| UrlError {
        url: url.to_string(),
        reason,
    };
    let (rest, tls) = if let Some(r) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        (r, false)
    } else if let Some(r) = url
        .strip_prefix("mqtts://")
        .or_else(|| url.strip_prefix("ssl://"))
    {
        (r, true)
    } else {
        return Err(err("use mqtt://host:port or mqtts://host:port"));
    };
    let default_port = if tls { 8883 } else { 1883 };
    let rest = rest.trim_end_matches('/');
    if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| err("unclosed '['"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| err("bad port"))?,
            None if after.is_empty() => default_port,
            None => return Err(err("junk after ']'")),
        };
        return Ok(BrokerUrl {
            host: host.to_string(),
            port,
            tls,
        });
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| err("bad port"))?),
        None => (rest, default_port),
    };
    if host.is_empty() {
        return Err(err("no host"));
    }
    Ok(BrokerUrl {
        host: host.to_string(),
        port,
        tls,
    })
}

/// Something the session delivers to its owner.
#[derive(Debug)]
pub enum Incoming {
    /// (Re)connected; the subscriptions are being made again (see
    /// [`Session::subscriptions`] for the broker's answers).
    Connected {
        session_present: bool,
    },
    Publish(Box<Publish>),
}

/// A running session.
#[derive(Debug)]
pub struct Session {
    pub client: AsyncClient,
    pub incoming: mpsc::Receiver<Incoming>,
    /// Whether the broker connection is up (for readiness).
    pub connected: watch::Receiver<bool>,
    /// Each subscription filter and what the broker answered on this connection.
    pub subscriptions: watch::Receiver<Subscribed>,
    pub flow: Arc<Flow>,
    pub stats: Arc<SessionStats>,
    repair: mpsc::UnboundedSender<String>,
}

/// The subscriptions of a session as the broker answered them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscribed {
    /// Counts connections: a new number means none of the filters was confirmed
    /// on it yet, whatever a watcher saw before.
    pub connection: u64,
    pub filters: Vec<(String, FilterState)>,
}

impl Subscribed {
    pub fn all_granted(&self) -> bool {
        self.filters.iter().all(|(_, s)| *s == FilterState::Granted)
    }

    /// The broker answered every SUBSCRIBE of this connection (granted or
    /// refused): from now on what arrives on a granted filter is delivered.
    pub fn all_answered(&self) -> bool {
        self.connection > 0 && self.filters.iter().all(|(_, s)| *s != FilterState::Pending)
    }
}

impl Session {
    /// The incoming messages, for an owner that keeps the session itself.
    pub fn take_incoming(&mut self) -> mpsc::Receiver<Incoming> {
        std::mem::replace(&mut self.incoming, mpsc::channel(1).1)
    }

    /// Subscribes to `filter` again (its path was found dead).
    pub fn repair(&self, filter: &str) {
        let _ = self.repair.send(filter.to_string());
    }
}

/// What happened to a session since it started, for metrics.
#[derive(Debug, Default)]
pub struct SessionStats {
    subscribes: AtomicU64,
    refused: AtomicU64,
    taken_over: AtomicU64,
    connections: AtomicU64,
    errors: AtomicU64,
}

impl SessionStats {
    /// SUBSCRIBE packets requested (every connection subscribes again).
    pub fn subscribes(&self) -> u64 {
        self.subscribes.load(Ordering::Relaxed)
    }
    /// Subscriptions the broker refused (or downgraded).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
    /// Times the broker closed the session because another client connected
    /// with its client id.
    pub fn taken_over(&self) -> u64 {
        self.taken_over.load(Ordering::Relaxed)
    }
    /// Connections made (CONNACKs).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
    /// Connection attempts and connections that ended in an error (refused,
    /// TLS, network).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

/// Whether a connection error is the broker's "another client took this
/// session" (MQTT 5 DISCONNECT reason 0x8E).
pub fn taken_over(e: &rumqttc::v5::ConnectionError) -> bool {
    matches!(
        e,
        rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
            reason_code: rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::SessionTakenOver,
            ..
        })
    )
}

/// QoS 1 publishes received and acks written by a session. What is received
/// and not yet acked is what the broker waits on; it grew to 3,000,000 when
/// rumqttc wrote one ack per turn (vendor/README.md).
#[derive(Debug, Default)]
pub struct Flow {
    received: AtomicU64,
    acked: AtomicU64,
    /// On this connection: a new one starts from zero (the broker redelivers
    /// what the old one left unacked).
    unacked: AtomicU64,
}

impl Flow {
    /// Since the session started.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
    /// Since the session started.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }
    /// Received on this connection and not yet acknowledged.
    pub fn unacked(&self) -> u64 {
        self.unacked.load(Ordering::Relaxed)
    }
    /// Counts what an event of the event loop says.
    pub fn note(&self, event: &Event) {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => self.unacked.store(0, Ordering::Relaxed),
            Event::Incoming(Packet::Publish(p)) if p.qos != QoS::AtMostOnce => {
                self.received.fetch_add(1, Ordering::Relaxed);
                self.unacked.fetch_add(1, Ordering::Relaxed);
            }
            Event::Outgoing(rumqttc::Outgoing::PubAck(_)) => {
                self.acked.fetch_add(1, Ordering::Relaxed);
                // Only the event loop's task writes: no lost update.
                let n = self.unacked.load(Ordering::Relaxed);
                self.unacked.store(n.saturating_sub(1), Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Exponential backoff with full jitter: uniform in `[0, min(max, min·2^n)]`,
/// so a fleet that lost its broker does not reconnect in lockstep.
pub fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_MIN
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX);
    jitter(ceiling).max(Duration::from_millis(10))
}

/// Uniform in `[0, max]`; `max` itself without randomness (a degraded mode,
/// not an error).
fn jitter(max: Duration) -> Duration {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return max;
    }
    let ms = max.as_millis() as u64;
    Duration::from_millis(if ms == 0 {
        0
    } else {
        u64::from_le_bytes(b) % (ms + 1)
    })
}

/// rumqttc options for `cfg`: manual acks, packet cap, session persistence,
/// credentials, Last Will and TLS (rustls with ring).
pub fn options(cfg: &MqttConfig, will: Option<LastWill>) -> MqttOptions {
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_keep_alive(cfg.keep_alive);
    opts.set_manual_acks(true);
    // Flow control: the broker sends at most this many unacknowledged QoS 1
    // messages. Without it Mosquitto pushes everything at once; the session
    // task then blocks on the full incoming queue, cannot send the acks and
    // replies queued behind it, and those were dropped (100,000 Hellos in the
    // fleet benchmark). Below the incoming queue's 4,096 so it never blocks long.
    opts.set_receive_maximum(Some(RECEIVE_MAXIMUM));
    opts.set_max_packet_size(Some(cfg.max_packet));
    opts.set_clean_start(!cfg.persistent);
    if cfg.persistent {
        opts.set_session_expiry_interval(Some(7 * 24 * 3600));
    }
    if let Some((u, p)) = &cfg.credentials {
        opts.set_credentials(u.clone(), p.clone());
    }
    if let Some(w) = will {
        opts.set_last_will(w);
    }
    if let Some(tls) = &cfg.tls {
        // ring, not aws-lc: installed once per process; a second install is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: tls.ca.clone(),
            alpn: None,
            client_auth: tls.client.clone(),
        }));
    }
    opts
}

/// Requests (acks, publishes) the session may have queued for the event loop.
pub const REQUEST_QUEUE: usize = 2_000_000;

/// Unacknowledged QoS 1 messages the broker may send a session at once.
pub const RECEIVE_MAXIMUM: u16 = 2_048;

/// Unacknowledged QoS 1 publishes the session may have out at once.
pub const OUTGOING_INFLIGHT: u16 = 4_096;

/// Starts the session task. It runs until `cancel` fires.
pub fn spawn(
    cfg: MqttConfig,
    subscriptions: Vec<(String, QoS)>,
    will: Option<LastWill>,
    cancel: CancellationToken,
) -> Session {
    let mut opts = options(&cfg, will);
    // rumqttc keeps a slot per possible in-flight publish, allocated up front:
    // 14 MB at its default of 65,535. The broker's own receive maximum is far
    // lower anyway (Mosquitto announces 20 unless tuned).
    opts.set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT);
    // Acks and publishes share this queue. A mass reconnect queues an ack per
    // device in a burst, so it is large; the channel allocates as it fills and
    // costs nothing when idle. The vendored rumqttc writes up to 64 queued
    // requests per turn, so acks keep pace with reads (vendor/README.md).
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_QUEUE);
    let (tx, rx) = mpsc::channel(4_096);
    let (up_tx, up_rx) = watch::channel(false);
    let (repair_tx, mut repair_rx) = mpsc::unbounded_channel::<String>();
    let sub_client = client.clone();
    let mut subscriptions = Subscriptions::new(subscriptions);
    let snapshot = |s: &Subscriptions, connection: u64| Subscribed {
        connection,
        filters: s
            .states()
            .map(|(f, st)| (f.to_string(), st.clone()))
            .collect(),
    };
    let (subs_tx, subs_rx) = watch::channel(snapshot(&subscriptions, 0));
    let flow = Arc::new(Flow::default());
    let stats = Arc::new(SessionStats::default());
    let task_flow = flow.clone();
    let task_stats = stats.clone();
    tokio::spawn(async move {
        let mut reconnect = reconnect::Reconnect::default();
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => break,
                Some(filter) = repair_rx.recv() => {
                    subscriptions.repair(&sub_client, &filter);
                    task_stats.subscribes.store(subscriptions.subscribes(), Ordering::Relaxed);
                    let _ = subs_tx.send(snapshot(&subscriptions, task_stats.connections()));
                    continue;
                }
                e = eventloop.poll() => e,
            };
            if let Ok(ev) = &event {
                task_flow.note(ev);
                if matches!(ev, Event::Incoming(Packet::ConnAck(_))) {
                    task_stats.connections.fetch_add(1, Ordering::Relaxed);
                }
                let outcomes = subscriptions.note(&sub_client, ev);
                let refused = outcomes
                    .iter()
                    .filter(|o| matches!(o.state, FilterState::Refused(_)))
                    .count() as u64;
                task_stats.refused.fetch_add(refused, Ordering::Relaxed);
                task_stats
                    .subscribes
                    .store(subscriptions.subscribes(), Ordering::Relaxed);
                if !outcomes.is_empty() || matches!(ev, Event::Incoming(Packet::ConnAck(_))) {
                    let _ = subs_tx.send(snapshot(&subscriptions, task_stats.connections()));
                }
            }
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    reconnect.connected(std::time::Instant::now());
                    let _ = up_tx.send(true);
                    info!(host = %cfg.host, port = cfg.port, session_present = ack.session_present, "connected to broker");
                    if tx
                        .send(Incoming::Connected {
                            session_present: ack.session_present,
                        })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(Incoming::Publish(Box::new(p))).await.is_err() {
                        break;
                    }
                }
                // Asked to leave: the broker closes the link next, which is
                // not a connection lost.
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(e) => {
                    let _ = up_tx.send(false);
                    task_stats.errors.fetch_add(1, Ordering::Relaxed);
                    let took = taken_over(&e);
                    let wait = reconnect.lost(took, std::time::Instant::now());
                    if took {
                        task_stats.taken_over.fetch_add(1, Ordering::Relaxed);
                    }
                    if wait.taken_over || wait.kicked >= 3 {
                        tracing::error!(client_id = %cfg.client_id, in_a_row = wait.kicked, taken_over = wait.taken_over, retry_in_ms = wait.after.as_millis() as u64, error = %e, "the broker keeps closing this connection soon after it opens (another client with this client id?); backing off");
                    } else {
                        warn!(error = %e, retry_in_ms = wait.after.as_millis() as u64, "broker connection lost");
                    }
                    let wait = wait.after;
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        let _ = up_tx.send(false);
    });
    Session {
        client,
        incoming: rx,
        connected: up_rx,
        subscriptions: subs_rx,
        flow,
        stats,
        repair: repair_tx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_url_parsing() {
        let u = |h: &str, port, tls| BrokerUrl {
            host: h.into(),
            port,
            tls,
        };
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884").unwrap(),
            u("127.0.0.1", 1884, false)
        );
        assert_eq!(
            parse_url("mqtt://broker").unwrap(),
            u("broker", 1883, false)
        );
        assert_eq!(
            parse_url("mqtt://[::1]:1885/").unwrap(),
            u("::1", 1885, false)
        );
        assert_eq!(
            parse_url("mqtts://broker").unwrap(),
            u("broker", 8883, true)
        );
        assert_eq!(parse_url("ssl://[::1]:9000").unwrap(), u("::1", 9000, true));
        for bad in [
            "http://x",
            "mqtt://",
            "mqtt://h:port",
            "mqtt://[::1",
            "mqtts://",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mqtt_flow_counts_unacked_per_connection() {
        use rumqttc::v5::mqttbytes::v5::ConnAck;
        let f = Flow::default();
        let publish = |pkid| {
            let mut p = Publish::new("t", QoS::AtLeastOnce, "x", None);
            p.pkid = pkid;
            Event::Incoming(Packet::Publish(p))
        };
        let ack = |pkid| Event::Outgoing(rumqttc::Outgoing::PubAck(pkid));
        for pkid in 1..=3 {
            f.note(&publish(pkid));
        }
        f.note(&Event::Incoming(Packet::Publish(Publish::new(
            "t",
            QoS::AtMostOnce,
            "x",
            None,
        ))));
        f.note(&ack(1));
        assert_eq!((f.received(), f.acked(), f.unacked()), (3, 1, 2));
        // Reconnected: the broker redelivers the two, once.
        f.note(&Event::Incoming(Packet::ConnAck(ConnAck {
            session_present: true,
            code: rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success,
            properties: None,
        })));
        assert_eq!(f.unacked(), 0);
        f.note(&publish(2));
        f.note(&publish(3));
        f.note(&ack(2));
        f.note(&ack(3));
        f.note(&ack(4)); // a stale ack never takes it below zero
        assert_eq!((f.received(), f.acked(), f.unacked()), (5, 4, 0));
    }

    // MQTT-5: reconnects back off with jitter.
    #[test]
    fn mqtt_backoff_is_bounded_and_grows() {
        for attempt in 0..40 {
            let b = backoff(attempt);
            assert!(b <= BACKOFF_MAX, "{b:?}");
        }
        // The ceiling grows: over many draws the late attempts wait longer.
        let early: u128 = (0..200).map(|_| backoff(0).as_millis()).sum();
        let late: u128 = (0..200).map(|_| backoff(10).as_millis()).sum();
        assert!(late > early * 10, "early {early} late {late}");
    }
}
