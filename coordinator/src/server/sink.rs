//! Where the loop's output goes: each publish handed to the MQTT client
//! without waiting (a full queue is counted and logged, not awaited), events
//! also to the process's listeners, and everything held until the first
//! connection's subscriptions are answered.

use crate::engine::Out;
use crate::status::RolloutEvent;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use swell_mqtt::log_throttle::LogThrottle;
use tokio::sync::broadcast;
use tracing::error;

pub(super) static ACKS_NOT_SENT: LogThrottle = LogThrottle::new();

pub(super) static PUBLISHES_DROPPED: LogThrottle = LogThrottle::new();

pub(super) fn publish(client: &rumqttc::v5::AsyncClient, out: Out) {
    let props = out.correlation.map(|c| PublishProperties {
        correlation_data: Some(Bytes::from(c)),
        ..Default::default()
    });
    let topic = out.topic.clone();
    let r = match props {
        Some(p) => client.try_publish_with_properties(
            out.topic,
            QoS::AtLeastOnce,
            out.retain,
            out.payload,
            p,
        ),
        None => client.try_publish(out.topic, QoS::AtLeastOnce, out.retain, out.payload),
    };
    if let Err(e) = r
        && let Some(g) = PUBLISHES_DROPPED.hit()
    {
        // Visible load shedding: the request queue to the broker is full.
        error!(%topic, error = %e, suppressed = g.suppressed, total = g.total, "publish dropped");
    }
}

/// Carries out what the engine decided: events to the hook, the rest to MQTT.
pub(super) struct Sink<'a> {
    pub(super) client: &'a rumqttc::v5::AsyncClient,
    pub(super) events: Option<&'a broadcast::Sender<RolloutEvent>>,
    /// What the engine said before the broker answered the first connection's
    /// SUBSCRIBEs, in order; `None` once it went out. A beacon of a new epoch
    /// makes devices say Hello only if it arrives live (devices take a retained
    /// one as proof that its coordinator already had their Hello), so the
    /// coordinator must be subscribed before its first beacon goes out.
    pub(super) held: std::cell::RefCell<Option<Vec<Out>>>,
}

impl Sink<'_> {
    /// The subscriptions are in place: what waited goes out, in order.
    pub(super) fn open(&self) {
        let held = self.held.borrow_mut().take();
        if let Some(outs) = held {
            self.send_all(outs);
        }
    }

    pub(super) fn send(&self, o: Out) {
        if let Some(held) = self.held.borrow_mut().as_mut() {
            held.push(o);
            return;
        }
        if let (Some(tx), Some(ev)) = (self.events, &o.event) {
            // No receiver (controller not started yet) is fine.
            let _ = tx.send((**ev).clone());
        }
        publish(self.client, o);
    }

    pub(super) fn send_all(&self, outs: Vec<Out>) {
        for o in outs {
            self.send(o);
        }
    }
}
