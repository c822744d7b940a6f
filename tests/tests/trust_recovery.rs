//! STATE-3 with real processes: an agent whose trust file is deleted while
//! the fleet runs starts a new incarnation (its counter at 1 again), the
//! coordinator re-admits it with fresh floors because its Hello proves the
//! enrollment token, its `store_rebuilt` report and its later reports count,
//! and the next rollout completes on it. Runs on the embedded broker, and on
//! the shipped Mosquitto with `SWELL_TEST_MOSQUITTO=required`.

use std::process::Command;
use std::time::{Duration, Instant};
use swell_e2e::procs::{Proc, bin};
use swell_e2e::system::{BrokerChoice, System, bundle, ok};

fn choice() -> BrokerChoice {
    BrokerChoice::from_env()
}

#[test]
fn e2e_state_3_a_device_that_lost_its_trust_file_is_readmitted() {
    let mut sys = System::start(2, choice());
    let d = sys.dir().to_path_buf();
    let first = sys.device_row("e2e-1").expect("e2e-1 listed");
    let before = first["incarnation"].as_u64().unwrap();
    assert!(before > 0, "{first}");

    // A release everyone installs, so e2e-1's counter runs well past 1.
    let good = sys.release("app-2", "2.0.0", "2", false);
    let spec = |rollout: &str, rel: &str| {
        let path = d.join(format!("{rollout}.json"));
        let body = serde_json::json!({
            "rollout": rollout,
            "release": rel,
            "selector": "site=lab",
            "waves": ["100%"],
            "min_devices": 1,
            "bake": "1s",
            "install_timeout": "60s",
        });
        std::fs::write(&path, body.to_string()).unwrap();
        path
    };
    let p = spec("app-v2", &good);
    ok(&sys.cli(&[
        "rollout",
        "create",
        p.to_str().unwrap(),
        "--broker",
        &sys.broker,
    ]));
    sys.wait_status("app-v2", 120, |s| s["phase"] == "completed");

    // e2e-1 stops, its trust file is lost, and it starts again.
    let (name, old) = sys.fleet.agents.remove(1);
    drop(old);
    std::fs::remove_file(d.join("e2e-1/state/trust")).unwrap();
    let mut cmd = Command::new(bin("swell-agent"));
    cmd.arg("--config")
        .arg(d.join("e2e-1/agent.toml"))
        .arg("run");
    let again = Proc::spawn(cmd, d.join("e2e-1/agent-again.log")).unwrap();
    sys.fleet.agents.push((name, again));

    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let row = sys.device_row("e2e-1");
        if row.as_ref().is_some_and(|r| {
            r["incarnation"].as_u64().is_some_and(|n| n != before)
                && r["enrollment"] == "approved"
                && r["online"] == true
        }) {
            break;
        }
        assert!(
            Instant::now() < until,
            "e2e-1 not re-admitted: {row:?}\n{}",
            sys.context()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = sys.fleet.logs();
    assert!(log.contains("trust file missing"), "{log}");
    assert!(
        sys.coordinator
            .log_text()
            .contains("device starts a new incarnation"),
        "{}",
        sys.coordinator.log_text()
    );
    // Its store_rebuilt report left the outbox: the coordinator confirmed it
    // in its new incarnation, so nothing waits.
    let status = d.join("e2e-1/state/status.json");
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&status).unwrap_or_default()).unwrap_or_default();
        if s["outbox"] == 0
            && s["counters"]["reports_acked"]
                .as_u64()
                .is_some_and(|n| n >= 1)
        {
            break;
        }
        assert!(Instant::now() < until, "{s}\n{}", sys.context());
        std::thread::sleep(Duration::from_millis(300));
    }

    // Its reports count again: the next rollout completes on both devices.
    let next = sys.release("app-3", "3.0.0", "3", false);
    let p = spec("app-v3", &next);
    ok(&sys.cli(&[
        "rollout",
        "create",
        p.to_str().unwrap(),
        "--broker",
        &sys.broker,
    ]));
    let s = sys.wait_status("app-v3", 120, |s| s["phase"] == "completed");
    let healthy = swell_e2e::system::healthy(&s);
    assert_eq!(healthy, 2, "{s:#}");
    assert_eq!(sys.fleet.running("e2e-1"), Some(bundle("3.0.0", false)));
}
