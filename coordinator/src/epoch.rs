//! The coordinator's epoch (ROLL-4): the epoch file, raised at every start
//! and written atomically and durably (`swell_durable`), and the epoch of a
//! leader in a Kubernetes lease term.

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

/// The epoch a leader in term `transitions` signs with. Terms dominate (a new
/// leader always signs above every earlier one); the local counter orders
/// restarts inside a term. 2^20 restarts per term before it would wrap.
pub fn of_term(transitions: u32, local: u64) -> u64 {
    (u64::from(transitions) << 20) | (local & 0xF_FFFF)
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
    fn epochs_of_later_terms_are_always_higher() {
        assert!(of_term(2, 0) > of_term(1, 0xF_FFFF));
        assert!(of_term(1, 5) > of_term(1, 4));
        assert_eq!(of_term(0, 7), 7);
    }

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
