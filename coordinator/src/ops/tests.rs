use super::*;
use swell_protocol::FleetId;
use swell_protocol::fixtures;
use swell_protocol::messages::reason;
use swell_protocol::testkeys::test_key;

fn fleet() -> FleetId {
    FleetId::new("f").unwrap()
}

#[test]
fn ops_parse_commands() {
    let mut p = OpsParser::new(vec![]);
    let r = p
        .parse(
            br#"{"op":"pause","rollout":"fw-1","id":"7","reply_to":"me/replies"}"#,
            0,
        )
        .unwrap();
    assert_eq!(
        r.op,
        Op::Pause {
            rollout: RolloutId::new("fw-1").unwrap()
        }
    );
    assert_eq!(r.id.as_deref(), Some("7"));
    assert_eq!(r.reply_to.as_deref(), Some("me/replies"));
    let r = p.parse(br#"{"op":"status"}"#, 0).unwrap();
    assert_eq!(r.op, Op::Status { rollout: None });
}

#[test]
fn ops_refusals_say_why() {
    let mut p = OpsParser::new(vec![]);
    let table: &[(&[u8], &str, &str)] = &[
        (b"not json", "malformed", "invalid JSON"),
        (b"[1,2]", "malformed", "JSON object"),
        (
            br#"{"op":"explode","rollout":"x"}"#,
            "invalid",
            "unknown variant",
        ),
        (br#"{"op":"pause"}"#, "invalid", "missing field `rollout`"),
        (
            br#"{"op":"pause","rollout":"x","force":true}"#,
            "invalid",
            "unknown field `force`",
        ),
        (
            br#"{"op":"pause","rollout":"Bad/Id"}"#,
            "invalid",
            "rollout id",
        ),
        (
            br#"{"op":"pause","rollout":"x","id":5}"#,
            "malformed",
            "id must be a string",
        ),
    ];
    for (input, reason, msg) in table {
        let e = p.parse(input, 0).unwrap_err();
        assert_eq!(
            e.reason,
            *reason,
            "{}: {e:?}",
            String::from_utf8_lossy(input)
        );
        assert!(
            e.message.contains(msg),
            "{}: {}",
            String::from_utf8_lossy(input),
            e.message
        );
    }
    let big = vec![b' '; MAX_COMMAND + 1];
    assert_eq!(p.parse(&big, 0).unwrap_err().reason, "oversized");
}

fn signed(key: &swell_protocol::SecretKey, text: &str) -> Vec<u8> {
    let sig = key.sign(OPS_DOMAIN, &[text.as_bytes()]);
    serde_json::json!({"signed": text, "key_id": key.key_id().to_string(), "sig": sig.to_string()})
        .to_string()
        .into_bytes()
}

#[test]
fn ops_signed_commands() {
    let op = test_key("operator-0");
    let mut p = OpsParser::new(vec![op.public()]);
    let cmd = r#"{"op":"abort","rollout":"r1","issued_at":1000,"nonce":"n1"}"#;
    let r = p.parse(&signed(&op, cmd), 1000).unwrap();
    assert_eq!(r.signer, Some(op.key_id()));
    // Replay of the same signed command.
    assert_eq!(
        p.parse(&signed(&op, cmd), 1001).unwrap_err().reason,
        "replayed"
    );
    // Unsigned when signatures are required.
    assert_eq!(
        p.parse(br#"{"op":"abort","rollout":"r1"}"#, 1000)
            .unwrap_err()
            .reason,
        "unsigned"
    );
    // Another key.
    let other = test_key("operator-9");
    assert_eq!(
        p.parse(&signed(&other, cmd), 1000).unwrap_err().reason,
        "forged"
    );
    // Tampered text.
    let mut forged: serde_json::Value = serde_json::from_slice(&signed(&op, cmd)).unwrap();
    forged["signed"] = serde_json::Value::String(cmd.replace("abort", "pause"));
    assert_eq!(
        p.parse(forged.to_string().as_bytes(), 1000)
            .unwrap_err()
            .reason,
        "forged"
    );
    // Stale.
    let old = r#"{"op":"abort","rollout":"r1","issued_at":1,"nonce":"n2"}"#;
    assert_eq!(
        p.parse(&signed(&op, old), 1000).unwrap_err().reason,
        "expired"
    );
}

fn release_hex() -> String {
    let r = fixtures::release(1, "1", b"a", "", "sim", &["release-0"], 0);
    hex::encode(r.encode().unwrap())
}

#[test]
fn ops_create_spec_validation() {
    let base = serde_json::json!({
        "rollout": "fw-1", "release": release_hex(), "waves": ["10%", "100%"],
        "selector": "hw=a", "bake": "1m", "install_timeout": "10m", "policy": "rollback",
        "maintenance": {"tz": "Europe/Berlin", "windows": ["02:00-04:00"]},
        "critical_reasons": ["crash_loop", "14"], "start_at": "2026-11-26T10:00:00Z",
    });
    let spec: CreateSpec = serde_json::from_value(base.clone()).unwrap();
    let s = spec.into_spec(&fleet()).unwrap();
    assert_eq!(s.gate.bake_secs, 60);
    assert_eq!(
        s.gate.critical_reasons,
        vec![reason::CRASH_LOOP, reason::PROBE_FAILED]
    );
    assert_eq!(s.windows.unwrap().daily, vec![(120, 240)]);
    assert_eq!(s.start_at, Some(1_795_687_200));

    let bad: &[(&str, serde_json::Value, &str)] = &[
        ("waves", serde_json::json!(["50%", "10%"]), "cumulative"),
        ("waves", serde_json::json!(["150%"]), "above 100%"),
        ("selector", serde_json::json!("hw in ()"), "selector"),
        ("success_threshold", serde_json::json!("120%"), "above 100%"),
        ("bake", serde_json::json!("soon"), "bake"),
        ("policy", serde_json::json!("explode"), "policy"),
        ("release", serde_json::json!("zz"), "not hex"),
        ("release", serde_json::json!("00"), "release"),
        (
            "maintenance",
            serde_json::json!({"tz": "Mars/Base", "windows": ["01:00-02:00"]}),
            "time zone",
        ),
        (
            "maintenance",
            serde_json::json!({"tz": "UTC", "windows": ["25:00-26:00"]}),
            "time of day",
        ),
        (
            "critical_reasons",
            serde_json::json!(["meltdown"]),
            "unknown failure reason",
        ),
        ("start_at", serde_json::json!("tomorrow"), "RFC 3339"),
        ("manual_gates", serde_json::json!([7]), "manual gate"),
        ("max_in_flight", serde_json::json!(0), "max_in_flight"),
    ];
    for (field, value, msg) in bad {
        let mut v = base.clone();
        v[*field] = value.clone();
        let e = serde_json::from_value::<CreateSpec>(v)
            .map_err(|e| e.to_string())
            .and_then(|s| s.into_spec(&fleet()))
            .unwrap_err();
        assert!(e.contains(msg), "{field}={value}: {e}");
    }
}

#[test]
fn ops_selector_overlap() {
    let d = |a: &str, b: &str| {
        provably_disjoint(&Selector::parse(a).unwrap(), &Selector::parse(b).unwrap())
    };
    assert!(d("hw=a", "hw=b"));
    assert!(d("hw in (a,b)", "hw in (c)"));
    assert!(d("beta", "!beta"));
    assert!(d("hw=a", "!hw"));
    assert!(d("hw=a", "hw!=a"));
    assert!(d("hw in (a,b)", "hw notin (a,b,c)"));
    assert!(!d("hw=a", "region=eu"));
    assert!(!d("", "hw=a"));
    assert!(!d("hw in (a,b)", "hw in (b,c)"));
    assert!(!d("hw!=a", "hw!=b"));
}
