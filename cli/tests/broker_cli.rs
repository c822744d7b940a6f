//! `swell broker`: the ACL file the k3s manifest ships is the one the rules
//! render, and the dynamic-security file the CLI writes is one Mosquitto runs
//! with: a device logs in with its password and client id, and is refused
//! another's (MQTT-1, MQTT-8).
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};
use std::time::Duration;
use swell_e2e::mosquitto::{self, Mosquitto, Shipped, StartError};

fn swell(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_swell"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn broker_acl_shipped_in_deploy_is_the_rendered_one() {
    let dir = tempfile::tempdir().unwrap();
    let o = swell(dir.path(), &["broker", "mosquitto-acl"]);
    assert!(o.status.success());
    let (_, shipped) = mosquitto::shipped_config().unwrap();
    assert_eq!(
        String::from_utf8(o.stdout).unwrap(),
        shipped,
        "deploy/k3s/mosquitto.yaml's acl differs from `swell broker mosquitto-acl`: render it again"
    );
}

#[test]
fn broker_dynsec_file_logs_devices_in_and_keeps_ids_bound() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("coordinator.pw"), "coordinator-password-0\n").unwrap();
    std::fs::write(d.join("ann.pw"), "ann-password-0123456\n").unwrap();
    std::fs::write(d.join("short.pw"), "short\n").unwrap();
    std::fs::write(
        d.join("devices.txt"),
        "# id password\nrpi-0001 rpi-0001-password-00\nrpi-0002 rpi-0002-password-00\n",
    )
    .unwrap();
    let o = swell(
        d,
        &[
            "broker",
            "mosquitto-dynsec",
            "--coordinator-password-file",
            "coordinator.pw",
            "--operator",
            "ann=ann.pw",
            "--devices",
            "devices.txt",
            "--out",
            "dynsec.json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(d.join("dynsec.json")).unwrap();
    assert!(!text.contains("password-0"), "no password in clear");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(d.join("dynsec.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }
    // Bad input: one line each, nothing written.
    for (args, says) in [
        (
            vec!["--coordinator-password-file", "short.pw"],
            "at least 16",
        ),
        (
            vec!["--coordinator-password-file", "missing.pw"],
            "cannot read",
        ),
        (
            vec![
                "--coordinator-password-file",
                "coordinator.pw",
                "--operator",
                "ann",
            ],
            "NAME=PASSWORD_FILE",
        ),
    ] {
        let mut all = vec!["broker", "mosquitto-dynsec", "--out", "bad.json"];
        all.extend(args);
        let o = swell(d, &all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(says) && !err.contains("panicked"), "{err}");
        assert!(!d.join("bad.json").exists());
    }

    // Mosquitto runs with it.
    let m = match Mosquitto::start_shipped(&Shipped {
        dynsec: text,
        ..Shipped::default()
    }) {
        Ok(m) => m,
        Err(StartError::Missing) => {
            eprintln!("SKIPPED the Mosquitto half: mosquitto not installed");
            return;
        }
        Err(StartError::Failed(e)) => panic!("{e}"),
    };
    let Some(sub) = mosquitto::find("mosquitto_sub") else {
        assert!(!mosquitto::required(), "mosquitto_sub is missing");
        return;
    };
    let try_login = |user: &str, pw: &str, id: &str| {
        Command::new(&sub)
            .args(["-h", "127.0.0.1", "-p", &m.port().to_string()])
            .args(["-u", user, "-P", pw, "-i", id])
            .args(["-t", "swell/v1/dev/rpi-0001/desired", "-W", "1", "-C", "1"])
            .output()
            .unwrap()
    };
    // Its own login and id: connects (then times out waiting, exit 27).
    let o = try_login("rpi-0001", "rpi-0001-password-00", "swell-agent-rpi-0001");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !err.contains("refused") && !err.contains("not authorised"),
        "{err}"
    );
    // Another device's client id, or a wrong password: refused.
    for (user, pw, id) in [
        ("rpi-0001", "rpi-0001-password-00", "swell-agent-rpi-0002"),
        ("rpi-0001", "wrong-password-000000", "swell-agent-rpi-0001"),
    ] {
        let o = try_login(user, pw, id);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            err.contains("not authorised") || err.contains("refused"),
            "{user} as {id}: {err}"
        );
    }
    std::thread::sleep(Duration::from_millis(10));
}
