//! The epoch file: the coordinator's epoch (ROLL-4), raised at every start and
//! written atomically and durably (`swell_durable`).

use std::fs;
use std::path::Path;

/// Reads the epoch file (`swell-epoch <n> <n>`: the number twice, so a damaged
/// file is detected), increments it, stores it durably and returns the new epoch.
pub fn next(path: &Path) -> std::io::Result<u64> {
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
    swell_durable::write_atomic(
        path,
        format!("swell-epoch {next} {next}\n").as_bytes(),
        0o644,
    )?;
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
        assert_eq!(next(&p).unwrap(), 1);
        assert_eq!(next(&p).unwrap(), 2);
        fs::write(&p, "swell-epoch 7 8\n").unwrap();
        assert!(next(&p).is_err());
        fs::write(&p, "garbage").unwrap();
        assert!(next(&p).is_err());
    }
}
