//! Signed messages survive a real Mosquitto (the shipped configuration) byte
//! for byte, and Mosquitto's clients (which operators use to drive Swell by
//! hand) carry them: the device publishes with its own login, the coordinator's
//! user reads.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use swell_broker::Role;
use swell_e2e::broker::TestBroker;
use swell_e2e::mosquitto::{self, StartError};
use swell_protocol::envelope::UnverifiedEnvelope;
use swell_protocol::messages::Report;
use swell_protocol::testkeys::test_key;

#[tokio::test]
async fn mosquitto_relays_signed_report_byte_for_byte() {
    let broker = match TestBroker::mosquitto(false) {
        Ok(b) => b,
        Err(StartError::Missing) => {
            eprintln!(
                "SKIPPED mosquitto_relays_signed_report_byte_for_byte: mosquitto not installed (set SWELL_TEST_MOSQUITTO=required to make this an error)"
            );
            return;
        }
        Err(StartError::Failed(e)) => panic!("{e}"),
    };
    broker.add_devices(&["rpi-0042".to_string()]).await;
    let (dev_user, dev_pw) = broker.device_login("rpi-0042");
    let (coord_user, coord_pw) = broker.login(Role::Coordinator);
    let (Some(sub_bin), Some(pub_bin)) = (
        mosquitto::find("mosquitto_sub"),
        mosquitto::find("mosquitto_pub"),
    ) else {
        assert!(
            !mosquitto::required(),
            "SWELL_TEST_MOSQUITTO=required but mosquitto-clients is missing"
        );
        eprintln!("SKIPPED: mosquitto-clients not installed");
        return;
    };
    let fixture = mosquitto::golden("report.bin");
    let expected = std::fs::read(&fixture).unwrap();
    let topic = "swell/v1/dev/rpi-0042/report";
    let port = broker.port.to_string();
    let sub = Command::new(&sub_bin)
        .args([
            "-u",
            &coord_user,
            "-P",
            &coord_pw,
            "-i",
            "swell-coordinator-relay-test",
        ])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-t",
            topic,
            "-C",
            "1",
            "-N",
            "-W",
            "20",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Publish (retained, so the subscriber gets it whenever its subscription lands).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = Command::new(&pub_bin)
            .args(["-u", &dev_user, "-P", &dev_pw, "-i", "swell-agent-rpi-0042"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-q",
                "1",
                "-r",
                "-t",
                topic,
                "-f",
            ])
            .arg(&fixture)
            .status()
            .unwrap();
        if status.success() || Instant::now() > deadline {
            assert!(status.success(), "mosquitto_pub failed: {status}");
            break;
        }
    }
    let out = sub.wait_with_output().unwrap();
    assert!(out.status.success(), "mosquitto_sub: {}", out.status);
    assert_eq!(out.stdout, expected, "payload changed in transit");
    let env = UnverifiedEnvelope::parse(&out.stdout).unwrap();
    let v = env
        .verify::<Report>(&test_key("device-42").public(), 1_795_651_300)
        .unwrap();
    assert_eq!(v.body.device.as_str(), "rpi-0042");
}
