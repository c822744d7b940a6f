//! The embedded MQTT broker (rumqttd) for single-machine use, demos and tests.
//! Its memory is bounded: each topic filter keeps at most `SEGMENT_BYTES ×
//! SEGMENT_COUNT` of backlog (with rumqttd's defaults it grew to 850 MB after
//! 2.4 M messages).

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const SEGMENT_BYTES: usize = 4 * 1024 * 1024;
const SEGMENT_COUNT: usize = 8;

fn server(name: &str, listen: SocketAddr) -> ServerSettings {
    ServerSettings {
        name: name.to_string(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 1_000,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// A free port on `ip` (the kernel picks it; rumqttd cannot report a port 0 bind).
pub fn free_addr(ip: &str) -> std::io::Result<SocketAddr> {
    TcpListener::bind((ip, 0))?.local_addr()
}

/// Starts rumqttd on `v5` (MQTT 5, for Swell's own clients) and optionally `v4`
/// (MQTT 3.1.1, for tools such as mosquitto_pub), in background threads that live
/// as long as the process. Returns once `v5` accepts connections.
pub fn start(v5: SocketAddr, v4: Option<SocketAddr>) -> Result<(), String> {
    let router = RouterConfig {
        max_connections: 200_000,
        max_outgoing_packet_count: 1_000,
        max_segment_size: SEGMENT_BYTES,
        max_segment_count: SEGMENT_COUNT,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let config = Config {
        id: 0,
        router,
        v4: v4.map(|a| HashMap::from([("v4".to_string(), server("v4", a))])),
        v5: Some(HashMap::from([("v5".to_string(), server("v5", v5))])),
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    for addr in std::iter::once(v5).chain(v4) {
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "embedded broker did not listen on {addr} within 10 s"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}
