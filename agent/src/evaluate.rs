//! Deciding to install: what a device does with a manifest (DESIGN §2, SECURITY
//! SIG-1, VER-1/3/4, FRESH-1/3, ROLL-3/4). Pure: bytes, the device's own facts and
//! its trust state in; a verdict and the trust-state changes out. The caller
//! persists the trust state before acting (STATE-1) and reports refusals.
//!
//! Order matters: nothing of the payload is used before the coordinator signature
//! and freshness check out, and nothing is downloaded before the release's own
//! signatures, hardware ids, counter and exposure cap check out.

use crate::trust::{Freshness, TrustState};
use swell_protocol::cohort::{self, Label};
use swell_protocol::envelope::UnverifiedEnvelope;
use swell_protocol::messages::{
    DeviceDirective, KeyList, Manifest, ManifestState, Reason, Release, reason,
};
use swell_protocol::{DeviceId, EnvelopeError, FleetId, ReleaseId, RolloutId};

/// The device's own facts.
#[derive(Debug, Clone)]
pub struct Device<'a> {
    pub id: &'a DeviceId,
    pub fleet: &'a FleetId,
    pub labels: &'a [Label],
    pub hardware: &'a str,
    /// The release it runs now, and the rollout that installed it.
    pub running: Option<(ReleaseId, Option<RolloutId>)>,
    /// A release this device failed, with the rollout and retry generation then.
    pub failed: Option<(RolloutId, ReleaseId, u32)>,
    /// An install under way (not yet committed), by rollout and release.
    pub installing: Option<(RolloutId, ReleaseId)>,
    /// Whether a verified beacon is fresh (FRESH-3).
    pub beacon_fresh: bool,
    /// The device's current directive, verified.
    pub directive: Option<&'a DeviceDirective>,
}

/// What to do with a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Install this release for this rollout.
    Install {
        rollout: RolloutId,
        release_id: ReleaseId,
        release: Box<Release>,
        retry: u32,
    },
    /// Return to what ran before this rollout's release.
    RollBack {
        rollout: RolloutId,
        release_id: ReleaseId,
    },
    /// Valid, but nothing to do here; says why (for logs, not for reports).
    NotForMe(&'static str),
    /// The same manifest again: no second effect (VER-4).
    Duplicate,
    /// Refused: report `Rejected(reason)` (with what is known of the rollout).
    Reject {
        rollout: Option<RolloutId>,
        release_id: Option<ReleaseId>,
        reason: Reason,
    },
}

fn reject(
    rollout: Option<RolloutId>,
    release_id: Option<ReleaseId>,
    code: u16,
    detail: impl Into<String>,
) -> Verdict {
    let mut detail: String = detail.into();
    detail.truncate(64);
    Verdict::Reject {
        rollout,
        release_id,
        reason: Reason { code, detail },
    }
}

fn envelope_code(e: &EnvelopeError) -> u16 {
    match e.reason() {
        "expired" => reason::EXPIRED,
        "unsupported" => reason::UNSUPPORTED,
        _ => reason::BAD_SIGNATURE,
    }
}

/// A manifest whose coordinator signature checked out. The release's
/// threshold signatures are checked on first use and remembered, so the
/// simulator checks each manifest once for all the virtual devices of a
/// connection instead of once per device (as every real device does).
#[derive(Debug)]
pub struct CheckedManifest {
    manifest: Manifest,
    signer: swell_protocol::KeyId,
    epoch: u64,
    seq: u64,
    issued_at: u64,
    release: std::cell::OnceCell<Result<Release, String>>,
}

/// Parses and verifies a manifest envelope at `now` (a trusted time).
pub fn check_manifest(bytes: &[u8], keys: &KeyList, now: u64) -> Result<CheckedManifest, Verdict> {
    let env = match UnverifiedEnvelope::parse(bytes) {
        Ok(e) => e,
        Err(e) => return Err(reject(None, None, envelope_code(&e), e.reason())),
    };
    let Some(key) = keys
        .coordinator_keys
        .iter()
        .find(|k| k.key_id() == env.header.key_id)
    else {
        return Err(reject(
            None,
            None,
            reason::BAD_SIGNATURE,
            "unknown coordinator key",
        ));
    };
    match env.verify::<Manifest>(key, now) {
        Ok(v) => Ok(CheckedManifest {
            signer: v.header.key_id,
            epoch: v.header.epoch,
            seq: v.header.seq,
            issued_at: v.header.issued_at,
            manifest: v.body,
            release: std::cell::OnceCell::new(),
        }),
        Err(e) => Err(reject(None, None, envelope_code(&e), e.to_string())),
    }
}

/// Evaluates a manifest. `trust` is updated (floors raised) only for manifests
/// whose signature and freshness checked out.
pub fn evaluate(
    bytes: &[u8],
    dev: &Device<'_>,
    keys: &KeyList,
    trust: &mut TrustState,
    clock: u64,
) -> Verdict {
    match check_manifest(bytes, keys, trust.trusted_now(clock)) {
        Ok(c) => evaluate_checked(&c, dev, keys, trust, clock),
        Err(v) => v,
    }
}

/// [`evaluate`] for a manifest already checked with [`check_manifest`].
pub fn evaluate_checked(
    c: &CheckedManifest,
    dev: &Device<'_>,
    keys: &KeyList,
    trust: &mut TrustState,
    clock: u64,
) -> Verdict {
    let now = trust.trusted_now(clock);
    let m = c.manifest.clone();
    let (epoch, seq) = (c.epoch, c.seq);
    if &m.fleet != dev.fleet {
        return Verdict::NotForMe("another fleet");
    }
    match trust.manifest_freshness(&m.rollout, epoch, seq) {
        Freshness::Duplicate => return Verdict::Duplicate,
        Freshness::Stale => {
            let release_id = m.release_id();
            return reject(
                Some(m.rollout),
                Some(release_id),
                reason::REPLAYED,
                format!("({epoch}, {seq}) is older than accepted"),
            );
        }
        Freshness::New => {}
    }
    trust.accept_manifest(&m.rollout, c.signer, epoch, seq);
    trust.observe_time(c.issued_at);
    let release_id = m.release_id();
    // SIG-1: the coordinator key alone cannot name content.
    let checked = c.release.get_or_init(|| {
        m.release
            .verify::<Release>(&keys.release_keys, keys.release_threshold)
            .map_err(|e| e.reason().to_string())
    });
    let release: Release = match checked {
        Ok(r) => r.clone(),
        Err(e) => {
            return reject(
                Some(m.rollout),
                Some(release_id),
                reason::BAD_SIGNATURE,
                format!("release: {e}"),
            );
        }
    };
    if let Some(d) = dev.directive {
        if d.exclude {
            return Verdict::NotForMe("excluded by directive");
        }
        if d.pin.is_some_and(|p| p != release_id) {
            return Verdict::NotForMe("pinned to another release");
        }
    }
    // A rollback reaches what this rollout installed, and installs still under way.
    let installed_here = dev
        .running
        .as_ref()
        .is_some_and(|(r, by)| *r == release_id && by.as_ref() == Some(&m.rollout))
        || dev
            .installing
            .as_ref()
            .is_some_and(|(r, rel)| *r == m.rollout && *rel == release_id);
    match m.state {
        ManifestState::RollingBack => {
            return if installed_here {
                Verdict::RollBack {
                    rollout: m.rollout,
                    release_id,
                }
            } else {
                Verdict::NotForMe("rolling back a release this device does not run")
            };
        }
        ManifestState::Paused => return Verdict::NotForMe("rollout paused"),
        ManifestState::Halted => return Verdict::NotForMe("rollout halted"),
        ManifestState::Active => {}
    }
    if !m.selector.matches(dev.labels) {
        return Verdict::NotForMe("selector does not match");
    }
    let bucket = cohort::bucket(&release_id, dev.id);
    if !m.opens_for(dev.id, bucket) {
        return Verdict::NotForMe("wave not open");
    }
    if dev.running.as_ref().is_some_and(|(r, _)| *r == release_id) {
        return Verdict::NotForMe("already running this release");
    }
    // VER-3, before any byte is downloaded.
    if !release.hardware.iter().any(|h| h == dev.hardware) {
        return reject(
            Some(m.rollout),
            Some(release_id),
            reason::HARDWARE_MISMATCH,
            format!("release is not for {}", dev.hardware),
        );
    }
    // VER-1: the floor only rises; a deliberate rollback is a release with a higher counter.
    if release.counter < trust.counter_floor {
        return reject(
            Some(m.rollout),
            Some(release_id),
            reason::COUNTER_TOO_LOW,
            format!("counter {} below {}", release.counter, trust.counter_floor),
        );
    }
    // ROLL-3: the release keys' exposure schedule binds whatever the manifest says.
    if let Some(exposure) = &release.exposure {
        let allowed = exposure.max_ppm_at(now);
        if !cohort::is_open(bucket, cohort::open_below(allowed)) {
            return reject(
                Some(m.rollout),
                Some(release_id),
                reason::EXPOSURE_CAP,
                format!("exposure cap {} now", cohort::format_percent(allowed)),
            );
        }
    }
    if let Some((r, rel, retry)) = &dev.failed
        && *r == m.rollout
        && *rel == release_id
        && *retry >= m.retry
    {
        return Verdict::NotForMe("failed this release; waiting for a retry");
    }
    // FRESH-3: no new install without proof the coordinator is alive and current.
    if !dev.beacon_fresh {
        return reject(
            Some(m.rollout),
            Some(release_id),
            reason::NO_FRESH_BEACON,
            "no fresh beacon",
        );
    }
    Verdict::Install {
        rollout: m.rollout,
        release_id,
        release: Box::new(release),
        retry: m.retry,
    }
}

/// Checks a directive is for this device, fresh and correctly signed; returns it.
pub fn verify_directive(
    bytes: &[u8],
    me: &DeviceId,
    keys: &KeyList,
    trust: &mut TrustState,
    clock: u64,
) -> Result<DeviceDirective, Reason> {
    let now = trust.trusted_now(clock);
    let fail = |code, detail: String| Reason {
        code,
        detail: detail.chars().take(64).collect(),
    };
    let env =
        UnverifiedEnvelope::parse(bytes).map_err(|e| fail(envelope_code(&e), e.reason().into()))?;
    let key = keys
        .coordinator_keys
        .iter()
        .find(|k| k.key_id() == env.header.key_id)
        .ok_or_else(|| fail(reason::BAD_SIGNATURE, "unknown coordinator key".into()))?;
    let v = env
        .verify::<DeviceDirective>(key, now)
        .map_err(|e| fail(envelope_code(&e), e.to_string()))?;
    // FRESH-1 / MQTT-3: the signed payload names the device, whatever the topic.
    if &v.body.device != me {
        return Err(fail(
            reason::BAD_SIGNATURE,
            format!("directive for {}", v.body.device),
        ));
    }
    match trust.directive_freshness(v.header.epoch, v.header.seq) {
        Freshness::Stale => return Err(fail(reason::REPLAYED, "older directive".into())),
        Freshness::Duplicate | Freshness::New => {}
    }
    trust.accept_directive(v.header.key_id, v.header.epoch, v.header.seq);
    trust.observe_time(v.header.issued_at);
    Ok(v.body)
}
