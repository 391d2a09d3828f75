//! The shard's stateless checks on whole frames: `check_commit` (both
//! modes) and `check_sync`, then a signature check against a fixed key.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_common::atproto::commit::{check_commit, check_sync, Mode};
use sluice_common::atproto::crypto::PublicKey;
use sluice_common::atproto::frame::{self, Event, Message};

// 2025-01-01T00:00:00Z: the clock fakenet's seeds were made with.
const NOW: i64 = 1_735_689_600_000_000 + 3_600_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(d) = frame::decode(data) else { return };
    let Message::Event(ev) = d.message else { return };
    let key = PublicKey::from_multikey("zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc").ok();
    let checked = match &ev {
        Event::Commit(c) => {
            let _ = check_commit(c, Mode::Lenient, NOW);
            check_commit(c, Mode::Strict, NOW)
        }
        Event::Sync(s) => check_sync(s, NOW),
        _ => return,
    };
    if let (Ok(c), Some(k)) = (checked, key) {
        let _ = c.verify_signature(&k);
    }
});
