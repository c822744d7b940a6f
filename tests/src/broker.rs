//! The broker of a test, with the configuration Swell ships: Mosquitto (the
//! shipped `deploy/` configuration) when `SWELL_TEST_MOSQUITTO=required`, else
//! the embedded broker. Either way clients authenticate: the coordinator,
//! operator and gateway users with their passwords, a device with its id and
//! its own password ([`TestBroker::device_login`]).

use crate::mosquitto::{Mosquitto, Shipped, StartError};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::time::Duration;
use swell_broker::mosquitto::{Login, Users};
use swell_broker::{BrokerConfig, Credentials, EmbeddedBroker, Role, Rules};

/// Which broker runs.
#[derive(Debug)]
pub enum Kind {
    Embedded(EmbeddedBroker),
    Mosquitto(Mosquitto),
}

/// A broker for one test; stopped on drop.
#[derive(Debug)]
pub struct TestBroker {
    pub kind: Kind,
    pub host: String,
    pub port: u16,
    creds: Credentials,
    _dir: tempfile::TempDir,
}

const ADMIN: &str = "admin";
const FLEET: Option<&str> = None;

impl TestBroker {
    /// Mosquitto when required (panics if it cannot start), else embedded.
    pub fn start() -> TestBroker {
        if crate::mosquitto::required() {
            return Self::mosquitto(false).unwrap_or_else(|e| panic!("mosquitto: {e:?}"));
        }
        Self::embedded()
    }

    /// The embedded broker on a free loopback port.
    pub fn embedded() -> TestBroker {
        Self::embedded_with(Rules::new(swell_protocol::topics::DEFAULT_PREFIX, FLEET))
    }

    pub fn embedded_with(rules: Rules) -> TestBroker {
        let dir = tempfile::tempdir().expect("tempdir");
        let creds = Credentials::load_or_create(&dir.path().join("broker")).expect("credentials");
        let b = EmbeddedBroker::start(BrokerConfig::new(
            "127.0.0.1:0".parse().expect("address"),
            creds.clone(),
            rules,
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let port = b.addr().port();
        TestBroker {
            kind: Kind::Embedded(b),
            host: "127.0.0.1".into(),
            port,
            creds,
            _dir: dir,
        }
    }

    /// Mosquitto with the shipped configuration (`persistence` as shipped or
    /// off). `Err(Missing)` when it is not installed and not required.
    pub fn mosquitto(persistence: bool) -> Result<TestBroker, StartError> {
        Self::mosquitto_with(persistence, "")
    }

    /// [`TestBroker::mosquitto`] with more configuration lines (a TLS listener).
    pub fn mosquitto_with(persistence: bool, extra: &str) -> Result<TestBroker, StartError> {
        let dir = tempfile::tempdir().map_err(|e| StartError::Failed(e.to_string()))?;
        let creds = Credentials::load_or_create(&dir.path().join("broker"))
            .map_err(|e| StartError::Failed(e.to_string()))?;
        let login = |user: &str, role: Role| Login {
            user: user.into(),
            password: creds.password(role).unwrap_or_default().into(),
        };
        let users = Users {
            admin: Some(Login {
                user: ADMIN.into(),
                password: admin_password(&creds),
            }),
            coordinator: Some(login(
                swell_broker::credentials::COORDINATOR_USER,
                Role::Coordinator,
            )),
            operators: vec![login(
                swell_broker::credentials::OPERATOR_USER,
                Role::Operator,
            )],
            gateways: vec![login(
                swell_broker::credentials::GATEWAY_USER,
                Role::Gateway,
            )],
            devices: vec![],
        };
        let rules = Rules::new(swell_protocol::topics::DEFAULT_PREFIX, FLEET);
        let dynsec = swell_broker::mosquitto::dynamic_security(&rules, &users)
            .map_err(|e| StartError::Failed(e.to_string()))?;
        let m = Mosquitto::start_shipped(&Shipped {
            dynsec: dynsec.to_string(),
            persistence,
            extra: extra.into(),
        })?;
        let port = m.port();
        Ok(TestBroker {
            kind: Kind::Mosquitto(m),
            host: "127.0.0.1".into(),
            port,
            creds,
            _dir: dir,
        })
    }

    pub fn url(&self) -> String {
        format!("mqtt://{}:{}", self.host, self.port)
    }

    pub fn is_mosquitto(&self) -> bool {
        matches!(self.kind, Kind::Mosquitto(_))
    }

    pub fn mosquitto_mut(&mut self) -> Option<&mut Mosquitto> {
        match &mut self.kind {
            Kind::Mosquitto(m) => Some(m),
            Kind::Embedded(_) => None,
        }
    }

    pub fn embedded_broker(&self) -> Option<&EmbeddedBroker> {
        match &self.kind {
            Kind::Embedded(b) => Some(b),
            Kind::Mosquitto(_) => None,
        }
    }

    /// User name and password of the coordinator, operator or gateway user.
    pub fn login(&self, role: Role) -> (String, String) {
        let user = match role {
            Role::Coordinator => swell_broker::credentials::COORDINATOR_USER,
            Role::Operator => swell_broker::credentials::OPERATOR_USER,
            Role::Gateway => swell_broker::credentials::GATEWAY_USER,
            Role::Device => panic!("a device logs in with device_login"),
        };
        (
            user.to_string(),
            self.creds.password(role).unwrap_or_default().to_string(),
        )
    }

    /// A device's user name (its id) and password.
    pub fn device_login(&self, device: &str) -> (String, String) {
        (device.to_string(), self.creds.device_password(device))
    }

    /// A file holding `password`, for clients that read it from one.
    pub fn password_file(&self, name: &str, password: &str) -> std::path::PathBuf {
        let p = self._dir.path().join(format!("{name}.password"));
        let _ = std::fs::write(&p, format!("{password}\n"));
        p
    }

    /// Makes the devices known to the broker. The embedded broker knows every
    /// device's password already; Mosquitto gets a client per device over the
    /// plugin's control topic, as `mosquitto_ctrl dynsec createClient` does.
    pub async fn add_devices(&self, ids: &[String]) {
        if !self.is_mosquitto() || ids.is_empty() {
            return;
        }
        let commands: Vec<serde_json::Value> = ids
            .iter()
            .map(|id| {
                serde_json::json!({
                    "command": "createClient",
                    "username": id,
                    "password": self.creds.device_password(id),
                    "clientid": format!("swell-agent-{id}"),
                    "roles": [{"rolename": "swell-device"}],
                })
            })
            .collect();
        let mut opts = MqttOptions::new("swell-test-admin", self.host.clone(), self.port);
        opts.set_credentials(ADMIN, admin_password(&self.creds));
        opts.set_max_packet_size(Some(64 << 20));
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let response = "$CONTROL/dynamic-security/v1/response";
        client
            .subscribe(response, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let mut sent = false;
        let mut answered = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        // One message per 500 devices: the plugin saves its file after every
        // command, and one huge message would keep the broker busy for long.
        let chunks: Vec<_> = commands.chunks(500).map(|c| c.to_vec()).collect();
        while answered < chunks.len() {
            let ev = tokio::time::timeout_at(deadline, eventloop.poll())
                .await
                .expect("dynamic-security answered in time")
                .expect("admin connection");
            match ev {
                Event::Incoming(Packet::SubAck(_)) if !sent => {
                    sent = true;
                    for c in &chunks {
                        client
                            .publish(
                                "$CONTROL/dynamic-security/v1",
                                QoS::AtLeastOnce,
                                false,
                                serde_json::json!({ "commands": c }).to_string(),
                            )
                            .await
                            .expect("publish");
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let v: serde_json::Value =
                        serde_json::from_slice(&p.payload).expect("a JSON response");
                    for r in v["responses"].as_array().into_iter().flatten() {
                        // Known already: made by an earlier call.
                        let known = r["error"] == "Client already exists";
                        assert!(r.get("error").is_none() || known, "dynamic-security: {r}");
                    }
                    answered += 1;
                }
                _ => {}
            }
        }
        let _ = client.disconnect().await;
    }
}

fn admin_password(creds: &Credentials) -> String {
    // Derived like a device's, under a name no device can have.
    creds.device_password("_admin")
}
