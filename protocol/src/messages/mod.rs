//! The message catalogue. Field order is the wire order (postcard is positional):
//! never reorder, remove or insert fields or variants; only append, and only with a
//! protocol version bump (see `docs/protocol.md`, "Changing the protocol").

mod device;
mod fleet;
mod keylist;
mod release;

pub use device::{Hello, Metrics, Phase, ProbeResult, Reason, Report, SessionNote, reason};
pub use fleet::{
    Beacon, DeviceDirective, Enrolled, MAX_CANARY, Manifest, ManifestState, Unsupported,
};
pub use keylist::{KeyList, KeyListError, RootOfTrust};
pub use release::{
    Artifact, ArtifactKind, ConfigBlob, ExposureSchedule, ExposureStep, Release, RollbackOf,
};

/// Checks a bounded free-text field (display versions, reasons, agent versions):
/// printable ASCII only, so nothing odd reaches a terminal or a log.
pub(crate) fn check_text(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{what} is {} bytes; at most {max}", s.len()));
    }
    if let Some((i, c)) = s.char_indices().find(|(_, c)| !(' '..='~').contains(c)) {
        return Err(format!(
            "{what} has {c:?} at byte {i}; only printable ASCII is allowed"
        ));
    }
    Ok(())
}

pub(crate) fn check_count(what: &str, n: usize, min: usize, max: usize) -> Result<(), String> {
    if n < min || n > max {
        return Err(format!("{what}: {n} entries; {min} to {max} are allowed"));
    }
    Ok(())
}
