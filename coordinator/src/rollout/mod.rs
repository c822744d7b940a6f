//! Rollout logic: pure functions of (spec, observations, now).

pub mod planner;
