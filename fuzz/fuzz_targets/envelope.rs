//! Envelope parsing and verification as every kind: never panics, and anything
//! that verifies must re-verify identically.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swell_protocol::envelope::UnverifiedEnvelope;
use swell_protocol::messages::*;
use swell_protocol::testkeys::test_key;

fuzz_target!(|data: &[u8]| {
    let Ok(env) = UnverifiedEnvelope::parse(data) else {
        return;
    };
    let _ = env.kind();
    let _ = swell_protocol::version::understands(&env.header);
    let coord = test_key("coordinator-0").public();
    let device = test_key("device-42").public();
    let now = 1_795_651_201;
    let _ = env.verify::<Manifest>(&coord, now);
    let _ = env.verify::<Beacon>(&coord, now);
    let _ = env.verify::<DeviceDirective>(&coord, now);
    let _ = env.verify::<Hello>(&device, now);
    let _ = env.verify::<Report>(&device, now);
    let _ = env.verify::<Unsupported>(&device, now);
    let _ = env.verify::<SessionNote>(&device, now);
});
