//! The one HTTP request-head parser: never panics, and a head that parses
//! parses the same from exactly its own bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_common::process::http::parse_request_head;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = parse_request_head(data, 16 * 1024) {
        assert!(h.head_len <= data.len());
        let again = parse_request_head(&data[..h.head_len], 16 * 1024).expect("own bytes parse").expect("complete");
        assert_eq!(again, h);
    }
});
