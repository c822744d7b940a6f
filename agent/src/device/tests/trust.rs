//! The device core against the trust model (TIME-1/2, ENROLL-2/3, STATE-3,
//! protocol versions): each test names the SECURITY.md ID it holds.

use super::*;

/// TIME-1: a beacon signed with a coordinator key but dated two days ahead (a
/// stolen key) moves the time floor by the skew at most, again and again: the
/// device keeps accepting the real coordinator's beacons (no freeze) and
/// reads a release's exposure schedule at its own time.
#[test]
fn device_time_floor_moves_no_further_than_it_can_justify() {
    let mut r = Rig::new();
    let ahead = 2 * 86_400;
    for _ in 0..5 {
        r.seq += 1;
        let stamp = fixtures::stamp(1, r.seq, T0 + ahead, 600, &fleet());
        let b = fixtures::beacon(&fleet(), stamp);
        let mut out = Vec::new();
        let clock = r.clock();
        r.core.on_beacon("b", &b, false, clock, &mut out);
    }
    let floor = r.core.trust().time_floor;
    assert!(
        floor <= T0 + crate::trust::MAX_AHEAD_SECS,
        "floor {floor} moved {} s ahead",
        floor - T0
    );
    // Later, the real coordinator's beacon is not expired for the device.
    r.advance_secs(60);
    let before = r.core.counters().rejected_beacons;
    r.beacon();
    assert_eq!(r.core.counters().rejected_beacons, before);
    // And the floor follows real time: a minute later it may be a minute further.
    r.seq += 1;
    let stamp = fixtures::stamp(1, r.seq, T0 + ahead, 600, &fleet());
    let b = fixtures::beacon(&fleet(), stamp);
    let clock = r.clock();
    r.core.on_beacon("b", &b, false, clock, &mut Vec::new());
    assert_eq!(
        r.core.trust().time_floor,
        T0 + 60 + crate::trust::MAX_AHEAD_SECS
    );
}

/// ENROLL-3: a device acts on no manifest before the coordinator confirmed its
/// enrollment for its own key in its incarnation; a confirmation for another
/// key, or one that does not verify, changes nothing.
#[test]
fn enroll_3_device_acts_on_manifests_only_after_a_signed_confirmation() {
    let mut r = Rig::unconfirmed(Restored {
        keys: Some(Arc::new(fixtures::key_list(T0))),
        ..Restored::default()
    });
    assert!(!r.core.enrolled());
    r.beacon();
    let out = r.manifest("r1", &release(2), ManifestState::Active);
    assert!(phases(&out).is_empty(), "{out:?}");
    assert!(r.core.job().is_none());
    // For another key (a squatter's binding): not ours.
    let stamp = r.stamp(0);
    let other = fixtures::enrolled(
        &DeviceId::new("dev-1").unwrap(),
        &fleet(),
        test_key("squatter").public(),
        r.core.trust().incarnation,
        stamp,
    );
    let mut out = Vec::new();
    let clock = r.clock();
    r.core.on_enrolled("e", &other, clock, &mut out);
    assert!(!r.core.enrolled());
    // Signed by a key that is not the coordinator's.
    let forged = swell_protocol::envelope::seal(
        &test_key("squatter"),
        fixtures::stamp(1, 99, T0, 0, &fleet()),
        &swell_protocol::messages::Enrolled {
            device: DeviceId::new("dev-1").unwrap(),
            fleet: fleet(),
            key: test_key("device-1").public(),
            incarnation: r.core.trust().incarnation,
        },
    )
    .unwrap();
    r.core.on_enrolled("e", &forged, clock, &mut out);
    assert!(!r.core.enrolled());
    assert_eq!(r.core.counters().rejected_enrollments, 1);
    assert!(r.core.job().is_none());
    // Ours: the manifest that waited is acted on.
    let out = r.enrolled();
    assert!(r.core.enrolled());
    assert!(out.iter().any(|e| matches!(e, Effect::PersistTrust)));
    assert_eq!(phases(&out), ["downloading"], "{out:?}");
    // Withdrawn (an empty retained message): nothing new starts.
    let mut out = Vec::new();
    r.core.on_enrolled("e", b"", clock, &mut out);
    assert!(!r.core.enrolled());
}

/// STATE-3: a device whose trust state was rebuilt with a clock behind
/// learns from the confirmation answering its Hello that the coordinator knows a later
/// incarnation of its key, goes on after it and says Hello again; every
/// message it signs carries the incarnation as `epoch`.
#[test]
fn state_3_device_goes_on_after_the_incarnation_the_coordinator_confirmed() {
    let mut r = Rig::unconfirmed(Restored {
        keys: Some(Arc::new(fixtures::key_list(T0))),
        ..Restored::default()
    });
    let ours = r.core.trust().incarnation;
    assert_eq!(
        ours,
        T0 << 32 | 1,
        "a new trust state's incarnation is its clock"
    );
    let out = r.enrolled_in(ours + 5);
    assert_eq!(r.core.trust().incarnation, ours + 6);
    assert!(!r.core.enrolled());
    let hello = out
        .iter()
        .find_map(|e| match e {
            Effect::Send(Outgoing::Hello { bytes, .. }) => Some(bytes.clone()),
            _ => None,
        })
        .expect("a Hello for the new incarnation");
    let env = swell_protocol::envelope::UnverifiedEnvelope::parse(&hello).unwrap();
    assert_eq!(env.header.epoch, ours + 6);
    let h = swell_protocol::messages::Hello::verify_self_signed(&env, T0).unwrap();
    assert_eq!(h.body.incarnation, ours + 6);
    // An earlier life's confirmation changes nothing.
    r.enrolled_in(ours);
    assert_eq!(r.core.trust().incarnation, ours + 6);
    r.enrolled_in(ours + 6);
    assert!(r.core.enrolled());
}

/// ENROLL-2: the Hello proves the token without carrying it.
#[test]
fn enroll_2_device_hello_carries_a_proof_not_the_token() {
    let s = Settings {
        enrollment_token: Some("a-fleet-token-0123".into()),
        ..settings()
    };
    let clock = Clock {
        unix: T0,
        mono_ms: 0,
    };
    let mut core = DeviceCore::new(
        Arc::new(s),
        DeviceId::new("dev-1").unwrap(),
        vec![],
        test_key("device-1"),
        Restored::default(),
        clock,
    );
    let mut out = Vec::new();
    core.connected(clock, &mut out);
    let Some(Effect::Send(Outgoing::Hello { bytes, .. })) = out
        .iter()
        .find(|e| matches!(e, Effect::Send(Outgoing::Hello { .. })))
    else {
        panic!("{out:?}");
    };
    assert!(
        !bytes.windows(18).any(|w| w == b"a-fleet-token-0123"),
        "the token travels in clear"
    );
    let env = swell_protocol::envelope::UnverifiedEnvelope::parse(bytes).unwrap();
    let h = swell_protocol::messages::Hello::verify_self_signed(&env, T0).unwrap();
    let proof = h.body.enrollment_proof.unwrap();
    assert!(swell_protocol::enroll::verify(
        &proof,
        "a-fleet-token-0123",
        &h.body.device,
        &h.body.fleet,
        &h.body.key
    ));
}

/// A coordinator of another protocol version says it cannot read us: the
/// device says so loudly and counts it.
#[test]
fn device_counts_the_coordinators_unsupported_answer() {
    let mut r = Rig::new();
    let header = swell_protocol::envelope::Header {
        proto: 3,
        kind: 4,
        key_id: test_key("device-1").key_id(),
        epoch: 1,
        seq: 2,
        issued_at: T0,
        expires_at: 0,
        audience: swell_protocol::envelope::Audience::Any,
    };
    let mut answer = swell_protocol::version::unsupported(&header);
    answer.proto_min = 4;
    answer.proto_max = 4;
    let bytes = swell_protocol::envelope::seal(
        &test_key("coordinator-0"),
        fixtures::stamp(1, 50, T0, 600, &fleet()),
        &answer,
    )
    .unwrap();
    let mut out = Vec::new();
    let clock = r.clock();
    r.core.on_directive("d", &bytes, clock, &mut out);
    assert_eq!(r.core.counters().unsupported_by_coordinator, 1);
    assert_eq!(r.core.counters().rejected_directives, 0);
}

/// TIME-2 with a stolen coordinator key: messages dated at an epoch near
/// 2^64 lock the real coordinator out while that key is trusted; once the
/// root key holders rotate it out (a new key list), the new key's messages
/// are heard again. (Before, the device's one epoch floor stayed at 2^64 − 1
/// for good.)
#[test]
fn time_2_a_rotated_out_key_no_longer_locks_the_fleet_out() {
    let mut r = Rig::new();
    r.beacon_of(2, false);
    // The thief's beacon, signed with the coordinator's own key.
    r.beacon_of(u64::MAX - 1, false);
    let rejected = r.core.counters().rejected_beacons;
    r.beacon_of(3, false);
    assert_eq!(
        r.core.counters().rejected_beacons,
        rejected + 1,
        "locked out"
    );
    // Key list 2: coordinator-1 replaces coordinator-0.
    let mut list = fixtures::key_list(T0);
    list.version = 2;
    list.coordinator_keys = vec![test_key("coordinator-1").public()];
    let mut signed = ThresholdSigned::new(&list).unwrap();
    signed.sign(&test_key("root-0")).unwrap();
    let mut out = Vec::new();
    let clock = r.clock();
    r.core
        .on_key_list(&signed.encode().unwrap(), clock, &mut out);
    assert_eq!(r.core.trust().key_list_version, 2);
    assert_eq!(r.core.trust().epoch_floor(), 0);
    // The real coordinator, with its new key.
    r.seq += 1;
    let stamp = fixtures::stamp(4, r.seq, r.unix, 600, &fleet());
    let b = swell_protocol::envelope::seal(
        &test_key("coordinator-1"),
        stamp,
        &swell_protocol::messages::Beacon {
            fleet: fleet(),
            key_list_version: 2,
        },
    )
    .unwrap();
    let mut out = Vec::new();
    r.core.on_beacon("b", &b, false, clock, &mut out);
    assert_eq!(r.core.counters().rejected_beacons, rejected + 1);
    assert_eq!(r.core.trust().epoch_floor(), 4);
}

/// ENROLL-3: a device whose Hello went unanswered (the coordinator was down,
/// or the answer was lost) says it again, after 5 min, then 10, … at most
/// every 30 min, until its enrollment is confirmed; then no more.
#[test]
fn enroll_3_an_unanswered_hello_is_said_again_with_backoff() {
    let mut r = Rig::unconfirmed(Restored {
        keys: Some(Arc::new(fixtures::key_list(T0))),
        ..Restored::default()
    });
    let mut waits = Vec::new();
    let mut last = 0;
    for _ in 0..7 {
        let mut n = 0;
        loop {
            r.advance_secs(30);
            n += 30;
            if hellos(&r.tick()) == 1 {
                break;
            }
        }
        waits.push(n);
        last = n;
    }
    assert_eq!(waits, [300, 600, 1200, 1800, 1800, 1800, 1800]);
    assert_eq!(last, 1800);
    assert!(r.core.wake_at(r.clock()).is_some());
    r.enrolled();
    r.advance_secs(3_600);
    assert_eq!(hellos(&r.tick()), 0, "confirmed: no more");
    // Its next Hello says it holds the confirmation (so it is not answered).
    let mut out = Vec::new();
    let clock = r.clock();
    r.core.connected(clock, &mut out);
    let Some(Effect::Send(Outgoing::Hello { bytes, .. })) = out
        .iter()
        .find(|e| matches!(e, Effect::Send(Outgoing::Hello { .. })))
    else {
        panic!("{out:?}");
    };
    let env = swell_protocol::envelope::UnverifiedEnvelope::parse(bytes).unwrap();
    let h = swell_protocol::messages::Hello::verify_self_signed(&env, r.unix).unwrap();
    assert!(h.body.confirmed);
}
