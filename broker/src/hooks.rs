//! The embedded broker's checks, as rmqtt hooks: every CONNECT is
//! authenticated and its client id and Last Will checked, every SUBSCRIBE and
//! PUBLISH authorized by [`Rules`]. A refusal is logged with its reason and
//! counted in [`BrokerStats`].

use crate::credentials::Credentials;
use crate::rules::{Identity, Role, Rules};
use async_trait::async_trait;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType};
use rmqtt::types::{AuthResult, LastWill, PublishAclResult, SubscribeAclResult};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::warn;

/// What the broker refused since it started.
#[derive(Debug, Default)]
pub struct BrokerStats {
    bad_credentials: AtomicU64,
    client_id_refused: AtomicU64,
    will_refused: AtomicU64,
    subscribe_refused: AtomicU64,
    publish_refused: AtomicU64,
    connections: AtomicU64,
    dropped: AtomicU64,
}

impl BrokerStats {
    /// Connections refused for a missing or wrong user name or password.
    pub fn bad_credentials(&self) -> u64 {
        self.bad_credentials.load(Ordering::Relaxed)
    }
    /// Connections refused for a client id the user may not use (a takeover
    /// attempt, MQTT-8).
    pub fn client_id_refused(&self) -> u64 {
        self.client_id_refused.load(Ordering::Relaxed)
    }
    /// Connections refused for a Last Will on a topic the user may not write.
    pub fn will_refused(&self) -> u64 {
        self.will_refused.load(Ordering::Relaxed)
    }
    pub fn subscribe_refused(&self) -> u64 {
        self.subscribe_refused.load(Ordering::Relaxed)
    }
    pub fn publish_refused(&self) -> u64 {
        self.publish_refused.load(Ordering::Relaxed)
    }
    /// Connections authenticated.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
    /// Messages the broker accepted and could not hand to a subscriber (its
    /// queue full, or its session closing at that instant).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

static DROPS: swell_mqtt::log_throttle::LogThrottle = swell_mqtt::log_throttle::LogThrottle::new();

/// Who a session's (already authenticated) user is.
pub(crate) fn identity_of(user: Option<&str>) -> Option<Identity> {
    let user = user?;
    let role = match user {
        crate::credentials::COORDINATOR_USER => Role::Coordinator,
        crate::credentials::OPERATOR_USER => Role::Operator,
        crate::credentials::GATEWAY_USER => Role::Gateway,
        _ => Role::Device,
    };
    Some(Identity {
        user: user.to_string(),
        role,
    })
}

pub(crate) struct Checks {
    pub credentials: Credentials,
    pub rules: Rules,
    pub stats: Arc<BrokerStats>,
}

fn refuse_connect(reason: AuthResult) -> ReturnType {
    (false, Some(HookResult::AuthResult(reason)))
}

#[async_trait]
impl Handler for Checks {
    async fn hook(&self, param: &Parameter, _acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(ci) => {
                let client_id = ci.client_id().to_string();
                let user = ci.username().map(|u| u.to_string());
                let password = ci.password().map(|p| p.to_vec()).unwrap_or_default();
                let Some(id) = user
                    .as_deref()
                    .and_then(|u| self.credentials.authenticate(u, &password))
                else {
                    self.stats.bad_credentials.fetch_add(1, Ordering::Relaxed);
                    warn!(%client_id, user = user.as_deref().unwrap_or("-"), reason = "bad_credentials", "embedded broker refused a connection: unknown user or wrong password");
                    return refuse_connect(AuthResult::BadUsernameOrPassword);
                };
                if !self.rules.may_use_client_id(&id, &client_id) {
                    self.stats.client_id_refused.fetch_add(1, Ordering::Relaxed);
                    warn!(%client_id, user = %id.user, role = id.role.name(), reason = "client_id", "embedded broker refused a connection: this user may not use this client id");
                    return refuse_connect(AuthResult::NotAuthorized);
                }
                if let Some(will) = ci.last_will() {
                    let topic = match will {
                        LastWill::V3(w) => w.topic.to_string(),
                        LastWill::V5(w) => w.topic.to_string(),
                    };
                    // rmqtt publishes a will without the publish check.
                    if !self.rules.may_publish(&id, &topic) {
                        self.stats.will_refused.fetch_add(1, Ordering::Relaxed);
                        warn!(%client_id, user = %id.user, %topic, reason = "will", "embedded broker refused a connection: its Last Will is on a topic this user may not write");
                        return refuse_connect(AuthResult::NotAuthorized);
                    }
                }
                self.stats.connections.fetch_add(1, Ordering::Relaxed);
                (
                    false,
                    Some(HookResult::AuthResult(AuthResult::Allow(false, None))),
                )
            }
            Parameter::ClientSubscribeCheckAcl(session, subscribe) => {
                let id = identity_of(session.id.username.as_deref());
                // rmqtt takes `$share/{group}/` off the filter before this hook;
                // the rules judge the filter as the client wrote it.
                let filter = match subscribe.opts.shared_group() {
                    Some(group) => format!("$share/{group}/{}", subscribe.topic_filter),
                    None => subscribe.topic_filter.to_string(),
                };
                let allowed = id
                    .as_ref()
                    .is_some_and(|id| self.rules.may_subscribe(id, &filter));
                if allowed {
                    return (
                        false,
                        Some(HookResult::SubscribeAclResult(
                            SubscribeAclResult::new_success(subscribe.opts.qos(), None),
                        )),
                    );
                }
                self.stats.subscribe_refused.fetch_add(1, Ordering::Relaxed);
                warn!(client_id = %session.id.client_id, user = session.id.username.as_deref().unwrap_or("-"), %filter, reason = "subscribe", "embedded broker refused a subscription");
                (
                    false,
                    Some(HookResult::SubscribeAclResult(
                        SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized),
                    )),
                )
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let id = identity_of(session.id.username.as_deref());
                let topic = publish.topic.to_string();
                if id
                    .as_ref()
                    .is_some_and(|id| self.rules.may_publish(id, &topic))
                {
                    return (
                        false,
                        Some(HookResult::PublishAclResult(PublishAclResult::allow())),
                    );
                }
                self.stats.publish_refused.fetch_add(1, Ordering::Relaxed);
                warn!(client_id = %session.id.client_id, user = session.id.username.as_deref().unwrap_or("-"), %topic, reason = "publish", "embedded broker refused a publish");
                (
                    false,
                    Some(HookResult::PublishAclResult(PublishAclResult::rejected(
                        false, None,
                    ))),
                )
            }
            Parameter::MessageDropped(to, _from, publish, reason) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                if let Some(g) = DROPS.hit() {
                    tracing::error!(
                        to = ?to.as_ref().map(|t| t.client_id.to_string()),
                        topic = %publish.topic,
                        %reason,
                        suppressed = g.suppressed,
                        total = g.total,
                        "embedded broker dropped a message it had accepted"
                    );
                }
                (true, None)
            }
            _ => (true, None),
        }
    }
}
