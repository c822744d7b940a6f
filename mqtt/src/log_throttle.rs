//! At most one log line every 10 s for a failure that repeats per message,
//! saying how many were held back and how many there were in all. Rejected
//! device messages (per reason) and a full MQTT request queue (every ack and
//! publish of a batch fails: a million-device reconnect once wrote 6.9
//! million identical lines) both go through it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a throttle stays shut after a line.
pub const EVERY: Duration = Duration::from_secs(10);

/// What a line may say when the throttle opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Open {
    /// Failures since the previous line, not logged.
    pub suppressed: u64,
    /// Failures since the start, this one included.
    pub total: u64,
}

/// One throttle; usable from a `static`.
#[derive(Debug)]
pub struct LogThrottle {
    /// When the last line was written, and failures held back since.
    last: Mutex<(Option<Instant>, u64)>,
    total: AtomicU64,
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new()
    }
}

impl LogThrottle {
    pub const fn new() -> Self {
        LogThrottle {
            last: Mutex::new((None, 0)),
            total: AtomicU64::new(0),
        }
    }

    /// Failures since the start.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Counts one failure; `Some` when a line may be written now.
    pub fn hit(&self) -> Option<Open> {
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.0.is_some_and(|t| now.duration_since(t) < EVERY) {
            last.1 += 1;
            return None;
        }
        let suppressed = std::mem::take(&mut last.1);
        last.0 = Some(now);
        Some(Open { suppressed, total })
    }

    #[cfg(test)]
    fn age(&self, by: Duration) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.0 = last.0.map(|t| t - by);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_throttle_writes_one_line_per_interval_and_counts_all() {
        let g = LogThrottle::new();
        assert_eq!(
            g.hit(),
            Some(Open {
                suppressed: 0,
                total: 1
            })
        );
        for _ in 0..1_000 {
            assert_eq!(g.hit(), None);
        }
        g.age(EVERY + Duration::from_secs(1));
        assert_eq!(
            g.hit(),
            Some(Open {
                suppressed: 1_000,
                total: 1_002
            })
        );
        assert_eq!(g.hit(), None);
    }
}
