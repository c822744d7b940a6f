//! Installer backends behind one trait. Every method is idempotent: after a
//! crash the state machine simply calls it again ([`crate::deployment::recover`]).
//!
//! - [`slots`]: A/B directories, an atomic switch of a `current` link, the
//!   previous slot kept, an optional supervised process run from the active slot.
//! - [`command`]: templated install/activate/commit/rollback commands, with
//!   presets for RAUC, SWUpdate and Mender.
//! - [`container`]: docker/podman/nerdctl CLI — pull by digest, start the new
//!   container, stop the old one; rollback restarts the old one.

pub mod command;
pub mod container;
pub mod slots;

use crate::config::BackendConfig;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use swell_protocol::messages::{ArtifactKind, Reason, reason};
use swell_protocol::{Digest, ReleaseId};

/// Why an installer step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{step}: {message}")]
    Step { step: &'static str, message: String },
}

impl InstallError {
    pub fn step(step: &'static str, message: impl Into<String>) -> Self {
        InstallError::Step {
            step,
            message: message.into(),
        }
    }

    /// The reason reported for this failure.
    pub fn reason(&self) -> Reason {
        let mut detail = self.to_string();
        detail.retain(|c| (' '..='~').contains(&c));
        detail.truncate(64);
        Reason {
            code: reason::INSTALL_FAILED,
            detail,
        }
    }
}

/// One artifact, ready for an installer: verified on disk (files) or named by
/// digest (container images).
#[derive(Debug, Clone)]
pub struct PreparedArtifact {
    pub kind: ArtifactKind,
    pub digest: Digest,
    pub length: u64,
    /// The verified blob (not for containers).
    pub path: Option<PathBuf>,
    /// For containers: the image repository (first URL of the artifact).
    pub image: Option<String>,
}

/// A release ready to install.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub release: ReleaseId,
    pub version: String,
    pub artifacts: Vec<PreparedArtifact>,
    /// The verified configuration blob, if the release has one.
    pub config: Option<(Digest, u64, PathBuf)>,
    /// What ran before: the rollback target.
    pub previous: Option<ReleaseId>,
}

/// An installer backend.
pub trait Installer: Send + Sync + std::fmt::Debug {
    /// Installs and activates `p` (idempotent; an interrupted install is redone).
    fn install(&self, p: &Prepared) -> Result<(), InstallError>;
    /// Makes `p` permanent after a healthy probation.
    fn commit(&self, p: &Prepared) -> Result<(), InstallError>;
    /// Returns to `p.previous` (or to nothing, if nothing ran before).
    fn rollback(&self, p: &Prepared) -> Result<(), InstallError>;
    /// At agent start: bring up what is active (the supervised process).
    fn start(&self) -> Result<(), InstallError> {
        Ok(())
    }
    /// Whether the supervised process runs; `None` when there is none.
    fn supervised_alive(&self) -> Option<bool> {
        None
    }
    /// At agent stop.
    fn stop(&self) {}
}

/// Builds the configured backend.
pub fn build(cfg: &BackendConfig) -> Result<Box<dyn Installer>, InstallError> {
    Ok(match cfg {
        BackendConfig::Slots { dir, run } => Box::new(slots::Slots::new(dir.clone(), run.clone())?),
        BackendConfig::Command {
            install,
            activate,
            commit,
            rollback,
            timeout,
        } => Box::new(command::CommandInstaller {
            install: install.clone(),
            activate: activate.clone(),
            commit: commit.clone(),
            rollback: rollback.clone(),
            timeout: *timeout,
        }),
        BackendConfig::Container {
            cli,
            name,
            run_args,
            timeout,
        } => Box::new(container::Container {
            cli: cli.clone(),
            name: name.clone(),
            run_args: run_args.clone(),
            timeout: *timeout,
        }),
    })
}

/// Runs `argv` without a shell, with `env`, killing it after `timeout`. Output
/// tails go into the error.
pub(crate) fn run(
    step: &'static str,
    argv: &[String],
    env: &[(&str, String)],
    timeout: Duration,
) -> Result<(), InstallError> {
    let Some((prog, args)) = argv.split_first() else {
        return Ok(());
    };
    let mut child = Command::new(prog)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| InstallError::step(step, format!("{prog}: {e}")))?;
    let until = Instant::now() + timeout;
    let status = loop {
        match child.try_wait()? {
            Some(s) => break s,
            None if Instant::now() >= until => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(InstallError::step(
                    step,
                    format!("{prog} timed out after {timeout:?}"),
                ));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read as _;
        let _ = e.read_to_string(&mut err);
    }
    let tail: String = err.lines().last().unwrap_or("").chars().take(40).collect();
    Err(InstallError::step(
        step,
        format!("{prog} exited {status}: {tail}"),
    ))
}
