//! `swell rollout …`, `swell fleet`, `swell device approve`, `swell events`:
//! operator commands over the MQTT ops topics, each showing the coordinator's
//! reply. A refused command prints one line and exits 1.

use crate::ops_client::OpsClient;
use crate::ops_client::answer;
use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use swell_coordinator::fleet::registry::Enrollment;
use swell_coordinator::status::{DeviceList, FleetSummary, Reply, RolloutStatus};
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

#[derive(Debug, Subcommand)]
pub enum RolloutCmd {
    /// Create a rollout from a JSON spec file (the ops `create` spec).
    Create {
        /// Spec file (JSON); `release` may name a file holding the signed release.
        spec: PathBuf,
        /// Allow a selector that may overlap an active rollout.
        #[arg(long)]
        allow_overlap: bool,
    },
    /// Show one rollout (or all); with --wait, wait for an end state.
    Status {
        rollout: Option<String>,
        /// Exit 0 on completed, 1 on rolled back or aborted, 2 on paused or timeout.
        #[arg(long)]
        wait: bool,
        /// Longest wait with --wait.
        #[arg(long, default_value = "30m")]
        wait_timeout: String,
    },
    /// All rollouts, one line each.
    List,
    /// A live view of one rollout: phase, a row per wave with a progress bar,
    /// the latest events. Ends (with the --wait exit codes) when it does.
    Watch {
        rollout: String,
        /// Stop watching after this long (exit 2).
        #[arg(long, default_value = "24h")]
        wait_timeout: String,
    },
    Pause {
        rollout: String,
    },
    Resume {
        rollout: String,
    },
    /// Pass a manual gate, or open the next wave now.
    Promote {
        rollout: String,
    },
    Abort {
        rollout: String,
    },
    Rollback {
        rollout: String,
    },
    /// Let failed devices try again.
    Retry {
        rollout: String,
    },
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

async fn connect(c: &Conn) -> Result<OpsClient> {
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
    let mut ops = OpsClient::connect(
        &c.mqtt(format!("swell-cli-{}", std::process::id()))?,
        topics,
    )
    .await?;
    if let Some(k) = signer {
        ops.sign_with(k);
    }
    Ok(ops)
}

fn timeout(c: &Conn) -> Result<Duration> {
    humantime::parse_duration(&c.timeout).with_context(|| format!("--timeout {:?}", c.timeout))
}

/// Prints a reply; `Ok(false)` when the coordinator refused.
fn show(c: &Conn, reply: &Reply<Value>) -> Result<bool> {
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

fn print_status(s: &RolloutStatus) {
    println!(
        "{}  phase {}  wave {}  members {}{}",
        s.rollout,
        s.phase,
        s.wave,
        s.members,
        s.waiting
            .as_deref()
            .map(|w| format!("  waiting: {w}"))
            .unwrap_or_default()
    );
    for w in &s.waves {
        println!(
            "  {:<7} devices {:>6} healthy {:>6} failed {:>6} installing {:>6} silent {:>6}{}",
            w.label,
            w.population,
            w.healthy,
            w.failed,
            w.in_progress,
            w.silent,
            if w.opened { "" } else { "  (not open)" }
        );
    }
    if let Some(r) = &s.halt_reason {
        println!("  stopped: {r}");
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub fn rollout(cmd: RolloutCmd, c: Conn) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut ops = connect(&c).await?;
        let t = timeout(&c)?;
        let simple = |op: &str, r: &str| json!({"op": op, "rollout": r});
        let cmd_json = match &cmd {
            RolloutCmd::Create {
                spec,
                allow_overlap,
            } => {
                let text = std::fs::read_to_string(spec)
                    .with_context(|| format!("cannot read {}", spec.display()))?;
                let mut spec_v = parse_spec(spec, &text)?;
                // `release` may be a path to the encoded signed release.
                if let Some(r) = spec_v["release"].as_str()
                    && std::path::Path::new(r).is_file()
                {
                    let bytes =
                        std::fs::read(r).with_context(|| format!("cannot read release {r}"))?;
                    spec_v["release"] = json!(hex::encode(bytes));
                }
                json!({"op": "create", "spec": spec_v, "allow_overlap": allow_overlap})
            }
            RolloutCmd::Status { rollout, .. } => json!({"op": "status", "rollout": rollout}),
            RolloutCmd::List => json!({"op": "status"}),
            RolloutCmd::Watch { rollout, .. } => json!({"op": "status", "rollout": rollout}),
            RolloutCmd::Pause { rollout } => simple("pause", rollout),
            RolloutCmd::Resume { rollout } => simple("resume", rollout),
            RolloutCmd::Promote { rollout } => simple("promote", rollout),
            RolloutCmd::Abort { rollout } => simple("abort", rollout),
            RolloutCmd::Rollback { rollout } => simple("rollback", rollout),
            RolloutCmd::Retry { rollout } => simple("retry", rollout),
        };
        let reply = ops.command(cmd_json, t).await?;
        match &cmd {
            RolloutCmd::List if reply.ok && c.output == Output::Table => {
                let all: Vec<RolloutStatus> = answer(&reply)?;
                print!("{}", crate::view::list(&all));
                return Ok(ExitCode::SUCCESS);
            }
            RolloutCmd::Watch {
                rollout,
                wait_timeout,
            } if reply.ok => {
                let limit = humantime::parse_duration(wait_timeout)
                    .with_context(|| format!("--wait-timeout {wait_timeout:?}"))?;
                ops.statuses.insert(rollout.clone(), answer(&reply)?);
                return watch(&mut ops, rollout, limit, &c).await;
            }
            _ => {}
        }
        let ok = show(&c, &reply)?;
        if let RolloutCmd::Status {
            rollout: Some(id),
            wait: true,
            wait_timeout,
        } = &cmd
            && ok
        {
            let limit = humantime::parse_duration(wait_timeout)
                .with_context(|| format!("--wait-timeout {wait_timeout:?}"))?;
            return wait_for_end(&mut ops, id, limit, &c).await;
        }
        Ok(code(ok))
    })
}

/// A rollout spec in YAML (`.yaml`, `.yml`) or JSON.
pub fn parse_spec(path: &std::path::Path, text: &str) -> Result<Value> {
    let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
    if yaml {
        serde_yaml_ng::from_str(text)
            .with_context(|| format!("{} is not valid YAML", path.display()))
    } else {
        serde_json::from_str(text).with_context(|| format!("{} is not JSON", path.display()))
    }
}

/// Exit code of an end phase: 0 completed, 1 rolled back or aborted, 2 paused.
fn end_code(phase: &str) -> Option<u8> {
    match phase {
        "completed" => Some(0),
        "rolled_back" | "aborted" => Some(1),
        "paused" => Some(2),
        _ => None,
    }
}

/// `swell rollout watch`: redraws the live view on every status change (in
/// place on a terminal, appended otherwise) with the latest events.
async fn watch(ops: &mut OpsClient, id: &str, limit: Duration, c: &Conn) -> Result<ExitCode> {
    use std::io::IsTerminal as _;
    let tty = std::io::stdout().is_terminal();
    let deadline = tokio::time::Instant::now() + limit;
    let mut shown = String::new();
    loop {
        let Some(s) = ops.statuses.get(id).cloned() else {
            if !ops.next(deadline).await {
                return Ok(ExitCode::from(2));
            }
            continue;
        };
        let events: Vec<String> = ops
            .events
            .iter()
            .filter(|e| e.rollout == id)
            .rev()
            .take(5)
            .map(|e| format!("  - {}", crate::view::describe(e)))
            .collect();
        let view = match c.output {
            Output::Json => format!("{}\n", serde_json::to_string(&s).unwrap_or_default()),
            Output::Yaml => format!("---\n{}", serde_yaml_ng::to_string(&s).unwrap_or_default()),
            Output::Table => format!(
                "{}{}\n",
                crate::view::watch_view(&s),
                events.into_iter().rev().collect::<Vec<_>>().join("\n")
            ),
        };
        if view != shown {
            if tty && c.output == Output::Table {
                // Redraw in place: cursor home, clear screen.
                print!("\x1b[H\x1b[2J");
            }
            print!("{view}");
            shown = view;
        }
        if let Some(code) = end_code(&s.phase) {
            return Ok(ExitCode::from(code));
        }
        if !ops.next(deadline).await && tokio::time::Instant::now() >= deadline {
            return Ok(ExitCode::from(2));
        }
    }
}

/// Waits for an end state: 0 completed, 1 rolled back or aborted, 2 paused or timeout.
async fn wait_for_end(
    ops: &mut OpsClient,
    id: &str,
    limit: Duration,
    c: &Conn,
) -> Result<ExitCode> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(s) = ops.statuses.get(id) {
            let exit = match s.phase.as_str() {
                "completed" => Some(0),
                "rolled_back" | "aborted" => Some(1),
                "paused" => Some(2),
                _ => None,
            };
            if let Some(e) = exit {
                if c.output == Output::Table {
                    print_status(s);
                } else {
                    println!("{}", serde_json::to_string_pretty(s)?);
                }
                return Ok(ExitCode::from(e));
            }
        }
        if !ops.next(deadline).await {
            eprintln!(
                "error: {id} did not reach an end state within {}",
                humantime::format_duration(limit)
            );
            return Ok(ExitCode::from(2));
        }
    }
}

/// `swell fleet`: the inventory.
pub fn fleet(c: Conn) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut ops = connect(&c).await?;
        let reply = ops.command(json!({"op": "fleet"}), timeout(&c)?).await?;
        if c.output.structured() || !reply.ok {
            return show(&c, &reply).map(code);
        }
        let s: FleetSummary = answer(&reply)?;
        println!(
            "devices {}  approved {}  pending {}  online {}",
            s.devices, s.approved, s.pending, s.online
        );
        println!("running release:");
        for (id, n) in &s.running {
            println!("  {:<16} {n}", &id[..id.len().min(16)]);
        }
        if !s.by_label.is_empty() {
            println!("by label:");
            for (label, releases) in &s.by_label {
                let parts: Vec<String> = releases
                    .iter()
                    .map(|(r, n)| format!("{} {n}", &r[..r.len().min(12)]))
                    .collect();
                println!("  {label:<24} {}", parts.join(", "));
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Filters of `swell fleet devices`.
#[derive(Debug, Args)]
pub struct DeviceFilter {
    /// Label selector, e.g. `region=eu,ring in (beta,canary)`.
    #[arg(long, short = 'l')]
    selector: Option<String>,
    /// Running release: a hex prefix of its id, or `none`.
    #[arg(long)]
    release: Option<String>,
    /// Only devices online now.
    #[arg(long, conflicts_with = "offline")]
    online: bool,
    /// Only devices offline now.
    #[arg(long)]
    offline: bool,
    /// At most this many rows.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
}

/// `swell fleet devices`.
pub fn devices(f: DeviceFilter, c: Conn) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut ops = connect(&c).await?;
        let online = if f.online {
            Some(true)
        } else if f.offline {
            Some(false)
        } else {
            None
        };
        let reply = ops
            .command(
                json!({"op": "devices", "selector": f.selector, "release": f.release,
                       "online": online, "limit": f.limit}),
                timeout(&c)?,
            )
            .await?;
        if c.output.structured() || !reply.ok {
            return show(&c, &reply).map(code);
        }
        let list: DeviceList = answer(&reply)?;
        println!(
            "{:<24} {:<9} {:<7} {:<14} LABELS",
            "DEVICE", "ENROLLED", "ONLINE", "RUNNING"
        );
        for d in &list.devices {
            let run = d.running.as_deref().map_or("-", |r| &r[..r.len().min(12)]);
            println!(
                "{:<24} {:<9} {:<7} {:<14} {}",
                d.device,
                match d.enrollment {
                    Enrollment::Approved => "approved",
                    Enrollment::Pending => "pending",
                },
                if d.online { "yes" } else { "no" },
                run,
                d.labels.join(",")
            );
        }
        let (shown, matched) = (list.devices.len(), list.matched);
        if matched > shown {
            println!("({shown} of {matched} shown; raise --limit)");
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `swell device approve`.
pub fn approve(device: String, c: Conn) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut ops = connect(&c).await?;
        let reply = ops
            .command(json!({"op": "approve", "device": device}), timeout(&c)?)
            .await?;
        show(&c, &reply).map(code)
    })
}

/// `swell events`: follows the event stream until interrupted (or `--count`).
pub fn events(count: Option<usize>, c: Conn) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut ops = connect(&c).await?;
        let mut seen = 0;
        loop {
            while seen < ops.events.len() {
                let e = &ops.events[seen];
                match c.output {
                    Output::Json => println!("{}", serde_json::to_string(e)?),
                    Output::Yaml => print!("---\n{}", serde_yaml_ng::to_string(e)?),
                    Output::Table => {
                        println!("{} {} {}", e.at, e.rollout, crate::view::describe(e))
                    }
                }
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            if !ops
                .next(tokio::time::Instant::now() + Duration::from_secs(3600))
                .await
            {
                return Ok(ExitCode::SUCCESS);
            }
        }
    })
}
