//! The workers: a started [`Task`] runs off the agent's loop (downloads and
//! probes as async tasks, installer calls on blocking threads) and its result
//! comes back on a channel, for the job it was started for.

use crate::deployment::Job;
use crate::device::{JobKey, Task, Work};
use crate::download::Blobs;
use crate::install::{Installer, Prepared, PreparedArtifact};
use crate::probe;
use std::sync::Arc;
use swell_protocol::messages::{ArtifactKind, Reason, Release, reason};
use tokio::sync::mpsc;
use tracing::{Span, warn};

/// What a worker needs.
pub struct Context {
    pub for_job: Option<JobKey>,
    pub prepared: Prepared,
    pub release: Option<Release>,
    pub blobs: Blobs,
    pub http: reqwest::Client,
    pub limits: crate::config::DownloadConfig,
    pub probes: Vec<crate::config::ProbeConfig>,
    pub installer: Arc<dyn Installer>,
    pub tx: mpsc::Sender<(Option<JobKey>, Work)>,
}

/// What the installer gets for `job`: its artifacts by digest-addressed path
/// (containers by image URL), its config, and what ran before.
pub fn prepared(job: &Job, release: Option<&Release>, blobs: &Blobs) -> Prepared {
    let Some(r) = release else {
        return Prepared {
            release: job.release,
            version: String::new(),
            artifacts: Vec::new(),
            config: None,
            previous: job.previous,
        };
    };
    Prepared {
        release: job.release,
        version: r.version.clone(),
        artifacts: r
            .artifacts
            .iter()
            .map(|a| PreparedArtifact {
                kind: a.kind,
                digest: a.digest,
                length: a.length,
                path: (a.kind != ArtifactKind::Container).then(|| blobs.path(&a.digest)),
                image: (a.kind == ArtifactKind::Container)
                    .then(|| a.urls.first().cloned())
                    .flatten(),
            })
            .collect(),
        config: r
            .config
            .as_ref()
            .map(|c| (c.digest, c.length, blobs.path(&c.digest))),
        previous: job.previous,
    }
}

/// Starts `task`; its result arrives on `cx.tx`.
pub fn spawn(task: Task, cx: Context, span: Span) {
    let Context {
        for_job,
        prepared: prep,
        release,
        blobs,
        http,
        limits,
        probes,
        installer,
        tx,
    } = cx;
    match task {
        Task::Download => {
            tokio::spawn(async move {
                let r: Result<(), Reason> = async {
                    let Some(release) = release else {
                        return Ok(());
                    };
                    for a in release
                        .artifacts
                        .iter()
                        .filter(|a| a.kind != ArtifactKind::Container)
                    {
                        blobs
                            .fetch(&http, &a.digest, a.length, &a.urls, &limits)
                            .await
                            .map_err(|e| e.reason())?;
                    }
                    if let Some(c) = &release.config {
                        blobs
                            .fetch(&http, &c.digest, c.length, &c.urls, &limits)
                            .await
                            .map_err(|e| e.reason())?;
                    }
                    Ok(())
                }
                .await;
                if let Err(e) = &r {
                    warn!(parent: &span, reason = reason::name(e.code), detail = %e.detail, "download failed");
                }
                let _ = tx.send((for_job, Work::Downloaded(r))).await;
            });
        }
        Task::Install => {
            tokio::task::spawn_blocking(move || {
                let _e = span.entered();
                // INST-1: the installer gets bytes verified right now on the same path.
                let verified = prep.artifacts.iter().all(|a| {
                    a.path.is_none() || blobs.verify(&a.digest, a.length).unwrap_or(false)
                }) && prep
                    .config
                    .as_ref()
                    .is_none_or(|c| blobs.verify(&c.0, c.1).unwrap_or(false));
                let r = if verified {
                    installer.install(&prep).map_err(|e| e.reason())
                } else {
                    Err(Reason {
                        code: reason::DIGEST_MISMATCH,
                        detail: "blob changed after download".into(),
                    })
                };
                let _ = tx.blocking_send((for_job, Work::Installed(r)));
            });
        }
        Task::RollBack => {
            tokio::task::spawn_blocking(move || {
                let _e = span.entered();
                let r = installer.rollback(&prep).map_err(|e| e.reason());
                let _ = tx.blocking_send((for_job, Work::RolledBack(r)));
            });
        }
        Task::Commit => {
            tokio::task::spawn_blocking(move || {
                let _e = span.entered();
                let r = installer.commit(&prep).map_err(|e| e.reason());
                let _ = tx.blocking_send((for_job, Work::Committed(r)));
            });
        }
        Task::Probe => {
            tokio::spawn(async move {
                let round = probe::run_all(&probes, &http, installer.as_ref()).await;
                let _ = tx
                    .send((
                        for_job,
                        Work::Probed {
                            results: round.results,
                            failure: round.failure,
                        },
                    ))
                    .await;
            });
        }
    }
}
