//! `swell`: the operator CLI.

mod bench;
mod broker_config;
mod conn;
mod decode;
mod demo;
mod fleet;
mod keys;
mod ops_client;
mod release;
mod rollout;
mod tail;
mod view;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "swell",
    version,
    about = "Roll releases out to edge fleets in widening waves"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate and inspect signing keys.
    #[command(subcommand)]
    Keys(keys::KeysCmd),
    /// Decode a Swell message file (envelope or threshold object), verifying it
    /// when keys are given.
    Decode(decode::DecodeArgs),
    /// Run a real rollout end to end in this process: embedded broker,
    /// coordinator and a simulated fleet running the agent logic.
    Demo(demo::DemoArgs),
    /// Benchmarks: `swell bench fleet --devices N --broker embedded|mosquitto|URL`.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Make and sign releases (offline).
    #[command(subcommand)]
    Release(release::ReleaseCmd),
    /// The Mosquitto configuration that enforces Swell's rules (offline).
    #[command(subcommand)]
    Broker(broker_config::BrokerCmd),
    /// Create, follow and steer rollouts (over the MQTT ops topics).
    Rollout {
        #[command(subcommand)]
        cmd: rollout::RolloutCmd,
        #[command(flatten)]
        conn: conn::Conn,
    },
    /// Fleet inventory: devices by enrollment, liveness and running release,
    /// per label; `swell fleet devices` lists devices with filters.
    Fleet {
        #[command(subcommand)]
        cmd: Option<FleetCmd>,
        #[command(flatten)]
        conn: conn::Conn,
    },
    /// Devices waiting for enrollment: list, approve, reject.
    Device {
        #[command(subcommand)]
        cmd: DeviceCmd,
        #[command(flatten)]
        conn: conn::Conn,
    },
    /// Raw MQTT: follow topics, decoding and verifying Swell messages.
    Mqtt {
        #[command(subcommand)]
        cmd: MqttCmd,
        #[command(flatten)]
        conn: conn::Conn,
    },
    /// Shell completions: `swell completions bash > /etc/bash_completion.d/swell`.
    Completions { shell: clap_complete::Shell },
    /// Follow the coordinator's event stream.
    Events {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        #[command(flatten)]
        conn: conn::Conn,
    },
}

#[derive(Debug, Subcommand)]
enum MqttCmd {
    /// Print every message on a topic filter (`swell/v1/dev/+/report`).
    Tail(tail::TailArgs),
}

#[derive(Debug, Subcommand)]
enum FleetCmd {
    /// Devices, filtered.
    Devices(fleet::DeviceFilter),
}

#[derive(Debug, Subcommand)]
enum DeviceCmd {
    /// Approve a device that said hello without an enrollment token.
    Approve {
        device: String,
        /// The key id it must be pending with (`swell fleet devices -o json`
        /// shows it): a Hello with another key since is not approved.
        #[arg(long)]
        key: Option<String>,
    },
    /// Devices pending approval, with the key each is pending with.
    Pending {
        /// At most this many rows.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Remove a device's record (a squatter's pending binding, or a device
    /// that is gone), or with `--pending` every pending device; a device a
    /// rollout counts is not removed. A removed device may say Hello again.
    Reject {
        #[arg(required_unless_present = "pending", conflicts_with = "pending")]
        device: Option<String>,
        /// The key id it must be bound to (`swell device pending -o json`).
        #[arg(long, requires = "device")]
        key: Option<String>,
        /// Every device pending approval.
        #[arg(long)]
        pending: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The embedded broker (rmqtt) reports every peer that goes away: not the
    // operator's business.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,rmqtt=off,rmqtt_net=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let result = match cli.command {
        Command::Keys(cmd) => keys::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Decode(args) => decode::run(args).map(|()| ExitCode::SUCCESS),
        Command::Demo(args) => demo::run(args).map(|()| ExitCode::SUCCESS),
        Command::Bench(cmd) => bench::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Release(cmd) => release::release(cmd).map(|()| ExitCode::SUCCESS),
        Command::Broker(cmd) => broker_config::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Rollout { cmd, conn } => rollout::rollout(cmd, conn),
        Command::Fleet { cmd: None, conn } => fleet::fleet(conn),
        Command::Fleet {
            cmd: Some(FleetCmd::Devices(f)),
            conn,
        } => fleet::devices(f, conn),
        Command::Device {
            cmd: DeviceCmd::Approve { device, key },
            conn,
        } => fleet::approve(device, key, conn),
        Command::Device {
            cmd: DeviceCmd::Pending { limit },
            conn,
        } => fleet::devices(fleet::DeviceFilter::pending(limit), conn),
        Command::Device {
            cmd:
                DeviceCmd::Reject {
                    device,
                    key,
                    pending,
                },
            conn,
        } => fleet::reject(device, key, pending, conn),
        Command::Events { count, conn } => rollout::events(count, conn),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "swell", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Mqtt {
            cmd: MqttCmd::Tail(args),
            conn,
        } => tail::run(args, conn),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
