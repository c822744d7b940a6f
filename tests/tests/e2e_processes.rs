//! The whole system as separate processes (swell_e2e::system): the coordinator
//! (hosting the embedded broker, or beside the shipped Mosquitto when it is
//! required), three `swell-agent`s, an artifact HTTP server and the CLI. A good
//! release rolls out to completion, a bad one is rolled back, and what each
//! device runs at the end is read from its own files.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};
use swell_e2e::mosquitto;
use swell_e2e::system::{BrokerChoice, System, bundle, ok};

fn choice() -> BrokerChoice {
    BrokerChoice::from_env()
}

#[test]
fn e2e_rollout_and_rollback_across_processes() {
    let sys = System::start(3, choice());
    let d = sys.dir();
    let broker = sys.broker.clone();
    let (coordinator, fleet) = (&sys.coordinator, &sys.fleet);
    let good = sys.release("app-2", "2.0.0", "2", false);
    let bad = sys.release("app-3", "3.0.0", "3", true);

    let spec = |rollout: &str, rel: &str| {
        let path = d.join(format!("{rollout}.json"));
        std::fs::write(
            &path,
            serde_json::json!({
                "rollout": rollout,
                "release": rel,
                "selector": "site=lab",
                "canary": ["e2e-0"],
                "waves": ["50%", "100%"],
                "min_devices": 1,
                "bake": "1s",
                "install_timeout": "60s",
                "max_failure_rate": "20%",
                "policy": "rollback",
            })
            .to_string(),
        )
        .unwrap();
        path
    };

    // The good release: canary, 50 %, 100 %, completed.
    let p = spec("app-v2", &good);
    ok(&sys.cli(&[
        "rollout",
        "create",
        p.to_str().unwrap(),
        "--broker",
        &broker,
    ]));
    let o = sys.cli(&[
        "rollout",
        "status",
        "app-v2",
        "--wait",
        "--wait-timeout",
        "120s",
        "--broker",
        &broker,
    ]);
    assert!(
        o.status.success(),
        "app-v2 did not complete: {}{}\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        coordinator.log_text(),
        fleet.logs()
    );
    for i in 0..3 {
        assert_eq!(
            fleet.running(&format!("e2e-{i}")),
            Some(bundle("2.0.0", false)),
            "e2e-{i} runs 2.0.0"
        );
    }

    // The bad release, from a YAML spec, fails its probes on the canary: the
    // rollout rolls back.
    let p = d.join("app-v3.yaml");
    std::fs::write(
        &p,
        format!(
            "rollout: app-v3\nrelease: {bad}\nselector: site=lab\ncanary: [e2e-0]\n\
             waves: [\"50%\", \"100%\"]\nmin_devices: 1\nbake: 1s\ninstall_timeout: 60s\n\
             max_failure_rate: \"20%\"\npolicy: rollback\n"
        ),
    )
    .unwrap();
    ok(&sys.cli(&[
        "rollout",
        "create",
        p.to_str().unwrap(),
        "--broker",
        &broker,
    ]));
    let o = sys.cli(&[
        "rollout",
        "status",
        "app-v3",
        "--wait",
        "--wait-timeout",
        "120s",
        "--broker",
        &broker,
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "app-v3 should end rolled back: {}{}\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        coordinator.log_text(),
        fleet.logs()
    );
    // The fleet topics, decoded and verified from the root key down.
    let o = sys.cli(&[
        "mqtt",
        "tail",
        "swell/v1/fleet/e2e/#",
        "--decode",
        "--root-key",
        "root.key.pub",
        "--count",
        "4",
        "-o",
        "json",
        "--broker",
        &broker,
    ]);
    let tail = ok(&o);
    let seen: Vec<serde_json::Value> = tail
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = seen.iter().filter_map(|v| v["kind"].as_str()).collect();
    for k in ["keylist", "beacon", "manifest"] {
        assert!(kinds.contains(&k), "{k} in {tail}");
    }
    assert!(seen.iter().all(|v| v["verified"] == true), "{tail}");
    // Every device ends on 2.0.0, read from its own slot.
    let until = Instant::now() + Duration::from_secs(30);
    while (0..3).any(|i| fleet.running(&format!("e2e-{i}")) != Some(bundle("2.0.0", false))) {
        assert!(
            Instant::now() < until,
            "not all back on 2.0.0\n{}",
            fleet.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let inventory: serde_json::Value =
        serde_json::from_str(&ok(&sys.cli(&["fleet", "-o", "json", "--broker", &broker]))).unwrap();
    assert_eq!(inventory["status"]["online"], 3, "{inventory}");
}

/// History is not rewritten (RO-008), with real agents: `app-v2` completes,
/// `app-v4` (a higher counter, over a selector that does not provably cover
/// app-v2's, so app-v2's manifest stays retained) completes after it, and the
/// coordinator restarts: it signs every retained manifest again, every agent
/// re-reads app-v2's and refuses it (counter below its floor). app-v2's status
/// stays byte-for-byte what it was when it finished.
#[test]
fn e2e_a_finished_rollout_stays_as_it_finished() {
    let mut sys = System::start(3, choice());
    let d = sys.dir().to_path_buf();
    let broker = sys.broker.clone();
    let create = |sys: &System, rollout: &str, rel: &str, selector: &str| {
        let path = d.join(format!("{rollout}.json"));
        let spec = serde_json::json!({
            "rollout": rollout, "release": rel, "selector": selector,
            "waves": ["100%"], "min_devices": 1, "bake": "1s", "install_timeout": "60s",
        });
        std::fs::write(&path, spec.to_string()).unwrap();
        ok(&sys.cli(&[
            "rollout",
            "create",
            path.to_str().unwrap(),
            "--broker",
            &broker,
        ]));
        let o = sys.cli(&[
            "rollout",
            "status",
            rollout,
            "--wait",
            "--wait-timeout",
            "120s",
            "--broker",
            &broker,
        ]);
        assert!(
            o.status.success(),
            "{rollout} did not complete\n{}",
            sys.context()
        );
    };
    let v2 = sys.release("app-2", "2.0.0", "2", false);
    create(&sys, "app-v2", &v2, "site=lab");
    let finished = sys.status("app-v2");
    assert_eq!(finished["finished"], true, "{finished}");
    assert_eq!(finished["waves"][0]["healthy"], 3, "{finished}");
    let v4 = sys.release("app-4", "4.0.0", "4", false);
    create(&sys, "app-v4", &v4, "site in (lab)");
    assert_eq!(sys.status("app-v2"), finished);

    let refusals = |sys: &System| sys.fleet.logs().matches("counter_too_low").count();
    let before = refusals(&sys);
    sys.restart_coordinator();
    let until = Instant::now() + Duration::from_secs(90);
    while refusals(&sys) < before + 3 {
        assert!(
            Instant::now() < until,
            "the agents did not refuse app-v2 again\n{}",
            sys.context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    sys.wait_status("app-v2", 30, |s| !s.is_null());
    assert_eq!(sys.status("app-v2"), finished, "app-v2's record changed");
    assert_eq!(sys.status("app-v4")["waves"][0]["healthy"], 3);
}

/// Runs `mosquitto_sub` for one message on `topic` (retained or the next one).
fn sub_one(
    port: u16,
    login: &(String, String),
    topic: &str,
    secs: u32,
) -> Option<serde_json::Value> {
    let o = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv5"])
        .args(["-u", &login.0, "-P", &login.1])
        .args(["-t", topic, "-C", "1", "-W", &secs.to_string()])
        .output()
        .ok()?;
    serde_json::from_slice(&o.stdout).ok()
}

/// `mosquitto_sub` for one message on `topic`, started and subscribed: the
/// message it gets arrives on the receiver.
fn sub_next(
    port: u16,
    login: &(String, String),
    topic: &str,
    secs: u32,
) -> std::sync::mpsc::Receiver<Option<serde_json::Value>> {
    use std::io::BufRead as _;
    // Line-buffered: piped stdout is block-buffered otherwise, and the
    // SUBACK line would come only at exit.
    let mut child = Command::new("stdbuf")
        .args(["-oL", "mosquitto_sub"])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-V",
            "mqttv5",
            "-d",
        ])
        .args(["-u", &login.0, "-P", &login.1])
        .args(["-t", topic, "-C", "1", "-W", &secs.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut got = None;
        // With -d, protocol events come as lines ("... received SUBACK");
        // the message is the line that is JSON.
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains("received SUBACK") {
                let _ = subscribed_tx.send(());
            }
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v.is_object()
            {
                got = Some(v);
            }
        }
        let _ = child.wait();
        let _ = tx.send(got);
    });
    // Witness: the broker acknowledged the subscription.
    subscribed_rx
        .recv_timeout(Duration::from_secs(u64::from(secs)))
        .expect("mosquitto_sub subscribed");
    rx
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Plain MQTT tools operate Swell: a rollout created, refused and followed with
/// `mosquitto_pub`/`mosquitto_sub` JSON only, the devices being real agents.
/// Commands go out over MQTT 3.1.1 (mosquitto_pub's default), replies and
/// statuses come back over MQTT 5: one broker port speaks both.
#[test]
fn e2e_operated_with_mosquitto_tools_only() {
    if swell_e2e::mosquitto::find("mosquitto_pub").is_none() {
        assert!(
            !mosquitto::required(),
            "SWELL_TEST_MOSQUITTO=required but mosquitto_pub is not installed"
        );
        eprintln!(
            "SKIPPED e2e_operated_with_mosquitto_tools_only: mosquitto clients not installed"
        );
        return;
    }
    let sys = System::start(2, choice());
    let d = sys.dir();
    let rel = sys.release("tool-2", "2.0.0", "2", false);
    let release_hex = to_hex(&std::fs::read(d.join(rel)).unwrap());
    let port = sys.port.to_string();
    let op = sys.operator.clone();
    let publish = |topic: &str, json: &str| {
        let o = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(["-u", &op.0, "-P", &op.1])
            .args(["-t", topic, "-m", json])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    // Replies go to `reply_to`, under the operator's user (the only place an
    // operator may read them); a subscriber waits there first.
    let replies = format!("swell-ops/{}/e2e/replies", op.0);
    let ask_on = |topic: &str, json: &str| {
        let reply = sub_next(sys.port, &op, &replies, 20);
        publish(topic, json);
        reply.recv().unwrap().expect("a reply")
    };
    let ask = |json: &str| ask_on("swell/v1/ops/e2e/cmd", json);
    // A client that still sends to the topic of before the fleet level is
    // told where commands go, and nothing is carried out.
    let legacy = serde_json::json!({"op": "list", "reply_to": replies});
    let reply = ask_on("swell/v1/ops/cmd", &legacy.to_string());
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["reason"], "legacy_topic", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.contains("swell/v1/ops/e2e/cmd")),
        "{reply}"
    );
    let create = serde_json::json!({
        "op": "create",
        "reply_to": replies,
        "spec": {"rollout": "tools-1", "release": release_hex, "waves": ["100%"],
                 "min_devices": 1, "bake": "1s", "install_timeout": "60s"}
    });
    let reply = ask(&create.to_string());
    assert_eq!(reply["ok"], true, "{reply}\n{}", sys.context());
    // A refused command answers with a reason, and changes nothing.
    let reply = ask(
        &serde_json::json!({"op": "pause", "rollout": "no-such", "reply_to": replies}).to_string(),
    );
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(reply["reason"].is_string(), "{reply}");
    // The retained status topic says when it is done.
    let until = Instant::now() + Duration::from_secs(90);
    loop {
        let s = sub_one(sys.port, &op, "swell/v1/ops/e2e/rollout/tools-1/status", 5);
        if s.as_ref().is_some_and(|s| s["phase"] == "completed") {
            break;
        }
        assert!(
            Instant::now() < until,
            "not completed: {s:?}\n{}",
            sys.context()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for i in 0..2 {
        assert_eq!(
            sys.fleet.running(&format!("e2e-{i}")),
            Some(bundle("2.0.0", false)),
            "e2e-{i}"
        );
    }
}

/// `--embedded-broker` on an address another program holds: the coordinator
/// exits non-zero and says why, instead of running against whatever listens
/// there.
#[test]
fn e2e_coordinator_exits_when_the_embedded_brokers_address_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    swell_e2e::system::make_keys(d);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut child = Command::new(swell_e2e::procs::bin("swell-coordinator"))
        .current_dir(d)
        .args(["--embedded-broker", &addr, "--fleet", "lab"])
        .args(["--key", "coord.key", "--key-list", "keys.bin"])
        .args([
            "--root-key",
            "root.key.pub",
            "--enrollment-token",
            "a-long-enough-token",
        ])
        .args(["--state-dir", "coord"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("the coordinator kept running with its broker's address taken");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "exit status {status}: {err}");
    assert!(
        err.contains(&format!("embedded broker cannot listen on {addr}")),
        "{err}"
    );
    drop(taken);
}

/// ENROLL-2: an empty enrollment token (an unset `"$TOKEN"`) or a short one
/// is refused at start, with the reason; nothing is listened on.
#[test]
fn e2e_enroll_2_an_empty_or_short_enrollment_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    swell_e2e::system::make_keys(d);
    for token in ["", "short-token"] {
        let o = Command::new(swell_e2e::procs::bin("swell-coordinator"))
            .current_dir(d)
            .args(["--embedded-broker", "127.0.0.1:0", "--fleet", "lab"])
            .args(["--key", "coord.key", "--key-list", "keys.bin"])
            .args(["--root-key", "root.key.pub", "--enrollment-token", token])
            .args(["--state-dir", "coord"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{token:?}: {err}");
        assert!(
            err.contains(&format!("a token of {} bytes is refused", token.len())),
            "{token:?}: {err}"
        );
    }
}
