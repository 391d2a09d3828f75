//! The strict DAG-CBOR reader: what it accepts re-encodes to the same bytes
//! (canonical form is the only form it takes).
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_common::atproto::cbor::{Value, Writer};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = Value::decode(data) {
        let mut w = Writer::new();
        v.write(&mut w);
        assert_eq!(w.into_inner(), data, "accepted non-canonical CBOR");
    }
});
