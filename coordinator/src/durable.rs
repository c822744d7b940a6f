//! Small files that must change atomically and durably: temp file, fsync,
//! rename, fsync of the directory (STATE-2). Used for the coordinator epoch.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::Path;

/// Replaces `path` with `bytes`; after a crash the file holds the old or the new
/// content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
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

/// Reads the epoch file (`swell-epoch <n> <n>`: the number twice, so a damaged
/// file is detected), increments it, stores it durably and returns the new epoch.
pub fn next_epoch(path: &Path) -> std::io::Result<u64> {
    let current = match fs::read_to_string(path) {
        Ok(text) => parse_epoch(&text).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is damaged: {text:?}", path.display()),
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let next = current + 1;
    write_atomic(path, format!("swell-epoch {next} {next}\n").as_bytes())?;
    Ok(next)
}

fn parse_epoch(text: &str) -> Option<u64> {
    let mut it = text.split_whitespace();
    if it.next()? != "swell-epoch" {
        return None;
    }
    let a: u64 = it.next()?.parse().ok()?;
    let b: u64 = it.next()?.parse().ok()?;
    (a == b && it.next().is_none()).then_some(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_epoch_increments_and_detects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("epoch");
        assert_eq!(next_epoch(&p).unwrap(), 1);
        assert_eq!(next_epoch(&p).unwrap(), 2);
        fs::write(&p, "swell-epoch 7 8\n").unwrap();
        assert!(next_epoch(&p).is_err());
        fs::write(&p, "garbage").unwrap();
        assert!(next_epoch(&p).is_err());
    }
}
