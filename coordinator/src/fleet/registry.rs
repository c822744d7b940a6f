//! Device registry: one small record per device, keyed by id, with the key bound
//! at enrollment (MQTT-6) and the report counter floor (replays are dropped).

use super::interner::Interner;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use swell_protocol::cohort::Label;
use swell_protocol::messages::Hello;
use swell_protocol::{DeviceId, FleetId, PublicKey, ReleaseId};

/// Whether a device may take part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Enrollment {
    /// Announced itself; waits for an operator's `approve`.
    Pending,
    Approved,
}

/// What the coordinator keeps per device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub fleet: FleetId,
    pub key: PublicKey,
    pub enrollment: Enrollment,
    /// Shared with the devices that announce the same (see [`Interner`]).
    pub labels: Arc<[Label]>,
    pub hardware: Arc<str>,
    pub agent_version: Arc<str>,
    pub running: Option<ReleaseId>,
    /// Highest envelope `seq` accepted in the device's reports.
    pub last_seq: u64,
    /// Highest `seq` accepted in its Hellos. Kept apart from reports: the two
    /// travel on different topics, and MQTT orders messages only within one.
    pub last_hello_seq: u64,
    pub boot: u64,
    pub online: bool,
    pub last_seen: u64,
}

/// Why a device message was not accepted into the registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("device {0} is enrolled with another key")]
    KeyMismatch(DeviceId),
    #[error("device {0} is not enrolled")]
    Unknown(DeviceId),
    #[error("device {device}: seq {got} is not above {have} (replay)")]
    Replayed {
        device: DeviceId,
        got: u64,
        have: u64,
    },
    #[error("device {device} belongs to fleet {fleet}, not this coordinator's")]
    WrongFleet { device: DeviceId, fleet: FleetId },
    #[error("device {0} is awaiting approval")]
    NotApproved(DeviceId),
}

impl RegistryError {
    /// Counter label.
    pub fn reason(&self) -> &'static str {
        match self {
            RegistryError::KeyMismatch(_) => "forged",
            RegistryError::Unknown(_) => "unknown_device",
            RegistryError::Replayed { .. } => "replayed",
            RegistryError::WrongFleet { .. } => "wrong_fleet",
            RegistryError::NotApproved(_) => "not_approved",
        }
    }
}

impl DeviceRecord {
    /// A record for a device seen for the first time.
    pub fn from_hello(
        h: &Hello,
        seq: u64,
        now: u64,
        enrollment: Enrollment,
        shared: &mut Interner,
    ) -> Self {
        DeviceRecord {
            id: h.device.clone(),
            fleet: h.fleet.clone(),
            key: h.key,
            enrollment,
            labels: shared.labels(&h.labels),
            hardware: shared.str(&h.hardware),
            agent_version: shared.str(&h.agent_version),
            running: h.running,
            last_seq: 0,
            last_hello_seq: seq,
            boot: h.boot,
            online: true,
            last_seen: now,
        }
    }

    /// Checks and records a newer `seq` from this device.
    pub fn accept_seq(&mut self, seq: u64) -> Result<(), RegistryError> {
        if seq <= self.last_seq {
            return Err(RegistryError::Replayed {
                device: self.id.clone(),
                got: seq,
                have: self.last_seq,
            });
        }
        self.last_seq = seq;
        Ok(())
    }

    /// Checks and records a newer Hello `seq`.
    pub fn accept_hello_seq(&mut self, seq: u64) -> Result<(), RegistryError> {
        if seq <= self.last_hello_seq {
            return Err(RegistryError::Replayed {
                device: self.id.clone(),
                got: seq,
                have: self.last_hello_seq,
            });
        }
        self.last_hello_seq = seq;
        Ok(())
    }

    /// Takes the announced facts of a verified Hello from the enrolled key.
    pub fn update_from_hello(&mut self, h: &Hello, now: u64, shared: &mut Interner) {
        self.labels = shared.labels(&h.labels);
        self.hardware = shared.str(&h.hardware);
        self.agent_version = shared.str(&h.agent_version);
        self.running = h.running;
        self.boot = h.boot;
        self.online = true;
        self.last_seen = now;
    }
}

impl DeviceRecord {
    /// Shares this record's announced strings (a record read back from the
    /// store has its own copies).
    pub fn share(&mut self, shared: &mut Interner) {
        self.labels = shared.labels(&self.labels);
        self.hardware = shared.str(&self.hardware);
        self.agent_version = shared.str(&self.agent_version);
    }
}
