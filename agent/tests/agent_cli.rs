//! `swell-agent` as an operator meets it: the shipped example configuration,
//! flags and `SWELL_AGENT_*` variables over the file, clear errors, the device key.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

fn agent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_swell-agent"));
    c.env_remove("SWELL_AGENT_DEVICE_ID")
        .env_remove("SWELL_AGENT_BROKER");
    c
}

fn example() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent/agent.toml")
}

#[test]
fn agent_cli_example_config_with_flag_and_env_overrides() {
    let dir = tempfile::tempdir().unwrap();
    // Its broker password file is not here either: a flag names one that is.
    let pw = dir.path().join("mqtt-password");
    std::fs::write(&pw, "device-password-000\n").unwrap();
    // The example points at an mqtts:// broker whose CA is not here: refused, clearly.
    let out = agent()
        .arg("--config")
        .arg(example())
        .arg("--password-file")
        .arg(&pw)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mqtt.ca_file"), "{err}");
    // A flag for the broker and a variable for the id win over the file.
    let out = agent()
        .arg("--config")
        .arg(example())
        .arg("--broker")
        .arg("mqtt://127.0.0.1:1883")
        .arg("--state-dir")
        .arg(dir.path())
        .env("SWELL_AGENT_DEVICE_ID", "edge-0042")
        .env("SWELL_AGENT_PASSWORD_FILE", &pw)
        .arg("check-config")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("device      edge-0042"), "{text}");
    assert!(text.contains("127.0.0.1:1883"), "{text}");
    assert!(text.contains("probes      2"), "{text}");
}

#[test]
fn agent_cli_refuses_bad_values_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    for (text, field) in [
        (
            "device_id = \"UPPER\"\nhardware = \"x\"\n[trust]\nroots=[\"00\"]\n",
            "device_id",
        ),
        (
            "device_id = \"d\"\nhardware = \"x\"\n[trust]\nroots=[\"00\"]\n",
            "trust.roots",
        ),
        ("device_id = \"d\"\nhardware = \"x\"\nbogus = 1\n", "bogus"),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let out = agent()
            .arg("--config")
            .arg(&cfg)
            .arg("check-config")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{field}: {err}");
    }
    // A missing explicit file is an error, not silently the defaults.
    let out = agent()
        .arg("--config")
        .arg(dir.path().join("nope.toml"))
        .arg("check-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn agent_cli_device_key_is_created_once_and_private() {
    let dir = tempfile::tempdir().unwrap();
    let root = "11".repeat(32);
    let run = || {
        agent()
            .args([
                "--device-id",
                "d-1",
                "--hardware",
                "rpi4",
                "--root-key",
                &root,
            ])
            .arg("--config")
            .arg(dir.path().join("absent-but-explicit-is-not-used.toml"))
            .output()
            .unwrap()
    };
    // Explicit but missing config: refused.
    assert!(!run().status.success());
    let key = |_: ()| {
        let out = agent()
            .args([
                "--device-id",
                "d-1",
                "--hardware",
                "rpi4",
                "--root-key",
                &root,
            ])
            .env("SWELL_AGENT_STATE_DIR", dir.path())
            .arg("key")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let k1 = key(());
    assert_eq!(k1.len(), 64);
    assert_eq!(k1, key(()));
    let mode = std::fs::metadata(dir.path().join("device.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// systemd `Type=notify`: READY once the state is open, watchdog pings from the
/// main loop, STOPPING on SIGTERM — over a real notify socket.
#[test]
fn agent_cli_notifies_systemd_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let root = "11".repeat(32);
    // No broker listens on port 9: the agent runs (and backs off) regardless.
    // WATCHDOG_PID must name the agent itself, as systemd sets it: `exec` keeps
    // the shell's pid.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_swell-agent"))
        .args([
            "--device-id",
            "d-1",
            "--hardware",
            "rpi4",
            "--root-key",
            &root,
        ])
        .args(["--broker", "mqtt://127.0.0.1:9"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .arg("run")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !(got.iter().any(|m: &String| m.contains("READY=1"))
        && got.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        let n = sock.recv(&mut buf).expect("a notification within 10 s");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    loop {
        let n = sock.recv(&mut buf).expect("STOPPING within 10 s");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
    assert!(child.wait().unwrap().success());
}

#[test]
fn agent_cli_verify_checks_digest_and_length() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("blob");
    std::fs::write(&f, b"some artifact bytes").unwrap();
    let d = hex::encode(swell_protocol::Digest::sha256(b"some artifact bytes").0);
    let run = |digest: &str, len: &str| {
        agent()
            .arg("verify")
            .arg(&f)
            .args(["--sha256", digest, "--length", len])
            .output()
            .unwrap()
    };
    assert!(run(&d, "19").status.success());
    assert!(!run(&d, "18").status.success(), "wrong length");
    let other = hex::encode(swell_protocol::Digest::sha256(b"other").0);
    assert!(!run(&other, "19").status.success(), "wrong digest");
    let o = run("zz", "19");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--sha256"));
}
