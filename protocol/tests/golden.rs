//! Golden vectors for protocol v1 (`protocol/tests/golden/v1/`), for what
//! protocol v2 adds (`v2/`) and for what protocol v3 redefines and adds
//! (`v3/`: Hello, Manifest, Enrolled). The v1 Hello and Manifest stay as
//! fixtures of what a v3 side refuses as unsupported.
//!
//! Each fixture is the exact bytes of one message (`.bin`, and `.hex` for eyes),
//! with a JSON description of what it decodes to. The test rebuilds every message
//! from fixed content and public test keys, checks the bytes equal the fixture,
//! decodes each fixture through the real verify path and compares the JSON, and
//! re-encodes the decoded value byte-identically.
//!
//! After an intended change (which is a protocol change: see docs/protocol.md), run
//! `SWELL_BLESS_GOLDEN=1 cargo test -p swell-protocol --test golden` and commit.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::PathBuf;
use swell_protocol::envelope::{
    self, Audience, Header, Message, MessageKind, Stamp, UnverifiedEnvelope,
};
use swell_protocol::messages::*;
use swell_protocol::threshold::{ThresholdMessage, ThresholdSigned};
use swell_protocol::{EnvelopeError, PublicKey, SecretKey, version};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/v1")
}

/// A fixture's path without extension: `name` in v1, or `v2/name`, `v3/name`.
fn base(name: &str) -> PathBuf {
    match name.split_once('/') {
        Some((v, n)) => dir().with_file_name(v).join(n),
        None => dir().join(name),
    }
}

fn bless() -> bool {
    std::env::var_os("SWELL_BLESS_GOLDEN").is_some()
}

/// Writes the fixture when blessing; otherwise checks it and returns it.
fn fixture(name: &str, bytes: &[u8], description: &Value) -> Vec<u8> {
    let b = base(name);
    let d = b.parent().unwrap().to_path_buf();
    let with = |ext: &str| b.with_extension(ext);
    let bin = with("bin");
    let hex_path = with("hex");
    let json_path = with("json");
    let pretty = serde_json::to_string_pretty(description).unwrap() + "\n";
    if bless() {
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(&bin, bytes).unwrap();
        std::fs::write(&hex_path, hex::encode(bytes) + "\n").unwrap();
        std::fs::write(&json_path, &pretty).unwrap();
    }
    let stored = std::fs::read(&bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    assert_eq!(
        hex::encode(&stored),
        hex::encode(bytes),
        "{name}.bin differs from the encoder's output"
    );
    let stored_hex = std::fs::read_to_string(&hex_path).unwrap();
    assert_eq!(
        stored_hex.trim(),
        hex::encode(&stored),
        "{name}.hex does not match {name}.bin"
    );
    stored
}

fn stored_json(name: &str) -> Value {
    let p = base(name).with_extension("json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// Decodes an envelope fixture through the real verify path and re-seals it.
fn check_envelope<T: Message + PartialEq + std::fmt::Debug>(
    name: &str,
    built: Vec<u8>,
    signer: &str,
    key: &SecretKey,
    want_body: &T,
) {
    let described = |h: &Header, body: &T| {
        json!({
            "kind": T::KIND.name(),
            "signer": signer,
            "signer_public_key": key.public().to_string(),
            "size_bytes": built.len(),
            "header": h,
            "payload": body,
        })
    };
    let parsed = UnverifiedEnvelope::parse(&built).unwrap();
    let stored = fixture(name, &built, &described(&parsed.header, want_body));

    let env = UnverifiedEnvelope::parse(&stored).unwrap();
    let v = env.verify::<T>(&key.public(), T0 + 1).unwrap();
    assert_eq!(&v.body, want_body, "{name}: decoded body");
    assert_eq!(
        described(&v.header, &v.body),
        stored_json(name),
        "{name}.json"
    );
    let stamp = Stamp {
        epoch: v.header.epoch,
        seq: v.header.seq,
        issued_at: v.header.issued_at,
        expires_at: v.header.expires_at,
        audience: v.header.audience.clone(),
    };
    let resealed = envelope::seal(key, stamp, &v.body).unwrap();
    assert_eq!(
        resealed, stored,
        "{name}: re-encoding is not byte-identical"
    );
}

fn check_threshold<T: ThresholdMessage + PartialEq + std::fmt::Debug + serde::Serialize>(
    name: &str,
    built: &ThresholdSigned,
    signers: &[(&str, &SecretKey)],
    trusted: &[PublicKey],
    threshold: u8,
    want_body: &T,
) {
    let bytes = built.encode().unwrap();
    let description = json!({
        "kind": T::KIND.name(),
        "id_sha256_of_body": built.id().to_string(),
        "signers": signers.iter().map(|(n, k)| json!({"name": n, "public_key": k.public().to_string(), "key_id": k.key_id().to_string()})).collect::<Vec<_>>(),
        "threshold": threshold,
        "size_bytes": bytes.len(),
        "body": want_body,
    });
    let stored = fixture(name, &bytes, &description);
    let obj = ThresholdSigned::decode(&stored).unwrap();
    let body: T = obj.verify(trusted, threshold).unwrap();
    assert_eq!(&body, want_body);
    assert_eq!(description, stored_json(name));
    let mut again = ThresholdSigned::new(&body).unwrap();
    for (_, k) in signers {
        again.sign(k).unwrap();
    }
    assert_eq!(
        again.encode().unwrap(),
        stored,
        "{name}: re-encoding is not byte-identical"
    );
}

#[test]
fn golden_v1_keys_file() {
    let mut keys = vec![];
    let named: Vec<(String, SecretKey)> = vec![
        ("root-0".into(), root(0)),
        ("root-1".into(), root(1)),
        ("release-0".into(), release_key(0)),
        ("release-1".into(), release_key(1)),
        ("release-2".into(), release_key(2)),
        ("coordinator-0".into(), coordinator_key()),
        ("operator-0".into(), operator_key()),
        ("device-42".into(), device_key(42)),
    ];
    for (name, k) in &named {
        keys.push(json!({
            "name": name,
            "seed": hex::encode(k.to_seed()),
            "public_key": k.public().to_string(),
            "key_id": k.key_id().to_string(),
        }));
    }
    let v = json!({
        "warning": "TEST KEYS: seeds are public (seed = SHA-256(\"swell test key/\" || name)). Never trust them in a real fleet.",
        "keys": keys,
    });
    let p = dir().join("keys.json");
    let pretty = serde_json::to_string_pretty(&v).unwrap() + "\n";
    if bless() {
        std::fs::create_dir_all(dir()).unwrap();
        std::fs::write(&p, &pretty).unwrap();
    }
    let stored: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    assert_eq!(stored, v);
}

#[test]
fn golden_v1_keylist() {
    let trusted = [root(0).public(), root(1).public()];
    check_threshold(
        "keylist",
        &key_list(),
        &[("root-0", &root(0)), ("root-1", &root(1))],
        &trusted,
        2,
        &key_list_body(),
    );
}

#[test]
fn golden_v1_release() {
    let trusted = key_list_body().release_keys;
    check_threshold(
        "release",
        &release(),
        &[
            ("release-0", &release_key(0)),
            ("release-1", &release_key(1)),
        ],
        &trusted,
        2,
        &release_body(),
    );
}

#[test]
fn golden_v3_manifest() {
    check_envelope(
        "v3/manifest",
        manifest(),
        "coordinator-0",
        &coordinator_key(),
        &manifest_body(),
    );
}

#[test]
fn golden_v1_beacon() {
    check_envelope(
        "beacon",
        beacon(),
        "coordinator-0",
        &coordinator_key(),
        &beacon_body(),
    );
}

#[test]
fn golden_v1_directive() {
    check_envelope(
        "directive",
        directive(),
        "coordinator-0",
        &coordinator_key(),
        &directive_body(),
    );
}

#[test]
fn golden_v3_hello() {
    check_envelope(
        "v3/hello",
        hello(),
        "device-42",
        &device_key(42),
        &hello_body(),
    );
    // The proof is the one docs/protocol.md's construction gives.
    let h = hello_body();
    let proof = h.enrollment_proof.unwrap();
    assert!(swell_protocol::enroll::verify(
        &proof,
        ENROLLMENT_TOKEN,
        &h.device,
        &h.fleet,
        &h.key
    ));
}

#[test]
fn golden_v3_enrolled() {
    check_envelope(
        "v3/enrolled",
        enrolled(),
        "coordinator-0",
        &coordinator_key(),
        &enrolled_body(),
    );
}

/// Protocol 1's Hello, as a v1 or v2 agent sends it (decoded here with its
/// own layout, which docs/protocol.md keeps).
#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)] // read by Debug only: the layout is the point
struct HelloV1 {
    device: swell_protocol::DeviceId,
    fleet: swell_protocol::FleetId,
    key: PublicKey,
    labels: Vec<swell_protocol::cohort::Label>,
    hardware: String,
    agent_version: String,
    proto_min: u16,
    proto_max: u16,
    boot: u64,
    running: Option<swell_protocol::ReleaseId>,
    counter_floor: u64,
    enrollment_token: Option<String>,
}

/// The v1 Hello and Manifest (fixtures kept from protocol 1): a v3 side reads
/// their frozen headers, refuses them as unsupported and can say which
/// versions it speaks; a v1 manifest's payload has the v3 layout but the old
/// bucket, so it must not be read as one.
#[test]
fn golden_v1_hello_and_manifest_are_unsupported_by_v3() {
    let read = |name: &str| std::fs::read(base(name).with_extension("bin")).unwrap();
    let hello_v1 = read("hello");
    let env = UnverifiedEnvelope::parse(&hello_v1).unwrap();
    assert_eq!(
        (env.header.proto, env.kind()),
        (1, Some(MessageKind::Hello))
    );
    assert!(!version::understands(&env.header));
    assert_eq!(
        env.verify::<Hello>(&device_key(42).public(), T0 + 61),
        Err(EnvelopeError::UnsupportedProto { got: 1 })
    );
    let (_, rest) = postcard::take_from_bytes::<Header>(&hello_v1).unwrap();
    let (payload, _) = postcard::take_from_bytes::<&[u8]>(rest).unwrap();
    let old: HelloV1 = postcard::from_bytes(payload).unwrap();
    assert_eq!((old.proto_min, old.proto_max), (1, 1));
    let answer = version::unsupported(&env.header);
    assert_eq!((answer.proto_min, answer.proto_max), (3, 3));
    assert_eq!((answer.kind, answer.proto, answer.seq), (4, 1, 100));

    let manifest_v1 = read("manifest");
    let env = UnverifiedEnvelope::parse(&manifest_v1).unwrap();
    assert_eq!(
        (env.header.proto, env.kind()),
        (1, Some(MessageKind::Manifest))
    );
    assert_eq!(
        env.verify::<Manifest>(&coordinator_key().public(), T0 + 1),
        Err(EnvelopeError::UnsupportedProto { got: 1 })
    );
}

#[test]
fn golden_v1_report() {
    check_envelope(
        "report",
        report(),
        "device-42",
        &device_key(42),
        &report_body(),
    );
    check_envelope(
        "report-rolled-back",
        report_failed(),
        "device-42",
        &device_key(42),
        &report_failed_body(),
    );
}

#[test]
fn golden_v1_unsupported() {
    check_envelope(
        "unsupported",
        unsupported(),
        "device-42",
        &device_key(42),
        &unsupported_body(),
    );
}

/// A message from a future protocol version 2 with a kind v1 does not know: a v1
/// reader still reads the frozen header, refuses the payload, and can answer.
#[test]
fn golden_v1_reads_v2_header_and_answers_unsupported() {
    let key = device_key(42);
    let header = Header {
        proto: 2,
        kind: 99,
        key_id: key.key_id(),
        epoch: 5,
        seq: 12,
        issued_at: T0 + 61,
        expires_at: 0,
        audience: Audience::Any,
    };
    let header_bytes = postcard::to_allocvec(&header).unwrap();
    let payload = b"\x07future payload".to_vec();
    let sig = key.sign("swell/kind-99/v2", &[&header_bytes, &payload]);
    let mut bytes = header_bytes;
    bytes.extend_from_slice(&postcard::to_allocvec(&payload).unwrap());
    bytes.extend_from_slice(&sig.0);
    let description =
        json!({"kind": "future (proto 2, kind 99)", "header": header, "size_bytes": bytes.len()});
    let stored = fixture("future-v2", &bytes, &description);
    assert_eq!(stored_json("future-v2"), description);

    let env = UnverifiedEnvelope::parse(&stored).unwrap();
    assert_eq!(env.header, header);
    assert_eq!(env.kind(), None);
    assert!(!version::understands(&env.header));
    assert_eq!(
        env.verify::<Report>(&key.public(), T0 + 100),
        Err(EnvelopeError::UnsupportedProto { got: 2 })
    );
    // The answer names this side's range (the golden one was made by v1).
    assert_eq!(
        version::unsupported(&env.header),
        Unsupported {
            proto_min: version::PROTO_MIN,
            proto_max: version::PROTO_MAX,
            ..unsupported_body()
        }
    );
}

/// Protocol 2's one addition: a device's session note. It travels with proto
/// 2 in its header; a v1 coordinator, which reads the report topic as
/// reports, refuses it as unsupported and nothing else changes.
#[test]
fn golden_v2_session_note() {
    let key = device_key(42);
    check_envelope(
        "v2/session-note",
        session_note(),
        "device-42",
        &key,
        &session_note_body(),
    );
    let bytes = session_note();
    let env = UnverifiedEnvelope::parse(&bytes).unwrap();
    assert_eq!(
        (env.header.proto, env.kind()),
        (2, Some(MessageKind::SessionNote))
    );
    assert!(version::understands(&env.header));
    assert_eq!(
        env.verify::<Report>(&key.public(), T0 + 1),
        Err(EnvelopeError::UnsupportedProto { got: 2 })
    );
    // A note under the version of the kinds before it is not one.
    let mut header = env.header.clone();
    header.proto = 1;
    assert!(!version::understands(&header));
}

/// Encoded sizes of every kind; the Report budget is part of the protocol's promise
/// (cellular links are billed per byte).
#[test]
fn golden_v1_size_budgets() {
    let sizes = [
        ("keylist", key_list().encode().unwrap().len()),
        ("release", release().encode().unwrap().len()),
        ("manifest", manifest().len()),
        ("beacon", beacon().len()),
        ("directive", directive().len()),
        ("hello", hello().len()),
        ("report", report().len()),
        ("report-rolled-back", report_failed().len()),
        ("unsupported", unsupported().len()),
        ("session-note (v2)", session_note().len()),
        ("enrolled (v3)", enrolled().len()),
    ];
    for (name, n) in sizes {
        println!("{name:>20}: {n} bytes");
    }
    assert!(
        report().len() <= 160,
        "signed Report is {} bytes; budget 160",
        report().len()
    );
    assert!(beacon().len() <= 128, "beacon is {} bytes", beacon().len());
    // Every kind a fixture: the eight of v1, v2's session note, v3's enrolled.
    assert!(MessageKind::ALL.len() == 10);
}
