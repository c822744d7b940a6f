//! The Swell device agent (library). Small by design: a device may have 64 MiB of
//! RAM and a flaky cellular link.
//!
//! # Layout
//! - [`trust`]: the small, atomically written trust file (STATE-2) holding the
//!   anti-replay and anti-rollback floors (FRESH-1, FRESH-2, VER-1, VER-2).
//! - [`evaluate`]: manifest and directive → verdict (install, roll back, refuse
//!   with a reason, or nothing to do), pure.
//! - [`deployment`]: the install state machine and crash recovery, pure.
//! - [`store`]: sled journal of the current install and the bounded report
//!   outbox (heartbeats evicted first), rebuilt when corrupt.
//! - [`sim`]: a fleet simulator running this logic for many virtual devices over
//!   real MQTT connections, with a simulated installer (demo, tests, benchmarks).
//!
//! The MQTT session, downloader, installers and probes are tracked in issue 4 and
//! not part of this crate yet.

pub mod deployment;
pub mod evaluate;
#[cfg(feature = "sim")]
pub mod sim;
pub mod store;
pub mod trust;
