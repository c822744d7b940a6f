//! The configuration file as written: every field optional, so the
//! environment and flags can fill in what it leaves out. Unknown fields are
//! refused (a typo must not pass silently).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The file, as written (every field optional so flags and env can fill in).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub device_id: Option<String>,
    pub fleet: Option<String>,
    pub hardware: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub state_dir: Option<PathBuf>,
    pub broker: Option<String>,
    pub topic_prefix: Option<String>,
    pub enrollment_token: Option<String>,
    /// Send a heartbeat report this often (`5m`).
    pub heartbeat: Option<String>,
    /// Most reports kept while offline.
    pub outbox_cap: Option<usize>,
    #[serde(default)]
    pub trust: TrustSection,
    #[serde(default)]
    pub mqtt: MqttSection,
    #[serde(default)]
    pub download: DownloadSection,
    #[serde(default)]
    pub install: InstallSection,
    #[serde(default)]
    pub probes: Vec<ProbeSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSection {
    /// Pinned root public keys, hex.
    #[serde(default)]
    pub roots: Vec<String>,
    pub threshold: Option<u8>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    pub username: Option<String>,
    /// File holding the broker password (never the password inline).
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub keep_alive: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadSection {
    /// Below this many bytes per second over `watchdog`, the connection is
    /// abandoned and resumed (DL-2).
    pub min_bytes_per_sec: Option<u64>,
    pub watchdog: Option<String>,
    /// The whole download must finish within this (`2h`).
    pub deadline: Option<String>,
    /// Extra CA for HTTPS artifact servers (the OS trust store is always used).
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallSection {
    /// `slots`, `command` or `container`.
    pub backend: Option<String>,
    pub probation: Option<String>,
    pub probe_interval: Option<String>,
    /// After probation, how long to wait for a fresh coordinator message before
    /// rolling back as unreachable (INST-2).
    pub reach_timeout: Option<String>,
    pub max_attempts: Option<u16>,
    pub slots: Option<SlotsSection>,
    pub command: Option<CommandSection>,
    pub container: Option<ContainerSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotsSection {
    pub dir: Option<PathBuf>,
    /// Supervised process started from the active slot (argv; the first element
    /// is resolved inside the slot when relative, e.g. `artifact-0`).
    #[serde(default)]
    pub run: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSection {
    /// `rauc`, `swupdate` or `mender`; explicit commands below override it.
    pub preset: Option<String>,
    pub install: Option<Vec<String>>,
    pub activate: Option<Vec<String>>,
    pub commit: Option<Vec<String>>,
    pub rollback: Option<Vec<String>>,
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSection {
    /// `docker`, `podman` or `nerdctl` (or a path to one).
    pub cli: Option<String>,
    /// Container name prefix; containers are `{name}-{release id prefix}`.
    pub name: Option<String>,
    #[serde(default)]
    pub run_args: Vec<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSection {
    /// `command`, `http` or `process`.
    pub kind: String,
    #[serde(default)]
    pub command: Vec<String>,
    pub url: Option<String>,
    pub timeout: Option<String>,
}
