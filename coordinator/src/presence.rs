//! One coordinator per fleet and topic prefix (RO-014).
//!
//! Two coordinators acting for one fleet would sign competing manifests and
//! both carry out every command. Each coordinator therefore announces itself on
//! `{p}/ops/{fleet}/coordinator` (retained JSON [`Presence`]: fleet, instance
//! id, epoch, since when it acts, refreshed every [`REFRESH_EVERY`]; its Last
//! Will says `offline`), and a starting instance first *claims* the fleet:
//!
//! 1. On a connection of its own (clean, no will, a client id of its own, so
//!    it cannot take the active coordinator's session over) it subscribes to the
//!    presence topic and publishes a `starting` presence. Whatever was retained
//!    arrives before its own `starting` comes back.
//! 2. Nobody there, `offline`, or its own instance id (a restart with the same
//!    state directory): it acts at once.
//! 3. Another instance `online`: the active coordinator answers every
//!    `starting` with a fresh presence, so a fresh one from that instance
//!    within the watch window means it is alive: the starter exits with an
//!    error that names it. Its `offline` (its Last Will) lets the starter act
//!    at once; silence for the whole window means it is gone without its will
//!    reaching the broker, and the starter takes over, saying so.
//!
//! An active coordinator that hears another instance's fresh `online` (two
//! that claimed in the same instant) keeps acting only if it became active
//! first (ties by instance id); the other exits. A retained one, delivered as
//! its session subscribes, is the stale presence its claim took over from. [`Claim`] and [`Guard`] are the pure
//! decisions; the connection is `server::claim`.

use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// How often the active coordinator refreshes its presence.
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);

/// How long a starter watches a retained `online` of another instance for a
/// sign of life before it takes over.
pub fn watch_window(refresh: Duration) -> Duration {
    refresh * 5 / 2
}

/// What a coordinator says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Claiming the fleet (not retained).
    Starting,
    /// Acting for the fleet.
    Online,
    /// Gone: its goodbye or its Last Will.
    Offline,
}

/// The JSON on `{p}/ops/{fleet}/coordinator`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub state: State,
    pub fleet: String,
    /// Random, kept in `{state_dir}/instance`: the same state directory is the
    /// same instance across restarts.
    pub instance: String,
    pub epoch: u64,
    /// Unix seconds it became active (for `starting`: when it started).
    pub since: u64,
    /// Unix seconds of this publication.
    pub at: u64,
}

impl Presence {
    pub fn with(&self, state: State, at: u64) -> Presence {
        Presence {
            state,
            at,
            ..self.clone()
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Who it is, for error messages and logs.
impl std::fmt::Display for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "instance {} (epoch {}, active since unix {})",
            self.instance, self.epoch, self.since
        )
    }
}

/// A presence message as it arrived.
#[derive(Debug, Clone)]
pub struct Heard {
    pub presence: Presence,
    /// Delivered as a retained message (from before this subscription).
    pub retained: bool,
}

/// What the starter does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep listening, until the given time (ms on the caller's clock) at most.
    Wait { until_ms: Option<u64> },
    /// Act for the fleet; `stale`: the silent instance it takes over from.
    Go { stale: Option<Presence> },
    /// Another instance is alive: do not act.
    Taken(Presence),
}

/// The starter's decision, fed what arrives on the presence topic.
#[derive(Debug)]
pub struct Claim {
    me: Presence,
    window_ms: u64,
    /// Another instance that said `online` before our `starting` came back.
    other: Option<Presence>,
    watching_until: Option<u64>,
}

impl Claim {
    /// `me`: the `starting` presence this instance publishes.
    pub fn new(me: Presence, window: Duration) -> Claim {
        Claim {
            me,
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            other: None,
            watching_until: None,
        }
    }

    pub fn starting(&self) -> &Presence {
        &self.me
    }

    pub fn on_heard(&mut self, heard: Heard, now_ms: u64) -> Verdict {
        let p = heard.presence;
        if p.fleet != self.me.fleet {
            return self.waiting();
        }
        if p.instance == self.me.instance {
            if p.state == State::Starting && !heard.retained && self.watching_until.is_none() {
                // Our own `starting` is back: everything retained came before it.
                return match &self.other {
                    None => Verdict::Go { stale: None },
                    Some(_) => {
                        let until = now_ms.saturating_add(self.window_ms);
                        self.watching_until = Some(until);
                        Verdict::Wait {
                            until_ms: Some(until),
                        }
                    }
                };
            }
            // Our own earlier presence (a restart): it is us.
            return self.waiting();
        }
        match (p.state, self.watching_until) {
            (State::Online, None) => {
                self.other = Some(p);
                self.waiting()
            }
            (State::Online, Some(_)) if !heard.retained => Verdict::Taken(p),
            (State::Offline, _)
                if self
                    .other
                    .as_ref()
                    .is_some_and(|o| o.instance == p.instance) =>
            {
                self.other = None;
                match self.watching_until {
                    Some(_) => Verdict::Go { stale: None },
                    None => self.waiting(),
                }
            }
            _ => self.waiting(),
        }
    }

    /// The watch window is over: the other instance never showed life.
    pub fn on_deadline(&mut self, now_ms: u64) -> Verdict {
        match self.watching_until {
            Some(until) if now_ms >= until => Verdict::Go {
                stale: self.other.take(),
            },
            _ => self.waiting(),
        }
    }

    fn waiting(&self) -> Verdict {
        Verdict::Wait {
            until_ms: self.watching_until,
        }
    }
}

/// What the active coordinator does about a presence message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guarded {
    Nothing,
    /// Publish our presence again (retained): a starter is asking, or the
    /// retained presence is no longer ours.
    Republish,
    /// Another instance became active before us: stop acting.
    Yield(Presence),
}

/// The active coordinator's side.
#[derive(Debug, Clone)]
pub struct Guard {
    me: Presence,
}

impl Guard {
    /// `me`: the `online` presence this instance publishes.
    pub fn new(me: Presence) -> Guard {
        Guard { me }
    }

    pub fn me(&self) -> &Presence {
        &self.me
    }

    pub fn on_heard(&self, heard: &Heard) -> Guarded {
        let p = &heard.presence;
        if p.fleet != self.me.fleet {
            return Guarded::Nothing;
        }
        if p.instance == self.me.instance {
            return match p.state {
                State::Online => Guarded::Nothing,
                // Our own Last Will of an earlier connection, or a starting of
                // an earlier run: the retained presence must say we are here.
                State::Offline | State::Starting => Guarded::Republish,
            };
        }
        match p.state {
            State::Starting | State::Offline => Guarded::Republish,
            // Retained from before this session subscribed: what the claim
            // already decided on (a stale instance it took over from).
            State::Online if heard.retained => Guarded::Republish,
            State::Online => {
                if (self.me.since, &self.me.instance) <= (p.since, &p.instance) {
                    Guarded::Republish
                } else {
                    Guarded::Yield(p.clone())
                }
            }
        }
    }
}

/// Parses a presence message; `None` for anything else (logged by the caller).
pub fn parse(payload: &[u8]) -> Option<Presence> {
    serde_json::from_slice(payload).ok()
}

/// This state directory's instance id (`{state_dir}/instance`, 16 hex digits,
/// made at the first start).
pub fn instance_id(state_dir: &Path) -> std::io::Result<String> {
    let path = state_dir.join("instance");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(id.to_string());
            }
            Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is damaged: {text:?}", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = new_instance_id().map_err(|e| std::io::Error::other(e.to_string()))?;
            swell_durable::write_atomic(&path, format!("{id}\n").as_bytes(), 0o644)?;
            Ok(id)
        }
        Err(e) => Err(e),
    }
}

/// A fresh random instance id: 16 hex digits.
pub fn new_instance_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests;
