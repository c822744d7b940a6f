//! Messages that wait: manifests that cannot act yet ([`Held`]), and fleet
//! messages that arrive before the device has any key list to check them with,
//! or manifests before its enrollment is confirmed ([`BeforeKeys`]).
//!
//! A manifest that cannot act *yet* (no fresh beacon, another install under
//! way) is held, its floors not raised, and evaluated again when a fresh beacon
//! arrives or the install ends: after a reconnect, queued manifests can arrive
//! before the retained beacon, and one install runs at a time. One per rollout,
//! the newest, at most [`MAX_HELD`].
//!
//! Before any key list: retained messages of different subscriptions need not
//! arrive in subscription order (the embedded broker delivers each
//! subscription's retained messages on its own), so on a first start the
//! retained beacon, a directive or a manifest can come before the key list. Acknowledged and
//! dropped, they would be gone until the next reconnect: a manifest would not
//! be seen, and installs would wait for the next beacon, minutes later. They
//! are kept here instead, the newest per topic and bounded, and checked in
//! arrival order once the first key list is accepted.

use std::collections::{BTreeMap, VecDeque};
use swell_protocol::RolloutId;

/// Most manifests held for later evaluation (one per rollout).
pub const MAX_HELD: usize = 32;

/// Held manifests by rollout.
#[derive(Debug, Default)]
pub struct Held {
    by_rollout: BTreeMap<RolloutId, Vec<u8>>,
}

impl Held {
    /// Holds `payload` for `rollout` (replacing an older one); false when full
    /// and `rollout` holds nothing yet.
    pub fn hold(&mut self, rollout: &RolloutId, payload: &[u8]) -> bool {
        if self.by_rollout.len() >= MAX_HELD && !self.by_rollout.contains_key(rollout) {
            return false;
        }
        self.by_rollout.insert(rollout.clone(), payload.to_vec());
        true
    }

    /// Whether exactly these bytes are already held for `rollout`.
    pub fn holds(&self, rollout: &RolloutId, payload: &[u8]) -> bool {
        self.by_rollout.get(rollout).is_some_and(|h| h == payload)
    }

    pub fn release(&mut self, rollout: &RolloutId) {
        self.by_rollout.remove(rollout);
    }

    /// Everything held, to evaluate again.
    pub fn take(&mut self) -> Vec<(RolloutId, Vec<u8>)> {
        std::mem::take(&mut self.by_rollout).into_iter().collect()
    }

    pub fn len(&self) -> usize {
        self.by_rollout.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_rollout.is_empty()
    }
}

/// Most messages kept before a key list (a beacon, a directive, the
/// enrollment confirmation and the fleet's manifests).
pub const MAX_KEPT: usize = MAX_HELD + 3;

/// What one kept message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `retained`: delivered because it was stored when the device
    /// subscribed (the broker's RETAIN flag on delivery).
    Beacon {
        retained: bool,
    },
    Directive,
    Manifest,
    Enrolled,
}

/// The kept messages: topic, kind and payload, oldest first, one per topic.
#[derive(Debug, Default)]
pub struct BeforeKeys {
    kept: VecDeque<(String, Kind, Vec<u8>)>,
}

impl BeforeKeys {
    /// Keeps `payload` for later; a newer message on the same topic replaces the
    /// older one (retained topics hold one message each; an empty payload clears
    /// one). False when it was dropped because the buffer is full.
    pub fn keep(&mut self, topic: &str, kind: Kind, payload: &[u8]) -> bool {
        self.kept.retain(|(t, _, _)| t != topic);
        if self.kept.len() >= MAX_KEPT {
            return false;
        }
        self.kept
            .push_back((topic.to_string(), kind, payload.to_vec()));
        true
    }

    /// Everything kept, oldest first, the beacon before the rest: a manifest
    /// needs a fresh beacon to act on.
    pub fn take(&mut self) -> Vec<(String, Kind, Vec<u8>)> {
        let mut all: Vec<(String, Kind, Vec<u8>)> = self.kept.drain(..).collect();
        all.sort_by_key(|(_, k, _)| !matches!(k, Kind::Beacon { .. }));
        all
    }

    /// Messages waiting (for `status.json`).
    pub fn len(&self) -> usize {
        self.kept.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_keeps_one_per_rollout_and_is_bounded() {
        let mut h = Held::default();
        let r = |i: usize| RolloutId::new(format!("r-{i}")).unwrap();
        assert!(h.hold(&r(0), b"a"));
        assert!(h.hold(&r(0), b"b"));
        assert!(h.holds(&r(0), b"b"));
        assert!(!h.holds(&r(0), b"a"));
        for i in 1..MAX_HELD {
            assert!(h.hold(&r(i), b"x"));
        }
        assert!(!h.hold(&r(MAX_HELD), b"x"), "full");
        assert!(h.hold(&r(1), b"y"), "a rollout already held is replaced");
        assert_eq!(h.take().len(), MAX_HELD);
        assert!(h.is_empty());
    }

    #[test]
    fn before_keys_keeps_the_newest_per_topic_and_hands_the_beacon_first() {
        let mut b = BeforeKeys::default();
        assert!(b.keep("m/a", Kind::Manifest, b"a1"));
        assert!(b.keep("desired", Kind::Directive, b"d"));
        assert!(b.keep("beacon", Kind::Beacon { retained: true }, b"b"));
        assert!(b.keep("m/a", Kind::Manifest, b"a2"));
        let got: Vec<(Kind, Vec<u8>)> = b.take().into_iter().map(|(_, k, p)| (k, p)).collect();
        assert_eq!(
            got,
            vec![
                (Kind::Beacon { retained: true }, b"b".to_vec()),
                (Kind::Directive, b"d".to_vec()),
                (Kind::Manifest, b"a2".to_vec()),
            ]
        );
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn before_keys_is_bounded_and_counts_what_it_drops() {
        let mut b = BeforeKeys::default();
        let kept = (0..MAX_KEPT + 5)
            .filter(|i| b.keep(&format!("m/{i}"), Kind::Manifest, b"x"))
            .count();
        assert_eq!(kept, MAX_KEPT);
        // A topic already kept is replaced, not dropped.
        assert!(b.keep("m/0", Kind::Manifest, b"y"));
        assert_eq!(b.take().len(), MAX_KEPT);
    }
}
