//! Network edges of the coordinator.

pub mod mqtt;
