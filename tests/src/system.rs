//! The whole system as separate processes, for end-to-end tests: keys made
//! with the CLI, `swell-coordinator` (hosting the embedded broker, or beside
//! Mosquitto with the shipped configuration), `swell-agent`s with the slots
//! backend and their own state directories and logins, an artifact HTTP
//! server, and the CLI logged in as the operator.
// A test harness: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use crate::broker::TestBroker;
use crate::http::FileServer;
use crate::mosquitto;
use crate::procs::{Proc, bin};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use swell_broker::Role;

pub const TOKEN: &str = "e2e-enrollment-token";

pub fn swell(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin("swell"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

pub fn swell_as(dir: &Path, user: &str, password_file: &Path, args: &[&str]) -> Output {
    Command::new(bin("swell"))
        .current_dir(dir)
        .args(args)
        .env("SWELL_USERNAME", user)
        .env("SWELL_PASSWORD_FILE", password_file)
        .output()
        .unwrap()
}

pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn public_hex(dir: &Path, file: &str) -> String {
    ok(&swell(dir, &["keys", "show", file]))
        .lines()
        .find_map(|l| l.strip_prefix("public key: "))
        .unwrap()
        .trim()
        .to_string()
}

pub fn bundle(version: &str, bad: bool) -> Vec<u8> {
    format!("app {version}\n{}", if bad { "BAD\n" } else { "" }).into_bytes()
}

/// Keys made with the CLI in `d`, as an operator makes them: `root.key`,
/// `rel.key` (threshold 1), `coord.key` (each with its `.pub`), and the
/// root-signed key list `keys.bin`.
pub fn make_keys(d: &Path) {
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
}

/// `swell-coordinator` for `fleet` with the system's keys (made in `d`), its
/// state in `d/{state}`; the broker flags are the caller's.
fn coordinator_command(d: &Path, fleet: &str, state: &str) -> Command {
    let mut cmd = Command::new(bin("swell-coordinator"));
    cmd.args([
        "--fleet",
        fleet,
        "--key",
        "coord.key",
        "--key-list",
        "keys.bin",
    ])
    .args(["--root-key", "root.key.pub", "--enrollment-token", TOKEN])
    .args(["--beacon-interval", "1s", "--tick", "200ms"])
    .arg("--state-dir")
    .arg(d.join(state))
    .env("RUST_LOG", "warn,swell_coordinator=info")
    .current_dir(d);
    cmd
}

/// The agents.
#[derive(Debug)]
pub struct Fleet {
    dir: PathBuf,
    pub agents: Vec<(String, Proc)>,
}

impl Fleet {
    /// What `device` runs, read from its own slot.
    pub fn running(&self, device: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join(device).join("state/slots/current/artifact-0")).ok()
    }

    pub fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|(d, p)| format!("--- {d}\n{}", p.log_text()))
            .collect()
    }
}

/// Where the broker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerChoice {
    /// In the coordinator's process (`--embedded-broker`).
    Embedded,
    /// Mosquitto with the shipped configuration, `persistence` as shipped or off.
    Mosquitto { persistence: bool },
}

impl BrokerChoice {
    /// The shipped Mosquitto (persistence off) when the run requires it
    /// (`SWELL_TEST_MOSQUITTO=required`), else the embedded broker.
    pub fn from_env() -> BrokerChoice {
        if mosquitto::required() {
            BrokerChoice::Mosquitto { persistence: false }
        } else {
            BrokerChoice::Embedded
        }
    }
}

/// Healthy devices over every wave of a rollout status.
pub fn healthy(status: &serde_json::Value) -> u64 {
    status["waves"]
        .as_array()
        .map(|ws| ws.iter().map(|w| w["healthy"].as_u64().unwrap_or(0)).sum())
        .unwrap_or(0)
}

/// A running system.
#[derive(Debug)]
pub struct System {
    tmp: tempfile::TempDir,
    pub broker: String,
    pub port: u16,
    pub coordinator: Proc,
    pub fleet: Fleet,
    files: FileServer,
    /// The operator's user name and password (the CLI reads them from a file).
    pub operator: (String, String),
    pub mosquitto: Option<TestBroker>,
    /// The coordinator's arguments, to start it again.
    coordinator_args: Vec<std::ffi::OsString>,
    /// The coordinator's broker login (for more coordinators on this broker).
    coordinator_login: (String, String),
    restarts: u32,
}

impl System {
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The CLI, logged in as the operator.
    pub fn cli(&self, args: &[&str]) -> Output {
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
    pub fn start(devices: u64, choice: BrokerChoice) -> System {
        Self::start_with(devices, choice, &[])
    }

    /// [`System::start`] with more flags for the coordinator.
    pub fn start_with(devices: u64, choice: BrokerChoice, coordinator_args: &[&str]) -> System {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        // Broker: Mosquitto as shipped when asked for, else the coordinator's
        // embedded one.
        let mosq: Option<TestBroker> = match choice {
            BrokerChoice::Mosquitto { persistence } => Some(
                TestBroker::mosquitto(persistence).unwrap_or_else(|e| panic!("mosquitto: {e:?}")),
            ),
            BrokerChoice::Embedded => None,
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

        make_keys(d);
        let root_hex = public_hex(d, "root.key.pub");

        // The coordinator.
        let mut cmd = coordinator_command(d, "e2e", "coordinator");
        cmd.args(coordinator_args);
        if let Some(m) = &mosq {
            // This system also runs the coordinator's one-by-one signature
            // check (the other, the default batches).
            let (user, password) = m.login(Role::Coordinator);
            cmd.args(["--broker", &broker, "--strict-signatures"])
                .args(["--username", &user, "--password", &password]);
        } else {
            cmd.args(["--embedded-broker", &format!("127.0.0.1:{port}")]);
        }
        let coordinator_args: Vec<std::ffi::OsString> =
            cmd.get_args().map(ToOwned::to_owned).collect();
        let coordinator = Proc::spawn(cmd, d.join("coordinator.log")).unwrap();
        let coordinator_login = match &mosq {
            Some(m) => m.login(Role::Coordinator),
            None => (
                swell_broker::credentials::COORDINATOR_USER.to_string(),
                broker_password(&["coordinator"]),
            ),
        };

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
            mosquitto: mosq,
            tmp,
            coordinator_args,
            coordinator_login,
            restarts: 0,
        }
    }

    /// Stops the coordinator (SIGTERM) and starts it again with the same
    /// arguments (and the same state): a new epoch, every retained manifest
    /// signed and published again, and with the embedded broker a new broker
    /// that every agent reconnects to. Its log goes to a file of its own.
    pub fn restart_coordinator(&mut self) {
        let _ = Command::new("kill")
            .arg(self.coordinator.child.id().to_string())
            .status();
        let _ = self.coordinator.child.wait();
        self.restarts += 1;
        let mut cmd = Command::new(bin("swell-coordinator"));
        cmd.args(&self.coordinator_args)
            .env("RUST_LOG", "warn,swell_coordinator=info")
            .current_dir(self.dir());
        let log = self
            .dir()
            .join(format!("coordinator.{}.log", self.restarts));
        self.coordinator = Proc::spawn(cmd, log).unwrap();
    }

    /// One more coordinator process on this system's broker, for `fleet`,
    /// with the same keys and a state directory `name` of its own (its log is
    /// `{name}.log`).
    pub fn another_coordinator(&self, fleet: &str, name: &str) -> Proc {
        let d = self.dir();
        let (user, password) = &self.coordinator_login;
        let mut cmd = coordinator_command(d, fleet, name);
        cmd.args(["--broker", &self.broker])
            .args(["--username", user, "--password", password]);
        Proc::spawn(cmd, d.join(format!("{name}.log"))).unwrap()
    }

    /// A release of one bundle, created and signed with the CLI; returns its file.
    pub fn release(&self, name: &str, version: &str, counter: &str, bad: bool) -> String {
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

    /// A rollout's status as the operator protocol answers it (the `status` of
    /// the reply to `rollout status -o json`); null when no answer came.
    pub fn status(&self, rollout: &str) -> serde_json::Value {
        let o = self.cli(&[
            "rollout",
            "status",
            rollout,
            "-o",
            "json",
            "--broker",
            &self.broker,
            "--timeout",
            "20s",
        ]);
        let reply: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        reply["status"].clone()
    }

    /// `device`'s row in `swell fleet devices -o json`, if it is listed.
    pub fn device_row(&self, device: &str) -> Option<serde_json::Value> {
        let o = self.cli(&[
            "fleet",
            "devices",
            "-o",
            "json",
            "--broker",
            &self.broker,
            "--timeout",
            "10s",
        ]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        v["status"]["devices"]
            .as_array()?
            .iter()
            .find(|d| d["device"] == device)
            .cloned()
    }

    /// Polls [`System::status`] until it satisfies `pred`; that status.
    pub fn wait_status(
        &self,
        rollout: &str,
        secs: u64,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status(rollout);
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < until,
                "{rollout}: not there within {secs} s: {s:#}\n{}",
                self.context()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The coordinator's and agents' logs, for a failure message.
    pub fn context(&self) -> String {
        format!("{}\n{}", self.coordinator.log_text(), self.fleet.logs())
    }
}
