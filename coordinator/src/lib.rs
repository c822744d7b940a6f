//! The Swell coordinator (library).
//!
//! # Layout
//! - [`rollout::planner`]: waves of a rollout spec → `open_below` per wave and the
//!   wave each device belongs to, agreeing exactly with what devices compute.
//!
//! The health gate, state machine, registry, store and MQTT transport are tracked in
//! issue 3 and not part of this crate yet.

pub mod broker;
pub mod durable;
pub mod engine;
pub mod fleet;
pub mod http;
#[cfg(feature = "kube")]
pub mod k8s;
pub mod keyfile;
pub mod metrics;
pub mod ops;
pub mod rollout;
pub mod server;
pub mod store;
pub mod transport;
