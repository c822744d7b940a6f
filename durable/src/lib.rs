//! Files that must change atomically and durably (STATE-2): written to a
//! temporary file beside them, synced, renamed over the old one, and the
//! directory synced. When [`write_atomic`] returns, the new content survives a
//! power cut; a power cut during the call leaves the old content. One
//! implementation for the agent (trust file, key list, status, slots) and the
//! coordinator (epoch file, journal segments, snapshot).

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes` atomically and durably, with file mode `mode`
/// (for a new file; the temporary file is `{path}.tmp`).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    rename_durably(&tmp, path)
}

/// Renames `from` (already synced) over `to` and makes the rename durable.
pub fn rename_durably(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::rename(from, to)?;
    let dir = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    sync_dir(dir)
}

/// Makes file creations, renames and removals in `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and parents) readable only by its owner.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn durable_write_replaces_whole_files_with_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.bin");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // The temporary file is beside the file, named after all of it: a
        // file with another extension never shares it.
        assert!(!dir.path().join("state.bin.tmp").exists());
        write_atomic(&dir.path().join("state.json"), b"x", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
    }

    #[test]
    fn durable_private_dir_is_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b");
        private_dir(&d).unwrap();
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
