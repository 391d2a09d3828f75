//! A fixed count of stateless validations (decode, CAR, commit object,
//! Sync 1.1 inversion, collection presence, signature) of 1-op and 4-op
//! commits on a 10,000-record repository, for instruction counts under
//! `valgrind --tool=callgrind` or allocation counts under a heap
//! profiler, where the machine's timing is too noisy to compare builds:
//!
//! `cargo build --release -p sluice-common --example validate_loop`, then
//! `valgrind --tool=callgrind target/release/examples/validate_loop N`
//! for N = 0 and N = 1000: the difference over 1000 is one round (four
//! validations: K-256 and P-256, 1 op and 4 ops).

use rand::SeedableRng;
use sluice_common::atproto::commit::{check_commit, Mode, Proof};
use sluice_common::atproto::crypto::{Curve, PrivateKey, PublicKey};
use sluice_common::atproto::frame::{decode, Event, Message};
use sluice_common::atproto::repo::{Repo, WriteOp};
use sluice_common::atproto::syntax::Tid;

fn rkey(i: u64) -> String {
    Tid::from_micros(1_700_000_000_000_000 + i * 1_000_003, 1).into_string()
}

fn frames(curve: Curve) -> (PublicKey, [Vec<u8>; 2]) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(curve as u64);
    let key = PrivateKey::generate(curve, &mut rng);
    let pk = key.public_key();
    let mut repo = Repo::new("did:plc:looploooploooploooploooplo", key);
    let rec = vec![0xa1, 0x61, 0x61, 0x01];
    repo.bulk_load((0..10_000).map(|i| (format!("app.bsky.feed.post/{}", rkey(i)), rec.clone()))).unwrap();
    let one = repo
        .commit(
            &[WriteOp::Create { path: format!("app.bsky.feed.post/{}", rkey(20_000)), record: rec.clone() }],
            Tid::from_micros(1_750_000_000_000_000, 1),
        )
        .unwrap()
        .frame(1, "2025-04-16T21:30:26.717Z");
    let four = repo
        .commit(
            &[
                WriteOp::Create { path: format!("app.bsky.feed.like/{}", rkey(20_001)), record: rec.clone() },
                WriteOp::Update { path: format!("app.bsky.feed.post/{}", rkey(7)), record: vec![0xa0] },
                WriteOp::Delete { path: format!("app.bsky.feed.post/{}", rkey(9)) },
                WriteOp::Delete { path: format!("app.bsky.feed.post/{}", rkey(11)) },
            ],
            Tid::from_micros(1_750_000_000_000_100, 1),
        )
        .unwrap()
        .frame(2, "2025-04-16T21:30:26.717Z");
    (pk, [one, four])
}

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let sets = [frames(Curve::K256), frames(Curve::P256)];
    for _ in 0..rounds {
        for (pk, fs) in &sets {
            for f in fs {
                let d = decode(f).unwrap();
                let Message::Event(Event::Commit(c)) = d.message else { unreachable!() };
                let checked = check_commit(&c, Mode::Strict, 1_800_000_000_000_000).unwrap();
                assert!(matches!(checked.proof, Proof::Verified(_)));
                pk.verify_digest(&checked.unsigned_sha256, &checked.sig).unwrap();
                std::hint::black_box(&checked);
            }
        }
    }
    println!("{rounds} rounds of 4 validations");
}
