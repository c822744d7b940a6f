//! Signed test objects built from the public [`crate::testkeys`]: a key list,
//! releases, manifests, beacons and directives, for tests and benchmarks of
//! every crate (feature `test-util`). Never for a real fleet.
//!
//! The cast: root `root-0`; release keys `release-0..2` with a threshold of
//! two; coordinator `coordinator-0`.

use crate::DeviceId;
use crate::PublicKey;
use crate::cohort::Selector;
use crate::envelope::{Audience, Stamp, seal};
use crate::ids::{Digest, FleetId, RolloutId};
use crate::messages::{
    Artifact, ArtifactKind, Beacon, DeviceDirective, Enrolled, KeyList, Manifest, ManifestState,
    Release,
};
use crate::testkeys::test_key;
use crate::threshold::ThresholdSigned;

/// The key list of the cast, version 1, valid from `now` for a day.
pub fn key_list(now: u64) -> KeyList {
    KeyList {
        version: 1,
        expires_at: now + 86_400,
        roots: vec![test_key("root-0").public()],
        root_threshold: 1,
        release_keys: vec![
            test_key("release-0").public(),
            test_key("release-1").public(),
            test_key("release-2").public(),
        ],
        release_threshold: 2,
        coordinator_keys: vec![test_key("coordinator-0").public()],
        operator_keys: vec![],
    }
}

/// [`key_list`] signed by the root, as it travels.
///
/// # Panics
/// Never for the cast's key list (it encodes and signs).
pub fn signed_key_list(now: u64) -> Vec<u8> {
    let mut k = ThresholdSigned::new(&key_list(now)).expect("invariant: the key list encodes");
    k.sign(&test_key("root-0"))
        .expect("invariant: a fresh key signs once");
    k.encode().expect("invariant: a signed key list encodes")
}

/// A release of one bundle artifact with these bytes at `url` (none when
/// empty), for `hardware`, signed by the named release keys.
///
/// # Panics
/// When `signers` names a key twice.
pub fn release(
    counter: u64,
    version: &str,
    artifact: &[u8],
    url: &str,
    hardware: &str,
    signers: &[&str],
    now: u64,
) -> ThresholdSigned {
    let body = Release {
        counter,
        version: version.into(),
        created_at: now,
        artifacts: vec![Artifact {
            name: "app".into(),
            kind: ArtifactKind::Bundle,
            digest: Digest::sha256(artifact),
            length: artifact.len() as u64,
            urls: if url.is_empty() {
                vec![]
            } else {
                vec![url.into()]
            },
        }],
        config: None,
        hardware: vec![hardware.into()],
        exposure: None,
        rollback: None,
    };
    let mut r = ThresholdSigned::new(&body).expect("invariant: the release encodes");
    for s in signers {
        r.sign(&test_key(s)).expect("distinct signers");
    }
    r
}

/// A stamp for a coordinator message to the fleet.
pub fn stamp(epoch: u64, seq: u64, now: u64, ttl: u64, fleet: &FleetId) -> Stamp {
    Stamp {
        epoch,
        seq,
        issued_at: now,
        expires_at: now + ttl,
        audience: Audience::Fleet(fleet.clone()),
    }
}

/// A manifest opening every device of `fleet` to `release`, signed by the
/// coordinator.
pub fn manifest(
    rollout: &RolloutId,
    fleet: &FleetId,
    release: &ThresholdSigned,
    state: ManifestState,
    stamp: Stamp,
) -> Vec<u8> {
    let m = Manifest {
        rollout: rollout.clone(),
        fleet: fleet.clone(),
        selector: Selector::all(),
        canary: vec![],
        wave: 1,
        open_below: u64::MAX,
        state,
        release: release.clone(),
        retry: 0,
    };
    seal(&test_key("coordinator-0"), stamp, &m).expect("invariant: a manifest seals")
}

/// A beacon of `fleet`, signed by the coordinator.
pub fn beacon(fleet: &FleetId, stamp: Stamp) -> Vec<u8> {
    let b = Beacon {
        fleet: fleet.clone(),
        key_list_version: 1,
    };
    seal(&test_key("coordinator-0"), stamp, &b).expect("invariant: a beacon seals")
}

/// The coordinator's confirmation that `device` is enrolled with `key` in
/// `incarnation` (kept by the device, so no expiry).
pub fn enrolled(
    device: &DeviceId,
    fleet: &FleetId,
    key: PublicKey,
    incarnation: u64,
    mut stamp: Stamp,
) -> Vec<u8> {
    stamp.audience = Audience::Device(device.clone());
    stamp.expires_at = 0;
    let e = Enrolled {
        device: device.clone(),
        fleet: fleet.clone(),
        key,
        incarnation,
    };
    seal(&test_key("coordinator-0"), stamp, &e).expect("invariant: a confirmation seals")
}

/// A directive for `device`, signed by the coordinator.
pub fn directive(device: &DeviceId, d: DeviceDirective, mut stamp: Stamp) -> Vec<u8> {
    stamp.audience = Audience::Device(device.clone());
    seal(&test_key("coordinator-0"), stamp, &d).expect("invariant: a directive seals")
}
