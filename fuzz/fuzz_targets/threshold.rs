//! Threshold objects: decode, then verify as a release and as a key list.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swell_protocol::messages::{KeyList, Release, RootOfTrust};
use swell_protocol::testkeys::test_key;
use swell_protocol::threshold::ThresholdSigned;

fuzz_target!(|data: &[u8]| {
    let Ok(obj) = ThresholdSigned::decode(data) else {
        return;
    };
    let _ = obj.id();
    let release_keys: Vec<_> = (0..3)
        .map(|i| test_key(&format!("release-{i}")).public())
        .collect();
    let _ = obj.verify::<Release>(&release_keys, 2);
    let roots = RootOfTrust {
        roots: (0..2)
            .map(|i| test_key(&format!("root-{i}")).public())
            .collect(),
        threshold: 2,
    };
    let _ = KeyList::accept(&obj, &roots, None, 1_795_651_201);
});
