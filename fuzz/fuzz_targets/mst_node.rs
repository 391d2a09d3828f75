//! MST node decoding: what decodes re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_common::cid::{Cid, Codec};
use sluice_common::mst::{decode_node, encode_node};

fuzz_target!(|data: &[u8]| {
    let cid = Cid::compute(Codec::DagCbor, data);
    if let Ok(node) = decode_node(&cid, data) {
        assert_eq!(encode_node(&node), data, "accepted a node that does not re-encode");
    }
});
