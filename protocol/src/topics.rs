//! The MQTT topic tree (DESIGN §3). Topics are built and parsed only here.
//!
//! | topic | direction | retained |
//! |---|---|---|
//! | `{p}/fleet/{fleet}/manifest/{rollout}` | coordinator → devices | yes |
//! | `{p}/fleet/{fleet}/beacon` | coordinator → devices | yes |
//! | `{p}/fleet/{fleet}/keys` | coordinator → devices | yes |
//! | `{p}/dev/{device}/desired` | coordinator → device | yes |
//! | `{p}/dev/{device}/hello` | device → coordinator | no |
//! | `{p}/dev/{device}/report` | device → coordinator | no |
//! | `{p}/dev/{device}/online` | device (Last Will) | yes |
//! | `{p}/ops/{fleet}/cmd` | operator → coordinator | no |
//! | `{p}/ops/{fleet}/rollout/{rollout}/status` | coordinator → operators | yes |
//! | `{p}/ops/{fleet}/events` | coordinator → operators | no |
//! | `{p}/ops/{fleet}/coordinator` | coordinator (presence, Last Will) | yes |
//! | `{p}/ops/cmd` | an operator client of before the fleet level | no |
//! | `{p}/dev/_probe/{channel}` | coordinator → itself | no |
//!
//! `_probe` can never be a device id (ids start with `[a-z0-9]`), so the
//! coordinator's ingest probes travel the device filters without standing for
//! any device.

use crate::ids::{DeviceId, FleetId, IdError, RolloutId};

/// Default prefix.
pub const DEFAULT_PREFIX: &str = "swell/v1";

/// The device level of the coordinator's ingest probes (not a valid device id).
pub const PROBE_LEVEL: &str = "_probe";

/// Why a topic or prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    #[error(
        "topic prefix {0:?} is invalid: levels of [A-Za-z0-9._-], no wildcards, no leading '$'"
    )]
    BadPrefix(String),
    #[error("topic {0:?} is outside prefix")]
    ForeignPrefix(String),
    #[error("topic {0:?} is not part of the Swell topic tree")]
    Unknown(String),
    #[error("topic {topic:?}: {source}")]
    BadId { topic: String, source: IdError },
}

/// A parsed Swell topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    Manifest {
        fleet: FleetId,
        rollout: RolloutId,
    },
    Beacon {
        fleet: FleetId,
    },
    Keys {
        fleet: FleetId,
    },
    Desired {
        device: DeviceId,
    },
    Enrolled {
        device: DeviceId,
    },
    Hello {
        device: DeviceId,
    },
    Report {
        device: DeviceId,
    },
    Online {
        device: DeviceId,
    },
    OpsCmd {
        fleet: FleetId,
    },
    OpsStatus {
        fleet: FleetId,
        rollout: RolloutId,
    },
    OpsEvents {
        fleet: FleetId,
    },
    Coordinator {
        fleet: FleetId,
    },
    /// `{p}/ops/cmd`: where operator clients sent commands before the ops
    /// topics had a fleet level; answered with a refusal that names the new topic.
    LegacyOpsCmd,
}

/// Builds and parses topics under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            prefix: DEFAULT_PREFIX.to_string(),
        }
    }
}

impl Topics {
    /// Topics under `prefix` (one or more `/`-separated levels).
    pub fn new(prefix: &str) -> Result<Self, TopicError> {
        let ok = !prefix.is_empty()
            && !prefix.starts_with('$')
            && prefix.len() <= 128
            && prefix.split('/').all(|level| {
                !level.is_empty()
                    && level
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            });
        if !ok {
            return Err(TopicError::BadPrefix(prefix.to_string()));
        }
        Ok(Topics {
            prefix: prefix.to_string(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn manifest(&self, fleet: &FleetId, rollout: &RolloutId) -> String {
        format!("{}/fleet/{fleet}/manifest/{rollout}", self.prefix)
    }
    /// Every manifest of a fleet (subscription filter).
    pub fn manifests(&self, fleet: &FleetId) -> String {
        format!("{}/fleet/{fleet}/manifest/+", self.prefix)
    }
    pub fn beacon(&self, fleet: &FleetId) -> String {
        format!("{}/fleet/{fleet}/beacon", self.prefix)
    }
    pub fn keys(&self, fleet: &FleetId) -> String {
        format!("{}/fleet/{fleet}/keys", self.prefix)
    }
    pub fn desired(&self, device: &DeviceId) -> String {
        format!("{}/dev/{device}/desired", self.prefix)
    }
    /// The coordinator's retained enrollment confirmation for `device`
    /// (protocol 3).
    pub fn enrolled(&self, device: &DeviceId) -> String {
        format!("{}/dev/{device}/enrolled", self.prefix)
    }
    pub fn hello(&self, device: &DeviceId) -> String {
        format!("{}/dev/{device}/hello", self.prefix)
    }
    pub fn report(&self, device: &DeviceId) -> String {
        format!("{}/dev/{device}/report", self.prefix)
    }
    pub fn online(&self, device: &DeviceId) -> String {
        format!("{}/dev/{device}/online", self.prefix)
    }
    /// Filter for one device-to-coordinator channel of every device
    /// (`hello`, `report` or `online`).
    pub fn all_devices(&self, channel: &str) -> String {
        format!("{}/dev/+/{channel}", self.prefix)
    }
    /// Where the coordinator sends the probe that proves its subscription to
    /// [`Topics::all_devices`]`(channel)` delivers (MQTT-7).
    pub fn probe(&self, channel: &str) -> String {
        format!("{}/dev/{PROBE_LEVEL}/{channel}", self.prefix)
    }
    /// Commands for the coordinator of `fleet`.
    pub fn ops_cmd(&self, fleet: &FleetId) -> String {
        format!("{}/ops/{fleet}/cmd", self.prefix)
    }
    /// Where commands went before the ops topics had a fleet level.
    pub fn legacy_ops_cmd(&self) -> String {
        format!("{}/ops/cmd", self.prefix)
    }
    pub fn ops_status(&self, fleet: &FleetId, rollout: &RolloutId) -> String {
        format!("{}/ops/{fleet}/rollout/{rollout}/status", self.prefix)
    }
    /// Every rollout status of a fleet (subscription filter).
    pub fn ops_statuses(&self, fleet: &FleetId) -> String {
        format!("{}/ops/{fleet}/rollout/+/status", self.prefix)
    }
    pub fn ops_events(&self, fleet: &FleetId) -> String {
        format!("{}/ops/{fleet}/events", self.prefix)
    }
    /// The fleet coordinator's retained presence (JSON), replaced by its Last
    /// Will when it goes away.
    pub fn coordinator(&self, fleet: &FleetId) -> String {
        format!("{}/ops/{fleet}/coordinator", self.prefix)
    }

    /// Parses a concrete topic (no wildcards) of this tree.
    pub fn parse(&self, topic: &str) -> Result<Topic, TopicError> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| TopicError::ForeignPrefix(topic.to_string()))?;
        let bad_id = |source| TopicError::BadId {
            topic: topic.to_string(),
            source,
        };
        let levels: Vec<&str> = rest.split('/').collect();
        let parsed = match levels.as_slice() {
            ["fleet", f, "manifest", r] => Topic::Manifest {
                fleet: FleetId::new(*f).map_err(bad_id)?,
                rollout: RolloutId::new(*r).map_err(bad_id)?,
            },
            ["fleet", f, "beacon"] => Topic::Beacon {
                fleet: FleetId::new(*f).map_err(bad_id)?,
            },
            ["fleet", f, "keys"] => Topic::Keys {
                fleet: FleetId::new(*f).map_err(bad_id)?,
            },
            ["dev", d, channel] => {
                let device = DeviceId::new(*d).map_err(bad_id)?;
                match *channel {
                    "desired" => Topic::Desired { device },
                    "enrolled" => Topic::Enrolled { device },
                    "hello" => Topic::Hello { device },
                    "report" => Topic::Report { device },
                    "online" => Topic::Online { device },
                    _ => return Err(TopicError::Unknown(topic.to_string())),
                }
            }
            ["ops", "cmd"] => Topic::LegacyOpsCmd,
            ["ops", f, "cmd"] => Topic::OpsCmd {
                fleet: FleetId::new(*f).map_err(bad_id)?,
            },
            ["ops", f, "events"] => Topic::OpsEvents {
                fleet: FleetId::new(*f).map_err(bad_id)?,
            },
            ["ops", f, "coordinator"] => Topic::Coordinator {
                fleet: FleetId::new(*f).map_err(bad_id)?,
            },
            ["ops", f, "rollout", r, "status"] => Topic::OpsStatus {
                fleet: FleetId::new(*f).map_err(bad_id)?,
                rollout: RolloutId::new(*r).map_err(bad_id)?,
            },
            _ => return Err(TopicError::Unknown(topic.to_string())),
        };
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_build_and_parse_round_trip() {
        let t = Topics::default();
        let f = FleetId::new("plant-7").unwrap();
        let r = RolloutId::new("fw-2.3").unwrap();
        let d = DeviceId::new("rpi-0042").unwrap();
        let cases = [
            (
                t.manifest(&f, &r),
                Topic::Manifest {
                    fleet: f.clone(),
                    rollout: r.clone(),
                },
            ),
            (t.beacon(&f), Topic::Beacon { fleet: f.clone() }),
            (t.keys(&f), Topic::Keys { fleet: f.clone() }),
            (t.desired(&d), Topic::Desired { device: d.clone() }),
            (t.enrolled(&d), Topic::Enrolled { device: d.clone() }),
            (t.hello(&d), Topic::Hello { device: d.clone() }),
            (t.report(&d), Topic::Report { device: d.clone() }),
            (t.online(&d), Topic::Online { device: d.clone() }),
            (t.ops_cmd(&f), Topic::OpsCmd { fleet: f.clone() }),
            (
                t.ops_status(&f, &r),
                Topic::OpsStatus {
                    fleet: f.clone(),
                    rollout: r.clone(),
                },
            ),
            (t.ops_events(&f), Topic::OpsEvents { fleet: f.clone() }),
            (t.coordinator(&f), Topic::Coordinator { fleet: f.clone() }),
            (t.legacy_ops_cmd(), Topic::LegacyOpsCmd),
        ];
        for (s, want) in cases {
            assert_eq!(t.parse(&s).unwrap(), want, "{s}");
        }
        assert_eq!(t.manifest(&f, &r), "swell/v1/fleet/plant-7/manifest/fw-2.3");
        assert_eq!(t.ops_cmd(&f), "swell/v1/ops/plant-7/cmd");
        assert_eq!(
            t.ops_status(&f, &r),
            "swell/v1/ops/plant-7/rollout/fw-2.3/status"
        );
        // A fleet may be called like a level of the tree.
        let odd = FleetId::new("rollout").unwrap();
        assert_eq!(
            t.parse(&t.ops_cmd(&odd)).unwrap(),
            Topic::OpsCmd { fleet: odd.clone() }
        );
        // A probe is never a device's topic.
        assert_eq!(t.probe("report"), "swell/v1/dev/_probe/report");
        assert!(t.parse(&t.probe("report")).is_err());
    }

    #[test]
    fn topics_parse_rejects_wildcards_and_strangers() {
        let t = Topics::default();
        for bad in [
            "swell/v1/dev/+/report",
            "swell/v1/dev/#",
            "swell/v1/dev/a#/report",
            "swell/v1/dev/$sys/report",
            "swell/v1/dev/UPPER/report",
            "swell/v1/dev/x/other",
            "swell/v1/dev/x/report/extra",
            "swell/v1/dev//report",
            "swell/v2/dev/x/report",
            "other/dev/x/report",
            "swell/v1",
            "swell/v1x/ops/cmd",
            "swell/v1/ops/rollout/r/status",
            "swell/v1/ops/coordinator",
            "swell/v1/ops/F/cmd",
            "",
        ] {
            assert!(t.parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn topics_prefix_validation() {
        assert!(Topics::new("swell/v1").is_ok());
        assert!(Topics::new("acme/prod.eu/swell").is_ok());
        for bad in ["", "/x", "x/", "a//b", "a/+", "a/#", "$SYS", "a b"] {
            assert!(Topics::new(bad).is_err(), "{bad:?}");
        }
    }
}
