//! Artifact downloads (DL-1 … DL-5): streamed to `blobs/sha256/<hex>.part`,
//! hashed while streaming, never a byte past the signed length, resumed with
//! `Range` after an interruption (the digest still covers every byte: the part
//! already on disk is hashed first), abandoned and resumed when slower than the
//! minimum throughput, bounded by an overall deadline, and preceded by a
//! free-space check. Only digests become file names.

use crate::config::DownloadConfig;
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use swell_protocol::Digest;
use swell_protocol::messages::{Reason, reason};
use tokio::io::AsyncWriteExt as _;
use tracing::{debug, warn};

/// Why a download failed; each maps to a report reason.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DownloadError {
    #[error("digest mismatch: got {got}")]
    DigestMismatch { got: String },
    #[error("server sent more than the signed {length} bytes")]
    TooLong { length: u64 },
    #[error("slower than {min} B/s until the deadline")]
    Slow { min: u64 },
    #[error("{needed} bytes needed, {available} free")]
    NoSpace { needed: u64, available: u64 },
    #[error("no usable URL: {0}")]
    Failed(String),
    #[error("blob store: {0}")]
    Io(#[from] std::io::Error),
}

impl DownloadError {
    /// The reason reported for this failure.
    pub fn reason(&self) -> Reason {
        let code = match self {
            DownloadError::DigestMismatch { .. } => reason::DIGEST_MISMATCH,
            DownloadError::TooLong { .. } => reason::LENGTH_MISMATCH,
            DownloadError::Slow { .. } => reason::SLOW_RETRIEVAL,
            DownloadError::NoSpace { .. } => reason::INSUFFICIENT_SPACE,
            DownloadError::Failed(_) | DownloadError::Io(_) => reason::DOWNLOAD_FAILED,
        };
        let mut detail = self.to_string();
        detail.retain(|c| (' '..='~').contains(&c));
        detail.truncate(64);
        Reason { code, detail }
    }
}

/// The digest-addressed blob directory.
#[derive(Debug, Clone)]
pub struct Blobs {
    dir: PathBuf,
}

/// Free bytes kept beyond the artifact itself, so a download never fills the disk.
const SPACE_MARGIN: u64 = 4 * 1024 * 1024;
/// Failed attempts in a row without a byte of progress before giving up early.
const MAX_FRUITLESS: u32 = 8;

impl Blobs {
    pub fn new(state_dir: &Path) -> std::io::Result<Blobs> {
        let dir = state_dir.join("blobs").join("sha256");
        swell_durable::private_dir(&dir)?;
        Ok(Blobs { dir })
    }

    /// Where a verified blob lives.
    pub fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join(hex::encode(d.0))
    }

    fn part(&self, d: &Digest) -> PathBuf {
        self.dir.join(format!("{}.part", hex::encode(d.0)))
    }

    /// Re-reads a stored blob and checks it against its digest and length: what
    /// an installer is handed has just been verified on the same path (INST-1).
    pub fn verify(&self, d: &Digest, length: u64) -> std::io::Result<bool> {
        verify_file(&self.path(d), d, length)
    }

    /// Deletes every blob except `keep` (after a commit or rollback).
    pub fn prune(&self, keep: &[Digest]) -> std::io::Result<()> {
        let keep: Vec<String> = keep.iter().map(|d| hex::encode(d.0)).collect();
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.trim_end_matches(".part");
            if !keep.iter().any(|k| k == stem) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    /// Fetches one blob (or finds it already verified), returning its path.
    pub async fn fetch(
        &self,
        http: &reqwest::Client,
        digest: &Digest,
        length: u64,
        urls: &[String],
        limits: &DownloadConfig,
    ) -> Result<PathBuf, DownloadError> {
        let done = self.path(digest);
        if self.verify(digest, length)? {
            return Ok(done);
        }
        let part = self.part(digest);
        let have = std::fs::metadata(&part).map_or(0, |m| m.len());
        let needed = length.saturating_sub(have);
        let available = fs4::available_space(&self.dir)?;
        if available < needed.saturating_add(SPACE_MARGIN) {
            return Err(DownloadError::NoSpace { needed, available });
        }
        let deadline = Instant::now() + limits.deadline;
        let mut fruitless = 0u32;
        let mut last = String::from("no URL given");
        let mut slow = false;
        let mut dead_urls = vec![false; urls.len()];
        while Instant::now() < deadline && fruitless < MAX_FRUITLESS {
            if dead_urls.iter().all(|d| *d) {
                break;
            }
            for (i, url) in urls.iter().enumerate() {
                if dead_urls[i] || Instant::now() >= deadline {
                    continue;
                }
                let before = std::fs::metadata(&part).map_or(0, |m| m.len());
                match self
                    .attempt(http, url, digest, length, &part, limits, deadline)
                    .await
                {
                    Ok(()) => {
                        std::fs::rename(&part, &done)?;
                        std::fs::File::open(&self.dir)?.sync_all()?;
                        return Ok(done);
                    }
                    Err(Attempt::Fatal(e)) => {
                        let _ = std::fs::remove_file(&part);
                        return Err(e);
                    }
                    Err(Attempt::DeadUrl(why)) => {
                        warn!(%url, %why, "artifact URL refused");
                        dead_urls[i] = true;
                        last = why;
                    }
                    Err(Attempt::Retry { why, slow: s }) => {
                        debug!(%url, %why, "download interrupted; will resume");
                        slow = s;
                        last = why;
                    }
                }
                let after = std::fs::metadata(&part).map_or(0, |m| m.len());
                fruitless = if after > before { 0 } else { fruitless + 1 };
            }
            let pause = swell_mqtt::backoff(fruitless.min(5))
                .min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(pause).await;
        }
        if slow || Instant::now() >= deadline {
            return Err(DownloadError::Slow {
                min: limits.min_bytes_per_sec,
            });
        }
        // Nothing will resume this: the URLs refused it.
        let _ = std::fs::remove_file(&part);
        Err(DownloadError::Failed(last))
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        http: &reqwest::Client,
        url: &str,
        digest: &Digest,
        length: u64,
        part: &Path,
        limits: &DownloadConfig,
        deadline: Instant,
    ) -> Result<(), Attempt> {
        let retry = |why: String| Attempt::Retry { why, slow: false };
        // Hash what is already there: the digest covers every byte (DL-3).
        let mut hasher = Sha256::new();
        let mut have = match std::fs::File::open(part) {
            Ok(mut f) => {
                std::io::copy(&mut f, &mut hasher).map_err(|e| Attempt::Fatal(e.into()))?
            }
            Err(_) => 0,
        };
        if have > length {
            let _ = std::fs::remove_file(part);
            hasher = Sha256::new();
            have = 0;
        }
        if have < length {
            let mut req = http.get(url);
            if have > 0 {
                req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut resp = tokio::time::timeout(left.min(limits.watchdog), req.send())
                .await
                .map_err(|_| Attempt::Retry {
                    why: "no answer".into(),
                    slow: true,
                })?
                .map_err(|e| retry(e.to_string()))?;
            let status = resp.status();
            match status.as_u16() {
                206 if have > 0 => {
                    let start = resp
                        .headers()
                        .get(reqwest::header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("bytes "))
                        .and_then(|v| v.split('-').next())
                        .and_then(|v| v.parse::<u64>().ok());
                    if start != Some(have) {
                        let _ = std::fs::remove_file(part);
                        return Err(retry(format!(
                            "range answered from {start:?}, asked {have}"
                        )));
                    }
                }
                200 => {
                    // No range support: start over.
                    let _ = std::fs::remove_file(part);
                    hasher = Sha256::new();
                    have = 0;
                }
                416 if have > 0 => {
                    let _ = std::fs::remove_file(part);
                    return Err(retry("range not satisfiable; starting over".into()));
                }
                s @ (408 | 429 | 500..=599) => return Err(retry(format!("HTTP {s}"))),
                s => return Err(Attempt::DeadUrl(format!("HTTP {s}"))),
            }
            let mut file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(part)
                .await
                .map_err(|e| Attempt::Fatal(e.into()))?;
            let window_need = limits
                .min_bytes_per_sec
                .saturating_mul(limits.watchdog.as_secs().max(1));
            let mut window_start = Instant::now();
            let mut window_bytes = 0u64;
            loop {
                let now = Instant::now();
                if now >= deadline {
                    return Err(Attempt::Retry {
                        why: "deadline".into(),
                        slow: true,
                    });
                }
                let window_left = limits.watchdog.saturating_sub(now - window_start);
                let chunk = match tokio::time::timeout(
                    window_left.max(Duration::from_millis(1)),
                    resp.chunk(),
                )
                .await
                {
                    Ok(Ok(Some(c))) => Some(c),
                    Ok(Ok(None)) => None,
                    Ok(Err(e)) => return Err(retry(e.to_string())),
                    Err(_) => {
                        return Err(Attempt::Retry {
                            why: format!("under {} B/s", limits.min_bytes_per_sec),
                            slow: true,
                        });
                    }
                };
                let Some(chunk) = chunk else { break };
                let n = chunk.len() as u64;
                // DL-1: the signed length is the limit, whatever the server says.
                if have + n > length {
                    return Err(Attempt::Fatal(DownloadError::TooLong { length }));
                }
                hasher.update(&chunk);
                file.write_all(&chunk)
                    .await
                    .map_err(|e| Attempt::Fatal(e.into()))?;
                have += n;
                window_bytes += n;
                if window_start.elapsed() >= limits.watchdog {
                    if window_bytes < window_need {
                        file.flush().await.map_err(|e| Attempt::Fatal(e.into()))?;
                        return Err(Attempt::Retry {
                            why: format!("{window_bytes} bytes in {:?}", limits.watchdog),
                            slow: true,
                        });
                    }
                    window_start = Instant::now();
                    window_bytes = 0;
                }
            }
            file.sync_all()
                .await
                .map_err(|e| Attempt::Fatal(e.into()))?;
            if have < length {
                return Err(retry(format!("stream ended at {have} of {length}")));
            }
        }
        let got: [u8; 32] = hasher.finalize().into();
        if got != digest.0 {
            return Err(Attempt::Fatal(DownloadError::DigestMismatch {
                got: hex::encode(&got[..8]),
            }));
        }
        Ok(())
    }
}

/// Whether the file at `p` is exactly `length` bytes hashing to `d` (lengths
/// are 64-bit everywhere, also on 32-bit devices).
pub fn verify_file(p: &Path, d: &Digest, length: u64) -> std::io::Result<bool> {
    let mut f = match std::fs::File::open(p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if f.metadata()?.len() != length {
        return Ok(false);
    }
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h)?;
    Ok(n == length && h.finalize().as_slice() == d.0)
}

enum Attempt {
    /// Give up on the whole download (the bytes are wrong, not late).
    Fatal(DownloadError),
    /// This URL will not work (404, 403, …).
    DeadUrl(String),
    /// Interrupted or slow: resume.
    Retry { why: String, slow: bool },
}

/// The HTTP client for artifacts: rustls with ring, the OS trust store plus an
/// optional extra CA, no redirects to other schemes, connect timeout.
pub fn http_client(limits: &DownloadConfig) -> Result<reqwest::Client, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .connect_timeout(limits.watchdog)
        .user_agent(concat!("swell-agent/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::limited(5));
    if let Some(pem) = &limits.ca_pem {
        let ca = reqwest::Certificate::from_pem(pem).map_err(|e| format!("download CA: {e}"))?;
        b = b.add_root_certificate(ca);
    }
    b.build().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> DownloadConfig {
        DownloadConfig {
            min_bytes_per_sec: 1,
            watchdog: Duration::from_secs(1),
            deadline: Duration::from_secs(2),
            ca_pem: None,
        }
    }

    #[tokio::test]
    async fn download_checks_free_space_before_any_request() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::new(dir.path()).unwrap();
        let http = reqwest::Client::new();
        // No server listens there: the space check must refuse first.
        let e = blobs
            .fetch(
                &http,
                &Digest([7; 32]),
                1 << 60,
                &["http://127.0.0.1:9/x".into()],
                &limits(),
            )
            .await
            .unwrap_err();
        assert_eq!(e.reason().code, reason::INSUFFICIENT_SPACE, "{e}");
        assert!(
            std::fs::read_dir(dir.path().join("blobs/sha256"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[tokio::test]
    async fn download_without_urls_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::new(dir.path()).unwrap();
        let e = blobs
            .fetch(
                &reqwest::Client::new(),
                &Digest([7; 32]),
                10,
                &[],
                &limits(),
            )
            .await
            .unwrap_err();
        assert_eq!(e.reason().code, reason::DOWNLOAD_FAILED, "{e}");
    }
}
