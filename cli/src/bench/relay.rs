//! The broker's own limit: the relay rate of the same number and size of
//! messages from the same number of connections to one plain subscriber.

use super::Logins;
use super::cpu::{Roles, Spent};
use anyhow::{Context as _, Result, bail};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The broker's raw relay: `count` QoS 1 messages of `size` bytes from
/// `connections` publishers (gateways, on device report topics) to one plain
/// subscriber (the coordinator's user). Messages per second.
#[allow(clippy::too_many_arguments)]
pub(super) async fn relay_rate(
    host: &str,
    port: u16,
    connections: usize,
    count: u64,
    size: usize,
    topic_len: usize,
    roles: &Roles,
    logins: &Logins,
) -> Result<(f64, Spent)> {
    let received = Arc::new(AtomicU64::new(0));
    let mut opts = MqttOptions::new(
        format!("swell-coordinator-bench-relay-{}", std::process::id()),
        host,
        port,
    );
    if let Some((u, p)) = &logins.coordinator {
        opts.set_credentials(u.clone(), p.clone());
    }
    opts.set_max_packet_size(Some(1 << 20));
    opts.set_keep_alive(Duration::from_secs(60));
    let (sub, mut el) = AsyncClient::new(opts, 1_000);
    let (up_tx, up_rx) = tokio::sync::oneshot::channel();
    let mut up_tx = Some(up_tx);
    let r = received.clone();
    let sub_task = tokio::spawn(async move {
        let _keep = sub.clone();
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = up_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = sub.try_subscribe("swell/v1/dev/+/report", QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    r.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), up_rx)
        .await
        .context("relay subscriber")??;
    // Topics as long as the devices' report topics.
    let pad = topic_len
        .saturating_sub("swell/v1/dev/relay-/report".len() + 5)
        .max(1);
    let payload = vec![0x5a; size];
    let from = roles.mark();
    let mut pubs = Vec::new();
    for c in 0..connections {
        let share = count / connections as u64 + u64::from((c as u64) < count % connections as u64);
        let mut opts = MqttOptions::new(
            format!("swell-gw-bench-relay-{c}-{}", std::process::id()),
            host,
            port,
        );
        if let Some((u, p)) = &logins.gateway {
            opts.set_credentials(u.clone(), p.clone());
        }
        opts.set_max_packet_size(Some(1 << 20));
        opts.set_keep_alive(Duration::from_secs(60));
        let (client, mut el) = AsyncClient::new(opts, 10_000);
        let topic = format!("swell/v1/dev/relay-{c:05}{}/report", "p".repeat(pad));
        let payload = payload.clone();
        pubs.push(tokio::spawn(async move {
            let poller = tokio::spawn(async move {
                loop {
                    if el.poll().await.is_err() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            });
            for _ in 0..share {
                if client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                    .await
                    .is_err()
                {
                    break;
                }
            }
            (client, poller)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while received.load(Ordering::Relaxed) < count {
        if Instant::now() > deadline {
            bail!(
                "relay baseline: {} of {count} messages arrived within 600 s",
                received.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let spent = Spent::between(roles, &from, &roles.mark(), count);
    for p in pubs {
        if let Ok((client, poller)) = p.await {
            let _ = client.disconnect().await;
            poller.abort();
        }
    }
    sub_task.abort();
    Ok((count as f64 / spent.seconds, spent))
}
