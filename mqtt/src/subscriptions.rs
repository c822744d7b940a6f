//! The subscriptions a client keeps, made on every connection and checked
//! filter by filter against the broker's SUBACKs (MQTT-5, MQTT-7).
//!
//! A broker's word that it kept the session (`session_present`) is not taken
//! as proof that it kept the subscriptions: Mosquitto 2.0.11 with
//! `persistence true` restores a session after a restart without its
//! `$share/...` subscriptions, and from then on answered every device report
//! with "no matching subscribers" while acknowledging it to the device. A
//! SUBSCRIBE for a filter the session already has is idempotent for the broker,
//! so every CONNACK subscribes again, whatever `session_present` says.
//!
//! Sans-IO: the owner feeds it the event loop's events ([`Subscriptions::note`])
//! and it asks the client for SUBSCRIBE packets. Each filter goes in a SUBSCRIBE
//! of its own, so a SUBACK's pkid names exactly one filter; pkids are learnt from
//! the outgoing events in request order (rumqttc's request queue is FIFO).

use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event};
use std::collections::{HashMap, VecDeque};
use tracing::{error, warn};

/// Where one filter stands on the current connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterState {
    /// Asked for, no SUBACK yet (or not connected).
    Pending,
    /// The broker granted it at the QoS asked for.
    Granted,
    /// The broker refused it, or granted less than the QoS asked for; the
    /// reason as the broker gave it.
    Refused(String),
}

/// What a SUBACK said about one filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAckOutcome {
    pub filter: String,
    pub state: FilterState,
}

/// The subscriptions of one client.
#[derive(Debug)]
pub struct Subscriptions {
    filters: Vec<(String, QoS)>,
    state: Vec<FilterState>,
    /// Filter indices requested and not yet seen going out, in request order.
    requested: VecDeque<usize>,
    /// Packet id of each SUBSCRIBE written and not yet acknowledged.
    in_flight: HashMap<u16, usize>,
    /// SUBSCRIBE packets requested since the start (one per filter and connection,
    /// plus repairs).
    subscribes: u64,
}

impl Subscriptions {
    pub fn new(filters: Vec<(String, QoS)>) -> Self {
        let state = vec![FilterState::Pending; filters.len()];
        Subscriptions {
            filters,
            state,
            requested: VecDeque::new(),
            in_flight: HashMap::new(),
            subscribes: 0,
        }
    }

    /// Feeds one event of the event loop. Subscribes on every CONNACK; returns
    /// what a SUBACK said, if this event was one.
    pub fn note(&mut self, client: &AsyncClient, event: &Event) -> Vec<SubAckOutcome> {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                self.on_connack(client);
                Vec::new()
            }
            Event::Outgoing(Outgoing::Subscribe(pkid)) => {
                if let Some(i) = self.requested.pop_front() {
                    self.in_flight.insert(*pkid, i);
                }
                Vec::new()
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                let Some(i) = self.in_flight.remove(&ack.pkid) else {
                    return Vec::new();
                };
                let (filter, asked) = &self.filters[i];
                let state = match ack.return_codes.first() {
                    Some(SubscribeReasonCode::Success(q)) if *q >= *asked => FilterState::Granted,
                    Some(SubscribeReasonCode::Success(q)) => {
                        FilterState::Refused(format!("granted {q:?}, asked for {asked:?}"))
                    }
                    Some(code) => FilterState::Refused(format!("{code:?}")),
                    None => FilterState::Refused("empty SUBACK".into()),
                };
                match &state {
                    FilterState::Refused(reason) => {
                        error!(%filter, %reason, "the broker refused a subscription: messages on it will not arrive");
                    }
                    _ => tracing::debug!(%filter, "subscription granted"),
                }
                self.state[i] = state.clone();
                vec![SubAckOutcome {
                    filter: filter.clone(),
                    state,
                }]
            }
            _ => Vec::new(),
        }
    }

    /// A new connection: none of the filters is confirmed on it.
    fn on_connack(&mut self, client: &AsyncClient) {
        self.requested.clear();
        self.in_flight.clear();
        for i in 0..self.filters.len() {
            self.request(client, i);
        }
    }

    /// Subscribes to `filter` again on this connection (an owner that found the
    /// path behind it dead). Unknown filters are ignored.
    pub fn repair(&mut self, client: &AsyncClient, filter: &str) {
        if let Some(i) = self.filters.iter().position(|(f, _)| f == filter) {
            self.request(client, i);
        }
    }

    fn request(&mut self, client: &AsyncClient, i: usize) {
        let (filter, qos) = &self.filters[i];
        self.state[i] = FilterState::Pending;
        self.subscribes += 1;
        match client.try_subscribe(filter.clone(), *qos) {
            Ok(()) => self.requested.push_back(i),
            // No SUBACK will come for it; the next connection asks again.
            Err(e) => warn!(%filter, error = %e, "subscribe request failed"),
        }
    }

    /// Every filter with its state on this connection.
    pub fn states(&self) -> impl Iterator<Item = (&str, &FilterState)> {
        self.filters
            .iter()
            .map(|(f, _)| f.as_str())
            .zip(self.state.iter())
    }

    /// Whether every filter was granted on this connection.
    pub fn all_granted(&self) -> bool {
        self.state.iter().all(|s| *s == FilterState::Granted)
    }

    /// Requested and not yet acknowledged.
    pub fn unconfirmed(&self) -> usize {
        self.state
            .iter()
            .filter(|s| **s == FilterState::Pending)
            .count()
    }

    /// SUBSCRIBE packets requested since the start.
    pub fn subscribes(&self) -> u64 {
        self.subscribes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::MqttOptions;
    use rumqttc::v5::mqttbytes::v5::{ConnAck, ConnectReturnCode, SubAck};

    fn connack(session_present: bool) -> Event {
        Event::Incoming(Packet::ConnAck(ConnAck {
            session_present,
            code: ConnectReturnCode::Success,
            properties: None,
        }))
    }

    fn suback(pkid: u16, code: SubscribeReasonCode) -> Event {
        Event::Incoming(Packet::SubAck(SubAck {
            pkid,
            return_codes: vec![code],
            properties: None,
        }))
    }

    fn sent(pkid: u16) -> Event {
        Event::Outgoing(Outgoing::Subscribe(pkid))
    }

    fn subs() -> (AsyncClient, rumqttc::v5::EventLoop, Subscriptions) {
        let (client, eventloop) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1883), 64);
        let s = Subscriptions::new(vec![
            ("a/#".into(), QoS::AtLeastOnce),
            ("$share/g/b/+".into(), QoS::AtLeastOnce),
        ]);
        (client, eventloop, s)
    }

    // MQTT-5, MQTT-7: a restored session is not trusted for its subscriptions.
    #[test]
    fn mqtt_subscriptions_are_made_on_every_connack_even_with_a_session() {
        let (client, _el, mut s) = subs();
        s.note(&client, &connack(false));
        assert_eq!(s.subscribes(), 2);
        s.note(&client, &sent(1));
        s.note(&client, &sent(2));
        s.note(
            &client,
            &suback(1, SubscribeReasonCode::Success(QoS::AtLeastOnce)),
        );
        s.note(
            &client,
            &suback(2, SubscribeReasonCode::Success(QoS::AtLeastOnce)),
        );
        assert!(s.all_granted());
        // The broker says it kept the session: subscribed again all the same.
        s.note(&client, &connack(true));
        assert_eq!(s.subscribes(), 4);
        assert_eq!(s.unconfirmed(), 2);
        assert!(!s.all_granted());
    }

    #[test]
    fn mqtt_subscriptions_check_every_suback_by_filter() {
        let (client, _el, mut s) = subs();
        s.note(&client, &connack(false));
        s.note(&client, &sent(7));
        s.note(&client, &sent(8));
        // Out of order, and the second refused.
        let out = s.note(&client, &suback(8, SubscribeReasonCode::NotAuthorized));
        assert_eq!(
            out,
            vec![SubAckOutcome {
                filter: "$share/g/b/+".into(),
                state: FilterState::Refused("NotAuthorized".into()),
            }]
        );
        let out = s.note(
            &client,
            &suback(7, SubscribeReasonCode::Success(QoS::AtMostOnce)),
        );
        assert!(
            matches!(&out[0].state, FilterState::Refused(r) if r.contains("granted AtMostOnce")),
            "a downgrade to QoS 0 loses messages: {out:?}"
        );
        assert!(!s.all_granted());
        assert_eq!(s.unconfirmed(), 0);
        // A SUBACK for a packet of an earlier connection says nothing.
        assert!(
            s.note(
                &client,
                &suback(99, SubscribeReasonCode::Success(QoS::AtLeastOnce))
            )
            .is_empty()
        );
    }

    #[test]
    fn mqtt_subscriptions_of_a_dropped_connection_are_asked_again() {
        let (client, _el, mut s) = subs();
        s.note(&client, &connack(false));
        s.note(&client, &sent(1));
        // The connection dropped before any SUBACK; the old pkid means nothing now.
        s.note(&client, &connack(true));
        s.note(&client, &sent(1));
        s.note(&client, &sent(2));
        s.note(
            &client,
            &suback(1, SubscribeReasonCode::Success(QoS::AtLeastOnce)),
        );
        s.note(
            &client,
            &suback(2, SubscribeReasonCode::Success(QoS::AtLeastOnce)),
        );
        assert!(s.all_granted());
    }

    #[test]
    fn mqtt_subscriptions_repair_one_filter() {
        let (client, _el, mut s) = subs();
        s.note(&client, &connack(false));
        s.note(&client, &sent(1));
        s.note(&client, &sent(2));
        s.note(
            &client,
            &suback(1, SubscribeReasonCode::Success(QoS::AtLeastOnce)),
        );
        s.note(
            &client,
            &suback(2, SubscribeReasonCode::Success(QoS::AtLeastOnce)),
        );
        s.repair(&client, "$share/g/b/+");
        s.repair(&client, "not/ours");
        assert_eq!(s.subscribes(), 3);
        let states: Vec<_> = s.states().map(|(_, st)| st.clone()).collect();
        assert_eq!(states, vec![FilterState::Granted, FilterState::Pending]);
        s.note(&client, &sent(3));
        s.note(
            &client,
            &suback(3, SubscribeReasonCode::Success(QoS::AtLeastOnce)),
        );
        assert!(s.all_granted());
    }
}
