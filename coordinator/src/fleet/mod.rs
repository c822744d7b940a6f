//! The fleet as the coordinator knows it: enrolled devices and, per rollout, who
//! is in which wave and how each is doing.

pub mod interner;
pub mod registry;
pub mod tracker;
