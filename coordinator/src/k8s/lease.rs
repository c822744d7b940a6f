//! Leader election with a `coordination.k8s.io/v1` Lease.
//!
//! The client-go recipe: read the Lease, then write it back with its
//! `resourceVersion`, so of two replicas racing for it exactly one write lands
//! (the other gets 409 Conflict). Taking the lease and counting the transition
//! are one write: `leaseTransitions` is the fencing term, and the coordinator's
//! epoch is built from it (ROLL-4). Every process start that takes the lease
//! starts a new term, even if it had the same identity before, because it may
//! have lost its local epoch file.
//!
//! Why not kube-lease-manager: it takes the lock in one patch and increments
//! `leaseTransitions` in a second one, so two successive leaders can read the
//! same count, and the same epoch would then be signed by two leaders.

use crate::metrics::{LeaseState, Metrics};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Lease timing.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    /// This replica (the pod name).
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub duration: Duration,
    /// How often the holder renews.
    pub renew_every: Duration,
    /// How often a standby tries to take the lease.
    pub retry_every: Duration,
}

impl LeaseConfig {
    pub fn new(name: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaseConfig {
            name: name.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            retry_every: Duration::from_secs(2),
        }
    }

    /// The holder steps down when it could not renew for this long, before any
    /// standby may consider the lease expired.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }
}

/// Result of one attempt to take the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Ours, in term `transitions`.
    Acquired { transitions: u32 },
    /// Another replica holds it (or won a race for it).
    HeldBy(String),
}

/// Why the lease API failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease API: {0}")]
    Api(#[from] kube::Error),
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Elects this replica through one Lease.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Elector {
    pub fn new(api: Api<Lease>, cfg: LeaseConfig) -> Self {
        Elector { api, cfg }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.cfg.duration.as_secs()).unwrap_or(i32::MAX)
    }

    fn expired(&self, spec: &LeaseSpec, now: Timestamp) -> bool {
        let Some(renewed) = spec.renew_time.as_ref() else {
            return true;
        };
        let secs = i64::from(spec.lease_duration_seconds.unwrap_or(0));
        renewed
            .0
            .checked_add(SignedDuration::from_secs(secs))
            .map_or(true, |until| until < now)
    }

    /// One attempt: create the Lease, or take it when it is free or expired.
    pub async fn try_acquire(&self) -> Result<Attempt, LeaseError> {
        let now = Timestamp::now();
        let me = &self.cfg.identity;
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(self.duration_secs()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(1),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Acquired { transitions: 1 }),
                Err(e) if is_conflict(&e) => Ok(Attempt::HeldBy("(created concurrently)".into())),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if let Some(h) = &holder
            && h != me
            && !self.expired(&spec, now)
        {
            return Ok(Attempt::HeldBy(h.clone()));
        }
        let transitions = u32::try_from(spec.lease_transitions.unwrap_or(0))
            .unwrap_or(0)
            .saturating_add(1);
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(me.clone()),
            lease_duration_seconds: Some(self.duration_secs()),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(i32::try_from(transitions).unwrap_or(i32::MAX)),
            ..spec
        });
        // `replace` sends metadata.resourceVersion: a concurrent writer wins, we get 409.
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Acquired { transitions }),
            Err(e) if is_conflict(&e) => Ok(Attempt::HeldBy("(won by a concurrent writer)".into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Renews our lease. `Ok(false)`: it is not ours any more.
    pub async fn renew(&self) -> Result<bool, LeaseError> {
        for _ in 0..2 {
            let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
                return Ok(false);
            };
            let Some(spec) = lease.spec.as_mut() else {
                return Ok(false);
            };
            if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
                return Ok(false);
            }
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            match self
                .api
                .replace(&self.cfg.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => return Ok(true),
                // Someone wrote in between: read again and look who holds it.
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(false)
    }

    /// Gives the lease up on a clean shutdown so a standby takes over at once.
    pub async fn release(&self) -> Result<(), LeaseError> {
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Standby until the lease is ours; returns the term. `None` if cancelled.
    pub async fn acquire(&self, metrics: &Metrics, cancel: &CancellationToken) -> Option<u32> {
        let mut last_holder = String::new();
        loop {
            match self.try_acquire().await {
                Ok(Attempt::Acquired { transitions }) => {
                    info!(lease = %self.cfg.name, term = transitions, "leader lease acquired");
                    metrics.set_lease(LeaseState::Holding);
                    return Some(transitions);
                }
                Ok(Attempt::HeldBy(h)) => {
                    if h != last_holder {
                        info!(lease = %self.cfg.name, holder = %h, "standby: another replica leads");
                        last_holder = h;
                    }
                    metrics.set_lease(LeaseState::Waiting);
                }
                Err(e) => {
                    warn!(lease = %self.cfg.name, error = %e, "leader election failing");
                    metrics.set_lease(LeaseState::Failing);
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(self.cfg.retry_every) => {}
            }
        }
    }

    /// Renews until cancelled or lost. On loss (another holder, or no successful
    /// renewal within the renew deadline) `leading` turns false and this returns.
    pub async fn keep(
        self,
        leading: watch::Sender<bool>,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.cfg.renew_every) => {}
            }
            match self.renew().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.cfg.name, "leader lease taken by another replica");
                    break;
                }
                Err(e) => {
                    warn!(lease = %self.cfg.name, error = %e, "lease renewal failed");
                    if last_ok.elapsed() >= self.cfg.renew_deadline() {
                        warn!(lease = %self.cfg.name, "lease not renewed within its deadline: stepping down");
                        break;
                    }
                }
            }
        }
        metrics.set_lease(LeaseState::Waiting);
        let _ = leading.send(false);
    }
}
