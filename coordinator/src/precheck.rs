//! Device signatures checked ahead of the engine, on several threads.
//!
//! Verifying a device envelope (SIG-3) is the most expensive step of ingest and
//! needs only the device's registered key, so the server loop checks a chunk of
//! messages in parallel ([`precheck_all`]), each thread's reports as one
//! signature batch (`swell_protocol::crypto::verify_batch`), and then
//! applies them in order on the engine's one thread. The engine takes a
//! precheck only if it was made with the key the device has *at apply time*
//! (a Hello earlier in the same chunk may have changed it); otherwise it
//! verifies again itself. Every other check (topic, seq floor, enrollment,
//! forgery) stays in the engine, in the same order as without a precheck.

use crate::engine::Engine;
use swell_protocol::PublicKey;
use swell_protocol::envelope::{EnvelopeError, Verified};
use swell_protocol::messages::{Hello, Report};

/// Fewest messages in a chunk worth sending to another thread.
const MIN_PARALLEL: usize = 8;

/// The outcome of checking one message's envelope before the engine saw it.
#[derive(Debug, Default)]
pub enum Precheck {
    /// Nothing checked: the engine does all of it.
    #[default]
    None,
    /// A report, verified with the device's key as registered then.
    Report {
        key: PublicKey,
        result: Result<Verified<Report>, EnvelopeError>,
    },
    /// A Hello, verified with the registered key (`Some`) or self-signed (`None`).
    Hello {
        key: Option<PublicKey>,
        result: Result<Verified<Hello>, EnvelopeError>,
    },
}

impl Precheck {
    /// The report's verification, if it was made with `key`.
    pub(crate) fn report_with(
        self,
        key: &PublicKey,
    ) -> Option<Result<Verified<Report>, EnvelopeError>> {
        match self {
            Precheck::Report { key: k, result } if k == *key => Some(result),
            _ => None,
        }
    }

    /// The Hello's verification, if it was made with `key` (`None`: self-signed).
    pub(crate) fn hello_with(
        self,
        key: Option<&PublicKey>,
    ) -> Option<Result<Verified<Hello>, EnvelopeError>> {
        match self {
            Precheck::Hello { key: k, result } if k.as_ref() == key => Some(result),
            _ => None,
        }
    }
}

/// Threads to verify with when configured as 0: one per core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Checks `msgs` (topic, payload) against the engine's registry, split over
/// `threads` threads (this one included), each thread's reports as one
/// signature batch if `batch`; results are in the order of `msgs`.
pub fn precheck_all(
    engine: &Engine,
    msgs: &[(&str, &[u8])],
    now: u64,
    threads: usize,
    batch: bool,
) -> Vec<Precheck> {
    let part = |msgs: &[(&str, &[u8])]| engine.precheck(msgs, now, batch);
    if threads <= 1 || msgs.len() < MIN_PARALLEL {
        return part(msgs);
    }
    let per = msgs
        .len()
        .div_ceil(threads.min(msgs.len() / (MIN_PARALLEL / 2)).max(1));
    let parts: Vec<&[(&str, &[u8])]> = msgs.chunks(per).collect();
    let (first, rest) = parts
        .split_first()
        .map_or((&[][..], &[][..]), |(f, r)| (*f, r));
    std::thread::scope(|scope| {
        let workers: Vec<_> = rest.iter().map(|p| scope.spawn(move || part(p))).collect();
        let mut out = part(first);
        for (w, part) in workers.into_iter().zip(rest) {
            match w.join() {
                Ok(v) => out.extend(v),
                // A panicking check must not lose the messages: the engine
                // verifies them itself.
                Err(_) => out.extend(part.iter().map(|_| Precheck::None)),
            }
        }
        out
    })
}
