//! One shared copy of what many devices announce alike (label set, hardware,
//! agent version), so a registry of a million devices holds a handful of these
//! instead of a million copies, and each record holds one pointer to them.
//!
//! The values come from devices, so the table is bounded: past
//! [`MAX_ENTRIES`] distinct values it starts over (records keep their copies;
//! only sharing with later devices is lost).

use std::collections::HashSet;
use std::sync::Arc;
use swell_protocol::cohort::Label;

/// Most distinct announcements kept for sharing.
pub const MAX_ENTRIES: usize = 4_096;

/// What a device says about itself in its Hello, apart from its key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Announced {
    pub labels: Vec<Label>,
    pub hardware: String,
    pub agent_version: String,
}

/// Shared announcements.
#[derive(Debug, Default)]
pub struct Interner {
    set: HashSet<Arc<Announced>>,
}

impl Interner {
    /// The shared copy of `a`.
    pub fn share(&mut self, a: Announced) -> Arc<Announced> {
        if let Some(shared) = self.set.get(&a) {
            return shared.clone();
        }
        if self.set.len() >= MAX_ENTRIES {
            self.set.clear();
        }
        let shared = Arc::new(a);
        self.set.insert(shared.clone());
        shared
    }

    /// The shared copy of what `labels`, `hardware` and `agent_version` say.
    pub fn announced(
        &mut self,
        labels: &[Label],
        hardware: &str,
        agent_version: &str,
    ) -> Arc<Announced> {
        self.share(Announced {
            labels: labels.to_vec(),
            hardware: hardware.to_string(),
            agent_version: agent_version.to_string(),
        })
    }

    /// Distinct values held now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.set.len()
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
        let eu = [label("hw", "rpi4"), label("region", "eu")];
        let a = i.announced(&eu, "rpi4", "1.0");
        let b = i.announced(&eu.clone(), &String::from("rpi4"), "1.0");
        assert!(Arc::ptr_eq(&a, &b));
        let other_labels = i.announced(&eu[..1], "rpi4", "1.0");
        let other_agent = i.announced(&eu, "rpi4", "1.1");
        assert!(!Arc::ptr_eq(&a, &other_labels));
        assert!(!Arc::ptr_eq(&a, &other_agent));
        assert_eq!(other_agent.agent_version, "1.1");
        assert_eq!(i.len(), 3);
    }

    // A device per distinct value cannot grow the table without bound.
    #[test]
    fn interner_is_bounded_against_unique_values() {
        let mut i = Interner::default();
        let mut kept = Vec::new();
        for n in 0..3 * MAX_ENTRIES {
            kept.push(i.announced(&[label("n", &n.to_string())], &format!("hw-{n}"), "1"));
            assert!(i.len() <= MAX_ENTRIES);
        }
        // Values handed out stay valid after the table starts over.
        assert_eq!(kept[0].hardware, "hw-0");
        assert_eq!(
            kept[3 * MAX_ENTRIES - 1].hardware,
            format!("hw-{}", 3 * MAX_ENTRIES - 1)
        );
    }
}
