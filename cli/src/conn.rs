//! What every operator subcommand shares: how to reach the broker (`Conn`:
//! URL, login, TLS, timeout, signing key), the output format, and how a
//! reply is shown and turned into an exit code.

use crate::ops_client::OpsClient;
use crate::ops_client::answer;
use crate::rollout::print_status;
use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use swell_coordinator::status::{Reply, RolloutStatus};
use swell_mqtt::{MqttConfig, TlsPem, parse_url};
use swell_protocol::topics::{DEFAULT_PREFIX, Topics};

/// Where the coordinator listens, and how to log in to its broker.
#[derive(Debug, Args)]
pub struct Conn {
    /// Broker URL: mqtt://host:port, or mqtts://host:port with --ca-file.
    #[arg(
        long,
        env = "SWELL_BROKER",
        default_value = "mqtt://127.0.0.1:1883",
        global = true
    )]
    broker: String,
    /// Broker user name (an operator's; `operator` on the embedded broker).
    #[arg(long, env = "SWELL_USERNAME", global = true)]
    username: Option<String>,
    /// File holding the broker password (never the password itself on the
    /// command line); `swell-coordinator broker-password operator` prints the
    /// embedded broker's.
    #[arg(long, env = "SWELL_PASSWORD_FILE", global = true)]
    password_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the broker's certificate (mqtts://).
    #[arg(long, env = "SWELL_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "SWELL_CLIENT_CERT", global = true)]
    client_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, env = "SWELL_CLIENT_KEY", global = true)]
    client_key: Option<PathBuf>,
    /// Topic prefix.
    #[arg(long, env = "SWELL_TOPIC_PREFIX", default_value = DEFAULT_PREFIX, global = true)]
    topic_prefix: String,
    /// The fleet whose coordinator to talk to; by default the one whose
    /// coordinator is online on the prefix (an error when there are several).
    #[arg(long, env = "SWELL_FLEET", global = true)]
    fleet: Option<String>,
    /// How long to wait for the coordinator's reply.
    #[arg(long, default_value = "10s", global = true)]
    timeout: String,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    /// Operator key file: sign every command (needed when the key list names
    /// operator keys).
    #[arg(long = "operator-key", env = "SWELL_OPERATOR_KEY", global = true)]
    operator_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

impl Output {
    /// Whether this is a machine-readable format (JSON or YAML).
    pub fn structured(self) -> bool {
        self != Output::Table
    }
}

/// Prints `v` as JSON or YAML.
pub fn print_structured(o: Output, v: &impl serde::Serialize) -> Result<()> {
    match o {
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(v)?),
        _ => println!("{}", serde_json::to_string_pretty(v)?),
    }
    Ok(())
}

impl Conn {
    pub fn topics(&self) -> Result<Topics> {
        Ok(Topics::new(&self.topic_prefix)?)
    }

    pub fn output(&self) -> Output {
        self.output
    }

    /// The session settings: broker, credentials, TLS (rustls with ring).
    pub fn mqtt(&self, client_id: String) -> Result<MqttConfig> {
        let u = parse_url(&self.broker)?;
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let credentials = match (&self.username, &self.password_file) {
            (Some(user), Some(file)) => {
                let pw = String::from_utf8(read(file)?)
                    .with_context(|| format!("{} is not UTF-8", file.display()))?;
                Some((user.clone(), pw.trim_end_matches(['\n', '\r']).to_string()))
            }
            (Some(_), None) => bail!("--username needs --password-file"),
            (None, Some(_)) => bail!("--password-file needs --username"),
            (None, None) => None,
        };
        let tls = if u.tls {
            let ca = self
                .ca_file
                .as_ref()
                .with_context(|| format!("{} is TLS: --ca-file is required", self.broker))?;
            let client = match (&self.client_cert, &self.client_key) {
                (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                (None, None) => None,
                _ => bail!("--client-cert and --client-key go together"),
            };
            Some(TlsPem {
                ca: read(ca)?,
                client,
            })
        } else {
            if self.ca_file.is_some() || self.client_cert.is_some() || self.client_key.is_some() {
                bail!("TLS files given but {} is not mqtts://", self.broker);
            }
            None
        };
        Ok(MqttConfig {
            host: u.host,
            port: u.port,
            client_id,
            credentials,
            keep_alive: Duration::from_secs(30),
            max_packet: 1 << 20,
            persistent: false,
            tls,
        })
    }
}

pub(crate) async fn connect(c: &Conn) -> Result<OpsClient> {
    let topics = c.topics()?;
    let signer = c
        .operator_key
        .as_deref()
        .map(|p| {
            swell_coordinator::keyfile::read_secret_as(
                p,
                swell_coordinator::keyfile::Role::Operator,
            )
        })
        .transpose()?;
    let fleet = c
        .fleet
        .as_deref()
        .map(swell_protocol::FleetId::new)
        .transpose()
        .context("--fleet")?;
    let mut ops = OpsClient::connect(
        &c.mqtt(format!("swell-cli-{}", std::process::id()))?,
        topics,
        fleet,
    )
    .await?;
    ops.resolve_fleet(timeout(c)?).await?;
    if let Some(k) = signer {
        ops.sign_with(k);
    }
    Ok(ops)
}

pub(crate) fn timeout(c: &Conn) -> Result<Duration> {
    humantime::parse_duration(&c.timeout).with_context(|| format!("--timeout {:?}", c.timeout))
}

/// Prints a reply; `Ok(false)` when the coordinator refused.
pub(crate) fn show(c: &Conn, reply: &Reply<Value>) -> Result<bool> {
    match c.output {
        Output::Json | Output::Yaml => print_structured(c.output, reply)?,
        Output::Table => {
            if !reply.ok {
                eprintln!(
                    "error: {} ({})",
                    reply.message,
                    reply.reason.as_deref().unwrap_or("refused")
                );
                return Ok(false);
            }
            println!("{}", reply.message);
            // Rollout commands answer one status, `status` without an id all.
            if let Ok(s) = answer::<RolloutStatus>(reply) {
                print_status(&s);
            } else if let Ok(all) = answer::<Vec<RolloutStatus>>(reply) {
                all.iter().for_each(print_status);
            }
        }
    }
    Ok(reply.ok)
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub(crate) fn code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
