//! The `swell` binary as an operator runs it: key files and decoding fixtures.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;
use std::process::{Command, Output};

fn swell(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_swell"))
        .args(args)
        .output()
        .unwrap()
}

fn golden(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../protocol/tests/golden/v1")
        .join(name)
        .display()
        .to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes the public test key `name` as a .pub file, using the golden keys.json.
fn test_pub(dir: &Path, name: &str, role: &str) -> String {
    let keys: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("keys.json")).unwrap()).unwrap();
    let k = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == name)
        .unwrap();
    let p = dir.join(format!("{name}.pub"));
    let body =
        serde_json::json!({"role": role, "public_key": k["public_key"], "key_id": k["key_id"]});
    std::fs::write(&p, body.to_string()).unwrap();
    p.display().to_string()
}

#[test]
fn cli_keys_gen_writes_private_file_and_refuses_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("release-0.key");
    let o = swell(&["keys", "gen", "release", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let show_secret = swell(&["keys", "show", out.to_str().unwrap()]);
    let show_pub = swell(&["keys", "show", &format!("{}.pub", out.display())]);
    assert!(show_secret.status.success());
    assert_eq!(stdout(&show_secret), stdout(&show_pub));
    assert!(stdout(&show_pub).contains("role:       release"));

    let again = swell(&["keys", "gen", "release", "--out", out.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn cli_decode_verifies_golden_report() {
    let dir = tempfile::tempdir().unwrap();
    let key = test_pub(dir.path(), "device-42", "device");
    let o = swell(&["decode", &golden("report.bin"), "--key", &key]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verified"], true);
    assert_eq!(v["payload"]["device"], "rpi-0042");
    assert_eq!(v["payload"]["phase"], "Committed");

    // Without a key only the header is shown.
    let o = swell(&["decode", "--hex", &golden("report.hex")]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verified"], false);
    assert!(v.get("payload").is_none());
}

#[test]
fn cli_decode_verifies_threshold_release() {
    let dir = tempfile::tempdir().unwrap();
    let k0 = test_pub(dir.path(), "release-0", "release");
    let k1 = test_pub(dir.path(), "release-1", "release");
    let o = swell(&[
        "decode",
        &golden("release.bin"),
        "--key",
        &k0,
        "--key",
        &k1,
        "--threshold",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["body"]["version"], "2.3.0");
    // One key is not two.
    let o = swell(&[
        "decode",
        &golden("release.bin"),
        "--key",
        &k0,
        "--key",
        &k0,
        "--threshold",
        "2",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("1 distinct trusted keys signed; 2 are needed"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn cli_decode_rejects_tampering_and_garbage_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let key = test_pub(dir.path(), "device-42", "device");
    let mut b = std::fs::read(golden("report.bin")).unwrap();
    let n = b.len();
    b[n - 70] ^= 1;
    let tampered = dir.path().join("tampered.bin");
    std::fs::write(&tampered, &b).unwrap();
    let o = swell(&["decode", tampered.to_str().unwrap(), "--key", &key]);
    assert!(!o.status.success());
    assert!(stderr(&o).starts_with("error: "), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));

    let garbage = dir.path().join("garbage.bin");
    std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff").unwrap();
    let o = swell(&["decode", garbage.to_str().unwrap()]);
    assert!(!o.status.success());
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));

    // Expired beacon: refused unless verified as of a time before expiry.
    let coord = test_pub(dir.path(), "coordinator-0", "coordinator");
    let o = swell(&["decode", &golden("beacon.bin"), "--key", &coord]);
    assert!(stderr(&o).contains("expired"), "{}", stderr(&o));
    let o = swell(&[
        "decode",
        &golden("beacon.bin"),
        "--key",
        &coord,
        "--now",
        "1795651300",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn cli_completions_for_bash_and_zsh() {
    for shell in ["bash", "zsh", "fish"] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_swell"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(o.status.success());
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.contains("rollout") && text.contains("watch"),
            "{shell}"
        );
    }
}
