//! When to connect again after a connection ended: exponential backoff with
//! full jitter, and a slower one for connections the broker keeps closing.
//!
//! A takeover (MQTT 5 DISCONNECT 0x8E) means another client connected with
//! this client id: a second agent with the same device id, or a copy of this
//! one's state. Some brokers (rmqtt) just close the taken-over connection, so
//! connections that the broker keeps closing soon after they open count too.
//! The usual backoff restarts at its minimum on every CONNACK, so two such
//! clients took the session from each other every 80–250 ms forever. Here the
//! streak of connections closed within a minute survives the CONNACK that
//! follows: from the third in a row (or the first explicit takeover) the wait
//! grows (1 s, 2 s, 4 s … up to 5 min after takeovers, 1 min otherwise) and
//! only a connection that held a minute ends it, so a pair of twins settles
//! into one connected client at a time and the log says why.

use std::time::{Duration, Instant};

const SLOW_MIN: Duration = Duration::from_secs(1);
/// Most wait after explicit takeovers.
const TAKEOVER_MAX: Duration = Duration::from_secs(300);
/// Most wait after connections closed soon without a reason (a flaky link
/// looks the same, so it is bounded lower).
const CLOSED_MAX: Duration = Duration::from_secs(60);
/// A connection that lasted this long ends a streak.
const HELD: Duration = Duration::from_secs(60);
/// Closed connections in a row before the slow backoff.
const CLOSED_STREAK: u32 = 3;

/// What ended the last connections, and how long to wait before the next one.
#[derive(Debug, Default, Clone)]
pub struct Reconnect {
    attempt: u32,
    /// Connections in a row that ended within [`HELD`] of their CONNACK.
    kicked: u32,
    /// Whether the broker said "taken over" during the streak.
    taken_over: bool,
    connected_at: Option<Instant>,
}

/// The wait before the next connection, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    pub after: Duration,
    /// Connections in a row that ended within a minute of opening.
    pub kicked: u32,
    /// The broker said another client took the session over.
    pub taken_over: bool,
}

impl Reconnect {
    /// A CONNACK at `now`.
    pub fn connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
        self.attempt = 0;
    }

    /// The connection (or the attempt) ended at `now`; `taken_over` when the
    /// broker said so.
    pub fn lost(&mut self, taken_over: bool, now: Instant) -> Wait {
        match self.connected_at.take() {
            Some(t) if now.saturating_duration_since(t) >= HELD => {
                self.kicked = 0;
                self.taken_over = false;
            }
            Some(_) => self.kicked = self.kicked.saturating_add(1),
            None => {}
        }
        if taken_over {
            self.kicked = self.kicked.max(1);
            self.taken_over = true;
        }
        let slow = self.taken_over || self.kicked >= CLOSED_STREAK;
        let after = if slow {
            let max = if self.taken_over {
                TAKEOVER_MAX
            } else {
                CLOSED_MAX
            };
            let n = if self.taken_over {
                self.kicked - 1
            } else {
                self.kicked - CLOSED_STREAK
            };
            let ceiling = SLOW_MIN.saturating_mul(1u32 << n.min(16)).min(max);
            // Half fixed, half jitter: two clients do not come back together.
            ceiling / 2 + crate::jitter(ceiling / 2)
        } else {
            crate::backoff(self.attempt)
        };
        self.attempt = self.attempt.saturating_add(1);
        Wait {
            after,
            kicked: self.kicked,
            taken_over: self.taken_over,
        }
    }

    /// Connections in a row closed within a minute of opening.
    pub fn kicked(&self) -> u32 {
        self.kicked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kicked_every(r: &mut Reconnect, n: u32, taken_over: bool) -> Vec<Wait> {
        let mut now = Instant::now();
        (0..n)
            .map(|_| {
                r.connected(now);
                now += Duration::from_millis(100);
                let w = r.lost(taken_over, now);
                now += w.after;
                w
            })
            .collect()
    }

    #[test]
    fn reconnect_takeovers_back_off_across_connacks() {
        let mut r = Reconnect::default();
        let waits = kicked_every(&mut r, 10, true);
        for (i, w) in waits.iter().enumerate() {
            let ceiling = (SLOW_MIN * (1 << i)).min(TAKEOVER_MAX);
            assert!(w.taken_over && w.kicked == i as u32 + 1, "{i}: {w:?}");
            assert!(w.after >= ceiling / 2 && w.after <= ceiling, "{i}: {w:?}");
        }
        assert!(waits[9].after >= TAKEOVER_MAX / 2);
        // A connection that held a minute ends the streak.
        let now = Instant::now();
        r.connected(now);
        let w = r.lost(false, now + HELD);
        assert_eq!((w.kicked, w.taken_over), (0, false));
        assert!(w.after <= Duration::from_millis(100), "{w:?}");
    }

    #[test]
    fn reconnect_connections_closed_soon_back_off_from_the_third() {
        let mut r = Reconnect::default();
        let waits = kicked_every(&mut r, 8, false);
        assert!(
            waits[..2]
                .iter()
                .all(|w| w.after <= Duration::from_millis(100))
        );
        assert!(waits[2].after >= SLOW_MIN / 2, "{:?}", waits[2]);
        assert!(waits[7].after >= Duration::from_secs(16), "{:?}", waits[7]);
        assert!(waits.iter().all(|w| w.after <= CLOSED_MAX));
    }

    #[test]
    fn reconnect_plain_losses_restart_at_each_connack() {
        let now = Instant::now();
        let mut r = Reconnect::default();
        for _ in 0..5 {
            r.lost(false, now);
        }
        r.connected(now);
        let w = r.lost(false, now + HELD);
        assert_eq!(w.kicked, 0);
        assert!(w.after <= Duration::from_millis(100), "{w:?}");
    }
}
