//! subscribeRepos frames: decode, and re-sequence what decodes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_common::atproto::frame;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = frame::decode(data) {
        let _ = d.message;
        if let Some(span) = d.seq_span {
            let mut out = Vec::new();
            frame::resequence(data, span, 1 << 40, &mut out);
            // A re-sequenced frame decodes to the new seq.
            let back = frame::decode(&out).expect("re-sequenced frame decodes");
            if let frame::Message::Event(ev) = back.message {
                assert_eq!(ev.seq(), Some(1 << 40));
            }
        }
    }
});
