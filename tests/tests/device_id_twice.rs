//! A device id used twice is reported, not fought over: with real processes,
//! a second `swell-agent` started with the first one's device id and broker
//! login (its own state, so its own key) takes the first one's connection
//! over; the first backs off, and after its next Hello its session note
//! (protocol 2) tells the coordinator, which shows the count in `swell fleet
//! devices`. Runs on the embedded broker, and on the shipped Mosquitto with
//! `SWELL_TEST_MOSQUITTO=required`.

use std::process::Command;
use std::time::{Duration, Instant};
use swell_e2e::procs::{Proc, bin};
use swell_e2e::system::{BrokerChoice, System};

fn choice() -> BrokerChoice {
    BrokerChoice::from_env()
}

/// `swell fleet devices -o json`: the takeovers of `device`.
fn takeovers(sys: &System, device: &str) -> Option<u64> {
    sys.device_row(device)?["takeovers"].as_u64()
}

#[test]
fn e2e_a_device_id_used_twice_is_reported() {
    let sys = System::start(1, choice());
    let d = sys.dir();
    assert_eq!(takeovers(&sys, "e2e-0"), Some(0));

    // A twin: the same configuration with a state directory of its own.
    let cfg = std::fs::read_to_string(d.join("e2e-0/agent.toml")).unwrap();
    let state = d.join("e2e-0/state").display().to_string();
    let twin_state = d.join("twin/state").display().to_string();
    std::fs::create_dir_all(d.join("twin")).unwrap();
    std::fs::write(d.join("twin/agent.toml"), cfg.replace(&state, &twin_state)).unwrap();
    let mut cmd = Command::new(bin("swell-agent"));
    cmd.arg("--config")
        .arg(d.join("twin/agent.toml"))
        .arg("run");
    let twin = Proc::spawn(cmd, d.join("twin/agent.log")).unwrap();

    let until = Instant::now() + Duration::from_secs(120);
    loop {
        if takeovers(&sys, "e2e-0").is_some_and(|n| n >= 1) {
            break;
        }
        assert!(
            Instant::now() < until,
            "no takeover reported\n--- twin\n{}\n{}",
            twin.log_text(),
            sys.context()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Only the first agent's notes verify (the twin has a key of its own), so
    // it was taken over, and its log says why.
    let log = sys.fleet.agents[0].1.log_text();
    assert!(
        log.contains("another client with this device's client id"),
        "{log}"
    );
}
