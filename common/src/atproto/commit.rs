//! Stateless validation of `#commit` and `#sync` events (PROTOCOL.md §3-5).
//!
//! [`check_commit`] does everything that needs no stored state and no key:
//! limits, the CAR slice (every block hashed), the signed commit object
//! (version 3, DID and rev match the event, rev a TID not too far in the
//! future), the operations (paths, CIDs), and the Sync 1.1 proof: load the
//! slice as a partial MST at `commit.data`, invert the ops, and compare the
//! result with `prevData`. It returns a [`CheckedCommit`] carrying the
//! SHA-256 of the unsigned commit, so the signature can be verified (and
//! re-verified after a DID refresh) without redoing the rest.
//!
//! The unsigned commit bytes are the signed object minus its `sig` entry.
//! We hash them straight from the block (map head with one entry fewer, then
//! every other entry's raw bytes) when the block is canonical, which real
//! PDSes always produce; otherwise we re-encode with sorted keys.
//!
//! What needs stored state (rev order, the prevData chain, account status)
//! is the sequencer's job: see `policy`.

use crate::atproto::car::{CarError, CarSlice};
use crate::atproto::cbor::{self, CborError, Reader};
use crate::atproto::cid::Cid;
use crate::atproto::crypto::{PublicKey, SigError};
use crate::atproto::frame::{Action, Commit, RepoOp, SyncEvent};
use crate::atproto::mst::{Mst, MstError};
use crate::atproto::syntax::{is_did, is_nsid, is_record_key, tid_value};
use sha2::{Digest, Sha256};
use smallvec::SmallVec;

/// How far in the future a rev's timestamp may be.
pub const REV_FUTURE_MICROS_MAX: i64 = 5 * 60 * 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Drop commits whose MST proof does not hold (the default).
    Strict,
    /// Pass them on, only counting.
    Lenient,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum CommitError {
    #[error("blocks: {0}")]
    Car(#[from] CarError),
    #[error("CAR root {car} is not the commit {commit}")]
    CarRoot { car: Cid, commit: Cid },
    #[error("commit block {0} is missing from the CAR")]
    MissingCommitBlock(Cid),
    #[error("commit object: {0}")]
    CommitDecode(CborError),
    #[error("commit version {0} (expected 3)")]
    Version(u64),
    #[error("commit DID {commit:?} does not match the event's {event:?}")]
    DidMismatch { event: String, commit: String },
    #[error("commit rev {commit:?} does not match the event's {event:?}")]
    RevMismatch { event: String, commit: String },
    #[error("{0:?} is not a valid DID")]
    BadDid(String),
    #[error("rev {0:?} is not a TID")]
    BadRev(String),
    #[error("rev {0:?} is more than 5 minutes in the future")]
    FutureRev(String),
    #[error("signature field is {0} bytes (expected 64)")]
    SigLength(usize),
    #[error("tooBig commits are not accepted")]
    TooBig,
    #[error("rebase commits are not accepted")]
    Rebase,
    #[error("op {path:?}: {what}")]
    BadOp { path: String, what: &'static str },
    #[error("proof: {0}")]
    Proof(#[from] ProofError),
}

/// Why a Sync 1.1 inversion failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum ProofError {
    #[error("{0}")]
    Mst(#[from] MstError),
    #[error("op {path:?} expects {expected:?} in the tree, found {found:?}")]
    OpMismatch { path: String, expected: Option<Cid>, found: Option<Cid> },
    #[error("path {0:?} appears in more than one op")]
    DuplicatePath(String),
    #[error("op {0:?} lacks the prev CID needed to invert it")]
    MissingPrev(String),
    #[error("inverted root {computed} does not match prevData {claimed}")]
    RootMismatch { computed: Cid, claimed: Cid },
}

/// What the proof check concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// Inversion reproduced `prevData`.
    Verified(Cid),
    /// The event carried no `prevData` (legacy, or the first commit).
    Absent,
    /// Lenient mode only: the proof failed, the event passes, counted.
    Failed(ProofError),
}

/// A commit whose structure and proof were checked; signature pending.
#[derive(Debug, Clone)]
pub struct CheckedCommit {
    pub commit_cid: Cid,
    pub data: Cid,
    pub proof: Proof,
    pub unsigned_sha256: [u8; 32],
    pub sig: [u8; 64],
    /// `#commit`: what it leaves of each collection its ops touch, encoded
    /// for the ring ([`encode_presence`]); empty for `#sync`.
    pub collections: Presences,
}

/// [`encode_presence`]'s bytes: inline up to 64 (a commit's collections
/// are one to a few NSIDs of about 20 bytes), so no allocation per commit.
pub type Presences = SmallVec<[u8; 64]>;

/// Whether a repo holds records of a collection after a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Presence {
    /// A create or update in it, or a remaining record the slice shows.
    Present = 1,
    /// Its last record deleted: the slice proves no other is left.
    Absent = 2,
    /// Deletes only, and the slice does not reach the neighbours (a
    /// legacy or `tooBig` commit): the repo must be asked.
    Unknown = 3,
}

impl Presence {
    pub fn from_u8(v: u8) -> Option<Presence> {
        match v {
            1 => Some(Presence::Present),
            2 => Some(Presence::Absent),
            3 => Some(Presence::Unknown),
            _ => None,
        }
    }
}

/// For each collection `ops` touch, once: is any record of it left in
/// the tree at `data`? A collection's records are contiguous in key
/// order, so a delete's two neighbours decide it (`Mst::
/// has_other_with_prefix`); the slice carries them whenever it carries
/// what inverting the delete needs.
pub fn collection_presence<'o>(
    car: &CarSlice<'_>,
    data: Cid,
    ops: &[RepoOp<'o>],
) -> SmallVec<[(&'o str, Presence); 4]> {
    // (collection, written, path), sorted: a collection's last says
    // whether any op writes it, and otherwise names one of its deletes.
    let mut by: SmallVec<[(&str, bool, &str); 8]> =
        ops.iter().filter_map(|o| Some((o.path.split_once('/')?.0, o.action != Action::Delete, o.path))).collect();
    by.sort_unstable();
    let mut out = SmallVec::new();
    let mut mst: Option<Result<Mst<'_, CarSlice<'_>>, MstError>> = None;
    for (i, &(col, written, near)) in by.iter().enumerate() {
        if by.get(i + 1).is_some_and(|n| n.0 == col) {
            continue; // sorted: the last of a collection says whether any op writes
        }
        let presence = if written {
            Presence::Present
        } else {
            // `near` is `col/rkey`: the prefix is `col/`.
            let prefix = &near[..col.len() + 1];
            let m = mst.get_or_insert_with(|| Mst::load(car, data));
            match m
                .as_mut()
                .map_err(|_| ())
                .and_then(|m| m.has_other_with_prefix(prefix.as_bytes(), near.as_bytes()).map_err(|_| ()))
            {
                Ok(true) => Presence::Present,
                Ok(false) => Presence::Absent,
                Err(()) => Presence::Unknown,
            }
        };
        out.push((col, presence));
    }
    out
}

/// The ring's form of [`collection_presence`]: per collection its
/// presence byte, its length byte and its NSID (at most 317 bytes:
/// longer ones are left out, as no valid NSID is).
pub fn encode_presence(list: &[(&str, Presence)]) -> Presences {
    let mut out = Presences::new();
    for (c, p) in list {
        if let Ok(len) = u8::try_from(c.len()) {
            out.push(*p as u8);
            out.push(len);
            out.extend_from_slice(c.as_bytes());
        }
    }
    out
}

/// Read [`encode_presence`]'s bytes back; a malformed tail ends the list.
pub fn decode_presence(mut b: &[u8]) -> impl Iterator<Item = (&str, Presence)> {
    std::iter::from_fn(move || {
        let (&p, rest) = b.split_first()?;
        let (&len, rest) = rest.split_first()?;
        let name = rest.get(..len as usize)?;
        b = &rest[len as usize..];
        Some((std::str::from_utf8(name).ok()?, Presence::from_u8(p)?))
    })
}

impl CheckedCommit {
    pub fn verify_signature(&self, key: &PublicKey) -> Result<(), SigError> {
        key.verify_digest(&self.unsigned_sha256, &self.sig)
    }
}

/// The signed commit object as found in a block.
struct CommitObject<'a> {
    did: &'a str,
    version: u64,
    data: Cid,
    rev: &'a str,
    sig: &'a [u8],
    unsigned_sha256: [u8; 32],
}

fn parse_commit_object(bytes: &[u8]) -> Result<CommitObject<'_>, CborError> {
    let mut r = Reader::new(bytes);
    let n = r.map()?;
    let (mut did, mut version, mut data, mut rev, mut sig) = (None, None, None, None, None);
    // (key, raw entry bytes) of every entry but `sig`, in block order.
    let mut entries: SmallVec<[(&str, &[u8]); 8]> = SmallVec::new();
    let mut canonical = true;
    let mut prev_key: Option<&str> = None;
    for _ in 0..n {
        let start = r.position();
        let key = r.key()?;
        if let Some(p) = prev_key {
            if cbor::key_order(p.as_bytes(), key.as_bytes()) != std::cmp::Ordering::Less {
                canonical = false;
            }
        }
        prev_key = Some(key);
        match key {
            "did" => did = Some(r.text()?),
            "version" => version = Some(r.u64()?),
            "data" => data = Some(r.cid()?),
            "rev" => rev = Some(r.text()?),
            "sig" => sig = Some(r.bytes()?),
            "prev" => {
                r.opt_cid()?;
            }
            _ => {
                r.skip(1)?;
            }
        }
        if key != "sig" {
            entries.push((key, &bytes[start..r.position()]));
        }
    }
    r.finish()?;
    if !canonical {
        entries.sort_by(|a, b| cbor::key_order(a.0.as_bytes(), b.0.as_bytes()));
    }
    let mut h = Sha256::new();
    let mut head = [0u8; 9];
    h.update(cbor::head(&mut head, cbor::MAJOR_MAP, entries.len() as u64));
    for (_, raw) in &entries {
        h.update(raw);
    }
    Ok(CommitObject {
        did: did.ok_or(CborError::Missing("did"))?,
        version: version.ok_or(CborError::Missing("version"))?,
        data: data.ok_or(CborError::Missing("data"))?,
        rev: rev.ok_or(CborError::Missing("rev"))?,
        sig: sig.ok_or(CborError::Missing("sig"))?,
        unsigned_sha256: h.finalize().into(),
    })
}

/// The parts of a checked signed object that outlive its block.
struct Signed {
    data: Cid,
    unsigned_sha256: [u8; 32],
    sig: [u8; 64],
}

/// Shared part of `#commit` and `#sync`: the signed object.
fn check_signed_object(
    car: &CarSlice<'_>,
    commit_cid: Cid,
    event_did: &str,
    event_rev: &str,
    now_micros: i64,
) -> Result<Signed, CommitError> {
    if car.root() != commit_cid {
        return Err(CommitError::CarRoot { car: car.root(), commit: commit_cid });
    }
    let block = car.get(&commit_cid).ok_or(CommitError::MissingCommitBlock(commit_cid))?;
    let obj = parse_commit_object(block).map_err(CommitError::CommitDecode)?;
    if obj.version != 3 {
        return Err(CommitError::Version(obj.version));
    }
    if !is_did(event_did) {
        return Err(CommitError::BadDid(event_did.to_owned()));
    }
    if obj.did != event_did {
        return Err(CommitError::DidMismatch { event: event_did.to_owned(), commit: obj.did.to_owned() });
    }
    if obj.rev != event_rev {
        return Err(CommitError::RevMismatch { event: event_rev.to_owned(), commit: obj.rev.to_owned() });
    }
    let rev = tid_value(obj.rev).ok_or_else(|| CommitError::BadRev(obj.rev.to_owned()))?;
    if (rev >> 10) as i64 > now_micros + REV_FUTURE_MICROS_MAX {
        return Err(CommitError::FutureRev(obj.rev.to_owned()));
    }
    let sig: [u8; 64] = obj.sig.try_into().map_err(|_| CommitError::SigLength(obj.sig.len()))?;
    Ok(Signed { data: obj.data, unsigned_sha256: obj.unsigned_sha256, sig })
}

fn check_ops(ops: &[RepoOp<'_>]) -> Result<(), CommitError> {
    for op in ops {
        let bad = |what| CommitError::BadOp { path: op.path.to_owned(), what };
        let Some((collection, rkey)) = op.path.split_once('/') else {
            return Err(bad("path is not collection/rkey"));
        };
        if !is_nsid(collection) || !is_record_key(rkey) {
            return Err(bad("invalid collection or record key"));
        }
        match op.action {
            Action::Create | Action::Update if op.cid.is_none() => return Err(bad("create/update without cid")),
            Action::Delete if op.cid.is_some() => return Err(bad("delete with a cid")),
            _ => {}
        }
    }
    Ok(())
}

/// Invert `ops` on the partial tree rooted at `data`; return the root before.
pub fn invert_ops(car: &CarSlice<'_>, data: Cid, ops: &[RepoOp<'_>]) -> Result<Cid, ProofError> {
    let mut paths: SmallVec<[&str; 8]> = ops.iter().map(|o| o.path).collect();
    paths.sort_unstable();
    if let Some(w) = paths.windows(2).find(|w| w[0] == w[1]) {
        return Err(ProofError::DuplicatePath(w[0].to_owned()));
    }
    let mut mst = Mst::load(car, data)?;
    for op in ops.iter().rev() {
        let path = op.path.as_bytes();
        let mismatch = |expected: Option<Cid>, found: Option<Cid>| ProofError::OpMismatch {
            path: op.path.to_owned(),
            expected,
            found,
        };
        match op.action {
            Action::Create => {
                let found = match mst.delete(path) {
                    Ok(c) => Some(c),
                    Err(MstError::NotFound(_)) => None,
                    Err(e) => return Err(e.into()),
                };
                if found != op.cid {
                    return Err(mismatch(op.cid, found));
                }
            }
            Action::Update => {
                let prev = op.prev.ok_or_else(|| ProofError::MissingPrev(op.path.to_owned()))?;
                let found = mst.put(path, prev)?;
                if found != op.cid {
                    return Err(mismatch(op.cid, found));
                }
            }
            Action::Delete => {
                let prev = op.prev.ok_or_else(|| ProofError::MissingPrev(op.path.to_owned()))?;
                let found = mst.put(path, prev)?;
                if found.is_some() {
                    return Err(mismatch(None, found));
                }
            }
        }
    }
    Ok(mst.root())
}

/// Check a `#commit` (everything but the signature).
pub fn check_commit(ev: &Commit<'_>, mode: Mode, now_micros: i64) -> Result<CheckedCommit, CommitError> {
    if mode == Mode::Strict {
        if ev.too_big {
            return Err(CommitError::TooBig);
        }
        if ev.rebase {
            return Err(CommitError::Rebase);
        }
    }
    let car = CarSlice::parse(ev.blocks)?;
    let signed = check_signed_object(&car, ev.commit, ev.repo, ev.rev, now_micros)?;
    check_ops(&ev.ops)?;
    let proof = match ev.prev_data {
        None => Proof::Absent,
        Some(claimed) => {
            let outcome = invert_ops(&car, signed.data, &ev.ops).and_then(|computed| {
                if computed == claimed {
                    Ok(computed)
                } else {
                    Err(ProofError::RootMismatch { computed, claimed })
                }
            });
            match (outcome, mode) {
                (Ok(c), _) => Proof::Verified(c),
                (Err(e), Mode::Strict) => return Err(CommitError::Proof(e)),
                (Err(e), Mode::Lenient) => Proof::Failed(e),
            }
        }
    };
    let collections = encode_presence(&collection_presence(&car, signed.data, &ev.ops));
    Ok(CheckedCommit {
        commit_cid: ev.commit,
        data: signed.data,
        proof,
        unsigned_sha256: signed.unsigned_sha256,
        sig: signed.sig,
        collections,
    })
}

/// Check a `#sync` (everything but the signature): the CAR holds the signed
/// commit, which resets the account's (rev, data).
pub fn check_sync(ev: &SyncEvent<'_>, now_micros: i64) -> Result<CheckedCommit, CommitError> {
    let car = CarSlice::parse(ev.blocks)?;
    let root = car.root();
    let signed = check_signed_object(&car, root, ev.did, ev.rev, now_micros)?;
    Ok(CheckedCommit {
        commit_cid: root,
        data: signed.data,
        proof: Proof::Absent,
        unsigned_sha256: signed.unsigned_sha256,
        sig: signed.sig,
        collections: Presences::new(),
    })
}

/// Build and sign a version-3 commit object; returns its CID and block.
pub fn sign_commit(did: &str, data: &Cid, rev: &str, key: &crate::atproto::crypto::PrivateKey) -> (Cid, Vec<u8>) {
    let write = |w: &mut cbor::Writer, sig: Option<&[u8; 64]>| {
        w.map(if sig.is_some() { 6 } else { 5 });
        w.text("did");
        w.text(did);
        w.text("rev");
        w.text(rev);
        if let Some(s) = sig {
            w.text("sig");
            w.bytes(s);
        }
        w.text("data");
        w.cid(data);
        w.text("prev");
        w.null();
        w.text("version");
        w.u64(3);
    };
    let mut unsigned = cbor::Writer::with_capacity(160);
    write(&mut unsigned, None);
    let sig = key.sign(&unsigned.buf);
    let mut signed = cbor::Writer::with_capacity(240);
    write(&mut signed, Some(&sig));
    let bytes = signed.into_inner();
    (Cid::compute(crate::atproto::cid::Codec::DagCbor, &bytes), bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atproto::crypto::{Curve, PrivateKey};
    use rand::SeedableRng;

    #[test]
    fn signed_commit_verifies_and_unsigned_hash_matches() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let key = PrivateKey::generate(Curve::K256, &mut rng);
        let data = Cid::compute(crate::atproto::cid::Codec::DagCbor, b"x");
        let (cid, block) = sign_commit("did:plc:abc", &data, "3lmxjza3nva27", &key);
        assert!(cid.matches(&block));
        let obj = parse_commit_object(&block).unwrap();
        assert_eq!(obj.data, data);
        key.public_key().verify_digest(&obj.unsigned_sha256, obj.sig).unwrap();
    }

    /// A repo with a collection of one record, one of many, and one of a
    /// few: deleting the lone record leaves the collection absent, the
    /// slice proving it; deleting one of many leaves it present; a create
    /// is present; a commit whose slice misses the neighbours is unknown.
    #[test]
    fn collection_presence_from_the_slice() {
        use crate::atproto::repo::{Repo, WriteOp};
        use crate::atproto::syntax::Tid;
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let key = PrivateKey::generate(Curve::K256, &mut rng);
        let mut repo = Repo::new("did:plc:presence", key);
        let rec = |i: usize| {
            let mut w = cbor::Writer::new();
            w.map(1);
            w.text("n");
            w.u64(i as u64);
            w.into_inner()
        };
        let mut records: Vec<(String, Vec<u8>)> =
            (0..200).map(|i| (format!("app.bsky.feed.like/{:013}", 1000 + i), rec(i))).collect();
        records.push(("app.bsky.actor.profile/self".into(), rec(1)));
        records.extend((0..3).map(|i| (format!("com.example.few/{:013}", 5000 + i), rec(i))));
        repo.bulk_load(records).unwrap();
        let mut clock = 1_700_000_000_000_000u64;
        let mut commit = |repo: &mut Repo, ops: Vec<WriteOp>| {
            clock += 1000;
            let c = repo.commit(&ops, Tid::from_micros(clock, 0)).unwrap();
            let frame = c.frame(1, "2024-01-01T00:00:00Z");
            let decoded = crate::atproto::frame::decode(&frame).unwrap();
            let crate::atproto::frame::Message::Event(crate::atproto::frame::Event::Commit(ev)) = decoded.message
            else {
                panic!("a commit")
            };
            let checked = check_commit(&ev, Mode::Strict, (clock + 1_000_000) as i64).unwrap();
            let got: Vec<(String, Presence)> =
                decode_presence(&checked.collections).map(|(c, p)| (c.to_owned(), p)).collect();
            got
        };
        let del = |p: &str| WriteOp::Delete { path: p.into() };
        assert_eq!(
            commit(&mut repo, vec![del("app.bsky.actor.profile/self"), del("app.bsky.feed.like/0000000001005")]),
            vec![("app.bsky.actor.profile".into(), Presence::Absent), ("app.bsky.feed.like".into(), Presence::Present)]
        );
        assert_eq!(
            commit(&mut repo, vec![WriteOp::Create { path: "app.bsky.actor.profile/self".into(), record: rec(9) }]),
            vec![("app.bsky.actor.profile".into(), Presence::Present)]
        );
        // The few, one by one: present, present, then absent.
        let few: Vec<Presence> =
            (0..3).map(|i| commit(&mut repo, vec![del(&format!("com.example.few/{:013}", 5000 + i))])[0].1).collect();
        assert_eq!(few, [Presence::Present, Presence::Present, Presence::Absent]);
        // Encoding round trip, and a truncated list ends cleanly.
        let list = [("a.b.c", Presence::Unknown), ("d.e.f", Presence::Absent)];
        let enc = encode_presence(&list);
        assert_eq!(decode_presence(&enc).count(), 2);
        assert_eq!(decode_presence(&enc[..enc.len() - 1]).count(), 1);
    }
}
