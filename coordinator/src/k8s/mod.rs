//! The coordinator's Kubernetes face (feature `kube`): the `Rollout` CRD, its
//! controller, the MQTT-to-resource bridge for operator commands, and Lease
//! leader election. See `docs/kubernetes.md`.

pub mod bridge;
pub mod controller;
pub mod crd;
pub mod lease;

use crate::engine::Forwarded;
use crate::status::RolloutEvent;
use controller::{Ctx, EngineHandle, event_for, publish_event};
use crd::Rollout;
use futures::StreamExt as _;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Turns engine events into Kubernetes Events on their `Rollout` and asks the
/// controller for a status refresh.
pub async fn relay_events(
    ctx: Arc<Ctx>,
    mut events: broadcast::Receiver<RolloutEvent>,
    refresh: mpsc::Sender<()>,
) {
    loop {
        let ev = match events.recv().await {
            Ok(ev) => ev,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!(
                    missed = n,
                    "event relay fell behind; statuses refresh on their timer"
                );
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if let Some((t, reason, note)) = event_for(&ev) {
            publish_event(&ctx, &ev.rollout, t, reason, "Reconcile", &note).await;
        }
        // Full: a refresh is already pending, which is as good.
        let _ = refresh.try_send(());
    }
}

/// Runs the controller, the command bridge and the event relay until `cancel`.
pub async fn run(
    client: Client,
    namespace: String,
    instance: String,
    engine: EngineHandle,
    events: broadcast::Receiver<RolloutEvent>,
    forwarded: mpsc::Receiver<Forwarded>,
    cancel: CancellationToken,
) {
    let api: Api<Rollout> = Api::namespaced(client.clone(), &namespace);
    let ctx = Arc::new(Ctx::new(client, engine.clone(), instance));
    // Any engine event refreshes every Rollout of the namespace (a handful):
    // reconciling one object from an outside trigger is still unstable in
    // kube-runtime. Bursts coalesce in the controller's debounce.
    let (trigger_tx, trigger_rx) = mpsc::channel::<()>(1);
    let relay = relay_events(ctx.clone(), events, trigger_tx);
    let triggers = futures::stream::unfold(trigger_rx, |mut rx| async move {
        rx.recv().await.map(|r| (r, rx))
    });
    let stop = cancel.clone();
    let controller = Controller::new(api.clone(), watcher::Config::default())
        .with_config(
            kube::runtime::controller::Config::default().debounce(Duration::from_millis(300)),
        )
        .reconcile_all_on(triggers)
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(|r| async move {
            match r {
                Ok((obj, _)) => debug!(rollout = %obj.name, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile error"),
            }
        });
    tokio::select! {
        _ = controller => {}
        _ = relay => {}
        _ = bridge::run(api, forwarded, engine) => {}
        _ = cancel.cancelled() => {}
    }
}
