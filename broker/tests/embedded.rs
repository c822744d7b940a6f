//! The embedded broker against what broke rumqttd and what a hostile client
//! tries: retained messages beyond 100 (and the RETAIN flag only on stored
//! ones), MQTT 3.1.1 and 5 on one port, a
//! persistent shared subscription dropped with messages in flight again and
//! again (rumqttd's router panicked there), garbage instead of packets, a Last
//! Will on another device's topic, and an address already taken.
#![allow(clippy::unwrap_used)]

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, LastWill, Packet};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use std::io::Write as _;
use std::time::Duration;
use swell_broker::{BrokerConfig, Credentials, EmbeddedBroker, Role, Rules};

struct B {
    broker: EmbeddedBroker,
    _dir: tempfile::TempDir,
}

fn start() -> B {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let creds = Credentials::load_or_create(dir.path()).unwrap();
    let broker = EmbeddedBroker::start(BrokerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        creds,
        Rules::new("swell/v1", Some("lab")),
    ))
    .unwrap();
    B { broker, _dir: dir }
}

fn opts(b: &B, role: Role, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", b.broker.addr().port());
    let (u, p) = b.broker.login(role).unwrap();
    o.set_credentials(u, p);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// Polls until the CONNACK; whether it was a success.
async fn connack(el: &mut EventLoop) -> bool {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    return a.code == ConnectReturnCode::Success;
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false)
}

/// Connects as a real client does: tries again after a failed attempt (a
/// takeover of a session with a large queue answers late) until `secs`.
async fn reconnect(el: &mut EventLoop, secs: u64) -> bool {
    tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    return a.code == ConnectReturnCode::Success;
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .unwrap_or(false)
}

/// Whether the broker still lets a client in.
async fn serves(b: &B) -> bool {
    let (_c, mut el) = AsyncClient::new(opts(b, Role::Operator, "swell-ops-alive"), 10);
    connack(&mut el).await
}

// rumqttd forwarded at most 100 retained messages per subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_delivers_every_retained_message() {
    let b = start();
    let (c, mut el) = AsyncClient::new(opts(&b, Role::Coordinator, "swell-coordinator-lab"), 2000);
    assert!(connack(&mut el).await);
    for i in 0..500 {
        c.publish(
            format!("swell/v1/dev/d-{i:03}/desired"),
            QoS::AtLeastOnce,
            true,
            vec![1],
        )
        .await
        .unwrap();
    }
    let mut acked = 0;
    while acked < 500 {
        if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.unwrap() {
            acked += 1;
        }
    }
    let (g, mut gel) = AsyncClient::new(opts(&b, Role::Gateway, "swell-gw-retained"), 10);
    assert!(connack(&mut gel).await);
    g.subscribe("swell/v1/dev/+/desired", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut got = 0;
    while got < 500 {
        let ev = tokio::time::timeout(Duration::from_secs(10), gel.poll())
            .await
            .expect("the retained messages come")
            .unwrap();
        if let Event::Incoming(Packet::Publish(p)) = ev {
            assert!(p.retain);
            got += 1;
        }
    }
    // A retained message published while the subscription stands arrives
    // without the flag (MQTT 5 §3.3.1.3): devices tell a live beacon from a
    // stored one by it.
    c.publish(
        "swell/v1/dev/d-999/desired",
        QoS::AtLeastOnce,
        true,
        vec![2],
    )
    .await
    .unwrap();
    let live = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            tokio::select! {
                ev = gel.poll() => if let Ok(Event::Incoming(Packet::Publish(p))) = ev {
                    return p;
                },
                _ = el.poll() => {}
            }
        }
    })
    .await
    .expect("the live message comes");
    assert_eq!(&live.topic[..], b"swell/v1/dev/d-999/desired");
    assert!(!live.retain, "delivered live, not as stored");
}

// One port speaks MQTT 3.1.1 and 5 (mosquitto_pub without -V mqttv5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_speaks_mqtt_3_1_1_and_5_on_one_port() {
    let b = start();
    let (c5, mut el5) = AsyncClient::new(opts(&b, Role::Operator, "swell-ops-v5"), 10);
    assert!(connack(&mut el5).await);
    c5.subscribe("swell/v1/ops/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = el5.poll().await.unwrap() {
            break;
        }
    }
    let mut o4 = rumqttc::MqttOptions::new("swell-ops-v4", "127.0.0.1", b.broker.addr().port());
    let (u, p) = b.broker.login(Role::Operator).unwrap();
    o4.set_credentials(u, p);
    let (c4, mut el4) = rumqttc::AsyncClient::new(o4, 10);
    c4.publish(
        "swell/v1/ops/cmd",
        rumqttc::QoS::AtLeastOnce,
        false,
        b"from 3.1.1".to_vec(),
    )
    .await
    .unwrap();
    let pump = tokio::spawn(async move {
        loop {
            if el4.poll().await.is_err() {
                return;
            }
        }
    });
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), el5.poll())
            .await
            .expect("the 3.1.1 publish arrives")
            .unwrap();
        if let Event::Incoming(Packet::Publish(p)) = ev {
            assert_eq!(&p.payload[..], b"from 3.1.1");
            break;
        }
    }
    pump.abort();
}

// The path of rumqttd's router panic ("group must exists"): a persistent
// session with a shared subscription goes away with messages in flight, and
// comes back, again and again, while a publisher keeps sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_survives_a_shared_session_dropped_with_messages_in_flight() {
    let b = start();
    // A publisher whose message is being routed to the vanished session is
    // held until its own keep-alive runs out, and the takeover waits for it
    // (rmqtt 0.24, measured: 1.5 x the publisher's keep-alive); short here, so
    // a round takes seconds.
    let mut flood_opts = opts(&b, Role::Gateway, "swell-gw-flood");
    flood_opts.set_keep_alive(Duration::from_secs(5));
    let (publisher, mut pel) = AsyncClient::new(flood_opts, 1_000);
    assert!(connack(&mut pel).await);
    let driver = tokio::spawn(async move {
        loop {
            if pel.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let flood = tokio::spawn(async move {
        for i in 0u64.. {
            // Back-pressured by the client's request queue. An error means the
            // event loop is gone, and every later publish would fail at once:
            // looping on would never yield, holding a worker thread for good
            // (the runtime then never shuts down and the test hangs).
            if publisher
                .publish(
                    format!("swell/v1/dev/d-{}/report", i % 50),
                    QoS::AtLeastOnce,
                    false,
                    vec![0u8; 100],
                )
                .await
                .is_err()
            {
                break;
            }
        }
    });
    for round in 0..10 {
        let mut o = opts(&b, Role::Coordinator, "swell-coordinator-lab");
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(3600));
        o.set_keep_alive(Duration::from_secs(5));
        // Never acknowledges: everything it gets stays in flight.
        o.set_manual_acks(true);
        let (c, mut el) = AsyncClient::new(o, 100);
        assert!(reconnect(&mut el, 60).await, "round {round}: no connection");
        c.subscribe(
            "$share/swell-report/swell/v1/dev/+/report",
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut got = 0;
        while got < 20 {
            match tokio::time::timeout_at(deadline, el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(_)))) => got += 1,
                Ok(Ok(_)) => {}
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(_) => panic!("round {round}: {got} messages in 30 s"),
            }
        }
        // Gone without a DISCONNECT.
        drop(el);
        drop(c);
    }
    assert!(serves(&b).await, "the broker still lets clients in");
    flood.abort();
    let _ = flood.await;
    driver.abort();
}

// Garbage instead of MQTT: each connection is closed, the broker stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_survives_garbage_from_clients() {
    let b = start();
    let addr = b.broker.addr();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut inputs: Vec<Vec<u8>> = vec![
        // A CONNECT claiming 256 MiB of remaining length.
        vec![0x10, 0xff, 0xff, 0xff, 0x7f],
        // A CONNECT with a protocol name that is not MQTT.
        vec![
            0x10, 0x0c, 0x00, 0x04, b'X', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x00, 0x00,
        ],
        // A PUBLISH before any CONNECT.
        vec![0x30, 0x05, 0x00, 0x01, b'a', b'h', b'i'],
        // Protocol level 9.
        vec![
            0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x09, 0x02, 0x00, 0x3c, 0x00, 0x00,
        ],
    ];
    for _ in 0..200 {
        let len = (next() % 64) as usize;
        let mut v: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Half of them start like a CONNECT.
        if next() % 2 == 0 && !v.is_empty() {
            v[0] = 0x10;
        }
        inputs.push(v);
    }
    for input in &inputs {
        let Ok(mut s) = std::net::TcpStream::connect(addr) else {
            panic!("the broker stopped accepting connections");
        };
        let _ = s.write_all(input);
        let _ = s.flush();
    }
    assert!(serves(&b).await, "the broker still lets clients in");
}

// rmqtt publishes a Last Will without its publish check: the CONNECT is judged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_refuses_a_will_on_a_topic_the_user_may_not_write() {
    let b = start();
    let creds = b.broker.credentials();
    let login = |dev: &str, will: &str| {
        let mut o = MqttOptions::new(
            format!("swell-agent-{dev}"),
            "127.0.0.1",
            b.broker.addr().port(),
        );
        o.set_credentials(dev, creds.device_password(dev));
        o.set_last_will(LastWill::new(will, "0", QoS::AtLeastOnce, true, None));
        o
    };
    let (_c, mut el) = AsyncClient::new(login("dev-a", "swell/v1/dev/dev-b/online"), 10);
    assert!(!connack(&mut el).await, "a will on another device's flag");
    let (_c, mut el) = AsyncClient::new(login("dev-a", "swell/v1/dev/dev-a/online"), 10);
    assert!(connack(&mut el).await, "its own flag");
    assert_eq!(b.broker.stats().will_refused(), 1);
}

// --embedded-broker on a taken port used to run on, connected to the other
// broker: now the start fails and says why.
#[test]
fn embedded_fails_to_start_on_a_taken_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = EmbeddedBroker::start(BrokerConfig::new(
        taken.local_addr().unwrap(),
        Credentials::load_or_create(dir.path()).unwrap(),
        Rules::new("swell/v1", None),
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("cannot listen on"), "{e}");
}

// Restarted on its address while its clients' connections are fresh: the
// old connections' TIME_WAIT does not keep the new broker from listening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_starts_again_on_its_address_at_once() {
    let b = start();
    let addr = b.broker.addr();
    let (_c, mut el) = AsyncClient::new(opts(&b, Role::Operator, "swell-ops-before"), 10);
    assert!(connack(&mut el).await);
    let creds = b.broker.credentials().clone();
    // The broker closes first: its side of the connection is in TIME_WAIT.
    drop(b.broker);
    let again = EmbeddedBroker::start(BrokerConfig::new(
        addr,
        creds,
        Rules::new("swell/v1", Some("lab")),
    ));
    assert!(again.is_ok(), "{:?}", again.err());
}
