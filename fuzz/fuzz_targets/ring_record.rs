//! Ring records as the db-writer reads them back: decode, and what decodes
//! re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_common::ipc::ringrec::RingRecord;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = RingRecord::decode(data) {
        let mut out = Vec::new();
        r.encode(&mut out);
        assert_eq!(RingRecord::decode(&out).expect("re-encoded record decodes"), r);
    }
});
