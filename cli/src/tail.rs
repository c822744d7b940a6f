//! `swell mqtt tail <filter> [--decode]`: follow any part of the topic tree. JSON
//! (operator topics) is shown as is; binary device and fleet messages are
//! decoded and shown only once verified — the key list against the given root
//! keys, manifests and beacons against the coordinator keys it names, Hellos by
//! their own key, reports by the key their device's Hello announced.

use crate::conn::{Conn, Output};
use crate::decode;
use anyhow::{Context as _, Result, bail};
use clap::Args;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;
use swell_coordinator::keyfile::read_public;
use swell_coordinator::server::unix_now;
use swell_protocol::PublicKey;
use swell_protocol::envelope::{MessageKind, UnverifiedEnvelope};
use swell_protocol::messages::{Hello, KeyList, RootOfTrust};
use swell_protocol::threshold::ThresholdSigned;

#[derive(Debug, Args)]
pub struct TailArgs {
    /// Topic filter (default: everything under the prefix).
    filter: Option<String>,
    /// Decode and verify binary messages.
    #[arg(long)]
    decode: bool,
    /// Root public key file(s) to verify the key list with (and through it,
    /// manifests and beacons).
    #[arg(long = "root-key")]
    root_keys: Vec<PathBuf>,
    /// Root signatures the key list needs.
    #[arg(long, default_value_t = 1)]
    root_threshold: u8,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<usize>,
}

/// What the tail has learnt: the key list and device keys.
#[derive(Default)]
struct Keys {
    list: Option<KeyList>,
    devices: HashMap<String, PublicKey>,
}

fn describe(
    topic: &str,
    payload: &[u8],
    args: &TailArgs,
    root: &RootOfTrust,
    keys: &mut Keys,
) -> Value {
    if payload.is_empty() {
        return json!({"topic": topic, "format": "empty (retained message cleared)"});
    }
    if let Ok(v) = serde_json::from_slice::<Value>(payload) {
        return json!({"topic": topic, "format": "json", "payload": v});
    }
    if !args.decode {
        return json!({"topic": topic, "format": "binary", "bytes": payload.len()});
    }
    if let Ok(env) = UnverifiedEnvelope::parse(payload) {
        let candidates: Vec<PublicKey> = match env.kind() {
            Some(MessageKind::Hello) => match Hello::verify_self_signed(&env, unix_now()) {
                Ok(v) => {
                    keys.devices.insert(v.body.device.to_string(), v.body.key);
                    vec![v.body.key]
                }
                Err(e) => {
                    return json!({"topic": topic, "format": "envelope", "error": e.to_string()});
                }
            },
            Some(MessageKind::Report | MessageKind::Unsupported) => topic
                .split('/')
                .rev()
                .nth(1)
                .and_then(|d| keys.devices.get(d))
                .copied()
                .into_iter()
                .collect(),
            _ => keys
                .list
                .as_ref()
                .map(|l| l.coordinator_keys.clone())
                .unwrap_or_default(),
        };
        let mut out = match decode::envelope(&env, &candidates, unix_now()) {
            Ok(v) => v,
            Err(e) => json!({"format": "envelope", "verified": false, "error": format!("{e:#}")}),
        };
        if candidates.is_empty() {
            out["note"] =
                json!("signer's key not known yet (no key list or Hello seen): header only");
        }
        out["topic"] = json!(topic);
        return out;
    }
    if let Ok(obj) = ThresholdSigned::decode(payload) {
        if obj.kind == MessageKind::KeyList as u16 && !root.roots.is_empty() {
            let trusted = keys
                .list
                .as_ref()
                .map_or_else(|| root.clone(), RootOfTrust::of);
            let current = keys.list.as_ref().map(|l| l.version);
            match KeyList::accept(&obj, &trusted, current, unix_now()) {
                Ok(list) => keys.list = Some(list),
                Err(e) if current.is_none() => {
                    return json!({"topic": topic, "format": "threshold", "verified": false, "error": e.to_string()});
                }
                Err(_) => {}
            }
        }
        let trusted: Vec<PublicKey> = if obj.kind == MessageKind::KeyList as u16 {
            keys.list
                .as_ref()
                .map(|l| l.roots.clone())
                .unwrap_or_default()
        } else {
            keys.list
                .as_ref()
                .map(|l| l.release_keys.clone())
                .unwrap_or_default()
        };
        let t = if obj.kind == MessageKind::KeyList as u16 {
            keys.list.as_ref().map_or(1, |l| l.root_threshold)
        } else {
            keys.list.as_ref().map_or(1, |l| l.release_threshold)
        };
        let mut out = decode::threshold(&obj, &trusted, t).unwrap_or_else(
            |e| json!({"format": "threshold", "verified": false, "error": format!("{e:#}")}),
        );
        out["topic"] = json!(topic);
        return out;
    }
    json!({"topic": topic, "format": "binary", "bytes": payload.len(), "error": "neither an envelope nor a threshold object"})
}

fn line(v: &Value) -> String {
    let topic = v["topic"].as_str().unwrap_or("");
    match v["format"].as_str().unwrap_or("") {
        "json" => format!("{topic}  {}", v["payload"]),
        "envelope" | "threshold" => {
            let kind = v["kind"].as_str().unwrap_or("?");
            let verified = if v["verified"] == true {
                "verified"
            } else {
                "UNVERIFIED"
            };
            let body = v
                .get("payload")
                .or_else(|| v.get("body"))
                .cloned()
                .unwrap_or(Value::Null);
            let extra = v["error"].as_str().or(v["note"].as_str()).unwrap_or("");
            format!("{topic}  {kind} {verified} {body} {extra}")
        }
        other => format!("{topic}  {other} {}", v["bytes"]),
    }
}

pub fn run(args: TailArgs, c: Conn) -> Result<std::process::ExitCode> {
    let roots: Vec<PublicKey> = args
        .root_keys
        .iter()
        .map(|p| read_public(p).map(|(_, k)| k))
        .collect::<Result<_, _>>()?;
    let root = RootOfTrust {
        roots,
        threshold: args.root_threshold,
    };
    let cfg = c.mqtt(format!("swell-tail-{}", std::process::id()))?;
    let (host, port) = (cfg.host.clone(), cfg.port);
    let prefix = c.topics()?.prefix().to_string();
    let output = c.output();
    let filter = args.filter.clone().unwrap_or_else(|| format!("{prefix}/#"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut opts = swell_mqtt::options(&cfg, None);
        opts.set_manual_acks(false);
        let (client, mut el) = AsyncClient::new(opts, 100);
        let mut keys = Keys::default();
        let mut seen = 0usize;
        // With root keys, learn the key list first, so that retained manifests
        // and beacons delivered before it can still be verified.
        let keys_filter = format!("{prefix}/fleet/+/keys");
        let mut prefetch = args.decode && !root.roots.is_empty();
        let prefetch_until = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            if prefetch && (keys.list.is_some() || tokio::time::Instant::now() >= prefetch_until) {
                prefetch = false;
                client
                    .unsubscribe(keys_filter.clone())
                    .await
                    .context("unsubscribing")?;
                client
                    .subscribe(filter.clone(), QoS::AtLeastOnce)
                    .await
                    .context("subscribing")?;
            }
            match tokio::time::timeout(Duration::from_millis(500), el.poll()).await {
                Err(_) if seen == 0 => {}
                Err(_) => continue,
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    let first = if prefetch { &keys_filter } else { &filter };
                    client
                        .subscribe(first.clone(), QoS::AtLeastOnce)
                        .await
                        .context("subscribing")?;
                }
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) if prefetch => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let _ = describe(&topic, &p.payload, &args, &root, &mut keys);
                }
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let v = describe(&topic, &p.payload, &args, &root, &mut keys);
                    match output {
                        Output::Json => println!("{v}"),
                        Output::Yaml => {
                            print!("---\n{}", serde_yaml_ng::to_string(&v).unwrap_or_default())
                        }
                        Output::Table => println!("{}", line(&v)),
                    }
                    seen += 1;
                    if args.count.is_some_and(|n| seen >= n) {
                        return Ok(std::process::ExitCode::SUCCESS);
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) if seen == 0 => bail!("cannot reach the broker at {host}:{port}: {e}"),
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    })
}
