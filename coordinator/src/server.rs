//! The coordinator's event loop: carries the engine's decisions out over MQTT.
//!
//! Incoming messages are handled in batches: every message of a batch is applied,
//! the store is flushed once, and only then are the messages acknowledged
//! (MQTT-4, STATE-1). A QoS 1 redelivery of an acknowledged-late message is a
//! replay the engine already ignores (device `seq` floors).

use crate::engine::{Engine, EngineError, Out, ReplyTo};
use crate::transport::mqtt::{self, Incoming, MqttConfig};
use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, PublishProperties};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Most messages handled before one flush and the acks.
pub const BATCH: usize = 512;

/// Timing of the loop.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub tick: Duration,
    pub beacon_interval: Duration,
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn publish(client: &rumqttc::v5::AsyncClient, out: Out) {
    let props = out.correlation.map(|c| PublishProperties {
        correlation_data: Some(Bytes::from(c)),
        ..Default::default()
    });
    let topic = out.topic.clone();
    let r = match props {
        Some(p) => client.try_publish_with_properties(
            out.topic,
            QoS::AtLeastOnce,
            out.retain,
            out.payload,
            p,
        ),
        None => client.try_publish(out.topic, QoS::AtLeastOnce, out.retain, out.payload),
    };
    if let Err(e) = r {
        // Visible load shedding: the request queue to the broker is full.
        error!(%topic, error = %e, "publish dropped");
    }
}

/// Runs until `cancel` fires. `ready` turns true once connected.
pub async fn run(
    mut engine: Engine,
    initial: Vec<Out>,
    mqtt_cfg: MqttConfig,
    cfg: LoopConfig,
    cancel: CancellationToken,
    ready: watch::Sender<bool>,
) -> Result<(), EngineError> {
    let subs = engine
        .subscriptions()
        .into_iter()
        .map(|t| (t, QoS::AtLeastOnce))
        .collect();
    let online_topic = engine.topics().coordinator_online();
    let will = LastWill::new(
        online_topic.clone(),
        "offline",
        QoS::AtLeastOnce,
        true,
        None,
    );
    let session = mqtt::spawn(mqtt_cfg, subs, Some(will), cancel.clone());
    let client = session.client.clone();
    let mut incoming = session.incoming;
    let mut connected = session.connected.clone();
    // Queued in order before anything a tick may publish (rumqttc sends them once
    // connected): a restarted coordinator must never publish an older manifest
    // after a newer one.
    for o in initial {
        publish(&client, o);
    }
    let mut tick = tokio::time::interval(cfg.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beacon = tokio::time::interval(cfg.beacon_interval);
    beacon.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beacon.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = connected.changed() => {
                if changed.is_err() { break; }
                let up = *connected.borrow();
                let _ = ready.send(up);
            }
            msg = incoming.recv() => {
                let Some(msg) = msg else { break };
                let mut batch = vec![msg];
                while batch.len() < BATCH {
                    match incoming.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                let now = unix_now();
                let mut outs = Vec::new();
                let mut acks = Vec::new();
                for m in batch {
                    match m {
                        Incoming::Connected { session_present } => {
                            publish(&client, Out { topic: online_topic.clone(), payload: b"online".to_vec(), retain: true, correlation: None });
                            debug!(session_present, "session ready");
                        }
                        Incoming::Publish(p) => {
                            let topic = String::from_utf8_lossy(&p.topic).into_owned();
                            let reply = ReplyTo {
                                response_topic: p.properties.as_ref().and_then(|pr| pr.response_topic.clone()),
                                correlation: p.properties.as_ref().and_then(|pr| pr.correlation_data.as_ref().map(|b| b.to_vec())),
                            };
                            outs.extend(engine.handle(&topic, &p.payload, reply, now)?);
                            acks.push(p);
                        }
                    }
                }
                engine.flush()?;
                for p in &acks {
                    if let Err(e) = client.try_ack(p) {
                        warn!(error = %e, "ack not sent");
                    }
                }
                for o in outs {
                    publish(&client, o);
                }
            }
            _ = tick.tick() => {
                for o in engine.tick(unix_now())? {
                    publish(&client, o);
                }
            }
            _ = beacon.tick() => {
                for o in engine.beacon(unix_now())? {
                    publish(&client, o);
                }
            }
        }
    }
    info!("shutting down: flushing state");
    engine.flush()?;
    // Say goodbye cleanly so the retained status is not left at "online".
    publish(
        &client,
        Out {
            topic: online_topic,
            payload: b"offline".to_vec(),
            retain: true,
            correlation: None,
        },
    );
    let _ = client.try_disconnect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}
