//! Selector parsing: never panics; whatever parses prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swell_protocol::cohort::Selector;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(sel) = Selector::parse(s) {
        let text = sel.to_string();
        let again = Selector::parse(&text).expect("invariant: canonical text parses");
        assert_eq!(again, sel);
    }
});
