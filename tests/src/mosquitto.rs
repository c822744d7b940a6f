//! A Mosquitto broker for one test, started with the configuration Swell ships:
//! `mosquitto.conf` and the ACL file from the ConfigMap in
//! `deploy/k3s/mosquitto.yaml` (paths and the listener moved into a temporary
//! directory, nothing else changed) and a dynamic-security file rendered by
//! `swell_broker::mosquitto` for the test's users, as `swell broker
//! mosquitto-dynsec` renders it for a fleet. [`Mosquitto::start_relaxed`]
//! (anonymous, no ACL) is for the fleet benchmark only.

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The benchmark's config: the defaults (20 in flight, 1000 queued) drop QoS 1
/// messages a busy subscriber cannot take at once while still acknowledging
/// them to the publishers. The queue must hold the coordinator's share of a mass
/// reconnect: a Hello and an online flag per device (a 1,000,000-device fleet
/// overran a 1,000,000 queue and half of it never enrolled).
pub const TUNED_LIMITS: &str = "\
max_inflight_messages 0
max_queued_messages 10000000
max_queued_bytes 0
message_size_limit 1048576
persistence false
";

/// Whether the environment makes Mosquitto mandatory.
pub fn required() -> bool {
    std::env::var("SWELL_TEST_MOSQUITTO").is_ok_and(|v| v == "required")
}

/// Finds an executable on PATH or in /usr/sbin (Debian puts mosquitto there).
pub fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The dynamic-security plugin of the installed Mosquitto.
pub fn dynsec_plugin() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/mosquitto_dynamic_security.so",
        "/usr/local/lib/mosquitto_dynamic_security.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// Path of a file of the repository.
pub fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The ConfigMap data of `deploy/k3s/mosquitto.yaml`: (`mosquitto.conf`, `acl`).
pub fn shipped_config() -> Result<(String, String), String> {
    let path = repo_file("deploy/k3s/mosquitto.yaml");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v = serde_yaml_ng::Value::deserialize(doc).map_err(|e| e.to_string())?;
        if v["kind"].as_str() == Some("ConfigMap") {
            let conf = v["data"]["mosquitto.conf"].as_str();
            let acl = v["data"]["acl"].as_str();
            if let (Some(c), Some(a)) = (conf, acl) {
                return Ok((c.to_string(), a.to_string()));
            }
        }
    }
    Err(format!(
        "{}: no ConfigMap with mosquitto.conf and acl",
        path.display()
    ))
}

use serde::Deserialize as _;

/// A running broker; killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    child: Option<Child>,
    bin: PathBuf,
    conf: PathBuf,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// Why a broker could not be started.
#[derive(Debug)]
pub enum StartError {
    /// Not installed (and not required): the caller skips.
    Missing,
    Failed(String),
}

fn failed(e: impl std::fmt::Display) -> StartError {
    StartError::Failed(e.to_string())
}

/// What to change in the shipped configuration for a test.
#[derive(Debug, Clone, Default)]
pub struct Shipped {
    /// The plugin's file (`dynamic-security.json`), as rendered for the test.
    pub dynsec: String,
    /// Keep `persistence true` as shipped (else off: most tests start empty).
    pub persistence: bool,
    /// More lines (a TLS listener, say).
    pub extra: String,
}

impl Mosquitto {
    /// The binary, or why there is none.
    fn binary() -> Result<PathBuf, StartError> {
        match find("mosquitto") {
            Some(b) => Ok(b),
            None if required() => Err(StartError::Failed(
                "SWELL_TEST_MOSQUITTO=required but mosquitto is not installed".into(),
            )),
            None => Err(StartError::Missing),
        }
    }

    /// The shipped configuration on a free 127.0.0.1 port.
    pub fn start_shipped(s: &Shipped) -> Result<Self, StartError> {
        let bin = Self::binary()?;
        let plugin = dynsec_plugin().ok_or_else(|| {
            failed("mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) is not installed")
        })?;
        let (conf, acl) = shipped_config().map_err(failed)?;
        let dir = tempfile::tempdir().map_err(failed)?;
        let root = dir.path();
        std::fs::create_dir_all(root.join("data")).map_err(failed)?;
        std::fs::write(root.join("acl"), acl).map_err(failed)?;
        std::fs::write(root.join("data/dynamic-security.json"), &s.dynsec).map_err(failed)?;
        let port = free_port();
        let mut text = String::new();
        for line in conf.lines() {
            let line = line.trim();
            let out = match line.split_once(' ') {
                Some(("listener", _)) => format!("listener {port} 127.0.0.1"),
                Some(("plugin", _)) => format!("plugin {}", plugin.display()),
                Some(("persistence", _)) if !s.persistence => "persistence false".into(),
                // Paths of the container's volumes move into the test's directory.
                _ => line
                    .replace("/mosquitto/config/", &format!("{}/", root.display()))
                    .replace("/mosquitto/data/", &format!("{}/data/", root.display())),
            };
            text.push_str(&out);
            text.push('\n');
        }
        // Started as root (CI), Mosquitto would drop to user `mosquitto`, which
        // cannot write the test's directory (its database, the plugin's file);
        // in the cluster it runs as uid 1883 and never changes user.
        if running_as_root() {
            text.push_str("user root\n");
        }
        text.push_str(&s.extra);
        let path = root.join("mosquitto.conf");
        std::fs::write(&path, text).map_err(failed)?;
        Self::launch(bin, path, port, dir)
    }

    /// Anonymous access and raised limits: the fleet benchmark's broker.
    pub fn start_relaxed() -> Result<Self, StartError> {
        let bin = Self::binary()?;
        let dir = tempfile::tempdir().map_err(failed)?;
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        let text = format!(
            "per_listener_settings false\nallow_anonymous true\n{TUNED_LIMITS}listener {port} 127.0.0.1\n"
        );
        std::fs::write(&conf, text).map_err(failed)?;
        Self::launch(bin, conf, port, dir)
    }

    fn launch(
        bin: PathBuf,
        conf: PathBuf,
        port: u16,
        dir: tempfile::TempDir,
    ) -> Result<Self, StartError> {
        let mut m = Mosquitto {
            child: None,
            bin,
            conf,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        m.spawn()?;
        Ok(m)
    }

    fn spawn(&mut self) -> Result<(), StartError> {
        let mut child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("{}: {e}", self.bin.display())))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(s) = child.stderr.take() {
                    for line in BufReader::new(s).lines().map_while(Result::ok) {
                        err.push_str(&line);
                        err.push('\n');
                    }
                }
                return Err(failed(format!("mosquitto exited with {status}: {err}")));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(failed("mosquitto did not accept connections within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Its log is not read; a full pipe must not block it.
        if let Some(err) = child.stderr.take() {
            std::thread::spawn(move || for _ in BufReader::new(err).lines() {});
        }
        self.child = Some(child);
        Ok(())
    }

    /// Has it write its persistence database (what an autosave does, on
    /// SIGUSR1) and waits until the file changed.
    pub fn save(&self) -> Result<(), String> {
        let db = self.data_dir().join("mosquitto.db");
        let before = std::fs::metadata(&db).and_then(|m| m.modified()).ok();
        let pid = self.pid();
        if pid == 0 {
            return Err("not running".into());
        }
        let _ = Command::new("kill")
            .args(["-USR1", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = std::fs::metadata(&db).and_then(|m| m.modified()).ok();
            if now.is_some() && now != before {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{} was not written within 10 s", db.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it with SIGKILL (nothing saved since its last autosave).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops it with SIGTERM (it saves its state first) and waits.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Starts it again with the same configuration, port and data directory
    /// (after [`Mosquitto::kill`] or [`Mosquitto::terminate`]).
    pub fn start_again(&mut self) -> Result<(), StartError> {
        self.kill();
        self.spawn()
    }

    /// The data directory (persistence, the plugin's file).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The broker's process id (the fleet benchmark charges CPU to it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn running_as_root() -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    }
    #[cfg(not(unix))]
    {
        false
    }
}

/// A free TCP port on 127.0.0.1 (the kernel picks; the window before use is tiny).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Path of a golden fixture of the protocol crate.
pub fn golden(name: &str) -> PathBuf {
    repo_file("protocol/tests/golden/v1").join(name)
}
