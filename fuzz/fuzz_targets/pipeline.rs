//! The device-side pipeline a manifest goes through: parse → verify the
//! coordinator signature → verify the embedded release's threshold → selector and
//! wave membership. Seeds are real signed manifests, so mutations reach every
//! stage's rejection path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swell_protocol::DeviceId;
use swell_protocol::cohort::{self, Label};
use swell_protocol::envelope::UnverifiedEnvelope;
use swell_protocol::messages::{Manifest, Release};
use swell_protocol::testkeys::test_key;

fuzz_target!(|data: &[u8]| {
    let Ok(env) = UnverifiedEnvelope::parse(data) else {
        return;
    };
    let coord = test_key("coordinator-0").public();
    let Ok(m) = env.verify::<Manifest>(&coord, 1_795_651_201) else {
        return;
    };
    let release_keys: Vec<_> = (0..3)
        .map(|i| test_key(&format!("release-{i}")).public())
        .collect();
    let Ok(release) = m.body.release.verify::<Release>(&release_keys, 2) else {
        return;
    };
    let labels = [Label {
        key: "hw".into(),
        value: "rpi4".into(),
    }];
    let Ok(me) = DeviceId::new("rpi-0042") else {
        return;
    };
    let bucket = cohort::bucket(&m.body.release_id(), &me);
    let _ = m.body.selector.matches(&labels) && m.body.opens_for(&me, bucket);
    let _ = release.hardware.iter().any(|h| h == "rpi4");
    if let Some(e) = &release.exposure {
        let _ = e.max_ppm_at(1_795_651_201);
    }
});
