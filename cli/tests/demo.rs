//! `swell demo` end to end: one rollout completes, the bad one rolls back.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn demo_completes_good_rollout_and_rolls_back_bad_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_swell"))
        .args([
            "demo",
            "--devices",
            "40",
            "--quiet",
            "--bake",
            "1s",
            "--seed",
            "7",
        ])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("fw-v2 (2.0.0): completed"), "{stdout}");
    assert!(
        stdout.contains("fw-v3 (3.0.0-bad): rolled_back"),
        "{stdout}"
    );
    // Every device ends on 2.0.0: the bad release was rolled back everywhere.
    let inventory = stdout.split("fleet inventory").nth(1).unwrap();
    assert!(inventory.contains("2.0.0      40"), "{inventory}");
    assert!(!inventory.contains("3.0.0-bad"), "{inventory}");
    // Every device that installed fetched its artifact over HTTP and checked it:
    // 40 × 2.0.0 plus the few that tried 3.0.0-bad before the rollback.
    let downloads: u64 = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "artifacts downloaded over HTTP and verified against their signed digest: ",
            )
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(downloads > 40, "{stdout}");
}

#[test]
fn demo_refuses_bad_arguments_with_one_line() {
    for args in [
        vec!["demo", "--bad-fraction", "1.5"],
        vec!["demo", "--devices", "3"],
        vec!["demo", "--broker", "http://x"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_swell"))
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
