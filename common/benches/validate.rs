//! Stateless validation of one `#commit` on a 100k-record repository, per
//! curve and op count, plus the signature verifiers we chose between.
//!
//! `cargo bench -p sluice-common --bench validate`. Figures go to
//! BENCHMARKS.md.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use rand::SeedableRng;
use sluice_common::atproto::commit::{check_commit, Mode, Proof};
use sluice_common::atproto::crypto::{Curve, PrivateKey, PublicKey};
use sluice_common::atproto::frame::{decode, Event, Message};
use sluice_common::atproto::repo::{Repo, WriteOp};
use sluice_common::atproto::syntax::Tid;
use std::time::Duration;

const RECORDS: usize = 100_000;
const NOW: i64 = 1_800_000_000_000_000;

fn record(i: usize) -> Vec<u8> {
    let mut w = sluice_common::atproto::cbor::Writer::new();
    w.map(3);
    w.text("text");
    w.text(&format!("a typical short post, number {i}, with a little text in it"));
    w.text("$type");
    w.text("app.bsky.feed.post");
    w.text("createdAt");
    w.text("2025-04-16T21:30:26.717Z");
    w.into_inner()
}

fn rkey(i: usize) -> String {
    Tid::from_micros(1_700_000_000_000_000 + (i as u64) * 1_000_003, (i % 1024) as u16).into_string()
}

/// A repo of RECORDS posts and two commit frames on it: 1 op and 10 ops.
fn fixture(curve: Curve) -> (PublicKey, Vec<u8>, Vec<u8>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(curve as u64);
    let key = PrivateKey::generate(curve, &mut rng);
    let pk = key.public_key();
    let mut repo = Repo::new("did:plc:benchbenchbenchbenchbenc", key);
    repo.bulk_load((0..RECORDS).map(|i| (format!("app.bsky.feed.post/{}", rkey(i)), record(i)))).unwrap();
    let one = repo
        .commit(
            &[WriteOp::Create { path: format!("app.bsky.feed.post/{}", rkey(RECORDS + 1)), record: record(1) }],
            Tid::from_micros(1_750_000_000_000_000, 1),
        )
        .unwrap()
        .frame(1, "2025-04-16T21:30:26.717Z");
    let mut ops = Vec::new();
    for j in 0..10 {
        ops.push(match j % 3 {
            0 => WriteOp::Create { path: format!("app.bsky.feed.like/{}", rkey(RECORDS + 10 + j)), record: record(j) },
            1 => WriteOp::Update { path: format!("app.bsky.feed.post/{}", rkey(j * 997)), record: record(j + 5) },
            _ => WriteOp::Delete { path: format!("app.bsky.feed.post/{}", rkey(j * 991 + 3)) },
        });
    }
    let ten =
        repo.commit(&ops, Tid::from_micros(1_750_000_000_000_100, 1)).unwrap().frame(2, "2025-04-16T21:30:26.717Z");
    (pk, one, ten)
}

fn validate(frame: &[u8], key: &PublicKey) {
    let d = decode(frame).unwrap();
    let Message::Event(Event::Commit(c)) = d.message else { unreachable!() };
    let checked = check_commit(&c, Mode::Strict, NOW).unwrap();
    assert!(matches!(checked.proof, Proof::Verified(_)));
    checked.verify_signature(key).unwrap();
}

fn bench_validate(c: &mut Criterion) {
    let mut g = c.benchmark_group("validate_commit");
    g.measurement_time(Duration::from_secs(4));
    for curve in [Curve::K256, Curve::P256] {
        let (pk, one, ten) = fixture(curve);
        eprintln!("{}: 1-op frame {} bytes, 10-op frame {} bytes", curve.name(), one.len(), ten.len());
        for f in [&one, &ten] {
            let d = decode(f).unwrap();
            let Message::Event(Event::Commit(c)) = d.message else { unreachable!() };
            let car = sluice_common::atproto::car::CarSlice::parse(c.blocks).unwrap();
            let sizes: Vec<usize> = car.iter().map(|(_, b)| b.len()).collect();
            eprintln!("  {} blocks, sizes {:?}", sizes.len(), sizes);
        }
        g.bench_with_input(BenchmarkId::new(curve.name(), "1op"), &one, |b, f| b.iter(|| validate(black_box(f), &pk)));
        g.bench_with_input(BenchmarkId::new(curve.name(), "10op"), &ten, |b, f| b.iter(|| validate(black_box(f), &pk)));
        // The parts, to see where time goes.
        {
            let d = decode(&one).unwrap();
            let Message::Event(Event::Commit(c)) = d.message else { unreachable!() };
            let car = sluice_common::atproto::car::CarSlice::parse(c.blocks).unwrap();
            let checked = check_commit(&c, Mode::Strict, NOW).unwrap();
            g.bench_function(BenchmarkId::new(curve.name(), "1op_invert"), |b| {
                b.iter(|| sluice_common::atproto::commit::invert_ops(&car, checked.data, black_box(&c.ops)).unwrap())
            });
        }
        g.bench_with_input(BenchmarkId::new(curve.name(), "1op_decode"), &one, |b, f| {
            b.iter(|| decode(black_box(f)).unwrap())
        });
        g.bench_with_input(BenchmarkId::new(curve.name(), "1op_decode_car"), &one, |b, f| {
            b.iter(|| {
                let d = decode(black_box(f)).unwrap();
                let Message::Event(Event::Commit(c)) = d.message else { unreachable!() };
                sluice_common::atproto::car::CarSlice::parse(c.blocks).unwrap().len()
            })
        });
        g.bench_with_input(BenchmarkId::new(curve.name(), "1op_no_sig"), &one, |b, f| {
            b.iter(|| {
                let d = decode(black_box(f)).unwrap();
                let Message::Event(Event::Commit(c)) = d.message else { unreachable!() };
                check_commit(&c, Mode::Strict, NOW).unwrap()
            })
        });
    }
    g.finish();
}

/// Verifier implementations per curve on the same digest and signature.
fn bench_verifiers(c: &mut Criterion) {
    use k256::ecdsa::signature::hazmat::PrehashVerifier;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let digest = sluice_common::atproto::crypto::sha256(b"an unsigned commit");
    let mut g = c.benchmark_group("verify_signature");
    g.measurement_time(Duration::from_secs(3));

    let k = PrivateKey::generate(Curve::K256, &mut rng);
    let sig = k.sign_digest(&digest);
    let point = *k.public_key().compressed();
    let ours = k.public_key();
    g.bench_function("K-256/libsecp256k1", |b| b.iter(|| ours.verify_digest(black_box(&digest), &sig).unwrap()));
    // The identity cache's form (`CompactKey`): the same parsed key.
    let compact = ours.compact();
    g.bench_function("K-256/compact", |b| b.iter(|| compact.verify_digest(black_box(&digest), &sig).unwrap()));
    let rc = k256::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap();
    let rc_sig = k256::ecdsa::Signature::from_slice(&sig).unwrap();
    g.bench_function("K-256/rustcrypto-k256", |b| b.iter(|| rc.verify_prehash(black_box(&digest), &rc_sig).unwrap()));
    let lc =
        aws_lc_rs::signature::ParsedPublicKey::new(&aws_lc_rs::signature::ECDSA_P256K1_SHA256_FIXED, point).unwrap();
    let d = aws_lc_rs::digest::Digest::import_less_safe(&digest, &aws_lc_rs::digest::SHA256).unwrap();
    g.bench_function("K-256/aws-lc-rs", |b| b.iter(|| lc.verify_digest_sig(black_box(&d), &sig).unwrap()));

    let k = PrivateKey::generate(Curve::P256, &mut rng);
    let sig = k.sign_digest(&digest);
    let point = *k.public_key().compressed();
    let ours = k.public_key();
    g.bench_function("P-256/aws-lc-rs", |b| b.iter(|| ours.verify_digest(black_box(&digest), &sig).unwrap()));
    // The identity cache's form: the point parsed again for each check.
    let compact = ours.compact();
    g.bench_function("P-256/compact", |b| b.iter(|| compact.verify_digest(black_box(&digest), &sig).unwrap()));
    let rc = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap();
    let rc_sig = p256::ecdsa::Signature::from_slice(&sig).unwrap();
    g.bench_function("P-256/rustcrypto-p256", |b| b.iter(|| rc.verify_prehash(black_box(&digest), &rc_sig).unwrap()));
    g.finish();
}

/// The same verifications when other work ran between them, as in a
/// shard, where a frame's decoding, CAR and MST work, the rings and the
/// sockets come between two signatures: before each one (untimed), 8 MiB
/// are written, which leaves neither the curve's precomputed tables nor
/// the verifier's code in the core's caches.
fn bench_verifiers_cold(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let digest = sluice_common::atproto::crypto::sha256(b"an unsigned commit");
    let mut g = c.benchmark_group("verify_signature_cold");
    g.measurement_time(Duration::from_secs(5));
    let mut other = vec![0u8; 8 << 20];
    for curve in [Curve::K256, Curve::P256] {
        let k = PrivateKey::generate(curve, &mut rng);
        let sig = k.sign_digest(&digest);
        let key = k.public_key();
        g.bench_function(curve.name(), |b| {
            b.iter_batched(
                || {
                    for (i, x) in other.iter_mut().enumerate().step_by(64) {
                        *x = x.wrapping_add(i as u8);
                    }
                    black_box(&other);
                },
                |()| key.verify_digest(black_box(&digest), &sig).unwrap(),
                criterion::BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn bench_sha(c: &mut Criterion) {
    let data = vec![7u8; 256];
    c.bench_function("sha256_256B", |b| b.iter(|| sluice_common::atproto::crypto::sha256(black_box(&data))));
    let data = vec![7u8; 4096];
    c.bench_function("sha256_4KiB", |b| b.iter(|| sluice_common::atproto::crypto::sha256(black_box(&data))));
}

criterion_group!(benches, bench_validate, bench_verifiers, bench_verifiers_cold, bench_sha);
criterion_main!(benches);
