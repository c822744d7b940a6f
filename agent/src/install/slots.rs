//! A/B slot directories: `{dir}/a`, `{dir}/b` and a `{dir}/current` symlink to
//! the active one. An install rewrites the inactive slot from the verified blobs
//! (hashing again while copying: INST-1), then switches `current` atomically
//! (new link, rename over the old, fsync of the directory). The previous slot is
//! kept untouched, so a rollback is one more switch. Each slot records the
//! release it holds in `{slot}/release`; files are `artifact-{i}` and `config`,
//! never names from a message (DL-4).

use super::{InstallError, Installer, Prepared};
use sha2::{Digest as _, Sha256};
use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use swell_protocol::{Digest, ReleaseId};
use tracing::{info, warn};

const SLOTS: [&str; 2] = ["a", "b"];

/// The slots backend.
#[derive(Debug)]
pub struct Slots {
    dir: PathBuf,
    run: Vec<String>,
    child: Mutex<Option<Child>>,
}

fn fsync_dir(p: &Path) -> std::io::Result<()> {
    fs::File::open(p)?.sync_all()
}

impl Slots {
    pub fn new(dir: PathBuf, run: Vec<String>) -> Result<Slots, InstallError> {
        swell_durable::private_dir(&dir)?;
        Ok(Slots {
            dir,
            run,
            child: Mutex::new(None),
        })
    }

    /// The active slot's name (`a` or `b`), if any.
    pub fn active(&self) -> Option<&'static str> {
        let target = fs::read_link(self.dir.join("current")).ok()?;
        SLOTS.into_iter().find(|s| target == Path::new(s))
    }

    /// The release a slot holds.
    pub fn holds(&self, slot: &str) -> Option<ReleaseId> {
        let text = fs::read_to_string(self.dir.join(slot).join("release")).ok()?;
        let b: [u8; 32] = hex::decode(text.trim()).ok()?.try_into().ok()?;
        Some(ReleaseId(b))
    }

    /// The release the active slot holds.
    pub fn current(&self) -> Option<ReleaseId> {
        self.active().and_then(|s| self.holds(s))
    }

    fn switch(&self, to: Option<&str>) -> Result<(), InstallError> {
        let link = self.dir.join("current");
        match to {
            Some(slot) => {
                let tmp = self.dir.join("current.tmp");
                let _ = fs::remove_file(&tmp);
                std::os::unix::fs::symlink(slot, &tmp)?;
                fs::rename(&tmp, &link)?;
            }
            None => match fs::remove_file(&link) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            },
        }
        fsync_dir(&self.dir)?;
        info!(slot = to.unwrap_or("none"), "active slot switched");
        Ok(())
    }

    /// Copies `from` to `to` while hashing; refuses bytes that differ from the
    /// digest verified at download time.
    fn copy_verified(
        from: &Path,
        to: &Path,
        digest: &Digest,
        length: u64,
    ) -> Result<(), InstallError> {
        let mut src = fs::File::open(from)?;
        let mut dst = fs::File::create(to)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut n_total = 0u64;
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            dst.write_all(&buf[..n])?;
            n_total += n as u64;
        }
        if n_total != length || h.finalize().as_slice() != digest.0 {
            return Err(InstallError::step(
                "install",
                "blob changed after verification",
            ));
        }
        dst.sync_all()?;
        Ok(())
    }

    fn stop_process(&self) {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut c) = guard.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.kill_orphan();
        let _ = fs::remove_file(self.dir.join("run.pid"));
    }

    /// A process left by an agent that was killed (SIGKILL leaves children
    /// running): stopped if its working directory is one of our slots.
    fn kill_orphan(&self) {
        let Ok(pid) = fs::read_to_string(self.dir.join("run.pid")) else {
            return;
        };
        let Ok(pid) = pid.trim().parse::<u32>() else {
            return;
        };
        let ours = fs::read_link(format!("/proc/{pid}/cwd"))
            .is_ok_and(|cwd| SLOTS.iter().any(|s| cwd == self.dir.join(s)));
        if ours {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    }

    fn start_process(&self) -> Result<(), InstallError> {
        self.stop_process();
        let (Some(slot), Some((prog, args))) = (self.active(), self.run.split_first()) else {
            return Ok(());
        };
        let cwd = self.dir.join(slot);
        let prog_path = if prog.contains('/') || cwd.join(prog).exists() {
            cwd.join(prog)
        } else {
            PathBuf::from(prog)
        };
        let child = Command::new(&prog_path)
            .args(args)
            .current_dir(&cwd)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| InstallError::step("start", format!("{}: {e}", prog_path.display())))?;
        info!(pid = child.id(), slot, "supervised process started");
        swell_durable::write_atomic(
            &self.dir.join("run.pid"),
            child.id().to_string().as_bytes(),
            0o600,
        )?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        Ok(())
    }
}

impl Installer for Slots {
    fn install(&self, p: &Prepared) -> Result<(), InstallError> {
        if self.current() == Some(p.release) {
            // Switched already (crash after the switch, before the journal).
            if self.supervised_alive() != Some(true) {
                self.start_process()?;
            }
            return Ok(());
        }
        let target = match self.active() {
            Some("a") => "b",
            _ => "a",
        };
        let dir = self.dir.join(target);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        for (i, a) in p.artifacts.iter().enumerate() {
            let src = a.path.as_ref().ok_or_else(|| {
                InstallError::step("install", "the slots backend installs files, not images")
            })?;
            let dst = dir.join(format!("artifact-{i}"));
            Self::copy_verified(src, &dst, &a.digest, a.length)?;
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))?;
        }
        if let Some((d, len, path)) = &p.config {
            Self::copy_verified(path, &dir.join("config"), d, *len)?;
        }
        swell_durable::write_atomic(
            &dir.join("release"),
            hex::encode(p.release.0).as_bytes(),
            0o644,
        )?;
        fsync_dir(&dir)?;
        self.switch(Some(target))?;
        self.start_process()
    }

    fn commit(&self, p: &Prepared) -> Result<(), InstallError> {
        if self.current() != Some(p.release) {
            return Err(InstallError::step(
                "commit",
                "the active slot holds another release",
            ));
        }
        Ok(())
    }

    fn rollback(&self, p: &Prepared) -> Result<(), InstallError> {
        let Some(prev) = p.previous else {
            // Nothing ran before: deactivate.
            self.stop_process();
            return self.switch(None);
        };
        if self.current() == Some(prev) {
            if self.supervised_alive() != Some(true) {
                self.start_process()?;
            }
            return Ok(());
        }
        let Some(slot) = SLOTS.into_iter().find(|s| self.holds(s) == Some(prev)) else {
            return Err(InstallError::step(
                "rollback",
                "no slot holds the previous release",
            ));
        };
        self.switch(Some(slot))?;
        self.start_process()
    }

    fn start(&self) -> Result<(), InstallError> {
        let _ = fs::remove_file(self.dir.join("current.tmp"));
        self.start_process()
    }

    fn supervised_alive(&self) -> Option<bool> {
        if self.run.is_empty() {
            return None;
        }
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        Some(match guard.as_mut() {
            Some(c) => match c.try_wait() {
                Ok(None) => true,
                Ok(Some(status)) => {
                    warn!(%status, "supervised process exited");
                    false
                }
                Err(_) => false,
            },
            None => false,
        })
    }

    fn stop(&self) {
        self.stop_process();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::install::PreparedArtifact;
    use swell_protocol::messages::ArtifactKind;

    fn prepared(dir: &Path, content: &[u8], id: u8, previous: Option<ReleaseId>) -> Prepared {
        let blob = dir.join(format!("blob-{id}"));
        fs::write(&blob, content).unwrap();
        Prepared {
            release: ReleaseId([id; 32]),
            version: format!("{id}.0"),
            artifacts: vec![PreparedArtifact {
                kind: ArtifactKind::Bundle,
                digest: Digest::sha256(content),
                length: content.len() as u64,
                path: Some(blob),
                image: None,
            }],
            config: None,
            previous,
        }
    }

    #[test]
    fn slots_install_switch_rollback_and_idempotence() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Slots::new(tmp.path().join("slots"), vec![]).unwrap();
        let v1 = prepared(tmp.path(), b"one", 1, None);
        s.install(&v1).unwrap();
        assert_eq!(s.current(), Some(v1.release));
        s.commit(&v1).unwrap();
        let v2 = prepared(tmp.path(), b"two", 2, Some(v1.release));
        s.install(&v2).unwrap();
        s.install(&v2).unwrap(); // again, as after a crash: no change
        assert_eq!(s.current(), Some(v2.release));
        assert_eq!(
            fs::read(tmp.path().join("slots/current/artifact-0")).unwrap(),
            b"two"
        );
        s.rollback(&v2).unwrap();
        s.rollback(&v2).unwrap();
        assert_eq!(s.current(), Some(v1.release));
        assert_eq!(
            fs::read(tmp.path().join("slots/current/artifact-0")).unwrap(),
            b"one"
        );
        assert!(s.commit(&v2).is_err(), "cannot commit what is not active");
    }

    #[test]
    fn slots_refuse_a_blob_changed_after_verification() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Slots::new(tmp.path().join("slots"), vec![]).unwrap();
        let v1 = prepared(tmp.path(), b"one", 1, None);
        fs::write(v1.artifacts[0].path.as_ref().unwrap(), b"evil").unwrap();
        assert!(s.install(&v1).is_err());
        assert_eq!(s.current(), None, "nothing activated");
    }
}
