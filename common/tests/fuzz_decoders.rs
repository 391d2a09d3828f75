//! Property test: random bytes and mutated valid inputs through every
//! decoder must give a value or an error, never a panic. Seeded, bounded:
//! a failure prints the seed and the input to replay.
mod support;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice_common::atproto::car::CarSlice;
use sluice_common::atproto::cbor::Value;
use sluice_common::atproto::commit::{check_commit, check_sync, Mode};
use sluice_common::atproto::frame::{decode, resequence, Event, Message};
use sluice_common::atproto::identity::Identity;
use sluice_common::atproto::mst::decode_node;

/// Valid frames from the scenarios and indigo's commits.
fn corpus() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(support::fixtures().join("indigo/relay-scenarios")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        for m in s["messages"].as_array().unwrap() {
            out.push(support::frame_from_json(&m["frame"]["header"], &m["frame"]["body"]));
        }
    }
    for e in std::fs::read_dir(support::fixtures().join("indigo/repo")).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().starts_with("firehose_commit_") {
            let body: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            out.push(support::frame_from_json(&serde_json::json!({"op": 1, "t": "#commit"}), &body));
        }
    }
    assert!(out.len() > 30);
    out
}

fn mutate(rng: &mut ChaCha8Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        if v.is_empty() {
            v.push(rng.gen());
            continue;
        }
        let i = rng.gen_range(0..v.len());
        match rng.gen_range(0..6) {
            0 => v[i] ^= 1 << rng.gen_range(0..8),
            1 => v[i] = rng.gen(),
            2 => v.truncate(i),
            3 => v.insert(i, rng.gen()),
            4 => {
                // Interesting CBOR heads: huge lengths, indefinite, tags.
                v[i] = *[0x1b, 0x5b, 0x7b, 0x9b, 0xbb, 0x9f, 0xd8, 0xff, 0xf9, 0xfb].get(rng.gen_range(0..10)).unwrap()
            }
            _ => {
                let j = rng.gen_range(0..v.len());
                let (a, b) = (i.min(j), i.max(j));
                let chunk = v[a..b].to_vec();
                v.splice(a..a, chunk);
            }
        }
    }
    v
}

fn exercise(input: &[u8]) {
    let now = 1_800_000_000_000_000;
    if let Ok(d) = decode(input) {
        if let Some(span) = d.seq_span {
            let mut out = Vec::new();
            resequence(input, span, 12345, &mut out);
            assert!(decode(&out).is_ok(), "resequenced frame no longer decodes");
        }
        if let Message::Event(ev) = &d.message {
            match ev {
                Event::Commit(c) => {
                    let _ = check_commit(c, Mode::Strict, now);
                    let _ = check_commit(c, Mode::Lenient, now);
                    if let Ok(car) = CarSlice::parse(c.blocks) {
                        for (cid, b) in car.iter() {
                            let _ = decode_node(&cid, b);
                            let _ = Value::decode(b);
                        }
                    }
                }
                Event::Sync(s) => {
                    let _ = check_sync(s, now);
                }
                _ => {}
            }
        }
    }
    let _ = CarSlice::parse(input);
    let _ = Value::decode(input);
    let _ = decode_node(
        &sluice_common::atproto::cid::Cid::compute(sluice_common::atproto::cid::Codec::DagCbor, input),
        input,
    );
    let _ = Identity::from_did_document(input, None);
}

#[test]
fn mutated_frames_never_panic() {
    let corpus = corpus();
    let seed: u64 = std::env::var("SLUICE_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x51u64);
    let iterations: usize = std::env::var("SLUICE_FUZZ_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for i in 0..iterations {
        let base = &corpus[rng.gen_range(0..corpus.len())];
        let input = mutate(&mut rng, base);
        let r = std::panic::catch_unwind(|| exercise(&input));
        assert!(r.is_ok(), "seed {seed} iteration {i}: panic on input {:02x?}", &input[..input.len().min(256)]);
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    for _ in 0..20_000 {
        let len = rng.gen_range(0..512);
        let mut v = vec![0u8; len];
        rng.fill_bytes(&mut v);
        // Half the time, start like a frame so the body decoders run.
        if rng.gen_bool(0.5) && len > 20 {
            v[..15].copy_from_slice(b"\xa2atg#commitbop\x01");
        }
        exercise(&v);
    }
}

/// The CAR parser's bounds: every truncation of every real commit's
/// blocks is an error or a shorter valid CAR, never a panic.
#[test]
fn car_truncations() {
    for f in corpus() {
        if let Ok(d) = decode(&f) {
            if let Message::Event(Event::Commit(c)) = d.message {
                for cut in (0..c.blocks.len()).step_by(7) {
                    let _ = CarSlice::parse(&c.blocks[..cut]);
                }
            }
        }
    }
}
