//! Delivery of the outbox over one MQTT connection: up to [`WINDOW`] reports in
//! flight, each removed from the outbox only when the broker's PUBACK for its
//! packet id arrives. rumqttc reports the packet id of each publish as it goes
//! out, in request order, so a FIFO of "what was requested" maps ids to outbox
//! keys. On a disconnect everything in flight is forgotten and resent from the
//! outbox (the coordinator drops the duplicates by their report counter).

use crate::store::AgentStore;
use rumqttc::v5::AsyncClient;
use rumqttc::v5::mqttbytes::QoS;
use std::collections::{BTreeSet, HashMap, VecDeque};
use tracing::{debug, warn};

/// Reports in flight at once.
pub const WINDOW: usize = 16;

#[derive(Debug, Default)]
pub struct Link {
    pub connected: bool,
    /// One entry per QoS 1 publish requested, in order: the outbox key, if any.
    requested: VecDeque<Option<u64>>,
    /// Packet id → outbox key, for publishes on the wire.
    inflight: HashMap<u16, u64>,
    /// Outbox keys handed to the client and not yet acknowledged.
    sent_keys: BTreeSet<u64>,
}

impl Link {
    pub fn disconnected(&mut self) {
        self.connected = false;
        self.requested.clear();
        self.inflight.clear();
        self.sent_keys.clear();
    }

    /// A publish that is not from the outbox (hello, online).
    pub fn publish_other(
        &mut self,
        client: &AsyncClient,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) {
        if !self.connected {
            return;
        }
        match client.try_publish(topic, QoS::AtLeastOnce, retain, payload) {
            Ok(()) => self.requested.push_back(None),
            Err(e) => warn!(error = %e, "publish not queued"),
        }
    }

    /// Sends queued reports until the window is full.
    pub fn pump(&mut self, client: &AsyncClient, store: &AgentStore, topic: &str) {
        if !self.connected || self.sent_keys.len() >= WINDOW {
            return;
        }
        let queued = match store.peek(WINDOW + self.sent_keys.len()) {
            Ok(q) => q,
            Err(e) => {
                warn!(error = %e, "outbox unreadable");
                return;
            }
        };
        for q in queued {
            if self.sent_keys.len() >= WINDOW {
                break;
            }
            if self.sent_keys.contains(&q.key) {
                continue;
            }
            match client.try_publish(topic, QoS::AtLeastOnce, false, q.bytes) {
                Ok(()) => {
                    self.requested.push_back(Some(q.key));
                    self.sent_keys.insert(q.key);
                }
                Err(e) => {
                    debug!(error = %e, "client queue full; later");
                    break;
                }
            }
        }
    }

    /// rumqttc sent the next requested publish as `pkid`.
    pub fn sent(&mut self, pkid: u16) {
        if let Some(Some(key)) = self.requested.pop_front() {
            self.inflight.insert(pkid, key);
        }
    }

    /// The broker acknowledged `pkid`: the outbox key to remove, if it was a report.
    pub fn acked(&mut self, pkid: u16) -> Option<u64> {
        let key = self.inflight.remove(&pkid)?;
        self.sent_keys.remove(&key);
        Some(key)
    }
}
