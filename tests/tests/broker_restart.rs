//! MQTT-7: the broker restarts during rollouts and the outcome is the one
//! without faults. Mosquitto with the shipped configuration, persistence as
//! shipped (`persistence true`), the real coordinator and four real agents as
//! processes. Mosquitto 2.0.11 restores a persistent session after a restart
//! without its `$share` subscriptions: a coordinator that trusted
//! `session_present` went deaf, later waves had no reports and passed, and a
//! bad release went to every device.
//!
//! During a good rollout and during a bad one, Mosquitto is restarted four
//! times: SIGKILL right after it saved its database (what an autosave does)
//! and SIGTERM, twice each. The good release completes with every device on
//! it; the bad one breaches and rolls back, every device back on the good one.
//! Needs Mosquitto (skipped with a line when absent and not required).
#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};
use swell_e2e::mosquitto::{self, find};
use swell_e2e::system::{BrokerChoice, System, bundle, ok};

#[derive(Debug, Clone, Copy)]
enum Restart {
    /// SIGKILL after a save: what survives is what the last autosave wrote.
    KillAfterSave,
    /// SIGTERM: Mosquitto saves, then stops.
    Term,
}

fn restart(sys: &mut System, how: Restart) {
    let m = sys
        .mosquitto
        .as_mut()
        .and_then(|b| b.mosquitto_mut())
        .unwrap();
    match how {
        Restart::KillAfterSave => {
            m.save().unwrap();
            m.kill();
        }
        Restart::Term => m.terminate(),
    }
    m.start_again()
        .unwrap_or_else(|e| panic!("mosquitto did not start again: {e:?}"));
}

/// A wave at or past `k` is open (installing, or baking) and the rollout is
/// not over: a restart now happens during it. Which devices a wave holds
/// follows the release's id (ROLL-3), new in every run: a wave may have no
/// device and go from open to baking at once.
fn at_wave(s: &serde_json::Value, k: u64) -> bool {
    s["wave"].as_u64() >= Some(k) && (s["phase"] == "wave_open" || s["phase"] == "baking")
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

fn create(sys: &System, rollout: &str, release: &str) {
    let path = sys.dir().join(format!("{rollout}.json"));
    std::fs::write(
        &path,
        serde_json::json!({
            "rollout": rollout,
            "release": release,
            "selector": "site=lab",
            "waves": ["25%", "50%", "100%"],
            "min_devices": 1,
            // Long enough for the restarts to fall inside the waves.
            "bake": "6s",
            "install_timeout": "90s",
            "max_failure_rate": "20%",
            "policy": "rollback",
        })
        .to_string(),
    )
    .unwrap();
    ok(&sys.cli(&[
        "rollout",
        "create",
        path.to_str().unwrap(),
        "--broker",
        &sys.broker,
        "--timeout",
        "30s",
    ]));
}

/// Four agents and the coordinator (its HTTP port returned) beside Mosquitto
/// as shipped, persistence on; `None`, with a SKIPPED line, when Mosquitto is
/// not installed and not required.
fn system(test: &str) -> Option<(System, u16)> {
    if find("mosquitto").is_none() {
        assert!(
            !mosquitto::required(),
            "SWELL_TEST_MOSQUITTO=required but mosquitto is not installed"
        );
        eprintln!("SKIPPED {test}: mosquitto not installed");
        return None;
    }
    let http = mosquitto::free_port();
    let http_addr = format!("127.0.0.1:{http}");
    let sys = System::start_with(
        4,
        BrokerChoice::Mosquitto { persistence: true },
        &["--http-addr", &http_addr],
    );
    Some((sys, http))
}

#[test]
fn broker_restart_with_persistence_changes_no_outcome() {
    let Some((mut sys, http)) = system("broker_restart_with_persistence_changes_no_outcome") else {
        return;
    };
    let good = sys.release("app-2", "2.0.0", "2", false);
    let bad = sys.release("app-3", "3.0.0", "3", true);
    let devices: Vec<String> = (0..4).map(|i| format!("e2e-{i}")).collect();

    // The good release, with the four restarts spread over its waves.
    create(&sys, "good", &good);
    restart(&mut sys, Restart::KillAfterSave);
    sys.wait_status("good", 120, |s| at_wave(s, 1));
    restart(&mut sys, Restart::Term);
    sys.wait_status("good", 120, |s| at_wave(s, 2));
    restart(&mut sys, Restart::KillAfterSave);
    restart(&mut sys, Restart::Term);
    assert_ne!(
        sys.status("good")["phase"],
        "completed",
        "the restarts fell inside the rollout"
    );
    sys.wait_status("good", 180, |s| s["phase"] == "completed");
    let s = sys.status("good");
    let healthy = swell_e2e::system::healthy(&s);
    assert_eq!(healthy, 4, "every device counted: {s:#}");
    let until = Instant::now() + Duration::from_secs(30);
    while devices
        .iter()
        .any(|d| sys.fleet.running(d) != Some(bundle("2.0.0", false)))
    {
        assert!(
            Instant::now() < until,
            "not all on 2.0.0\n{}",
            sys.context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The bad release: restarted around while it installs, it still breaches.
    create(&sys, "bad", &bad);
    restart(&mut sys, Restart::KillAfterSave);
    restart(&mut sys, Restart::Term);
    restart(&mut sys, Restart::KillAfterSave);
    restart(&mut sys, Restart::Term);
    sys.wait_status("bad", 180, |s| s["phase"] == "rolled_back");
    let s = sys.status("bad");
    assert!(
        s["halt_reason"]
            .as_str()
            .is_some_and(|r| r.contains("failed")),
        "a breach, with its reason: {s:#}"
    );
    let until = Instant::now() + Duration::from_secs(60);
    while devices
        .iter()
        .any(|d| sys.fleet.running(d) != Some(bundle("2.0.0", false)))
    {
        assert!(
            Instant::now() < until,
            "not all back on 2.0.0\n{}",
            sys.context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The coordinator subscribed again after every restart and its probes
    // come back: ready.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = http_get(http, "/readyz");
        if code == 200 {
            break;
        }
        assert!(Instant::now() < until, "/readyz {code}: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, metrics) = http_get(http, "/metrics");
    let subscribes: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("swell_mqtt_subscribes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    // Restarts back to back may fall within one reconnection backoff; at
    // least the first connection and one after a restart subscribed.
    assert!(
        subscribes >= 8.0,
        "the 4 filters subscribed again after a restart: {subscribes}"
    );
}

fn metric(http: u16, name: &str) -> f64 {
    let (_, text) = http_get(http, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn signal(pid: u32, sig: &str) {
    let s = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(s.success(), "kill {sig} {pid}");
}

/// MQTT-7: what devices publish after a broker restart and before the
/// coordinator is connected again waits in the coordinator's restored session.
/// The coordinator is frozen (SIGSTOP) across a SIGTERM restart of Mosquitto;
/// the agents reconnect and say Hello (nothing else makes them say it again:
/// the coordinator's epoch does not change); once thawed, the coordinator
/// receives every one of those Hellos. With `$share` subscriptions, which
/// Mosquitto 2.0.11 does not restore, they were acknowledged and dropped.
#[test]
fn broker_restart_keeps_what_devices_send_before_the_coordinator_is_back() {
    let Some((mut sys, http)) =
        system("broker_restart_keeps_what_devices_send_before_the_coordinator_is_back")
    else {
        return;
    };
    let until = Instant::now() + Duration::from_secs(30);
    while metric(http, "swell_hellos_total") < 4.0 {
        assert!(Instant::now() < until, "no Hellos\n{}", sys.context());
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = metric(http, "swell_hellos_total");
    let connects = |sys: &System| -> Vec<usize> {
        sys.fleet
            .agents
            .iter()
            .map(|(_, p)| p.log_text().matches("connected to broker").count())
            .collect()
    };
    let connected_before = connects(&sys);
    let pid = sys.coordinator.child.id();
    signal(pid, "-STOP");
    restart(&mut sys, Restart::Term);
    // Every agent is back on the broker (and has said Hello) while the
    // coordinator is still frozen.
    let until = Instant::now() + Duration::from_secs(60);
    while connects(&sys)
        .iter()
        .zip(&connected_before)
        .any(|(now, then)| now <= then)
    {
        assert!(
            Instant::now() < until,
            "the agents did not reconnect\n{}",
            sys.context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    signal(pid, "-CONT");
    let until = Instant::now() + Duration::from_secs(30);
    while metric(http, "swell_hellos_total") < before + 4.0 {
        assert!(
            Instant::now() < until,
            "Hellos sent while the coordinator was away were lost: {} of 4 arrived\n{}",
            metric(http, "swell_hellos_total") - before,
            sys.context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
