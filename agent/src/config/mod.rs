//! Agent configuration: `/etc/swell/agent.toml` (path overridable), then
//! `SWELL_AGENT_*` environment variables, then flags — merged once into an
//! [`AgentConfig`] and validated with errors that name the field. The file's
//! schema is in [`file`].

mod file;
#[cfg(test)]
mod tests;

pub use file::{
    CommandSection, ContainerSection, DownloadSection, FileConfig, InstallSection, MqttSection,
    ProbeSection, SlotsSection, TrustSection,
};

use std::path::{Path, PathBuf};
use std::time::Duration;
use swell_protocol::cohort::{Label, validate_label_key, validate_label_value};
use swell_protocol::messages::RootOfTrust;
use swell_protocol::topics::{DEFAULT_PREFIX, Topics};
use swell_protocol::{DeviceId, FleetId, PublicKey};

/// Where the agent looks for its configuration by default.
pub const DEFAULT_CONFIG: &str = "/etc/swell/agent.toml";
/// Where the agent keeps its state by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/swell";

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// Values given on the command line or in `SWELL_AGENT_*` variables; they win
/// over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub device_id: Option<String>,
    pub fleet: Option<String>,
    pub hardware: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub broker: Option<String>,
    pub topic_prefix: Option<String>,
    pub enrollment_token: Option<String>,
    pub roots: Vec<String>,
    /// Broker user name (`mqtt.username`).
    pub username: Option<String>,
    /// Broker password file (`mqtt.password_file`).
    pub password_file: Option<PathBuf>,
    /// [`AgentConfig::abort_after`].
    pub abort_after: Option<String>,
}

/// Which installer, configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    Slots {
        dir: PathBuf,
        run: Vec<String>,
    },
    Command {
        install: Vec<String>,
        activate: Vec<String>,
        commit: Vec<String>,
        rollback: Vec<String>,
        timeout: Duration,
    },
    Container {
        cli: String,
        name: String,
        run_args: Vec<String>,
        timeout: Duration,
    },
}

/// One health probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeConfig {
    /// Healthy when the command exits 0 within the timeout.
    Command {
        argv: Vec<String>,
        timeout: Duration,
    },
    /// Healthy on a 2xx answer within the timeout.
    Http { url: String, timeout: Duration },
    /// Healthy while the installer's supervised process runs.
    Process,
}

/// The merged, validated configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub device: DeviceId,
    pub fleet: FleetId,
    pub hardware: String,
    pub labels: Vec<Label>,
    pub state_dir: PathBuf,
    pub broker: swell_mqtt::BrokerUrl,
    pub topics: Topics,
    pub enrollment_token: Option<String>,
    pub root: RootOfTrust,
    pub heartbeat: Duration,
    pub outbox_cap: usize,
    pub credentials: Option<(String, String)>,
    pub tls: Option<swell_mqtt::TlsPem>,
    pub keep_alive: Duration,
    pub download: DownloadConfig,
    pub backend: BackendConfig,
    pub probation: Duration,
    pub probe_interval: Duration,
    pub reach_timeout: Duration,
    pub max_attempts: u16,
    pub probes: Vec<ProbeConfig>,
    /// Testing hook (`SWELL_AGENT_ABORT_AFTER=<stage>`, never in a file):
    /// abort right after journaling this stage, as a power cut would; the
    /// crash tests use it to die at every stage on purpose.
    pub abort_after: Option<String>,
}

/// Download limits (DL-2).
#[derive(Debug, Clone)]
pub struct DownloadConfig {
    pub min_bytes_per_sec: u64,
    pub watchdog: Duration,
    pub deadline: Duration,
    pub ca_pem: Option<Vec<u8>>,
}

fn duration(
    field: &'static str,
    v: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s).map_err(|e| invalid(field, format!("{s:?}: {e}"))),
    }
}

fn read_file(field: &'static str, p: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(p).map_err(|e| invalid(field, format!("{}: {e}", p.display())))
}

fn preset(name: &str) -> Option<[Vec<String>; 4]> {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // install, activate, commit, rollback. Each tool installs into its inactive
    // slot and marks it for the next boot; the agent commits once healthy.
    Some(match name {
        "rauc" => [
            v(&["rauc", "install", "{artifact}"]),
            v(&[]),
            v(&["rauc", "status", "mark-good"]),
            v(&["rauc", "status", "mark-bad"]),
        ],
        "swupdate" => [
            v(&["swupdate", "-v", "-i", "{artifact}"]),
            v(&[]),
            v(&["fw_setenv", "ustate", "0"]),
            v(&["fw_setenv", "ustate", "3"]),
        ],
        "mender" => [
            v(&["mender-update", "install", "{artifact}"]),
            v(&[]),
            v(&["mender-update", "commit"]),
            v(&["mender-update", "rollback"]),
        ],
        _ => return None,
    })
}

impl AgentConfig {
    /// Reads `path` (a missing default file is fine: flags may say everything),
    /// applies `over`, validates.
    pub fn load(path: &Path, explicit: bool, over: &Overrides) -> Result<AgentConfig, ConfigError> {
        let file = match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                FileConfig::default()
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Self::from_parts(file, over)
    }

    /// Merges and validates.
    pub fn from_parts(f: FileConfig, over: &Overrides) -> Result<AgentConfig, ConfigError> {
        let pick = |o: &Option<String>, f: Option<String>| o.clone().or(f);
        let device =
            pick(&over.device_id, f.device_id).ok_or_else(|| invalid("device_id", "missing"))?;
        let device = DeviceId::new(device).map_err(|e| invalid("device_id", e.to_string()))?;
        let fleet = pick(&over.fleet, f.fleet).unwrap_or_else(|| "default".into());
        let fleet = FleetId::new(fleet).map_err(|e| invalid("fleet", e.to_string()))?;
        let hardware =
            pick(&over.hardware, f.hardware).ok_or_else(|| invalid("hardware", "missing"))?;
        swell_protocol::ids::validate_id("hardware", &hardware)
            .map_err(|e| invalid("hardware", e.to_string()))?;
        let mut labels = Vec::new();
        for (k, v) in f.labels {
            validate_label_key(&k).map_err(|e| invalid("labels", e))?;
            validate_label_value(&v).map_err(|e| invalid("labels", e))?;
            labels.push(Label { key: k, value: v });
        }
        if labels.len() > swell_protocol::cohort::MAX_LABELS {
            return Err(invalid(
                "labels",
                format!("at most {}", swell_protocol::cohort::MAX_LABELS),
            ));
        }
        let state_dir = over
            .state_dir
            .clone()
            .or(f.state_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let broker = pick(&over.broker, f.broker).unwrap_or_else(|| "mqtt://127.0.0.1:1883".into());
        let broker =
            swell_mqtt::parse_url(&broker).map_err(|e| invalid("broker", e.to_string()))?;
        let prefix =
            pick(&over.topic_prefix, f.topic_prefix).unwrap_or_else(|| DEFAULT_PREFIX.into());
        let topics = Topics::new(&prefix).map_err(|e| invalid("topic_prefix", e.to_string()))?;
        let enrollment_token = pick(&over.enrollment_token, f.enrollment_token);
        if let Some(t) = &enrollment_token
            && (t.len() > 128 || !t.chars().all(|c| (' '..='~').contains(&c)))
        {
            return Err(invalid(
                "enrollment_token",
                "at most 128 printable ASCII characters",
            ));
        }
        let root_hex = if over.roots.is_empty() {
            f.trust.roots
        } else {
            over.roots.clone()
        };
        let mut roots = Vec::new();
        for h in &root_hex {
            let b =
                hex::decode(h.trim()).map_err(|e| invalid("trust.roots", format!("{h:?}: {e}")))?;
            let b: [u8; 32] = b
                .try_into()
                .map_err(|_| invalid("trust.roots", format!("{h:?} is not 32 bytes")))?;
            roots.push(PublicKey(b));
        }
        if roots.is_empty() {
            return Err(invalid(
                "trust.roots",
                "at least one pinned root key is needed",
            ));
        }
        let threshold = f.trust.threshold.unwrap_or(1);
        if threshold == 0 || usize::from(threshold) > roots.len() {
            return Err(invalid(
                "trust.threshold",
                format!("{threshold} with {} root keys", roots.len()),
            ));
        }
        let heartbeat = duration(
            "heartbeat",
            f.heartbeat.as_deref(),
            Duration::from_secs(300),
        )?;
        let outbox_cap = f.outbox_cap.unwrap_or(crate::store::DEFAULT_OUTBOX_CAP);
        if outbox_cap == 0 {
            return Err(invalid("outbox_cap", "must be at least 1"));
        }
        let m = f.mqtt;
        // A device's broker user name is its device id (the rules Swell's
        // brokers enforce), so a password file alone is enough.
        let username = over.username.clone().or(m.username);
        let password_file = over.password_file.clone().or(m.password_file);
        let username = match (&username, &password_file) {
            (None, Some(_)) => Some(device.to_string()),
            _ => username,
        };
        let credentials = match (username, password_file) {
            (Some(u), Some(p)) => {
                let pw = read_file("mqtt.password_file", &p)?;
                let pw = String::from_utf8(pw)
                    .map_err(|_| invalid("mqtt.password_file", "not UTF-8"))?;
                Some((u, pw.trim_end_matches(['\n', '\r']).to_string()))
            }
            (Some(u), None) => Some((u, String::new())),
            (None, _) => None,
        };
        let tls = if broker.tls {
            let ca = m
                .ca_file
                .as_deref()
                .map(|p| read_file("mqtt.ca_file", p))
                .transpose()?
                .ok_or_else(|| {
                    invalid(
                        "mqtt.ca_file",
                        "an mqtts:// broker needs the CA that signed it",
                    )
                })?;
            let client = match (m.client_cert, m.client_key) {
                (Some(c), Some(k)) => Some((
                    read_file("mqtt.client_cert", &c)?,
                    read_file("mqtt.client_key", &k)?,
                )),
                (None, None) => None,
                _ => {
                    return Err(invalid(
                        "mqtt.client_cert",
                        "client_cert and client_key go together",
                    ));
                }
            };
            Some(swell_mqtt::TlsPem { ca, client })
        } else {
            None
        };
        let keep_alive = duration(
            "mqtt.keep_alive",
            m.keep_alive.as_deref(),
            Duration::from_secs(60),
        )?;
        let d = f.download;
        let download = DownloadConfig {
            min_bytes_per_sec: d.min_bytes_per_sec.unwrap_or(1024),
            watchdog: duration(
                "download.watchdog",
                d.watchdog.as_deref(),
                Duration::from_secs(30),
            )?,
            deadline: duration(
                "download.deadline",
                d.deadline.as_deref(),
                Duration::from_secs(2 * 3600),
            )?,
            ca_pem: d
                .ca_file
                .as_deref()
                .map(|p| read_file("download.ca_file", p))
                .transpose()?,
        };
        if download.watchdog.is_zero() || download.deadline < download.watchdog {
            return Err(invalid(
                "download",
                "watchdog must be positive and below the deadline",
            ));
        }
        let i = f.install;
        let backend = match i.backend.as_deref().unwrap_or("slots") {
            "slots" => {
                let s = i.slots.unwrap_or_default();
                BackendConfig::Slots {
                    dir: s.dir.unwrap_or_else(|| state_dir.join("slots")),
                    run: s.run,
                }
            }
            "command" => {
                let c = i.command.ok_or_else(|| {
                    invalid(
                        "install.command",
                        "backend \"command\" needs [install.command]",
                    )
                })?;
                let [pi, pa, pc, pr] = match c.preset.as_deref() {
                    None => Default::default(),
                    Some(p) => preset(p).ok_or_else(|| {
                        invalid(
                            "install.command.preset",
                            format!("{p:?}: use rauc, swupdate or mender"),
                        )
                    })?,
                };
                let install = c.install.unwrap_or(pi);
                if install.is_empty() {
                    return Err(invalid(
                        "install.command.install",
                        "missing (or give a preset)",
                    ));
                }
                BackendConfig::Command {
                    install,
                    activate: c.activate.unwrap_or(pa),
                    commit: c.commit.unwrap_or(pc),
                    rollback: c.rollback.unwrap_or(pr),
                    timeout: duration(
                        "install.command.timeout",
                        c.timeout.as_deref(),
                        Duration::from_secs(1800),
                    )?,
                }
            }
            "container" => {
                let c = i.container.unwrap_or_default();
                let name = c.name.unwrap_or_else(|| "swell-app".into());
                swell_protocol::ids::validate_id("install.container.name", &name)
                    .map_err(|e| invalid("install.container.name", e.to_string()))?;
                BackendConfig::Container {
                    cli: c.cli.unwrap_or_else(|| "podman".into()),
                    name,
                    run_args: c.run_args,
                    timeout: duration(
                        "install.container.timeout",
                        c.timeout.as_deref(),
                        Duration::from_secs(900),
                    )?,
                }
            }
            other => {
                return Err(invalid(
                    "install.backend",
                    format!("{other:?}: use slots, command or container"),
                ));
            }
        };
        let mut probes = Vec::new();
        for p in f.probes {
            let timeout = duration(
                "probes.timeout",
                p.timeout.as_deref(),
                Duration::from_secs(10),
            )?;
            probes.push(match p.kind.as_str() {
                "command" if !p.command.is_empty() => ProbeConfig::Command {
                    argv: p.command,
                    timeout,
                },
                "command" => {
                    return Err(invalid("probes.command", "a command probe needs a command"));
                }
                "http" => {
                    let url = p
                        .url
                        .ok_or_else(|| invalid("probes.url", "an http probe needs a url"))?;
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(invalid("probes.url", format!("{url:?} is not http(s)")));
                    }
                    ProbeConfig::Http { url, timeout }
                }
                "process" => ProbeConfig::Process,
                other => {
                    return Err(invalid(
                        "probes.kind",
                        format!("{other:?}: use command, http or process"),
                    ));
                }
            });
        }
        if probes.len() > 16 {
            return Err(invalid("probes", "at most 16"));
        }
        if probes.contains(&ProbeConfig::Process)
            && !matches!(&backend, BackendConfig::Slots { run, .. } if !run.is_empty())
        {
            return Err(invalid("probes", "a process probe needs install.slots.run"));
        }
        let max_attempts = i.max_attempts.unwrap_or(3);
        if max_attempts == 0 {
            return Err(invalid("install.max_attempts", "must be at least 1"));
        }
        Ok(AgentConfig {
            device,
            fleet,
            hardware,
            labels,
            state_dir,
            broker,
            topics,
            enrollment_token,
            root: RootOfTrust { roots, threshold },
            heartbeat,
            outbox_cap,
            credentials,
            tls,
            keep_alive,
            download,
            backend,
            probation: duration(
                "install.probation",
                i.probation.as_deref(),
                Duration::from_secs(60),
            )?,
            probe_interval: duration(
                "install.probe_interval",
                i.probe_interval.as_deref(),
                Duration::from_secs(5),
            )?,
            reach_timeout: duration(
                "install.reach_timeout",
                i.reach_timeout.as_deref(),
                Duration::from_secs(600),
            )?,
            max_attempts,
            probes,
            abort_after: over.abort_after.clone(),
        })
    }
}
