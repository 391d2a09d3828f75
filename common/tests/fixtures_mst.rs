//! MST fixtures: key heights, common prefixes, the commit-proof cases of
//! atproto-interop-tests, and all 16,384 mst-test-suite diff cases.
mod support;
use sluice_common::atproto::car::CarSlice;
use sluice_common::atproto::cid::Cid;
use sluice_common::atproto::mst::{common_prefix_len, key_layer, BlockSource, Mst, MstError, NoBlocks};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Read;

#[test]
fn key_heights() {
    let cases = support::json("atproto-interop-tests/mst/key_heights.json");
    for c in cases.as_array().unwrap() {
        let key = c["key"].as_str().unwrap();
        assert_eq!(key_layer(key.as_bytes()) as u64, c["height"].as_u64().unwrap(), "{key:?}");
    }
}

#[test]
fn common_prefix() {
    let cases = support::json("atproto-interop-tests/mst/common_prefix.json");
    for c in cases.as_array().unwrap() {
        let (l, r) = (c["left"].as_str().unwrap(), c["right"].as_str().unwrap());
        assert_eq!(common_prefix_len(l.as_bytes(), r.as_bytes()) as u64, c["len"].as_u64().unwrap(), "{l:?} {r:?}");
    }
}

/// Only the CIDs in `allowed` can be read.
struct Only<'a> {
    inner: &'a HashMap<Cid, Vec<u8>>,
    allowed: HashSet<Cid>,
}
impl BlockSource for Only<'_> {
    fn get_block(&self, cid: &Cid) -> Option<&[u8]> {
        if self.allowed.contains(cid) {
            self.inner.get(cid).map(Vec::as_slice)
        } else {
            None
        }
    }
}

fn cids(v: &serde_json::Value) -> Vec<Cid> {
    v.as_array().unwrap().iter().map(|c| Cid::parse(c.as_str().unwrap()).unwrap()).collect()
}

#[test]
fn commit_proofs() {
    let cases = support::json("atproto-interop-tests/firehose/commit-proof-fixtures.json");
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for c in cases {
        let name = c["comment"].as_str().unwrap();
        let leaf = Cid::parse(c["leafValue"].as_str().unwrap()).unwrap();
        let strs =
            |k: &str| c[k].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect::<Vec<_>>();
        let (keys, adds, dels) = (strs("keys"), strs("adds"), strs("dels"));
        // Build the "before" tree and check its root.
        let mut store: HashMap<Cid, Vec<u8>> = HashMap::new();
        let mut m = Mst::from_entries(&NoBlocks, keys.iter().map(|k| (k.as_bytes().to_vec(), leaf))).unwrap();
        let before = m.root_with(&mut |c, b| {
            store.insert(c, b);
        });
        assert_eq!(before.to_string(), c["rootBeforeCommit"].as_str().unwrap(), "{name}: before");
        // Apply the commit on the loaded tree; collect the new nodes.
        let mut m = Mst::load(&store, before).unwrap();
        for a in &adds {
            m.put(a.as_bytes(), leaf).unwrap();
        }
        for d in &dels {
            m.delete(d.as_bytes()).unwrap();
        }
        let mut new_blocks = Vec::new();
        let after = m.root_with(&mut |c, b| new_blocks.push((c, b)));
        assert_eq!(after.to_string(), c["rootAfterCommit"].as_str().unwrap(), "{name}: after");
        drop(m); // it gives its arena back to the thread when dropped
        store.extend(new_blocks);
        // The proof blocks alone suffice to invert the commit.
        let proof = Only { inner: &store, allowed: cids(&c["blocksInProof"]).into_iter().collect() };
        let mut inv = Mst::load(&proof, after).unwrap();
        for d in dels.iter().rev() {
            assert_eq!(inv.put(d.as_bytes(), leaf).unwrap(), None, "{name}");
        }
        for a in adds.iter().rev() {
            assert_eq!(inv.delete(a.as_bytes()).unwrap(), leaf, "{name}");
        }
        assert_eq!(inv.root(), before, "{name}: inversion");
    }
}

/// All blocks of a CAR, owned.
fn car_blocks(bytes: &[u8]) -> (Cid, HashMap<Cid, Vec<u8>>) {
    let car = CarSlice::parse(bytes).unwrap();
    (car.root(), car.iter().map(|(c, b)| (c, b.to_vec())).collect())
}

struct Tree {
    root: Cid,
    blocks: HashMap<Cid, Vec<u8>>,
    entries: BTreeMap<Vec<u8>, Cid>,
}

fn load_suite_cars() -> HashMap<String, Tree> {
    let dir = support::fixtures().join("mst-test-suite/cars/exhaustive");
    let mut out = HashMap::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let (root, blocks) = car_blocks(&std::fs::read(&p).unwrap());
        let entries: BTreeMap<Vec<u8>, Cid> =
            Mst::load(&blocks, root).unwrap().entries().unwrap().into_iter().collect();
        // Our builder reproduces the tree from its entries alone.
        let rebuilt = Mst::from_entries(&NoBlocks, entries.clone()).unwrap().root();
        assert_eq!(rebuilt, root, "{}", p.display());
        let name = format!("./cars/exhaustive/{}", p.file_name().unwrap().to_str().unwrap());
        out.insert(name, Tree { root, blocks, entries });
    }
    assert_eq!(out.len(), 128);
    out
}

#[test]
fn mst_diff_exhaustive() {
    let cars = load_suite_cars();
    let tgz = std::fs::File::open(support::fixtures().join("mst-test-suite/tests-diff-exhaustive.tar.gz")).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(tgz));
    let mut n = 0;
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        if !path.ends_with(".json") {
            continue;
        }
        let mut text = String::new();
        entry.read_to_string(&mut text).unwrap();
        check_diff_case(&path, &serde_json::from_str(&text).unwrap(), &cars);
        n += 1;
    }
    assert_eq!(n, 16_384);
}

fn check_diff_case(name: &str, case: &serde_json::Value, cars: &HashMap<String, Tree>) {
    let a = &cars[case["inputs"]["mst_a"].as_str().unwrap()];
    let b = &cars[case["inputs"]["mst_b"].as_str().unwrap()];
    let res = &case["results"];
    // Record ops: the difference of the two trees' entries.
    let mut ops = BTreeSet::new();
    for (k, v) in &a.entries {
        if b.entries.get(k) != Some(v) {
            ops.insert((k.clone(), Some(*v), b.entries.get(k).copied()));
        }
    }
    for (k, v) in &b.entries {
        if !a.entries.contains_key(k) {
            ops.insert((k.clone(), None, Some(*v)));
        }
    }
    let opt = |v: &serde_json::Value| v.as_str().map(|s| Cid::parse(s).unwrap());
    let want_ops: Vec<(Vec<u8>, Option<Cid>, Option<Cid>)> = res["record_ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["rpath"].as_str().unwrap().as_bytes().to_vec(), opt(&o["old_value"]), opt(&o["new_value"])))
        .collect();
    assert_eq!(ops, want_ops.iter().cloned().collect::<BTreeSet<_>>(), "{name}: record ops");
    // Created / deleted nodes are the block-set differences.
    let created: BTreeSet<Cid> = b.blocks.keys().filter(|c| !a.blocks.contains_key(c)).copied().collect();
    let deleted: BTreeSet<Cid> = a.blocks.keys().filter(|c| !b.blocks.contains_key(c)).copied().collect();
    assert_eq!(created, cids(&res["created_nodes"]).into_iter().collect(), "{name}: created");
    assert_eq!(deleted, cids(&res["deleted_nodes"]).into_iter().collect(), "{name}: deleted");
    // Inversion of b with only the inductive proof nodes yields a.
    if want_ops.is_empty() {
        assert_eq!(a.root, b.root, "{name}");
        return;
    }
    let proof = Only { inner: &b.blocks, allowed: cids(&res["inductive_proof_nodes"]).into_iter().collect() };
    let mut m = Mst::load(&proof, b.root).unwrap_or_else(|e| panic!("{name}: {e}"));
    for (key, old, new) in want_ops.iter().rev() {
        let r: Result<(), MstError> = match (old, new) {
            (None, Some(v)) => m.delete(key).map(|got| assert_eq!(got, *v, "{name}")),
            (Some(o), _) => m.put(key, *o).map(|got| assert_eq!(got, *new, "{name}")),
            (None, None) => unreachable!(),
        };
        r.unwrap_or_else(|e| panic!("{name}: inverting {:?}: {e}", String::from_utf8_lossy(key)));
    }
    assert_eq!(m.root(), a.root, "{name}: inverted root");
}
