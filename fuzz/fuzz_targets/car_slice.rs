//! CAR slices: parse (every block hash-checked) and walk.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_common::atproto::car::CarSlice;
use sluice_common::atproto::cid::Cid;

fuzz_target!(|data: &[u8]| {
    if let Ok(car) = CarSlice::parse(data) {
        let _ = car.root();
        for (cid, block) in car.iter() {
            assert_eq!(car.get(&cid), Some(block));
            assert_eq!(Cid::compute(cid.codec(), block), cid, "block does not match its CID");
        }
    }
});
