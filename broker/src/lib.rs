//! Swell's embedded MQTT broker: rmqtt (MQTT 3.1.1 and 5 on one port, retained
//! messages, shared subscriptions) with Swell's own checks on every CONNECT,
//! SUBSCRIBE and PUBLISH, for single-machine use, `swell demo` and the tests.
//! Production fleets use Mosquitto with the configuration in `deploy/`, which
//! [`mosquitto`] renders from the same [`rules`].
//!
//! Layout:
//! - [`rules`]: who may do what (pure), the one table both brokers enforce;
//! - [`credentials`]: the users and passwords, generated into a directory;
//! - `hooks`: the checks as rmqtt hooks, with [`BrokerStats`];
//! - [`mosquitto`]: the Mosquitto ACL file and dynamic-security JSON;
//! - [`EmbeddedBroker`]: start on an address (fails when it cannot bind),
//!   stop on drop.

pub mod credentials;
mod hooks;
pub mod mosquitto;
pub mod rules;

pub use credentials::{Credentials, CredentialsError};
pub use hooks::BrokerStats;
pub use rules::{Identity, Role, Rules};

use rmqtt::context::ServerContext;
use rmqtt::hook::Type;
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Why the broker did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    #[error("embedded broker cannot listen on {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    #[error("embedded broker: {0}")]
    Start(String),
}

/// Settings of one broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    pub credentials: Credentials,
    pub rules: Rules,
    /// Messages a session may have queued (a coordinator's share of a mass
    /// reconnect: a Hello and an online flag per device). Beyond it the broker
    /// drops, as Mosquitto does beyond `max_queued_messages`.
    pub max_queued: usize,
}

impl BrokerConfig {
    pub fn new(listen: SocketAddr, credentials: Credentials, rules: Rules) -> Self {
        BrokerConfig {
            listen,
            credentials,
            rules,
            max_queued: 4_000_000,
        }
    }
}

/// A running broker; stopped when dropped.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
    stats: Arc<BrokerStats>,
    credentials: Credentials,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long a message may wait for a subscriber that is away: as long as a
/// persistent session lasts (the coordinator's and the agents' are 7 days).
const KEEP_FOR: Duration = Duration::from_secs(7 * 24 * 3600);

impl EmbeddedBroker {
    /// Starts the broker on its own thread and runtime; returns once it listens,
    /// or the reason it cannot (the address is taken, say).
    pub fn start(cfg: BrokerConfig) -> Result<Self, BrokerError> {
        let stats = Arc::new(BrokerStats::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr, BrokerError>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let credentials = cfg.credentials.clone();
        let task_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("embedded-broker".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("embedded-broker")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(BrokerError::Start(e.to_string())));
                        return;
                    }
                };
                rt.block_on(serve(cfg, task_stats, ready_tx, stop_rx));
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| BrokerError::Start(e.to_string()))?;
        let addr = match ready_rx.recv() {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(BrokerError::Start(
                    "the broker thread ended at start".into(),
                ));
            }
        };
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the embedded broker listens beyond this machine: anyone who can reach {addr} can try passwords; it speaks plain MQTT (no TLS), use Mosquitto with TLS (deploy/) for a fleet on a network");
        }
        Ok(EmbeddedBroker {
            addr,
            stats,
            credentials,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Where it listens (the port the kernel chose for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    pub fn stats(&self) -> &Arc<BrokerStats> {
        &self.stats
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// User name and password of a fixed role's user.
    pub fn login(&self, role: Role) -> Option<(String, String)> {
        let user = match role {
            Role::Coordinator => credentials::COORDINATOR_USER,
            Role::Operator => credentials::OPERATOR_USER,
            Role::Gateway => credentials::GATEWAY_USER,
            Role::Device => return None,
        };
        self.credentials
            .password(role)
            .map(|p| (user.to_string(), p.to_string()))
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    cfg: BrokerConfig,
    stats: Arc<BrokerStats>,
    ready: std::sync::mpsc::Sender<Result<SocketAddr, BrokerError>>,
    stop: oneshot::Receiver<()>,
) {
    let bind_err = |reason: String| BrokerError::Bind {
        addr: cfg.listen,
        reason,
    };
    let scx = ServerContext::new()
        // Retained messages without a TTL and without a cap on their number
        // (manifests, key list, beacon, one desired state and online flag per
        // device); shared subscriptions handed round-robin within each group
        // (the plugin's plain round robin counts across all groups, so with
        // two groups fed in turn each group's messages always went to the same
        // member).
        .plugins_config_map_add(
            "rmqtt-retainer",
            "max_retained_messages = 0\nretained_message_ttl = \"0s\"\n",
        )
        .plugins_config_map_add(
            "rmqtt-shared-subscription",
            "strategy = \"round_robin_per_group\"\n",
        )
        .build()
        .await;
    if let Err(e) = rmqtt_retainer::register(&scx, true, false).await {
        let _ = ready.send(Err(BrokerError::Start(format!("retained messages: {e}"))));
        return;
    }
    if let Err(e) = rmqtt_shared_subscription::register(&scx, true, false).await {
        let _ = ready.send(Err(BrokerError::Start(format!(
            "shared subscriptions: {e}"
        ))));
        return;
    }
    let register = scx.extends.hook_mgr().register();
    for t in [
        Type::ClientAuthenticate,
        Type::ClientSubscribeCheckAcl,
        Type::MessagePublishCheckAcl,
        Type::MessageDropped,
    ] {
        let checks = hooks::Checks {
            credentials: cfg.credentials.clone(),
            rules: cfg.rules.clone(),
            stats: stats.clone(),
        };
        register.add_priority(t, u32::MAX, Box::new(checks)).await;
    }
    register.start().await;
    let listener = match Builder::new()
        .name("swell")
        .laddr(cfg.listen)
        // A coordinator restarted on the same address must not wait out the
        // TIME_WAIT of its clients' old connections (a minute on Linux). A
        // port another process listens on is still refused.
        .reuseaddr(Some(true))
        .allow_anonymous(false)
        .max_packet_size(1024 * 1024)
        .max_mqueue_len(cfg.max_queued)
        // The client's Receive Maximum bounds it further (the coordinator asks
        // for 2,048).
        .max_inflight(NonZeroU16::new(4_096).unwrap_or(NonZeroU16::MIN))
        // Never resend on the same connection (MQTT 5 forbids it; an unacked
        // message is the coordinator still flushing) and never expire what
        // waits for a subscriber that is away.
        .message_retry_interval(Duration::ZERO)
        .message_expiry_interval(KEEP_FOR)
        .session_expiry_interval(KEEP_FOR)
        .max_session_expiry_interval(KEEP_FOR)
        .bind()
    {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(bind_err(e.to_string())));
            return;
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            let _ = ready.send(Err(bind_err(e.to_string())));
            return;
        }
    };
    let listener = match listener.tcp() {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(bind_err(e.to_string())));
            return;
        }
    };
    let server = MqttServer::new(scx).listener(listener).build();
    let _ = ready.send(Ok(addr));
    tokio::select! {
        r = server.run() => {
            if let Err(e) = r {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        }
        _ = stop => {}
    }
}
