//! Offline key and release tooling: key list, release create and threshold signing.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

fn swell(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_swell"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&o.stderr)))
}

#[test]
fn cli_key_list_and_threshold_signed_release() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (role, name) in [
        ("root", "root"),
        ("release", "r0"),
        ("release", "r1"),
        ("coordinator", "coord"),
    ] {
        ok(&swell(
            d,
            &["keys", "gen", role, "--out", &format!("{name}.key")],
        ));
    }
    let out = ok(&swell(
        d,
        &[
            "keys",
            "list",
            "--root",
            "root.key",
            "--release",
            "r0.key.pub",
            "--release",
            "r1.key.pub",
            "--release-threshold",
            "2",
            "--coordinator",
            "coord.key.pub",
            "--out",
            "keys.bin",
        ],
    ));
    assert!(out.contains("key list v1"), "{out}");
    let v = json(&swell(d, &["decode", "keys.bin", "--key", "root.key.pub"]));
    assert_eq!(v["verified"], true);
    assert_eq!(v["body"]["release_threshold"], 2);
    assert_eq!(v["body"]["release_keys"].as_array().unwrap().len(), 2);

    std::fs::write(d.join("app.tar"), b"application bundle 2.0").unwrap();
    ok(&swell(
        d,
        &[
            "release",
            "create",
            "--artifact",
            "app.tar",
            "--version",
            "2.0.0",
            "--counter",
            "2",
            "--hardware",
            "rpi4",
            "--out",
            "rel.bin",
        ],
    ));
    let check = |n: &str| {
        swell(
            d,
            &[
                "decode",
                "rel.bin",
                "--key",
                "r0.key.pub",
                "--key",
                "r1.key.pub",
                "--threshold",
                n,
            ],
        )
    };
    assert!(!check("2").status.success(), "unsigned release verified");
    ok(&swell(
        d,
        &["release", "sign", "rel.bin", "--key", "r0.key"],
    ));
    let o = check("2");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("1 distinct trusted keys signed; 2 are needed")
    );
    // Signing twice with the same key does not help (SIG-2).
    ok(&swell(
        d,
        &["release", "sign", "rel.bin", "--key", "r0.key"],
    ));
    assert!(!check("2").status.success());
    ok(&swell(
        d,
        &["release", "sign", "rel.bin", "--key", "r1.key"],
    ));
    let v = json(&check("2"));
    assert_eq!(v["verified"], true);
    assert_eq!(v["body"]["artifacts"][0]["length"], 22);
    assert_eq!(v["body"]["artifacts"][0]["name"], "app.tar");
    // A root key is not a release key.
    let o = swell(d, &["release", "sign", "rel.bin", "--key", "root.key"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("a release key is needed"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Artifacts and configuration given by URL are fetched once to compute their
/// digest and length; a configuration-only change is a new release.
#[test]
fn cli_release_from_urls_and_config_only_change() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files = swell_e2e::http::FileServer::start().unwrap();
    let app = b"application bundle served over http".to_vec();
    let app_url = files.put("app.tar", app.clone());
    let cfg_a = files.put("config-a.toml", b"threads = 2\n".to_vec());
    let cfg_b = files.put("config-b.toml", b"threads = 4\n".to_vec());
    let create = |out: &str, cfg: &str| {
        ok(&swell(
            d,
            &[
                "release",
                "create",
                "--artifact",
                &app_url,
                "--config",
                cfg,
                "--version",
                "2.0.0",
                "--counter",
                "2",
                "--hardware",
                "rpi4",
                "--out",
                out,
            ],
        ))
    };
    create("a.bin", &cfg_a);
    create("b.bin", &cfg_b);
    let a = json(&swell(d, &["decode", "a.bin"]));
    let b = json(&swell(d, &["decode", "b.bin"]));
    assert_ne!(a["id"], b["id"], "a config change makes a new release");
    // The bodies are shown once verified; check them through a key-less decode
    // of the threshold object's body via a signature.
    ok(&swell(d, &["keys", "gen", "release", "--out", "r.key"]));
    ok(&swell(d, &["release", "sign", "a.bin", "--key", "r.key"]));
    let v = json(&swell(d, &["decode", "a.bin", "--key", "r.key.pub"]));
    let art = &v["body"]["artifacts"][0];
    assert_eq!(art["length"], app.len());
    assert_eq!(art["name"], "app.tar");
    assert_eq!(art["urls"][0], app_url.as_str());
    assert_eq!(v["body"]["config"]["urls"][0], cfg_a.as_str());
    assert_eq!(v["body"]["config"]["length"], 12);
    // A URL that does not answer 2xx is an error, not a release.
    let o = swell(
        d,
        &[
            "release",
            "create",
            "--artifact",
            &files.put("x", vec![]).replace("/x", "/missing"),
            "--version",
            "1",
            "--counter",
            "1",
            "--hardware",
            "rpi4",
            "--out",
            "c.bin",
        ],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("404"));
}
