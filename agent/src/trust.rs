//! Trust state: the few facts that must never go backwards.
//!
//! Kept apart from the sled journal (STATE-2) in one small file written atomically
//! (temp file, fsync, rename, fsync of the directory) and guarded by a SHA-256
//! checksum, so a torn or corrupted write is detected rather than trusted. Losing
//! the journal must not lower any floor held here (VER-2).
//!
//! File layout: `b"SWTRUST2"` ‖ SHA-256(body) ‖ body, body = postcard(TrustState).
//! A `SWTRUST1` file (before protocol 3) is read as [`TrustStateV1`]: its
//! floors keep holding, recorded as signed by no key in particular
//! ([`UNKNOWN_SIGNER`]), with incarnation 0 (a new one is chosen) and no
//! enrollment confirmation (the next Hello brings one).
//!
//! TIME-2: every coordinator floor remembers the key that signed the message
//! that raised it, and a key list that drops that key drops the floor. A
//! stolen coordinator key can raise floors as far as it likes (an epoch near
//! 2^64 locks the real coordinator out while the key is trusted), but only
//! until the root key holders rotate it out: then the new key's messages are
//! heard again. Floors of keys still in the list keep ordering messages
//! across keys (a deposed leader stays deposed whichever key it signs with).

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use swell_protocol::codec;
use swell_protocol::{KeyId, PublicKey, RolloutId};

/// [`TrustState`] as `SWTRUST1` files hold it.
#[derive(Serialize, Deserialize)]
struct TrustStateV1 {
    key_list_version: u64,
    counter_floor: u64,
    time_floor: u64,
    epoch_floor: u64,
    manifest_floor: BTreeMap<RolloutId, (u64, u64)>,
    directive_floor: (u64, u64),
    report_seq: u64,
}

impl From<TrustStateV1> for TrustState {
    fn from(v: TrustStateV1) -> Self {
        TrustState {
            key_list_version: v.key_list_version,
            counter_floor: v.counter_floor,
            time_floor: v.time_floor,
            epoch_floors: BTreeMap::from([(UNKNOWN_SIGNER, v.epoch_floor)]),
            manifest_floor: v
                .manifest_floor
                .into_iter()
                .map(|(r, (e, s))| (r, (e, s, UNKNOWN_SIGNER)))
                .collect(),
            directive_floor: Some(v.directive_floor)
                .filter(|f| *f != (0, 0))
                .map(|(e, s)| (e, s, UNKNOWN_SIGNER)),
            report_seq: v.report_seq,
            incarnation: 0,
            enrolled_key: None,
        }
    }
}

const MAGIC: &[u8; 8] = b"SWTRUST2";
const MAGIC_V1: &[u8; 8] = b"SWTRUST1";

/// The signer of a floor recorded before signers were (a `SWTRUST1` file):
/// no key has this id, so the next key rotation drops those floors.
pub const UNKNOWN_SIGNER: KeyId = KeyId([0; 8]);
/// Largest trust file read (it holds one entry per rollout ever seen, pruned).
pub const MAX_TRUST_FILE: usize = 256 * 1024;
/// Most rollouts whose replay floor is remembered; the oldest are pruned.
pub const MAX_ROLLOUT_FLOORS: usize = 1024;

/// How far ahead of what a device can justify a signed time may move its
/// time floor (TIME-1): clock skew between coordinator and device.
pub const MAX_AHEAD_SECS: u64 = 300;

/// A new incarnation (STATE-3): the clock's Unix seconds in the high 32 bits
/// and 32 random bits below, never 0. Later lives of a device with a working
/// clock number higher; two lives of a device without a clock (one that
/// starts at 1970) differ but in no known order, and the coordinator's
/// confirmation of the higher one tells the device to go past it.
pub fn new_incarnation(unix: u64, random: u32) -> u64 {
    (unix.min(u64::from(u32::MAX)) << 32) | u64::from(random.max(1))
}

/// The persisted floors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustState {
    /// Newest accepted key list version.
    pub key_list_version: u64,
    /// Lowest release counter the device may install (VER-1).
    pub counter_floor: u64,
    /// Latest trusted time seen, Unix seconds (FRESH-2).
    pub time_floor: u64,
    /// Highest coordinator epoch seen per signing key (ROLL-4, TIME-2).
    pub epoch_floors: BTreeMap<KeyId, u64>,
    /// Last accepted (epoch, seq) per rollout manifest, and its signer
    /// (FRESH-1).
    pub manifest_floor: BTreeMap<RolloutId, (u64, u64, KeyId)>,
    /// Last accepted (epoch, seq) of this device's directive, and its signer.
    pub directive_floor: Option<(u64, u64, KeyId)>,
    /// The device's own report counter (MQTT-6); the next report uses this + 1.
    pub report_seq: u64,
    /// Which life of this trust state this is (STATE-3): every message the
    /// device signs carries it as `epoch`; chosen when the state is created
    /// (0 until then).
    pub incarnation: u64,
    /// The key the coordinator confirmed the device's enrollment for, in this
    /// incarnation (ENROLL-3): until it is the device's own, the device acts
    /// on no manifest and sends no report.
    pub enrolled_key: Option<PublicKey>,
}

/// Why trust state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    #[error("trust file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trust file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// Whether a coordinator message is new enough to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Newer than anything seen: act on it.
    New,
    /// The same (epoch, seq) again (QoS 1 duplicate, retained re-delivery): no
    /// second effect (VER-4).
    Duplicate,
    /// Older than what was accepted: a replay (FRESH-1) or a deposed leader
    /// (ROLL-4).
    Stale,
}

fn compare(floor: Option<(u64, u64)>, epoch: u64, seq: u64) -> Freshness {
    match floor {
        None => Freshness::New,
        Some(f) if (epoch, seq) > f => Freshness::New,
        Some(f) if (epoch, seq) == f => Freshness::Duplicate,
        Some(_) => Freshness::Stale,
    }
}

impl TrustState {
    /// The highest coordinator epoch seen under any key still trusted.
    pub fn epoch_floor(&self) -> u64 {
        self.epoch_floors.values().copied().max().unwrap_or(0)
    }

    /// Records a verified coordinator message's epoch under its signer.
    pub fn raise_epoch(&mut self, signer: KeyId, epoch: u64) {
        let f = self.epoch_floors.entry(signer).or_insert(0);
        *f = (*f).max(epoch);
    }

    /// TIME-2: forgets the floors raised by keys that are not coordinator
    /// keys any more (a new key list rotated them out).
    pub fn keep_signers(&mut self, coordinator_keys: &[KeyId]) {
        let kept = |k: &KeyId| coordinator_keys.contains(k);
        self.epoch_floors.retain(|k, _| kept(k));
        self.manifest_floor.retain(|_, f| kept(&f.2));
        if self.directive_floor.is_some_and(|f| !kept(&f.2)) {
            self.directive_floor = None;
        }
    }

    /// Checks a manifest's (epoch, seq) for `rollout` against the floors.
    pub fn manifest_freshness(&self, rollout: &RolloutId, epoch: u64, seq: u64) -> Freshness {
        if epoch < self.epoch_floor() {
            return Freshness::Stale;
        }
        compare(
            self.manifest_floor.get(rollout).map(|f| (f.0, f.1)),
            epoch,
            seq,
        )
    }

    /// Records an accepted manifest signed by `signer`. Call only for
    /// [`Freshness::New`].
    pub fn accept_manifest(&mut self, rollout: &RolloutId, signer: KeyId, epoch: u64, seq: u64) {
        self.raise_epoch(signer, epoch);
        self.manifest_floor
            .insert(rollout.clone(), (epoch, seq, signer));
        while self.manifest_floor.len() > MAX_ROLLOUT_FLOORS {
            // Drop the rollout with the oldest floor; its manifests are long gone.
            let oldest = self
                .manifest_floor
                .iter()
                .min_by_key(|(_, v)| **v)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.manifest_floor.remove(&k),
                None => break,
            };
        }
    }

    /// Checks a directive's (epoch, seq).
    pub fn directive_freshness(&self, epoch: u64, seq: u64) -> Freshness {
        if epoch < self.epoch_floor() {
            return Freshness::Stale;
        }
        compare(self.directive_floor.map(|f| (f.0, f.1)), epoch, seq)
    }

    /// Records an accepted directive signed by `signer`.
    pub fn accept_directive(&mut self, signer: KeyId, epoch: u64, seq: u64) {
        self.raise_epoch(signer, epoch);
        self.directive_floor = Some((epoch, seq, signer));
    }

    /// The device's clock, never earlier than the persisted floor (FRESH-2).
    pub fn trusted_now(&self, clock: u64) -> u64 {
        clock.max(self.time_floor)
    }

    /// Raises the time floor to a time seen in a verified message (the
    /// device core then holds it to what it can justify, TIME-1).
    pub fn observe_time(&mut self, t: u64) {
        self.time_floor = self.time_floor.max(t);
    }

    /// Holds a time floor that a message raised from `before` to at most
    /// `ceiling` (TIME-1): a signed time far ahead (a stolen coordinator key
    /// dating a beacon days ahead) moves it by the skew at most, so the device
    /// neither reads an exposure schedule at the attacker's time nor refuses
    /// the real coordinator's messages as expired.
    pub fn hold_time_floor(&mut self, before: u64, ceiling: u64) {
        self.time_floor = before.max(self.time_floor.min(ceiling));
    }

    /// Raises the release counter floor after a commit; never lowers it.
    pub fn raise_counter_floor(&mut self, counter: u64) {
        self.counter_floor = self.counter_floor.max(counter);
    }

    /// Takes the next report sequence number.
    pub fn next_report_seq(&mut self) -> u64 {
        self.report_seq += 1;
        self.report_seq
    }
}

/// The trust file on disk.
#[derive(Debug, Clone)]
pub struct TrustFile {
    path: PathBuf,
}

impl TrustFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        TrustFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> TrustError {
        TrustError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, reason: impl Into<String>) -> TrustError {
        TrustError::Corrupt {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// Reads the state; `Ok(None)` when the file does not exist yet.
    pub fn load(&self) -> Result<Option<TrustState>, TrustError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        if bytes.len() > MAX_TRUST_FILE {
            return Err(self.corrupt(format!("{} bytes, limit {MAX_TRUST_FILE}", bytes.len())));
        }
        let (rest, v1) = match bytes.strip_prefix(MAGIC.as_slice()) {
            Some(rest) => (rest, false),
            None => (
                bytes
                    .strip_prefix(MAGIC_V1.as_slice())
                    .ok_or_else(|| self.corrupt("bad magic"))?,
                true,
            ),
        };
        let (sum, body) = rest
            .split_first_chunk::<32>()
            .ok_or_else(|| self.corrupt("truncated"))?;
        if Sha256::digest(body).as_slice() != sum {
            return Err(self.corrupt("checksum mismatch"));
        }
        if v1 {
            return codec::decode_exact::<TrustStateV1>("trust state", body, MAX_TRUST_FILE)
                .map(|v| Some(v.into()))
                .map_err(|e| self.corrupt(e.to_string()));
        }
        codec::decode_exact("trust state", body, MAX_TRUST_FILE)
            .map(Some)
            .map_err(|e| self.corrupt(e.to_string()))
    }

    /// Writes the state atomically and durably: when this returns, the new state
    /// survives a power cut, and a power cut during the call leaves the old one.
    pub fn store(&self, state: &TrustState) -> Result<(), TrustError> {
        let body = codec::encode("trust state", state).map_err(|e| self.corrupt(e.to_string()))?;
        let mut bytes = Vec::with_capacity(8 + 32 + body.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&Sha256::digest(&body));
        bytes.extend_from_slice(&body);
        swell_durable::write_atomic(&self.path, &bytes, 0o600).map_err(|e| self.io(e))?;
        Ok(())
    }

    /// Moves a corrupt file aside (STATE-3) so the agent can start from its
    /// pinned configuration and report the rebuild, instead of crash-looping.
    pub fn quarantine(&self) -> Result<PathBuf, TrustError> {
        let mut aside = self.path.clone().into_os_string();
        aside.push(".corrupt");
        let aside = PathBuf::from(aside);
        fs::rename(&self.path, &aside).map_err(|e| self.io(e))?;
        Ok(aside)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(s: &str) -> RolloutId {
        RolloutId::new(s).unwrap()
    }

    fn sample() -> TrustState {
        let mut s = TrustState {
            key_list_version: 3,
            counter_floor: 22,
            time_floor: 1_795_651_200,
            ..TrustState::default()
        };
        s.accept_manifest(&rollout("fw-2-3"), K1, 4, 17);
        s
    }

    const K1: KeyId = KeyId([1; 8]);
    const K2: KeyId = KeyId([2; 8]);

    #[test]
    fn trust_round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = TrustFile::new(dir.path().join("trust.bin"));
        assert_eq!(f.load().unwrap(), None);
        f.store(&sample()).unwrap();
        assert_eq!(f.load().unwrap(), Some(sample()));
        assert!(!dir.path().join("trust.tmp").exists());
    }

    /// A trust file from before protocol 3 keeps every floor; it has no
    /// incarnation yet and no enrollment confirmation.
    #[test]
    fn trust_reads_a_file_from_before_protocol_3() {
        let dir = tempfile::tempdir().unwrap();
        let f = TrustFile::new(dir.path().join("trust.bin"));
        let old = TrustStateV1 {
            key_list_version: 3,
            counter_floor: 22,
            time_floor: 1_795_651_200,
            epoch_floor: 4,
            manifest_floor: BTreeMap::from([(rollout("fw-2-3"), (4, 17))]),
            directive_floor: (0, 0),
            report_seq: 9,
        };
        let old = codec::encode("trust state", &old).unwrap();
        let mut bytes = MAGIC_V1.to_vec();
        bytes.extend_from_slice(&Sha256::digest(&old));
        bytes.extend_from_slice(&old);
        fs::write(f.path(), &bytes).unwrap();
        let read = f.load().unwrap().unwrap();
        assert_eq!(read.epoch_floor(), 4);
        assert_eq!(
            read.manifest_freshness(&rollout("fw-2-3"), 4, 17),
            Freshness::Duplicate
        );
        assert_eq!(read.directive_floor, None);
        assert_eq!(
            (read.report_seq, read.incarnation, read.enrolled_key),
            (9, 0, None)
        );
        let mut state = sample();
        state.incarnation = 7;
        state.enrolled_key = Some(PublicKey([3; 32]));
        f.store(&state).unwrap();
        assert!(fs::read(f.path()).unwrap().starts_with(MAGIC));
        assert_eq!(f.load().unwrap(), Some(state));
    }

    #[test]
    fn trust_any_corruption_is_detected_and_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let f = TrustFile::new(dir.path().join("trust.bin"));
        f.store(&sample()).unwrap();
        let good = fs::read(f.path()).unwrap();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x40;
            fs::write(f.path(), &b).unwrap();
            assert!(
                matches!(f.load(), Err(TrustError::Corrupt { .. })),
                "byte {i}"
            );
        }
        for n in 0..good.len() {
            fs::write(f.path(), &good[..n]).unwrap();
            assert!(f.load().is_err(), "truncated to {n}");
        }
        let aside = f.quarantine().unwrap();
        assert!(aside.exists());
        assert_eq!(f.load().unwrap(), None);
    }

    #[test]
    fn trust_manifest_replay_and_duplicates() {
        let mut s = sample();
        let r = rollout("fw-2-3");
        assert_eq!(s.manifest_freshness(&r, 4, 17), Freshness::Duplicate);
        assert_eq!(s.manifest_freshness(&r, 4, 16), Freshness::Stale);
        assert_eq!(s.manifest_freshness(&r, 4, 18), Freshness::New);
        assert_eq!(s.manifest_freshness(&r, 5, 1), Freshness::New);
        assert_eq!(
            s.manifest_freshness(&rollout("other"), 4, 1),
            Freshness::New
        );
        // A newer leader epoch fences every older message, of any rollout
        // and whichever trusted key signs it (ROLL-4).
        s.accept_manifest(&r, K2, 6, 1);
        assert_eq!(
            s.manifest_freshness(&rollout("other"), 5, 99),
            Freshness::Stale
        );
        assert_eq!(s.directive_freshness(5, 99), Freshness::Stale);
        assert_eq!(s.directive_freshness(6, 1), Freshness::New);
    }

    /// TIME-2: floors a key raised go when a key list drops that key; the
    /// others stay.
    #[test]
    fn time_2_a_rotated_out_key_takes_its_floors_with_it() {
        let mut s = TrustState::default();
        s.accept_manifest(&rollout("a"), K1, u64::MAX - 1, 1);
        s.accept_manifest(&rollout("b"), K2, 3, 5);
        s.accept_directive(K1, u64::MAX - 1, 2);
        assert_eq!(s.epoch_floor(), u64::MAX - 1);
        assert_eq!(s.manifest_freshness(&rollout("b"), 4, 1), Freshness::Stale);
        s.keep_signers(&[K2]);
        assert_eq!(s.epoch_floor(), 3);
        assert_eq!(s.manifest_freshness(&rollout("a"), 4, 1), Freshness::New);
        assert_eq!(
            s.manifest_freshness(&rollout("b"), 3, 5),
            Freshness::Duplicate
        );
        assert_eq!(s.directive_floor, None);
        assert_eq!(s.directive_freshness(4, 1), Freshness::New);
    }

    #[test]
    fn trust_floors_never_go_down() {
        let mut s = sample();
        s.raise_counter_floor(10);
        assert_eq!(s.counter_floor, 22);
        s.observe_time(5);
        assert_eq!(s.trusted_now(0), 1_795_651_200);
        assert_eq!(s.trusted_now(1_795_651_300), 1_795_651_300);
        assert_eq!(s.next_report_seq(), 1);
        assert_eq!(s.next_report_seq(), 2);
    }

    #[test]
    fn trust_rollout_floors_are_bounded() {
        let mut s = TrustState::default();
        for i in 0..(MAX_ROLLOUT_FLOORS + 10) {
            s.accept_manifest(&rollout(&format!("r{i}")), K1, 1, i as u64);
        }
        assert_eq!(s.manifest_floor.len(), MAX_ROLLOUT_FLOORS);
        assert!(!s.manifest_floor.contains_key(&rollout("r0")));
    }
}
