//! The operator command parser: JSON from anyone who may publish on a command
//! topic (OPS-1..3). Never panics; an accepted command names its operation,
//! and a `create`'s spec converts to a rollout spec or says why not. Signed
//! commands verify only under the test operator key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swell_coordinator::ops::{Op, OpsParser};
use swell_protocol::FleetId;
use swell_protocol::testkeys::test_key;

const TOPIC: &str = "swell/v1/ops/plant/cmd";
const NOW: u64 = 1_795_651_201;

fuzz_target!(|data: &[u8]| {
    let operator = test_key("operator-0").public();
    let mut signed = OpsParser::new(vec![operator], TOPIC.into(), &[]);
    let _ = signed.parse(data, NOW, None);
    let _ = signed.parse(data, NOW, Some("swell-ops/ann/cli/replies"));
    let mut open = OpsParser::new(vec![], TOPIC.into(), &[]);
    if let Ok(r) = open.parse(data, NOW, None) {
        let _ = (r.op.name(), r.op.changes_rollouts(), r.op.as_command());
        if let Op::Create { spec, .. } = r.op
            && let Ok(fleet) = FleetId::new("plant")
        {
            let _ = spec.into_spec(&fleet);
        }
    }
});
