//! Device registry: one small record per device, keyed by id, with the key bound
//! at enrollment (MQTT-6) and the report counter floor (replays are dropped).

use super::interner::{Announced, Interner};
use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use serde::{Deserialize, Serialize};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use swell_protocol::cohort::Label;
use swell_protocol::messages::Hello;
use swell_protocol::{DeviceId, FleetId, PublicKey, ReleaseId};

/// Whether a device may take part. (Stored by variant index; the names are
/// for operators: `pending`, `approved`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enrollment {
    /// Announced itself; waits for an operator's `approve`.
    Pending,
    Approved,
}

/// What the coordinator keeps per device. Stored as [`StoredDevice`] (the
/// announced facts written out field by field); in memory the facts are one
/// pointer to a copy shared with the devices that announce the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub key: PublicKey,
    pub enrollment: Enrollment,
    /// Fleet, labels, hardware and agent version (see [`Interner`]): the
    /// fleet is the same in nearly every record, so it is shared there too.
    pub facts: Arc<Announced>,
    /// Shared with the devices that run the same release.
    pub running: Option<Arc<ReleaseId>>,
    /// Highest envelope `seq` accepted in the device's reports.
    pub last_seq: u64,
    /// Highest `seq` accepted in its Hellos. Kept apart from reports: the two
    /// travel on different topics, and MQTT orders messages only within one.
    pub last_hello_seq: u64,
    pub boot: u64,
    /// The incarnation its Hellos announce and its messages carry as `epoch`
    /// (STATE-3); 0 for a record from before protocol 3 (the first Hello
    /// sets it).
    pub incarnation: u64,
    pub online: bool,
    /// Unix seconds of the last message, in 32 bits (until 2106; a record is
    /// 8 bytes smaller, 8 MB at a million devices): see [`Self::seen`].
    last_seen: u32,
}

/// A [`DeviceRecord`] as the store holds it (postcard, field order fixed).
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredDevice<L, S> {
    pub id: DeviceId,
    pub fleet: FleetId,
    pub key: PublicKey,
    pub enrollment: Enrollment,
    pub labels: L,
    pub hardware: S,
    pub agent_version: S,
    pub running: Option<ReleaseId>,
    pub last_seq: u64,
    pub last_hello_seq: u64,
    pub boot: u64,
    pub online: bool,
    pub last_seen: u64,
    /// Last, so a record written before it existed reads with 0
    /// ([`DeviceRecord::decode`]).
    pub incarnation: u64,
}

impl Serialize for DeviceRecord {
    fn serialize<Z: serde::Serializer>(&self, s: Z) -> Result<Z::Ok, Z::Error> {
        StoredDevice {
            id: self.id.clone(),
            fleet: self.facts.fleet.clone(),
            key: self.key,
            enrollment: self.enrollment,
            labels: &self.facts.labels[..],
            hardware: self.facts.hardware.as_str(),
            agent_version: self.facts.agent_version.as_str(),
            running: self.running.as_deref().copied(),
            last_seq: self.last_seq,
            last_hello_seq: self.last_hello_seq,
            boot: self.boot,
            online: self.online,
            last_seen: self.last_seen(),
            incarnation: self.incarnation,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for DeviceRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = StoredDevice::<Vec<Label>, String>::deserialize(d)?;
        Ok(DeviceRecord {
            id: s.id,
            key: s.key,
            enrollment: s.enrollment,
            facts: Arc::new(Announced {
                fleet: s.fleet,
                labels: s.labels,
                hardware: s.hardware,
                agent_version: s.agent_version,
            }),
            running: s.running.map(Arc::new),
            last_seq: s.last_seq,
            last_hello_seq: s.last_hello_seq,
            boot: s.boot,
            incarnation: s.incarnation,
            online: s.online,
            last_seen: seconds32(s.last_seen),
        })
    }
}

/// Unix seconds in 32 bits; a clock past 2106 reads as the last second.
fn seconds32(t: u64) -> u32 {
    u32::try_from(t).unwrap_or(u32::MAX)
}

/// Every known device: the records in one vector, found by id through a
/// table of positions hashed by id (the id itself lives in the record). A hash
/// map of whole records cost a slot of 200 bytes per bucket, and at 1,000,000
/// devices the table had 2,097,152 buckets (power-of-two growth at 7/8 load):
/// 420 MB for the registry alone; this index is 5 bytes per bucket (32-bit
/// positions: 4 billion devices would not fit in memory anyway).
#[derive(Default)]
pub struct Registry {
    /// Keyed like std's HashMap, so device-chosen ids cannot force collisions.
    hasher: RandomState,
    index: HashTable<u32>,
    /// By slot; `None` where a device was removed (same size: the record's
    /// `Arc` gives `Option` a niche).
    records: Vec<Option<DeviceRecord>>,
    /// Slots of removed records, used again first.
    free: Vec<u32>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry {{ {} devices }}", self.len())
    }
}

impl Registry {
    pub fn len(&self) -> usize {
        self.records.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where `id`'s record is, for [`Self::at`] and [`Self::at_mut`]: one hash
    /// lookup for several uses (at a million devices each lookup is a few
    /// cache misses). A slot names its record until [`Self::remove`].
    pub fn slot(&self, id: &DeviceId) -> Option<usize> {
        let records = &self.records;
        self.index
            .find(self.hasher.hash_one(id), |&i| {
                record(records, i).is_some_and(|r| r.id == *id)
            })
            .map(|&i| i as usize)
    }

    pub fn get(&self, id: &DeviceId) -> Option<&DeviceRecord> {
        self.slot(id).and_then(|i| self.at(i))
    }

    pub fn get_mut(&mut self, id: &DeviceId) -> Option<&mut DeviceRecord> {
        self.slot(id).and_then(|i| self.at_mut(i))
    }

    /// The record in `slot` (from [`Self::slot`]).
    pub fn at(&self, slot: usize) -> Option<&DeviceRecord> {
        self.records.get(slot).and_then(Option::as_ref)
    }

    pub fn at_mut(&mut self, slot: usize) -> Option<&mut DeviceRecord> {
        self.records.get_mut(slot).and_then(Option::as_mut)
    }

    /// Adds `rec`, or replaces the record with its id; its slot, or `None`
    /// when the registry is full (2^32 devices).
    pub fn insert(&mut self, rec: DeviceRecord) -> Option<usize> {
        let Registry {
            hasher,
            index,
            records,
            free,
        } = self;
        let entry = index.entry(
            hasher.hash_one(&rec.id),
            |&i| record(records, i).is_some_and(|r| r.id == rec.id),
            // Positions in the table always name a record (a removed one
            // leaves the table first).
            |&i| record(records, i).map_or(0, |r| hasher.hash_one(&r.id)),
        );
        match entry {
            Entry::Occupied(e) => {
                let slot = *e.get() as usize;
                *records.get_mut(slot)? = Some(rec);
                Some(slot)
            }
            Entry::Vacant(e) => {
                if let Some(slot) = free.pop() {
                    e.insert(slot);
                    *records.get_mut(slot as usize)? = Some(rec);
                    return Some(slot as usize);
                }
                let slot = records.len();
                e.insert(u32::try_from(slot).ok()?);
                records.push(Some(rec));
                Some(slot)
            }
        }
    }

    /// Removes the record in `slot` (ENROLL-4); the slot may name another
    /// device later, so the caller removes it from anything keyed by slot
    /// first (the engine removes only devices no rollout counts).
    pub fn remove(&mut self, slot: usize) -> Option<DeviceRecord> {
        let rec = self.records.get_mut(slot)?.take()?;
        let hash = self.hasher.hash_one(&rec.id);
        if let Ok(e) = self.index.find_entry(hash, |&i| i as usize == slot) {
            e.remove();
        }
        self.free.push(u32::try_from(slot).ok()?);
        Some(rec)
    }

    /// In slot order (enrollment order, removed devices' slots reused).
    pub fn values(&self) -> impl Iterator<Item = &DeviceRecord> {
        self.records.iter().flatten()
    }

    /// Slots and records, in slot order.
    pub fn slots(&self) -> impl Iterator<Item = (usize, &DeviceRecord)> {
        self.records
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((i, r.as_ref()?)))
    }
}

fn record(records: &[Option<DeviceRecord>], i: u32) -> Option<&DeviceRecord> {
    records.get(i as usize).and_then(Option::as_ref)
}

/// Why a device message was not accepted into the registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("device {0} is enrolled with another key")]
    KeyMismatch(DeviceId),
    #[error("device {0} is not enrolled")]
    Unknown(DeviceId),
    #[error("device {device}: seq {got} is not above {have} (replay)")]
    Replayed {
        device: DeviceId,
        got: u64,
        have: u64,
    },
    #[error("device {device} belongs to fleet {fleet}, not this coordinator's")]
    WrongFleet { device: DeviceId, fleet: FleetId },
    #[error("device {0} is awaiting approval")]
    NotApproved(DeviceId),
}

impl RegistryError {
    /// Counter label.
    pub fn reason(&self) -> &'static str {
        match self {
            RegistryError::KeyMismatch(_) => "forged",
            RegistryError::Unknown(_) => "unknown_device",
            RegistryError::Replayed { .. } => "replayed",
            RegistryError::WrongFleet { .. } => "wrong_fleet",
            RegistryError::NotApproved(_) => "not_approved",
        }
    }
}

impl DeviceRecord {
    /// A record for a device seen for the first time.
    pub fn from_hello(
        h: &Hello,
        seq: u64,
        now: u64,
        enrollment: Enrollment,
        shared: &mut Interner,
    ) -> Self {
        DeviceRecord {
            id: h.device.clone(),
            key: h.key,
            enrollment,
            facts: shared.announced(&h.fleet, &h.labels, &h.hardware, &h.agent_version),
            running: h.running.map(|r| shared.release(r)),
            last_seq: 0,
            last_hello_seq: seq,
            boot: h.boot,
            incarnation: h.incarnation,
            online: true,
            last_seen: seconds32(now),
        }
    }

    /// A stored record. One written before protocol 3 ends before
    /// `incarnation` (decoding runs out of input there), so it is read again
    /// with `incarnation` 0.
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes::<DeviceRecord>(bytes).or_else(|e| {
            let mut v = Vec::with_capacity(bytes.len() + 1);
            v.extend_from_slice(bytes);
            v.push(0);
            postcard::from_bytes::<DeviceRecord>(&v).map_err(|_| e)
        })
    }

    /// Starts the device's incarnation `incarnation` (STATE-3): the counter
    /// starts again, so both floors do, from its Hello's `hello_seq`.
    pub fn new_incarnation(&mut self, incarnation: u64, hello_seq: u64) {
        self.incarnation = incarnation;
        self.last_seq = 0;
        self.last_hello_seq = hello_seq;
    }

    /// Unix seconds of the device's last message.
    pub fn last_seen(&self) -> u64 {
        u64::from(self.last_seen)
    }

    /// Records a message from the device at `now` (Unix seconds).
    pub fn seen(&mut self, now: u64) {
        self.last_seen = seconds32(now);
    }

    pub fn fleet(&self) -> &FleetId {
        &self.facts.fleet
    }

    pub fn labels(&self) -> &[Label] {
        &self.facts.labels
    }

    pub fn hardware(&self) -> &str {
        &self.facts.hardware
    }

    pub fn agent_version(&self) -> &str {
        &self.facts.agent_version
    }

    /// Checks and records a newer `seq` from this device.
    pub fn accept_seq(&mut self, seq: u64) -> Result<(), RegistryError> {
        if seq <= self.last_seq {
            return Err(RegistryError::Replayed {
                device: self.id.clone(),
                got: seq,
                have: self.last_seq,
            });
        }
        self.last_seq = seq;
        Ok(())
    }

    /// Checks and records a newer Hello `seq`.
    pub fn accept_hello_seq(&mut self, seq: u64) -> Result<(), RegistryError> {
        if seq <= self.last_hello_seq {
            return Err(RegistryError::Replayed {
                device: self.id.clone(),
                got: seq,
                have: self.last_hello_seq,
            });
        }
        self.last_hello_seq = seq;
        Ok(())
    }

    /// Takes the announced facts of a verified Hello from the enrolled key.
    pub fn update_from_hello(&mut self, h: &Hello, now: u64, shared: &mut Interner) {
        let f = &self.facts;
        if f.fleet != h.fleet
            || f.labels != h.labels
            || f.hardware != h.hardware
            || f.agent_version != h.agent_version
        {
            self.facts = shared.announced(&h.fleet, &h.labels, &h.hardware, &h.agent_version);
        }
        self.set_running(h.running, shared);
        self.boot = h.boot;
        self.online = true;
        self.seen(now);
    }

    /// Records the release the device runs now.
    /// Sets the running release; whether it changed.
    pub fn set_running(&mut self, running: Option<ReleaseId>, shared: &mut Interner) -> bool {
        let changed = self.running.as_deref() != running.as_ref();
        if changed {
            self.running = running.map(|r| shared.release(r));
        }
        changed
    }

    /// Shares this record's announced facts and running release (a record
    /// read back from the store has its own copies).
    pub fn share(&mut self, shared: &mut Interner) {
        self.facts = shared.share((*self.facts).clone());
        self.running = self.running.as_deref().map(|r| shared.release(*r));
    }
}

#[cfg(test)]
impl DeviceRecord {
    /// An approved device with nothing announced, for other modules' tests.
    pub(crate) fn for_tests(id: &str) -> DeviceRecord {
        DeviceRecord {
            id: DeviceId::new(id).unwrap(),
            key: PublicKey([1; 32]),
            enrollment: Enrollment::Approved,
            facts: Interner::default().announced(&FleetId::new("f").unwrap(), &[], "sim", "1"),
            running: None,
            last_seq: 0,
            last_hello_seq: 1,
            boot: 1,
            incarnation: 1,
            online: false,
            last_seen: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u32, shared: &mut Interner) -> DeviceRecord {
        DeviceRecord {
            id: DeviceId::new(format!("d{n}")).unwrap(),
            key: PublicKey([n as u8; 32]),
            enrollment: Enrollment::Approved,
            facts: shared.announced(&FleetId::new("f").unwrap(), &[], "sim", "1"),
            running: None,
            last_seq: u64::from(n),
            last_hello_seq: 1,
            boot: 1,
            incarnation: 1,
            online: true,
            last_seen: 0,
        }
    }

    #[test]
    fn registry_finds_replaces_and_keeps_enrollment_order() {
        let mut shared = Interner::default();
        let mut r = Registry::default();
        for n in 0..1000 {
            r.insert(record(n, &mut shared));
        }
        assert_eq!(r.len(), 1000);
        let id = DeviceId::new("d500").unwrap();
        assert_eq!(r.get(&id).map(|d| d.last_seq), Some(500));
        r.get_mut(&id).unwrap().last_seq = 7;
        let mut again = record(999, &mut shared);
        again.last_seq = 1;
        r.insert(again);
        assert_eq!(r.len(), 1000, "same id replaces");
        assert_eq!(r.get(&id).map(|d| d.last_seq), Some(7));
        assert_eq!(
            r.get(&DeviceId::new("d999").unwrap()).map(|d| d.last_seq),
            Some(1)
        );
        assert!(r.get(&DeviceId::new("d1000").unwrap()).is_none());
        // A slot names the same record through later inserts and replacements.
        let slot = r.slot(&id).unwrap();
        r.insert(record(1000, &mut shared));
        r.insert(record(500, &mut shared));
        assert_eq!(r.at(slot).map(|d| &d.id), Some(&id));
        r.at_mut(slot).unwrap().last_seq = 9;
        assert_eq!(r.get(&id).map(|d| d.last_seq), Some(9));
        assert!(r.slot(&DeviceId::new("d1001").unwrap()).is_none());
        let order: Vec<_> = r.values().map(|d| d.id.to_string()).collect();
        assert_eq!(order[0], "d0");
        assert_eq!(order[999], "d999");
    }

    /// ENROLL-4: a removed device is gone from every lookup, the others keep
    /// their slots, and its slot names the next new device.
    #[test]
    fn registry_removes_and_reuses_a_slot() {
        let mut shared = Interner::default();
        let mut r = Registry::default();
        for n in 0..100 {
            r.insert(record(n, &mut shared));
        }
        let gone = DeviceId::new("d40").unwrap();
        let slot = r.slot(&gone).unwrap();
        let kept = r.slot(&DeviceId::new("d41").unwrap()).unwrap();
        assert_eq!(r.remove(slot).map(|d| d.id), Some(gone.clone()));
        assert!(r.remove(slot).is_none());
        assert_eq!(r.len(), 99);
        assert!(r.get(&gone).is_none() && r.at(slot).is_none());
        assert_eq!(r.values().count(), 99);
        assert!(r.slots().all(|(i, _)| i != slot));
        assert_eq!(r.slot(&DeviceId::new("d41").unwrap()), Some(kept));
        assert_eq!(r.insert(record(500, &mut shared)), Some(slot));
        assert_eq!(r.at(slot).map(|d| d.id.as_str()), Some("d500"));
        assert_eq!(r.insert(record(40, &mut shared)), Some(100));
        assert_eq!(r.len(), 101);
    }

    // The stored form is the record as it was before the facts were shared:
    // a database written by an older coordinator reads back unchanged.
    #[test]
    fn registry_record_stores_its_facts_field_by_field() {
        let mut shared = Interner::default();
        let mut rec = record(3, &mut shared);
        rec.facts = shared.announced(
            &FleetId::new("f").unwrap(),
            &[Label {
                key: "region".into(),
                value: "eu".into(),
            }],
            "rpi4",
            "0.9",
        );
        rec.running = Some(shared.release(ReleaseId([9; 32])));
        let bytes = postcard::to_allocvec(&rec).unwrap();
        let flat: StoredDevice<Vec<Label>, String> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(flat.hardware, "rpi4");
        assert_eq!(flat.agent_version, "0.9");
        assert_eq!(flat.labels[0].value, "eu");
        assert_eq!(postcard::to_allocvec(&flat).unwrap(), bytes);
        assert_eq!(flat.running, Some(ReleaseId([9; 32])));
        let back: DeviceRecord = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, rec);
        // A record written before protocol 3 ends before `incarnation`.
        rec.incarnation = 0;
        let bytes = postcard::to_allocvec(&rec).unwrap();
        assert_eq!(bytes.last(), Some(&0));
        let legacy = &bytes[..bytes.len() - 1];
        assert!(postcard::from_bytes::<DeviceRecord>(legacy).is_err());
        assert_eq!(DeviceRecord::decode(legacy).unwrap(), rec);
    }

    // What a million devices cost: keep the record small (the incarnation,
    // STATE-3, took it from 104 to 112 bytes: 8 MB more per million).
    #[test]
    fn registry_record_stays_small() {
        assert!(
            std::mem::size_of::<DeviceRecord>() <= 112,
            "{} bytes",
            std::mem::size_of::<DeviceRecord>()
        );
    }
}
