//! Event log segments as a reader (and the repair on open) walks them:
//! record after record until the end, an error, or a zero length.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_common::ipc::eventlog::{decode_record, HEADER_BYTES};

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while at < data.len() {
        match decode_record(&data[at..]) {
            Ok(Some((_, frame))) => {
                at += (HEADER_BYTES + frame.len()).next_multiple_of(8).max(HEADER_BYTES);
            }
            Ok(None) | Err(_) => break,
        }
    }
});
