//! The workspace's binaries as processes: found next to the test executable
//! (built by `cargo test --workspace`), built on demand otherwise.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;

static BUILD: Once = Once::new();

/// Path of a workspace binary (`swell`, `swell-coordinator`, `swell-agent`).
pub fn bin(name: &str) -> PathBuf {
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().and_then(|d| d.parent()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("target/debug"));
    let path = dir.join(name);
    BUILD.call_once(|| {
        if ["swell", "swell-coordinator", "swell-agent"]
            .iter()
            .any(|b| !dir.join(b).is_file())
        {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let _ = Command::new(cargo)
                .args([
                    "build",
                    "-p",
                    "swell",
                    "-p",
                    "swell-coordinator",
                    "-p",
                    "swell-agent",
                ])
                .status();
        }
    });
    path
}

/// A child process killed (SIGKILL) when dropped, its output in a log file.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> std::io::Result<Proc> {
        let f = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone()?))
            .stderr(Stdio::from(f))
            .spawn()?;
        Ok(Proc { child, log })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first so agents stop their supervised programs, then SIGKILL.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
