//! Swell wire protocol, version 1.
//!
//! Everything two parties must agree on to roll a release out lives here and only
//! here: identifiers, the signed envelope, the threshold-signed objects (key lists
//! and releases), the message catalogue, the MQTT topic tree, the cohort bucket
//! function with the label selector language, and protocol version negotiation.
//! The crate does no I/O and pulls in no async runtime, so a third-party agent, a
//! fuzzer or a `no-network` tool can depend on it alone.
//!
//! # Layout
//! - [`ids`]: validated identifiers (`DeviceId`, `FleetId`, `RolloutId`, digests).
//! - [`crypto`]: ed25519 keys, key ids, the one signature check everything uses.
//! - [`codec`]: bounded postcard encoding and exact decoding.
//! - [`envelope`]: frozen header, `seal` and `UnverifiedEnvelope::verify`.
//! - [`threshold`]: objects signed by t of n distinct keys (releases, key lists).
//! - [`messages`]: every payload type and its size cap.
//! - [`topics`]: build and parse every topic.
//! - [`cohort`]: `bucket()`, waves → `open_below`, label selectors.
//! - [`version`]: protocol version negotiation and the `Unsupported` answer.
//! - `testkeys`, `fixtures` (feature `test-util`): public test keys and signed
//!   test objects (key list, releases, manifests, beacons, directives) for the
//!   tests and benchmarks of every crate.
//!
//! The normative description is `docs/protocol.md`; the golden vectors under
//! `protocol/tests/golden/v1/` pin the bytes.

pub mod codec;
pub mod cohort;
pub mod crypto;
pub mod enroll;
pub mod envelope;
pub mod ids;
pub mod messages;
pub mod threshold;
pub mod topics;
pub mod version;

#[cfg(feature = "test-util")]
pub mod fixtures;
#[cfg(feature = "test-util")]
pub mod testkeys;

mod hexser;

pub use codec::CodecError;
pub use crypto::{KeyId, PublicKey, SecretKey, Signature};
pub use envelope::{Audience, EnvelopeError, Header, MessageKind, UnverifiedEnvelope, Verified};
pub use ids::{DeviceId, Digest, FleetId, IdError, ReleaseId, RolloutId};
