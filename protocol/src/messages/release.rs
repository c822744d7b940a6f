//! `Release`: what is installed. Signed by a threshold of offline release keys,
//! carried verbatim inside manifests; the coordinator key can never change it.

use super::{check_count, check_text};
use crate::cohort::PPM_FULL;
use crate::envelope::MessageKind;
use crate::ids::{Digest, ReleaseId, validate_id};
use crate::threshold::ThresholdMessage;
use serde::{Deserialize, Serialize};

/// A release: artifacts paired with a configuration blob, for some hardware.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// Monotonic release counter (VER-1); the order devices enforce.
    pub counter: u64,
    /// Display version for people (`2.3.0`); not used for ordering.
    pub version: String,
    /// When the release was made, Unix seconds.
    pub created_at: u64,
    /// 1 to 16 artifacts.
    pub artifacts: Vec<Artifact>,
    /// Configuration paired with the artifacts (a config-only change is a release).
    pub config: Option<ConfigBlob>,
    /// Hardware ids this release may run on (VER-3); 1 to 32.
    pub hardware: Vec<String>,
    /// Device-enforced cap on exposure over time (ROLL-3).
    pub exposure: Option<ExposureSchedule>,
    /// Set when this release deliberately brings back older content.
    pub rollback: Option<RollbackOf>,
}

/// One file or image of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Name for people and installer hooks; never used as a path (DL-4).
    pub name: String,
    pub kind: ArtifactKind,
    /// SHA-256 of the exact bytes (for containers: of the image manifest).
    pub digest: Digest,
    /// Exact length in bytes (DL-1: a download stops at length + 1).
    pub length: u64,
    /// Where to fetch it; tried in order. 0 to 8 URLs.
    pub urls: Vec<String>,
}

/// How an artifact is installed. Wire order fixed: only append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArtifactKind {
    Firmware,
    Bundle,
    Container,
}

/// The configuration paired with a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigBlob {
    pub digest: Digest,
    pub length: u64,
    pub urls: Vec<String>,
}

/// At most `max_ppm` of the fleet may run the release `after_secs` after `start`;
/// before `start` nobody may, and after the last step its value holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposureSchedule {
    pub start: u64,
    pub steps: Vec<ExposureStep>,
}

/// One step of an [`ExposureSchedule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposureStep {
    pub after_secs: u64,
    pub max_ppm: u32,
}

/// Names what a rollback release replaces and restores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackOf {
    pub from_counter: u64,
    pub to: ReleaseId,
}

/// Longest URL accepted.
pub const MAX_URL_LEN: usize = 512;

fn check_urls(what: &str, urls: &[String]) -> Result<(), String> {
    check_count(what, urls.len(), 0, 8)?;
    for u in urls {
        check_text(what, u, MAX_URL_LEN)?;
        if !(u.starts_with("https://") || u.starts_with("http://")) {
            return Err(format!("{what}: {u:?} is not an http(s) URL"));
        }
    }
    Ok(())
}

impl ExposureSchedule {
    /// The largest fraction (ppm) allowed to run the release at `now`.
    pub fn max_ppm_at(&self, now: u64) -> u32 {
        let Some(elapsed) = now.checked_sub(self.start) else {
            return 0;
        };
        self.steps
            .iter()
            .take_while(|s| s.after_secs <= elapsed)
            .last()
            .map_or(0, |s| s.max_ppm)
    }

    fn validate(&self) -> Result<(), String> {
        check_count("exposure steps", self.steps.len(), 1, 32)?;
        let mut prev: Option<ExposureStep> = None;
        for s in &self.steps {
            if s.max_ppm > PPM_FULL {
                return Err(format!(
                    "exposure step allows {} ppm, above 100%",
                    s.max_ppm
                ));
            }
            if let Some(p) = prev
                && (s.after_secs <= p.after_secs || s.max_ppm < p.max_ppm)
            {
                return Err("exposure steps must go forward in time and never shrink".into());
            }
            prev = Some(*s);
        }
        Ok(())
    }
}

impl ThresholdMessage for Release {
    const KIND: MessageKind = MessageKind::Release;
    const MAX_BODY: usize = 32 * 1024;

    fn validate(&self) -> Result<(), String> {
        check_text("release version", &self.version, 64)?;
        check_count("artifacts", self.artifacts.len(), 1, 16)?;
        for a in &self.artifacts {
            check_text("artifact name", &a.name, 64)?;
            if a.name.is_empty() {
                return Err("artifact name is empty".into());
            }
            check_urls("artifact urls", &a.urls)?;
        }
        if let Some(c) = &self.config {
            check_urls("config urls", &c.urls)?;
        }
        check_count("hardware ids", self.hardware.len(), 1, 32)?;
        for h in &self.hardware {
            validate_id("hardware id", h).map_err(|e| e.to_string())?;
        }
        if let Some(e) = &self.exposure {
            e.validate()?;
        }
        if let Some(r) = &self.rollback
            && r.from_counter >= self.counter
        {
            return Err("a rollback release needs a counter above the one it replaces".into());
        }
        Ok(())
    }
}
