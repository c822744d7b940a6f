//! One shared copy of what many devices announce alike (fleet, label set,
//! hardware, agent version), so a registry of a million devices holds a handful of these
//! instead of a million copies, and each record holds one pointer to them.
//!
//! The values come from devices, so the table is bounded: past
//! [`MAX_ENTRIES`] distinct values it starts over (records keep their copies;
//! only sharing with later devices is lost).

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::Arc;
use swell_protocol::cohort::Label;
use swell_protocol::{FleetId, ReleaseId};

/// Most distinct announcements kept for sharing.
pub const MAX_ENTRIES: usize = 4_096;

/// What a device says about itself in its Hello, apart from its key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Announced {
    pub fleet: FleetId,
    pub labels: Vec<Label>,
    pub hardware: String,
    pub agent_version: String,
}

/// Shared announcements and running releases.
#[derive(Debug, Default)]
pub struct Interner {
    set: HashSet<Arc<Announced>>,
    releases: HashSet<Arc<ReleaseId>>,
}

/// The copy of `v` in `set`, added if missing; `set` starts over when full.
fn intern<T: Hash + Eq>(set: &mut HashSet<Arc<T>>, v: T) -> Arc<T> {
    if let Some(shared) = set.get(&v) {
        return shared.clone();
    }
    if set.len() >= MAX_ENTRIES {
        set.clear();
    }
    let shared = Arc::new(v);
    set.insert(shared.clone());
    shared
}

impl Interner {
    /// The shared copy of `a`.
    pub fn share(&mut self, a: Announced) -> Arc<Announced> {
        intern(&mut self.set, a)
    }

    /// The shared copy of a release id (8 bytes per record instead of 33).
    pub fn release(&mut self, r: ReleaseId) -> Arc<ReleaseId> {
        intern(&mut self.releases, r)
    }

    /// The shared copy of what `fleet`, `labels`, `hardware` and
    /// `agent_version` say.
    pub fn announced(
        &mut self,
        fleet: &FleetId,
        labels: &[Label],
        hardware: &str,
        agent_version: &str,
    ) -> Arc<Announced> {
        self.share(Announced {
            fleet: fleet.clone(),
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
        let f = FleetId::new("f").unwrap();
        let eu = [label("hw", "rpi4"), label("region", "eu")];
        let a = i.announced(&f, &eu, "rpi4", "1.0");
        let b = i.announced(&f.clone(), &eu.clone(), &String::from("rpi4"), "1.0");
        assert!(Arc::ptr_eq(&a, &b));
        let other_labels = i.announced(&f, &eu[..1], "rpi4", "1.0");
        let other_agent = i.announced(&f, &eu, "rpi4", "1.1");
        let other_fleet = i.announced(&FleetId::new("g").unwrap(), &eu, "rpi4", "1.0");
        assert!(!Arc::ptr_eq(&a, &other_labels));
        assert!(!Arc::ptr_eq(&a, &other_agent));
        assert!(!Arc::ptr_eq(&a, &other_fleet));
        assert_eq!(other_agent.agent_version, "1.1");
        assert_eq!(other_fleet.fleet.as_str(), "g");
        assert_eq!(i.len(), 4);
        let r1 = i.release(ReleaseId([7; 32]));
        let r2 = i.release(ReleaseId([7; 32]));
        assert!(Arc::ptr_eq(&r1, &r2));
        assert!(!Arc::ptr_eq(&r1, &i.release(ReleaseId([8; 32]))));
    }

    // A device per distinct value cannot grow the table without bound.
    #[test]
    fn interner_is_bounded_against_unique_values() {
        let mut i = Interner::default();
        let f = FleetId::new("f").unwrap();
        let mut kept = Vec::new();
        for n in 0..3 * MAX_ENTRIES {
            kept.push(i.announced(&f, &[label("n", &n.to_string())], &format!("hw-{n}"), "1"));
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(n as u64).to_le_bytes());
            i.release(ReleaseId(id));
            assert!(i.len() <= MAX_ENTRIES && i.releases.len() <= MAX_ENTRIES);
        }
        // Values handed out stay valid after the table starts over.
        assert_eq!(kept[0].hardware, "hw-0");
        assert_eq!(
            kept[3 * MAX_ENTRIES - 1].hardware,
            format!("hw-{}", 3 * MAX_ENTRIES - 1)
        );
    }
}
