//! The Swell device agent. Small by design: a device may have 64 MiB of RAM and a
//! flaky cellular link.
//!
//! # Layout
//! - [`clock`]: the wall and monotonic clocks, read in one place.
//! - [`config`]: `agent.toml` + `SWELL_AGENT_*` + flags, merged and validated.
//! - [`identity`]: the device key, created on first start (mode 0600).
//! - [`trust`]: the small, atomically written trust file (STATE-2) holding the
//!   anti-replay and anti-rollback floors (FRESH-1, FRESH-2, VER-1, VER-2).
//! - [`evaluate`]: manifest and directive → verdict (install, roll back, refuse
//!   with a reason, or nothing to do), pure.
//! - [`deployment`]: the install state machine and crash recovery, pure.
//! - [`device`]: the device as one pure state machine (messages, work
//!   results, ticks → effects): the agent and the simulator both run it.
//! - [`store`]: sled journal of the current install and the bounded report
//!   outbox (heartbeats evicted first), rebuilt when corrupt.
//! - [`download`]: digest-addressed blobs fetched over HTTP(S) with resume,
//!   length cap, throughput watchdog and deadline.
//! - [`install`]: the `Installer` trait and its `slots`, `command` and
//!   `container` backends.
//! - [`probe`]: command, HTTP and process health probes.
//! - [`runtime`]: the running agent — the loop that feeds [`device`] and
//!   carries out its effects: MQTT session, outbox delivery, workers.
//! - [`sim`]: a fleet simulator running [`device`] for many virtual devices
//!   over real MQTT connections (demo, tests, benchmarks).

pub mod clock;
pub mod config;
pub mod deployment;
pub mod device;
pub mod download;
pub mod evaluate;
pub mod identity;
pub mod install;
pub mod probe;
pub mod runtime;
#[cfg(feature = "sim")]
pub mod sim;
pub mod store;
pub mod trust;
