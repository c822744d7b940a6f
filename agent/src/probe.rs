//! Health probes run through probation: a command's exit code, an HTTP 2xx, the
//! supervised process being alive. All run on each tick; the first failure is
//! the reason for the rollback.

use crate::config::ProbeConfig;
use crate::install::Installer;
use std::time::Duration;
use swell_protocol::messages::{ProbeResult, Reason, reason};

/// The outcome of one round of probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    pub results: Vec<ProbeResult>,
    pub failure: Option<Reason>,
}

fn fail(i: usize, what: String) -> Reason {
    let mut detail = format!("probe {i}: {what}");
    detail.retain(|c| (' '..='~').contains(&c));
    detail.truncate(64);
    Reason {
        code: reason::PROBE_FAILED,
        detail,
    }
}

async fn command(argv: &[String], timeout: Duration) -> Result<(), String> {
    let (prog, args) = argv.split_first().ok_or("empty command")?;
    let child = tokio::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{prog}: {e}"))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => Err(format!("{prog} timed out")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(format!("{prog} exited {}", out.status)),
    }
}

async fn http(client: &reqwest::Client, url: &str, timeout: Duration) -> Result<(), String> {
    let resp = tokio::time::timeout(timeout, client.get(url).send())
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", resp.status().as_u16()))
    }
}

/// Runs every probe once.
pub async fn run_all(
    probes: &[ProbeConfig],
    client: &reqwest::Client,
    installer: &dyn Installer,
) -> Round {
    let mut results = Vec::with_capacity(probes.len());
    let mut failure = None;
    for (i, p) in probes.iter().enumerate() {
        let r = match p {
            ProbeConfig::Command { argv, timeout } => command(argv, *timeout).await,
            ProbeConfig::Http { url, timeout } => http(client, url, *timeout).await,
            ProbeConfig::Process => match installer.supervised_alive() {
                Some(true) => Ok(()),
                _ => Err("supervised process is not running".into()),
            },
        };
        if let Err(e) = &r
            && failure.is_none()
        {
            failure = Some(fail(i, e.clone()));
        }
        results.push(ProbeResult {
            index: u8::try_from(i).unwrap_or(u8::MAX),
            ok: r.is_ok(),
        });
    }
    Round { results, failure }
}
