//! `swell broker`: the Mosquitto configuration that enforces Swell's rules
//! (SECURITY MQTT-1, MQTT-8), rendered from the rules the embedded broker
//! enforces (`swell_broker::mosquitto`): the ACL file for `acl_file`, and the
//! dynamic-security plugin's file with every user's hashed password.

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use swell_broker::Rules;
use swell_broker::mosquitto::{Login, Users};
use swell_protocol::topics::{DEFAULT_PREFIX, Topics};

#[derive(Debug, Subcommand)]
pub enum BrokerCmd {
    /// Print the ACL file (`acl_file`) for Mosquitto: a device's publishes and
    /// deliveries, by user name.
    MosquittoAcl(RulesArgs),
    /// Write the dynamic-security plugin's file (`plugin_opt_config_file`):
    /// roles, and a client per user with its password hashed (PBKDF2-SHA512).
    MosquittoDynsec(DynsecArgs),
}

#[derive(Debug, Args)]
pub struct RulesArgs {
    /// Topic prefix.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    topic_prefix: String,
    /// Confine devices to this fleet's topics (default: any fleet; one fleet
    /// per broker is the usual set-up).
    #[arg(long)]
    fleet: Option<String>,
}

#[derive(Debug, Args)]
pub struct DynsecArgs {
    #[command(flatten)]
    rules: RulesArgs,
    /// The administrator's password file (user `admin`, for `mosquitto_ctrl`);
    /// none: no administrator.
    #[arg(long)]
    admin_password_file: Option<PathBuf>,
    /// The coordinator's password file (user `coordinator`).
    #[arg(long)]
    coordinator_password_file: PathBuf,
    /// An operator, as NAME=PASSWORD_FILE (repeat for each).
    #[arg(long = "operator", value_name = "NAME=FILE")]
    operators: Vec<String>,
    /// A gateway that speaks for many devices, as NAME=PASSWORD_FILE.
    #[arg(long = "gateway", value_name = "NAME=FILE")]
    gateways: Vec<String>,
    /// The devices: one `DEVICE_ID PASSWORD` per line (`#` starts a comment).
    #[arg(long)]
    devices: Option<PathBuf>,
    /// Where to write the file (created with mode 0600).
    #[arg(long, short)]
    out: PathBuf,
}

/// Passwords shorter than this are refused: a device's is its only secret on
/// the broker.
const MIN_PASSWORD: usize = 16;

fn rules(a: &RulesArgs) -> Result<Rules> {
    Topics::new(&a.topic_prefix)?;
    if let Some(f) = &a.fleet {
        swell_protocol::FleetId::new(f).context("--fleet")?;
    }
    Ok(Rules::new(&a.topic_prefix, a.fleet.as_deref()))
}

fn password(path: &Path) -> Result<String> {
    let s =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let s = s.trim_end_matches(['\n', '\r']).to_string();
    if s.len() < MIN_PASSWORD {
        bail!(
            "{}: the password is {} characters; at least {MIN_PASSWORD} are needed",
            path.display(),
            s.len()
        );
    }
    Ok(s)
}

fn named(what: &str, spec: &str) -> Result<Login> {
    let (name, file) = spec
        .split_once('=')
        .with_context(|| format!("--{what} {spec:?}: give NAME=PASSWORD_FILE"))?;
    swell_protocol::ids::validate_id("user name", name)
        .with_context(|| format!("--{what} {spec:?}"))?;
    Ok(Login {
        user: name.to_string(),
        password: password(Path::new(file))?,
    })
}

fn devices(path: &Path) -> Result<Vec<Login>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let (id, pw) = line
            .split_once(char::is_whitespace)
            .with_context(|| format!("{}: give DEVICE_ID PASSWORD", at()))?;
        let id = swell_protocol::DeviceId::new(id).with_context(at)?;
        let pw = pw.trim();
        if pw.len() < MIN_PASSWORD {
            bail!(
                "{}: the password of {id} is shorter than {MIN_PASSWORD} characters",
                at()
            );
        }
        out.push(Login {
            user: id.to_string(),
            password: pw.to_string(),
        });
    }
    Ok(out)
}

pub fn run(cmd: BrokerCmd) -> Result<()> {
    match cmd {
        BrokerCmd::MosquittoAcl(a) => {
            print!("{}", swell_broker::mosquitto::acl_file(&rules(&a)?));
            Ok(())
        }
        BrokerCmd::MosquittoDynsec(a) => {
            let users = Users {
                admin: a
                    .admin_password_file
                    .as_deref()
                    .map(|f| {
                        Ok::<_, anyhow::Error>(Login {
                            user: "admin".into(),
                            password: password(f)?,
                        })
                    })
                    .transpose()?,
                coordinator: Some(Login {
                    user: swell_broker::credentials::COORDINATOR_USER.into(),
                    password: password(&a.coordinator_password_file)?,
                }),
                operators: a
                    .operators
                    .iter()
                    .map(|s| named("operator", s))
                    .collect::<Result<_>>()?,
                gateways: a
                    .gateways
                    .iter()
                    .map(|s| named("gateway", s))
                    .collect::<Result<_>>()?,
                devices: a
                    .devices
                    .as_deref()
                    .map(devices)
                    .transpose()?
                    .unwrap_or_default(),
            };
            let json = swell_broker::mosquitto::dynamic_security(&rules(&a.rules)?, &users)
                .map_err(|e| anyhow::anyhow!("no randomness for the password salts: {e}"))?;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt as _;
                opts.mode(0o600);
            }
            let mut f = opts
                .open(&a.out)
                .with_context(|| format!("cannot write {}", a.out.display()))?;
            f.write_all(serde_json::to_string_pretty(&json)?.as_bytes())?;
            f.sync_all()?;
            eprintln!(
                "wrote {}: {} client(s) ({} device(s)); copy it into the swell-mosquitto-dynsec Secret",
                a.out.display(),
                json["clients"].as_array().map_or(0, Vec::len),
                users.devices.len()
            );
            Ok(())
        }
    }
}
