//! Signed messages survive a real Mosquitto byte for byte, and Mosquitto's
//! clients (which operators use to drive Swell by hand) carry them.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use swell_e2e::mosquitto::{self, start_or_skip};
use swell_protocol::envelope::UnverifiedEnvelope;
use swell_protocol::messages::Report;
use swell_protocol::testkeys::test_key;

#[test]
fn mosquitto_relays_signed_report_byte_for_byte() {
    let Some(broker) = start_or_skip("mosquitto_relays_signed_report_byte_for_byte") else {
        return;
    };
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
    let port = broker.port().to_string();
    let sub = Command::new(&sub_bin)
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
