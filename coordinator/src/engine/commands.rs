//! Operator commands (`{p}/ops/{fleet}/cmd`, or the Kubernetes controller's): read,
//! applied to the rollouts or the registry, answered with a typed [`Reply`].

use super::{Engine, EngineError, Forwarded, Live, Out, ReplyTo, status_of};
use crate::fleet::registry::Enrollment;
use crate::ops::{self, Op, Refused, Request};
use crate::rollout::state::{self, Command, RolloutState};
use crate::status::{Answer, EventKind, Lifecycle, Reply};
use crate::store::RolloutRecord;
use swell_protocol::RolloutId;
use swell_protocol::messages::Release;
use tracing::info;

/// Why a command was refused: a reason clients can match on and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

fn refuse(reason: &'static str, message: String) -> Refusal {
    Refusal { reason, message }
}

/// An accepted command: what to publish, what it did, and its answer.
pub(super) struct Accepted {
    out: Vec<Out>,
    message: String,
    answer: Answer,
}

impl Engine {
    /// Applies a command from a trusted local source (the Kubernetes controller,
    /// whose caller was authorised by the API server). Returns what to publish and
    /// the outcome: what it did and its answer, or why it was refused.
    pub fn apply_local(
        &mut self,
        op: Op,
        now: u64,
    ) -> (Vec<Out>, Result<(String, Answer), Refusal>) {
        let name = op.name();
        let applied = self.apply(op, now);
        let settled = self.settle(now);
        match applied {
            Ok(Accepted {
                mut out,
                message,
                answer,
            }) => {
                out.extend(settled);
                info!(op = name, source = "kubernetes", "{message}");
                (out, Ok((message, answer)))
            }
            Err(r) => {
                info!(
                    op = name,
                    source = "kubernetes",
                    reason = r.reason,
                    "refused: {}",
                    r.message
                );
                (settled, Err(r))
            }
        }
    }

    /// A reply to an operator command answered outside the engine.
    pub fn reply_out(
        &self,
        id: Option<&str>,
        reply_to: Option<&str>,
        reply: &ReplyTo,
        body: Reply,
    ) -> Vec<Out> {
        self.reply(id, reply_to, reply, body)
    }

    pub(super) fn reply(
        &self,
        id: Option<&str>,
        reply_to: Option<&str>,
        reply: &ReplyTo,
        mut body: Reply,
    ) -> Vec<Out> {
        let topic = reply
            .response_topic
            .clone()
            .or_else(|| reply_to.map(str::to_string));
        let Some(topic) = topic else { return vec![] };
        // A reply never goes into the Swell tree or a wildcard.
        if topic.contains(['+', '#'])
            || topic.starts_with(self.s.topics.prefix())
            || topic.is_empty()
        {
            return vec![];
        }
        body.id = id.map(str::to_string);
        vec![Out {
            topic,
            payload: serde_json::to_vec(&body).unwrap_or_default(),
            retain: false,
            correlation: reply.correlation.clone(),
            event: None,
        }]
    }

    /// A command on `{p}/ops/cmd`, where operator clients sent them before the
    /// ops topics had a fleet level: never carried out (it names no fleet, and
    /// every coordinator on the prefix hears it), answered with where it goes.
    pub(super) fn on_legacy_command(&mut self, payload: &[u8], reply: ReplyTo) -> Vec<Out> {
        #[derive(serde::Deserialize)]
        struct Addressing {
            id: Option<String>,
            reply_to: Option<String>,
        }
        self.counters.commands_refused += 1;
        let to = self.s.topics.ops_cmd(&self.s.fleet);
        self.reject(
            "legacy_topic",
            "command",
            &format_args!(
                "sent to {}; commands go to {to}",
                self.s.topics.legacy_ops_cmd()
            ),
        );
        let Ok(Addressing { id, reply_to }) = serde_json::from_slice(payload) else {
            return vec![];
        };
        let body = Reply::refused(
            None,
            "legacy_topic",
            format!(
                "commands go to {prefix}/ops/{{fleet}}/cmd; the coordinator of fleet {fleet} reads {to}",
                prefix = self.s.topics.prefix(),
                fleet = self.s.fleet,
            ),
        );
        self.reply(id.as_deref(), reply_to.as_deref(), &reply, body)
    }

    pub(super) fn on_command(
        &mut self,
        payload: &[u8],
        reply: ReplyTo,
        now: u64,
    ) -> Result<Vec<Out>, EngineError> {
        let req = match self
            .ops
            .parse(payload, now, reply.response_topic.as_deref())
        {
            Ok(r) => r,
            Err(Refused {
                id,
                reply_to,
                reason,
                message,
            }) => {
                self.counters.commands_refused += 1;
                self.reject(reason, "command", &message);
                let body = Reply::refused(None, reason, message);
                return Ok(self.reply(id.as_deref(), reply_to.as_deref(), &reply, body));
            }
        };
        let Request {
            id,
            reply_to,
            op,
            signer,
            mark,
        } = req;
        if let Some((key, issued_at)) = mark {
            // Durable before the command takes effect: after a restart it
            // cannot be replayed (OPS-2).
            self.store.put_operator_mark(key, issued_at)?;
        }
        let op_name = op.name();
        if self.forward_rollout_ops && op.changes_rollouts() {
            self.counters.commands_accepted += 1;
            self.forwarded.push(Forwarded {
                op,
                id,
                reply_to,
                reply,
                signer,
            });
            return Ok(vec![]);
        }
        let (mut out, body) = match self.apply(op, now) {
            Ok(Accepted {
                out,
                message,
                answer,
            }) => {
                self.counters.commands_accepted += 1;
                info!(op = op_name, signer = ?signer.map(|k| k.to_string()), "{message}");
                (out, Reply::accepted(op_name, message, answer))
            }
            Err(r) => {
                self.counters.commands_refused += 1;
                info!(
                    op = op_name,
                    reason = r.reason,
                    "command refused: {}",
                    r.message
                );
                (vec![], Reply::refused(Some(op_name), r.reason, r.message))
            }
        };
        out.extend(self.reply(id.as_deref(), reply_to.as_deref(), &reply, body));
        Ok(out)
    }

    pub(super) fn apply(&mut self, op: Op, now: u64) -> Result<Accepted, Refusal> {
        if let Some((rollout, cmd)) = op.as_command() {
            let rollout = rollout.clone();
            return self.apply_command(&rollout, cmd, now);
        }
        let (message, answer) = match op {
            Op::Create {
                spec,
                allow_overlap,
            } => return self.create(*spec, allow_overlap, now),
            Op::Approve { device, key } => return self.approve(&device, key, now),
            Op::Reject {
                device,
                key,
                pending,
            } => return self.reject_devices(device.as_ref(), key, pending),
            Op::Status { rollout } => match rollout {
                Some(r) => {
                    let l = self
                        .rollouts
                        .get(&r)
                        .ok_or_else(|| refuse("unknown_rollout", format!("no rollout {r}")))?;
                    (
                        format!("status of {r}"),
                        Answer::Rollout(Box::new(status_of(l, now))),
                    )
                }
                None => {
                    let all: Vec<_> = self.rollouts.values().map(|l| status_of(l, now)).collect();
                    (format!("{} rollouts", all.len()), Answer::Rollouts(all))
                }
            },
            Op::Fleet => {
                let f = self.fleet_summary();
                (format!("{} devices", f.devices), Answer::Fleet(f))
            }
            Op::Devices {
                selector,
                release,
                online,
                enrollment,
                limit,
            } => {
                let selector = selector
                    .as_deref()
                    .map(swell_protocol::cohort::Selector::parse)
                    .transpose()
                    .map_err(|e| refuse("invalid", format!("selector: {e}")))?;
                let list = self.device_list(
                    selector.as_ref(),
                    release.as_deref(),
                    online,
                    enrollment,
                    limit,
                );
                (
                    format!("{} devices match", list.matched),
                    Answer::Devices(list),
                )
            }
            _ => return Err(refuse("invalid", "unsupported operation".into())),
        };
        Ok(Accepted {
            out: vec![],
            message,
            answer,
        })
    }

    pub(super) fn approve(
        &mut self,
        device: &swell_protocol::DeviceId,
        key: Option<swell_protocol::KeyId>,
        now: u64,
    ) -> Result<Accepted, Refusal> {
        let unknown = || {
            refuse(
                "unknown_device",
                format!("device {device} has not said hello"),
            )
        };
        let slot = self.devices.slot(device).ok_or_else(unknown)?;
        let d = self.devices.at_mut(slot).ok_or_else(unknown)?;
        if d.enrollment == Enrollment::Approved {
            return Err(refuse(
                "already",
                format!("device {device} is already approved"),
            ));
        }
        let pending_key = d.key.key_id();
        if let Some(k) = key
            && k != pending_key
        {
            return Err(refuse(
                "key_mismatch",
                format!(
                    "device {device} is pending with key {pending_key}, not {k}: another Hello bound it since; look again"
                ),
            ));
        }
        d.enrollment = Enrollment::Approved;
        self.pending -= 1;
        let rec = d.clone();
        let store = |e: crate::store::StoreError| refuse("store", e.to_string());
        self.store.put_device(&rec).map_err(store)?;
        // An approval is answered as done: durable first.
        self.store.flush().map_err(store)?;
        for l in self
            .rollouts
            .values_mut()
            .filter(|l| l.rec.outcome.is_none() && &l.rec.spec.fleet == rec.fleet())
        {
            l.tracker
                .consider(slot, &rec.id, rec.labels(), rec.hardware(), rec.online);
        }
        let enrolled = self
            .enrolled(&rec, now)
            .map_err(|e| refuse("sign", e.to_string()))?;
        Ok(Accepted {
            out: vec![enrolled],
            message: format!("device {device} approved with key {pending_key}"),
            answer: Answer::Device {
                device: device.to_string(),
            },
        })
    }

    /// `reject`: one device, or every pending one (ENROLL-4).
    fn reject_devices(
        &mut self,
        device: Option<&swell_protocol::DeviceId>,
        key: Option<swell_protocol::KeyId>,
        all_pending: bool,
    ) -> Result<Accepted, Refusal> {
        let slots: Vec<usize> = match (device, all_pending) {
            (Some(device), false) => {
                let slot = self.devices.slot(device).ok_or_else(|| {
                    refuse(
                        "unknown_device",
                        format!("device {device} has not said hello"),
                    )
                })?;
                let bound = self.devices.at(slot).map(|d| d.key.key_id());
                if let (Some(k), Some(b)) = (key, bound)
                    && k != b
                {
                    return Err(refuse(
                        "key_mismatch",
                        format!("device {device} is bound to key {b}, not {k}; look again"),
                    ));
                }
                if let Some(r) = self.counted_in(slot) {
                    return Err(refuse(
                        "in_rollout",
                        format!(
                            "device {device} takes part in rollout {r}; reject it once that rollout is over"
                        ),
                    ));
                }
                vec![slot]
            }
            (None, true) => self
                .devices
                .slots()
                .filter(|(_, d)| d.enrollment == Enrollment::Pending)
                .map(|(slot, _)| slot)
                .filter(|&slot| self.counted_in(slot).is_none())
                .collect(),
            _ => {
                return Err(refuse(
                    "invalid",
                    "reject takes a device or \"pending\": true".into(),
                ));
            }
        };
        let mut out = Vec::new();
        let mut removed = Vec::new();
        let store = |e: crate::store::StoreError| refuse("store", e.to_string());
        for slot in slots {
            if let Some(o) = self.forget_device(slot).map_err(store)? {
                removed.push(o.0);
                out.push(o.1);
            }
        }
        // Answered as done: durable first.
        self.store.flush().map_err(store)?;
        self.counters.devices_rejected += removed.len() as u64;
        let message = match removed.as_slice() {
            [one] => format!("device {one} removed"),
            many => format!("{} pending devices removed", many.len()),
        };
        info!(devices = removed.len(), "{message}");
        Ok(Accepted {
            out,
            message,
            answer: Answer::Removed { removed },
        })
    }

    pub(super) fn create(
        &mut self,
        spec: ops::CreateSpec,
        allow_overlap: bool,
        now: u64,
    ) -> Result<Accepted, Refusal> {
        let mut spec = spec
            .into_spec(&self.s.fleet)
            .map_err(|m| refuse("invalid", m))?;
        if spec.fleet != self.s.fleet {
            return Err(refuse(
                "invalid",
                format!(
                    "this coordinator serves fleet {}, not {}",
                    self.s.fleet, spec.fleet
                ),
            ));
        }
        if self.rollouts.contains_key(&spec.id) {
            return Err(refuse(
                "exists",
                format!("rollout {} already exists", spec.id),
            ));
        }
        let release: Release = spec
            .release
            .verify(&self.s.keys.release_keys, self.s.keys.release_threshold)
            .map_err(|e| {
                refuse(
                    "unsigned",
                    format!("release {}: {e}", spec.release_id().short()),
                )
            })?;
        // ROLL-3: waves open within the release's own exposure schedule, and
        // only the hardware it is for can be members.
        spec.exposure = release.exposure.clone();
        spec.hardware = release.hardware.clone();
        if !allow_overlap {
            for l in self
                .rollouts
                .values()
                .filter(|l| !l.rec.state.is_final() && l.rec.spec.fleet == spec.fleet)
            {
                if !ops::provably_disjoint(&l.rec.spec.selector, &spec.selector) {
                    return Err(refuse(
                        "overlap",
                        format!(
                            "selector {:?} may select devices of active rollout {} ({:?}); narrow it or pass allow_overlap",
                            spec.selector.to_string(),
                            l.rec.spec.id,
                            l.rec.spec.selector.to_string()
                        ),
                    ));
                }
            }
        }
        let rec = RolloutRecord {
            spec,
            state: RolloutState::new(),
            manifest_seq: 0,
            decisions: 0,
            created_at: now,
            outcome: None,
            superseded_by: None,
        };
        self.store
            .commit_rollout(&rec, None)
            .map_err(|e| refuse("store", e.to_string()))?;
        let id = rec.spec.id.clone();
        let tracker = self.new_tracker(&rec);
        let members = tracker.members();
        self.rollouts.insert(
            id.clone(),
            Live {
                rec,
                tracker,
                published: None,
                published_at: 0,
            },
        );
        info!(rollout = %id, version = %release.version, members, "rollout created");
        let mut out = self
            .step_rollout(&id, now)
            .map_err(|e| refuse("store", e.to_string()))?;
        out.extend(self.event(
            &id,
            now,
            EventKind::Lifecycle(Lifecycle::Created {
                version: release.version.clone(),
                members,
            }),
        ));
        Ok(Accepted {
            out,
            message: format!(
                "rollout {id} created: release {} with {members} matching devices",
                release.version
            ),
            answer: self.answer(&id, now),
        })
    }

    /// A rollout's status as a command's answer.
    pub(super) fn answer(&self, id: &RolloutId, now: u64) -> Answer {
        self.rollouts.get(id).map_or(Answer::Nothing, |l| {
            Answer::Rollout(Box::new(status_of(l, now)))
        })
    }

    pub(super) fn apply_command(
        &mut self,
        id: &RolloutId,
        cmd: Command,
        now: u64,
    ) -> Result<Accepted, Refusal> {
        let l = self
            .rollouts
            .get(id)
            .ok_or_else(|| refuse("unknown_rollout", format!("no rollout {id}")))?;
        let st = state::command(&l.rec.spec, &l.rec.state, &cmd, now)
            .map_err(|m| refuse("refused", m))?;
        if cmd == Command::Retry
            && let Some(l) = self.rollouts.get_mut(id)
        {
            l.tracker.retry();
        }
        let mut out = self
            .commit(id, st, None, Some(cmd.clone()), now)
            .map_err(|e| refuse("store", e.to_string()))?;
        out.extend(
            self.step_rollout(id, now)
                .map_err(|e| refuse("store", e.to_string()))?,
        );
        Ok(Accepted {
            out,
            message: format!("{cmd:?} applied to {id}").to_lowercase(),
            answer: self.answer(id, now),
        })
    }

    /// Forgets a rollout (its `Rollout` resource was deleted): halts it if it is
    /// still running, clears its retained manifest and status so devices and
    /// late subscribers stop seeing it, and deletes its records. `false` when
    /// the engine did not know it.
    pub fn remove(&mut self, id: &RolloutId, now: u64) -> Result<(bool, Vec<Out>), EngineError> {
        let Some(l) = self.rollouts.get(id) else {
            return Ok((false, vec![]));
        };
        let mut out = Vec::new();
        if !l.rec.state.is_final() {
            // Halt first: an agent that still holds the manifest (offline now,
            // retained copy cleared) must not keep installing it.
            if let Ok(st) = state::command(&l.rec.spec, &l.rec.state, &Command::Abort, now) {
                out.extend(self.commit(id, st, None, Some(Command::Abort), now)?);
            }
        }
        let Some(l) = self.rollouts.remove(id) else {
            return Ok((false, out));
        };
        // The replay floors its reports held move into the device records.
        for rec in l.tracker.member_slots().filter_map(|s| self.devices.at(s)) {
            self.store.put_device(rec)?;
        }
        self.store.delete_rollout(id)?;
        for topic in [
            self.s.topics.manifest(&l.rec.spec.fleet, id),
            self.s.topics.ops_status(&self.s.fleet, id),
        ] {
            // An empty retained publish deletes the retained message.
            out.push(Out {
                topic,
                payload: Vec::new(),
                retain: true,
                correlation: None,
                event: None,
            });
        }
        out.extend(self.event(id, now, EventKind::Lifecycle(Lifecycle::Removed)));
        info!(rollout = %id, "rollout removed");
        out.extend(self.settle(now));
        Ok((true, out))
    }
}
