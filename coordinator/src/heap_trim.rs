//! Hands free heap pages back to the kernel now and then.
//!
//! glibc keeps what a thread frees in that thread's arena for reuse. The
//! coordinator's bursts (a million Hellos, then waves of reports, decoded on
//! the verify threads and freed on the engine thread) leave those arenas
//! mostly free but resident; `malloc_trim` returns their free pages
//! (measured at 1,000,000 devices: about 27 MB less at the peak, no change
//! in speed; BENCHMARKS.md, eighth round).

use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How often the coordinator trims unless told otherwise.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Starts a thread that trims the heap every `every` until `cancel`.
pub fn spawn_trimmer(every: Duration, cancel: CancellationToken) {
    let spawned = std::thread::Builder::new()
        .name("heap-trim".into())
        .spawn(move || {
            while !cancel.is_cancelled() {
                std::thread::sleep(every);
                let start = Instant::now();
                trim();
                debug!(took_us = start.elapsed().as_micros(), "heap trimmed");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the heap trimmer; memory is not trimmed");
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: malloc_trim takes no pointers and takes each arena's lock
    // itself; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

// musl and others return freed memory on their own (or cannot be asked).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
