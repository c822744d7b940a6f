//! One coordinator per fleet and topic prefix (RO-014), with real processes:
//! a second coordinator for a fleet that has one exits with an error naming
//! the active one; on Mosquitto a coordinator of another fleet on the same
//! prefix runs beside it with its own presence, and its exit leaves the first
//! one's alone (the embedded broker serves one fleet: it is refused there).
//! Runs on the embedded broker, and on the shipped Mosquitto with
//! `SWELL_TEST_MOSQUITTO=required`.

use std::time::{Duration, Instant};
use swell_e2e::procs::Proc;
use swell_e2e::system::{BrokerChoice, System};

fn choice() -> BrokerChoice {
    BrokerChoice::from_env()
}

/// Waits for `p` to exit; its exit code.
fn exit_of(p: &mut Proc, secs: u64) -> Option<i32> {
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        if let Ok(Some(status)) = p.child.try_wait() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// `swell rollout list` (no `--fleet`) on the system's broker.
fn list(sys: &System, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "rollout",
        "list",
        "--broker",
        &sys.broker,
        "--timeout",
        "15s",
    ];
    args.extend_from_slice(extra);
    sys.cli(&args)
}

/// The CLI got an answer.
fn answered(sys: &System, o: &std::process::Output) {
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        sys.context()
    );
}

#[test]
fn e2e_one_coordinator_per_fleet_and_prefix() {
    let sys = System::start(1, choice());

    // A second coordinator for the same fleet: refused, and the first acts on.
    let mut second = sys.another_coordinator("e2e", "second");
    let code = exit_of(&mut second, 90);
    let log = second.log_text();
    assert!(
        code.is_some_and(|c| c != 0),
        "the second coordinator did not exit with an error: {code:?}\n{log}"
    );
    assert!(
        log.contains("another coordinator is active for fleet e2e on topic prefix swell/v1"),
        "{log}"
    );
    answered(&sys, &list(&sys, &[]));

    // A coordinator of another fleet on the same prefix. The embedded broker
    // serves its own coordinator's fleet only: refused, and it says why.
    let mut other = sys.another_coordinator("other", "other");
    if sys.mosquitto.is_none() {
        let code = exit_of(&mut other, 60);
        let log = other.log_text();
        assert!(code.is_some_and(|c| c != 0), "{code:?}\n{log}");
        assert!(
            log.contains("its rules do not grant this coordinator fleet other"),
            "{log}"
        );
        return;
    }
    // On Mosquitto it runs beside the first. The CLI, which takes the fleet
    // whose coordinator is online, now asks which.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let o = list(&sys, &[]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        if !o.status.success() && err.contains("several fleets") {
            assert!(err.contains("e2e, other"), "{err}");
            break;
        }
        assert!(
            exit_of(&mut other, 0).is_none(),
            "the other fleet's coordinator exited:\n{}",
            other.log_text()
        );
        assert!(
            Instant::now() < until,
            "the other fleet's coordinator never showed up: {err}\n{}",
            other.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for fleet in ["e2e", "other"] {
        let o = list(&sys, &["--fleet", fleet]);
        assert!(
            o.status.success(),
            "{fleet}: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            other.log_text()
        );
    }

    // The other fleet's coordinator stops: its goodbye is on its own presence
    // topic, and the first one is still the fleet's coordinator.
    let _ = std::process::Command::new("kill")
        .arg(other.child.id().to_string())
        .status();
    assert_eq!(exit_of(&mut other, 30), Some(0), "{}", other.log_text());
    answered(&sys, &list(&sys, &[]));
}
