//! One shared copy of what many devices announce alike (hardware, agent
//! version, label set), so a registry of a million devices holds a handful of
//! these strings instead of a million copies.
//!
//! The values come from devices, so the table is bounded: past
//! [`MAX_ENTRIES`] distinct values it starts over (records keep their copies;
//! only sharing with later devices is lost).

use std::collections::HashSet;
use std::sync::Arc;
use swell_protocol::cohort::Label;

/// Most distinct values of each kind kept for sharing.
pub const MAX_ENTRIES: usize = 4_096;

/// Shared strings and label sets.
#[derive(Debug, Default)]
pub struct Interner {
    strs: HashSet<Arc<str>>,
    labels: HashSet<Arc<[Label]>>,
}

impl Interner {
    /// The shared copy of `s`.
    pub fn str(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.strs.get(s) {
            return a.clone();
        }
        if self.strs.len() >= MAX_ENTRIES {
            self.strs.clear();
        }
        let a: Arc<str> = Arc::from(s);
        self.strs.insert(a.clone());
        a
    }

    /// The shared copy of a label set.
    pub fn labels(&mut self, l: &[Label]) -> Arc<[Label]> {
        if let Some(a) = self.labels.get(l) {
            return a.clone();
        }
        if self.labels.len() >= MAX_ENTRIES {
            self.labels.clear();
        }
        let a: Arc<[Label]> = Arc::from(l);
        self.labels.insert(a.clone());
        a
    }

    /// Distinct values held now (strings, label sets).
    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (self.strs.len(), self.labels.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(k: &str, v: &str) -> Label {
        Label {
            key: k.into(),
            value: v.into(),
        }
    }

    #[test]
    fn interner_shares_equal_values() {
        let mut i = Interner::default();
        let a = i.str("rpi4");
        let b = i.str(&String::from("rpi4"));
        assert!(Arc::ptr_eq(&a, &b));
        let l1 = i.labels(&[label("hw", "rpi4"), label("region", "eu")]);
        let l2 = i.labels(&[label("hw", "rpi4"), label("region", "eu")]);
        let l3 = i.labels(&[label("hw", "rpi4")]);
        assert!(Arc::ptr_eq(&l1, &l2));
        assert!(!Arc::ptr_eq(&l1, &l3));
        assert_eq!(i.len(), (1, 2));
    }

    // A device per distinct value cannot grow the table without bound.
    #[test]
    fn interner_is_bounded_against_unique_values() {
        let mut i = Interner::default();
        let mut kept = Vec::new();
        for n in 0..3 * MAX_ENTRIES {
            kept.push(i.str(&format!("hw-{n}")));
            i.labels(&[label("n", &n.to_string())]);
            assert!(i.len().0 <= MAX_ENTRIES && i.len().1 <= MAX_ENTRIES);
        }
        // Values handed out stay valid after the table starts over.
        assert_eq!(&*kept[0], "hw-0");
        assert_eq!(
            &*kept[3 * MAX_ENTRIES - 1],
            format!("hw-{}", 3 * MAX_ENTRIES - 1)
        );
    }
}
