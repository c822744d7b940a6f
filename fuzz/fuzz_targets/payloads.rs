//! Every payload decoder, directly (the signature check would otherwise keep the
//! fuzzer out). The first byte picks the type. Decoded values must validate
//! without panicking and re-encode to the same bytes (postcard is canonical for
//! our types, so a mismatch means two encodings of one value).
#![no_main]

use libfuzzer_sys::fuzz_target;
use swell_protocol::codec;
use swell_protocol::envelope::Message;
use swell_protocol::messages::*;
use swell_protocol::threshold::ThresholdMessage;

fn envelope_payload<T: Message>(data: &[u8]) {
    if let Ok(v) = codec::decode_exact::<T>("fuzz", data, T::MAX_PAYLOAD) {
        let _ = v.validate();
        let again = codec::encode("fuzz", &v).expect("invariant: decoded values encode");
        assert_eq!(again, data, "non-canonical encoding accepted");
    }
}

fn threshold_body<T: ThresholdMessage>(data: &[u8]) {
    if let Ok(v) = codec::decode_exact::<T>("fuzz", data, T::MAX_BODY) {
        let _ = v.validate();
        let again = codec::encode("fuzz", &v).expect("invariant: decoded values encode");
        assert_eq!(again, data, "non-canonical encoding accepted");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((which, rest)) = data.split_first() else {
        return;
    };
    match which % 10 {
        0 => envelope_payload::<Manifest>(rest),
        1 => envelope_payload::<Beacon>(rest),
        2 => envelope_payload::<DeviceDirective>(rest),
        3 => envelope_payload::<Hello>(rest),
        4 => envelope_payload::<Report>(rest),
        5 => envelope_payload::<Unsupported>(rest),
        6 => threshold_body::<Release>(rest),
        7 => threshold_body::<KeyList>(rest),
        8 => envelope_payload::<SessionNote>(rest),
        _ => envelope_payload::<Enrolled>(rest),
    }
});
