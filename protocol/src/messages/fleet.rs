//! Coordinator → devices: manifests, beacons, per-device directives and
//! enrollment confirmations; and the `Unsupported` answer either side sends
//! for a kind or version it cannot read.

use super::check_count;
use crate::cohort::{self, Selector};
use crate::crypto::PublicKey;
use crate::envelope::{Message, MessageKind};
use crate::ids::{DeviceId, FleetId, ReleaseId, RolloutId};
use crate::threshold::ThresholdSigned;
use serde::{Deserialize, Serialize};

/// Most canary devices named in one manifest.
pub const MAX_CANARY: usize = 256;

/// What a rollout asks of the devices it selects. Retained on
/// `{p}/fleet/{fleet}/manifest/{rollout}`; widening a wave republishes it with a
/// higher `open_below` and header `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub rollout: RolloutId,
    pub fleet: FleetId,
    /// Devices whose labels do not match are not part of the rollout.
    pub selector: Selector,
    /// Named devices that are in the first wave whatever their bucket.
    pub canary: Vec<DeviceId>,
    /// Index of the newest opened wave (0 = the canary wave when there is one).
    pub wave: u16,
    /// Devices with `bucket(release, device) < open_below` are in an open wave
    /// (`u64::MAX` = every selected device).
    pub open_below: u64,
    pub state: ManifestState,
    /// The threshold-signed release, verbatim (SIG-1: the coordinator key alone
    /// cannot name content).
    pub release: ThresholdSigned,
    /// Retry generation: a device that failed this rollout's release under a lower
    /// value may try again (the operator's `retry`).
    pub retry: u32,
}

/// Rollout state as devices need it. Wire order fixed: only append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManifestState {
    /// Open waves install.
    Active,
    /// No device starts a new install; running installs finish.
    Paused,
    /// Stopped for good (aborted or completed with a halt); nothing new starts.
    Halted,
    /// Devices that installed this rollout's release go back to what they ran
    /// before it.
    RollingBack,
}

impl Manifest {
    /// The release id named by this manifest.
    pub fn release_id(&self) -> ReleaseId {
        self.release.id()
    }

    /// Whether `device`, with `bucket`, is in an open wave of this manifest
    /// (selector checked separately, on the device's labels).
    pub fn opens_for(&self, device: &DeviceId, bucket: u64) -> bool {
        self.canary.contains(device) || cohort::is_open(bucket, self.open_below)
    }
}

impl Message for Manifest {
    const KIND: MessageKind = MessageKind::Manifest;
    const MAX_PAYLOAD: usize = 60 * 1024;
    const EXPIRY_REQUIRED: bool = true;

    fn validate(&self) -> Result<(), String> {
        self.selector.validate()?;
        check_count("canary devices", self.canary.len(), 0, MAX_CANARY)?;
        if self.release.kind != MessageKind::Release as u16 {
            return Err(format!(
                "embedded object has kind {}, not release",
                self.release.kind
            ));
        }
        Ok(())
    }
}

/// Periodic proof that the coordinator is alive and its clock; without a fresh
/// beacon a device starts no install (FRESH-3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beacon {
    pub fleet: FleetId,
    /// Version of the newest key list, so devices notice a rotation.
    pub key_list_version: u64,
}

impl Message for Beacon {
    const KIND: MessageKind = MessageKind::Beacon;
    const MAX_PAYLOAD: usize = 128;
    const EXPIRY_REQUIRED: bool = true;
}

/// Per-device override, retained on `{p}/dev/{device}/desired`. Names its device
/// in the signed payload: a directive for another device is refused whatever
/// topic it arrived on (FRESH-1, MQTT-3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDirective {
    pub device: DeviceId,
    /// Stay on this release: install nothing else.
    pub pin: Option<ReleaseId>,
    /// Take part in no rollout.
    pub exclude: bool,
    /// Roll back what this rollout installed.
    pub force_rollback: Option<RolloutId>,
}

impl Message for DeviceDirective {
    const KIND: MessageKind = MessageKind::Directive;
    const MAX_PAYLOAD: usize = 256;
    const EXPIRY_REQUIRED: bool = true;
}

/// The coordinator's confirmation that `device` is enrolled with `key` in
/// its `incarnation` (ENROLL-3, protocol 3): the answer to the device's
/// Hello on its `enrolled` topic (an empty message when it is not enrolled),
/// not retained; the device keeps it. A device acts on fleet manifests and
/// sends reports only while it holds one for its own key and incarnation;
/// one for its key with a higher incarnation tells a device that lost its
/// trust state where to go on from (STATE-3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub device: DeviceId,
    pub fleet: FleetId,
    pub key: PublicKey,
    pub incarnation: u64,
}

impl Message for Enrolled {
    const KIND: MessageKind = MessageKind::Enrolled;
    const MAX_PAYLOAD: usize = 256;
    // The device keeps it until the coordinator withdraws it; a replay can
    // only repeat what was once confirmed for this very key and incarnation.
    const EXPIRY_REQUIRED: bool = false;
}

/// "I cannot read that": the kind and protocol version that were refused, and the
/// range this side speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unsupported {
    pub kind: u16,
    pub proto: u16,
    /// Header `seq` of the refused message.
    pub seq: u64,
    pub proto_min: u16,
    pub proto_max: u16,
}

impl Message for Unsupported {
    const KIND: MessageKind = MessageKind::Unsupported;
    const MAX_PAYLOAD: usize = 64;
    const EXPIRY_REQUIRED: bool = false;
}
