//! Who is in which wave.
//!
//! A device's position in a rollout is `bucket(release, device)`, a uniformly
//! spread u64 both sides compute. It depends only on the release (whose id is
//! the hash of what the release keys signed) and the device, never on
//! anything the coordinator chooses: a stolen coordinator key cannot search
//! for a rollout id that puts a chosen device under an exposure cap (ROLL-3).
//! Waves are cumulative fractions of the bucket space, expressed in parts per
//! million (ppm) so no floating point reaches the wire; a manifest carries
//! `open_below`, and a device whose bucket is below it is in an open wave.
//! `open_below == u64::MAX` is the one special value: everyone. The release's
//! exposure cap is a fraction of the same space, so a wave and a cap of the
//! same size name the same devices.

mod selector;

pub use selector::{
    Label, MAX_LABELS, Op, Requirement, Selector, SelectorError, validate_label_key,
    validate_label_value,
};

use crate::ids::{DeviceId, ReleaseId};
use sha2::{Digest as _, Sha256};

/// One million: 100 % in ppm.
pub const PPM_FULL: u32 = 1_000_000;

/// SHA-256("swell/bucket/release/v3" ‖ release id[32] ‖ device), first 8
/// bytes, big-endian. The release id has a fixed length, so the
/// concatenation is unambiguous.
pub fn bucket(release: &ReleaseId, device: &DeviceId) -> u64 {
    let mut h = Sha256::new();
    h.update(b"swell/bucket/release/v3");
    h.update(release.as_bytes());
    h.update(device.as_str().as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first)
}

/// The `open_below` that opens `ppm` parts per million of the bucket space:
/// `floor(ppm · 2^64 / 10^6)`, and `u64::MAX` (everyone) from 100 % up.
pub fn open_below(ppm: u32) -> u64 {
    if ppm >= PPM_FULL {
        return u64::MAX;
    }
    ((u128::from(ppm) << 64) / u128::from(PPM_FULL)) as u64
}

/// Whether a device with `bucket` is inside `open_below`.
pub fn is_open(bucket: u64, open_below: u64) -> bool {
    open_below == u64::MAX || bucket < open_below
}

/// Parses a percentage (`"5%"`, `"0.5"`, `"100%"`, at most 4 decimals) into ppm.
pub fn parse_percent(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let t = t.strip_suffix('%').unwrap_or(t).trim();
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    if int.is_empty() && frac.is_empty() {
        return Err(format!("{s:?} is not a percentage"));
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?} is not a percentage"));
    }
    if frac.len() > 4 {
        return Err(format!("{s:?} has more than 4 decimals"));
    }
    if int.len() > 3 {
        return Err(format!("{s:?} is above 100%"));
    }
    let int: u32 = if int.is_empty() {
        0
    } else {
        int.parse()
            .map_err(|_| format!("{s:?} is not a percentage"))?
    };
    let mut frac_ppm = 0u32;
    for (i, b) in frac.bytes().enumerate() {
        frac_ppm += u32::from(b - b'0') * 10u32.pow(3 - i as u32);
    }
    let ppm = int * 10_000 + frac_ppm;
    if ppm > PPM_FULL {
        return Err(format!("{s:?} is above 100%"));
    }
    Ok(ppm)
}

/// Formats ppm as a percentage (`12.5%`).
pub fn format_percent(ppm: u32) -> String {
    let int = ppm / 10_000;
    let frac = ppm % 10_000;
    if frac == 0 {
        format!("{int}%")
    } else {
        let f = format!("{frac:04}");
        format!("{int}.{}%", f.trim_end_matches('0'))
    }
}

/// Checks a cumulative wave list: non-empty, each step above 0, strictly
/// increasing, at most 100 %.
pub fn validate_waves(steps_ppm: &[u32]) -> Result<(), String> {
    if steps_ppm.is_empty() {
        return Err("at least one wave is needed".into());
    }
    if steps_ppm.len() > MAX_WAVES {
        return Err(format!("{} waves; at most {MAX_WAVES}", steps_ppm.len()));
    }
    let mut prev = 0u32;
    for (i, &p) in steps_ppm.iter().enumerate() {
        if p == 0 || p > PPM_FULL {
            return Err(format!(
                "wave {} is {}; it must be above 0% and at most 100%",
                i + 1,
                format_percent(p)
            ));
        }
        if p <= prev {
            return Err(format!(
                "wave {} ({}) is not above wave {} ({}); waves are cumulative",
                i + 1,
                format_percent(p),
                i,
                format_percent(prev)
            ));
        }
        prev = p;
    }
    Ok(())
}

/// Most waves in one rollout.
pub const MAX_WAVES: usize = 32;

/// Index of the first wave whose cumulative fraction covers `bucket`, or `None`
/// when no wave reaches it (the plan stops short of 100 %).
pub fn wave_of(bucket: u64, steps_ppm: &[u32]) -> Option<usize> {
    steps_ppm
        .iter()
        .position(|&p| is_open(bucket, open_below(p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    #[test]
    fn cohort_bucket_vectors() {
        // Pinned: a change here is a protocol change (see docs/protocol.md).
        for (r, d, want) in BUCKET_VECTORS {
            let r = ReleaseId::from_hex(r).unwrap();
            assert_eq!(bucket(&r, &id(d)), *want, "{r}/{d}");
            assert_eq!(bucket_ref(r.as_bytes(), d), *want);
        }
    }

    // Computed independently with Python's hashlib.
    const BUCKET_VECTORS: &[(&str, &str, u64)] = &[
        (ZERO, "dev-0001", 0x06bf_99c3_a8c7_1864),
        (ZERO, "dev-0002", 0x73d5_060f_3feb_6d98),
        (
            "abababababababababababababababababababababababababababababababab",
            "d",
            0x5e84_7bfc_5cc2_e72e,
        ),
        (
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            0xb5fa_287e_2483_74cb,
        ),
    ];
    const ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    // Reference computation written out longhand, independent of `bucket`.
    fn bucket_ref(r: &[u8], d: &str) -> u64 {
        let mut input = b"swell/bucket/release/v3".to_vec();
        input.extend_from_slice(r);
        input.extend_from_slice(d.as_bytes());
        let digest = Sha256::digest(&input);
        digest[..8]
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    }

    #[test]
    fn cohort_open_below_edges() {
        assert_eq!(open_below(0), 0);
        assert_eq!(open_below(PPM_FULL), u64::MAX);
        assert_eq!(open_below(500_000), 1u64 << 63);
        assert!(!is_open(0, 0));
        assert!(is_open(u64::MAX, u64::MAX));
        assert!(is_open(0, open_below(1)));
    }

    #[test]
    fn cohort_percent_parse_and_format() {
        assert_eq!(parse_percent("5%"), Ok(50_000));
        assert_eq!(parse_percent("0.5%"), Ok(5_000));
        assert_eq!(parse_percent("100"), Ok(PPM_FULL));
        assert_eq!(parse_percent("12.3456%"), Ok(123_456));
        assert_eq!(parse_percent(".5"), Ok(5_000));
        for bad in ["", "%", "abc", "101%", "1.23456", "-1", "1e3", "1000"] {
            assert!(parse_percent(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_percent(50_000), "5%");
        assert_eq!(format_percent(5_000), "0.5%");
        assert_eq!(format_percent(123_450), "12.345%");
    }

    #[test]
    fn cohort_waves_validate() {
        assert!(validate_waves(&[10_000, 50_000, 250_000, PPM_FULL]).is_ok());
        assert!(validate_waves(&[]).is_err());
        assert!(validate_waves(&[50_000, 50_000]).is_err());
        assert!(validate_waves(&[0, 10]).is_err());
        assert!(validate_waves(&[PPM_FULL + 1]).is_err());
    }
}
