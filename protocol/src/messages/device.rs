//! Device → coordinator: `Hello` on every connect, `Report` on every phase change
//! and as a heartbeat, `SessionNote` (protocol 2) after a Hello while its
//! connections have been taken over. Signed with the device's own key; the
//! header `seq` is the device's persisted monotonic counter (MQTT-6).

use super::{check_count, check_text};
use crate::codec::{self, CodecError};
use crate::cohort::{Label, MAX_LABELS, validate_label_key, validate_label_value};
use crate::crypto::PublicKey;
use crate::enroll::EnrollmentProof;
use crate::envelope::{EnvelopeError, Message, MessageKind, UnverifiedEnvelope, Verified};
use crate::ids::{DeviceId, FleetId, ReleaseId, RolloutId, validate_id};
use serde::{Deserialize, Serialize};

/// Announces a device: its key, labels, hardware, what it runs, what it
/// speaks, its incarnation and (when it enrolls by token) its proof.
/// Protocol 3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub device: DeviceId,
    pub fleet: FleetId,
    /// The device's public key; the envelope must be signed by it.
    pub key: PublicKey,
    pub labels: Vec<Label>,
    pub hardware: String,
    pub agent_version: String,
    /// Protocol versions this agent speaks.
    pub proto_min: u16,
    pub proto_max: u16,
    /// Increments on every agent start (distinguishes restarts).
    pub boot: u64,
    /// The release it runs, if any.
    pub running: Option<ReleaseId>,
    /// Its release counter floor (VER-1).
    pub counter_floor: u64,
    /// Which life of the device's trust state this is (STATE-3): chosen when
    /// the trust state is created, above any incarnation the coordinator
    /// confirmed for this key before; every message the device signs carries
    /// it as the header `epoch`. Never 0.
    pub incarnation: u64,
    /// [`crate::enroll::prove`] with the fleet's enrollment token, when the
    /// device enrolls by token (ENROLL-2): the token itself never travels.
    pub enrollment_proof: Option<EnrollmentProof>,
    /// Whether the device holds the coordinator's confirmation of its
    /// enrollment for this key and incarnation (ENROLL-3): the coordinator
    /// answers a Hello only when its answer would change something, so a
    /// fleet that reconnects all at once is not answered a million times.
    pub confirmed: bool,
}

impl Message for Hello {
    const KIND: MessageKind = MessageKind::Hello;
    const MAX_PAYLOAD: usize = 4 * 1024;
    const EXPIRY_REQUIRED: bool = false;

    fn validate(&self) -> Result<(), String> {
        check_count("labels", self.labels.len(), 0, MAX_LABELS)?;
        for l in &self.labels {
            validate_label_key(&l.key)?;
            validate_label_value(&l.value)?;
        }
        validate_id("hardware id", &self.hardware).map_err(|e| e.to_string())?;
        check_text("agent version", &self.agent_version, 64)?;
        if self.proto_min > self.proto_max {
            return Err("proto_min is above proto_max".into());
        }
        if self.incarnation == 0 {
            return Err("incarnation 0".into());
        }
        Ok(())
    }
}

impl Hello {
    /// Verifies a first-contact Hello, which is self-signed: the key is read from
    /// the payload's fixed prefix (`device`, `fleet`, `key`: bounded, canonical),
    /// the signature is checked under it, and only then is the rest decoded. This
    /// proves possession of the key; binding it to the device id is the
    /// coordinator's enrollment decision. A device already enrolled is verified
    /// with its enrolled key instead ([`UnverifiedEnvelope::verify`]).
    pub fn verify_self_signed(
        env: &UnverifiedEnvelope<'_>,
        now: u64,
    ) -> Result<Verified<Hello>, EnvelopeError> {
        let payload = env.unverified_payload();
        codec::check_len("hello", payload, Self::MAX_PAYLOAD)?;
        let ((_, _, key), _) = postcard::take_from_bytes::<(DeviceId, FleetId, PublicKey)>(payload)
            .map_err(|e| {
                EnvelopeError::Codec(CodecError::Malformed {
                    what: "hello",
                    reason: e.to_string(),
                })
            })?;
        env.verify::<Hello>(&key, now)
    }

    /// Verifies a Hello as a coordinator must: with the device's enrolled key
    /// if it has one, else self-signed ([`Hello::verify_self_signed`]). A
    /// Hello signed by another key than the enrolled one fails, whatever key
    /// it carries.
    pub fn verify(
        env: &UnverifiedEnvelope<'_>,
        enrolled: Option<&PublicKey>,
        now: u64,
    ) -> Result<Verified<Hello>, EnvelopeError> {
        match enrolled {
            Some(k) => env.verify::<Hello>(k, now),
            None => Self::verify_self_signed(env, now),
        }
    }
}

/// Where a device is with a release. Lifecycle: `Init → Downloading → Downloaded →
/// Installing → Probation → Committed | Failed | RolledBack | Rejected`.
/// Wire order fixed: only append.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Init,
    Downloading,
    Downloaded,
    Installing,
    Probation,
    Committed,
    Failed(Reason),
    RolledBack(Reason),
    Rejected(Reason),
}

impl Phase {
    /// Short lowercase name (`rolled_back`).
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Init => "init",
            Phase::Downloading => "downloading",
            Phase::Downloaded => "downloaded",
            Phase::Installing => "installing",
            Phase::Probation => "probation",
            Phase::Committed => "committed",
            Phase::Failed(_) => "failed",
            Phase::RolledBack(_) => "rolled_back",
            Phase::Rejected(_) => "rejected",
        }
    }

    /// Whether the device is done with this release, one way or the other.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Phase::Committed | Phase::Failed(_) | Phase::RolledBack(_) | Phase::Rejected(_)
        )
    }

    /// The reason, for the phases that carry one.
    pub fn reason(&self) -> Option<&Reason> {
        match self {
            Phase::Failed(r) | Phase::RolledBack(r) | Phase::Rejected(r) => Some(r),
            _ => None,
        }
    }
}

/// Why something failed: a code from [`reason`] (raw, so a newer agent's codes
/// still decode) and an optional short detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    pub code: u16,
    pub detail: String,
}

/// Reason codes. Numbers never change; new ones are appended.
pub mod reason {
    pub const OTHER: u16 = 0;
    pub const BAD_SIGNATURE: u16 = 1;
    pub const EXPIRED: u16 = 2;
    pub const REPLAYED: u16 = 3;
    pub const HARDWARE_MISMATCH: u16 = 4;
    pub const COUNTER_TOO_LOW: u16 = 5;
    pub const EXPOSURE_CAP: u16 = 6;
    pub const NO_FRESH_BEACON: u16 = 7;
    pub const DIGEST_MISMATCH: u16 = 8;
    pub const LENGTH_MISMATCH: u16 = 9;
    pub const DOWNLOAD_FAILED: u16 = 10;
    pub const SLOW_RETRIEVAL: u16 = 11;
    pub const INSUFFICIENT_SPACE: u16 = 12;
    pub const INSTALL_FAILED: u16 = 13;
    pub const PROBE_FAILED: u16 = 14;
    pub const CRASH_LOOP: u16 = 15;
    pub const UNREACHABLE_AFTER_ACTIVATE: u16 = 16;
    pub const OPERATOR: u16 = 17;
    pub const UNSUPPORTED: u16 = 18;
    pub const STORE_REBUILT: u16 = 19;

    /// Name of a code, `"unknown"` for codes this version does not know.
    pub fn name(code: u16) -> &'static str {
        match code {
            OTHER => "other",
            BAD_SIGNATURE => "bad_signature",
            EXPIRED => "expired",
            REPLAYED => "replayed",
            HARDWARE_MISMATCH => "hardware_mismatch",
            COUNTER_TOO_LOW => "counter_too_low",
            EXPOSURE_CAP => "exposure_cap",
            NO_FRESH_BEACON => "no_fresh_beacon",
            DIGEST_MISMATCH => "digest_mismatch",
            LENGTH_MISMATCH => "length_mismatch",
            DOWNLOAD_FAILED => "download_failed",
            SLOW_RETRIEVAL => "slow_retrieval",
            INSUFFICIENT_SPACE => "insufficient_space",
            INSTALL_FAILED => "install_failed",
            PROBE_FAILED => "probe_failed",
            CRASH_LOOP => "crash_loop",
            UNREACHABLE_AFTER_ACTIVATE => "unreachable_after_activate",
            OPERATOR => "operator",
            UNSUPPORTED => "unsupported",
            STORE_REBUILT => "store_rebuilt",
            _ => "unknown",
        }
    }
}

/// One probe's latest outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// Index of the probe in the agent's configuration.
    pub index: u8,
    pub ok: bool,
}

/// Small numbers that help an operator read a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Metrics {
    /// Download or install progress, 0 to 1000.
    pub progress_permille: u16,
    /// Install attempt number (INST-3).
    pub attempt: u16,
    pub uptime_secs: u64,
}

/// A device's state for one rollout (or, without one, what it runs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub device: DeviceId,
    pub rollout: Option<RolloutId>,
    pub release: ReleaseId,
    pub phase: Phase,
    pub probes: Vec<ProbeResult>,
    pub metrics: Metrics,
}

impl Message for Report {
    const KIND: MessageKind = MessageKind::Report;
    const MAX_PAYLOAD: usize = 512;
    const EXPIRY_REQUIRED: bool = false;

    fn validate(&self) -> Result<(), String> {
        check_count("probe results", self.probes.len(), 0, 16)?;
        if let Some(r) = self.phase.reason() {
            check_text("reason detail", &r.detail, 64)?;
        }
        if self.metrics.progress_permille > 1000 {
            return Err("progress above 1000 permille".into());
        }
        Ok(())
    }
}

/// Protocol 2. How often the broker closed this agent's connection because
/// another client connected with its client id (two agents with one device
/// id, or a copy of one's state), since the agent started. Sent on the report
/// topic, through the same ordered outbox as reports, after every Hello while
/// `takeovers` is above zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionNote {
    pub device: DeviceId,
    /// Connections taken over since the agent started (its Hello's `boot`).
    pub takeovers: u32,
    /// Unix seconds of the latest.
    pub last_takeover: u64,
}

impl Message for SessionNote {
    const KIND: MessageKind = MessageKind::SessionNote;
    const MAX_PAYLOAD: usize = 256;
    const EXPIRY_REQUIRED: bool = false;

    fn validate(&self) -> Result<(), String> {
        if self.takeovers == 0 {
            return Err("a session note says at least one takeover".into());
        }
        Ok(())
    }
}
