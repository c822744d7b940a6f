//! Harness for end-to-end tests (real brokers and real processes), also used by
//! `swell demo` for its artifact server.
//!
//! # Layout
//! - [`broker`]: the broker of a test, configured as Swell ships it: Mosquitto
//!   when required, else the embedded broker; users and passwords per role and
//!   per device.
//! - [`mosquitto`]: starts Debian's Mosquitto on a free loopback port with the
//!   shipped configuration (`deploy/k3s/mosquitto.yaml`), restarts and kills it;
//!   and a relaxed one (anonymous, raised limits) for the fleet benchmark.
//! - [`http`]: a small artifact file server with `Range` support.
//! - [`procs`]: the workspace binaries as processes (killed on drop).
//! - [`link`]: a TCP proxy in front of a broker that a test can cut.
//! - [`system`]: the whole system as processes (coordinator, agents, CLI,
//!   artifact server), enrolled and ready for a rollout.
//!
//! Whether Mosquitto is required is read once from `SWELL_TEST_MOSQUITTO`:
//! `required` (what `.ci/run` sets) makes a missing Mosquitto a test failure;
//! otherwise a missing Mosquitto skips the test with a line on stderr.

pub mod broker;
pub mod http;
pub mod link;
pub mod mosquitto;
pub mod procs;
pub mod system;
