//! `swell rollout …` and `swell events`: rollout commands over the MQTT ops
//! topics, each showing the coordinator's reply (a refused command prints one
//! line and exits 1), the live watch, and the event stream.

use crate::conn::{Conn, Output, code, connect, runtime, show, timeout};
use crate::ops_client::{OpsClient, answer};
use anyhow::{Context as _, Result};
use clap::Subcommand;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use swell_coordinator::status::RolloutStatus;

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

pub(crate) fn print_status(s: &RolloutStatus) {
    println!(
        "{}  phase {}{}  wave {}  members {}{}",
        s.rollout,
        s.phase,
        if s.finished { " (final)" } else { "" },
        s.wave,
        s.members,
        s.waiting
            .as_deref()
            .map(|w| format!("  waiting: {w}"))
            .unwrap_or_default()
    );
    for w in &s.waves {
        println!(
            "  {:<7} devices {:>6} healthy {:>6} failed {:>6} installing {:>6} silent {:>6}{}{}",
            w.label,
            w.population,
            w.healthy,
            w.failed,
            w.in_progress,
            w.silent,
            crate::view::others(w),
            if w.opened { "" } else { "  (not open)" }
        );
    }
    let e = s.breach_evidence;
    if !s.finished && e.reported < e.min_sample {
        println!(
            "  breach check: {} of the {} reports it needs (min_breach_sample)",
            e.reported, e.min_sample
        );
    }
    if let Some(r) = &s.halt_reason {
        println!("  stopped: {r}");
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
            RolloutCmd::List if reply.ok && c.output() == Output::Table => {
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
pub(crate) fn end_code(phase: &str) -> Option<u8> {
    match phase {
        "completed" => Some(0),
        "rolled_back" | "aborted" => Some(1),
        "paused" => Some(2),
        _ => None,
    }
}

/// `swell rollout watch`: redraws the live view on every status change (in
/// place on a terminal, appended otherwise) with the latest events.
pub(crate) async fn watch(
    ops: &mut OpsClient,
    id: &str,
    limit: Duration,
    c: &Conn,
) -> Result<ExitCode> {
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
        let view = match c.output() {
            Output::Json => format!("{}\n", serde_json::to_string(&s).unwrap_or_default()),
            Output::Yaml => format!("---\n{}", serde_yaml_ng::to_string(&s).unwrap_or_default()),
            Output::Table => format!(
                "{}{}\n",
                crate::view::watch_view(&s),
                events.into_iter().rev().collect::<Vec<_>>().join("\n")
            ),
        };
        if view != shown {
            if tty && c.output() == Output::Table {
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
pub(crate) async fn wait_for_end(
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
                if c.output() == Output::Table {
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

/// `swell events`: follows the event stream until interrupted (or `--count`).
pub fn events(count: Option<usize>, c: Conn) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut ops = connect(&c).await?;
        let mut seen = 0;
        loop {
            while seen < ops.events.len() {
                let e = &ops.events[seen];
                match c.output() {
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
