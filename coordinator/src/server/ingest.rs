//! The ingest path's facts that readiness is made of: connected, every
//! subscription granted, and the coordinator's own probes back through each
//! filter; the probe's effects carried out.

use super::sink::publish;
use crate::engine::Out;
use crate::ingest_probe::{Effect, IngestProbe};
use crate::metrics::Metrics;
use swell_mqtt::{self as mqtt};
use tokio::sync::watch;
use tracing::{error, info};

/// The ingest path's facts readiness is made of.
pub(super) struct Ingest {
    pub(super) probe: IngestProbe,
    pub(super) connected: bool,
    pub(super) subscriptions: swell_mqtt::Subscribed,
    /// Milliseconds are counted from here for the probes.
    pub(super) started: std::time::Instant,
}

impl Ingest {
    pub(super) fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Why the loop is not ready (None: it is).
    pub(super) fn problem(&self) -> Option<String> {
        if !self.connected {
            return Some("not connected to the MQTT broker".into());
        }
        let waiting: Vec<&str> = self
            .subscriptions
            .filters
            .iter()
            .filter_map(|(f, st)| match st {
                swell_mqtt::FilterState::Granted => None,
                _ => Some(f.as_str()),
            })
            .collect();
        if let Some((f, swell_mqtt::FilterState::Refused(why))) = self
            .subscriptions
            .filters
            .iter()
            .find(|(_, st)| matches!(st, swell_mqtt::FilterState::Refused(_)))
        {
            return Some(format!("the broker refused the subscription {f} ({why})"));
        }
        if !waiting.is_empty() {
            return Some(format!("no SUBACK yet for {}", waiting.join(", ")));
        }
        let unproven: Vec<String> = self
            .probe
            .states()
            .filter(|(_, st)| *st != crate::ingest_probe::PathState::Up)
            .map(|(f, st)| format!("{f} ({st:?})"))
            .collect();
        if !unproven.is_empty() {
            return Some(format!(
                "own probe not back through {}",
                unproven.join(", ")
            ));
        }
        None
    }
}

/// Carries out the probe's effects: publishes, alarms, repairs.
pub(super) fn probe_effects(
    effects: Vec<Effect>,
    ingest: &mut Ingest,
    session: &mqtt::Session,
    metrics: Option<&Metrics>,
) {
    for e in effects {
        match e {
            Effect::Send { topic, payload } => {
                publish(
                    &session.client,
                    Out {
                        topic,
                        payload,
                        retain: false,
                        correlation: None,
                        event: None,
                    },
                );
            }
            Effect::Dead { filter, reason } => {
                error!(%filter, %reason, "ingest path dead: device messages on this filter do not reach the gate; subscribing again");
                if let Some(m) = metrics {
                    m.ingest_probe_failed(&filter);
                    m.set_ingest_path(&filter, false);
                }
                session.repair(&filter);
                let now = ingest.now_ms();
                ingest.probe.on_repaired(&filter, now);
            }
            Effect::Recovered { filter } => {
                info!(%filter, "ingest path back: the probe came through again");
            }
        }
    }
    if let Some(m) = metrics {
        for (filter, st) in ingest.probe.states() {
            m.set_ingest_path(filter, st == crate::ingest_probe::PathState::Up);
        }
    }
}

/// Publishes readiness (to the caller's watch and to `/readyz`).
pub(super) fn set_ready(ingest: &Ingest, ready: &watch::Sender<bool>, metrics: Option<&Metrics>) {
    let problem = ingest.problem();
    let now = problem.is_none();
    if let Some(m) = metrics {
        // "Not connected" has its own metric and its own readiness line.
        m.set_ingest_problem(problem.filter(|_| ingest.connected));
    }
    ready.send_if_modified(|r| std::mem::replace(r, now) != now);
}
