//! `swell bench fleet`: enrollment, then a four-wave rollout, measured.

use super::cpu::{self, Roles, Spent, proc_usage};
use super::procs::{BrokerProc, ChildProc};
use super::relay::relay_rate;
use super::{FLEET, FleetArgs, Logins, percentile, release};
use crate::demo::demo_keys;
use crate::ops_client::{OpsClient, answer};
use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use swell_agent::sim::{self, SimConfig};
use swell_coordinator::rollout::state::Decision;
use swell_coordinator::status::{EventKind, FleetSummary};
use swell_mqtt::{MqttConfig, parse_url};
use swell_protocol::cohort::Label;
use swell_protocol::topics::Topics;
use swell_protocol::{DeviceId, FleetId, ReleaseId};

pub(super) async fn fleet(a: FleetArgs) -> Result<()> {
    if a.devices < 100 {
        bail!("--devices must be at least 100");
    }
    let limit = humantime::parse_duration(&a.timeout).context("--timeout")?;
    let keys = demo_keys(a.seed)?;
    let mut mosquitto = None;
    let mut embedded = None;
    let broker_dir = tempfile::tempdir()?;
    let mut logins = Logins::default();
    let (host, port, broker_name) = match a.broker.as_str() {
        "embedded" => {
            let creds = swell_broker::Credentials::load_or_create(broker_dir.path())?;
            let login = |role: swell_broker::Role, user: &str| {
                creds
                    .password(role)
                    .map(|p| (user.to_string(), p.to_string()))
            };
            logins = Logins {
                coordinator: login(swell_broker::Role::Coordinator, "coordinator"),
                operator: login(swell_broker::Role::Operator, "operator"),
                gateway: login(swell_broker::Role::Gateway, "gateway"),
            };
            let b = BrokerProc::start(broker_dir.path())?;
            let port = b.port;
            embedded = Some(b);
            (
                "127.0.0.1".to_string(),
                port,
                "embedded (rmqtt with Swell's checks, own process)".to_string(),
            )
        }
        "mosquitto" => {
            let m = swell_e2e::mosquitto::Mosquitto::start_relaxed()
                .map_err(|e| anyhow::anyhow!("mosquitto: {e:?}"))?;
            let port = m.port();
            mosquitto = Some(m);
            (
                "127.0.0.1".to_string(),
                port,
                "mosquitto (tuned limits)".to_string(),
            )
        }
        url => {
            let u = parse_url(url)?;
            if u.tls {
                bail!("the benchmark connects without TLS");
            }
            (u.host, u.port, url.to_string())
        }
    };
    let connections = a
        .connections
        .unwrap_or(a.devices.div_ceil(2_000))
        .clamp(2, 64);
    let say = |m: String| {
        if !a.json {
            println!("{m}");
        }
    };
    let signature_check = if a.strict_signatures {
        "one by one"
    } else {
        "batch"
    };
    say(format!(
        "swell bench fleet: {} devices on {connections} connections, broker {broker_name} at {host}:{port}, QoS 1, signatures checked: {signature_check}",
        a.devices,
    ));
    let coordinator = ChildProc::start(&host, port, &a, &logins)?;
    let coordinator_pid = coordinator.pid.to_string();
    let broker_pid = mosquitto
        .as_ref()
        .map(|m| m.pid())
        .or(embedded.as_ref().map(|b| b.pid));
    let roles = Roles {
        coordinator: Some(coordinator_pid.clone()),
        broker: broker_pid.map(|p| p.to_string()),
        clients: "self".into(),
    };
    let v2 = release(2, &keys)?;
    let sim_cfg = SimConfig {
        host: host.clone(),
        port,
        fleet: FleetId::new(FLEET)?,
        topics: Topics::default(),
        keys: keys.kl.clone(),
        devices: a.devices,
        connections,
        prefix: "dev-".into(),
        seed: a.seed,
        enrollment_token: "bench-enrollment-token".into(),
        labels: Arc::new(|_| {
            vec![Label {
                key: "hw".into(),
                value: "rpi4".into(),
            }]
        }),
        hardware: "rpi4".into(),
        outcome: Arc::new(|_: &DeviceId, _: &ReleaseId| true),
        initial: None,
        probation: Duration::ZERO,
        work: Duration::ZERO,
        fetch_concurrency: 0,
        credentials: logins.gateway.clone(),
    };
    // The operator connects first: during a million-device Hello burst the
    // broker may not accept a new connection in time.
    let mut ops = OpsClient::connect(
        &MqttConfig {
            host: host.clone(),
            port,
            client_id: format!("swell-bench-operator-{}", std::process::id()),
            credentials: logins.operator.clone(),
            keep_alive: Duration::from_secs(30),
            max_packet: 1 << 20,
            persistent: false,
            tls: None,
        },
        Topics::default(),
        Some(FleetId::new(FLEET)?),
    )
    .await?;
    let t0 = Instant::now();
    let fleet_sim = sim::start(sim_cfg).await.map_err(anyhow::Error::msg)?;
    let deadline = Instant::now() + limit;
    loop {
        // During a large Hello burst the coordinator's replies wait behind its
        // acks (BENCHMARKS.md): a late reply is not a failure here.
        let approved = match ops
            .command(json!({"op": "fleet"}), Duration::from_secs(30))
            .await
        {
            Ok(f) => answer::<FleetSummary>(&f).map_or(0, |f| f.approved),
            Err(_) => 0,
        };
        if approved == a.devices as u64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {approved} of {} devices enrolled", a.devices);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let enrolled_in = t0.elapsed();
    let stats = fleet_sim.stats.clone();
    let hellos = stats.hellos.load(Ordering::Relaxed);
    say(format!(
        "enrollment: {} devices approved in {:.1} s ({:.0}/s); {hellos} signed Hellos sent so far",
        a.devices,
        enrolled_in.as_secs_f64(),
        a.devices as f64 / enrolled_in.as_secs_f64()
    ));
    let reports0 = stats.reports.load(Ordering::Relaxed);
    let bytes0 = stats.bytes_sent.load(Ordering::Relaxed);
    let waves = ["1%", "10%", "50%", "100%"];
    let create = json!({"op": "create", "spec": {
        "rollout": "bench", "release": hex::encode(v2.encode()?), "selector": "hw=rpi4",
        "waves": waves, "min_devices": 1, "success_threshold": "99%",
        "max_failure_rate": "1%", "bake": "0s", "install_timeout": "30m", "policy": "pause"}});
    let started = Instant::now();
    let rollout_from = roles.mark();
    let r = ops.command(create, Duration::from_secs(30)).await?;
    if !r.ok {
        bail!("create refused: {}", r.message);
    }
    // Wave openings as the operator sees them (event arrival).
    let mut opened: Vec<(u64, Duration)> = Vec::new();
    let mut seen = 0;
    let finished = loop {
        for e in &ops.events[seen..] {
            if let EventKind::Decision(Decision::OpenWave { wave, .. }) = e.what
                && e.rollout == "bench"
            {
                opened.push((u64::from(wave), started.elapsed()));
            }
        }
        seen = ops.events.len();
        if let Some(s) = ops.statuses.get("bench") {
            match s.phase.as_str() {
                "completed" => break started.elapsed(),
                p @ ("paused" | "aborted" | "rolled_back") => {
                    bail!(
                        "the benchmark rollout stopped: {p} ({})",
                        s.halt_reason.as_deref().unwrap_or("")
                    )
                }
                _ => {}
            }
        }
        if !ops.next(tokio::time::Instant::from_std(deadline)).await {
            bail!("the rollout did not complete within {}", a.timeout);
        }
    };
    // Reports still in flight when the status said completed are few; count what was sent.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reports = stats.reports.load(Ordering::Relaxed) - reports0;
    let payload = stats.bytes_sent.load(Ordering::Relaxed) - bytes0;
    let rollout_cpu = Spent::between(&roles, &rollout_from, &roles.mark(), reports);
    let (cpu_now, _) = proc_usage(&coordinator_pid);
    let summary = coordinator.finish()?;
    fleet_sim.stop().await;
    drop(ops);
    let ingest = reports as f64 / finished.as_secs_f64();
    let size = (payload / reports.max(1)) as usize;
    let topic_len = Topics::default().report(&DeviceId::new("dev-00000")?).len();
    say(format!(
        "rollout: {reports} signed reports ingested and gated in {:.2} s ({ingest:.0} reports/s)",
        finished.as_secs_f64()
    ));
    let relay_roles = Roles {
        coordinator: None,
        ..roles.clone()
    };
    let (relay, relay_cpu) = relay_rate(
        &host,
        port,
        connections,
        reports,
        size,
        topic_len,
        &relay_roles,
        &logins,
    )
    .await?;
    // The broker's peak resident memory over the whole run (enrollment,
    // rollout and relay).
    let broker_rss_kib = broker_pid.map(|p| proc_usage(&p.to_string()).1);
    drop(mosquitto);
    drop(embedded);
    // The cores this process (the fleet) and its children (the broker, and the
    // coordinator unless `--wrap-coordinator` pins it elsewhere) may run on.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let ceiling = cpu::rate_without_coordinator(&rollout_cpu, cores);
    let budget = cpu::coordinator_budget_us(&rollout_cpu, cores, 0.8, relay);
    let mut lat: Vec<f64> = summary["gate_to_manifest_seconds"]
        .as_array()
        .map(|v| v.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    lat.sort_by(f64::total_cmp);
    let cpu = summary["cpu_seconds"].as_f64().unwrap_or(cpu_now);
    let rss_kib = summary["peak_rss_kib"].as_u64().unwrap_or(0);
    // Wire bytes: payload, topic, fixed header and packet id, and the PUBACK.
    let wire = payload + reports * (topic_len as u64 + 2 + 2 + 2 + 1 + 4);
    let mut per_wave = Vec::new();
    for (i, (w, at)) in opened.iter().enumerate() {
        let end = opened.get(i + 1).map_or(finished, |(_, t)| *t);
        per_wave.push(
            json!({"wave": w, "label": waves.get(*w as usize).copied().unwrap_or("?"),
            "seconds": (end - *at).as_secs_f64()}),
        );
    }
    let result = json!({
        "devices": a.devices,
        "connections": connections,
        "broker": broker_name,
        "signature_check": signature_check,
        "enrollment_seconds": enrolled_in.as_secs_f64(),
        "hellos_sent_by_enrollment": hellos,
        "hellos_sent_in_all": stats.hellos.load(Ordering::Relaxed),
        "rollout_seconds": finished.as_secs_f64(),
        "waves": per_wave,
        "reports": reports,
        "ingest_reports_per_second": ingest,
        "relay_messages_per_second": relay,
        "broker_peak_rss_kib": broker_rss_kib,
        "relay_seconds": relay_cpu.seconds,
        "message_bytes": size,
        "ratio": ingest / relay,
        "coordinator_cpu_seconds": cpu,
        "coordinator_cpu_share_of_one_core": cpu / (enrolled_in + finished).as_secs_f64(),
        "coordinator_peak_rss_kib": rss_kib,
        "coordinator_bytes_per_device": rss_kib * 1024 / a.devices as u64,
        "payload_bytes_per_device": payload / a.devices as u64,
        "wire_bytes_per_device": wire / a.devices as u64,
        "cpu": {
            "cores": cores,
            "rollout": rollout_cpu.to_json(),
            "relay": relay_cpu.to_json(),
            "ingest_without_coordinator_cost": ceiling,
            "ratio_without_coordinator_cost": ceiling.map(|c| c / relay),
            "coordinator_us_per_report_for_ratio_0_8": budget,
        },
        "gate_to_manifest_ms": {
            "samples": lat.len(),
            "p50": percentile(&lat, 0.5) * 1e3,
            "p99": percentile(&lat, 0.99) * 1e3,
            "max": lat.last().copied().unwrap_or(0.0) * 1e3,
        },
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    for w in &per_wave {
        println!(
            "  wave {:<5} {:>7.2} s",
            w["label"].as_str().unwrap_or(""),
            w["seconds"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "broker relay baseline: {reports} messages of {size} B in {:.2} s ({relay:.0} msg/s)",
        relay_cpu.seconds
    );
    println!("ratio ingest / relay: {:.2}", ingest / relay);
    if let Some(kib) = broker_rss_kib {
        println!(
            "broker: peak RSS {:.1} MiB over enrollment, rollout and relay",
            kib as f64 / 1024.0
        );
    }
    println!(
        "coordinator: {cpu:.1} CPU s over enrollment + rollout ({:.0}% of one core), peak RSS {:.1} MiB ({} B per device)",
        100.0
            * result["coordinator_cpu_share_of_one_core"]
                .as_f64()
                .unwrap_or(0.0),
        rss_kib as f64 / 1024.0,
        result["coordinator_bytes_per_device"]
    );
    let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    for (phase, spent) in [("rollout", &rollout_cpu), ("relay", &relay_cpu)] {
        println!(
            "CPU per message, {phase}: coordinator {} µs, broker {} µs, clients {:.1} µs, all {:.1} µs; machine busy {:.2} cores (stolen {:.2})",
            us(spent.coordinator_us),
            us(spent.broker_us),
            spent.clients_us,
            spent.total_us(),
            spent.machine_busy_cores,
            spent.machine_steal_cores,
        );
    }
    if let (Some(c), Some(b)) = (ceiling, budget) {
        println!(
            "with a coordinator that cost nothing, broker + fleet on the {cores} cores this benchmark may use would reach {c:.0} reports/s (ratio {:.2}); ratio 0.8 leaves the coordinator {b:.1} µs per report on them",
            c / relay
        );
    }
    println!(
        "on the wire per device during the rollout: {} B of signed reports ({} B with MQTT framing and acks)",
        result["payload_bytes_per_device"], result["wire_bytes_per_device"]
    );
    println!(
        "gate to manifest (coordinator): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} wave moves",
        percentile(&lat, 0.5) * 1e3,
        percentile(&lat, 0.99) * 1e3,
        lat.last().copied().unwrap_or(0.0) * 1e3,
        lat.len()
    );
    Ok(())
}
