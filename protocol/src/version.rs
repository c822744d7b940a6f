//! Protocol version negotiation. A `Hello` carries the range an agent speaks; the
//! coordinator picks the highest version both speak, and answers anything it cannot
//! read (unknown kind, other major version) with `Unsupported`, which it can always
//! build because the envelope header is frozen.

use crate::envelope::{Header, MessageKind, PROTO_VERSION};
use crate::messages::Unsupported;

/// Oldest protocol version this crate speaks: 3, whose Hello proves the
/// enrollment token instead of carrying it (ENROLL-2) and whose waves follow
/// the release's bucket (ROLL-3). A peer of 1 or 2 gets `Unsupported`.
pub const PROTO_MIN: u16 = 3;
/// Newest protocol version this crate speaks.
pub const PROTO_MAX: u16 = PROTO_VERSION;

/// No version in common.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("peer speaks protocol {their_min}..={their_max}, this side {PROTO_MIN}..={PROTO_MAX}")]
pub struct NoCommonVersion {
    pub their_min: u16,
    pub their_max: u16,
}

/// Highest version in both ranges.
pub fn negotiate(their_min: u16, their_max: u16) -> Result<u16, NoCommonVersion> {
    let hi = their_max.min(PROTO_MAX);
    if their_min > their_max || hi < their_min.max(PROTO_MIN) {
        return Err(NoCommonVersion {
            their_min,
            their_max,
        });
    }
    Ok(hi)
}

/// Whether this side can read a message with this header: a kind it knows,
/// with the version that kind travels with.
pub fn understands(header: &Header) -> bool {
    MessageKind::from_raw(header.kind).is_some_and(|k| k.proto() == header.proto)
}

/// The answer to a message this side cannot read.
pub fn unsupported(header: &Header) -> Unsupported {
    Unsupported {
        kind: header.kind,
        proto: header.proto,
        seq: header.seq,
        proto_min: PROTO_MIN,
        proto_max: PROTO_MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_negotiation() {
        assert!(negotiate(1, 1).is_err());
        assert!(negotiate(1, 2).is_err());
        assert_eq!(negotiate(1, 5), Ok(3));
        assert_eq!(negotiate(3, 5), Ok(3));
        assert!(negotiate(4, 5).is_err());
        assert!(negotiate(0, 0).is_err());
        assert!(negotiate(3, 1).is_err());
    }

    #[test]
    fn version_each_kind_travels_with_its_own_version() {
        let header = |proto, kind: MessageKind| Header {
            proto,
            kind: kind as u16,
            key_id: crate::testkeys::test_key("v").key_id(),
            epoch: 0,
            seq: 1,
            issued_at: 0,
            expires_at: 0,
            audience: crate::envelope::Audience::Any,
        };
        assert!(understands(&header(1, MessageKind::Report)));
        assert!(!understands(&header(2, MessageKind::Report)));
        assert!(understands(&header(2, MessageKind::SessionNote)));
        assert!(!understands(&header(1, MessageKind::SessionNote)));
        // Protocol 3 redefined these: their version 1 is not read any more.
        for k in [MessageKind::Hello, MessageKind::Manifest] {
            assert!(understands(&header(3, k)));
            assert!(!understands(&header(1, k)));
        }
        assert!(understands(&header(3, MessageKind::Enrolled)));
    }
}
