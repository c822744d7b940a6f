//! The store against real files: round trips, reopening, folds in the
//! background and at start, crashes cut short, damaged entries set aside.

use super::*;
use crate::rollout::spec::{BreachPolicy, GateSpec};
use crate::rollout::state::{Command, Decision, RolloutState};
use crate::rollout::state_tests::spec;
use std::collections::BTreeMap;
use swell_protocol::ReleaseId;
use swell_protocol::cohort::PPM_FULL;
use swell_protocol::messages::Phase;

fn record() -> RolloutRecord {
    RolloutRecord {
        spec: spec(0, &[PPM_FULL], GateSpec::default(), BreachPolicy::Pause),
        state: RolloutState::new(),
        manifest_seq: 0,
        decisions: 0,
        created_at: 1,
        outcome: None,
        superseded_by: None,
    }
}

#[test]
fn deleting_a_rollout_removes_its_record_decisions_and_reports_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    let mut rec = record();
    rec.decisions = 1;
    let entry = DecisionEntry {
        at: 5,
        epoch: 1,
        before: RolloutState::new(),
        observations: None,
        command: Some(Command::Abort),
        decisions: vec![],
        after: rec.state.clone(),
    };
    s.commit_rollout(&rec, Some(&entry)).unwrap();
    let mut other = record();
    other.spec.id = RolloutId::new("other").unwrap();
    s.commit_rollout(&other, None).unwrap();
    let report = StoredReport {
        release: rec.spec.release_id(),
        phase: swell_protocol::messages::Phase::Committed,
        seq: 1,
        epoch: 1,
    };
    let dev = DeviceId::new("dev-1").unwrap();
    s.put_report(&rec.spec.id, &dev, &report).unwrap();
    s.put_report(&other.spec.id, &dev, &report).unwrap();
    s.delete_rollout(&rec.spec.id).unwrap();
    let loaded = s.load().unwrap();
    assert_eq!(loaded.rollouts.len(), 1);
    assert_eq!(loaded.rollouts[0].spec.id, other.spec.id);
    assert_eq!(loaded.reports.len(), 1);
    assert_eq!(loaded.reports[0].0, other.spec.id);
    assert!(s.decisions(&rec.spec.id).unwrap().is_empty());
}

#[test]
fn store_round_trips_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut rec = record();
    {
        let s = DiskStore::open(dir.path()).unwrap();
        s.commit_rollout(&rec, None).unwrap();
        rec.decisions = 1;
        rec.state.retry = 1;
        let entry = DecisionEntry {
            at: 5,
            epoch: 1,
            before: RolloutState::new(),
            observations: None,
            command: Some(Command::Retry),
            decisions: vec![Decision::Retry { retry: 1 }],
            after: rec.state.clone(),
        };
        s.commit_rollout(&rec, Some(&entry)).unwrap();
        s.put_report(
            &rec.spec.id,
            &DeviceId::new("d1").unwrap(),
            &StoredReport {
                release: ReleaseId([1; 32]),
                phase: Phase::Committed,
                seq: 1,
                epoch: 1,
            },
        )
        .unwrap();
        s.flush().unwrap();
    }
    let s = DiskStore::open(dir.path()).unwrap();
    let loaded = s.load().unwrap();
    assert_eq!(loaded.rollouts, vec![rec.clone()]);
    assert_eq!(loaded.reports.len(), 1);
    assert_eq!(s.decisions(&rec.spec.id).unwrap().len(), 1);
    assert!(loaded.corrupt.is_empty());
}

#[test]
fn store_corrupt_records_are_set_aside_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    s.commit_rollout(&record(), None).unwrap();
    s.inner
        .rollouts
        .insert(b"r/broken", b"{not json".to_vec())
        .unwrap();
    s.inner.push(Target::Devices, b"d9", b"\xff\xff").unwrap();
    s.put_device(&DeviceRecord::for_tests("d1")).unwrap();
    s.flush().unwrap();
    let loaded = s.load().unwrap();
    assert_eq!(loaded.rollouts.len(), 1);
    assert_eq!(loaded.devices.len(), 1);
    assert_eq!(loaded.corrupt.len(), 2);
    // Set aside, so the next start is clean.
    let again = s.load().unwrap();
    assert!(again.corrupt.is_empty());
    assert_eq!(again.devices.len(), 1);
    assert!(s.inner.rollouts.get(b"corrupt/r/broken").unwrap().is_some());
    assert_eq!(
        s.inner.corrupt.get(b"devices/d9").unwrap().as_deref(),
        Some(&b"\xff\xff"[..])
    );
}

fn report(seq: u64) -> StoredReport {
    StoredReport {
        release: ReleaseId([seq as u8; 32]),
        phase: Phase::Installing,
        seq,
        epoch: 1,
    }
}

/// The `seq` of each device's stored report, by device.
fn seqs(loaded: &Loaded) -> BTreeMap<String, u64> {
    loaded
        .reports
        .iter()
        .map(|(_, d, r)| (d.as_str().to_string(), r.seq))
        .collect()
}

fn snapshot_records(s: &DiskStore) -> usize {
    let mut n = 0;
    journal::read_snapshot(&s.inner.dir, |_, _, _| n += 1).unwrap();
    n
}

fn reopen(dir: &Path, tuning: Tuning) -> DiskStore {
    DiskStore::open_tuned(dir, tuning).unwrap()
}

// A reopen right after a drop waits for sled's flush jobs to let go of the
// file lock (a one-in-fifteen failure of the suite before); a second open
// while the first is alive says the database is in use.
#[test]
fn store_reopens_at_once_and_refuses_a_second_owner() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..20 {
        let s = DiskStore::open(dir.path()).unwrap();
        s.flush().unwrap();
    }
    let held = DiskStore::open(dir.path()).unwrap();
    let second = DiskStore::open(dir.path()).unwrap_err().to_string();
    assert!(second.contains("in use by another process"), "{second}");
    drop(held);
}

#[test]
fn journal_folds_in_the_background_in_key_range_parts_and_a_start_folds_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let tuning = Tuning {
        cache_bytes: DEFAULT_CACHE_BYTES,
        fold_after_records: 500,
        fold_part_records: 128,
    };
    let rollout = RolloutId::new("r").unwrap();
    let mut want = BTreeMap::new();
    {
        let s = DiskStore::open_tuned(dir.path(), tuning).unwrap();
        // 300 devices, each reporting four times, spread over 60 flushes.
        for round in 0..4u64 {
            for chunk in 0..15u64 {
                for n in 0..20u64 {
                    let d = (n * 15 + chunk) * 7919 % 300;
                    let dev = DeviceId::new(format!("dev-{d:04}")).unwrap();
                    let seq = round * 1000 + chunk * 20 + n + 1;
                    s.put_report(&rollout, &dev, &report(seq)).unwrap();
                    want.insert(dev.as_str().to_string(), seq);
                }
                s.flush().unwrap();
            }
        }
        // 1,200 records against a threshold of 500: the folder ran, in
        // parts of about 128 records, and emptied what it saw.
        s.wait_for_folds(std::time::Duration::from_secs(20), |s| {
            s.segment_files() == 1
        });
        assert_eq!(s.segment_files(), 1, "the background fold ran");
        assert_eq!(snapshot_records(&s), 300);
        // Newer reports stay in the journal: no flush, no fold.
        let dev = DeviceId::new("dev-0007").unwrap();
        s.put_report(&rollout, &dev, &report(99_999)).unwrap();
        want.insert("dev-0007".into(), 99_999);
    }
    let s = reopen(dir.path(), tuning);
    let loaded = s.load().unwrap();
    assert_eq!(seqs(&loaded), want);
    assert!(loaded.corrupt.is_empty());
    assert_eq!(s.segment_files(), 1, "only the new, empty one");
}

#[test]
fn a_start_with_nothing_new_to_fold_keeps_the_snapshot() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let tuning = Tuning::default();
    let rollout = RolloutId::new("r").unwrap();
    let snapshot_inode = |s: &DiskStore| {
        std::fs::metadata(s.inner.dir.join("snapshot"))
            .unwrap()
            .ino()
    };
    let first = {
        let s = DiskStore::open_tuned(dir.path(), tuning).unwrap();
        for n in 0..50u64 {
            let dev = DeviceId::new(format!("dev-{n:04}")).unwrap();
            s.put_report(&rollout, &dev, &report(n + 1)).unwrap();
        }
        s.flush().unwrap();
        drop(s);
        let s = reopen(dir.path(), tuning);
        assert_eq!(s.load().unwrap().reports.len(), 50);
        snapshot_inode(&s)
    };
    // Two starts that write nothing: each leaves an empty active segment
    // behind, which the next start drops instead of folding it (a fold
    // renames a new snapshot into place).
    for _ in 0..2 {
        let s = reopen(dir.path(), tuning);
        let loaded = s.load().unwrap();
        assert_eq!(loaded.reports.len(), 50);
        assert!(loaded.corrupt.is_empty());
        assert_eq!(snapshot_inode(&s), first, "the snapshot was not rewritten");
        assert_eq!(s.segment_files(), 1, "only the new, empty one");
    }
    // A start after new records folds them as before.
    {
        let s = reopen(dir.path(), tuning);
        let dev = DeviceId::new("dev-0007").unwrap();
        s.put_report(&rollout, &dev, &report(777)).unwrap();
        s.flush().unwrap();
    }
    let s = reopen(dir.path(), tuning);
    let loaded = s.load().unwrap();
    assert_eq!(seqs(&loaded)["dev-0007"], 777);
    assert_ne!(snapshot_inode(&s), first, "new records were folded in");
}

#[test]
fn a_large_journal_is_folded_in_key_ranges_each_key_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let tuning = Tuning {
        cache_bytes: DEFAULT_CACHE_BYTES,
        fold_after_records: u64::MAX,
        fold_part_records: 128,
    };
    let s = DiskStore::open_tuned(dir.path(), tuning).unwrap();
    let rollout = RolloutId::new("r").unwrap();
    let mut want = BTreeMap::new();
    for seq in 1..=1200u64 {
        let dev = DeviceId::new(format!("dev-{:04}", seq * 7919 % 300)).unwrap();
        s.put_report(&rollout, &dev, &report(seq)).unwrap();
        want.insert(dev.as_str().to_string(), seq);
        if seq % 40 == 0 {
            s.flush().unwrap();
        }
    }
    s.put_device(&DeviceRecord::for_tests("dev-0001")).unwrap();
    s.flush().unwrap();
    let done = s.fold_journal().unwrap();
    assert_eq!(done.records, 1201);
    assert_eq!(done.entries, 31);
    assert_eq!(done.written, 301, "each key once, in exactly one part");
    assert!((9..=12).contains(&done.parts), "parts: {}", done.parts);
    let loaded = s.load().unwrap();
    assert_eq!(seqs(&loaded), want);
    assert_eq!(loaded.devices.len(), 1);
}

#[test]
fn a_fold_cut_short_is_finished_by_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let rollout = RolloutId::new("r").unwrap();
    let (a, b) = (DeviceId::new("a").unwrap(), DeviceId::new("b").unwrap());
    {
        let s = DiskStore::open(dir.path()).unwrap();
        s.put_report(&rollout, &a, &report(1)).unwrap();
        s.put_report(&rollout, &b, &report(1)).unwrap();
        s.flush().unwrap();
        s.put_report(&rollout, &a, &report(2)).unwrap();
        s.flush().unwrap();
        let seg = files::segment_path(
            &s.inner.dir,
            s.inner.active_segment.load(AtomicOrdering::Acquire),
        );
        let bytes = std::fs::read(&seg).unwrap();
        let done = s.fold_journal().unwrap();
        assert_eq!((done.entries, done.written), (2, 2));
        assert!(!seg.exists());
        // As if the process died after the new snapshot was in place and
        // before the segment went, in the middle of writing the next one.
        std::fs::write(&seg, bytes).unwrap();
        std::fs::write(s.inner.dir.join("snapshot.tmp"), b"half a snapshot").unwrap();
    }
    let s = reopen(dir.path(), Tuning::default());
    assert!(!s.inner.dir.join("snapshot.tmp").exists());
    let loaded = s.load().unwrap();
    let want: BTreeMap<String, u64> = [("a".to_string(), 2), ("b".to_string(), 1)].into();
    assert_eq!(seqs(&loaded), want);
    assert!(loaded.corrupt.is_empty());
    // Appends continue in a segment of their own.
    s.put_report(&rollout, &b, &report(3)).unwrap();
    s.flush().unwrap();
    assert_eq!(seqs(&s.load().unwrap())["b"], 3);
}

#[test]
fn many_records_between_two_flushes_go_out_in_bounded_entries() {
    let dir = tempfile::tempdir().unwrap();
    let n = 30_000;
    {
        let s = DiskStore::open(dir.path()).unwrap();
        // About 3.5 MB of device records and no flush in between, as
        // deleting a rollout over a large fleet writes them.
        for i in 0..n {
            s.put_device(&DeviceRecord::for_tests(&format!("dev-{i:05}")))
                .unwrap();
        }
        s.flush().unwrap();
        let seg = files::segment_path(
            &s.inner.dir,
            s.inner.active_segment.load(AtomicOrdering::Acquire),
        );
        let mut r = files::EntryReader::open(&seg).unwrap().unwrap();
        let mut sizes = Vec::new();
        while let Some(found) = r.next_entry().unwrap() {
            let files::Found::Entry { body, .. } = found else {
                panic!("{found:?}");
            };
            sizes.push(body.len());
        }
        assert!(sizes.len() >= 3, "{sizes:?}");
        assert!(sizes.iter().all(|b| *b < ENTRY_BYTES + 1024), "{sizes:?}");
    }
    let s = reopen(dir.path(), Tuning::default());
    assert_eq!(s.load().unwrap().devices.len(), n);
}

#[test]
fn a_write_cut_short_by_a_crash_is_cut_off_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let rollout = RolloutId::new("r").unwrap();
    let a = DeviceId::new("a").unwrap();
    let seg;
    {
        let s = DiskStore::open(dir.path()).unwrap();
        s.put_report(&rollout, &a, &report(1)).unwrap();
        s.flush().unwrap();
        s.put_report(&rollout, &a, &report(2)).unwrap();
        s.flush().unwrap();
        seg = files::segment_path(
            &s.inner.dir,
            s.inner.active_segment.load(AtomicOrdering::Acquire),
        );
    }
    let len = std::fs::metadata(&seg).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 5).unwrap();
    drop(f);
    let s = reopen(dir.path(), Tuning::default());
    let loaded = s.load().unwrap();
    // The torn entry was never acknowledged (its sync did not return).
    assert_eq!(seqs(&loaded)["a"], 1);
    assert!(loaded.corrupt.is_empty(), "a torn tail is not damage");
    s.put_report(&rollout, &a, &report(3)).unwrap();
    s.flush().unwrap();
    assert_eq!(seqs(&s.load().unwrap())["a"], 3);
}

#[test]
fn a_damaged_journal_entry_is_set_aside_and_the_rest_folded() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    let rollout = RolloutId::new("r").unwrap();
    s.put_report(&rollout, &DeviceId::new("a").unwrap(), &report(4))
        .unwrap();
    s.flush().unwrap();
    let seq = s.inner.active_segment.load(AtomicOrdering::Acquire);
    let seg = files::segment_path(&s.inner.dir, seq);
    let at = std::fs::metadata(&seg).unwrap().len();
    // Checksummed, but a record header claims more bytes than the entry has.
    let body = [1, 1, 200, 0, 0, 0, 1, 0, 0, 0, b'x'];
    let mut bytes = files::frame(&body).unwrap().to_vec();
    bytes.extend_from_slice(&body);
    // And one whose checksum does not match its bytes.
    let mut flipped = bytes.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, &bytes).unwrap();
    std::io::Write::write_all(&mut f, &flipped).unwrap();
    drop(f);
    s.put_report(&rollout, &DeviceId::new("b").unwrap(), &report(5))
        .unwrap();
    s.flush().unwrap();
    let loaded = s.load().unwrap();
    let second = at + bytes.len() as u64;
    assert_eq!(
        loaded.corrupt,
        vec![
            format!("journal/{seq}@{at}"),
            format!("journal/{seq}@{second}")
        ]
    );
    assert_eq!(seqs(&loaded).get("a"), Some(&4));
    assert_eq!(
        seqs(&loaded).get("b"),
        Some(&5),
        "entries after the damage are read"
    );
    let aside = s
        .inner
        .dir
        .join("aside")
        .join(format!("journal-{seq}@{at}"));
    assert_eq!(std::fs::read(aside).unwrap(), body.to_vec());
    assert!(s.load().unwrap().corrupt.is_empty());
}

#[test]
fn a_damaged_snapshot_block_is_set_aside_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let rollout = RolloutId::new("r").unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    // Enough records for three snapshot blocks of 64 KiB.
    for n in 0..6000u64 {
        let dev = DeviceId::new(format!("dev-{n:05}")).unwrap();
        s.put_report(&rollout, &dev, &report(n + 1)).unwrap();
    }
    s.flush().unwrap();
    s.fold_journal().unwrap();
    let snap = s.inner.dir.join("snapshot");
    let mut bytes = std::fs::read(&snap).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(&snap, &bytes).unwrap();
    let loaded = s.load().unwrap();
    assert_eq!(loaded.corrupt, vec!["snapshot@8".to_string()]);
    let kept = loaded.reports.len();
    assert!(
        kept > 1000 && kept < 6000,
        "only the damaged block is lost: {kept}"
    );
    assert!(s.inner.dir.join("aside").join("snapshot@8").exists());
    let again = s.load().unwrap();
    assert!(again.corrupt.is_empty());
    assert_eq!(again.reports.len(), kept);
}

#[test]
fn records_written_but_not_flushed_reach_the_journal_when_the_store_closes() {
    let dir = tempfile::tempdir().unwrap();
    let rollout = RolloutId::new("r").unwrap();
    {
        let s = DiskStore::open(dir.path()).unwrap();
        s.put_report(&rollout, &DeviceId::new("a").unwrap(), &report(5))
            .unwrap();
    }
    let s = reopen(dir.path(), Tuning::default());
    assert_eq!(seqs(&s.load().unwrap()).get("a"), Some(&5));
}

#[test]
fn a_deleted_rollout_does_not_come_back_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let rec = record();
    let dev = DeviceId::new("a").unwrap();
    {
        let s = DiskStore::open(dir.path()).unwrap();
        s.commit_rollout(&rec, None).unwrap();
        s.put_report(&rec.spec.id, &dev, &report(1)).unwrap();
        s.flush().unwrap();
        s.put_report(&rec.spec.id, &dev, &report(2)).unwrap();
        s.delete_rollout(&rec.spec.id).unwrap();
    }
    let s = reopen(dir.path(), Tuning::default());
    let loaded = s.load().unwrap();
    assert!(loaded.rollouts.is_empty());
    assert!(loaded.reports.is_empty());
}
