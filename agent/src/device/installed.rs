//! What the device runs, ran before and last failed, as kept in the store.

use serde::{Deserialize, Serialize};
use swell_protocol::{ReleaseId, RolloutId};

/// A release the device runs (or ran).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    pub release: ReleaseId,
    pub rollout: Option<RolloutId>,
    pub counter: u64,
    pub version: String,
}

/// What runs, what ran before, and the last release that failed here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub running: Option<Running>,
    pub previous: Option<Running>,
    /// (rollout, release, retry generation) of the last failure.
    pub failed: Option<(RolloutId, ReleaseId, u32)>,
}
