//! The command backend with scripts standing in for RAUC, and the container
//! backend with a script standing in for podman: real processes, real exit
//! codes, the commands they receive checked.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use swell_protocol::Digest;
use swell_protocol::messages::{Artifact, ArtifactKind, ManifestState, Release, reason};
use swell_protocol::testkeys::test_key;
use swell_protocol::threshold::ThresholdSigned;

fn script(dir: &Path, name: &str, body: &str) {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn path_with(bin: &Path) -> (String, String) {
    (
        "PATH".into(),
        format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        ),
    )
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_command_backend_drives_rauc() {
    let broker = Broker::start();
    let files = ArtifactServer::start().await;
    let control = Control::start(&broker).await;
    control.publish_keys().await;
    control.start_beacons();
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let rauc = dir.path().join("rauc");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&rauc).unwrap();
    // A stand-in for RAUC: verifies the bundle (refuses one marked BAD), writes
    // the inactive slot, and marks slots good or bad.
    script(
        &bin,
        "rauc",
        r#"echo "$*" >> "$RAUC_DIR/calls"
case "$1" in
  install)
    if grep -q BAD "$2"; then echo "rauc: signature verification failed" >&2; exit 1; fi
    cp "$2" "$RAUC_DIR/inactive" ;;
  status)
    case "$2" in
      mark-good) mv "$RAUC_DIR/inactive" "$RAUC_DIR/booted" ;;
      mark-bad) rm -f "$RAUC_DIR/inactive" ;;
    esac ;;
  *) exit 2 ;;
esac
"#,
    );
    let mut spec = broker.agent_spec("dev-rauc").await;
    spec.backend =
        "[install]\nbackend = \"command\"\nprobation = \"1s\"\nprobe_interval = \"200ms\"\n\
                    [install.command]\npreset = \"rauc\"\ntimeout = \"10s\"\n"
            .into();
    spec.probes = "[[probes]]\nkind = \"command\"\ncommand = [\"true\"]\n".into();
    let agent = AgentProc::start_env(
        &spec,
        dir.path(),
        vec![
            path_with(&bin),
            ("RAUC_DIR".into(), rauc.display().to_string()),
        ],
    );
    control.wait_hello("dev-rauc", 20).await;

    let good = b"rauc bundle 2.0".to_vec();
    let url = files.put("good.raucb", good.clone(), Mode::Normal);
    let r = release(2, "2.0", &good, &url);
    control
        .publish_manifest(
            "r-good",
            control.manifest("r-good", &r, ManifestState::Active),
        )
        .await;
    agent
        .phase(&control, "dev-rauc", "r-good", "committed", 30)
        .await;
    let blob = agent
        .state
        .join("blobs/sha256")
        .join(hex::encode(Digest::sha256(&good).0));
    assert_eq!(
        lines(&rauc.join("calls")),
        [
            format!("install {}", blob.display()),
            "status mark-good".to_string()
        ]
    );
    assert_eq!(std::fs::read(rauc.join("booted")).unwrap(), good);

    // RAUC refuses the bundle (exit 1): install_failed, rolled back with mark-bad.
    let bad = b"rauc bundle 3.0 BAD".to_vec();
    let url = files.put("bad.raucb", bad.clone(), Mode::Normal);
    let r = release(3, "3.0", &bad, &url);
    control
        .publish_manifest(
            "r-bad",
            control.manifest("r-bad", &r, ManifestState::Active),
        )
        .await;
    let s = agent
        .phase(&control, "dev-rauc", "r-bad", "rolled_back", 30)
        .await;
    assert_eq!(s.code, Some(reason::INSTALL_FAILED));
    let calls = lines(&rauc.join("calls"));
    assert_eq!(
        &calls[2..],
        [
            "install ".to_string()
                + &agent
                    .state
                    .join("blobs/sha256")
                    .join(hex::encode(Digest::sha256(&bad).0))
                    .display()
                    .to_string(),
            "status mark-bad".to_string()
        ]
    );
    assert_eq!(
        std::fs::read(rauc.join("booted")).unwrap(),
        good,
        "still on 2.0"
    );
    assert!(
        agent.log_text().contains("rauc: signature"),
        "{}",
        agent.log_text()
    );
}

fn container_release(counter: u64, repo: &str, digest_seed: &str) -> ThresholdSigned {
    let body = Release {
        counter,
        version: format!("{counter}.0"),
        created_at: now(),
        artifacts: vec![Artifact {
            name: "app".into(),
            kind: ArtifactKind::Container,
            digest: Digest::sha256(digest_seed.as_bytes()),
            length: 1234,
            urls: vec![repo.into()],
        }],
        config: None,
        hardware: vec![HW.into()],
        exposure: None,
        rollback: None,
    };
    let mut r = ThresholdSigned::new(&body).unwrap();
    r.sign(&test_key("release-0")).unwrap();
    r.sign(&test_key("release-1")).unwrap();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_container_backend_drives_podman() {
    let broker = Broker::start();
    let control = Control::start(&broker).await;
    control.publish_keys().await;
    control.start_beacons();
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let pod = dir.path().join("podman-state");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&pod).unwrap();
    // A stand-in for podman: records calls; `run` and `start` record what runs.
    script(
        &bin,
        "podman",
        r#"echo "$*" >> "$POD/calls"
case "$1" in
  run) for a in "$@"; do last="$a"; done; echo "$last" > "$POD/running" ;;
  start) echo "$2" > "$POD/running" ;;
esac
"#,
    );
    let mut spec = broker.agent_spec("dev-pod").await;
    spec.backend = "[install]\nbackend = \"container\"\nprobation = \"1s\"\nprobe_interval = \"200ms\"\n\
                    [install.container]\ncli = \"podman\"\nname = \"web\"\nrun_args = [\"--network=host\"]\n"
        .into();
    spec.probes = format!(
        "[[probes]]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"! grep -q broken {}/running\"]\n",
        pod.display()
    );
    let agent = AgentProc::start_env(
        &spec,
        dir.path(),
        vec![path_with(&bin), ("POD".into(), pod.display().to_string())],
    );
    control.wait_hello("dev-pod", 20).await;

    let r2 = container_release(2, "https://registry.local/web", "image-2");
    control
        .publish_manifest("c-2", control.manifest("c-2", &r2, ManifestState::Active))
        .await;
    agent
        .phase(&control, "dev-pod", "c-2", "committed", 30)
        .await;
    let name2 = format!("web-{}", &release_hex_id(&r2)[..12]);
    let image2 = format!(
        "registry.local/web@sha256:{}",
        hex::encode(Digest::sha256(b"image-2").0)
    );
    assert_eq!(
        lines(&pod.join("calls")),
        [
            format!("pull {image2}"),
            format!("rm -f {name2}"),
            format!("run -d --name {name2} --network=host {image2}"),
        ]
    );

    // A broken image fails its probe: the new container goes, the old one starts.
    let r3 = container_release(3, "https://registry.local/broken", "image-3");
    control
        .publish_manifest("c-3", control.manifest("c-3", &r3, ManifestState::Active))
        .await;
    let s = agent
        .phase(&control, "dev-pod", "c-3", "rolled_back", 30)
        .await;
    assert_eq!(s.code, Some(reason::PROBE_FAILED));
    let name3 = format!("web-{}", &release_hex_id(&r3)[..12]);
    let calls = lines(&pod.join("calls"));
    assert_eq!(
        &calls[3..],
        [
            format!(
                "pull registry.local/broken@sha256:{}",
                hex::encode(Digest::sha256(b"image-3").0)
            ),
            format!("rm -f {name3}"),
            format!("stop {name2}"),
            format!(
                "run -d --name {name3} --network=host registry.local/broken@sha256:{}",
                hex::encode(Digest::sha256(b"image-3").0)
            ),
            format!("rm -f {name3}"),
            format!("start {name2}"),
        ]
    );
    assert_eq!(
        std::fs::read_to_string(pod.join("running")).unwrap().trim(),
        name2
    );

    // A repository that would be read as an option is refused, nothing run.
    let evil = container_release(4, "https://--privileged", "image-4");
    control
        .publish_manifest("c-4", control.manifest("c-4", &evil, ManifestState::Active))
        .await;
    let s = agent
        .phase(&control, "dev-pod", "c-4", "rolled_back", 30)
        .await;
    assert_eq!(s.code, Some(reason::INSTALL_FAILED));
    assert!(
        !lines(&pod.join("calls"))
            .iter()
            .any(|l| l.contains("privileged"))
    );
}
