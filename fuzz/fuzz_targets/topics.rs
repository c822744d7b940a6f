//! Topic parsing: never panics, and a parsed topic never holds a wildcard.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swell_protocol::topics::Topics;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if Topics::default().parse(s).is_ok() {
        assert!(
            !s.contains('+') && !s.contains('#'),
            "wildcard topic parsed: {s:?}"
        );
    }
});
