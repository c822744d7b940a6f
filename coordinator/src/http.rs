//! The coordinator's HTTP port: `/metrics` for Prometheus, `/healthz` (liveness)
//! and `/readyz` (readiness) for Kubernetes probes. Separate from MQTT so a
//! scrape can never slow ingest, and it binds wherever `--http-addr` says.

use crate::metrics::{LeaseState, Metrics};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The engine loop turns at least once a second (its tick); this long without
/// a turn means it is stuck and the process should be restarted.
pub const STALL_SECS: u64 = 30;

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

async fn healthz(State(m): State<Arc<Metrics>>) -> (StatusCode, String) {
    if let Some(age) = m.since_heartbeat()
        && age.as_secs() > STALL_SECS
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("engine loop stalled for {} s\n", age.as_secs()),
        );
    }
    (StatusCode::OK, "ok\n".into())
}

/// Ready: connected to the broker, every subscription granted and the
/// coordinator's own probes coming back through them (MQTT-7), and, in
/// Kubernetes mode, holding the lease or cleanly waiting for it (a standby
/// that could take over now).
async fn readyz(State(m): State<Arc<Metrics>>) -> (StatusCode, String) {
    let lease = m.lease();
    if lease == LeaseState::Failing {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "leader election failing: the Lease API does not answer\n".into(),
        );
    }
    if !m.broker_connected() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to the MQTT broker\n".into(),
        );
    }
    if let Some(problem) = m.ingest_problem() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("ingest path not proven: {problem}\n"),
        );
    }
    let role = match lease {
        LeaseState::Holding => "leader",
        LeaseState::Waiting => "standby",
        _ => "single",
    };
    (StatusCode::OK, format!("ready ({role})\n"))
}

pub fn router(m: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(m)
}

/// Serves until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    m: Arc<Metrics>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(m))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}
