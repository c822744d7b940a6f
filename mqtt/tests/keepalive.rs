//! Keep-alive against scripted brokers on loopback. A real broker cannot be made
//! to hold a PINGRESP behind a backlog on demand (Mosquitto does it only under a
//! burst of hundreds of thousands of messages), so these brokers speak just
//! enough MQTT 5 — CONNACK, QoS 0 PUBLISH, never a PINGRESP — to reproduce both
//! sides: a busy connection must stay up, a silent one must be dropped.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use swell_mqtt::{Incoming, MqttConfig, Session, spawn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Shortest keep-alive rumqttc accepts.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// CONNACK: no session present, success, no properties.
const CONNACK: [u8; 5] = [0x20, 0x03, 0x00, 0x00, 0x00];

fn publish_qos0(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.push(0); // property length
    body.extend_from_slice(payload);
    assert!(body.len() < 128, "one-byte remaining length");
    let mut packet = vec![0x30, body.len() as u8];
    packet.extend(body);
    packet
}

/// Accepts connections, answers CONNECT, then streams a publish every
/// `every` (or nothing if `None`) and never answers a PINGREQ.
async fn scripted_broker(every: Option<Duration>) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(conn, every));
        }
    });
    (port, accepted)
}

async fn serve(conn: TcpStream, every: Option<Duration>) {
    let (mut rd, mut wr) = conn.into_split();
    let mut buf = vec![0u8; 4096];
    // The CONNECT arrives in one segment on loopback.
    if rd.read(&mut buf).await.unwrap_or(0) == 0 {
        return;
    }
    if wr.write_all(&CONNACK).await.is_err() {
        return;
    }
    // Read and discard everything else (PINGREQs included) until the client
    // closes, so the connection ends only when the client ends it.
    let drain = tokio::spawn(async move { while rd.read(&mut buf).await.unwrap_or(0) > 0 {} });
    if let Some(every) = every {
        let mut n = 0u32;
        loop {
            tokio::time::sleep(every).await;
            n += 1;
            let p = publish_qos0("swell/v1/test", &n.to_be_bytes());
            if wr.write_all(&p).await.is_err() {
                break;
            }
        }
    }
    let _ = drain.await;
}

fn session(port: u16, cancel: &CancellationToken) -> Session {
    spawn(
        MqttConfig {
            host: "127.0.0.1".into(),
            port,
            client_id: "keepalive-test".into(),
            credentials: None,
            keep_alive: KEEP_ALIVE,
            max_packet: 1 << 16,
            persistent: false,
            tls: None,
        },
        vec![],
        None,
        cancel.clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_publishes_keep_a_connection_alive_while_its_pingresp_is_late() {
    let (port, accepted) = scripted_broker(Some(Duration::from_millis(200))).await;
    let cancel = CancellationToken::new();
    let mut s = session(port, &cancel);
    let (mut connects, mut publishes) = (0, 0);
    // Three keep-alive intervals: rumqttc alone gives up after the second
    // unanswered ping, at 10 s.
    let end = tokio::time::Instant::now() + KEEP_ALIVE * 3;
    while let Ok(Some(msg)) = tokio::time::timeout_at(end, s.incoming.recv()).await {
        match msg {
            Incoming::Connected { .. } => connects += 1,
            Incoming::Publish(_) => publishes += 1,
        }
    }
    cancel.cancel();
    assert_eq!(connects, 1, "reconnected although publishes kept arriving");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert!(publishes > 50, "{publishes} publishes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_a_silent_connection_is_still_dropped_and_redialled() {
    let (port, accepted) = scripted_broker(None).await;
    let cancel = CancellationToken::new();
    let mut s = session(port, &cancel);
    let mut connects = 0;
    // No packet after the CONNACK: the second ping (10 s) finds the first
    // unanswered and the session dials again.
    let end = tokio::time::Instant::now() + KEEP_ALIVE * 5;
    while connects < 2 {
        match tokio::time::timeout_at(end, s.incoming.recv()).await {
            Ok(Some(Incoming::Connected { .. })) => connects += 1,
            Ok(Some(Incoming::Publish(_))) => panic!("the silent broker published"),
            Ok(None) | Err(_) => break,
        }
    }
    cancel.cancel();
    assert_eq!(connects, 2, "a dead connection was never detected");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}
