//! Hands the artifact to an external updater — RAUC, SWUpdate, Mender, or a
//! script — with templated commands run without a shell. Placeholders, each a
//! whole argument or part of one: `{artifact}` (path of the first verified
//! blob), `{config}` (path of the verified config blob, or empty), `{release}`
//! (hex id), `{version}`, `{previous}` (hex id or empty). The same values are in
//! the environment as `SWELL_ARTIFACT`, `SWELL_CONFIG`, `SWELL_RELEASE`,
//! `SWELL_VERSION`, `SWELL_PREVIOUS`.

use super::{InstallError, Installer, Prepared, run};
use std::time::Duration;

/// The command backend.
#[derive(Debug, Clone)]
pub struct CommandInstaller {
    pub install: Vec<String>,
    pub activate: Vec<String>,
    pub commit: Vec<String>,
    pub rollback: Vec<String>,
    pub timeout: Duration,
}

fn values(p: &Prepared) -> Vec<(&'static str, String)> {
    let path =
        |o: Option<&std::path::PathBuf>| o.map(|p| p.display().to_string()).unwrap_or_default();
    vec![
        (
            "artifact",
            path(p.artifacts.first().and_then(|a| a.path.as_ref())),
        ),
        ("config", path(p.config.as_ref().map(|c| &c.2))),
        ("release", hex::encode(p.release.0)),
        ("version", p.version.clone()),
        (
            "previous",
            p.previous.map(|r| hex::encode(r.0)).unwrap_or_default(),
        ),
    ]
}

/// Substitutes placeholders in each argument (no shell: a value can never
/// become a second argument or a command).
pub fn expand(argv: &[String], p: &Prepared) -> Vec<String> {
    let vals = values(p);
    argv.iter()
        .map(|a| {
            vals.iter()
                .fold(a.clone(), |acc, (k, v)| acc.replace(&format!("{{{k}}}"), v))
        })
        .collect()
}

fn env(p: &Prepared) -> Vec<(&'static str, String)> {
    values(p)
        .into_iter()
        .map(|(k, v)| {
            let name = match k {
                "artifact" => "SWELL_ARTIFACT",
                "config" => "SWELL_CONFIG",
                "release" => "SWELL_RELEASE",
                "version" => "SWELL_VERSION",
                _ => "SWELL_PREVIOUS",
            };
            (name, v)
        })
        .collect()
}

impl Installer for CommandInstaller {
    fn install(&self, p: &Prepared) -> Result<(), InstallError> {
        if p.artifacts.first().and_then(|a| a.path.as_ref()).is_none() {
            return Err(InstallError::step(
                "install",
                "the command backend installs files",
            ));
        }
        run("install", &expand(&self.install, p), &env(p), self.timeout)?;
        run(
            "activate",
            &expand(&self.activate, p),
            &env(p),
            self.timeout,
        )
    }

    fn commit(&self, p: &Prepared) -> Result<(), InstallError> {
        run("commit", &expand(&self.commit, p), &env(p), self.timeout)
    }

    fn rollback(&self, p: &Prepared) -> Result<(), InstallError> {
        run(
            "rollback",
            &expand(&self.rollback, p),
            &env(p),
            self.timeout,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::install::PreparedArtifact;
    use swell_protocol::messages::ArtifactKind;
    use swell_protocol::{Digest, ReleaseId};

    fn prepared() -> Prepared {
        Prepared {
            release: ReleaseId([0xab; 32]),
            version: "2.0; rm -rf /".into(),
            artifacts: vec![PreparedArtifact {
                kind: ArtifactKind::Bundle,
                digest: Digest([0; 32]),
                length: 0,
                path: Some("/blobs/x".into()),
                image: None,
            }],
            config: None,
            previous: None,
        }
    }

    #[test]
    fn command_expand_keeps_values_inside_their_argument() {
        let argv: Vec<String> = ["tool", "--file={artifact}", "{version}", "{previous}"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let out = expand(&argv, &prepared());
        assert_eq!(out, ["tool", "--file=/blobs/x", "2.0; rm -rf /", ""]);
    }

    #[test]
    fn command_exit_codes_and_timeouts_become_errors() {
        let c = CommandInstaller {
            install: vec!["sh".into(), "-c".into(), "echo boom >&2; exit 3".into()],
            activate: vec![],
            commit: vec!["true".into()],
            rollback: vec!["sleep".into(), "5".into()],
            timeout: Duration::from_millis(300),
        };
        let e = c.install(&prepared()).unwrap_err().to_string();
        assert!(e.contains("exit status: 3") && e.contains("boom"), "{e}");
        c.commit(&prepared()).unwrap();
        assert!(
            c.rollback(&prepared())
                .unwrap_err()
                .to_string()
                .contains("timed out")
        );
    }
}
