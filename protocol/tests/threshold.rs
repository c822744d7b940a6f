//! Threshold objects: distinct keys (SIG-2), key rotation, release validation.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use common::*;
use swell_protocol::messages::*;
use swell_protocol::testkeys::test_key;
use swell_protocol::threshold::{KeySignature, MAX_SIGNATURES, ThresholdError, ThresholdSigned};

fn trusted() -> Vec<swell_protocol::PublicKey> {
    key_list_body().release_keys
}

#[test]
fn threshold_two_distinct_keys_pass() {
    assert_eq!(
        release().verify::<Release>(&trusted(), 2).unwrap(),
        release_body()
    );
}

#[test]
fn threshold_duplicate_signatures_count_once() {
    let mut r = ThresholdSigned::new(&release_body()).unwrap();
    r.sign(&release_key(0)).unwrap();
    let dup = r.sigs[0].clone();
    r.sigs.push(dup.clone());
    r.sigs.push(dup);
    assert_eq!(
        r.verify::<Release>(&trusted(), 2),
        Err(ThresholdError::NotEnoughSignatures {
            valid: 1,
            needed: 2
        })
    );
}

#[test]
fn threshold_key_listed_twice_counts_once() {
    let mut r = ThresholdSigned::new(&release_body()).unwrap();
    r.sign(&release_key(0)).unwrap();
    let k = release_key(0).public();
    assert_eq!(
        r.verify::<Release>(&[k, k, k], 2),
        Err(ThresholdError::NotEnoughSignatures {
            valid: 1,
            needed: 2
        })
    );
}

#[test]
fn threshold_untrusted_and_bad_signatures_do_not_count() {
    let mut r = ThresholdSigned::new(&release_body()).unwrap();
    r.sign(&release_key(0)).unwrap();
    r.sign(&test_key("intruder")).unwrap();
    // A garbage signature under a trusted key id.
    r.sigs.push(KeySignature {
        key_id: release_key(1).key_id(),
        sig: swell_protocol::Signature([9; 64]),
    });
    let e = r.verify::<Release>(&trusted(), 2).unwrap_err();
    assert_eq!(
        e,
        ThresholdError::NotEnoughSignatures {
            valid: 1,
            needed: 2
        }
    );
    assert_eq!(e.reason(), "unsigned");
}

#[test]
fn threshold_coordinator_key_alone_cannot_sign_a_release() {
    let mut r = ThresholdSigned::new(&release_body()).unwrap();
    r.sign(&coordinator_key()).unwrap();
    assert!(r.verify::<Release>(&trusted(), 1).is_err());
}

#[test]
fn threshold_tampered_body_fails() {
    let mut r = release();
    let last = r.body.len() - 1;
    r.body[last] ^= 1;
    assert!(r.verify::<Release>(&trusted(), 2).is_err());
}

#[test]
fn threshold_zero_and_too_many() {
    assert_eq!(
        release().verify::<Release>(&trusted(), 0),
        Err(ThresholdError::ZeroThreshold)
    );
    let mut r = release();
    let s = r.sigs[0].clone();
    r.sigs.extend(std::iter::repeat_n(s, MAX_SIGNATURES));
    assert!(matches!(
        r.verify::<Release>(&trusted(), 2),
        Err(ThresholdError::TooManySignatures { .. })
    ));
    let bytes = r.encode().unwrap();
    assert!(matches!(
        ThresholdSigned::decode(&bytes),
        Err(ThresholdError::TooManySignatures { .. })
    ));
}

#[test]
fn threshold_release_cannot_pass_as_key_list() {
    let r = release();
    let roots = [root(0).public(), root(1).public()];
    assert!(matches!(
        r.verify::<KeyList>(&roots, 1),
        Err(ThresholdError::WrongKind { .. })
    ));
    // Even relabelled, the release keys' signatures use the release domain.
    let mut relabelled = r.clone();
    relabelled.kind = 17;
    assert!(relabelled.verify::<KeyList>(&trusted(), 1).is_err());
}

#[test]
fn threshold_release_validation() {
    let mut bad = release_body();
    bad.hardware = vec![];
    assert!(ThresholdSigned::new(&bad).is_err());
    let mut bad = release_body();
    bad.artifacts[0].urls = vec!["file:///etc/passwd".into()];
    assert!(ThresholdSigned::new(&bad).is_err());
    let mut bad = release_body();
    bad.version = "2.3\u{1b}[31m".into();
    assert!(ThresholdSigned::new(&bad).is_err());
    let mut bad = release_body();
    bad.rollback = Some(RollbackOf {
        from_counter: 30,
        to: swell_protocol::ReleaseId([0; 32]),
    });
    assert!(ThresholdSigned::new(&bad).is_err());
}

#[test]
fn threshold_exposure_schedule() {
    let e = release_body().exposure.unwrap();
    assert_eq!(e.max_ppm_at(T0 - 1), 0);
    assert_eq!(e.max_ppm_at(T0), 10_000);
    assert_eq!(e.max_ppm_at(T0 + 3_599), 10_000);
    assert_eq!(e.max_ppm_at(T0 + 3_600), 250_000);
    assert_eq!(e.max_ppm_at(T0 + 10 * 86_400), 1_000_000);
}

fn anchor() -> RootOfTrust {
    RootOfTrust {
        roots: vec![root(0).public(), root(1).public()],
        threshold: 2,
    }
}

#[test]
fn keylist_first_from_pinned_roots() {
    assert_eq!(
        KeyList::accept(&key_list(), &anchor(), None, T0).unwrap(),
        key_list_body()
    );
    let mut one = ThresholdSigned::new(&key_list_body()).unwrap();
    one.sign(&root(0)).unwrap();
    assert!(matches!(
        KeyList::accept(&one, &anchor(), None, T0),
        Err(KeyListError::TrustedRoots(_))
    ));
}

#[test]
fn keylist_rotation_needs_old_and_new_roots() {
    let mut next = key_list_body();
    next.version = 2;
    next.roots = vec![root(1).public(), root(2).public()];
    let sign = |keys: &[&swell_protocol::SecretKey]| {
        let mut s = ThresholdSigned::new(&next).unwrap();
        for k in keys {
            s.sign(k).unwrap();
        }
        s
    };
    let current = RootOfTrust::of(&key_list_body());
    // Old roots only: the new roots have not agreed.
    assert!(matches!(
        KeyList::accept(&sign(&[&root(0), &root(1)]), &current, Some(1), T0),
        Err(KeyListError::NewRoots(_))
    ));
    // New roots only: the old roots have not agreed.
    assert!(matches!(
        KeyList::accept(&sign(&[&root(1), &root(2)]), &current, Some(1), T0),
        Err(KeyListError::TrustedRoots(_))
    ));
    let ok = KeyList::accept(
        &sign(&[&root(0), &root(1), &root(2)]),
        &current,
        Some(1),
        T0,
    )
    .unwrap();
    assert_eq!(ok.version, 2);
    // Replaying the old list after the rotation is refused.
    assert_eq!(
        KeyList::accept(&key_list(), &current, Some(2), T0),
        Err(KeyListError::NotNewer { got: 1, have: 2 })
    );
    // Expired.
    assert!(matches!(
        KeyList::accept(&key_list(), &anchor(), None, key_list_body().expires_at),
        Err(KeyListError::Expired { .. })
    ));
}

#[test]
fn keylist_validation() {
    let mut bad = key_list_body();
    bad.root_threshold = 3;
    assert!(ThresholdSigned::new(&bad).is_err());
    let mut bad = key_list_body();
    bad.release_keys.push(bad.release_keys[0]);
    assert!(ThresholdSigned::new(&bad).is_err());
    let mut bad = key_list_body();
    bad.expires_at = 0;
    assert!(ThresholdSigned::new(&bad).is_err());
}
