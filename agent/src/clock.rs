//! The clocks, read in one place: the wall clock in seconds (the device core
//! never trusts it below its time floor) and a monotonic clock since a start,
//! for intervals. [`now`] gives both as the core's [`Clock`].

use crate::device::Clock;
use std::time::{Duration, Instant};

/// Seconds since the Unix epoch, as this machine's clock says (0 before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Milliseconds in `d`, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Now, for a core that started at `started`.
pub fn now(started: Instant) -> Clock {
    Clock {
        unix: unix_now(),
        mono_ms: millis(started.elapsed()),
    }
}
