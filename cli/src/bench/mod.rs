//! `swell bench fleet`: how a full rollout scales, measured against the broker's
//! own limit in the same run (BENCHMARKS.md).
//!
//! One run: a broker (the embedded one, a Mosquitto started here with tuned
//! limits, or a URL), the coordinator as a child process (so its CPU and peak
//! RSS are its own), and N simulated devices running the real agent logic, each
//! signing its own Hello and Reports. It measures:
//! 1. a rollout (4 waves, zero bake): total and per-wave time, reports/s, the
//!    coordinator's CPU and peak RSS, bytes per device, and the coordinator's
//!    gate-to-manifest latency (from receiving the batch of reports that let a
//!    rollout move to publishing the new manifest);
//! 2. the broker's raw relay rate for the same number and size of messages,
//!    from the same number of connections to one plain subscriber;
//! 3. the ratio of (1)'s ingest rate to (2)'s relay rate.
//! 4. for both phases, the CPU each process spent per message (coordinator,
//!    broker, and this process: the fleet or the relay's clients) and how busy
//!    the machine was, so the ratio can be read against the cores all three
//!    share ([`cpu`]).
//!
//! Nothing here asserts a time: tests run a small fleet to keep it working.
//!
//! The child processes are in [`procs`], the relay baseline in [`relay`], the
//! fleet run in [`fleet`], the CPU accounting in [`cpu`].

mod cpu;
mod fleet;
mod procs;
mod relay;

use crate::demo::DemoKeys;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use swell_coordinator::server::unix_now;
use swell_protocol::Digest;
use swell_protocol::messages::{Artifact, ArtifactKind, Release};
use swell_protocol::threshold::ThresholdSigned;

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// A full rollout of N simulated devices against the broker's relay rate.
    Fleet(FleetArgs),
    /// (internal) The coordinator process of `bench fleet`.
    #[command(hide = true)]
    Coordinator(ChildArgs),
    /// (internal) The embedded broker in a process of its own, so `bench fleet`
    /// charges its CPU and memory to it.
    #[command(hide = true)]
    Broker(BrokerArgs),
}

#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Its credentials directory.
    #[arg(long)]
    dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct FleetArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// `embedded` (Swell's embedded broker, in a process of its own),
    /// `mosquitto` (Debian's mosquitto started here on a free port with raised
    /// queue limits, anonymous) or mqtt://host:port (anonymous).
    #[arg(long, default_value = "embedded")]
    broker: String,
    /// MQTT connections the devices share (default: one per 2,000, 2 to 64).
    #[arg(long)]
    connections: Option<usize>,
    /// Seed for keys (the same seed gives the same fleet).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Give up after this long.
    #[arg(long, default_value = "30m")]
    timeout: String,
    /// Threads the coordinator verifies device signatures on (0: one per core).
    #[arg(long, default_value_t = 0)]
    verify_threads: usize,
    /// The coordinator checks each signature alone (`--strict-signatures`),
    /// not in batches: the baseline of the batch check.
    #[arg(long)]
    strict_signatures: bool,
    /// Runs the coordinator process under this profiler command, split at
    /// spaces (e.g. `heaptrack -o /tmp/coord` or `perf record -g -o
    /// /tmp/coord.data --`). Figures taken under a profiler are not results.
    #[arg(long, value_name = "CMD")]
    wrap_coordinator: Option<String>,
    /// The coordinator's database page cache in MiB (its default: 16).
    #[arg(long)]
    db_cache_mib: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ChildArgs {
    #[arg(long)]
    host: String,
    #[arg(long)]
    port: u16,
    #[arg(long)]
    seed: u64,
    /// Where the coordinator writes its measurements when stdin closes.
    #[arg(long)]
    summary: PathBuf,
    #[arg(long, default_value_t = 0)]
    verify_threads: usize,
    #[arg(long)]
    strict_signatures: bool,
    #[arg(long)]
    db_cache_mib: Option<u64>,
    /// The broker's coordinator login (the embedded broker's).
    #[arg(long)]
    username: Option<String>,
    #[arg(long)]
    password_file: Option<PathBuf>,
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cmd {
        BenchCmd::Fleet(a) => rt.block_on(fleet::fleet(a)),
        BenchCmd::Coordinator(a) => rt.block_on(procs::child(a)),
        BenchCmd::Broker(a) => procs::broker_child(a),
    }
}

pub(super) const FLEET: &str = "bench";

pub(super) fn release(counter: u64, keys: &DemoKeys) -> Result<ThresholdSigned> {
    let body = Release {
        counter,
        version: format!("{counter}.0.0"),
        created_at: unix_now(),
        // Devices simulate the download (fetch_concurrency 0): the benchmark
        // measures the control plane, not an artifact server.
        artifacts: vec![Artifact {
            name: "app.tar".into(),
            kind: ArtifactKind::Bundle,
            digest: Digest::sha256(b"bench"),
            length: 5,
            urls: vec!["https://artifacts.example/app.tar".into()],
        }],
        config: None,
        hardware: vec!["rpi4".into()],
        exposure: None,
        rollback: None,
    };
    let mut r = ThresholdSigned::new(&body)?;
    r.sign(&keys.rel_a)?;
    r.sign(&keys.rel_b)?;
    Ok(r)
}

pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The broker's logins for the benchmark's clients (none: anonymous).
#[derive(Debug, Default)]
pub(super) struct Logins {
    pub(super) coordinator: Option<(String, String)>,
    pub(super) operator: Option<(String, String)>,
    pub(super) gateway: Option<(String, String)>,
}
