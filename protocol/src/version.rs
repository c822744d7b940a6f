//! Protocol version negotiation. A `Hello` carries the range an agent speaks; the
//! coordinator picks the highest version both speak, and answers anything it cannot
//! read (unknown kind, other major version) with `Unsupported`, which it can always
//! build because the envelope header is frozen.

use crate::envelope::{Header, MessageKind, PROTO_VERSION};
use crate::messages::Unsupported;

/// Oldest protocol version this crate speaks.
pub const PROTO_MIN: u16 = 1;
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

/// Whether this side can read a message with this header.
pub fn understands(header: &Header) -> bool {
    header.proto == PROTO_VERSION && MessageKind::from_raw(header.kind).is_some()
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
        assert_eq!(negotiate(1, 1), Ok(1));
        assert_eq!(negotiate(1, 5), Ok(1));
        assert!(negotiate(2, 5).is_err());
        assert!(negotiate(0, 0).is_err());
        assert!(negotiate(3, 1).is_err());
    }
}
