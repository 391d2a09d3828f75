//! MST node decoding: never panics, and what decodes re-encodes to a
//! canonical node that decodes to the same entries. (Not byte-identical:
//! like every typed decoder, the node parser takes integer and length
//! heads as the writer wrote them, and the node's CID is over the bytes as
//! received; `cbor`'s module docs. Found by this target: `p` as 0x18 0x0e.)
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_common::atproto::cid::{Cid, Codec};
use sluice_common::atproto::mst::{decode_node, encode_node};

fuzz_target!(|data: &[u8]| {
    let cid = Cid::compute(Codec::DagCbor, data);
    if let Ok(node) = decode_node(&cid, data) {
        let canonical = encode_node(&node);
        let again = decode_node(&Cid::compute(Codec::DagCbor, &canonical), &canonical).expect("canonical form decodes");
        assert_eq!(again, node, "re-encoding changed the node");
        assert_eq!(encode_node(&again), canonical, "canonical form is a fixed point");
    }
});
