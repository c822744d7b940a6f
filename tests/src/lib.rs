//! Harness for end-to-end tests (real brokers and real processes), also used by
//! `swell demo` for its artifact server.
//!
//! # Layout
//! - [`mosquitto`]: starts Debian's Mosquitto on a free loopback port with a config
//!   whose queue and in-flight limits are raised (its defaults silently drop QoS 1
//!   messages under fan-in), and stops it on drop.
//! - [`http`]: a small artifact file server with `Range` support.
//! - [`procs`]: the workspace binaries as processes (killed on drop).
//! - [`link`]: a TCP proxy in front of a broker that a test can cut.
//!
//! Whether Mosquitto is required is read once from `SWELL_TEST_MOSQUITTO`:
//! `required` (what `.ci/run` sets) makes a missing Mosquitto a test failure;
//! otherwise a missing Mosquitto skips the test with a line on stderr.

pub mod http;
pub mod link;
pub mod mosquitto;
pub mod procs;
