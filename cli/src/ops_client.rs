//! An operator's MQTT connection: sends JSON commands on `{p}/ops/{fleet}/cmd`
//! with an MQTT 5 response topic and waits for the reply; follows the fleet's
//! retained statuses and its event stream. Without a fleet it takes the one
//! whose coordinator announces itself on the prefix (`{p}/ops/+/coordinator`).

use anyhow::{Context as _, Result, bail};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;
use swell_coordinator::ops::OPS_DOMAIN;
use swell_coordinator::presence::{self, Presence};
use swell_coordinator::status::{Reply, RolloutEvent, RolloutStatus};
use swell_mqtt::MqttConfig;
use swell_protocol::topics::{Topic, Topics};
use swell_protocol::{FleetId, SecretKey};
use tokio::sync::mpsc;

/// Something the operator connection received.
#[derive(Debug)]
pub enum Seen {
    Reply(Reply<Value>),
    Status(FleetId, Box<RolloutStatus>),
    Event(FleetId, RolloutEvent),
    Presence(FleetId, Presence),
}

/// A command's answer as the type the command answers with (`RolloutStatus`
/// for `status <id>`, `FleetSummary` for `fleet`, …).
pub fn answer<T: DeserializeOwned>(reply: &Reply<Value>) -> Result<T> {
    let v = reply.status.clone().unwrap_or(Value::Null);
    serde_json::from_value(v).context("the coordinator's answer is not what this command answers")
}

/// An operator connection.
#[derive(Debug)]
pub struct OpsClient {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Seen>,
    topics: Topics,
    /// The fleet whose coordinator it talks to (see [`OpsClient::resolve_fleet`]).
    fleet: Option<FleetId>,
    /// The coordinators that announced themselves, by fleet.
    presences: HashMap<FleetId, Presence>,
    reply_topic: String,
    n: u64,
    /// Operator key: commands are signed with it (required when the key list
    /// names operator keys).
    signer: Option<SecretKey>,
    pub statuses: HashMap<String, RolloutStatus>,
    pub events: Vec<RolloutEvent>,
}

impl OpsClient {
    /// Connects and subscribes to replies, statuses and events. Replies come on
    /// `swell-ops/{user}/{client id}/replies`: a broker that enforces Swell's
    /// rules lets only this operator's user read them.
    pub async fn connect(
        cfg: &MqttConfig,
        topics: Topics,
        fleet: Option<FleetId>,
    ) -> Result<OpsClient> {
        let (host, port) = (cfg.host.as_str(), cfg.port);
        let mut opts = swell_mqtt::options(cfg, None);
        // Replies and statuses change nothing on disk here: acked on arrival.
        opts.set_manual_acks(false);
        let (client, mut eventloop) = AsyncClient::new(opts, 1_000);
        let user = cfg
            .credentials
            .as_ref()
            .map_or("anonymous", |(u, _)| u.as_str());
        let reply_topic = format!(
            "{}/{user}/{}/replies",
            swell_broker::rules::REPLIES_ROOT,
            cfg.client_id
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let (up_tx, up_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
        let t = topics.clone();
        let rt = reply_topic.clone();
        // Made again on every connection that may lack them: a connection
        // dropped during a large Hello burst (keep-alive starved) came back
        // with a clean session and no subscriptions, and every later reply
        // was lost (a 1,000,000-device benchmark waited for its deadline).
        let every = |tail: &str| format!("{}/ops/+/{tail}", topics.prefix());
        let mut subs = swell_mqtt::Subscriptions::new(vec![
            (reply_topic.clone(), QoS::AtLeastOnce),
            (every("rollout/+/status"), QoS::AtLeastOnce),
            (every("events"), QoS::AtLeastOnce),
            (every("coordinator"), QoS::AtLeastOnce),
        ]);
        let sub_client = client.clone();
        tokio::spawn(async move {
            let mut up = Some(up_tx);
            loop {
                let event = eventloop.poll().await;
                if let Ok(ev) = &event {
                    subs.note(&sub_client, ev);
                }
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(u) = up.take() {
                            let _ = u.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        // What does not parse (a removed rollout's empty
                        // retained status, a newer coordinator's shape) is skipped.
                        let seen = if topic == rt {
                            serde_json::from_slice(&p.payload).map(Seen::Reply).ok()
                        } else {
                            match t.parse(&topic) {
                                Ok(Topic::OpsEvents { fleet }) => {
                                    serde_json::from_slice(&p.payload)
                                        .map(|e| Seen::Event(fleet, e))
                                        .ok()
                                }
                                Ok(Topic::OpsStatus { fleet, .. }) => {
                                    serde_json::from_slice(&p.payload)
                                        .map(|s| Seen::Status(fleet, Box::new(s)))
                                        .ok()
                                }
                                Ok(Topic::Coordinator { fleet }) => {
                                    presence::parse(&p.payload).map(|p| Seen::Presence(fleet, p))
                                }
                                _ => None,
                            }
                        };
                        let Some(seen) = seen else {
                            continue;
                        };
                        if tx.send(seen).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(u) = up.take() {
                            let _ = u.send(Err(e.to_string()));
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), up_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => bail!("cannot connect to the broker at {host}:{port}: {e}"),
            _ => bail!("no answer from the broker at {host}:{port} within 10 s"),
        }
        Ok(OpsClient {
            client,
            rx,
            topics,
            fleet,
            presences: HashMap::new(),
            reply_topic,
            n: 0,
            signer: None,
            statuses: HashMap::new(),
            events: Vec::new(),
        })
    }

    /// Signs every command from now on with `key`.
    pub fn sign_with(&mut self, key: SecretKey) {
        self.signer = Some(key);
    }

    /// The command as sent: plain, or wrapped with the operator's signature over
    /// its exact text, with `issued_at`, a `nonce` (the request id is unique),
    /// the command topic it is for (`to`) and where its answer goes
    /// (`reply_to`), so it is good for that coordinator and that reply only.
    fn wire(&self, mut c: Value, id: &str, to: &str) -> Value {
        let Some(key) = &self.signer else {
            return c;
        };
        c["to"] = json!(to);
        c["reply_to"] = json!(self.reply_topic);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        c["issued_at"] = json!(now);
        c["nonce"] = json!(id);
        let text = c.to_string();
        let sig = key.sign(OPS_DOMAIN, &[text.as_bytes()]);
        json!({
            "signed": text,
            "key_id": key.key_id().to_string(),
            "sig": hex::encode(sig.0),
        })
    }

    fn absorb(&mut self, seen: Seen) -> Option<Reply<Value>> {
        let ours = |f: &FleetId| self.fleet.as_ref() == Some(f);
        match seen {
            Seen::Reply(v) => return Some(v),
            Seen::Status(f, s) if ours(&f) => {
                self.statuses.insert(s.rollout.clone(), *s);
            }
            Seen::Event(f, e) if ours(&f) => self.events.push(e),
            Seen::Presence(f, p) => {
                self.presences.insert(f, p);
            }
            Seen::Status(..) | Seen::Event(..) => {}
        }
        None
    }

    /// The fleet it talks to: the one given, or the one whose coordinator is
    /// online on the prefix (waiting for one until `timeout`); an error when
    /// none shows up or several fleets have one.
    pub async fn resolve_fleet(&mut self, timeout: Duration) -> Result<FleetId> {
        if let Some(f) = &self.fleet {
            return Ok(f.clone());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let online = |me: &Self| -> Vec<FleetId> {
            let mut v: Vec<FleetId> = me
                .presences
                .iter()
                .filter(|(_, p)| p.state == presence::State::Online)
                .map(|(f, _)| f.clone())
                .collect();
            v.sort();
            v
        };
        while online(self).is_empty() {
            if !self.next(deadline).await {
                bail!(
                    "no coordinator announced itself on {}/ops/+/coordinator within {} s; is it running? (--fleet names the fleet without asking)",
                    self.topics.prefix(),
                    timeout.as_secs()
                );
            }
        }
        // Retained presences arrive together: a moment for the others.
        let settle = tokio::time::Instant::now() + Duration::from_millis(300);
        while self.next(settle.min(deadline)).await {}
        let fleets = online(self);
        match fleets.as_slice() {
            [one] => {
                self.fleet = Some(one.clone());
                Ok(one.clone())
            }
            many => bail!(
                "coordinators of several fleets are online on {}: {}; choose one with --fleet",
                self.topics.prefix(),
                many.iter()
                    .map(|f| f.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Sends a command and waits for its reply. A coordinator that has not
    /// subscribed yet does not see commands (they are not retained), so the
    /// command is sent again until `timeout`.
    pub async fn command(&mut self, cmd: Value, timeout: Duration) -> Result<Reply<Value>> {
        let deadline = tokio::time::Instant::now() + timeout;
        // One id and one wire form for every resend: a slow coordinator that
        // gets the command twice answers the first copy first, and that answer
        // (not the second copy's "already exists") is the one returned.
        self.n += 1;
        let id = format!("{}-{}", std::process::id(), self.n);
        let mut c = cmd.clone();
        c["id"] = json!(id);
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let fleet = self.resolve_fleet(remaining).await?;
        let cmd_topic = self.topics.ops_cmd(&fleet);
        let c = self.wire(c, &id, &cmd_topic);
        loop {
            let props = PublishProperties {
                response_topic: Some(self.reply_topic.clone()),
                ..Default::default()
            };
            self.client
                .publish_with_properties(
                    cmd_topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    c.to_string(),
                    props,
                )
                .await
                .context("publishing the command")?;
            let attempt = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
            while let Ok(Some(seen)) = tokio::time::timeout_at(attempt, self.rx.recv()).await {
                // The reply topic is this client's own; a refusal issued before
                // the coordinator could trust the command (a forged signature)
                // carries no id, and is the answer to the command in flight.
                if let Some(v) = self.absorb(seen)
                    && v.id.as_ref().is_none_or(|i| *i == id)
                {
                    return Ok(v);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "no reply from the coordinator within {} s (is it running and connected?)",
                    timeout.as_secs()
                );
            }
        }
    }

    /// Waits for the next status or event (or `until`), absorbing it.
    pub async fn next(&mut self, until: tokio::time::Instant) -> bool {
        match tokio::time::timeout_at(until, self.rx.recv()).await {
            Ok(Some(seen)) => {
                self.absorb(seen);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use swell_e2e::link::Proxy;

    fn test_fleet() -> FleetId {
        FleetId::new("plant").unwrap()
    }

    /// Stands in for the coordinator: answers every command with its id and
    /// how many commands it has seen.
    async fn answer_commands(port: u16, topics: Topics, login: (String, String)) {
        let mut opts =
            rumqttc::v5::MqttOptions::new("swell-coordinator-ops-test", "127.0.0.1", port);
        opts.set_credentials(login.0, login.1);
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        client
            .subscribe(topics.ops_cmd(&test_fleet()), QoS::AtLeastOnce)
            .await
            .unwrap();
        let mut seen = 0u64;
        loop {
            let Ok(ev) = eventloop.poll().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Event::Incoming(Packet::Publish(p)) = ev else {
                continue;
            };
            let cmd: Value = serde_json::from_slice(&p.payload).unwrap();
            let to = p.properties.and_then(|p| p.response_topic).unwrap();
            seen += 1;
            let reply = json!({"id": cmd["id"], "ok": true, "seen": seen});
            client
                .publish(to, QoS::AtLeastOnce, false, reply.to_string())
                .await
                .unwrap();
        }
    }

    /// A clean MQTT session loses its subscriptions with the connection: the
    /// client must make them again, or every reply after a network blip is
    /// lost and each command waits for its deadline.
    #[tokio::test]
    async fn commands_are_answered_after_the_link_comes_back() {
        let b = swell_e2e::broker::TestBroker::embedded();
        let topics = Topics::default();
        tokio::spawn(answer_commands(
            b.port,
            topics.clone(),
            b.login(swell_broker::Role::Coordinator),
        ));
        let proxy = Proxy::start(b.port).await.unwrap();
        let cfg = MqttConfig {
            host: "127.0.0.1".into(),
            port: proxy.port,
            client_id: "ops-reconnect".into(),
            credentials: Some(b.login(swell_broker::Role::Operator)),
            keep_alive: Duration::from_secs(30),
            max_packet: 1 << 20,
            persistent: false,
            tls: None,
        };
        let mut ops = OpsClient::connect(&cfg, topics, Some(test_fleet()))
            .await
            .unwrap();
        let first = ops
            .command(json!({"op": "list"}), Duration::from_secs(20))
            .await
            .unwrap();
        assert!(first.ok);

        proxy.set_up(false);
        tokio::time::sleep(Duration::from_secs(1)).await;
        proxy.set_up(true);

        let second = ops
            .command(json!({"op": "list"}), Duration::from_secs(30))
            .await
            .unwrap();
        assert!(second.ok);
        assert_eq!(second.id, Some(format!("{}-2", std::process::id())));
    }
}
