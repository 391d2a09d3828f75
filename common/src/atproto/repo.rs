//! The write side of a repository: an in-memory repo that applies record
//! operations and produces signed Sync 1.1 `#commit` and `#sync` events with
//! their proofs.
//!
//! The relay never writes repositories; this exists for the synthetic
//! network (`fakenet`), the benchmarks and the tests, which need commits
//! that are exactly what a correct PDS would emit. A commit's CAR slice
//! holds the signed commit, the new records, every MST node the commit
//! created, and every node needed to invert it (found by running the
//! inversion over a recording block source), so a relay can check
//! `prevData` from the slice alone.
//!
//! Blocks accumulate as the repo changes; [`Repo::compact`] drops the ones
//! no longer reachable (callers bound memory by calling it periodically).

use crate::atproto::car::write_car;
use crate::atproto::cid::{Cid, Codec};
use crate::atproto::commit::sign_commit;
use crate::atproto::crypto::PrivateKey;
use crate::atproto::frame::{Action, Commit, RepoOp, SyncEvent};
use crate::atproto::mst::{Mst, MstError, Recording};
use crate::atproto::syntax::Tid;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One record operation to apply.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// `record` is the DAG-CBOR record.
    Create {
        path: String,
        record: Vec<u8>,
    },
    Update {
        path: String,
        record: Vec<u8>,
    },
    Delete {
        path: String,
    },
}

impl WriteOp {
    pub fn path(&self) -> &str {
        match self {
            WriteOp::Create { path, .. } | WriteOp::Update { path, .. } | WriteOp::Delete { path } => path,
        }
    }
}

/// An op as it appears in the event, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpRecord {
    pub action: Action,
    pub path: String,
    pub cid: Option<Cid>,
    pub prev: Option<Cid>,
}

/// A commit ready to be framed.
#[derive(Debug, Clone)]
pub struct RepoCommit {
    pub did: String,
    pub rev: Tid,
    pub since: Option<Tid>,
    pub commit_cid: Cid,
    pub data: Cid,
    pub prev_data: Cid,
    pub car: Vec<u8>,
    pub ops: Vec<OpRecord>,
    /// The MST nodes of the tree at `data` that inverting `ops`, last op
    /// first, reads: with the commit block, exactly the blocks a relay
    /// needs to check the proof (ARCHITECTURE.md, "Which blocks a commit
    /// must carry"). Every one of them is in `car`.
    pub proof_nodes: BTreeSet<Cid>,
}

impl RepoCommit {
    /// Encode as a `#commit` frame.
    pub fn frame(&self, seq: i64, time: &str) -> Vec<u8> {
        let ops: crate::atproto::frame::Ops<'_> =
            self.ops.iter().map(|o| RepoOp { action: o.action, path: &o.path, cid: o.cid, prev: o.prev }).collect();
        let ev = Commit {
            seq,
            rebase: false,
            too_big: false,
            repo: &self.did,
            commit: self.commit_cid,
            rev: self.rev.as_str(),
            since: self.since.as_ref().map(Tid::as_str),
            blocks: &self.car,
            ops,
            prev_data: Some(self.prev_data),
            time,
        };
        let mut out = Vec::with_capacity(self.car.len() + 512);
        ev.encode(&mut out);
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{0}")]
    Mst(#[from] MstError),
    #[error("create of existing record {0}")]
    Exists(String),
    #[error("update or delete of missing record {0}")]
    Missing(String),
    #[error("rev {new} is not after {old}")]
    Rev { old: String, new: String },
}

/// The part of a [`Repo`] a commit changes (blocks are only ever added).
#[derive(Clone)]
pub struct RepoSnapshot {
    data: Cid,
    rev: Option<Tid>,
    commit: Option<(Cid, Vec<u8>)>,
    records: usize,
}

/// An in-memory repository with its signing key.
pub struct Repo {
    pub did: String,
    key: PrivateKey,
    blocks: HashMap<Cid, Vec<u8>>,
    data: Cid,
    rev: Option<Tid>,
    commit: Option<(Cid, Vec<u8>)>,
    records: usize,
}

/// What applying a commit's ops to the tree gave ([`Repo::apply`]).
struct Applied {
    data: Cid,
    ops: Vec<OpRecord>,
    records: Vec<(Cid, Vec<u8>)>,
    nodes: Vec<(Cid, Vec<u8>)>,
    delta: isize,
}

impl Repo {
    pub fn new(did: impl Into<String>, key: PrivateKey) -> Repo {
        let mut blocks = HashMap::new();
        let data = Mst::empty(&crate::atproto::mst::NoBlocks).root_with(&mut |c, b| {
            blocks.insert(c, b);
        });
        Repo { did: did.into(), key, blocks, data, rev: None, commit: None, records: 0 }
    }

    /// Remember the current head, to undo commits with [`Repo::restore`].
    pub fn snapshot(&self) -> RepoSnapshot {
        RepoSnapshot { data: self.data, rev: self.rev.clone(), commit: self.commit.clone(), records: self.records }
    }

    pub fn restore(&mut self, s: RepoSnapshot) {
        self.data = s.data;
        self.rev = s.rev;
        self.commit = s.commit;
        self.records = s.records;
    }

    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    pub fn set_key(&mut self, key: PrivateKey) {
        self.key = key;
    }

    pub fn data(&self) -> Cid {
        self.data
    }

    pub fn rev(&self) -> Option<&Tid> {
        self.rev.as_ref()
    }

    pub fn record_count(&self) -> usize {
        self.records
    }

    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// Load many records at once without emitting commits (to build large
    /// repositories for benchmarks). Records must not exist yet.
    pub fn bulk_load(&mut self, records: impl IntoIterator<Item = (String, Vec<u8>)>) -> Result<(), RepoError> {
        let mut new_records = Vec::new();
        let root = {
            let mut mst = Mst::load(&self.blocks, self.data)?;
            for (path, record) in records {
                let cid = Cid::compute(Codec::DagCbor, &record);
                if mst.put(path.as_bytes(), cid)?.is_some() {
                    return Err(RepoError::Exists(path));
                }
                new_records.push((cid, record));
            }
            let mut nodes = Vec::new();
            let root = mst.root_with(&mut |c, b| nodes.push((c, b)));
            drop(mst);
            self.blocks.extend(nodes);
            root
        };
        self.records += new_records.len();
        self.blocks.extend(new_records);
        self.data = root;
        Ok(())
    }

    /// Apply `ops` and sign a commit at `rev`.
    pub fn commit(&mut self, ops: &[WriteOp], rev: Tid) -> Result<RepoCommit, RepoError> {
        if let Some(old) = &self.rev {
            if rev <= *old {
                return Err(RepoError::Rev { old: old.to_string(), new: rev.to_string() });
            }
        }
        let prev_data = self.data;
        let Applied { data, ops: out_ops, records: new_records, nodes: new_nodes, delta } =
            self.apply(ops, prev_data)?;
        self.blocks.extend(new_nodes.iter().cloned());
        // The nodes a relay needs to invert the commit.
        let proof = self.inversion_reads(data, prev_data, &out_ops)?;
        let (commit_cid, commit_block) = sign_commit(&self.did, &data, rev.as_str(), &self.key);
        let mut car_blocks: BTreeMap<Cid, &[u8]> = BTreeMap::new();
        car_blocks.insert(commit_cid, &commit_block);
        for (c, b) in &new_records {
            car_blocks.insert(*c, b);
        }
        for (c, b) in &new_nodes {
            car_blocks.insert(*c, b);
        }
        let proof_nodes: BTreeSet<Cid> = proof.into_iter().collect();
        for c in &proof_nodes {
            if let Some(b) = self.blocks.get(c) {
                car_blocks.insert(*c, b);
            }
        }
        let car = write_car(&commit_cid, car_blocks.iter().map(|(c, b)| (c, *b)));
        self.blocks.extend(new_records);
        self.records = (self.records as isize + delta) as usize;
        let since = self.rev.replace(rev.clone());
        self.data = data;
        self.commit = Some((commit_cid, commit_block));
        Ok(RepoCommit {
            did: self.did.clone(),
            rev,
            since,
            commit_cid,
            data,
            prev_data,
            car,
            ops: out_ops,
            proof_nodes,
        })
    }

    /// Apply `ops` to the tree at `prev_data`: the new root, the op
    /// records, the new record and node blocks, the change in records.
    fn apply(&self, ops: &[WriteOp], prev_data: Cid) -> Result<Applied, RepoError> {
        let mut out_ops = Vec::with_capacity(ops.len());
        let mut new_records: Vec<(Cid, Vec<u8>)> = Vec::new();
        let mut new_nodes: Vec<(Cid, Vec<u8>)> = Vec::new();
        let mut delta: isize = 0;
        let data = {
            let mut mst = Mst::load(&self.blocks, prev_data)?;
            for op in ops {
                match op {
                    WriteOp::Create { path, record } | WriteOp::Update { path, record } => {
                        let cid = Cid::compute(Codec::DagCbor, record);
                        let prev = mst.put(path.as_bytes(), cid)?;
                        let action = match (op, prev) {
                            (WriteOp::Create { .. }, None) => Action::Create,
                            (WriteOp::Update { .. }, Some(_)) => Action::Update,
                            (WriteOp::Create { .. }, Some(_)) => return Err(RepoError::Exists(path.clone())),
                            _ => return Err(RepoError::Missing(path.clone())),
                        };
                        if action == Action::Create {
                            delta += 1;
                        }
                        new_records.push((cid, record.clone()));
                        out_ops.push(OpRecord { action, path: path.clone(), cid: Some(cid), prev });
                    }
                    WriteOp::Delete { path } => {
                        let prev = match mst.delete(path.as_bytes()) {
                            Ok(c) => c,
                            Err(MstError::NotFound(_)) => return Err(RepoError::Missing(path.clone())),
                            Err(e) => return Err(e.into()),
                        };
                        delta -= 1;
                        out_ops.push(OpRecord {
                            action: Action::Delete,
                            path: path.clone(),
                            cid: None,
                            prev: Some(prev),
                        });
                    }
                }
            }
            mst.root_with(&mut |c, b| new_nodes.push((c, b)))
        };
        Ok(Applied { data, ops: out_ops, records: new_records, nodes: new_nodes, delta })
    }

    /// The blocks read while inverting `ops` (last first) from the tree at
    /// `data` back to `prev_data`: what a commit must carry (Sync 1.1).
    fn inversion_reads(
        &self,
        data: Cid,
        prev_data: Cid,
        ops: &[OpRecord],
    ) -> Result<std::collections::HashSet<Cid>, RepoError> {
        let rec = Recording::new(&self.blocks);
        let mut inv = Mst::load(&rec, data)?;
        for op in ops.iter().rev() {
            match (op.action, op.prev) {
                (Action::Create, _) => {
                    inv.delete(op.path.as_bytes())?;
                }
                (_, Some(prev)) => {
                    inv.put(op.path.as_bytes(), prev)?;
                }
                (_, None) => unreachable!("update/delete always carry prev"),
            }
        }
        debug_assert_eq!(inv.root(), prev_data);
        drop(inv);
        Ok(rec.read.into_inner())
    }

    /// A `#sync` frame for the current commit (after at least one commit).
    pub fn sync_frame(&self, seq: i64, time: &str) -> Option<Vec<u8>> {
        let (cid, block) = self.commit.as_ref()?;
        let car = write_car(cid, [(cid, block.as_slice())]);
        let rev = self.rev.as_ref()?;
        let mut out = Vec::new();
        SyncEvent { seq, did: &self.did, blocks: &car, rev: rev.as_str(), time }.encode(&mut out);
        Some(out)
    }

    /// The current signed commit block, if any.
    pub fn commit_block(&self) -> Option<(Cid, &[u8])> {
        self.commit.as_ref().map(|(c, b)| (*c, b.as_slice()))
    }

    /// Every record path and CID, in order.
    pub fn entries(&self) -> Result<Vec<(String, Cid)>, RepoError> {
        let mut mst = Mst::load(&self.blocks, self.data)?;
        Ok(mst.entries()?.into_iter().map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v)).collect())
    }

    /// Drop blocks no longer reachable from the current tree.
    pub fn compact(&mut self) -> Result<(), RepoError> {
        let entries = Mst::load(&self.blocks, self.data)?.entries()?;
        let mut keep: HashMap<Cid, Vec<u8>> = HashMap::with_capacity(entries.len() * 2);
        let root =
            Mst::from_entries(&crate::atproto::mst::NoBlocks, entries.iter().cloned())?.root_with(&mut |c, b| {
                keep.insert(c, b);
            });
        debug_assert_eq!(root, self.data);
        for (_, v) in &entries {
            if let Some(b) = self.blocks.remove(v) {
                keep.insert(*v, b);
            }
        }
        self.blocks = keep;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atproto::car::CarSlice;
    use crate::atproto::commit::{check_commit, check_sync, Mode, Proof};
    use crate::atproto::crypto::Curve;
    use crate::atproto::frame::{decode, Event, Message};
    use rand::SeedableRng;

    fn rec(i: usize) -> Vec<u8> {
        let mut w = crate::atproto::cbor::Writer::new();
        w.map(2);
        w.text("text");
        w.text(&format!("post {i}"));
        w.text("$type");
        w.text("app.bsky.feed.post");
        w.into_inner()
    }

    #[test]
    fn commits_verify_with_proofs() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for curve in [Curve::K256, Curve::P256] {
            let key = PrivateKey::generate(curve, &mut rng);
            let pk = key.public_key();
            let mut repo = Repo::new("did:plc:testrepo", key);
            repo.bulk_load((0..500).map(|i| (format!("app.bsky.feed.post/{i:013}"), rec(i)))).unwrap();
            let mut t = 1_700_000_000_000_000u64;
            for round in 0..30 {
                t += 1000;
                let ops = vec![
                    WriteOp::Create { path: format!("app.bsky.feed.like/{round:013}"), record: rec(round) },
                    WriteOp::Update {
                        path: format!("app.bsky.feed.post/{:013}", round * 7),
                        record: rec(round + 1000),
                    },
                    WriteOp::Delete { path: format!("app.bsky.feed.post/{:013}", round * 7 + 1) },
                ];
                let c = repo.commit(&ops, Tid::from_micros(t, 0)).unwrap();
                let frame = c.frame(round as i64 + 1, "2025-01-01T00:00:00.000Z");
                let d = decode(&frame).unwrap();
                let Message::Event(Event::Commit(ev)) = d.message else { panic!() };
                let checked = check_commit(&ev, Mode::Strict, t as i64).unwrap();
                assert_eq!(checked.proof, Proof::Verified(c.prev_data));
                checked.verify_signature(&pk).unwrap();
                assert!(CarSlice::parse(&c.car).unwrap().len() >= 4);
                let sync = repo.sync_frame(99, "2025-01-01T00:00:00.000Z").unwrap();
                let Message::Event(Event::Sync(s)) = decode(&sync).unwrap().message else { panic!() };
                check_sync(&s, t as i64).unwrap().verify_signature(&pk).unwrap();
            }
            assert_eq!(repo.record_count(), 500);
            let before = repo.block_count();
            repo.compact().unwrap();
            assert!(repo.block_count() < before);
            assert_eq!(repo.entries().unwrap().len(), 500);
            // still able to commit after compaction
            repo.commit(
                &[WriteOp::Delete { path: "app.bsky.feed.like/0000000000000".into() }],
                Tid::from_micros(t + 1, 0),
            )
            .unwrap();
        }
    }
}
