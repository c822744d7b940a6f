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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::install::{InstallError, Prepared};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[derive(Debug)]
    struct NoProcess;
    impl Installer for NoProcess {
        fn install(&self, _: &Prepared) -> Result<(), InstallError> {
            Ok(())
        }
        fn commit(&self, _: &Prepared) -> Result<(), InstallError> {
            Ok(())
        }
        fn rollback(&self, _: &Prepared) -> Result<(), InstallError> {
            Ok(())
        }
    }

    /// Answers `/ok` with 200 and anything else with 503.
    async fn health_server() -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /ok ");
                let status = if ok {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        port
    }

    #[tokio::test]
    async fn probe_http_command_and_process_results() {
        let port = health_server().await;
        let t = Duration::from_secs(2);
        let probes = vec![
            ProbeConfig::Http {
                url: format!("http://127.0.0.1:{port}/ok"),
                timeout: t,
            },
            ProbeConfig::Command {
                argv: vec!["true".into()],
                timeout: t,
            },
        ];
        let client = reqwest::Client::new();
        let r = run_all(&probes, &client, &NoProcess).await;
        assert_eq!(r.failure, None);
        assert!(r.results.iter().all(|p| p.ok));

        let probes = vec![
            ProbeConfig::Command {
                argv: vec!["true".into()],
                timeout: t,
            },
            ProbeConfig::Http {
                url: format!("http://127.0.0.1:{port}/sick"),
                timeout: t,
            },
            ProbeConfig::Command {
                argv: vec!["sleep".into(), "5".into()],
                timeout: Duration::from_millis(200),
            },
            ProbeConfig::Process,
        ];
        let r = run_all(&probes, &client, &NoProcess).await;
        let f = r.failure.unwrap();
        assert_eq!(f.code, reason::PROBE_FAILED);
        assert!(
            f.detail.contains("probe 1") && f.detail.contains("503"),
            "{}",
            f.detail
        );
        assert_eq!(
            r.results.iter().map(|p| p.ok).collect::<Vec<_>>(),
            [true, false, false, false]
        );
    }
}
