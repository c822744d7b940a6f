//! The coordinator reaches a broker over TLS (rustls with ring): Mosquitto with a
//! TLS listener whose certificate a test CA signed. A wrong CA never connects.
//! Needs Mosquitto (skipped with a line when absent and not required).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use swell_coordinator::metrics::Metrics;
use swell_coordinator::server::{Hooks, LoopConfig};
use swell_e2e::mosquitto::{self, StartError};
use swell_mqtt::{MqttConfig, TlsPem};
use tokio_util::sync::CancellationToken;

fn ca() -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

struct Running {
    cancel: CancellationToken,
    ready: tokio::sync::watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
}

async fn run_coordinator(cfg: MqttConfig) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let c = cancel.clone();
    let metrics = Arc::new(Metrics::new());
    let hooks = Hooks {
        metrics: Some(metrics.clone()),
        ..Hooks::default()
    };
    let lc = LoopConfig {
        tick: Duration::from_millis(200),
        beacon_interval: Duration::from_secs(10),
        ..LoopConfig::default()
    };
    let started = assembled(dir.path(), settings(1), cfg, lc);
    tokio::spawn(async move {
        started.serve(c, tx, hooks).await.unwrap();
    });
    Running {
        cancel,
        ready: rx,
        metrics,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_connects_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, issuer) = ca();
    let srv_key = KeyPair::generate().unwrap();
    let srv = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&srv_key, &issuer)
        .unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("ca.pem"), &ca_pem).unwrap();
    std::fs::write(p("server.pem"), srv.pem()).unwrap();
    std::fs::write(p("server.key"), srv_key.serialize_pem()).unwrap();
    let tls_port = mosquitto::free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
        p("ca.pem").display(),
        p("server.pem").display(),
        p("server.key").display()
    );
    // The shipped configuration with a TLS listener added.
    let plain = match TestBroker::mosquitto_with(false, &extra) {
        Ok(m) => m,
        Err(StartError::Missing) => {
            eprintln!("SKIPPED coordinator_connects_over_tls: mosquitto not installed");
            return;
        }
        Err(StartError::Failed(e)) => panic!("{e}"),
    };
    let mut cfg = mqtt_config(&plain, "tls-coordinator");
    cfg.port = tls_port;
    cfg.tls = Some(TlsPem {
        ca: ca_pem.into_bytes(),
        client: None,
    });
    let mut good = run_coordinator(cfg.clone()).await;
    tokio::time::timeout(Duration::from_secs(10), good.ready.wait_for(|r| *r))
        .await
        .expect("connected over TLS")
        .unwrap();
    // An operator on the plain listener of the same broker gets answers.
    let mut op = Operator::start(&plain).await;
    let r = op.command_when_up(json!({"op": "status"}), 10).await;
    assert_eq!(r["ok"], true, "{r}");
    good.cancel.cancel();

    // A CA that did not sign the broker's certificate: no connection.
    let (other_ca, _) = ca();
    cfg.client_id = "swell-coordinator-tls-wrong-ca".into();
    cfg.tls = Some(TlsPem {
        ca: other_ca.into_bytes(),
        client: None,
    });
    let c = run_coordinator(cfg).await;
    // Witness: the handshake was tried and failed, twice.
    tokio::time::timeout(Duration::from_secs(30), async {
        while metric(&c.metrics, "swell_mqtt_connection_errors_total") < 2.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the coordinator tries to connect");
    assert!(
        !*c.ready.borrow() && metric(&c.metrics, "swell_broker_connected") == 0.0,
        "connected although the broker's certificate is not trusted: {}",
        c.metrics.encode()
    );
    c.cancel.cancel();
}
