//! Fleet messages that arrive before the agent has any key list to check them
//! with. Retained messages of different subscriptions need not arrive in
//! subscription order (the embedded broker delivers each subscription's
//! retained messages on its own), so on a first start the retained beacon,
//! a directive or a manifest can come before the key list. Acknowledged and
//! dropped, they would be gone until the next reconnect: a manifest would not
//! be seen, and installs would wait for the next beacon, minutes later. They
//! are kept here instead, the newest per topic and bounded, and checked in
//! arrival order once the first key list is accepted.

use std::collections::VecDeque;

/// Most messages kept (a beacon, a directive and the fleet's manifests).
pub const MAX_KEPT: usize = 34;

/// What one kept message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Beacon,
    Directive,
    Manifest,
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
    pub fn take(&mut self) -> Vec<(Kind, Vec<u8>)> {
        let mut all: Vec<(Kind, Vec<u8>)> = self.kept.drain(..).map(|(_, k, p)| (k, p)).collect();
        all.sort_by_key(|(k, _)| *k != Kind::Beacon);
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
    fn before_keys_keeps_the_newest_per_topic_and_hands_the_beacon_first() {
        let mut b = BeforeKeys::default();
        assert!(b.keep("m/a", Kind::Manifest, b"a1"));
        assert!(b.keep("desired", Kind::Directive, b"d"));
        assert!(b.keep("beacon", Kind::Beacon, b"b"));
        assert!(b.keep("m/a", Kind::Manifest, b"a2"));
        let got = b.take();
        assert_eq!(
            got,
            vec![
                (Kind::Beacon, b"b".to_vec()),
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
