//! A Mosquitto broker for one test.

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Config Swell tests and ships with: the defaults (20 in flight, 1000 queued) drop
/// QoS 1 messages a busy subscriber cannot take at once while still acknowledging
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

/// A running broker; killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Why a broker could not be started.
#[derive(Debug)]
pub enum StartError {
    /// Not installed (and not required): the caller skips.
    Missing,
    Failed(String),
}

impl Mosquitto {
    /// Starts a broker on a free 127.0.0.1 port. `Err(Missing)` only when
    /// Mosquitto is absent and not required; a required-but-missing broker is
    /// `Failed`.
    pub fn start() -> Result<Self, StartError> {
        Self::start_with("")
    }

    /// Like [`Mosquitto::start`], with more configuration appended (extra
    /// listeners, for instance a TLS one on a port from [`free_port`]).
    pub fn start_with(extra: &str) -> Result<Self, StartError> {
        let Some(bin) = find("mosquitto") else {
            return Err(if required() {
                StartError::Failed(
                    "SWELL_TEST_MOSQUITTO=required but mosquitto is not installed".into(),
                )
            } else {
                StartError::Missing
            });
        };
        let dir = tempfile::tempdir().map_err(|e| StartError::Failed(e.to_string()))?;
        // Port 0 is not accepted by mosquitto's listener; take a free port from the
        // kernel and hand it over (the window between is tiny on loopback).
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| StartError::Failed(e.to_string()))?
            .port();
        let conf = dir.path().join("mosquitto.conf");
        let text = format!(
            "per_listener_settings false\nallow_anonymous true\n{TUNED_LIMITS}listener {port} 127.0.0.1\n{extra}"
        );
        std::fs::write(&conf, text).map_err(|e| StartError::Failed(e.to_string()))?;
        let mut child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| StartError::Failed(format!("{}: {e}", bin.display())))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
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
                return Err(StartError::Failed(format!(
                    "mosquitto exited with {status}: {err}"
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(StartError::Failed(
                    "mosquitto did not accept connections within 10 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Mosquitto {
            child,
            addr,
            _dir: dir,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The broker's process id (the fleet benchmark charges CPU to it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1 (the kernel picks; the window before use is tiny).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Starts a broker or explains the skip; `None` means skip this test.
pub fn start_or_skip(test: &str) -> Option<Mosquitto> {
    match Mosquitto::start() {
        Ok(m) => Some(m),
        Err(StartError::Missing) => {
            eprintln!(
                "SKIPPED {test}: mosquitto not installed (set SWELL_TEST_MOSQUITTO=required to make this an error)"
            );
            None
        }
        Err(StartError::Failed(e)) => panic!("{test}: {e}"),
    }
}

/// Path of a golden fixture of the protocol crate.
pub fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../protocol/tests/golden/v1")
        .join(name)
}
