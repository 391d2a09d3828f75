//! MST inversion over a hostile proof: the input is a CAR slice (its root
//! taken as the tree) followed by op bytes; ops pick paths from a small set
//! and CIDs from the slice's blocks. Any outcome but a panic is fine.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_common::atproto::car::CarSlice;
use sluice_common::atproto::commit::invert_ops;
use sluice_common::atproto::frame::{Action, RepoOp};

const PATHS: [&str; 8] = [
    "app.bsky.feed.post/3jzfcijpj2z2a",
    "app.bsky.feed.post/3jzfcijpj2z2b",
    "app.bsky.feed.like/3l3qo2vutsw2b",
    "app.bsky.graph.follow/3k3zzzzzzzz2a",
    "com.example.record/3jzfcijpj2z2a",
    "app.bsky.feed.repost/3kaaaaaaaaa2a",
    "a/b",
    "app.bsky.actor.profile/self",
];

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = (data[0] as usize * 256 + data[1] as usize).min(data.len() - 2);
    let (car_bytes, op_bytes) = data[2..].split_at(split);
    let Ok(car) = CarSlice::parse(car_bytes) else { return };
    let cids: Vec<_> = car.iter().map(|(c, _)| c).collect();
    let pick = |b: u8| (!cids.is_empty()).then(|| cids[b as usize % cids.len()]);
    let ops: Vec<RepoOp<'_>> = op_bytes
        .chunks_exact(3)
        .take(16)
        .map(|c| {
            let action = [Action::Create, Action::Update, Action::Delete][c[0] as usize % 3];
            RepoOp {
                action,
                path: PATHS[c[1] as usize % PATHS.len()],
                cid: if action == Action::Delete { None } else { pick(c[2]) },
                prev: if action == Action::Create { None } else { pick(c[2].wrapping_add(1)) },
            }
        })
        .collect();
    let _ = invert_ops(&car, car.root(), &ops);
});
