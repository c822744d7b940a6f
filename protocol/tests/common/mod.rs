//! Sample messages with fixed content, signed with the public test keys. The
//! golden vectors are exactly these, so the bytes pin both the encoding and the
//! signing rules.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use swell_protocol::cohort::{self, Label, Selector};
use swell_protocol::envelope::{Audience, Stamp, seal};
use swell_protocol::messages::*;
use swell_protocol::testkeys::test_key;
use swell_protocol::threshold::ThresholdSigned;
use swell_protocol::{DeviceId, Digest, FleetId, ReleaseId, RolloutId, SecretKey, enroll};

/// 2026-11-26T00:00:00Z.
pub const T0: u64 = 1_795_651_200;

pub fn dev(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}
pub fn fleet() -> FleetId {
    FleetId::new("plant-7").unwrap()
}
pub fn rollout() -> RolloutId {
    RolloutId::new("fw-2-3").unwrap()
}

pub fn root(i: u8) -> SecretKey {
    test_key(&format!("root-{i}"))
}
pub fn release_key(i: u8) -> SecretKey {
    test_key(&format!("release-{i}"))
}
pub fn coordinator_key() -> SecretKey {
    test_key("coordinator-0")
}
pub fn operator_key() -> SecretKey {
    test_key("operator-0")
}
pub fn device_key(i: u32) -> SecretKey {
    test_key(&format!("device-{i}"))
}

pub fn key_list_body() -> KeyList {
    KeyList {
        version: 1,
        expires_at: T0 + 365 * 86_400,
        roots: vec![root(0).public(), root(1).public()],
        root_threshold: 2,
        release_keys: vec![
            release_key(0).public(),
            release_key(1).public(),
            release_key(2).public(),
        ],
        release_threshold: 2,
        coordinator_keys: vec![coordinator_key().public()],
        operator_keys: vec![operator_key().public()],
    }
}

pub fn key_list() -> ThresholdSigned {
    let mut kl = ThresholdSigned::new(&key_list_body()).unwrap();
    kl.sign(&root(0)).unwrap();
    kl.sign(&root(1)).unwrap();
    kl
}

pub fn release_body() -> Release {
    Release {
        counter: 23,
        version: "2.3.0".into(),
        created_at: T0 - 3_600,
        artifacts: vec![Artifact {
            name: "rootfs.img".into(),
            kind: ArtifactKind::Firmware,
            digest: Digest::sha256(b"firmware 2.3.0"),
            length: 14,
            urls: vec!["https://artifacts.example/fw/2.3.0/rootfs.img".into()],
        }],
        config: Some(ConfigBlob {
            digest: Digest::sha256(b"log_level=info\n"),
            length: 15,
            urls: vec![],
        }),
        hardware: vec!["rpi4".into(), "rpi5".into()],
        exposure: Some(ExposureSchedule {
            start: T0,
            steps: vec![
                ExposureStep {
                    after_secs: 0,
                    max_ppm: 10_000,
                },
                ExposureStep {
                    after_secs: 3_600,
                    max_ppm: 250_000,
                },
                ExposureStep {
                    after_secs: 86_400,
                    max_ppm: cohort::PPM_FULL,
                },
            ],
        }),
        rollback: None,
    }
}

pub fn release() -> ThresholdSigned {
    let mut r = ThresholdSigned::new(&release_body()).unwrap();
    r.sign(&release_key(0)).unwrap();
    r.sign(&release_key(1)).unwrap();
    r
}

pub fn coord_stamp(seq: u64, audience: Audience) -> Stamp {
    Stamp {
        epoch: 3,
        seq,
        issued_at: T0,
        expires_at: T0 + 86_400,
        audience,
    }
}

pub fn manifest_body() -> Manifest {
    Manifest {
        rollout: rollout(),
        fleet: fleet(),
        selector: Selector::parse("hw in (rpi4,rpi5),region=eu,!quarantine").unwrap(),
        canary: vec![dev("rpi-0001"), dev("rpi-0002")],
        wave: 1,
        open_below: cohort::open_below(10_000),
        state: ManifestState::Active,
        release: release(),
        retry: 0,
    }
}

pub fn manifest() -> Vec<u8> {
    seal(
        &coordinator_key(),
        coord_stamp(7, Audience::Fleet(fleet())),
        &manifest_body(),
    )
    .unwrap()
}

pub fn beacon_body() -> Beacon {
    Beacon {
        fleet: fleet(),
        key_list_version: 1,
    }
}

pub fn beacon() -> Vec<u8> {
    let stamp = Stamp {
        expires_at: T0 + 900,
        ..coord_stamp(8, Audience::Fleet(fleet()))
    };
    seal(&coordinator_key(), stamp, &beacon_body()).unwrap()
}

pub fn directive_body() -> DeviceDirective {
    DeviceDirective {
        device: dev("rpi-0042"),
        pin: Some(release().id()),
        exclude: false,
        force_rollback: None,
    }
}

pub fn directive() -> Vec<u8> {
    seal(
        &coordinator_key(),
        coord_stamp(9, Audience::Device(dev("rpi-0042"))),
        &directive_body(),
    )
    .unwrap()
}

pub fn hello_body() -> Hello {
    Hello {
        device: dev("rpi-0042"),
        fleet: fleet(),
        key: device_key(42).public(),
        labels: vec![
            Label {
                key: "hw".into(),
                value: "rpi4".into(),
            },
            Label {
                key: "region".into(),
                value: "eu".into(),
            },
        ],
        hardware: "rpi4".into(),
        agent_version: "0.1.0".into(),
        proto_min: 3,
        proto_max: 3,
        boot: 5,
        running: Some(ReleaseId([0x11; 32])),
        counter_floor: 22,
        incarnation: 5,
        enrollment_proof: Some(enroll::prove(
            ENROLLMENT_TOKEN,
            &dev("rpi-0042"),
            &fleet(),
            &device_key(42).public(),
        )),
        confirmed: false,
    }
}

/// The fleet token the golden Hello's proof is made with.
pub const ENROLLMENT_TOKEN: &str = "golden-enrollment-token";

pub fn enrolled_body() -> Enrolled {
    Enrolled {
        device: dev("rpi-0042"),
        fleet: fleet(),
        key: device_key(42).public(),
        incarnation: 5,
    }
}

/// Retained, so it has no expiry.
pub fn enrolled() -> Vec<u8> {
    let stamp = Stamp {
        expires_at: 0,
        ..coord_stamp(10, Audience::Device(dev("rpi-0042")))
    };
    seal(&coordinator_key(), stamp, &enrolled_body()).unwrap()
}

pub fn device_stamp(seq: u64) -> Stamp {
    Stamp {
        epoch: 5,
        seq,
        issued_at: T0 + 60,
        expires_at: 0,
        audience: Audience::Any,
    }
}

pub fn hello() -> Vec<u8> {
    seal(&device_key(42), device_stamp(100), &hello_body()).unwrap()
}

pub fn report_body() -> Report {
    Report {
        device: dev("rpi-0042"),
        rollout: Some(rollout()),
        release: release().id(),
        phase: Phase::Committed,
        probes: vec![
            ProbeResult { index: 0, ok: true },
            ProbeResult { index: 1, ok: true },
        ],
        metrics: Metrics {
            progress_permille: 1000,
            attempt: 1,
            uptime_secs: 3_725,
        },
    }
}

pub fn report() -> Vec<u8> {
    seal(&device_key(42), device_stamp(101), &report_body()).unwrap()
}

pub fn report_failed_body() -> Report {
    Report {
        phase: Phase::RolledBack(Reason {
            code: reason::PROBE_FAILED,
            detail: "http probe: 503".into(),
        }),
        probes: vec![
            ProbeResult { index: 0, ok: true },
            ProbeResult {
                index: 1,
                ok: false,
            },
        ],
        ..report_body()
    }
}

pub fn report_failed() -> Vec<u8> {
    seal(&device_key(42), device_stamp(102), &report_failed_body()).unwrap()
}

pub fn unsupported_body() -> Unsupported {
    Unsupported {
        kind: 99,
        proto: 2,
        seq: 12,
        proto_min: 1,
        proto_max: 1,
    }
}

pub fn session_note_body() -> SessionNote {
    SessionNote {
        device: dev("rpi-0042"),
        takeovers: 3,
        last_takeover: T0 + 50,
    }
}

pub fn session_note() -> Vec<u8> {
    seal(&device_key(42), device_stamp(104), &session_note_body()).unwrap()
}

pub fn unsupported() -> Vec<u8> {
    seal(&device_key(42), device_stamp(103), &unsupported_body()).unwrap()
}
