//! No allocation per event on the validation path (issue 24): once a
//! thread is warm, a `#commit` (up to `frame::OPS_INLINE` ops), a `#sync`,
//! an `#identity` and an `#account` go through everything a shard does to
//! them (decode, CAR, commit object, Sync 1.1 inversion, collection
//! presence, signature, ring record) and everything the db-writer does
//! per event that needs no Postgres (ring record decode, the stateful
//! rules, the frame resequenced for the log) without a heap allocation.
//!
//! Counted by this binary's global allocator, per thread (the test
//! harness's other threads do not count). AWS-LC's own C allocations
//! (P-256) are outside Rust's allocator and not counted. A commit of more
//! than `frame::OPS_INLINE` ops allocates its ops list; an MST node of
//! more than 32 entries (about one in 10,000) grows its list once.

use rand::SeedableRng;
use sluice_common::atproto::commit::{check_commit, check_sync, Mode, Proof};
use sluice_common::atproto::crypto::{Curve, PrivateKey};
use sluice_common::atproto::frame::{self, AccountEvent, Event, IdentityEvent, Message};
use sluice_common::atproto::policy::{self, AccountState};
use sluice_common::atproto::repo::{Repo, WriteOp};
use sluice_common::atproto::syntax::Tid;
use sluice_common::ipc::ringrec::{self, Origin, RingRecord};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is passed to the system allocator unchanged; the
// count is a thread-local `Cell` (const-initialized, so touching it
// never allocates), read with `try_with` in case the thread is ending.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's layout, as `GlobalAlloc::alloc` requires.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `System` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: `p` came from `System` with layout `l`.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

const NOW: i64 = 1_800_000_000_000_000;
const TIME: &str = "2025-04-16T21:30:26.717Z";

fn rkey(i: u64) -> String {
    Tid::from_micros(1_700_000_000_000_000 + i * 1_000_003, 1).into_string()
}

/// A repo of 2,000 posts and 3 records of a small collection, and its
/// frames: 1-op and 4-op commits (the latter deleting the small
/// collection's last record, so its presence is decided from the tree),
/// a `#sync`, an `#identity`, an `#account`.
fn frames(curve: Curve) -> (sluice_common::atproto::crypto::PublicKey, Vec<Vec<u8>>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(curve as u64);
    let key = PrivateKey::generate(curve, &mut rng);
    let pk = key.public_key();
    let did = "did:plc:allocallocallocallocallo";
    let mut repo = Repo::new(did, key);
    let rec = vec![0xa1, 0x61, 0x61, 0x01];
    let mut records: Vec<(String, Vec<u8>)> =
        (0..2000).map(|i| (format!("app.bsky.feed.post/{}", rkey(i)), rec.clone())).collect();
    records.push((format!("com.example.few/{}", rkey(1)), rec.clone()));
    repo.bulk_load(records).unwrap();
    let one = repo
        .commit(
            &[WriteOp::Create { path: format!("app.bsky.feed.post/{}", rkey(5000)), record: rec.clone() }],
            Tid::from_micros(1_750_000_000_000_000, 1),
        )
        .unwrap()
        .frame(1, TIME);
    let four = repo
        .commit(
            &[
                WriteOp::Create { path: format!("app.bsky.feed.like/{}", rkey(5001)), record: rec.clone() },
                WriteOp::Update { path: format!("app.bsky.feed.post/{}", rkey(7)), record: vec![0xa0] },
                WriteOp::Delete { path: format!("app.bsky.feed.post/{}", rkey(9)) },
                WriteOp::Delete { path: format!("com.example.few/{}", rkey(1)) },
            ],
            Tid::from_micros(1_750_000_000_000_100, 1),
        )
        .unwrap()
        .frame(2, TIME);
    let sync = repo.sync_frame(3, TIME).unwrap();
    let mut identity = Vec::new();
    IdentityEvent { seq: 4, did, time: TIME, handle: Some("a.example.com") }.encode(&mut identity);
    let mut account = Vec::new();
    AccountEvent { seq: 5, did, time: TIME, active: false, status: Some("deactivated") }.encode(&mut account);
    (pk, vec![one, four, sync, identity, account])
}

/// One event through the shard's checks and the db-writer's pure steps;
/// `record`, `log` and `state` are the reused buffers and the account.
fn relay_one(
    frame_bytes: &[u8],
    key: &sluice_common::atproto::crypto::PublicKey,
    record: &mut Vec<u8>,
    log: &mut Vec<u8>,
    state: &mut Option<AccountState>,
) {
    // The shard.
    let decoded = frame::decode(frame_bytes).unwrap();
    let Message::Event(ev) = decoded.message else { panic!("an event") };
    let checked = match &ev {
        Event::Commit(c) => Some(check_commit(c, Mode::Strict, NOW).unwrap()),
        Event::Sync(s) => Some(check_sync(s, NOW).unwrap()),
        _ => None,
    };
    if let Some(c) = &checked {
        key.verify_digest(&c.unsigned_sha256, &c.sig).unwrap();
    }
    if let Event::Commit(_) = &ev {
        assert!(matches!(checked.as_ref().unwrap().proof, Proof::Verified(_)), "a commit's proof verifies");
    }
    // The shard's own record builder (`shard::validate::encode` calls it).
    let at = Origin {
        host_id: 1,
        frame: frame_bytes,
        seq_span: decoded.seq_span.unwrap(),
        time_micros: NOW,
        identity_micros: NOW,
    };
    assert!(ringrec::encode_event(&ev, checked.as_ref(), at, record));
    // The db-writer.
    let RingRecord::Event(e) = RingRecord::decode(record).unwrap() else { panic!("an event") };
    let (verdict, next) = policy::decide(state.as_ref(), &e, true);
    assert!(matches!(verdict, policy::Verdict::Relay { .. }), "{verdict:?}");
    *state = Some(next);
    log.clear();
    frame::resequence(e.frame, (e.seq_start as usize, e.seq_end as usize), 1_000_000 + e.upstream_seq, log);
}

#[test]
fn an_event_allocates_nothing_once_the_thread_is_warm() {
    for curve in [Curve::K256, Curve::P256] {
        let (pk, frames) = frames(curve);
        // Parsed, as the shard's resolver keeps P-256 keys (and a K-256
        // key always is).
        let key = pk;
        let (mut record, mut log) = (Vec::with_capacity(64 * 1024), Vec::with_capacity(64 * 1024));
        // Warm: the thread's spare lists fill on the first pass.
        let mut state = None;
        for f in &frames {
            relay_one(f, &key, &mut record, &mut log, &mut state);
        }
        for (i, f) in frames.iter().enumerate() {
            // The account as it stood before this event.
            let mut state = None;
            for g in &frames[..i] {
                relay_one(g, &key, &mut record, &mut log, &mut state);
            }
            let before = allocations();
            relay_one(f, &key, &mut record, &mut log, &mut state);
            let n = allocations() - before;
            assert_eq!(n, 0, "{}: frame {i} ({} bytes) allocated {n} times", curve.name(), f.len());
        }
    }
}

#[test]
fn the_counter_counts() {
    let before = allocations();
    let v: Vec<u8> = std::hint::black_box(Vec::with_capacity(10));
    assert_eq!(allocations() - before, 1);
    drop(v);
}
