//! The agent's sled store: the install journal and the report outbox. What must
//! never go backwards lives in the trust file instead ([`crate::trust`]); this
//! store can be rebuilt: a corrupt one is quarantined and started afresh
//! (STATE-3), and the agent reports `store_rebuilt`.
//!
//! - `journal`: the current [`Job`], written and flushed before its actions run.
//! - `outbox`: signed reports waiting for the broker's PUBACK, in order, keyed by
//!   a big-endian sequence. Bounded: when full, the oldest heartbeat goes first,
//!   then the oldest report; a persisted counter says how many were dropped.

use crate::deployment::Job;
use std::path::{Path, PathBuf};

/// Most reports kept while offline.
pub const DEFAULT_OUTBOX_CAP: usize = 4_096;

const JOB_KEY: &[u8] = b"job";
const DROPPED_KEY: &[u8] = b"dropped";

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("agent store: {0}")]
    Db(#[from] sled::Error),
    #[error("agent store: cannot set aside corrupt store {path}: {source}")]
    Quarantine {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent store: cannot encode {0}")]
    Encode(String),
}

/// One queued report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub key: u64,
    pub heartbeat: bool,
    pub bytes: Vec<u8>,
}

/// The store.
#[derive(Debug, Clone)]
pub struct AgentStore {
    db: sled::Db,
    journal: sled::Tree,
    outbox: sled::Tree,
    cap: usize,
}

impl AgentStore {
    /// Opens `dir`; a store that cannot be opened is moved aside and recreated.
    /// Returns the store and whether it was rebuilt.
    pub fn open(dir: &Path, cap: usize) -> Result<(AgentStore, bool), StoreError> {
        // An I/O error (the lock held by a process still exiting, a full disk) is
        // not corruption: retry briefly, then fail rather than discard the
        // journal. Only a store sled cannot read is set aside.
        let mut attempt = 0;
        let first = loop {
            match Self::open_inner(dir, cap) {
                Err(StoreError::Db(sled::Error::Io(e))) if attempt < 20 => {
                    attempt += 1;
                    if attempt == 20 {
                        return Err(StoreError::Db(sled::Error::Io(e)));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                other => break other,
            }
        };
        match first {
            Ok(s) => Ok((s, false)),
            Err(StoreError::Db(sled::Error::Io(e))) => Err(StoreError::Db(sled::Error::Io(e))),
            Err(_) if dir.exists() => {
                let mut aside = dir.as_os_str().to_owned();
                aside.push(format!(".corrupt-{}", std::process::id()));
                let aside = PathBuf::from(aside);
                std::fs::rename(dir, &aside).map_err(|source| StoreError::Quarantine {
                    path: dir.to_path_buf(),
                    source,
                })?;
                Ok((Self::open_inner(dir, cap)?, true))
            }
            Err(e) => Err(e),
        }
    }

    fn open_inner(dir: &Path, cap: usize) -> Result<AgentStore, StoreError> {
        // Small caches: a device may have 64 MiB of RAM.
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(1024 * 1024)
            .open()?;
        Ok(AgentStore {
            journal: db.open_tree("journal")?,
            outbox: db.open_tree("outbox")?,
            db,
            cap: cap.max(1),
        })
    }

    /// Journals `job` durably (before its actions are carried out).
    pub fn save_job(&self, job: &Job) -> Result<(), StoreError> {
        let bytes = postcard::to_allocvec(job).map_err(|e| StoreError::Encode(e.to_string()))?;
        self.journal.insert(JOB_KEY, bytes)?;
        self.journal.flush()?;
        Ok(())
    }

    /// The journaled job; an undecodable one counts as none (rebuilt state).
    pub fn load_job(&self) -> Result<Option<Job>, StoreError> {
        Ok(self
            .journal
            .get(JOB_KEY)?
            .and_then(|b| postcard::from_bytes(&b).ok()))
    }

    /// Stores a small record (what runs, the release of the current job, the
    /// boot counter) durably.
    pub fn put<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = postcard::to_allocvec(value).map_err(|e| StoreError::Encode(e.to_string()))?;
        self.journal.insert(format!("meta/{key}"), bytes)?;
        self.journal.flush()?;
        Ok(())
    }

    /// A record stored with [`AgentStore::put`]; an undecodable one counts as none.
    pub fn get<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        Ok(self
            .journal
            .get(format!("meta/{key}"))?
            .and_then(|b| postcard::from_bytes(&b).ok()))
    }

    /// Queues a signed report durably; evicts when full. Returns the key.
    pub fn push(&self, bytes: &[u8], heartbeat: bool) -> Result<u64, StoreError> {
        while self.outbox.len() >= self.cap {
            let victim = self
                .outbox
                .iter()
                .filter_map(Result::ok)
                .find(|(_, v)| v.first() == Some(&1))
                .or_else(|| self.outbox.first().ok().flatten())
                .map(|(k, _)| k);
            match victim {
                Some(k) => {
                    self.outbox.remove(k)?;
                    let dropped = self.dropped()? + 1;
                    self.journal.insert(DROPPED_KEY, &dropped.to_be_bytes())?;
                }
                None => break,
            }
        }
        let key = self.db.generate_id()?;
        let mut v = Vec::with_capacity(bytes.len() + 1);
        v.push(u8::from(heartbeat));
        v.extend_from_slice(bytes);
        self.outbox.insert(key.to_be_bytes(), v)?;
        self.db.flush()?;
        Ok(key)
    }

    /// Up to `n` queued reports, oldest first.
    pub fn peek(&self, n: usize) -> Result<Vec<Queued>, StoreError> {
        let mut out = Vec::new();
        for kv in self.outbox.iter().take(n) {
            let (k, v) = kv?;
            let mut key = [0u8; 8];
            if k.len() != 8 || v.is_empty() {
                continue;
            }
            key.copy_from_slice(&k);
            out.push(Queued {
                key: u64::from_be_bytes(key),
                heartbeat: v[0] == 1,
                bytes: v[1..].to_vec(),
            });
        }
        Ok(out)
    }

    /// Removes a report the broker acknowledged.
    pub fn ack(&self, key: u64) -> Result<(), StoreError> {
        self.outbox.remove(key.to_be_bytes())?;
        Ok(())
    }

    pub fn queued(&self) -> usize {
        self.outbox.len()
    }

    /// Reports dropped because the outbox was full.
    pub fn dropped(&self) -> Result<u64, StoreError> {
        Ok(self
            .journal
            .get(DROPPED_KEY)?
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map_or(0, u64::from_be_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swell_protocol::{ReleaseId, RolloutId};

    #[test]
    fn store_journal_and_outbox_survive_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let (s, rebuilt) = AgentStore::open(&path, 10).unwrap();
            assert!(!rebuilt);
            let (job, _) = Job::start(RolloutId::new("r").unwrap(), ReleaseId([1; 32]), 3, 0, None);
            s.save_job(&job).unwrap();
            for i in 0..5u8 {
                s.push(&[i], false).unwrap();
            }
        }
        let (s, _) = AgentStore::open(&path, 10).unwrap();
        assert_eq!(s.load_job().unwrap().unwrap().counter, 3);
        let q = s.peek(10).unwrap();
        assert_eq!(
            q.iter().map(|e| e.bytes[0]).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
        s.ack(q[0].key).unwrap();
        s.ack(q[1].key).unwrap();
        assert_eq!(s.peek(10).unwrap()[0].bytes, vec![2]);
    }

    #[test]
    fn store_outbox_evicts_heartbeats_first_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = AgentStore::open(&dir.path().join("db"), 4).unwrap();
        s.push(b"report-1", false).unwrap();
        s.push(b"beat-1", true).unwrap();
        s.push(b"report-2", false).unwrap();
        s.push(b"beat-2", true).unwrap();
        s.push(b"report-3", false).unwrap(); // evicts beat-1
        s.push(b"report-4", false).unwrap(); // evicts beat-2
        let left: Vec<Vec<u8>> = s.peek(10).unwrap().into_iter().map(|q| q.bytes).collect();
        assert_eq!(
            left,
            vec![
                b"report-1".to_vec(),
                b"report-2".to_vec(),
                b"report-3".to_vec(),
                b"report-4".to_vec()
            ]
        );
        s.push(b"report-5", false).unwrap(); // no heartbeat left: the oldest report goes
        assert_eq!(s.peek(1).unwrap()[0].bytes, b"report-2".to_vec());
        assert_eq!(s.dropped().unwrap(), 3);
        assert_eq!(s.queued(), 4);
    }

    #[test]
    fn store_corrupt_store_is_quarantined_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::create_dir_all(&path).unwrap();
        // Not a sled database: garbage where its files go.
        std::fs::write(path.join("conf"), b"\xff\xfe garbage").unwrap();
        std::fs::write(path.join("db"), vec![0xAB; 4096]).unwrap();
        let (s, rebuilt) = AgentStore::open(&path, 4).unwrap();
        assert!(rebuilt);
        assert_eq!(s.load_job().unwrap(), None);
        s.push(b"x", false).unwrap();
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().contains(".corrupt-"));
        assert!(aside, "the corrupt store was kept aside for inspection");
    }
}
