//! Device signatures checked ahead of the engine, on other threads.
//!
//! Verifying a device envelope (SIG-3) is the most expensive step of ingest and
//! needs only the device's registered key. So the engine first plans each
//! message's check ([`Engine::plan_checks`]: parse, look up the key; cheap),
//! and the checks are made away from the engine ([`verify_planned`]), each
//! unit's reports as one signature batch (`swell_protocol::crypto::verify_batch`).
//! [`pipeline`] does that on several threads for a whole batch of messages
//! while the engine applies, in order, the units already checked: the engine
//! thread never waits for a check it could overlap with its own work.
//!
//! The engine takes a precheck only if it was made with the key the device has
//! *at apply time* (a Hello earlier in the batch may have changed it); otherwise
//! it verifies again itself. Every other check (topic, seq floor, enrollment,
//! forgery) stays in the engine, in the same order as without a precheck.

#[cfg(doc)]
use crate::engine::Engine;
use std::sync::mpsc;
use swell_protocol::PublicKey;
use swell_protocol::envelope::{EnvelopeError, UnverifiedEnvelope, Verified};
use swell_protocol::messages::{Hello, Report};
use tracing::error;

/// Fewest messages worth sending to other threads.
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

/// The check one message needs, planned by [`Engine::plan_checks`] with the
/// key its device had then.
#[derive(Debug, Default)]
pub enum Planned<'a> {
    /// Not a device message the engine knows how to check ahead.
    #[default]
    None,
    Report {
        env: UnverifiedEnvelope<'a>,
        key: PublicKey,
    },
    /// `key` is `None` for a device not enrolled yet (self-signed Hello).
    Hello {
        env: UnverifiedEnvelope<'a>,
        key: Option<PublicKey>,
    },
}

/// Threads to verify with when configured as 0: one per core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Makes the planned checks on this thread, the reports as one signature
/// batch if `batch` (else one by one); results in the order of `plans`.
pub fn verify_planned(plans: Vec<Planned<'_>>, now: u64, batch: bool) -> Vec<Precheck> {
    let mut out: Vec<Precheck> = Vec::with_capacity(plans.len());
    let mut reports = Vec::new();
    for (i, plan) in plans.into_iter().enumerate() {
        out.push(match plan {
            Planned::None => Precheck::None,
            Planned::Report { env, key } => {
                reports.push((i, env, key));
                Precheck::None
            }
            Planned::Hello { env, key } => Precheck::Hello {
                result: Hello::verify(&env, key.as_ref(), now),
                key,
            },
        });
    }
    let items: Vec<_> = reports.iter().map(|(_, env, key)| (env, key)).collect();
    let results = if batch {
        UnverifiedEnvelope::verify_all::<Report>(&items, now)
    } else {
        items
            .iter()
            .map(|(env, key)| env.verify(key, now))
            .collect()
    };
    for ((i, _, key), result) in reports.iter().zip(results) {
        if let Some(slot) = out.get_mut(*i) {
            *slot = Precheck::Report { key: *key, result };
        }
    }
    out
}

/// Makes the checks `plans` (from [`Engine::plan_checks`]) and hands the
/// results to `apply` in order, unit by unit: `apply(first, checks)` gets the
/// checks of `plans[first..first + checks.len()]`.
///
/// With `threads` > 1 (and enough messages) the checks are made on `threads`
/// threads spawned for the call, units of at most `unit` messages dealt out in
/// turn, while `apply` runs on this thread as soon as the next unit is ready.
/// A unit whose thread panicked is applied without prechecks (the engine
/// verifies those messages itself). Stops at the first error of `apply`.
pub fn pipeline<E>(
    plans: Vec<Planned<'_>>,
    now: u64,
    threads: usize,
    batch: bool,
    unit: usize,
    mut apply: impl FnMut(usize, Vec<Precheck>) -> Result<(), E>,
) -> Result<(), E> {
    let len = plans.len();
    if threads <= 1 || len < MIN_PARALLEL {
        return apply(0, verify_planned(plans, now, batch));
    }
    // Small batches are still split over every thread.
    let unit = unit.clamp(1, len.div_ceil(threads).max(MIN_PARALLEL / 2));
    let mut units: Vec<Vec<Vec<Planned<'_>>>> = (0..threads).map(|_| Vec::new()).collect();
    let mut sizes = Vec::new();
    let mut plans = plans.into_iter();
    loop {
        let next: Vec<Planned<'_>> = plans.by_ref().take(unit).collect();
        if next.is_empty() {
            break;
        }
        sizes.push(next.len());
        if let Some(w) = units.get_mut((sizes.len() - 1) % threads) {
            w.push(next);
        }
    }
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, Vec<Precheck>)>();
        let workers: Vec<_> = units
            .into_iter()
            .enumerate()
            .map(|(w, mine)| {
                let tx = tx.clone();
                scope.spawn(move || {
                    for (k, plans) in mine.into_iter().enumerate() {
                        let checked = verify_planned(plans, now, batch);
                        if tx.send((w + k * threads, checked)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        // Only the workers' senders remain: `recv` fails once all are gone.
        drop(tx);
        let mut ready: Vec<Option<Vec<Precheck>>> = sizes.iter().map(|_| None).collect();
        let mut first = 0;
        let mut result = Ok(());
        for (next, &size) in sizes.iter().enumerate() {
            while ready.get(next).is_some_and(Option::is_none) {
                match rx.recv() {
                    Ok((k, checked)) => {
                        if let Some(slot) = ready.get_mut(k) {
                            *slot = Some(checked);
                        }
                    }
                    Err(_) => break,
                }
            }
            let checked = ready
                .get_mut(next)
                .and_then(Option::take)
                .unwrap_or_else(|| (0..size).map(|_| Precheck::None).collect());
            result = apply(first, checked);
            if result.is_err() {
                break;
            }
            first += size;
        }
        // Dropping the receiver ends workers still sending after an error.
        drop(rx);
        for w in workers {
            if w.join().is_err() {
                error!("a signature check thread panicked; the engine verified its messages");
            }
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nones(n: usize) -> Vec<Planned<'static>> {
        (0..n).map(|_| Planned::None).collect()
    }

    #[test]
    fn pipeline_applies_every_unit_once_in_order() {
        for (len, threads, unit) in [(100, 3, 7), (5, 2, 64), (20, 2, 64), (512, 2, 64)] {
            let mut seen = Vec::new();
            let r = pipeline(nones(len), 0, threads, true, unit, |first, checked| {
                seen.push((first, checked.len()));
                Ok::<(), ()>(())
            });
            assert_eq!(r, Ok(()));
            let mut next = 0;
            for &(first, n) in &seen {
                assert_eq!(first, next, "{len} messages: units in order");
                assert!(n >= 1 && n <= unit);
                next += n;
            }
            assert_eq!(next, len, "{len} messages: each applied once");
            if len >= MIN_PARALLEL {
                assert!(
                    seen.len() >= threads,
                    "{len} messages: split over the threads"
                );
            }
        }
    }

    #[test]
    fn pipeline_stops_at_the_first_error_of_apply() {
        let mut applied = 0;
        let r = pipeline(nones(100), 0, 2, true, 10, |first, _| {
            applied += 1;
            if first == 20 { Err(first) } else { Ok(()) }
        });
        assert_eq!(r, Err(20));
        assert_eq!(applied, 3, "nothing is applied after the error");
    }
}
