//! The Rollout controller: reconciles `Rollout` resources into the engine and
//! writes the engine's view back as status (server-side apply, field manager
//! `swell`). In Kubernetes mode the resource is the single source of truth:
//! it creates the rollout, `spec.paused` holds it, the `swell.dev/action`
//! annotation carries one-shot commands (promote, abort, rollback, retry,
//! resume), and deleting it halts the rollout and forgets it (finalizer).

use super::crd::{Condition, Rollout, RolloutStatus, WaveStatus};
use crate::engine::Refusal;
use crate::ops::Op;
use crate::rollout::state::{Decision, PauseReason};
use crate::server::{Applied, Control};
use crate::status::{EventKind, RolloutEvent, RolloutStatus as EngineStatus};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use swell_protocol::RolloutId;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// Finalizer that halts and forgets a deleted rollout.
pub const FINALIZER: &str = "swell.dev/cleanup";
/// One-shot commands: `promote`, `abort`, `rollback`, `retry` or `resume`,
/// optionally `verb/nonce` so the same verb can be given twice.
pub const ACTION_ANNOTATION: &str = "swell.dev/action";
/// Field manager of every write.
pub const FIELD_MANAGER: &str = "swell";
/// Status refresh while a rollout moves (events also trigger one at once).
pub const REFRESH: Duration = Duration::from_secs(5);

/// Why a reconcile failed (it is retried with back-off).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the engine loop has stopped")]
    EngineGone,
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("rollout has no namespace")]
    NoNamespace,
}

/// The controller's line to the loop that owns the engine.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Control>,
}

impl EngineHandle {
    pub fn new(tx: mpsc::Sender<Control>) -> Self {
        EngineHandle { tx }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Control) -> Result<T, Error> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(make(done))
            .await
            .map_err(|_| Error::EngineGone)?;
        rx.await.map_err(|_| Error::EngineGone)
    }

    pub async fn apply(&self, op: Op) -> Result<Applied, Error> {
        self.ask(|done| Control::Apply { op, done }).await
    }

    pub async fn status(&self, rollout: &RolloutId) -> Result<Option<EngineStatus>, Error> {
        let rollout = rollout.clone();
        self.ask(|done| Control::Status { rollout, done }).await
    }

    pub async fn remove(&self, rollout: &RolloutId) -> Result<bool, Error> {
        let rollout = rollout.clone();
        self.ask(|done| Control::Remove { rollout, done }).await
    }

    pub async fn send(&self, c: Control) -> Result<(), Error> {
        self.tx.send(c).await.map_err(|_| Error::EngineGone)
    }
}

/// Shared by every reconcile.
pub struct Ctx {
    pub client: Client,
    pub engine: EngineHandle,
    pub recorder: Recorder,
    /// Object references by rollout name, for Events raised from engine events.
    pub refs: Mutex<HashMap<String, ObjectReference>>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").finish_non_exhaustive()
    }
}

impl Ctx {
    pub fn new(client: Client, engine: EngineHandle, instance: String) -> Self {
        let reporter = kube::runtime::events::Reporter {
            controller: "swell-coordinator".into(),
            instance: Some(instance),
        };
        Ctx {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            engine,
            refs: Mutex::new(HashMap::new()),
        }
    }
}

/// Reconciles one `Rollout`.
pub async fn reconcile(obj: Arc<Rollout>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = obj.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<Rollout> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, obj, |ev| async {
        match ev {
            Finalizer::Apply(o) => apply(&o, &ctx, &api).await,
            Finalizer::Cleanup(o) => cleanup(&o, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(e.to_string()))
}

/// Back-off after a failed reconcile.
pub fn error_policy(obj: Arc<Rollout>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    warn!(rollout = %obj.name_any(), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

async fn cleanup(obj: &Rollout, ctx: &Ctx) -> Result<Action, Error> {
    let name = obj.name_any();
    if let Ok(id) = RolloutId::new(&name) {
        let existed = ctx.engine.remove(&id).await?;
        info!(rollout = %name, existed, "Rollout deleted: halted and forgotten");
    }
    if let Ok(mut refs) = ctx.refs.lock() {
        refs.remove(&name);
    }
    Ok(Action::await_change())
}

fn refused(message: String) -> Applied {
    Err(Refusal {
        reason: "invalid",
        message,
    })
}

async fn apply(obj: &Rollout, ctx: &Ctx, api: &Api<Rollout>) -> Result<Action, Error> {
    let name = obj.name_any();
    if let Ok(mut refs) = ctx.refs.lock() {
        refs.insert(name.clone(), obj.object_ref(&()));
    }
    let id = match RolloutId::new(&name) {
        Ok(id) => id,
        Err(e) => {
            let st = invalid_status(obj, "InvalidName", &format!("name: {e}"));
            write_status(api, obj, st).await?;
            return Ok(Action::await_change());
        }
    };
    let mut note: Option<String> = None;
    let engine_status = match ctx.engine.status(&id).await? {
        Some(s) => s,
        None => {
            let result = match obj.spec.to_create_spec(&name) {
                Ok(spec) => {
                    ctx.engine
                        .apply(Op::Create {
                            spec: Box::new(spec),
                            allow_overlap: obj.spec.allow_overlap,
                        })
                        .await?
                }
                Err(m) => refused(m),
            };
            match result {
                Ok(_) => match ctx.engine.status(&id).await? {
                    Some(s) => s,
                    None => return Ok(Action::requeue(REFRESH)),
                },
                Err(Refusal { reason, message }) => {
                    let st = invalid_status(obj, &camel(reason), &message);
                    write_status(api, obj, st).await?;
                    publish_event(
                        ctx,
                        &name,
                        EventType::Warning,
                        "Refused",
                        "Create",
                        &message,
                    )
                    .await;
                    // Refusals like an overlapping active rollout clear up later.
                    return Ok(Action::requeue(Duration::from_secs(30)));
                }
            }
        }
    };
    let phase = engine_status.phase.clone();
    let is_final = matches!(phase.as_str(), "completed" | "aborted" | "rolled_back");
    let pause_op = if obj.spec.paused && phase != "paused" && !is_final {
        Some(Op::Pause {
            rollout: id.clone(),
        })
    } else if !obj.spec.paused
        && phase == "paused"
        && engine_status.paused_by == Some(PauseReason::Operator)
    {
        Some(Op::Resume {
            rollout: id.clone(),
        })
    } else {
        None
    };
    if let Some(op) = pause_op
        && let Err(r) = ctx.engine.apply(op).await?
    {
        note = Some(r.message);
    }
    let done_action = obj.status.as_ref().and_then(|s| s.last_action.clone());
    let mut last_action = done_action.clone();
    let mut action_result = obj
        .status
        .as_ref()
        .and_then(|s| s.last_action_result.clone());
    if let Some(a) = obj.annotations().get(ACTION_ANNOTATION)
        && Some(a) != done_action.as_ref()
    {
        let verb = a.split('/').next().unwrap_or_default();
        let op = match verb {
            "promote" => Some(Op::Promote {
                rollout: id.clone(),
            }),
            "abort" => Some(Op::Abort {
                rollout: id.clone(),
            }),
            "rollback" => Some(Op::Rollback {
                rollout: id.clone(),
            }),
            "retry" => Some(Op::Retry {
                rollout: id.clone(),
            }),
            "resume" => Some(Op::Resume {
                rollout: id.clone(),
            }),
            _ => None,
        };
        match op {
            None => {
                action_result = Some(format!(
                    "{ACTION_ANNOTATION} {a:?}: use promote, abort, rollback, retry or resume"
                ));
            }
            Some(op) => match ctx.engine.apply(op).await? {
                Ok((m, _)) => action_result = Some(m),
                Err(r) => action_result = Some(format!("{verb} refused: {}", r.message)),
            },
        }
        last_action = Some(a.clone());
    }
    // After the commands above: the status they left.
    let status = ctx.engine.status(&id).await?.unwrap_or(engine_status);
    let mut st = build_status(obj, &status, note, last_action);
    st.last_action_result = action_result;
    let moving = !matches!(
        st.phase.as_deref(),
        Some("completed" | "aborted" | "rolled_back")
    );
    write_status(api, obj, st).await?;
    Ok(if moving {
        Action::requeue(REFRESH)
    } else {
        Action::await_change()
    })
}

fn camel(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

fn now_rfc3339() -> String {
    Timestamp::now().to_string()
}

/// Conditions keep their `lastTransitionTime` while their status stays.
fn condition(
    old: Option<&RolloutStatus>,
    generation: Option<i64>,
    type_: &str,
    on: bool,
    reason: &str,
    message: &str,
) -> Condition {
    let status = if on { "True" } else { "False" };
    let since = old
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(now_rfc3339);
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: since,
        observed_generation: generation,
    }
}

fn invalid_status(obj: &Rollout, reason: &str, message: &str) -> RolloutStatus {
    let old = obj.status.as_ref();
    let g = obj.meta().generation;
    RolloutStatus {
        phase: Some("invalid".into()),
        message: Some(message.into()),
        observed_generation: g,
        last_action: old.and_then(|s| s.last_action.clone()),
        last_action_result: old.and_then(|s| s.last_action_result.clone()),
        conditions: vec![
            condition(old, g, "Progressing", false, reason, message),
            condition(old, g, "Paused", false, reason, ""),
            condition(old, g, "Degraded", true, reason, message),
            condition(old, g, "Completed", false, reason, ""),
        ],
        ..Default::default()
    }
}

/// The resource status for the engine's status of the rollout.
pub fn build_status(
    obj: &Rollout,
    s: &EngineStatus,
    note: Option<String>,
    last_action: Option<String>,
) -> RolloutStatus {
    let old = obj.status.as_ref();
    let g = obj.meta().generation;
    let phase = s.phase.clone();
    let waves: Vec<WaveStatus> = s
        .waves
        .iter()
        .map(|w| WaveStatus {
            index: u16::try_from(w.index).unwrap_or(u16::MAX),
            label: w.label.clone(),
            opened: w.opened,
            population: u64::from(w.population),
            healthy: u64::from(w.healthy),
            failed: u64::from(w.failed),
            in_progress: u64::from(w.in_progress),
            silent: u64::from(w.silent),
        })
        .collect();
    let (healthy, failed) = s.opened_totals();
    let (healthy, failed) = (u64::from(healthy), u64::from(failed));
    let (paused_by, detail) = match &s.paused_by {
        Some(PauseReason::Operator) => ("operator", None),
        Some(PauseReason::ManualGate) => ("manual_gate", None),
        Some(PauseReason::Breach(why)) => ("breach", Some(why.to_string())),
        None => ("", None),
    };
    let why = s
        .halt_reason
        .clone()
        .or(detail)
        .or_else(|| s.waiting.clone());
    let message = note.or(why).unwrap_or_default();
    let progressing = matches!(
        phase.as_str(),
        "pending" | "wave_open" | "baking" | "rolling_back"
    );
    let paused = phase == "paused";
    let degraded = matches!(phase.as_str(), "rolling_back" | "rolled_back" | "aborted")
        || (paused && paused_by == "breach");
    let phase_reason = camel(&phase);
    let pause_reason = if paused {
        camel(paused_by)
    } else {
        "NotPaused".into()
    };
    RolloutStatus {
        wave: Some(s.wave),
        members: s.members as u64,
        healthy,
        failed,
        release: Some(s.release.clone()),
        message: (!message.is_empty()).then(|| message.clone()),
        last_action,
        last_action_result: None,
        observed_generation: g,
        conditions: vec![
            condition(old, g, "Progressing", progressing, &phase_reason, &message),
            condition(old, g, "Paused", paused, &pause_reason, &message),
            condition(
                old,
                g,
                "Degraded",
                degraded,
                if degraded { &phase_reason } else { "Healthy" },
                if degraded { &message } else { "" },
            ),
            condition(old, g, "Completed", phase == "completed", &phase_reason, ""),
        ],
        waves,
        phase: Some(phase),
    }
}

/// Writes the status when it changed; retried on 409 Conflict.
pub async fn write_status(
    api: &Api<Rollout>,
    obj: &Rollout,
    st: RolloutStatus,
) -> Result<(), Error> {
    if obj.status.as_ref() == Some(&st) {
        return Ok(());
    }
    let name = obj.name_any();
    let patch = json!({
        "apiVersion": "swell.dev/v1alpha1",
        "kind": "Rollout",
        "status": st,
    });
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(&patch);
    retry_conflict(|| api.patch_status(&name, &pp, &patch)).await?;
    Ok(())
}

/// Runs `f` again (up to 4 times, short back-off) while the API answers 409.
pub async fn retry_conflict<T, F, Fut>(mut f: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut delay = Duration::from_millis(50);
    for _ in 0..3 {
        match f().await {
            Err(kube::Error::Api(s)) if s.code == 409 => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
    f().await
}

/// Raises a Kubernetes Event on the named rollout (best effort: an Event that
/// cannot be written is logged, never fails the caller).
pub async fn publish_event(
    ctx: &Ctx,
    rollout: &str,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let reference = ctx.refs.lock().ok().and_then(|r| r.get(rollout).cloned());
    let Some(reference) = reference else { return };
    let ev = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
        warn!(rollout, error = %e, "event not recorded");
    }
}

/// The Kubernetes Event for an engine event, if it is one operators want to
/// see in `kubectl describe`: waves opening, gates passing, breaches,
/// rollbacks, pauses and the end.
pub fn event_for(ev: &RolloutEvent) -> Option<(EventType, &'static str, String)> {
    let EventKind::Decision(d) = &ev.what else {
        return None;
    };
    Some(match d {
        Decision::OpenWave { wave, .. } => (
            EventType::Normal,
            "WaveOpened",
            format!("wave {wave} opened"),
        ),
        Decision::GatePassed { wave } => (
            EventType::Normal,
            "GatePassed",
            format!("wave {wave} passed its health gate"),
        ),
        Decision::Breach { reason, policy } => (
            EventType::Warning,
            "Breach",
            format!("health gate breached: {reason}; policy {}", policy.name()),
        ),
        Decision::StartRollback { reason } => (
            EventType::Warning,
            "RollbackStarted",
            format!("rolling back: {reason}"),
        ),
        Decision::RollbackDone => (
            EventType::Warning,
            "RolledBack",
            "every device is back on its previous release".into(),
        ),
        Decision::Pause { reason } => (
            EventType::Normal,
            "Paused",
            format!(
                "paused ({})",
                match reason {
                    PauseReason::Operator => "operator",
                    PauseReason::ManualGate => "manual_gate",
                    PauseReason::Breach(_) => "breach",
                }
            ),
        ),
        Decision::Resume { wave } => (
            EventType::Normal,
            "Resumed",
            format!("resumed at wave {wave}"),
        ),
        Decision::Complete => (EventType::Normal, "Completed", "every wave passed".into()),
        Decision::Abort { reason } => (EventType::Warning, "Aborted", format!("aborted: {reason}")),
        _ => return None,
    })
}
