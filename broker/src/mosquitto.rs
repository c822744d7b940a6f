//! The Mosquitto 2.0 configuration that enforces [`Rules`], rendered from the
//! same table the embedded broker reads, so the two cannot drift
//! (`deploy/k3s/mosquitto.yaml` ships the ACL file; a test checks it equals
//! [`acl_file`]).
//!
//! Mosquitto's `acl_file` cannot refuse a subscription (its subscribe check is
//! an unconditional yes in 2.0), so a device could join a `$share` group on
//! the report filter (when the coordinator still subscribed through one, it
//! took half of the fleet's reports, which the ACL then dropped on delivery). And a client id is not bound to anyone, so any client
//! could connect with another's id and take its session. Two mechanisms, chained:
//!
//! - the **dynamic-security plugin** ([`dynamic_security`]) authenticates every
//!   client (PBKDF2-SHA512 password hashes), binds each device to its client id
//!   `swell-agent-{id}`, and decides every subscription, and every publish and
//!   delivery of the coordinator, operators and gateways; each role ends in an
//!   explicit deny, so nothing of theirs falls through;
//! - the **ACL file** ([`acl_file`]) decides a device's publishes and
//!   deliveries with `%u` patterns (the plugin has no per-user substitution in
//!   2.0, and defers a device's publish checks to the next check in the chain).
//!
//! Mosquitto 2.0 cannot express "an operator may not use a client id of the
//! coordinator's" (the plugin binds a client to one id, and operators need
//! many); operators are trusted with that. The embedded broker enforces it.

use crate::rules::{Access, Role, Rules};
use base64::Engine as _;
use serde_json::{Value, json};

/// A user and password.
#[derive(Debug, Clone)]
pub struct Login {
    pub user: String,
    pub password: String,
}

/// Every client the broker should know.
#[derive(Debug, Clone, Default)]
pub struct Users {
    /// May administer the plugin over `$CONTROL/dynamic-security/#`
    /// (`mosquitto_ctrl`).
    pub admin: Option<Login>,
    pub coordinator: Option<Login>,
    pub operators: Vec<Login>,
    pub gateways: Vec<Login>,
    /// User name = device id.
    pub devices: Vec<Login>,
}

/// The iterations dynsec itself uses for new passwords.
const ITERATIONS: u32 = 101;

/// A dynsec password entry: PBKDF2-HMAC-SHA512 over a 12-byte salt.
fn hashed(password: &str) -> Result<(String, String), getrandom::Error> {
    let mut salt = [0u8; 12];
    getrandom::fill(&mut salt)?;
    let mut hash = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password.as_bytes(), &salt, ITERATIONS, &mut hash);
    let b64 = base64::engine::general_purpose::STANDARD;
    Ok((b64.encode(salt), b64.encode(hash)))
}

/// The ACL file: a device's publishes and deliveries.
pub fn acl_file(rules: &Rules) -> String {
    let mut out = String::from(
        "# Rendered from swell-broker's rules (swell broker mosquitto-acl); do not edit.\n\
         # Devices authenticate with their device id as user name (%u). The\n\
         # dynamic-security plugin decides every subscription and everything of the\n\
         # coordinator, operators and gateways; it defers a device's publishes and\n\
         # deliveries to these lines.\n",
    );
    for g in rules.grants(Role::Device) {
        let verb = match g.access {
            Access::Publish => "write",
            // What a device may subscribe to is what may be delivered to it.
            Access::Subscribe => "read",
        };
        out.push_str(&format!(
            "pattern {verb} {}\n",
            g.filter.replace("{user}", "%u")
        ));
    }
    out
}

fn acl(acltype: &str, topic: &str, allow: bool, priority: i64) -> Value {
    json!({"acltype": acltype, "topic": topic, "allow": allow, "priority": priority})
}

/// The plugin's roles for `role`: its grants (a `{user}` level becomes `+`,
/// the plugin has no substitution: the ACL file narrows a device's, a
/// per-operator role an operator's), then a deny of everything else. A device's
/// publishes and deliveries are left to the ACL file.
fn role_acls(rules: &Rules, role: Role, user: Option<&str>) -> Vec<Value> {
    let mut acls = Vec::new();
    for g in rules.grants(role) {
        let topic = match user {
            Some(u) => g.filter.replace("{user}", u),
            None if g.filter.contains("{user}") => continue,
            None => g.filter.clone(),
        };
        match g.access {
            Access::Subscribe => {
                acls.push(acl("subscribePattern", &topic, true, 10));
                if role != Role::Device {
                    acls.push(acl("publishClientReceive", &topic, true, 10));
                }
            }
            Access::Publish if role != Role::Device => {
                acls.push(acl("publishClientSend", &topic, true, 10));
            }
            Access::Publish => {}
        }
    }
    acls
}

fn deny_rest(device: bool) -> Vec<Value> {
    let mut v = vec![acl("subscribePattern", "#", false, 0)];
    if !device {
        v.push(acl("publishClientSend", "#", false, 0));
        v.push(acl("publishClientReceive", "#", false, 0));
    }
    v
}

fn client(
    login: &Login,
    clientid: Option<String>,
    roles: &[&str],
) -> Result<Value, getrandom::Error> {
    let (salt, password) = hashed(&login.password)?;
    let mut c = json!({
        "username": login.user,
        "salt": salt,
        "password": password,
        "iterations": ITERATIONS,
        "roles": roles.iter().map(|r| json!({"rolename": r})).collect::<Vec<_>>(),
    });
    if let Some(id) = clientid {
        c["clientid"] = json!(id);
    }
    Ok(c)
}

/// The plugin's whole configuration (`plugin_opt_config_file`), with a
/// freshly salted hash for every password.
pub fn dynamic_security(rules: &Rules, users: &Users) -> Result<Value, getrandom::Error> {
    let mut roles = Vec::new();
    let role_of = |name: &str, mut acls: Vec<Value>, device: bool| {
        acls.extend(deny_rest(device));
        json!({"rolename": name, "acls": acls})
    };
    roles.push(role_of(
        "swell-coordinator",
        role_acls(rules, Role::Coordinator, None),
        false,
    ));
    roles.push(role_of(
        "swell-gateway",
        role_acls(rules, Role::Gateway, None),
        false,
    ));
    // A device's own topics are `{p}/dev/{id}/desired` and `.../enrolled`; the
    // plugin lets it subscribe to `{p}/dev/+/...` and the ACL file delivers
    // only its own.
    let device_subs: Vec<Value> = rules
        .grants(Role::Device)
        .into_iter()
        .filter(|g| g.access == Access::Subscribe)
        .map(|g| {
            acl(
                "subscribePattern",
                &g.filter.replace("{user}", "+"),
                true,
                10,
            )
        })
        .collect();
    roles.push(role_of("swell-device", device_subs, true));
    // Everything of an operator but its replies is common; the replies topic
    // names the operator, so each has a role of its own for it.
    roles.push(role_of(
        "swell-operator",
        role_acls(rules, Role::Operator, None),
        false,
    ));
    let mut clients = Vec::new();
    if let Some(admin) = &users.admin {
        roles.push(json!({"rolename": "swell-admin", "acls": [
            acl("publishClientSend", "$CONTROL/dynamic-security/#", true, 0),
            acl("publishClientReceive", "$CONTROL/dynamic-security/#", true, 0),
            acl("subscribePattern", "$CONTROL/dynamic-security/#", true, 0),
        ]}));
        clients.push(client(admin, None, &["swell-admin"])?);
    }
    if let Some(c) = &users.coordinator {
        clients.push(client(c, None, &["swell-coordinator"])?);
    }
    for op in &users.operators {
        let own = format!("swell-operator-{}", op.user);
        let acls: Vec<Value> = rules
            .grants(Role::Operator)
            .into_iter()
            .filter(|g| g.filter.contains("{user}"))
            .flat_map(|g| {
                let t = g.filter.replace("{user}", &op.user);
                [
                    acl("subscribePattern", &t, true, 20),
                    acl("publishClientReceive", &t, true, 20),
                ]
            })
            .collect();
        roles.push(json!({"rolename": own, "acls": acls}));
        let mut c = client(op, None, &[own.as_str()])?;
        // The common role after the operator's own (a role's deny-all must not
        // shadow the replies grant).
        if let Some(list) = c["roles"].as_array_mut() {
            list[0]["priority"] = json!(1);
            list.push(json!({"rolename": "swell-operator", "priority": 0}));
        }
        clients.push(c);
    }
    for g in &users.gateways {
        clients.push(client(g, None, &["swell-gateway"])?);
    }
    for d in &users.devices {
        clients.push(client(
            d,
            Some(format!(
                "{}{}",
                crate::rules::client_id_prefix(Role::Device).unwrap_or_default(),
                d.user
            )),
            &["swell-device"],
        )?);
    }
    Ok(json!({
        "clients": clients,
        "groups": [],
        "roles": roles,
        "defaultACLAccess": {
            "publishClientSend": false,
            "publishClientReceive": false,
            "subscribe": false,
            "unsubscribe": true
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mosquitto_acl_file_confines_devices_by_user_name() {
        let a = acl_file(&Rules::new("swell/v1", None));
        assert!(a.contains("pattern write swell/v1/dev/%u/report\n"), "{a}");
        assert!(a.contains("pattern read swell/v1/dev/%u/desired\n"), "{a}");
        assert!(
            a.contains("pattern read swell/v1/fleet/+/manifest/+\n"),
            "{a}"
        );
        assert!(
            !a.lines().any(|l| l.starts_with("user ")),
            "fixed roles live in the plugin: {a}"
        );
    }

    #[test]
    fn mosquitto_dynamic_security_roles_end_in_deny_and_devices_are_bound() {
        let users = Users {
            coordinator: Some(Login {
                user: "coordinator".into(),
                password: "pw-coordinator-0123".into(),
            }),
            operators: vec![Login {
                user: "ann".into(),
                password: "pw-ann-0123456789".into(),
            }],
            devices: vec![Login {
                user: "dev-1".into(),
                password: "pw-dev-1-01234567".into(),
            }],
            ..Users::default()
        };
        let j = dynamic_security(&Rules::new("swell/v1", Some("lab")), &users).unwrap();
        let dev = j["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["username"] == "dev-1")
            .unwrap();
        assert_eq!(dev["clientid"], "swell-agent-dev-1");
        assert_eq!(dev["iterations"], 101);
        let salt = base64::engine::general_purpose::STANDARD
            .decode(dev["salt"].as_str().unwrap())
            .unwrap();
        assert_eq!(salt.len(), 12);
        for role in j["roles"].as_array().unwrap() {
            let acls = role["acls"].as_array().unwrap();
            if role["rolename"]
                .as_str()
                .unwrap()
                .starts_with("swell-operator-")
                || role["rolename"] == "swell-admin"
            {
                continue;
            }
            assert!(
                acls.iter().any(|a| a["topic"] == "#"
                    && a["allow"] == false
                    && a["acltype"] == "subscribePattern"),
                "{role}"
            );
        }
        let text = j.to_string();
        assert!(text.contains("swell-ops/ann/#"), "{text}");
        assert!(!text.contains("pw-ann"), "no password in clear");
    }
}
