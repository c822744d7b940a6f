use super::*;
use swell_protocol::FleetId;
use swell_protocol::fixtures;
use swell_protocol::messages::reason;
use swell_protocol::testkeys::test_key;

/// The command topic of the parser under test.
const TOPIC: &str = "swell/v1/ops/plant/cmd";

fn fleet() -> FleetId {
    FleetId::new("f").unwrap()
}

#[test]
fn ops_parse_commands() {
    let mut p = OpsParser::new(vec![], TOPIC.into(), &[]);
    let r = p
        .parse(
            br#"{"op":"pause","rollout":"fw-1","id":"7","reply_to":"me/replies"}"#,
            0,
            None,
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
    let r = p.parse(br#"{"op":"status"}"#, 0, None).unwrap();
    assert_eq!(r.op, Op::Status { rollout: None });
}

#[test]
fn ops_refusals_say_why() {
    let mut p = OpsParser::new(vec![], TOPIC.into(), &[]);
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
        let e = p.parse(input, 0, None).unwrap_err();
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
    assert_eq!(p.parse(&big, 0, None).unwrap_err().reason, "oversized");
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
    let mut p = OpsParser::new(vec![op.public()], TOPIC.into(), &[]);
    let cmd = r#"{"op":"abort","rollout":"r1","issued_at":1000,"nonce":"n1","to":"swell/v1/ops/plant/cmd"}"#;
    let r = p.parse(&signed(&op, cmd), 1000, None).unwrap();
    assert_eq!(r.signer, Some(op.key_id()));
    // Replay of the same signed command.
    assert_eq!(
        p.parse(&signed(&op, cmd), 1001, None).unwrap_err().reason,
        "replayed"
    );
    // Unsigned when signatures are required.
    assert_eq!(
        p.parse(br#"{"op":"abort","rollout":"r1"}"#, 1000, None)
            .unwrap_err()
            .reason,
        "unsigned"
    );
    // Another key.
    let other = test_key("operator-9");
    assert_eq!(
        p.parse(&signed(&other, cmd), 1000, None)
            .unwrap_err()
            .reason,
        "forged"
    );
    // Tampered text.
    let mut forged: serde_json::Value = serde_json::from_slice(&signed(&op, cmd)).unwrap();
    forged["signed"] = serde_json::Value::String(cmd.replace("abort", "pause"));
    assert_eq!(
        p.parse(forged.to_string().as_bytes(), 1000, None)
            .unwrap_err()
            .reason,
        "forged"
    );
    // Stale.
    let old =
        r#"{"op":"abort","rollout":"r1","issued_at":1,"nonce":"n2","to":"swell/v1/ops/plant/cmd"}"#;
    assert_eq!(
        p.parse(&signed(&op, old), 1000, None).unwrap_err().reason,
        "expired"
    );
}

/// OPS-1: a signed `create` (a whole release inside, far over the 256 bytes
/// of the other fields) is accepted.
#[test]
fn ops_1_a_signed_create_is_accepted() {
    let op = test_key("operator-0");
    let mut p = OpsParser::new(vec![op.public()], TOPIC.into(), &[]);
    let cmd = serde_json::json!({
        "op": "create", "issued_at": 1000, "nonce": "c1", "to": TOPIC,
        "spec": {"rollout": "fw-1", "release": release_hex(), "waves": ["100%"]},
    })
    .to_string();
    assert!(cmd.len() > 256);
    let r = p.parse(&signed(&op, &cmd), 1000, None).unwrap();
    assert!(matches!(r.op, Op::Create { .. }));
    assert_eq!(r.mark, Some((op.key_id(), 1000)));
}

/// OPS-2: after a restart (a new parser with the marks the engine stored), a
/// command accepted before is refused, and a fresh one is accepted.
#[test]
fn ops_2_a_signed_command_is_not_accepted_again_after_a_restart() {
    let op = test_key("operator-0");
    let cmd =
        format!(r#"{{"op":"abort","rollout":"r1","issued_at":1000,"nonce":"n1","to":"{TOPIC}"}}"#);
    let mut before = OpsParser::new(vec![op.public()], TOPIC.into(), &[]);
    let mark = before
        .parse(&signed(&op, &cmd), 1000, None)
        .unwrap()
        .mark
        .unwrap();
    // 73 s later, another coordinator process.
    let mut after = OpsParser::new(vec![op.public()], TOPIC.into(), &[mark]);
    assert_eq!(
        after
            .parse(&signed(&op, &cmd), 1073, None)
            .unwrap_err()
            .reason,
        "replayed"
    );
    let fresh = cmd.replace("1000", "1070").replace("n1", "n2");
    assert!(after.parse(&signed(&op, &fresh), 1073, None).is_ok());
    // Another operator's marks are its own.
    let other = test_key("operator-1");
    let mut both = OpsParser::new(vec![op.public(), other.public()], TOPIC.into(), &[mark]);
    assert!(both.parse(&signed(&other, &cmd), 1073, None).is_ok());
}

/// OPS-3: the signed text names the command topic (the fleet and the one
/// coordinator of that fleet on that prefix) and the reply topic.
#[test]
fn ops_3_a_signed_command_is_bound_to_where_it_goes() {
    let op = test_key("operator-0");
    let mut p = OpsParser::new(vec![op.public()], TOPIC.into(), &[]);
    let cmd = |n: &str, to: Option<&str>, reply_to: Option<&str>| {
        let mut c = serde_json::json!({"op": "status", "issued_at": 1000, "nonce": n});
        if let Some(t) = to {
            c["to"] = serde_json::json!(t);
        }
        if let Some(r) = reply_to {
            c["reply_to"] = serde_json::json!(r);
        }
        signed(&op, &c.to_string())
    };
    let refused = |p: &mut OpsParser, bytes: Vec<u8>, rt: Option<&str>| {
        p.parse(&bytes, 1000, rt).unwrap_err().reason
    };
    // Another fleet's (or prefix's) coordinator, or none named.
    assert_eq!(
        refused(&mut p, cmd("a", Some("swell/v1/ops/other/cmd"), None), None),
        "misdirected"
    );
    assert_eq!(
        refused(&mut p, cmd("b", Some("acme/ops/plant/cmd"), None), None),
        "misdirected"
    );
    assert_eq!(refused(&mut p, cmd("c", None, None), None), "misdirected");
    // A response topic other than the signed reply_to (or with none signed).
    let mine = "swell-ops/ann/cli/replies";
    assert_eq!(
        refused(
            &mut p,
            cmd("d", Some(TOPIC), Some(mine)),
            Some("swell-ops/eve/x/replies")
        ),
        "misdirected"
    );
    assert_eq!(
        refused(&mut p, cmd("e", Some(TOPIC), None), Some(mine)),
        "misdirected"
    );
    let ok = p
        .parse(&cmd("f", Some(TOPIC), Some(mine)), 1000, Some(mine))
        .unwrap();
    assert_eq!(ok.reply_to.as_deref(), Some(mine));
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
