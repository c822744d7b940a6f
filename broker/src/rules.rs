//! Who may do what on Swell's topic tree (SECURITY MQTT-1, MQTT-8): one table
//! of grants per role, read by the embedded broker at every CONNECT, SUBSCRIBE
//! and PUBLISH, and rendered into the Mosquitto configuration Swell ships
//! ([`crate::mosquitto`]), so the two brokers enforce the same rules.
//!
//! Identity is the authenticated user name, never the client id or the topic: a
//! device's user name is its device id, and `{user}` in a grant stands for it.
//! Client ids are bound to roles ([`Rules::may_use_client_id`]): a device may
//! connect only as `swell-agent-{its id}`, and no role may use another role's
//! client ids, so no client can take another one's session.
//!
//! Pure: no I/O; property-free string matching on MQTT topic levels.

/// What a user is, as its credentials say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The coordinator: publishes under the prefix, reads device channels and
    /// commands (plain subscriptions, or shared ones for replicas).
    Coordinator,
    /// An operator: sends commands, reads statuses, events, fleet topics and its
    /// own replies.
    Operator,
    /// One device: writes its own channels, reads its fleet's manifests, beacon
    /// and key list and its own desired state.
    Device,
    /// A gateway that speaks for many devices (the fleet simulator, protocol
    /// gateways): the device rights of every device. It cannot forge a device's
    /// report: each is signed by the device's own key (MQTT-6).
    Gateway,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Operator => "operator",
            Role::Device => "device",
            Role::Gateway => "gateway",
        }
    }

    pub const ALL: [Role; 4] = [
        Role::Coordinator,
        Role::Operator,
        Role::Device,
        Role::Gateway,
    ];
}

/// An authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub role: Role,
}

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Publish,
    Subscribe,
}

/// One line of the table: `filter` may contain `{user}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub access: Access,
    pub filter: String,
}

/// Prefix of the replies topics; an operator reads `swell-ops/{user}/#`.
pub const REPLIES_ROOT: &str = "swell-ops";

/// The client ids reserved for a role: a device's is exactly
/// `swell-agent-{id}`, the coordinator's and a gateway's start with these
/// prefixes. Operators (the CLI, `mosquitto_pub`) may use any other id.
pub fn client_id_prefix(role: Role) -> Option<&'static str> {
    match role {
        Role::Coordinator => Some("swell-coordinator-"),
        Role::Operator => None,
        Role::Device => Some("swell-agent-"),
        Role::Gateway => Some("swell-gw-"),
    }
}

/// The rules for one topic prefix and fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    prefix: String,
    /// `None`: any fleet (one fleet per broker is the usual set-up).
    fleet: Option<String>,
}

impl Rules {
    pub fn new(prefix: &str, fleet: Option<&str>) -> Self {
        Rules {
            prefix: prefix.to_string(),
            fleet: fleet.map(str::to_string),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The table for `role`.
    pub fn grants(&self, role: Role) -> Vec<Grant> {
        let p = &self.prefix;
        let f = self.fleet.as_deref().unwrap_or("+");
        let publish = |filter: String| Grant {
            access: Access::Publish,
            filter,
        };
        let subscribe = |filter: String| Grant {
            access: Access::Subscribe,
            filter,
        };
        let fleet_reads = |g: &mut Vec<Grant>| {
            g.push(subscribe(format!("{p}/fleet/{f}/manifest/+")));
            g.push(subscribe(format!("{p}/fleet/{f}/beacon")));
            g.push(subscribe(format!("{p}/fleet/{f}/keys")));
        };
        let mut g = Vec::new();
        match role {
            Role::Coordinator => {
                g.push(publish(format!("{p}/#")));
                g.push(publish(format!("{REPLIES_ROOT}/#")));
                for channel in ["hello", "report", "online"] {
                    g.push(subscribe(format!("{p}/dev/+/{channel}")));
                    g.push(subscribe(format!("$share/+/{p}/dev/+/{channel}")));
                }
                g.push(subscribe(format!("{p}/ops/{f}/cmd")));
                g.push(subscribe(format!("$share/+/{p}/ops/{f}/cmd")));
                // Its fleet's presence (one coordinator per fleet and prefix),
                // and the command topic of clients from before the fleet level
                // (answered with a refusal that names the new one).
                g.push(subscribe(format!("{p}/ops/{f}/coordinator")));
                g.push(subscribe(format!("{p}/ops/cmd")));
            }
            Role::Operator => {
                g.push(publish(format!("{p}/ops/{f}/cmd")));
                g.push(publish(format!("{p}/ops/cmd")));
                g.push(subscribe(format!("{p}/ops/#")));
                g.push(subscribe(format!("{p}/fleet/#")));
                g.push(subscribe(format!("{REPLIES_ROOT}/{{user}}/#")));
            }
            Role::Device => {
                for channel in ["hello", "report", "online"] {
                    g.push(publish(format!("{p}/dev/{{user}}/{channel}")));
                }
                fleet_reads(&mut g);
                g.push(subscribe(format!("{p}/dev/{{user}}/desired")));
                g.push(subscribe(format!("{p}/dev/{{user}}/enrolled")));
            }
            Role::Gateway => {
                for channel in ["hello", "report", "online"] {
                    g.push(publish(format!("{p}/dev/+/{channel}")));
                }
                fleet_reads(&mut g);
                g.push(subscribe(format!("{p}/dev/+/desired")));
                g.push(subscribe(format!("{p}/dev/+/enrolled")));
            }
        }
        g
    }

    /// Whether `id` may publish on the concrete `topic` (a will included).
    pub fn may_publish(&self, id: &Identity, topic: &str) -> bool {
        if topic.is_empty() || topic.contains(['+', '#']) {
            return false;
        }
        self.grants(id.role).iter().any(|g| {
            g.access == Access::Publish
                && topic_matches(&g.filter.replace("{user}", &id.user), topic)
        })
    }

    /// Whether `id` may subscribe to `filter`: every topic the filter can match
    /// must be one a grant allows (a `$share/{group}/` filter is a filter of its
    /// own, granted only where the table says so).
    pub fn may_subscribe(&self, id: &Identity, filter: &str) -> bool {
        if !valid_filter(filter) {
            return false;
        }
        self.grants(id.role).iter().any(|g| {
            g.access == Access::Subscribe && covers(&g.filter.replace("{user}", &id.user), filter)
        })
    }

    /// Whether `id` may connect as `client_id`: a device only as
    /// `swell-agent-{user}`, the coordinator and gateways only under their
    /// prefix, operators under none of those.
    pub fn may_use_client_id(&self, id: &Identity, client_id: &str) -> bool {
        match (id.role, client_id_prefix(id.role)) {
            (Role::Device, Some(prefix)) => {
                client_id.strip_prefix(prefix) == Some(id.user.as_str())
            }
            (_, Some(prefix)) => client_id.len() > prefix.len() && client_id.starts_with(prefix),
            (_, None) => {
                !client_id.is_empty()
                    && !Role::ALL
                        .iter()
                        .filter_map(|r| client_id_prefix(*r))
                        .any(|p| client_id.starts_with(p))
            }
        }
    }
}

/// MQTT topic-filter matching of a concrete topic (no wildcards in `topic`).
/// A filter starting with a wildcard does not match a `$` topic (MQTT 4.7.2).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic `filter` can match is matched by `grant` (both may hold
/// wildcards). `#` in the grant covers the rest; `+` covers one level of any
/// kind; a literal covers only itself.
pub fn covers(grant: &str, filter: &str) -> bool {
    let mut g = grant.split('/');
    let mut f = filter.split('/');
    loop {
        match (g.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(a), Some(b)) if a == b && b != "+" && b != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A well-formed topic filter: no empty filter, `#` only as the last level,
/// wildcards only as whole levels.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules::new("swell/v1", Some("lab"))
    }

    fn id(user: &str, role: Role) -> Identity {
        Identity {
            user: user.into(),
            role,
        }
    }

    #[test]
    fn rules_topic_matching() {
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(topic_matches("a/#", "a"));
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(!topic_matches("a/+", "a/b/c"));
        assert!(!topic_matches("a/b", "a/b/c"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(topic_matches("$share/+/a", "$share/g/a"));
    }

    #[test]
    fn rules_covering() {
        assert!(covers("a/+/c", "a/x/c"));
        assert!(covers("a/+/c", "a/+/c"));
        assert!(
            !covers("a/x/c", "a/+/c"),
            "a literal does not cover a wildcard"
        );
        assert!(!covers("a/+/c", "a/#"));
        assert!(covers("a/#", "a/+/c/#"));
        assert!(!covers("a/+", "a/b/c"));
        assert!(!covers(
            "swell/v1/dev/+/report",
            "$share/g/swell/v1/dev/+/report"
        ));
        assert!(covers(
            "$share/+/swell/v1/dev/+/report",
            "$share/g/swell/v1/dev/+/report"
        ));
        assert!(!valid_filter("a/#/b"));
        assert!(!valid_filter("a/b+"));
        assert!(!valid_filter(""));
        assert!(valid_filter("+/+/#"));
    }

    // MQTT-1: a device writes only its own channels and reads its fleet and its
    // own desired state.
    #[test]
    fn rules_device_is_confined_to_its_own_topics() {
        let r = rules();
        let a = id("dev-a", Role::Device);
        for ch in ["hello", "report", "online"] {
            assert!(r.may_publish(&a, &format!("swell/v1/dev/dev-a/{ch}")));
            assert!(!r.may_publish(&a, &format!("swell/v1/dev/dev-b/{ch}")));
        }
        for t in [
            "swell/v1/dev/dev-a/desired",
            "swell/v1/dev/dev-a/enrolled",
            "swell/v1/fleet/lab/manifest/r",
            "swell/v1/fleet/lab/beacon",
            "swell/v1/fleet/lab/keys",
            "swell/v1/ops/cmd",
            "swell/v1/ops/lab/cmd",
            "swell/v1/ops/lab/coordinator",
            "swell-ops/operator/x/replies",
            "swell/v1/dev/_probe/report",
        ] {
            assert!(!r.may_publish(&a, t), "{t}");
        }
        for f in [
            "swell/v1/fleet/lab/manifest/+",
            "swell/v1/fleet/lab/manifest/app-2",
            "swell/v1/fleet/lab/beacon",
            "swell/v1/fleet/lab/keys",
            "swell/v1/dev/dev-a/desired",
            "swell/v1/dev/dev-a/enrolled",
        ] {
            assert!(r.may_subscribe(&a, f), "{f}");
        }
        for f in [
            "swell/v1/dev/dev-b/desired",
            "swell/v1/dev/dev-b/enrolled",
            "swell/v1/dev/+/enrolled",
            "swell/v1/dev/+/desired",
            "swell/v1/dev/+/report",
            "$share/swell-report/swell/v1/dev/+/report",
            "$share/x/swell/v1/fleet/lab/beacon",
            "swell/v1/fleet/other/beacon",
            "swell/v1/fleet/#",
            "swell/v1/#",
            "#",
            "swell-ops/operator/#",
            "$SYS/#",
        ] {
            assert!(!r.may_subscribe(&a, f), "{f}");
        }
    }

    #[test]
    fn rules_operator_reads_its_own_replies_only() {
        let r = rules();
        let op = id("ann", Role::Operator);
        assert!(r.may_publish(&op, "swell/v1/ops/lab/cmd"));
        assert!(!r.may_publish(&op, "swell/v1/ops/lab/coordinator"));
        assert!(!r.may_publish(&op, "swell/v1/fleet/lab/manifest/r"));
        assert!(!r.may_publish(&op, "swell/v1/dev/d/report"));
        assert!(r.may_subscribe(&op, "swell-ops/ann/swell-ops-ann-1/replies"));
        assert!(r.may_subscribe(&op, "swell/v1/ops/lab/rollout/+/status"));
        assert!(r.may_subscribe(&op, "swell/v1/ops/+/coordinator"));
        assert!(r.may_subscribe(&op, "swell/v1/fleet/#"));
        assert!(!r.may_subscribe(&op, "swell-ops/bob/#"));
        assert!(!r.may_subscribe(&op, "swell-ops/#"));
        assert!(!r.may_subscribe(&op, "$share/g/swell/v1/dev/+/report"));
        assert!(!r.may_subscribe(&op, "swell/v1/dev/+/report"));
    }

    #[test]
    fn rules_coordinator_and_gateway() {
        let r = rules();
        let c = id("coordinator", Role::Coordinator);
        assert!(r.may_subscribe(&c, "$share/swell-report/swell/v1/dev/+/report"));
        assert!(r.may_subscribe(&c, "swell/v1/dev/+/online"));
        assert!(r.may_subscribe(&c, "swell/v1/ops/lab/cmd"));
        assert!(r.may_subscribe(&c, "swell/v1/ops/lab/coordinator"));
        assert!(!r.may_subscribe(&c, "swell/v1/ops/+/events"));
        assert!(r.may_publish(&c, "swell/v1/dev/_probe/report"));
        assert!(r.may_publish(&c, "swell-ops/ann/x/replies"));
        assert!(!r.may_subscribe(&c, "swell/v1/dev/+/desired"));
        let g = id("gateway", Role::Gateway);
        assert!(r.may_publish(&g, "swell/v1/dev/anyone/report"));
        assert!(!r.may_publish(&g, "swell/v1/fleet/lab/beacon"));
        assert!(r.may_subscribe(&g, "swell/v1/dev/+/desired"));
        assert!(!r.may_subscribe(&g, "$share/x/swell/v1/dev/+/report"));
        assert!(!r.may_subscribe(&g, "swell/v1/dev/+/report"));
    }

    // MQTT-8: no client can use another's client id.
    #[test]
    fn rules_client_ids_are_bound_to_identities() {
        let r = rules();
        let a = id("dev-a", Role::Device);
        assert!(r.may_use_client_id(&a, "swell-agent-dev-a"));
        for other in [
            "swell-agent-dev-b",
            "swell-agent-dev-a-2",
            "swell-coordinator-lab",
            "swell-ops-x",
            "dev-a",
            "",
        ] {
            assert!(!r.may_use_client_id(&a, other), "{other}");
        }
        let c = id("coordinator", Role::Coordinator);
        assert!(r.may_use_client_id(&c, "swell-coordinator-lab"));
        assert!(r.may_use_client_id(&c, "swell-coordinator-lab-standby-pod-1"));
        assert!(!r.may_use_client_id(&c, "swell-agent-dev-a"));
        assert!(!r.may_use_client_id(&c, "swell-coordinator-"));
        let op = id("operator", Role::Operator);
        assert!(!r.may_use_client_id(&op, "swell-coordinator-lab"));
        assert!(!r.may_use_client_id(&op, "swell-agent-dev-a"));
        assert!(!r.may_use_client_id(&op, "swell-gw-sim-0"));
        assert!(r.may_use_client_id(&op, "swell-ops-operator-42"));
        assert!(r.may_use_client_id(&op, "mosq-Jx8s0"));
        let g = id("gateway", Role::Gateway);
        assert!(!r.may_use_client_id(&g, "swell-agent-dev-a"));
        assert!(r.may_use_client_id(&g, "swell-gw-sim-0"));
    }
}
