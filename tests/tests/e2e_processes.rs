//! The whole system as separate processes: `swell-coordinator` (hosting the
//! embedded broker, or beside Mosquitto when it is required), three
//! `swell-agent`s with the slots backend and their own state directories, an
//! artifact HTTP server, and the `swell` CLI for keys, releases and rollouts.
//! A good release rolls out to completion, a bad one is rolled back, and what
//! each device runs at the end is read from its own files.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use swell_broker::Role;
use swell_e2e::broker::TestBroker;
use swell_e2e::http::FileServer;
use swell_e2e::mosquitto;
use swell_e2e::procs::{Proc, bin};

const TOKEN: &str = "e2e-enroll";

fn swell(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin("swell"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn swell_as(dir: &Path, user: &str, password_file: &Path, args: &[&str]) -> Output {
    Command::new(bin("swell"))
        .current_dir(dir)
        .args(args)
        .env("SWELL_USERNAME", user)
        .env("SWELL_PASSWORD_FILE", password_file)
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

fn public_hex(dir: &Path, file: &str) -> String {
    ok(&swell(dir, &["keys", "show", file]))
        .lines()
        .find_map(|l| l.strip_prefix("public key: "))
        .unwrap()
        .trim()
        .to_string()
}

fn bundle(version: &str, bad: bool) -> Vec<u8> {
    format!("app {version}\n{}", if bad { "BAD\n" } else { "" }).into_bytes()
}

struct Fleet {
    dir: PathBuf,
    agents: Vec<(String, Proc)>,
}

impl Fleet {
    fn running(&self, device: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join(device).join("state/slots/current/artifact-0")).ok()
    }

    fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|(d, p)| format!("--- {d}\n{}", p.log_text()))
            .collect()
    }
}

struct System {
    tmp: tempfile::TempDir,
    broker: String,
    port: u16,
    coordinator: Proc,
    fleet: Fleet,
    files: FileServer,
    /// The operator's user name and password (the CLI reads them from a file).
    operator: (String, String),
    _mosq: Option<TestBroker>,
}

impl System {
    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The CLI, logged in as the operator.
    fn cli(&self, args: &[&str]) -> Output {
        let file = self.dir().join("operator.password");
        std::fs::write(&file, &self.operator.1).unwrap();
        Command::new(bin("swell"))
            .current_dir(self.dir())
            .args(args)
            .env("SWELL_USERNAME", &self.operator.0)
            .env("SWELL_PASSWORD_FILE", &file)
            .output()
            .unwrap()
    }

    /// Keys (with the CLI), the coordinator, `devices` agents, all enrolled.
    fn start(devices: u64, use_mosquitto: bool) -> System {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        // Broker: Mosquitto as shipped when asked for, else the coordinator's
        // embedded one.
        let mosq: Option<TestBroker> = if use_mosquitto {
            Some(TestBroker::mosquitto(false).unwrap_or_else(|e| panic!("mosquitto: {e:?}")))
        } else {
            None
        };
        let port = mosq.as_ref().map_or_else(mosquitto::free_port, |m| m.port);
        let broker = format!("mqtt://127.0.0.1:{port}");
        let devices_ids: Vec<String> = (0..devices).map(|i| format!("e2e-{i}")).collect();
        // Logins: Mosquitto's from the test's users (each device made known to
        // it), the embedded broker's as a user gets them from the coordinator.
        let state = d.join("coordinator");
        let broker_password = |who: &[&str]| -> String {
            let o = Command::new(bin("swell-coordinator"))
                .arg("broker-password")
                .arg("--state-dir")
                .arg(&state)
                .args(who)
                .output()
                .unwrap();
            ok(&o).trim().to_string()
        };
        let (operator, device_logins): ((String, String), Vec<(String, String)>) = match &mosq {
            Some(m) => {
                tokio::runtime::Runtime::new()
                    .unwrap()
                    .block_on(m.add_devices(&devices_ids));
                (
                    m.login(Role::Operator),
                    devices_ids.iter().map(|id| m.device_login(id)).collect(),
                )
            }
            None => (
                ("operator".to_string(), broker_password(&["operator"])),
                devices_ids
                    .iter()
                    .map(|id| (id.clone(), broker_password(&["device", id])))
                    .collect(),
            ),
        };
        let device_login = |id: &str| {
            device_logins
                .iter()
                .find(|(u, _)| u == id)
                .cloned()
                .unwrap()
        };

        // Keys and the key list, with the CLI.
        for (role, name) in [
            ("root", "root"),
            ("release", "rel"),
            ("coordinator", "coord"),
        ] {
            ok(&swell(
                d,
                &["keys", "gen", role, "--out", &format!("{name}.key")],
            ));
        }
        ok(&swell(
            d,
            &[
                "keys",
                "list",
                "--root",
                "root.key",
                "--release",
                "rel.key.pub",
                "--release-threshold",
                "1",
                "--coordinator",
                "coord.key.pub",
                "--out",
                "keys.bin",
            ],
        ));
        let root_hex = public_hex(d, "root.key.pub");

        // The coordinator.
        let mut cmd = Command::new(bin("swell-coordinator"));
        cmd.args([
            "--fleet",
            "e2e",
            "--key",
            "coord.key",
            "--key-list",
            "keys.bin",
        ])
        .args(["--root-key", "root.key.pub", "--enrollment-token", TOKEN])
        .args(["--beacon-interval", "1s", "--tick", "200ms"])
        .arg("--state-dir")
        .arg(d.join("coordinator"))
        .env("RUST_LOG", "warn,swell_coordinator=info")
        .current_dir(d);
        if let Some(m) = &mosq {
            // This system also runs the coordinator's one-by-one signature
            // check (the other, the default batches).
            let (user, password) = m.login(Role::Coordinator);
            cmd.args(["--broker", &broker, "--strict-signatures"])
                .args(["--username", &user, "--password", &password]);
        } else {
            cmd.args(["--embedded-broker", &format!("127.0.0.1:{port}")]);
        }
        let coordinator = Proc::spawn(cmd, d.join("coordinator.log")).unwrap();

        // Three agents, each with its own state and a probe that fails on BAD bundles.
        let mut fleet = Fleet {
            dir: d.to_path_buf(),
            agents: Vec::new(),
        };
        for i in 0..devices {
            let dev = format!("e2e-{i}");
            let home = d.join(&dev);
            std::fs::create_dir_all(&home).unwrap();
            let (user, password) = device_login(&dev);
            std::fs::write(home.join("broker.password"), &password).unwrap();
            let cfg = format!(
                "device_id = \"{dev}\"\nfleet = \"e2e\"\nhardware = \"rpi4\"\nbroker = \"{broker}\"\n\
                 state_dir = \"{state}\"\nenrollment_token = \"{TOKEN}\"\n[labels]\nsite = \"lab\"\n\
                 [mqtt]\nusername = \"{user}\"\npassword_file = \"{pw}\"\n\
                 [trust]\nroots = [\"{root_hex}\"]\n[install]\nprobation = \"1s\"\nprobe_interval = \"200ms\"\n\
                 [[probes]]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"! grep -q BAD {state}/slots/current/artifact-0\"]\n",
                state = home.join("state").display(),
                pw = home.join("broker.password").display(),
            );
            std::fs::write(home.join("agent.toml"), cfg).unwrap();
            let mut cmd = Command::new(bin("swell-agent"));
            cmd.arg("--config").arg(home.join("agent.toml")).arg("run");
            fleet
                .agents
                .push((dev, Proc::spawn(cmd, home.join("agent.log")).unwrap()));
        }

        // Wait for the three devices to be enrolled, through the CLI.
        let until = Instant::now() + Duration::from_secs(60);
        let pw_file = d.join("operator.password");
        std::fs::write(&pw_file, &operator.1).unwrap();
        loop {
            let o = swell_as(
                d,
                &operator.0,
                &pw_file,
                &[
                    "fleet",
                    "-o",
                    "json",
                    "--broker",
                    &broker,
                    "--timeout",
                    "3s",
                ],
            );
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            if o.status.success() && v["status"]["approved"] == devices {
                break;
            }
            assert!(
                Instant::now() < until,
                "devices not enrolled: {text}\n{}\n{}",
                coordinator.log_text(),
                fleet.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        System {
            broker,
            port,
            coordinator,
            fleet,
            files: FileServer::start().unwrap(),
            operator,
            _mosq: mosq,
            tmp,
        }
    }

    /// A release of one bundle, created and signed with the CLI; returns its file.
    fn release(&self, name: &str, version: &str, counter: &str, bad: bool) -> String {
        let d = self.dir();
        let data = bundle(version, bad);
        std::fs::write(d.join(name), &data).unwrap();
        let url = self.files.put(name, data);
        let out = format!("{name}.rel");
        ok(&swell(
            d,
            &[
                "release",
                "create",
                "--artifact",
                name,
                "--version",
                version,
                "--counter",
                counter,
                "--hardware",
                "rpi4",
                "--url",
                &url,
                "--out",
                &out,
            ],
        ));
        ok(&swell(d, &["release", "sign", &out, "--key", "rel.key"]));
        out
    }

    fn context(&self) -> String {
        format!("{}\n{}", self.coordinator.log_text(), self.fleet.logs())
    }
}

#[test]
fn e2e_rollout_and_rollback_across_processes() {
    let sys = System::start(3, mosquitto::required());
    let d = sys.dir();
    let broker = sys.broker.clone();
    let (coordinator, fleet) = (&sys.coordinator, &sys.fleet);
    let good = sys.release("app-2", "2.0.0", "2", false);
    let bad = sys.release("app-3", "3.0.0", "3", true);

    let spec = |rollout: &str, rel: &str| {
        let path = d.join(format!("{rollout}.json"));
        std::fs::write(
            &path,
            serde_json::json!({
                "rollout": rollout,
                "release": rel,
                "selector": "site=lab",
                "canary": ["e2e-0"],
                "waves": ["50%", "100%"],
                "min_devices": 1,
                "bake": "1s",
                "install_timeout": "60s",
                "max_failure_rate": "20%",
                "policy": "rollback",
            })
            .to_string(),
        )
        .unwrap();
        path
    };

    // The good release: canary, 50 %, 100 %, completed.
    let p = spec("app-v2", &good);
    ok(&sys.cli(&[
        "rollout",
        "create",
        p.to_str().unwrap(),
        "--broker",
        &broker,
    ]));
    let o = sys.cli(&[
        "rollout",
        "status",
        "app-v2",
        "--wait",
        "--wait-timeout",
        "120s",
        "--broker",
        &broker,
    ]);
    assert!(
        o.status.success(),
        "app-v2 did not complete: {}{}\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        coordinator.log_text(),
        fleet.logs()
    );
    for i in 0..3 {
        assert_eq!(
            fleet.running(&format!("e2e-{i}")),
            Some(bundle("2.0.0", false)),
            "e2e-{i} runs 2.0.0"
        );
    }

    // The bad release, from a YAML spec, fails its probes on the canary: the
    // rollout rolls back.
    let p = d.join("app-v3.yaml");
    std::fs::write(
        &p,
        format!(
            "rollout: app-v3\nrelease: {bad}\nselector: site=lab\ncanary: [e2e-0]\n\
             waves: [\"50%\", \"100%\"]\nmin_devices: 1\nbake: 1s\ninstall_timeout: 60s\n\
             max_failure_rate: \"20%\"\npolicy: rollback\n"
        ),
    )
    .unwrap();
    ok(&sys.cli(&[
        "rollout",
        "create",
        p.to_str().unwrap(),
        "--broker",
        &broker,
    ]));
    let o = sys.cli(&[
        "rollout",
        "status",
        "app-v3",
        "--wait",
        "--wait-timeout",
        "120s",
        "--broker",
        &broker,
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "app-v3 should end rolled back: {}{}\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        coordinator.log_text(),
        fleet.logs()
    );
    // The fleet topics, decoded and verified from the root key down.
    let o = sys.cli(&[
        "mqtt",
        "tail",
        "swell/v1/fleet/e2e/#",
        "--decode",
        "--root-key",
        "root.key.pub",
        "--count",
        "4",
        "-o",
        "json",
        "--broker",
        &broker,
    ]);
    let tail = ok(&o);
    let seen: Vec<serde_json::Value> = tail
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = seen.iter().filter_map(|v| v["kind"].as_str()).collect();
    for k in ["keylist", "beacon", "manifest"] {
        assert!(kinds.contains(&k), "{k} in {tail}");
    }
    assert!(seen.iter().all(|v| v["verified"] == true), "{tail}");
    // Every device ends on 2.0.0, read from its own slot.
    let until = Instant::now() + Duration::from_secs(30);
    while (0..3).any(|i| fleet.running(&format!("e2e-{i}")) != Some(bundle("2.0.0", false))) {
        assert!(
            Instant::now() < until,
            "not all back on 2.0.0\n{}",
            fleet.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let inventory: serde_json::Value =
        serde_json::from_str(&ok(&sys.cli(&["fleet", "-o", "json", "--broker", &broker]))).unwrap();
    assert_eq!(inventory["status"]["online"], 3, "{inventory}");
}

/// Runs `mosquitto_sub` for one message on `topic` (retained or the next one).
fn sub_one(
    port: u16,
    login: &(String, String),
    topic: &str,
    secs: u32,
) -> Option<serde_json::Value> {
    let o = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv5"])
        .args(["-u", &login.0, "-P", &login.1])
        .args(["-t", topic, "-C", "1", "-W", &secs.to_string()])
        .output()
        .ok()?;
    serde_json::from_slice(&o.stdout).ok()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Plain MQTT tools operate Swell: a rollout created, refused and followed with
/// `mosquitto_pub`/`mosquitto_sub` JSON only, the devices being real agents.
/// Commands go out over MQTT 3.1.1 (mosquitto_pub's default), replies and
/// statuses come back over MQTT 5: one broker port speaks both.
#[test]
fn e2e_operated_with_mosquitto_tools_only() {
    if swell_e2e::mosquitto::find("mosquitto_pub").is_none() {
        assert!(
            !mosquitto::required(),
            "SWELL_TEST_MOSQUITTO=required but mosquitto_pub is not installed"
        );
        eprintln!(
            "SKIPPED e2e_operated_with_mosquitto_tools_only: mosquitto clients not installed"
        );
        return;
    }
    let sys = System::start(2, mosquitto::required());
    let d = sys.dir();
    let rel = sys.release("tool-2", "2.0.0", "2", false);
    let release_hex = to_hex(&std::fs::read(d.join(rel)).unwrap());
    let port = sys.port.to_string();
    let op = sys.operator.clone();
    let publish = |json: &str| {
        let o = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(["-u", &op.0, "-P", &op.1])
            .args(["-t", "swell/v1/ops/cmd", "-m", json])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    // Replies go to `reply_to`, under the operator's user (the only place an
    // operator may read them); a subscriber waits there first.
    let replies = format!("swell-ops/{}/e2e/replies", op.0);
    let ask = |json: &str| {
        let p = sys.port;
        let (login, topic) = (op.clone(), replies.clone());
        let waiter = std::thread::spawn(move || sub_one(p, &login, &topic, 20));
        std::thread::sleep(Duration::from_millis(300));
        publish(json);
        waiter.join().unwrap().expect("a reply")
    };
    let create = serde_json::json!({
        "op": "create",
        "reply_to": replies,
        "spec": {"rollout": "tools-1", "release": release_hex, "waves": ["100%"],
                 "min_devices": 1, "bake": "1s", "install_timeout": "60s"}
    });
    let reply = ask(&create.to_string());
    assert_eq!(reply["ok"], true, "{reply}\n{}", sys.context());
    // A refused command answers with a reason, and changes nothing.
    let reply = ask(
        &serde_json::json!({"op": "pause", "rollout": "no-such", "reply_to": replies}).to_string(),
    );
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(reply["reason"].is_string(), "{reply}");
    // The retained status topic says when it is done.
    let until = Instant::now() + Duration::from_secs(90);
    loop {
        let s = sub_one(sys.port, &op, "swell/v1/ops/rollout/tools-1/status", 5);
        if s.as_ref().is_some_and(|s| s["phase"] == "completed") {
            break;
        }
        assert!(
            Instant::now() < until,
            "not completed: {s:?}\n{}",
            sys.context()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for i in 0..2 {
        assert_eq!(
            sys.fleet.running(&format!("e2e-{i}")),
            Some(bundle("2.0.0", false)),
            "e2e-{i}"
        );
    }
}
