//! Bucket spread and wave membership over many devices.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use proptest::prelude::*;
use swell_protocol::cohort::{self, PPM_FULL, bucket, open_below, wave_of};
use swell_protocol::{DeviceId, ReleaseId};

/// 100,000 ids into 100 equal ranges: chi-square with 99 degrees of freedom stays
/// under 148.23 (p = 0.001). Deterministic: the ids are fixed.
#[test]
fn cohort_bucket_is_uniform() {
    let r = ReleaseId([0x23; 32]);
    let n = 100_000u64;
    let bins = 100usize;
    let mut counts = vec![0u64; bins];
    for i in 0..n {
        let d = DeviceId::new(format!("dev-{i:06}")).unwrap();
        let b = bucket(&r, &d);
        counts[((u128::from(b) * bins as u128) >> 64) as usize] += 1;
    }
    let expected = n as f64 / bins as f64;
    let chi2: f64 = counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum();
    assert!(chi2 < 148.23, "chi-square {chi2:.1} over 100 bins");
}

/// Waves of 1 %, 5 %, 25 %, 100 % over 100,000 devices hold close to those shares.
#[test]
fn cohort_wave_shares_match_plan() {
    let r = ReleaseId([0xfe; 32]);
    let steps = [10_000, 50_000, 250_000, PPM_FULL];
    let mut per_wave = [0u32; 4];
    for i in 0..100_000u32 {
        let d = DeviceId::new(format!("d{i}")).unwrap();
        let w = wave_of(bucket(&r, &d), &steps).unwrap();
        per_wave[w] += 1;
    }
    let cumulative: Vec<u32> = per_wave
        .iter()
        .scan(0, |acc, n| {
            *acc += n;
            Some(*acc)
        })
        .collect();
    for (got, want) in cumulative.iter().zip([1_000u32, 5_000, 25_000, 100_000]) {
        let tol = (f64::from(want).sqrt() * 5.0) as u32 + 1;
        assert!(
            got.abs_diff(want) <= tol,
            "cumulative {got}, planned {want}"
        );
    }
}

proptest! {
    /// Every device falls in exactly one wave when the plan reaches 100 %, and an
    /// open wave never closes as open_below grows.
    #[test]
    fn cohort_every_device_in_exactly_one_wave(b in any::<u64>(), mut steps in proptest::collection::btree_set(1u32..PPM_FULL, 0..8)) {
        steps.insert(PPM_FULL);
        let steps: Vec<u32> = steps.into_iter().collect();
        let w = wave_of(b, &steps).unwrap();
        for (i, &p) in steps.iter().enumerate() {
            prop_assert_eq!(cohort::is_open(b, open_below(p)), i >= w);
        }
    }

    #[test]
    fn cohort_open_below_is_monotonic(a in 0u32..=PPM_FULL, b in 0u32..=PPM_FULL) {
        if a <= b {
            prop_assert!(open_below(a) <= open_below(b));
        }
    }
}
