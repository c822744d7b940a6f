//! [`DiskStore`]: rollouts and decision logs in sled, device and report
//! records in the journal of files (`journal`, `files`), folded in the
//! background; see the module doc of `store`.

use super::files::{self, Appender};
use super::journal::{self, FoldLimits, Leave, Pending, Target};
use super::{DecisionEntry, Loaded, RolloutRecord, Store, StoreError, StoredReport};
use crate::fleet::registry::DeviceRecord;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use swell_protocol::{DeviceId, KeyId, RolloutId};

/// The implementation: sled for rollouts, the journal's files for device
/// and report records. Clones share one database, one journal and one fold
/// thread.
#[derive(Debug, Clone)]
pub struct DiskStore {
    inner: Arc<Inner>,
    folder: Arc<FoldThread>,
}

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    rollouts: sled::Tree,
    /// Device and report records that did not decode, set aside by `load`.
    corrupt: sled::Tree,
    /// The journal's segments and snapshot ([`journal`]).
    dir: PathBuf,
    journal: Mutex<Journal>,
    /// Segments below this number are closed: the fold thread may take them.
    active_segment: AtomicU64,
    fold_lock: Mutex<()>,
    /// Folds the background thread has finished, announced on `folded_cv`.
    folds_done: Mutex<u64>,
    folded_cv: Condvar,
    tuning: Tuning,
}

/// Records not flushed yet, and the segment a flush appends them to.
#[derive(Debug)]
struct Journal {
    pending: Pending,
    segment: Appender,
}

impl Journal {
    /// Writes the pending records out as one entry (not synced yet).
    fn write_pending(&mut self) -> Result<(), StoreError> {
        if let Some((entry, records)) = self.pending.take() {
            self.segment.write(&entry, records)?;
        }
        Ok(())
    }
}

/// sled's page cache unless configured. sled holds only rollouts and their
/// decision logs now (device and report records are in the journal's files),
/// so this bounds little; it is kept small because sled's real use is a
/// multiple of it.
pub const DEFAULT_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// Records after which a journal segment is closed and folded into the
/// snapshot in the background. A fold rewrites the whole snapshot (about
/// 200 MB at a million devices, streamed), so the larger, the fewer
/// rewrites; the journal's size on disk and the time a start takes to fold
/// it grow with it.
pub const FOLD_AFTER_RECORDS: u64 = 1 << 20;

/// Records a fold holds in memory at once (about 150 bytes each).
pub const FOLD_PART_RECORDS: usize = 1 << 16;

/// How the store uses memory and when it folds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// sled's page cache (sled's own estimate of node sizes; the memory it
    /// takes is larger).
    pub cache_bytes: u64,
    pub fold_after_records: u64,
    pub fold_part_records: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            cache_bytes: DEFAULT_CACHE_BYTES,
            fold_after_records: FOLD_AFTER_RECORDS,
            fold_part_records: FOLD_PART_RECORDS,
        }
    }
}

/// A page cache size given in MiB, in bytes; `None` for 0 or too large.
pub fn cache_bytes_from_mib(mib: u64) -> Option<u64> {
    mib.checked_mul(1024 * 1024).filter(|b| *b > 0)
}

/// The background fold: woken when enough records are journalled, stopped
/// and joined when the last clone of the store goes, so the database is
/// closed (and its lock released) when the store is dropped.
#[derive(Debug)]
struct FoldThread {
    wake: Mutex<Option<std::sync::mpsc::SyncSender<()>>>,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
    inner: Arc<Inner>,
}

impl Drop for FoldThread {
    fn drop(&mut self) {
        lock(&self.wake).take();
        if let Some(h) = lock(&self.handle).take() {
            let _ = h.join();
        }
        // What the engine wrote but did not flush still reaches the journal.
        if let Err(e) = self
            .inner
            .append_pending()
            .and_then(|_| Ok(self.inner.db.flush()?))
        {
            tracing::warn!(error = %e, "store not flushed on close");
        }
    }
}

/// How long an open waits for the database's file lock. sled's flush jobs hold
/// the lock a moment after the last handle in this process is dropped, so a
/// reopen right after a drop (a restarted engine, a test) found it taken.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn open_sled(dir: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(500))
            .open()
        {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                return Err(StoreError::Io(std::io::Error::new(
                    e.kind(),
                    format!(
                        "{} is in use by another process (its file lock was not released within {} s): {e}",
                        dir.display(),
                        LOCK_WAIT.as_secs()
                    ),
                )));
            }
            other => return Ok(other?),
        }
    }
}

/// A poisoned lock only means another thread panicked while holding it; the
/// data behind these locks stays consistent (appends and folds are whole).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DiskStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_tuned(dir, Tuning::default())
    }

    /// Opens with a page cache of `cache_bytes`.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        Self::open_tuned(
            dir,
            Tuning {
                cache_bytes,
                ..Tuning::default()
            },
        )
    }

    pub fn open_tuned(dir: &Path, tuning: Tuning) -> Result<Self, StoreError> {
        let db = open_sled(dir, tuning.cache_bytes)?;
        let records = dir.join(RECORDS_DIR);
        std::fs::create_dir_all(&records)?;
        // A fold that died before its rename leaves a partial snapshot.
        match std::fs::remove_file(records.join("snapshot.tmp")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let existing = files::segments(&records)?;
        let next = existing.last().map_or(1, |s| s.saturating_add(1));
        if let Some(&newest) = existing.last() {
            if let Some(at) = files::cut_torn_tail(&files::segment_path(&records, newest))? {
                tracing::warn!(
                    segment = newest,
                    offset = at,
                    "journal segment ended inside an entry (a write cut short); cut there"
                );
            }
            // Its number is not reused: `next` stays above it.
            if files::remove_if_empty(&records, newest)? {
                tracing::debug!(
                    segment = newest,
                    "empty journal segment of the last run removed"
                );
            }
        }
        let inner = Arc::new(Inner {
            rollouts: db.open_tree("rollouts")?,
            corrupt: db.open_tree("records.corrupt")?,
            journal: Mutex::new(Journal {
                pending: Pending::default(),
                segment: Appender::create(&records, next)?,
            }),
            active_segment: AtomicU64::new(next),
            dir: records,
            db,
            fold_lock: Mutex::new(()),
            folds_done: Mutex::new(0),
            folded_cv: Condvar::new(),
            tuning,
        });
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let bg = inner.clone();
        let handle = std::thread::Builder::new()
            .name("swell-store-fold".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    match bg.fold(Leave::default()) {
                        Ok(f) => tracing::debug!(
                            records = f.records,
                            written = f.written,
                            kept = f.kept,
                            parts = f.parts,
                            "journal folded"
                        ),
                        // The segments stay; the next fold or start retries.
                        Err(e) => tracing::warn!(error = %e, "journal fold failed"),
                    }
                    *lock(&bg.folds_done) += 1;
                    bg.folded_cv.notify_all();
                }
            })
            .map_err(StoreError::FoldThread)?;
        Ok(DiskStore {
            folder: Arc::new(FoldThread {
                wake: Mutex::new(Some(tx)),
                handle: Mutex::new(Some(handle)),
                inner: inner.clone(),
            }),
            inner,
        })
    }

    /// Folds the whole journal now (as a start does).
    #[cfg(test)]
    fn fold_journal(&self) -> Result<journal::Folded, StoreError> {
        let _g = lock(&self.inner.fold_lock);
        self.inner.rotate()?;
        self.inner.fold_held(Leave::default())
    }

    /// Journal segment files, the one being appended to included.
    #[cfg(test)]
    fn segment_files(&self) -> usize {
        files::segments(&self.inner.dir).map_or(0, |s| s.len())
    }

    /// Waits, woken by each background fold, until `done` holds or `timeout`
    /// passes; returns whether it holds.
    #[cfg(test)]
    fn wait_for_folds(&self, timeout: std::time::Duration, done: impl Fn(&Self) -> bool) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut folds = lock(&self.inner.folds_done);
        while !done(self) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            folds = self
                .inner
                .folded_cv
                .wait_timeout(folds, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    fn wake_folder(&self) {
        if let Some(tx) = lock(&self.folder.wake).as_ref() {
            // Full means a fold is already due.
            let _ = tx.try_send(());
        }
    }
}

/// Pending records are written out (not yet synced) at this size.
const ENTRY_BYTES: usize = 1 << 20;

/// The journal's directory inside the database's.
const RECORDS_DIR: &str = "records";

impl Inner {
    /// Appends the records written since the last call as one entry of the
    /// current segment, synced. Returns whether the segment is full and was
    /// closed, so a fold is due.
    fn append_pending(&self) -> Result<bool, StoreError> {
        let mut j = lock(&self.journal);
        j.write_pending()?;
        // Entries written out early by `push` are synced here too.
        j.segment.sync()?;
        if j.segment.records >= self.tuning.fold_after_records {
            self.rotate_held(&mut j)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Closes the current segment, unless it holds no records, so a fold
    /// takes everything written so far; the next segment is opened.
    fn rotate(&self) -> Result<(), StoreError> {
        let mut j = lock(&self.journal);
        j.write_pending()?;
        if j.segment.records == 0 {
            return Ok(());
        }
        self.rotate_held(&mut j)
    }

    fn rotate_held(&self, j: &mut Journal) -> Result<(), StoreError> {
        j.segment.sync()?;
        let next = j.segment.seq.saturating_add(1);
        j.segment = Appender::create(&self.dir, next)?;
        self.active_segment.store(next, AtomicOrdering::Release);
        Ok(())
    }

    fn push(&self, target: Target, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut j = lock(&self.journal);
        j.pending.push(target, key, value)?;
        // Thousands of records between two flushes (a rollout deleted over
        // a million devices writes each member's floor) go out in entries
        // of bounded size; the flush still syncs them all before any ack.
        if j.pending.bytes() >= ENTRY_BYTES {
            j.write_pending()?;
        }
        Ok(())
    }

    fn fold(&self, leave: Leave) -> Result<journal::Folded, StoreError> {
        let _g = lock(&self.fold_lock);
        self.fold_held(leave)
    }

    /// Folds the closed segments, if there are any or `leave` names
    /// something; for a caller that holds the fold lock.
    fn fold_held(&self, leave: Leave) -> Result<journal::Folded, StoreError> {
        self.fold_closed(leave, false)
    }

    /// With `rewrite`, the snapshot is written anew even when there is
    /// nothing to fold (to leave damaged blocks behind).
    fn fold_closed(&self, leave: Leave, rewrite: bool) -> Result<journal::Folded, StoreError> {
        let active = self.active_segment.load(AtomicOrdering::Acquire);
        let closed: Vec<u64> = files::segments(&self.dir)?
            .into_iter()
            .filter(|s| *s < active)
            .collect();
        if closed.is_empty() && leave.is_empty() && !rewrite {
            return Ok(journal::Folded::default());
        }
        journal::fold(
            &self.dir,
            &closed,
            leave,
            FoldLimits {
                part_records: self.tuning.fold_part_records,
            },
        )
    }
}

fn json<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Encode {
        what,
        reason: e.to_string(),
    })
}

fn post<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(v).map_err(|e| StoreError::Encode {
        what,
        reason: e.to_string(),
    })
}

fn quarantine(tree: &sled::Tree, key: &[u8], corrupt: &mut Vec<String>) -> Result<(), StoreError> {
    let name = String::from_utf8_lossy(key).into_owned();
    if let Some(v) = tree.remove(key)? {
        let mut aside = b"corrupt/".to_vec();
        aside.extend_from_slice(key);
        tree.insert(aside, v)?;
    }
    corrupt.push(name);
    Ok(())
}

fn report_key(rollout: &RolloutId, device: &DeviceId) -> String {
    format!("{rollout}/{device}")
}

impl Store for DiskStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        let s = &self.inner;
        let _g = lock(&s.fold_lock);
        s.rotate()?;
        let mut out = Loaded {
            corrupt: s.fold_held(Leave::default())?.corrupt,
            ..Loaded::default()
        };
        let mut bad: Vec<(sled::Tree, Vec<u8>)> = Vec::new();
        for kv in s.rollouts.scan_prefix(b"r/") {
            let (k, v) = kv?;
            match serde_json::from_slice::<RolloutRecord>(&v) {
                Ok(r) => out.rollouts.push(r),
                Err(_) => bad.push((s.rollouts.clone(), k.to_vec())),
            }
        }
        // Records that do not decode go to the `records.corrupt` tree and
        // out of the snapshot, so the next start is clean (STATE-3).
        let mut leave = Leave::default();
        let mut aside = sled::Batch::default();
        let damaged = journal::read_snapshot(&s.dir, |target, key, value| {
            let ok = match target {
                // A tombstone the fold kept (it drops them): nothing.
                Target::Devices if value.is_empty() => true,
                Target::Devices => DeviceRecord::decode(value)
                    .map(|d| out.devices.push(d))
                    .is_ok(),
                Target::Reports => std::str::from_utf8(key)
                    .ok()
                    .and_then(|s| s.split_once('/'))
                    .and_then(|(r, d)| {
                        Some((
                            RolloutId::new(r).ok()?,
                            DeviceId::new(d).ok()?,
                            StoredReport::decode(value)?,
                        ))
                    })
                    .map(|t| out.reports.push(t))
                    .is_some(),
            };
            if !ok {
                let tree = match target {
                    Target::Devices => "devices/",
                    Target::Reports => "reports/",
                };
                let mut name = tree.as_bytes().to_vec();
                name.extend_from_slice(key);
                aside.insert(name, value);
                leave.keys.insert(journal::sort_key(target, key));
                out.corrupt.push(String::from_utf8_lossy(key).into_owned());
            }
        })?;
        // The next start is clean: a rewrite leaves damaged blocks and
        // undecodable records behind.
        if !leave.keys.is_empty() || !damaged.is_empty() {
            s.corrupt.apply_batch(aside)?;
            s.db.flush()?;
            s.fold_closed(leave, true)?;
        }
        out.corrupt.extend(damaged);
        for kv in s.rollouts.scan_prefix(b"o/") {
            let (k, v) = kv?;
            let key = std::str::from_utf8(&k[2..])
                .ok()
                .and_then(|h| KeyId::from_hex(h).ok());
            match (key, <[u8; 8]>::try_from(&v[..])) {
                (Some(key), Ok(at)) => out.operator_marks.push((key, u64::from_be_bytes(at))),
                _ => bad.push((s.rollouts.clone(), k.to_vec())),
            }
        }
        for (tree, key) in bad {
            quarantine(&tree, &key, &mut out.corrupt)?;
        }
        Ok(out)
    }

    fn commit_rollout(
        &self,
        rec: &RolloutRecord,
        entry: Option<&DecisionEntry>,
    ) -> Result<(), StoreError> {
        // The reports a transition was computed from are durable with it.
        if self.inner.append_pending()? {
            self.wake_folder();
        }
        let mut batch = sled::Batch::default();
        let id = rec.spec.id.as_str();
        if let Some(e) = entry {
            let n = rec.decisions.saturating_sub(1);
            batch.insert(format!("d/{id}/{n:016x}").as_bytes(), json("decision", e)?);
        }
        batch.insert(format!("r/{id}").as_bytes(), json("rollout", rec)?);
        self.inner.rollouts.apply_batch(batch)?;
        self.inner.db.flush()?;
        Ok(())
    }

    fn decisions(&self, rollout: &RolloutId) -> Result<Vec<DecisionEntry>, StoreError> {
        let mut out = Vec::new();
        for kv in self
            .inner
            .rollouts
            .scan_prefix(format!("d/{rollout}/").as_bytes())
        {
            let (k, v) = kv?;
            out.push(serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }

    fn put_device(&self, rec: &DeviceRecord) -> Result<(), StoreError> {
        self.inner.push(
            Target::Devices,
            rec.id.as_str().as_bytes(),
            &post("device", rec)?,
        )
    }

    /// An empty value is the device's tombstone: the next fold drops the
    /// key (a record is never empty).
    fn remove_device(&self, id: &DeviceId) -> Result<(), StoreError> {
        self.inner
            .push(Target::Devices, id.as_str().as_bytes(), &[])
    }

    fn put_report(
        &self,
        rollout: &RolloutId,
        device: &DeviceId,
        report: &StoredReport,
    ) -> Result<(), StoreError> {
        self.inner.push(
            Target::Reports,
            report_key(rollout, device).as_bytes(),
            &post("report", report)?,
        )
    }

    fn delete_rollout(&self, rollout: &RolloutId) -> Result<(), StoreError> {
        let s = &self.inner;
        // The reports go first, from the journal and the snapshot alike, so
        // nothing of the rollout can come back once its record is gone.
        let _g = lock(&s.fold_lock);
        s.rotate()?;
        s.fold_held(Leave {
            prefix: Some(journal::sort_key(
                Target::Reports,
                format!("{rollout}/").as_bytes(),
            )),
            ..Leave::default()
        })?;
        let mut batch = sled::Batch::default();
        batch.remove(format!("r/{rollout}").as_bytes());
        for kv in s.rollouts.scan_prefix(format!("d/{rollout}/").as_bytes()) {
            batch.remove(kv?.0);
        }
        s.rollouts.apply_batch(batch)?;
        s.db.flush()?;
        Ok(())
    }

    fn put_operator_mark(&self, key: KeyId, issued_at: u64) -> Result<(), StoreError> {
        let s = &self.inner;
        let name = format!("o/{key}");
        let before = s
            .rollouts
            .get(name.as_bytes())?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok().map(u64::from_be_bytes));
        if before.is_none_or(|b| b < issued_at) {
            s.rollouts
                .insert(name.as_bytes(), &issued_at.to_be_bytes())?;
            s.db.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        if self.inner.append_pending()? {
            self.wake_folder();
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
