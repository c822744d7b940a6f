//! `swell-agent`: the device agent. `swell-agent run` (the default) runs it;
//! `status` prints what it last wrote; `check-config` validates the merged
//! configuration; `key` prints the device's public key.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use swell_agent::config::{AgentConfig, DEFAULT_CONFIG, DEFAULT_STATE_DIR, Overrides};
use swell_agent::runtime::{self, Supervisor};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "swell-agent", version, about = "Swell device agent")]
struct Cli {
    /// Configuration file.
    #[arg(long, env = "SWELL_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// State directory (device key, trust file, journal, blobs, slots).
    #[arg(long, env = "SWELL_AGENT_STATE_DIR", global = true)]
    state_dir: Option<PathBuf>,
    #[arg(long, env = "SWELL_AGENT_DEVICE_ID", global = true)]
    device_id: Option<String>,
    #[arg(long, env = "SWELL_AGENT_FLEET", global = true)]
    fleet: Option<String>,
    #[arg(long, env = "SWELL_AGENT_HARDWARE", global = true)]
    hardware: Option<String>,
    /// Broker URL: mqtt://host:port or mqtts://host:port.
    #[arg(long, env = "SWELL_AGENT_BROKER", global = true)]
    broker: Option<String>,
    #[arg(long, env = "SWELL_AGENT_TOPIC_PREFIX", global = true)]
    topic_prefix: Option<String>,
    /// Broker user name (default with a password file: the device id).
    #[arg(long, env = "SWELL_AGENT_USERNAME", global = true)]
    username: Option<String>,
    /// File holding the broker password (`swell-coordinator broker-password
    /// device ID` prints the embedded broker's).
    #[arg(long, env = "SWELL_AGENT_PASSWORD_FILE", global = true)]
    password_file: Option<PathBuf>,
    #[arg(
        long,
        env = "SWELL_AGENT_ENROLLMENT_TOKEN",
        global = true,
        hide_env_values = true
    )]
    enrollment_token: Option<String>,
    /// Pinned root public key (hex); repeat for several. Replaces the file's list.
    #[arg(
        long = "root-key",
        env = "SWELL_AGENT_ROOT_KEYS",
        value_delimiter = ',',
        global = true
    )]
    root_keys: Vec<String>,
    /// Testing hook: abort right after journaling this install stage.
    #[arg(long, env = "SWELL_AGENT_ABORT_AFTER", global = true, hide = true)]
    abort_after: Option<String>,
    /// Log format.
    #[arg(
        long,
        env = "SWELL_AGENT_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the agent (the default).
    Run,
    /// Print the status the running agent last wrote.
    Status,
    /// Validate the configuration and print it.
    CheckConfig,
    /// Print the device public key (creating the key on first use).
    Key,
    /// Check a file against a SHA-256 digest and length, as the agent checks
    /// every blob before installing it (exit 0 when it matches, 1 otherwise).
    Verify {
        file: PathBuf,
        /// Hex SHA-256.
        #[arg(long)]
        sha256: String,
        #[arg(long)]
        length: u64,
    },
}

struct Systemd {
    watchdog: Option<Duration>,
    last: std::time::Instant,
}

impl Supervisor for Systemd {
    fn ready(&mut self) {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    }
    fn alive(&mut self) {
        if let Some(every) = self.watchdog
            && self.last.elapsed() >= every
        {
            self.last = std::time::Instant::now();
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
    }
    fn stopping(&mut self) {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }
}

fn load(cli: &Cli) -> anyhow::Result<AgentConfig> {
    let (path, explicit) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let over = Overrides {
        device_id: cli.device_id.clone(),
        fleet: cli.fleet.clone(),
        hardware: cli.hardware.clone(),
        state_dir: cli.state_dir.clone(),
        broker: cli.broker.clone(),
        topic_prefix: cli.topic_prefix.clone(),
        enrollment_token: cli.enrollment_token.clone(),
        roots: cli.root_keys.clone(),
        username: cli.username.clone(),
        password_file: cli.password_file.clone(),
        abort_after: cli.abort_after.clone(),
    };
    Ok(AgentConfig::load(&path, explicit, &over)?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SWELL_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => fmt.json().init(),
        LogFormat::Text => fmt.init(),
    }
    match cli.command.as_ref().unwrap_or(&Cmd::Run) {
        Cmd::Status => {
            let dir = cli
                .state_dir
                .clone()
                .or_else(|| load(&cli).ok().map(|c| c.state_dir))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
            let path = dir.join("status.json");
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
            println!("{text}");
            Ok(())
        }
        Cmd::CheckConfig => {
            let c = load(&cli)?;
            println!("device      {}", c.device);
            println!("fleet       {}", c.fleet);
            println!("hardware    {}", c.hardware);
            println!(
                "broker      {}:{}{}",
                c.broker.host,
                c.broker.port,
                if c.broker.tls { " (TLS)" } else { "" }
            );
            println!("state dir   {}", c.state_dir.display());
            println!(
                "root keys   {} (threshold {})",
                c.root.roots.len(),
                c.root.threshold
            );
            println!("backend     {:?}", c.backend);
            println!("probes      {}", c.probes.len());
            println!("probation   {:?}", c.probation);
            Ok(())
        }
        Cmd::Key => {
            let c = load(&cli)?;
            swell_durable::private_dir(&c.state_dir)?;
            let (key, _) = swell_agent::identity::load_or_create(&c.state_dir.join("device.key"))?;
            println!("{}", hex::encode(key.public().0));
            Ok(())
        }
        Cmd::Verify {
            file,
            sha256,
            length,
        } => {
            let d: [u8; 32] = hex::decode(sha256.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .context("--sha256 is not 32 bytes of hex")?;
            let ok = swell_agent::download::verify_file(file, &swell_protocol::Digest(d), *length)
                .with_context(|| format!("{}", file.display()))?;
            if ok {
                println!(
                    "ok: {} is {length} bytes with the expected SHA-256",
                    file.display()
                );
                Ok(())
            } else {
                anyhow::bail!("{} does not match the digest and length", file.display())
            }
        }
        Cmd::Run => {
            let cfg = load(&cli)?;
            // Small on purpose: a device may have 64 MiB of RAM.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .max_blocking_threads(4)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let stop = CancellationToken::new();
                let s = stop.clone();
                tokio::spawn(async move {
                    let mut term = match tokio::signal::unix::signal(
                        tokio::signal::unix::SignalKind::terminate(),
                    ) {
                        Ok(t) => t,
                        Err(_) => return,
                    };
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = tokio::signal::ctrl_c() => {},
                    }
                    s.cancel();
                });
                let mut usec = 0u64;
                let watchdog = sd_notify::watchdog_enabled(false, &mut usec)
                    .then(|| Duration::from_micros(usec / 2));
                let mut sup = Systemd {
                    watchdog,
                    last: std::time::Instant::now(),
                };
                runtime::run(cfg, stop, &mut sup).await
            })?;
            Ok(())
        }
    }
}
