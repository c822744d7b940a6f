//! The processes of a benchmark run besides this one: the embedded broker
//! child and the coordinator child, each measured on its own.

use super::cpu::proc_usage;
use super::{BrokerArgs, ChildArgs, FLEET, FleetArgs, Logins};
use crate::demo::{DemoKeys, demo_keys};
use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use std::io::{BufRead as _, Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use swell_coordinator::assemble::Coordinator;
use swell_coordinator::engine::Settings;
use swell_coordinator::metrics::Metrics;
use swell_coordinator::server::{Hooks, LoopConfig};
use swell_coordinator::store::{DEFAULT_CACHE_BYTES, cache_bytes_from_mib};
use swell_mqtt::MqttConfig;
use swell_protocol::FleetId;
use swell_protocol::topics::Topics;
use tokio_util::sync::CancellationToken;

/// The embedded broker of `bench fleet --broker embedded`: prints `ready {pid}
/// {port}` and serves until stdin closes.
pub(super) fn broker_child(a: BrokerArgs) -> Result<()> {
    let creds = swell_broker::Credentials::load_or_create(&a.dir)?;
    let b = swell_broker::EmbeddedBroker::start(swell_broker::BrokerConfig::new(
        "127.0.0.1:0".parse()?,
        creds,
        swell_broker::Rules::new(Topics::default().prefix(), Some(FLEET)),
    ))?;
    println!("ready {} {}", std::process::id(), b.addr().port());
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(b);
    Ok(())
}

/// A child process of the benchmark (the broker), killed on drop.
pub(super) struct BrokerProc {
    pub(super) child: std::process::Child,
    pub(super) pid: u32,
    pub(super) port: u16,
}

impl BrokerProc {
    pub(super) fn start(dir: &std::path::Path) -> Result<BrokerProc> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["bench", "broker", "--dir"])
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the broker process")?;
        let out = child.stdout.take().context("broker stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line)?;
        let mut it = line.split_whitespace().skip(1);
        let (Some(pid), Some(port)) = (
            it.next().and_then(|p| p.parse().ok()),
            it.next().and_then(|p| p.parse().ok()),
        ) else {
            let _ = child.kill();
            bail!("the broker process did not start: {line:?}");
        };
        Ok(BrokerProc { child, pid, port })
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// The coordinator of the benchmark, in its own process.
pub(super) async fn child(a: ChildArgs) -> Result<()> {
    let DemoKeys {
        coord,
        kl,
        signed_kl,
        ..
    } = demo_keys(a.seed)?;
    let state = tempfile::tempdir()?;
    let settings = Settings {
        fleet: FleetId::new(FLEET)?,
        topics: Topics::default(),
        key: coord,
        key_list: signed_kl,
        keys: kl,
        epoch: 0,
        enrollment_tokens: vec!["bench-enrollment-token".into()],
        beacon_ttl: Duration::from_secs(30),
        manifest_ttl: Duration::from_secs(3_600),
        pending_expiry: Duration::from_secs(3 * 86_400),
    };
    let cache = match a.db_cache_mib {
        None => DEFAULT_CACHE_BYTES,
        Some(m) => cache_bytes_from_mib(m).context("--db-cache-mib must be above zero")?,
    };
    let cancel = CancellationToken::new();
    let (ready_tx, mut ready_rx) = tokio::sync::watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    let credentials = match (a.username, a.password_file) {
        (Some(u), Some(f)) => Some((u, std::fs::read_to_string(f)?.trim().to_string())),
        _ => None,
    };
    let mqtt = MqttConfig {
        host: a.host,
        port: a.port,
        client_id: format!("swell-coordinator-bench-{}", std::process::id()),
        credentials,
        keep_alive: Duration::from_secs(30),
        max_packet: 256 * 1024,
        // As in production: a million-Hello burst delays the broker's PINGRESP
        // past the keep-alive, and a clean session would lose the queue on the
        // reconnect (the 1,000,000-device run stalled at 663,803 enrolled).
        persistent: true,
        tls: None,
    };
    // Devices commit after their probation *and* a fresh coordinator message
    // (INST-2): the beacon interval bounds each wave from below.
    let mut coordinator = Coordinator::new(settings, state.path().to_path_buf(), mqtt);
    coordinator.db_cache_bytes = cache;
    coordinator.loop_cfg = LoopConfig {
        tick: Duration::from_millis(200),
        beacon_interval: Duration::from_secs(1),
        verify_threads: a.verify_threads,
        batch_signatures: !a.strict_signatures,
        ..LoopConfig::default()
    };
    let hooks = Hooks {
        metrics: Some(metrics.clone()),
        ..Hooks::default()
    };
    let started = coordinator.start(None)?;
    let loop_task = tokio::spawn(started.serve(cancel.clone(), ready_tx, hooks));
    tokio::time::timeout(Duration::from_secs(30), ready_rx.wait_for(|r| *r))
        .await
        .context("coordinator could not connect")??;
    // Its own pid: a profiler wrapping it (`--wrap-coordinator`) may be the
    // parent's child instead, and its CPU is charged to this process.
    println!("ready {}", std::process::id());
    std::io::stdout().flush()?;
    // The parent closes our stdin when it is done with us.
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await?;
    let (cpu, hwm) = proc_usage("self");
    cancel.cancel();
    let _ = loop_task.await;
    let summary = json!({
        "cpu_seconds": cpu,
        "peak_rss_kib": hwm,
        "gate_to_manifest_seconds": metrics.gate_samples(),
    });
    std::fs::write(&a.summary, serde_json::to_vec(&summary)?)?;
    Ok(())
}

pub(super) struct ChildProc {
    pub(super) child: std::process::Child,
    /// The coordinator's own process (under a wrapper, not `child`).
    pub(super) pid: u32,
    pub(super) summary: PathBuf,
    pub(super) _dir: tempfile::TempDir,
}

impl ChildProc {
    pub(super) fn start(
        host: &str,
        port: u16,
        a: &FleetArgs,
        logins: &Logins,
    ) -> Result<ChildProc> {
        let dir = tempfile::tempdir()?;
        let summary = dir.path().join("summary.json");
        let exe = std::env::current_exe()?;
        let mut wrap = a
            .wrap_coordinator
            .as_deref()
            .unwrap_or("")
            .split_whitespace();
        let mut cmd = match wrap.next() {
            Some(profiler) => {
                let mut c = Command::new(profiler);
                c.args(wrap).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.args(["bench", "coordinator", "--host", host, "--port"])
            .arg(port.to_string())
            .args(["--seed", &a.seed.to_string(), "--verify-threads"])
            .arg(a.verify_threads.to_string());
        if a.strict_signatures {
            cmd.arg("--strict-signatures");
        }
        if let Some(m) = a.db_cache_mib {
            cmd.arg("--db-cache-mib").arg(m.to_string());
        }
        if let Some((user, password)) = &logins.coordinator {
            let file = dir.path().join("coordinator.password");
            std::fs::write(&file, password)?;
            cmd.args(["--username", user, "--password-file"]).arg(&file);
        }
        let mut child = cmd
            .arg("--summary")
            .arg(&summary)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the coordinator process")?;
        let out = child.stdout.take().context("child stdout")?;
        // A profiler wrapping the process may print its own lines first.
        let mut out = std::io::BufReader::new(out);
        let mut line = String::new();
        let mut pid = None;
        for _ in 0..64 {
            line.clear();
            if out.read_line(&mut line)? == 0 {
                break;
            }
            pid = line
                .trim()
                .strip_prefix("ready ")
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some() {
                break;
            }
        }
        let Some(pid) = pid else {
            let _ = child.kill();
            bail!("the coordinator process did not start");
        };
        // Whatever a profiler prints later goes on to our stderr; a closed pipe
        // would kill it before it writes its data.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::stderr()));
        Ok(ChildProc {
            child,
            pid,
            summary,
            _dir: dir,
        })
    }

    /// Closes its stdin, waits for it, reads its measurements.
    pub(super) fn finish(mut self) -> Result<Value> {
        drop(self.child.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the coordinator process failed: {status}");
        }
        Ok(serde_json::from_slice(&std::fs::read(&self.summary)?)?)
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
