//! Envelope rejection paths: every way a message can be forged, replayed across
//! types, expired, truncated or padded is refused with its own error.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use common::*;
use proptest::prelude::*;
use swell_protocol::codec::CodecError;
use swell_protocol::envelope::{
    Audience, Header, MAX_ENVELOPE, MessageKind, Stamp, UnverifiedEnvelope, seal,
};
use swell_protocol::messages::*;
use swell_protocol::{EnvelopeError, ReleaseId, RolloutId};

/// An envelope built by hand (bypassing `seal`'s own checks), signed under `domain`.
fn hand_sealed(
    key: &swell_protocol::SecretKey,
    domain: &str,
    header: &Header,
    payload: &[u8],
) -> Vec<u8> {
    let hb = postcard::to_allocvec(header).unwrap();
    let sig = key.sign(domain, &[&hb, payload]);
    let mut b = hb;
    b.extend_from_slice(&postcard::to_allocvec(payload).unwrap());
    b.extend_from_slice(&sig.0);
    b
}

/// A v1 Report header signed by `key`, as `seal` would write it.
fn report_header(key: &swell_protocol::SecretKey) -> Header {
    Header {
        proto: 1,
        kind: MessageKind::Report as u16,
        key_id: key.key_id(),
        epoch: 0,
        seq: 1,
        issued_at: T0,
        expires_at: 0,
        audience: Audience::Any,
    }
}

fn verify_report(bytes: &[u8]) -> Result<Report, EnvelopeError> {
    UnverifiedEnvelope::parse(bytes)?
        .verify::<Report>(&device_key(42).public(), T0 + 1)
        .map(|v| v.body)
}

#[test]
fn envelope_every_bit_flip_is_rejected() {
    let good = report();
    assert!(verify_report(&good).is_ok());
    for i in 0..good.len() * 8 {
        let mut b = good.clone();
        b[i / 8] ^= 1 << (i % 8);
        assert!(verify_report(&b).is_err(), "bit {i} flipped was accepted");
    }
}

#[test]
fn envelope_every_truncation_and_extension_is_rejected() {
    let good = report();
    for n in 0..good.len() {
        assert!(
            verify_report(&good[..n]).is_err(),
            "prefix of {n} bytes accepted"
        );
    }
    let mut longer = good.clone();
    longer.push(0);
    assert!(matches!(
        verify_report(&longer),
        Err(EnvelopeError::Codec(CodecError::TrailingBytes { .. }))
    ));
}

#[test]
fn envelope_wrong_kind_is_refused() {
    let b = beacon();
    let e = UnverifiedEnvelope::parse(&b)
        .unwrap()
        .verify::<DeviceDirective>(&coordinator_key().public(), T0 + 1)
        .unwrap_err();
    assert!(matches!(
        e,
        EnvelopeError::WrongKind {
            expected: "directive",
            got: 2
        }
    ));
    assert_eq!(e.reason(), "wrong_kind");
}

/// SIG-4: a coordinator signature over a beacon cannot be presented as a directive
/// even with identical header and payload bytes, because the domain tag differs.
#[test]
fn envelope_cross_type_substitution_is_rejected() {
    let key = coordinator_key();
    // A payload that decodes both as a Beacon and as a DeviceDirective is not even
    // needed: the signature alone must fail.
    let stamp = coord_stamp(1, Audience::Any);
    let beacon_bytes = seal(&key, stamp, &beacon_body()).unwrap();
    let env = UnverifiedEnvelope::parse(&beacon_bytes).unwrap();
    // Rewrite the header's kind to Directive, keeping the beacon's signature.
    let mut h: Header = env.header.clone();
    h.kind = MessageKind::Directive as u16;
    let mut forged = postcard::to_allocvec(&h).unwrap();
    let old_header_len = postcard::to_allocvec(&env.header).unwrap().len();
    forged.extend_from_slice(&beacon_bytes[old_header_len..]);
    let e = UnverifiedEnvelope::parse(&forged)
        .unwrap()
        .verify::<DeviceDirective>(&key.public(), T0 + 1)
        .unwrap_err();
    assert_eq!(e, EnvelopeError::BadSignature);
    assert_eq!(e.reason(), "forged");

    // And a signature made with the beacon domain over directive bytes fails too.
    let header = Header {
        kind: MessageKind::Directive as u16,
        ..env.header.clone()
    };
    let payload = postcard::to_allocvec(&directive_body()).unwrap();
    let grafted = hand_sealed(&key, MessageKind::Beacon.domain(), &header, &payload);
    let e = UnverifiedEnvelope::parse(&grafted)
        .unwrap()
        .verify::<DeviceDirective>(&key.public(), T0 + 1)
        .unwrap_err();
    assert_eq!(e, EnvelopeError::BadSignature);
}

#[test]
fn envelope_other_key_is_refused() {
    let b = report();
    let env = UnverifiedEnvelope::parse(&b).unwrap();
    let e = env
        .verify::<Report>(&device_key(7).public(), T0)
        .unwrap_err();
    assert!(matches!(e, EnvelopeError::KeyMismatch { .. }));
    assert_eq!(e.reason(), "forged");

    // Same key id claimed, different key signed: the signature fails.
    let stamp = device_stamp(1);
    let mut bytes = seal(&device_key(7), stamp, &report_body()).unwrap();
    let env7 = UnverifiedEnvelope::parse(&bytes).unwrap();
    let h = Header {
        key_id: device_key(42).key_id(),
        ..env7.header.clone()
    };
    let old = postcard::to_allocvec(&env7.header).unwrap().len();
    let mut forged = postcard::to_allocvec(&h).unwrap();
    forged.extend_from_slice(&bytes.split_off(old));
    assert_eq!(verify_report(&forged), Err(EnvelopeError::BadSignature));
}

#[test]
fn envelope_expiry_is_enforced() {
    let b = beacon();
    let env = UnverifiedEnvelope::parse(&b).unwrap();
    let exp = env.header.expires_at;
    assert!(
        env.verify::<Beacon>(&coordinator_key().public(), exp - 1)
            .is_ok()
    );
    let e = env
        .verify::<Beacon>(&coordinator_key().public(), exp)
        .unwrap_err();
    assert_eq!(
        e,
        EnvelopeError::Expired {
            expires_at: exp,
            now: exp
        }
    );
    assert_eq!(e.reason(), "expired");
}

#[test]
fn envelope_coordinator_messages_need_an_expiry() {
    let stamp = Stamp {
        expires_at: 0,
        ..coord_stamp(1, Audience::Any)
    };
    assert_eq!(
        seal(&coordinator_key(), stamp.clone(), &beacon_body()),
        Err(EnvelopeError::MissingExpiry { kind: "beacon" })
    );
    // Built by hand, bypassing seal's check: still refused on verify.
    let key = coordinator_key();
    let header = Header {
        proto: 1,
        kind: MessageKind::Beacon as u16,
        key_id: key.key_id(),
        epoch: 1,
        seq: 1,
        issued_at: T0,
        expires_at: 0,
        audience: Audience::Any,
    };
    let payload = postcard::to_allocvec(&beacon_body()).unwrap();
    let b = hand_sealed(&key, MessageKind::Beacon.domain(), &header, &payload);
    let e = UnverifiedEnvelope::parse(&b)
        .unwrap()
        .verify::<Beacon>(&key.public(), T0)
        .unwrap_err();
    assert_eq!(e, EnvelopeError::MissingExpiry { kind: "beacon" });
}

#[test]
fn envelope_oversized_is_refused_before_parsing() {
    let huge = vec![0u8; MAX_ENVELOPE + 1];
    let e = UnverifiedEnvelope::parse(&huge).unwrap_err();
    assert!(matches!(
        e,
        EnvelopeError::Codec(CodecError::TooLarge { .. })
    ));
    assert_eq!(e.reason(), "oversized");
}

#[test]
fn envelope_invalid_content_is_refused_even_when_signed() {
    // Signed by the right key but semantically invalid (progress > 1000): the
    // signer's own validation refuses to seal, and a hand-made one fails verify.
    let mut body = report_body();
    body.metrics.progress_permille = 5000;
    assert!(matches!(
        seal(&device_key(42), device_stamp(1), &body),
        Err(EnvelopeError::Invalid { .. })
    ));
    let key = device_key(42);
    let header = report_header(&key);
    let payload = postcard::to_allocvec(&body).unwrap();
    let b = hand_sealed(&key, MessageKind::Report.domain(), &header, &payload);
    let e = verify_report(&b).unwrap_err();
    assert!(
        matches!(e, EnvelopeError::Invalid { kind: "report", .. }),
        "{e}"
    );
}

#[test]
fn envelope_payload_with_invalid_id_fails_closed() {
    // A device id with a wildcard, signed correctly, never decodes (SIG-5, MQTT-2).
    let key = device_key(42);
    let mut payload = postcard::to_allocvec(&report_body()).unwrap();
    // payload starts with varint(len) + "rpi-0042": turn '-' into '+'.
    let pos = payload.iter().position(|b| *b == b'-').unwrap();
    payload[pos] = b'+';
    let header = report_header(&key);
    let b = hand_sealed(&key, MessageKind::Report.domain(), &header, &payload);
    let e = verify_report(&b).unwrap_err();
    assert_eq!(e.reason(), "malformed", "{e}");
}

#[test]
fn envelope_unknown_variant_fails_closed() {
    // Phase variant 200 does not exist in v1.
    let key = device_key(42);
    let mut payload = postcard::to_allocvec(&report_body()).unwrap();
    let committed_idx = {
        // device, rollout option+string, release 32 bytes, then the phase varint.
        let d = 1 + "rpi-0042".len();
        let r = 1 + 1 + "fw-2-3".len();
        d + r + 32
    };
    assert_eq!(payload[committed_idx], 5, "Committed is variant 5");
    payload[committed_idx] = 100;
    let header = report_header(&key);
    let b = hand_sealed(&key, MessageKind::Report.domain(), &header, &payload);
    assert_eq!(verify_report(&b).unwrap_err().reason(), "malformed");
}

fn arb_phase() -> impl Strategy<Value = Phase> {
    let reason = (any::<u16>(), "[ -~]{0,64}").prop_map(|(code, detail)| Reason { code, detail });
    prop_oneof![
        Just(Phase::Init),
        Just(Phase::Downloading),
        Just(Phase::Downloaded),
        Just(Phase::Installing),
        Just(Phase::Probation),
        Just(Phase::Committed),
        reason.clone().prop_map(Phase::Failed),
        reason.clone().prop_map(Phase::RolledBack),
        reason.prop_map(Phase::Rejected),
    ]
}

proptest! {
    #[test]
    fn envelope_report_round_trips(
        dev_id in "[a-z0-9][a-z0-9._-]{0,62}",
        rollout in proptest::option::of("[a-z0-9][a-z0-9._-]{0,62}"),
        release in any::<[u8; 32]>(),
        phase in arb_phase(),
        probes in proptest::collection::vec((any::<u8>(), any::<bool>()), 0..16),
        progress in 0u16..=1000,
        attempt in any::<u16>(),
        uptime in any::<u64>(),
        seq in any::<u64>(),
        epoch in any::<u64>(),
        issued_at in any::<u64>(),
    ) {
        let body = Report {
            device: dev(&dev_id),
            rollout: rollout.map(|r| RolloutId::new(r).unwrap()),
            release: ReleaseId(release),
            phase,
            probes: probes.into_iter().map(|(index, ok)| ProbeResult { index, ok }).collect(),
            metrics: Metrics { progress_permille: progress, attempt, uptime_secs: uptime },
        };
        let key = device_key(1);
        let stamp = Stamp { epoch, seq, issued_at, expires_at: 0, audience: Audience::Any };
        let bytes = seal(&key, stamp, &body).unwrap();
        let v = UnverifiedEnvelope::parse(&bytes).unwrap().verify::<Report>(&key.public(), 0).unwrap();
        prop_assert_eq!(v.body, body);
        prop_assert_eq!(v.header.seq, seq);
    }

    #[test]
    fn envelope_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(env) = UnverifiedEnvelope::parse(&bytes) {
            let _ = env.verify::<Report>(&device_key(1).public(), T0);
            let _ = env.verify::<Manifest>(&coordinator_key().public(), T0);
        }
    }
}

/// Overlong varints in the header or the payload length are refused: every
/// envelope has one byte form.
#[test]
fn envelope_non_canonical_encodings_are_refused() {
    let good = report();
    assert_eq!(good[0], 1, "proto varint");
    let mut overlong = vec![0x81, 0x00];
    overlong.extend_from_slice(&good[1..]);
    let e = UnverifiedEnvelope::parse(&overlong).unwrap_err();
    assert_eq!(e.reason(), "malformed", "{e}");

    let env = UnverifiedEnvelope::parse(&good).unwrap();
    let header_len = postcard::to_allocvec(&env.header).unwrap().len();
    let payload_len = good[header_len];
    assert!(payload_len < 0x80);
    let mut b = good[..header_len].to_vec();
    b.extend_from_slice(&[payload_len | 0x80, 0x00]);
    b.extend_from_slice(&good[header_len + 1..]);
    let e = UnverifiedEnvelope::parse(&b).unwrap_err();
    assert_eq!(e.reason(), "malformed", "{e}");
}

#[test]
fn envelope_hello_is_self_signed() {
    let good = hello();
    let env = UnverifiedEnvelope::parse(&good).unwrap();
    let v = Hello::verify_self_signed(&env, T0).unwrap();
    assert_eq!(v.body, hello_body());

    // A Hello announcing one key but signed by another is forged.
    let forged = seal(&device_key(7), device_stamp(1), &hello_body()).unwrap();
    let env = UnverifiedEnvelope::parse(&forged).unwrap();
    let e = Hello::verify_self_signed(&env, T0).unwrap_err();
    assert_eq!(e.reason(), "forged", "{e}");

    // A report is not a hello.
    let r = report();
    let env = UnverifiedEnvelope::parse(&r).unwrap();
    assert!(Hello::verify_self_signed(&env, T0).is_err());
}

/// An enrolled device's Hello is checked with its enrolled key: a new key in
/// the payload, even self-signed, does not replace it.
#[test]
fn envelope_hello_of_an_enrolled_device_needs_its_enrolled_key() {
    let good = hello();
    let env = UnverifiedEnvelope::parse(&good).unwrap();
    let enrolled = hello_body().key;
    assert_eq!(
        Hello::verify(&env, Some(&enrolled), T0).unwrap().body,
        hello_body()
    );
    assert_eq!(Hello::verify(&env, None, T0).unwrap().body, hello_body());

    let other = device_key(7);
    let mut body = hello_body();
    body.key = other.public();
    let rekeyed = seal(&other, device_stamp(1), &body).unwrap();
    let env = UnverifiedEnvelope::parse(&rekeyed).unwrap();
    assert!(
        Hello::verify(&env, None, T0).is_ok(),
        "self-signed by the new key"
    );
    let e = Hello::verify(&env, Some(&enrolled), T0).unwrap_err();
    assert_eq!(e.reason(), "forged", "{e}");
}

/// Honest reports by `n` devices, each with its own key.
fn reports_of_many(n: u8) -> Vec<(Vec<u8>, swell_protocol::PublicKey)> {
    (0..n)
        .map(|i| {
            let key = device_key(100 + u32::from(i));
            (
                seal(&key, device_stamp(1), &report_body()).unwrap(),
                key.public(),
            )
        })
        .collect()
}

/// `verify_all` over the batch must say, item by item, what `verify` says.
fn same_as_one_by_one(batch: &[(Vec<u8>, swell_protocol::PublicKey)], now: u64) -> Vec<bool> {
    let envs: Vec<_> = batch
        .iter()
        .map(|(b, k)| (UnverifiedEnvelope::parse(b).unwrap(), *k))
        .collect();
    let items: Vec<_> = envs.iter().map(|(e, k)| (e, k)).collect();
    let all = UnverifiedEnvelope::verify_all::<Report>(&items, now);
    let one: Vec<_> = items
        .iter()
        .map(|(e, k)| e.verify::<Report>(k, now))
        .collect();
    assert_eq!(all, one);
    all.iter().map(Result::is_ok).collect()
}

#[test]
fn envelope_batch_verification_answers_each_as_alone() {
    let honest = reports_of_many(12);
    assert!(same_as_one_by_one(&honest, T0 + 1).iter().all(|ok| *ok));
    // One bad envelope among honest ones, every kind of badness a flipped bit
    // gives (header fields, payload, signature), plus a wrong key, a wrong kind
    // and an expired one: only that one is refused, with verify's own error.
    let good = honest[5].0.clone();
    let mut bad: Vec<(Vec<u8>, swell_protocol::PublicKey)> = (0..good.len() * 8)
        .step_by(7)
        .map(|i| {
            let mut b = good.clone();
            b[i / 8] ^= 1 << (i % 8);
            (b, honest[5].1)
        })
        .filter(|(b, _)| UnverifiedEnvelope::parse(b).is_ok())
        .collect();
    bad.push((good.clone(), honest[6].1));
    bad.push((beacon(), coordinator_key().public()));
    let key = device_key(3);
    let stamp = Stamp {
        expires_at: T0 + 1,
        ..device_stamp(2)
    };
    bad.push((seal(&key, stamp, &report_body()).unwrap(), key.public()));
    assert!(bad.len() > 50);
    for b in bad {
        let mut batch = honest.clone();
        batch[5] = b;
        let ok = same_as_one_by_one(&batch, T0 + 1);
        assert_eq!(ok.iter().filter(|ok| !**ok).count(), 1);
        assert!(!ok[5]);
    }
}
