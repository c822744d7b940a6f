//! `swell fleet`, `swell fleet devices`, `swell device approve`: the
//! inventory, one device per row, and approving a device that waits.

use crate::conn::{Conn, code, connect, runtime, show, timeout};
use crate::ops_client::answer;
use anyhow::Result;
use clap::Args;
use serde_json::json;
use std::process::ExitCode;
use swell_coordinator::fleet::registry::Enrollment;
use swell_coordinator::status::{DeviceList, FleetSummary};

/// `swell fleet`: the inventory.
pub fn fleet(c: Conn) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut ops = connect(&c).await?;
        let reply = ops.command(json!({"op": "fleet"}), timeout(&c)?).await?;
        if c.output().structured() || !reply.ok {
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
        if !s.desired.is_empty() {
            println!("desired state (completed rollouts whose manifest stands):");
            for d in &s.desired {
                let scope = if d.selector.is_empty() {
                    "whole fleet"
                } else {
                    d.selector.as_str()
                };
                println!(
                    "  {:<16} {:<12} {scope}: running {}, joined after completion {}",
                    d.rollout,
                    &d.release[..d.release.len().min(12)],
                    d.running,
                    d.joined_after_completion
                );
            }
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
    /// Only devices pending approval (`-o json` shows the key each is
    /// pending with, which `swell device approve --key` takes).
    #[arg(long)]
    pending: bool,
    /// At most this many rows.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
}

impl DeviceFilter {
    /// Every device pending approval (`swell device pending`).
    pub fn pending(limit: usize) -> Self {
        DeviceFilter {
            selector: None,
            release: None,
            online: false,
            offline: false,
            pending: true,
            limit,
        }
    }
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
                       "online": online, "limit": f.limit,
                       "enrollment": f.pending.then_some("pending")}),
                timeout(&c)?,
            )
            .await?;
        if c.output().structured() || !reply.ok {
            return show(&c, &reply).map(code);
        }
        let list: DeviceList = answer(&reply)?;
        println!(
            "{:<24} {:<9} {:<7} {:<14} {:<10} LABELS",
            "DEVICE", "ENROLLED", "ONLINE", "RUNNING", "TAKEOVERS"
        );
        for d in &list.devices {
            let run = d.running.as_deref().map_or("-", |r| &r[..r.len().min(12)]);
            println!(
                "{:<24} {:<9} {:<7} {:<14} {:<10} {}",
                d.device,
                match d.enrollment {
                    Enrollment::Approved => "approved",
                    Enrollment::Pending => "pending",
                },
                if d.online { "yes" } else { "no" },
                run,
                d.takeovers,
                d.labels.join(",")
            );
        }
        let taken: Vec<&str> = list
            .devices
            .iter()
            .filter(|d| d.takeovers > 0)
            .map(|d| d.device.as_str())
            .collect();
        if !taken.is_empty() {
            println!(
                "another client keeps taking the connection of {} over: two agents with one device id, or a copy of one's state",
                taken.join(", ")
            );
        }
        let (shown, matched) = (list.devices.len(), list.matched);
        if matched > shown {
            println!("({shown} of {matched} shown; raise --limit)");
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `swell device reject`.
pub fn reject(
    device: Option<String>,
    key: Option<String>,
    pending: bool,
    c: Conn,
) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut ops = connect(&c).await?;
        let mut cmd = json!({"op": "reject"});
        if let Some(d) = device {
            cmd["device"] = json!(d);
        }
        if let Some(k) = key {
            cmd["key"] = json!(k);
        }
        if pending {
            cmd["pending"] = json!(true);
        }
        let reply = ops.command(cmd, timeout(&c)?).await?;
        show(&c, &reply).map(code)
    })
}

/// `swell device approve`.
pub fn approve(device: String, key: Option<String>, c: Conn) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut ops = connect(&c).await?;
        let mut cmd = json!({"op": "approve", "device": device});
        if let Some(k) = key {
            cmd["key"] = json!(k);
        }
        let reply = ops.command(cmd, timeout(&c)?).await?;
        show(&c, &reply).map(code)
    })
}
