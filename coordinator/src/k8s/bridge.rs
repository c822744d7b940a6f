//! MQTT operator commands in Kubernetes mode: the `Rollout` resource is the
//! single source of truth, so a verified `create`/`pause`/… becomes a write to
//! the resource (which the controller then reconciles), and the MQTT reply says
//! what was written. The command's signature was checked by the engine first.

use super::controller::{ACTION_ANNOTATION, EngineHandle, FIELD_MANAGER, retry_conflict};
use super::crd::{Rollout, RolloutResourceSpec};
use crate::engine::Forwarded;
use crate::ops::Op;
use crate::server::Control;
use crate::status::{Answer, Reply};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Distinct per command so the same verb can be sent twice.
fn nonce() -> String {
    let mut b = [0u8; 6];
    if getrandom::fill(&mut b).is_err() {
        return crate::server::unix_now().to_string();
    }
    hex::encode(b)
}

fn who(f: &Forwarded) -> String {
    f.signer
        .as_ref()
        .map_or_else(|| "mqtt".to_string(), |k| format!("mqtt operator {k}"))
}

/// Writes one command to the resource; the reply.
pub async fn apply(api: &Api<Rollout>, f: &Forwarded) -> Reply {
    let op_name = f.op.name();
    let fail = |reason: &str, message: String| Reply::refused(Some(op_name), reason, message);
    match &f.op {
        Op::Create {
            spec,
            allow_overlap,
        } => {
            let name = spec.rollout.to_string();
            let rs = match RolloutResourceSpec::from_create_spec(spec, *allow_overlap) {
                Ok(rs) => rs,
                Err(m) => return fail("invalid", m),
            };
            let mut obj = Rollout::new(&name, rs);
            obj.annotations_mut()
                .insert("swell.dev/created-by".into(), who(f));
            let pp = PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            match api.create(&pp, &obj).await {
                Ok(o) => Reply::accepted(
                    op_name,
                    format!(
                        "Rollout {}/{} created; the controller starts it",
                        o.namespace().unwrap_or_default(),
                        name
                    ),
                    Answer::Nothing,
                ),
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    fail("exists", format!("rollout {name} already exists"))
                }
                Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
                    fail("invalid", s.message)
                }
                Err(e) => fail("kubernetes", e.to_string()),
            }
        }
        op => {
            let Some((rollout, _)) = op.as_command() else {
                return fail("invalid", "not a rollout command".into());
            };
            let name = rollout.to_string();
            let action = match op {
                Op::Pause { .. } => None,
                Op::Resume { .. } => Some("resume"),
                Op::Promote { .. } => Some("promote"),
                Op::Abort { .. } => Some("abort"),
                Op::Rollback { .. } => Some("rollback"),
                _ => Some("retry"),
            };
            let result = retry_conflict(|| async {
                // Read first: the write carries its resourceVersion, so a
                // concurrent writer makes it fail with 409 and it is redone.
                let cur = api.get(&name).await?;
                let mut body = json!({"metadata": {"resourceVersion": cur.resource_version()}});
                match op {
                    Op::Pause { .. } => body["spec"] = json!({"paused": true}),
                    Op::Resume { .. } => body["spec"] = json!({"paused": false}),
                    _ => {}
                }
                if let Some(a) = action {
                    body["metadata"]["annotations"] =
                        json!({ ACTION_ANNOTATION: format!("{a}/{}", nonce()) });
                }
                let pp = PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                };
                api.patch(&name, &pp, &Patch::Merge(&body)).await
            })
            .await;
            match result {
                Ok(_) => Reply::accepted(
                    op_name,
                    format!("{op_name} written to Rollout {name}; the controller applies it"),
                    Answer::Nothing,
                ),
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    fail("unknown_rollout", format!("no rollout {name}"))
                }
                Err(e) => fail("kubernetes", e.to_string()),
            }
        }
    }
}

/// Serves forwarded commands until the channel closes.
pub async fn run(api: Api<Rollout>, mut rx: mpsc::Receiver<Forwarded>, engine: EngineHandle) {
    while let Some(f) = rx.recv().await {
        let body = apply(&api, &f).await;
        if body.ok {
            info!(
                op = f.op.name(),
                "operator command written to the Rollout resource"
            );
        } else {
            warn!(
                op = f.op.name(),
                reason = body.reason.as_deref().unwrap_or_default(),
                "operator command not written"
            );
        }
        let reply = Control::Reply {
            id: f.id.clone(),
            reply_to: f.reply_to.clone(),
            reply: f.reply.clone(),
            body: Box::new(body),
        };
        if engine.send(reply).await.is_err() {
            return;
        }
    }
}
