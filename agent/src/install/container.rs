//! Containers through the docker/podman/nerdctl CLI. The artifact's digest is
//! the image manifest digest and its first URL names the repository
//! (`https://registry.example/team/app` → `registry.example/team/app`), so the
//! image is pulled as `{repository}@sha256:{digest}` — by content, never by tag. Each
//! release runs as `{name}-{first 12 hex of the release id}`; the previous
//! release's container is stopped, not removed, so a rollback restarts it.

use super::{InstallError, Installer, Prepared, run};
use std::time::Duration;
use swell_protocol::ReleaseId;
use swell_protocol::messages::ArtifactKind;

/// The container backend.
#[derive(Debug, Clone)]
pub struct Container {
    pub cli: String,
    pub name: String,
    pub run_args: Vec<String>,
    pub timeout: Duration,
}

/// A repository name safe to hand to the CLI: registry/path characters only, and
/// never something that starts like an option.
pub fn valid_repository(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 255
        && !r.starts_with(['-', '.', '/', ':'])
        && r.chars()
            .all(|c| c.is_ascii_alphanumeric() || "./:_-".contains(c))
}

impl Container {
    fn container(&self, r: &ReleaseId) -> String {
        format!("{}-{}", self.name, &hex::encode(r.0)[..12])
    }

    fn cmd(&self, args: &[&str]) -> Vec<String> {
        std::iter::once(self.cli.as_str())
            .chain(args.iter().copied())
            .map(str::to_string)
            .collect()
    }

    fn image(p: &Prepared) -> Result<String, InstallError> {
        let a = p
            .artifacts
            .iter()
            .find(|a| a.kind == ArtifactKind::Container)
            .ok_or_else(|| InstallError::step("install", "release has no container artifact"))?;
        let repo = a
            .image
            .as_deref()
            .map(|u| {
                u.strip_prefix("https://")
                    .or_else(|| u.strip_prefix("http://"))
                    .unwrap_or(u)
                    .trim_end_matches('/')
            })
            .filter(|r| valid_repository(r))
            .ok_or_else(|| {
                InstallError::step("install", "container artifact needs a valid repository URL")
            })?;
        Ok(format!("{repo}@sha256:{}", hex::encode(a.digest.0)))
    }
}

impl Installer for Container {
    fn install(&self, p: &Prepared) -> Result<(), InstallError> {
        let image = Self::image(p)?;
        let new = self.container(&p.release);
        run("pull", &self.cmd(&["pull", &image]), &[], self.timeout)?;
        // Idempotent: a half-created container from an interrupted install goes.
        let _ = run("remove", &self.cmd(&["rm", "-f", &new]), &[], self.timeout);
        if let Some(prev) = &p.previous {
            let _ = run(
                "stop",
                &self.cmd(&["stop", &self.container(prev)]),
                &[],
                self.timeout,
            );
        }
        let mut argv = self.cmd(&["run", "-d", "--name", &new]);
        argv.extend(self.run_args.iter().cloned());
        argv.push(image);
        run("run", &argv, &[], self.timeout)
    }

    fn commit(&self, _p: &Prepared) -> Result<(), InstallError> {
        Ok(())
    }

    fn rollback(&self, p: &Prepared) -> Result<(), InstallError> {
        let new = self.container(&p.release);
        let _ = run("remove", &self.cmd(&["rm", "-f", &new]), &[], self.timeout);
        match &p.previous {
            Some(prev) => run(
                "start",
                &self.cmd(&["start", &self.container(prev)]),
                &[],
                self.timeout,
            ),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_repository_names_cannot_become_options() {
        assert!(valid_repository("registry.example:5000/team/app"));
        for bad in [
            "",
            "-v",
            "--privileged",
            "app name",
            "app;rm",
            "/abs",
            "a\nb",
        ] {
            assert!(!valid_repository(bad), "{bad:?}");
        }
    }
}
