//! Proof that the ingest path works end to end (MQTT-7): the coordinator
//! publishes a probe on a topic each of its device filters covers
//! (`{p}/dev/_probe/{hello|report|online}`) and expects it back. A SUBACK only
//! says the broker took the subscription; Mosquitto with persistence restored a
//! session without its shared subscriptions and acknowledged every device report
//! into the void while the SUBACKs of the session before were all fine. Only a
//! message that comes back through the subscription shows that the gate hears
//! the fleet.
//!
//! Pure: the server loop says when probes may go out, hands over every probe
//! that arrives and every other message per filter, and carries out the
//! [`Effect`]s (log, metrics, readiness, re-subscription).
//!
//! A path is **dead** when
//! - a later probe came back while an earlier one on this connection did not:
//!   the earlier one went to someone else (messages from one publisher on one
//!   topic arrive in order, RFC-style ordering of MQTT 3.1.1 §4.6 and 5 §4.6), or
//! - its oldest probe has been out for `timeout` and not one message of any kind
//!   arrived on that filter since it was sent. A backlog keeps messages coming,
//!   so a slow coordinator is not a dead one; a deaf subscription gets nothing.
//!
//! It is **up** again when a probe sent after the last repair comes back.

use std::collections::BTreeMap;

/// Timing of the probes.
#[derive(Debug, Clone, Copy)]
pub struct ProbeConfig {
    /// A probe per path this often.
    pub interval_ms: u64,
    /// How long a probe may be out with nothing at all arriving on its filter.
    pub timeout_ms: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            interval_ms: 10_000,
            timeout_ms: 30_000,
        }
    }
}

/// Where a path stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathState {
    /// No probe has come back on this connection yet.
    Unproven,
    Up,
    Dead,
}

/// What the loop should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Publish `payload` (QoS 1, not retained) on `topic`.
    Send { topic: String, payload: Vec<u8> },
    /// The path behind `filter` lost a probe: alarm and subscribe again.
    Dead { filter: String, reason: String },
    /// A probe came back on a path that was dead.
    Recovered { filter: String },
}

#[derive(Debug)]
struct Path {
    filter: String,
    topic: String,
    state: PathState,
    /// Sequence number → when it was sent (ms).
    out: BTreeMap<u64, u64>,
    /// When the last message of any kind arrived on the filter (ms).
    last_traffic: u64,
    /// Probes with a lower sequence number were sent before the last repair and
    /// say nothing about the repaired subscription.
    from_seq: u64,
    lost: u64,
}

/// The probes of one coordinator process.
#[derive(Debug)]
pub struct IngestProbe {
    cfg: ProbeConfig,
    /// Random per process: a probe of an earlier process (redelivered from its
    /// session) or of another replica is not ours.
    nonce: u64,
    paths: Vec<Path>,
    seq: u64,
    last_round: Option<u64>,
}

const MAGIC: &[u8] = b"swell-probe/1 ";

impl IngestProbe {
    /// Probes for each `(filter, probe topic)` pair.
    pub fn new(cfg: ProbeConfig, nonce: u64, paths: Vec<(String, String)>) -> Self {
        IngestProbe {
            cfg,
            nonce,
            paths: paths
                .into_iter()
                .map(|(filter, topic)| Path {
                    filter,
                    topic,
                    state: PathState::Unproven,
                    out: BTreeMap::new(),
                    last_traffic: 0,
                    from_seq: 0,
                    lost: 0,
                })
                .collect(),
            seq: 0,
            last_round: None,
        }
    }

    /// Whether `topic` is one of the probe topics (such a message is never a
    /// device's and goes to [`IngestProbe::on_probe`], not to the engine).
    pub fn is_probe_topic(&self, topic: &str) -> bool {
        self.paths.iter().any(|p| p.topic == topic)
    }

    /// A new connection: what was out may come back or not; neither proves
    /// anything about this connection's subscriptions.
    pub fn on_connected(&mut self, now: u64) {
        for p in &mut self.paths {
            p.out.clear();
            p.from_seq = self.seq + 1;
            p.state = PathState::Unproven;
            p.last_traffic = now;
        }
        self.last_round = None;
    }

    /// The filter of a path was subscribed again (after it was found dead).
    pub fn on_repaired(&mut self, filter: &str, now: u64) {
        if let Some(p) = self.paths.iter_mut().find(|p| p.filter == filter) {
            p.out.clear();
            p.from_seq = self.seq + 1;
            p.last_traffic = now;
        }
    }

    /// A message that is not a probe arrived on the path of `filter`.
    pub fn on_traffic(&mut self, filter_index: usize, now: u64) {
        if let Some(p) = self.paths.get_mut(filter_index) {
            p.last_traffic = now;
        }
    }

    /// Which path a topic's messages arrive on (by its last level, as the
    /// device filters `{p}/dev/+/{channel}` are built).
    pub fn path_of(&self, topic: &str) -> Option<usize> {
        let channel = topic.rsplit('/').next()?;
        self.paths
            .iter()
            .position(|p| p.filter.rsplit('/').next() == Some(channel))
    }

    /// A probe arrived on `topic`.
    pub fn on_probe(&mut self, topic: &str, payload: &[u8], now: u64) -> Vec<Effect> {
        let Some((nonce, seq)) = parse(payload) else {
            return Vec::new();
        };
        if nonce != self.nonce {
            return Vec::new();
        }
        let Some(p) = self.paths.iter_mut().find(|p| p.topic == topic) else {
            return Vec::new();
        };
        p.last_traffic = now;
        if seq < p.from_seq || p.out.remove(&seq).is_none() {
            return Vec::new();
        }
        let mut effects = Vec::new();
        // Anything sent before it and still out went elsewhere.
        let overtaken: Vec<u64> = p.out.range(..seq).map(|(s, _)| *s).collect();
        if !overtaken.is_empty() {
            for s in &overtaken {
                p.out.remove(s);
            }
            p.lost += overtaken.len() as u64;
            let reason = format!(
                "probe {} did not come back while probe {seq}, sent after it, did: the broker lost it or handed it to another subscriber",
                overtaken[0]
            );
            if p.state != PathState::Dead {
                p.state = PathState::Dead;
                effects.push(Effect::Dead {
                    filter: p.filter.clone(),
                    reason,
                });
            }
            return effects;
        }
        if p.state == PathState::Dead {
            effects.push(Effect::Recovered {
                filter: p.filter.clone(),
            });
        }
        p.state = PathState::Up;
        effects
    }

    /// Probes due and paths found dead by now. `may_send`: the subscriptions are
    /// all granted on this connection (a probe before that would be lost for
    /// nothing).
    pub fn tick(&mut self, now: u64, may_send: bool) -> Vec<Effect> {
        let mut effects = Vec::new();
        for p in &mut self.paths {
            let Some((&first, &sent)) = p.out.first_key_value() else {
                continue;
            };
            let waited = now.saturating_sub(sent);
            if waited >= self.cfg.timeout_ms && p.last_traffic <= sent {
                p.lost += p.out.len() as u64;
                p.out.clear();
                if p.state != PathState::Dead {
                    p.state = PathState::Dead;
                    effects.push(Effect::Dead {
                        filter: p.filter.clone(),
                        reason: format!(
                            "probe {first} not back after {} s and nothing else arrived on the filter since it was sent",
                            waited / 1000
                        ),
                    });
                }
            }
        }
        let due = self
            .last_round
            .is_none_or(|t| now.saturating_sub(t) >= self.cfg.interval_ms);
        if may_send && due {
            self.last_round = Some(now);
            for p in &mut self.paths {
                self.seq += 1;
                p.out.insert(self.seq, now);
                effects.push(Effect::Send {
                    topic: p.topic.clone(),
                    payload: payload(self.nonce, self.seq),
                });
            }
        }
        effects
    }

    /// Each path's filter and state.
    pub fn states(&self) -> impl Iterator<Item = (&str, PathState)> {
        self.paths.iter().map(|p| (p.filter.as_str(), p.state))
    }

    /// Whether every path has proven itself on this connection.
    pub fn all_up(&self) -> bool {
        self.paths.iter().all(|p| p.state == PathState::Up)
    }

    /// Probes lost on `filter`'s path since the start.
    pub fn lost(&self, filter: &str) -> u64 {
        self.paths
            .iter()
            .find(|p| p.filter == filter)
            .map_or(0, |p| p.lost)
    }
}

fn payload(nonce: u64, seq: u64) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(format!("{nonce:016x} {seq}").as_bytes());
    v
}

fn parse(payload: &[u8]) -> Option<(u64, u64)> {
    let rest = std::str::from_utf8(payload.strip_prefix(MAGIC)?).ok()?;
    let (nonce, seq) = rest.split_once(' ')?;
    Some((u64::from_str_radix(nonce, 16).ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILTER: &str = "swell/v1/dev/+/report";
    const TOPIC: &str = "swell/v1/dev/_probe/report";

    fn probe() -> IngestProbe {
        let mut p = IngestProbe::new(
            ProbeConfig {
                interval_ms: 1_000,
                timeout_ms: 3_000,
            },
            7,
            vec![(FILTER.into(), TOPIC.into())],
        );
        p.on_connected(0);
        p
    }

    fn sent(effects: &[Effect]) -> Vec<Vec<u8>> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send { payload, .. } => Some(payload.clone()),
                _ => None,
            })
            .collect()
    }

    // MQTT-7: the path proves itself when its own probe comes back.
    #[test]
    fn ingest_probe_up_once_its_probe_comes_back() {
        let mut p = probe();
        assert!(sent(&p.tick(0, false)).is_empty(), "not before the SUBACKs");
        let out = sent(&p.tick(0, true));
        assert_eq!(out.len(), 1);
        assert!(!p.all_up());
        assert!(p.on_probe(TOPIC, &out[0], 10).is_empty());
        assert!(p.all_up());
        assert!(
            sent(&p.tick(500, true)).is_empty(),
            "one round per interval"
        );
        assert_eq!(sent(&p.tick(1_000, true)).len(), 1);
    }

    // MQTT-7: a deaf subscription (Mosquitto's restored session without it).
    #[test]
    fn ingest_probe_dead_when_nothing_arrives_on_the_filter() {
        let mut p = probe();
        let out = sent(&p.tick(0, true));
        p.on_probe(TOPIC, &out[0], 5);
        p.tick(1_000, true);
        p.tick(2_000, true);
        let dead = p.tick(4_000, true);
        assert!(
            dead.iter().any(|e| matches!(e, Effect::Dead { filter, reason } if filter == FILTER && reason.contains("not back"))),
            "{dead:?}"
        );
        assert!(!p.all_up());
        assert_eq!(p.lost(FILTER), 2, "the probes of 1 s and 2 s");
        // Repaired: the next probe back brings it up.
        p.on_repaired(FILTER, 4_100);
        let out = sent(&p.tick(5_000, true));
        assert_eq!(
            p.on_probe(TOPIC, &out[0], 5_010),
            vec![Effect::Recovered {
                filter: FILTER.into()
            }]
        );
        assert!(p.all_up());
    }

    // A backlog is not a dead path: reports keep arriving while the probe waits
    // its turn behind them.
    #[test]
    fn ingest_probe_patient_while_the_filter_delivers() {
        let mut p = probe();
        let out = sent(&p.tick(0, true));
        for t in (100..10_000).step_by(100) {
            p.on_traffic(0, t);
            assert!(
                !p.tick(t, true)
                    .iter()
                    .any(|e| matches!(e, Effect::Dead { .. })),
                "at {t}"
            );
        }
        assert!(p.on_probe(TOPIC, &out[0], 10_000).is_empty());
        assert_eq!(p.lost(FILTER), 0);
    }

    // A probe overtaken by a later one was lost or went elsewhere.
    #[test]
    fn ingest_probe_dead_when_a_later_probe_overtakes() {
        let mut p = probe();
        let first = sent(&p.tick(0, true));
        let second = sent(&p.tick(1_000, true));
        p.on_traffic(0, 1_001);
        // The first never came (dropped by the broker, or delivered to another
        // subscriber of a share group).
        let effects = p.on_probe(TOPIC, &second[0], 1_002);
        assert!(
            matches!(&effects[..], [Effect::Dead { reason, .. }] if reason.contains("another subscriber")),
            "{effects:?}"
        );
        assert_eq!(p.lost(FILTER), 1);
        // The late one, if it ever comes, changes nothing.
        assert!(p.on_probe(TOPIC, &first[0], 1_003).is_empty());
    }

    #[test]
    fn ingest_probe_ignores_strangers_and_old_connections() {
        let mut p = probe();
        let out = sent(&p.tick(0, true));
        // Another process's probe, garbage, an unknown topic.
        assert!(p.on_probe(TOPIC, &payload(8, 1), 1).is_empty());
        assert!(p.on_probe(TOPIC, b"swell-probe/1 zz", 1).is_empty());
        assert!(
            p.on_probe("swell/v1/dev/_probe/other", &out[0], 1)
                .is_empty()
        );
        assert!(!p.all_up());
        // Reconnected: the probe of the old connection proves nothing.
        p.on_connected(2);
        assert!(p.on_probe(TOPIC, &out[0], 3).is_empty());
        assert!(!p.all_up());
        assert!(p.is_probe_topic(TOPIC));
        assert_eq!(p.path_of("swell/v1/dev/d-1/report"), Some(0));
        assert_eq!(p.path_of("swell/v1/dev/d-1/hello"), None);
    }
}
