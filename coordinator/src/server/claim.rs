//! The starting coordinator's claim on its fleet (RO-014): the connection that
//! carries out [`crate::presence::Claim`] before the coordinator's own session
//! exists, so a coordinator that must not act never takes the active one's
//! session over and never hears a device or a command.

use crate::engine::EngineError;
use crate::metrics::Metrics;
use crate::presence::{self, Claim, Heard, Presence, Verdict};
use rumqttc::v5::mqttbytes::QoS;
use std::sync::Arc;
use std::time::{Duration, Instant};
use swell_mqtt::{self as mqtt, Incoming, MqttConfig, SessionStats};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Longest wait for the own `starting` to come back once it is published.
const ECHO_TIMEOUT: Duration = Duration::from_secs(30);

/// Claims the fleet; the claim connection's counters, which `/metrics` adds
/// to the coordinator session's. `Ok(None)`: cancelled before it was decided.
pub(super) async fn claim(
    mqtt_cfg: &MqttConfig,
    prefix: &str,
    topic: &str,
    me: Presence,
    window: Duration,
    cancel: &CancellationToken,
    metrics: Option<&Metrics>,
) -> Result<Option<Arc<SessionStats>>, EngineError> {
    let fail = |reason: String| EngineError::Claim {
        fleet: me.fleet.clone(),
        reason,
    };
    let mut cfg = mqtt_cfg.clone();
    cfg.client_id = format!("{}-claim-{}", mqtt_cfg.client_id, me.instance);
    cfg.persistent = false;
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let mut session = mqtt::spawn(
        cfg,
        vec![(topic.to_string(), QoS::AtLeastOnce)],
        None,
        stop.clone(),
    );
    let mut incoming = session.take_incoming();
    let mut subscribed = session.subscriptions.clone();
    let stats = session.stats.clone();
    // A broker it cannot reach shows in `/metrics` while it waits.
    let mut observe = tokio::time::interval(Duration::from_millis(500));
    // Subscribed first: what was retained is delivered on the SUBACK.
    loop {
        {
            let s = subscribed.borrow();
            if s.all_answered() {
                if !s.all_granted() {
                    return Err(fail(format!(
                        "the broker refused the subscription to {topic}: its rules do not grant this coordinator fleet {} (an embedded broker serves the fleet of the coordinator that runs it, and no other)",
                        me.fleet
                    )));
                }
                break;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            _ = observe.tick() => {
                if let Some(m) = metrics {
                    m.observe_session(&[&stats]);
                }
            }
            changed = subscribed.changed() => {
                if changed.is_err() {
                    return Err(fail("the claim's MQTT session ended".into()));
                }
            }
        }
    }
    let started = Instant::now();
    let now_ms = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut claim = Claim::new(me.clone(), window);
    let starting = claim.starting().to_json();
    session
        .client
        .publish(topic, QoS::AtLeastOnce, false, starting)
        .await
        .map_err(|e| fail(format!("publishing on {topic}: {e}")))?;
    // Until the own `starting` is back, then until the watch window ends.
    let mut deadline = ECHO_TIMEOUT.as_millis() as u64;
    let mut echoed = false;
    let verdict = loop {
        let wait = Duration::from_millis(deadline.saturating_sub(now_ms()));
        let msg = tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            () = tokio::time::sleep(wait) => None,
            m = incoming.recv() => match m {
                Some(m) => Some(m),
                None => return Err(fail("the claim's MQTT session ended".into())),
            },
        };
        let v = match msg {
            None if !echoed => {
                return Err(fail(format!(
                    "its own presence never came back on {topic} within {} s (does the broker let the coordinator publish there?)",
                    ECHO_TIMEOUT.as_secs()
                )));
            }
            None => claim.on_deadline(now_ms()),
            Some(Incoming::Connected { .. }) => continue,
            Some(Incoming::Publish(p)) => {
                let _ = session.client.try_ack(&p);
                let Some(presence) = presence::parse(&p.payload) else {
                    warn!(topic, "not a coordinator presence: ignored");
                    continue;
                };
                if presence.instance == me.instance && presence.state == presence::State::Starting {
                    echoed = true;
                }
                claim.on_heard(
                    Heard {
                        presence,
                        retained: p.retain,
                    },
                    now_ms(),
                )
            }
        };
        match v {
            Verdict::Wait {
                until_ms: Some(until),
            } if deadline != until => {
                info!(
                    topic,
                    watch_ms = until.saturating_sub(now_ms()),
                    "another coordinator's presence is retained: watching it for a sign of life"
                );
                deadline = until;
            }
            Verdict::Wait { .. } => {}
            done => break done,
        }
    };
    let _ = session.client.try_disconnect();
    match verdict {
        Verdict::Go { stale: None } => Ok(Some(stats)),
        Verdict::Go { stale: Some(old) } => {
            warn!(
                topic,
                "the coordinator that was active for this fleet is gone without its Last Will ({old}; no sign of life in {} s): taking over",
                window.as_secs()
            );
            Ok(Some(stats))
        }
        Verdict::Taken(other) => Err(EngineError::AnotherCoordinator {
            fleet: me.fleet.clone(),
            prefix: prefix.to_string(),
            other: Box::new(other),
        }),
        Verdict::Wait { .. } => Err(fail("undecided".into())),
    }
}
