//! `swell`: the operator CLI.

mod decode;
mod demo;
mod keys;
mod ops_client;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let result = match cli.command {
        Command::Keys(cmd) => keys::run(cmd),
        Command::Decode(args) => decode::run(args),
        Command::Demo(args) => demo::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
