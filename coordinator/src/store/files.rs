//! Files of checksummed entries: the journal's segments and the snapshot.
//!
//! A file is [`MAGIC`], then entries: body length (u32 little endian), CRC-32
//! of the body (u32 little endian), body. A segment is appended to and synced
//! once per flush; the snapshot is written whole to a temporary name, synced
//! and renamed over the old one, so a reader sees either snapshot entirely.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use swell_durable::{rename_durably, sync_dir};

/// First bytes of every journal segment and snapshot (format version 1).
pub(super) const MAGIC: &[u8; 8] = b"swell-j1";
const FRAME: usize = 8;
/// No entry is larger: the store cuts entries at 1 MiB (plus one record),
/// snapshot blocks at 64 KiB. A larger length is damage, not data.
pub(super) const MAX_ENTRY: u32 = 64 << 20;

/// The name of segment `seq`: zero-padded, so names sort as numbers.
pub(super) fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("seg-{seq:020}.log"))
}

/// The sequence number of a segment file name.
pub(super) fn segment_seq(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// Segment numbers in `dir`, oldest first.
pub(super) fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        if let Some(seq) = entry?.file_name().to_str().and_then(segment_seq) {
            out.push(seq);
        }
    }
    out.sort_unstable();
    Ok(out)
}

pub(super) fn frame(body: &[u8]) -> io::Result<[u8; FRAME]> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_ENTRY)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "journal entry too large"))?;
    let mut f = [0u8; FRAME];
    f[..4].copy_from_slice(&len.to_le_bytes());
    f[4..].copy_from_slice(&crc32fast::hash(body).to_le_bytes());
    Ok(f)
}

/// The segment the store appends to.
#[derive(Debug)]
pub(super) struct Appender {
    file: File,
    pub seq: u64,
    /// Records appended so far.
    pub records: u64,
    /// Where the next entry starts.
    len: u64,
    /// A write or sync failed: what follows could sit behind half an entry,
    /// so nothing more is appended here (the store errors until a restart,
    /// whose open cuts a torn tail off).
    failed: bool,
    /// Entries written since the last sync.
    unsynced: bool,
}

impl Appender {
    /// Creates segment `seq` (which must not exist).
    pub(super) fn create(dir: &Path, seq: u64) -> io::Result<Appender> {
        let mut file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(segment_path(dir, seq))?;
        file.write_all(MAGIC)?;
        file.sync_all()?;
        sync_dir(dir)?;
        Ok(Appender {
            file,
            seq,
            records: 0,
            len: MAGIC.len() as u64,
            failed: false,
            unsynced: false,
        })
    }

    fn usable(&self) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other(
                "an earlier write to this journal segment failed",
            ));
        }
        Ok(())
    }

    /// Makes every entry written so far durable.
    pub(super) fn sync(&mut self) -> io::Result<()> {
        self.usable()?;
        if self.unsynced {
            self.file.sync_data().inspect_err(|_| self.failed = true)?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Writes one entry, not synced yet.
    pub(super) fn write(&mut self, body: &[u8], records: u64) -> io::Result<()> {
        self.usable()?;
        let mut buf = Vec::with_capacity(FRAME + body.len());
        buf.extend_from_slice(&frame(body)?);
        buf.extend_from_slice(body);
        if let Err(e) = self.file.write_all(&buf) {
            self.failed = true;
            // Best effort: take the partial entry back (a disk that is full
            // still lets a file shrink).
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += buf.len() as u64;
        self.records += records;
        self.unsynced = true;
        Ok(())
    }
}

/// Writes a new snapshot beside the old one; [`SnapshotWriter::install`]
/// puts it in place.
pub(super) struct SnapshotWriter {
    w: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
}

impl SnapshotWriter {
    pub(super) fn create(path: &Path) -> io::Result<SnapshotWriter> {
        let tmp = path.with_extension("tmp");
        let mut w = BufWriter::with_capacity(256 << 10, File::create(&tmp)?);
        w.write_all(MAGIC)?;
        Ok(SnapshotWriter {
            w,
            tmp,
            path: path.to_path_buf(),
        })
    }

    pub(super) fn entry(&mut self, body: &[u8]) -> io::Result<()> {
        self.w.write_all(&frame(body)?)?;
        self.w.write_all(body)
    }

    /// Syncs the new snapshot and renames it over the old one.
    pub(super) fn install(self) -> io::Result<()> {
        let file = self
            .w
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        drop(file);
        rename_durably(&self.tmp, &self.path)
    }
}

/// What reading the next entry found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Found {
    Entry {
        offset: u64,
        body: Vec<u8>,
    },
    /// Bytes that are not a valid entry; reading goes on after them unless
    /// their length itself was damaged (then they run to the end).
    Bad {
        offset: u64,
        reason: &'static str,
        bytes: Vec<u8>,
    },
    /// The file ends inside an entry (a write cut short by a crash).
    Torn {
        offset: u64,
    },
}

/// Reads a file's entries in order.
pub(super) struct EntryReader {
    r: BufReader<File>,
    offset: u64,
    len: u64,
    done: bool,
}

impl EntryReader {
    /// `None` when the file does not exist.
    pub(super) fn open(path: &Path) -> io::Result<Option<EntryReader>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        Ok(Some(EntryReader {
            r: BufReader::with_capacity(256 << 10, file),
            offset: 0,
            len,
            done: false,
        }))
    }

    /// The frame `read` and everything after it, as one bad stretch.
    fn rest(&mut self, read: &[u8], reason: &'static str) -> io::Result<Option<Found>> {
        let offset = self.offset;
        let mut bytes = read.to_vec();
        self.r.read_to_end(&mut bytes)?;
        self.done = true;
        Ok(Some(Found::Bad {
            offset,
            reason,
            bytes,
        }))
    }

    pub(super) fn next_entry(&mut self) -> io::Result<Option<Found>> {
        if self.done || self.offset == self.len {
            return Ok(None);
        }
        if self.offset == 0 {
            if self.len < MAGIC.len() as u64 {
                self.done = true;
                return Ok(Some(Found::Torn { offset: 0 }));
            }
            let mut magic = [0u8; 8];
            self.r.read_exact(&mut magic)?;
            if &magic != MAGIC {
                self.done = true;
                return Ok(Some(Found::Bad {
                    offset: 0,
                    reason: "not a journal file",
                    bytes: magic.to_vec(),
                }));
            }
            self.offset = MAGIC.len() as u64;
            return self.next_entry();
        }
        let offset = self.offset;
        let left = self.len - offset;
        if left < FRAME as u64 {
            self.done = true;
            return Ok(Some(Found::Torn { offset }));
        }
        let mut f = [0u8; FRAME];
        self.r.read_exact(&mut f)?;
        let word = |at: usize| u32::from_le_bytes([f[at], f[at + 1], f[at + 2], f[at + 3]]);
        let (len, crc) = (word(0), word(4));
        if len > MAX_ENTRY {
            return self.rest(&f, "entry length out of bounds");
        }
        if u64::from(len) > left - FRAME as u64 {
            self.done = true;
            return Ok(Some(Found::Torn { offset }));
        }
        let mut body = vec![0u8; len as usize];
        self.r.read_exact(&mut body)?;
        self.offset += FRAME as u64 + u64::from(len);
        if crc32fast::hash(&body) != crc {
            let mut bytes = f.to_vec();
            bytes.extend_from_slice(&body);
            return Ok(Some(Found::Bad {
                offset,
                reason: "checksum mismatch",
                bytes,
            }));
        }
        Ok(Some(Found::Entry { offset, body }))
    }
}

/// Removes segment `seq` if it holds no entry (the previous run's active
/// segment when it wrote nothing): folding it would rewrite the whole
/// snapshot for nothing. Returns whether it was removed.
pub(super) fn remove_if_empty(dir: &Path, seq: u64) -> io::Result<bool> {
    let path = segment_path(dir, seq);
    if fs::metadata(&path)?.len() > MAGIC.len() as u64 {
        return Ok(false);
    }
    fs::remove_file(&path)?;
    sync_dir(dir)?;
    Ok(true)
}

/// Cuts a segment's torn last entry off, so appends after a crash never
/// follow half an entry. Returns the offset it was cut at.
pub(super) fn cut_torn_tail(path: &Path) -> io::Result<Option<u64>> {
    let Some(mut r) = EntryReader::open(path)? else {
        return Ok(None);
    };
    while let Some(found) = r.next_entry()? {
        if let Found::Torn { offset } = found {
            let keep = offset.max(MAGIC.len() as u64);
            let file = OpenOptions::new().write(true).open(path)?;
            if offset == 0 {
                // Not even the magic made it: start the file again.
                file.set_len(0)?;
                (&file).write_all(MAGIC)?;
            } else {
                file.set_len(keep)?;
            }
            file.sync_all()?;
            return Ok(Some(offset));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(path: &Path) -> Vec<Found> {
        let mut r = EntryReader::open(path).unwrap().unwrap();
        let mut out = Vec::new();
        while let Some(f) = r.next_entry().unwrap() {
            out.push(f);
        }
        out
    }

    #[test]
    fn entries_read_back_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Appender::create(dir.path(), 3).unwrap();
        a.write(b"one", 1).unwrap();
        a.write(b"two", 2).unwrap();
        a.sync().unwrap();
        assert_eq!(a.records, 3);
        assert!(Appender::create(dir.path(), 3).is_err(), "never reused");
        let path = segment_path(dir.path(), 3);
        assert_eq!(segments(dir.path()).unwrap(), vec![3]);
        assert_eq!(
            entries(&path),
            vec![
                Found::Entry {
                    offset: 8,
                    body: b"one".to_vec()
                },
                Found::Entry {
                    offset: 19,
                    body: b"two".to_vec()
                },
            ]
        );
        let good = fs::read(&path).unwrap();
        // A flipped bit in the first body: that entry is bad, the next reads.
        let mut flipped = good.clone();
        flipped[16] ^= 1;
        fs::write(&path, &flipped).unwrap();
        let got = entries(&path);
        assert!(matches!(
            got[0],
            Found::Bad {
                offset: 8,
                reason: "checksum mismatch",
                ..
            }
        ));
        assert!(matches!(got[1], Found::Entry { offset: 19, .. }));
        // A damaged length: the rest of the file is set aside.
        let mut long = good.clone();
        long[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        fs::write(&path, &long).unwrap();
        let got = entries(&path);
        assert_eq!(got.len(), 1);
        assert!(
            matches!(&got[0], Found::Bad { reason: "entry length out of bounds", bytes, .. } if bytes.len() == good.len() - 8)
        );
        // Not ours at all.
        fs::write(&path, b"something else entirely").unwrap();
        assert!(matches!(
            entries(&path)[..],
            [Found::Bad {
                reason: "not a journal file",
                ..
            }]
        ));
    }

    #[test]
    fn a_torn_tail_is_cut_and_appends_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 1);
        let mut a = Appender::create(dir.path(), 1).unwrap();
        a.write(b"kept", 1).unwrap();
        a.write(b"cut short", 1).unwrap();
        a.sync().unwrap();
        drop(a);
        let full = fs::read(&path).unwrap();
        fs::write(&path, &full[..full.len() - 3]).unwrap();
        assert!(matches!(entries(&path)[1], Found::Torn { offset: 20 }));
        assert_eq!(cut_torn_tail(&path).unwrap(), Some(20));
        assert_eq!(entries(&path).len(), 1);
        assert_eq!(cut_torn_tail(&path).unwrap(), None);
        // A file cut inside its magic starts again.
        fs::write(&path, &MAGIC[..3]).unwrap();
        assert_eq!(cut_torn_tail(&path).unwrap(), Some(0));
        assert_eq!(fs::read(&path).unwrap(), MAGIC.to_vec());
        assert!(entries(&path).is_empty());
    }

    #[test]
    fn a_snapshot_replaces_the_old_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot");
        let mut w = SnapshotWriter::create(&path).unwrap();
        w.entry(b"old").unwrap();
        w.install().unwrap();
        let mut w = SnapshotWriter::create(&path).unwrap();
        w.entry(b"new").unwrap();
        // Not installed yet: readers still see the old one.
        assert!(matches!(&entries(&path)[..], [Found::Entry { body, .. }] if body == b"old"));
        w.install().unwrap();
        assert!(matches!(&entries(&path)[..], [Found::Entry { body, .. }] if body == b"new"));
        assert!(!path.with_extension("tmp").exists());
        assert!(
            EntryReader::open(&dir.path().join("none"))
                .unwrap()
                .is_none()
        );
        assert_eq!(segment_seq("seg-00000000000000000042.log"), Some(42));
        assert_eq!(segment_seq("snapshot"), None);
    }
}
