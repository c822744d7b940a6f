//! Rollout logic: pure functions of (spec, observations, now).

pub mod health_gate;
pub mod planner;
pub mod schedule;
pub mod spec;
pub mod state;

#[cfg(test)]
pub(crate) mod state_tests;
