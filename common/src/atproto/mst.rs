//! Merkle Search Trees: the repository structure, and the partial-tree
//! operations behind Sync 1.1 commit proofs.
//!
//! An MST is fully determined by its set of `(key, cid)` pairs: each key sits
//! in the layer given by the leading zero bits of `sha256(key)` divided by two
//! ([`key_layer`]); the root is at the highest layer; a node at layer L holds
//! the layer-L keys of its range, interleaved with links to layer L-1 nodes
//! for the gaps. Intermediate nodes with no keys exist (a chain down to the
//! next populated layer); empty nodes are pruned at the top and bottom.
//!
//! [`Mst`] is a *partial* tree: it starts from a root CID over any
//! [`BlockSource`] and loads nodes only when an operation walks into them.
//! Unloaded subtrees stay as their CID. `put`/`delete` keep the tree
//! canonical (split on insert, merge on delete, trim at the top), and
//! [`Mst::root`] re-encodes only the nodes that changed. A node an operation
//! needs but the source lacks is [`MstError::MissingBlock`], never a panic:
//! that is how a commit's proof is checked (see `commit`).
//!
//! Nodes live in an arena (`Vec<Node>`) addressed by index; the recursion
//! depth is bounded by the number of layers (≤ 128). The arena, the nodes'
//! entry lists and the encoding buffer are the thread's spares
//! (`atproto::spare`), given back when the tree drops: checking a commit's
//! proof allocates nothing once the thread is warm.

use crate::atproto::cbor::{CborError, Reader, Writer};
use crate::atproto::cid::{Cid, Codec};
use crate::atproto::spare::Spares;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

/// Longest key we accept in a node (repo spec: 1024 bytes).
pub const KEY_BYTES_MAX: usize = 1024;
/// Entries in one node; a bound against hostile input, far above real trees.
pub const NODE_ENTRIES_MAX: usize = 4096;

/// Layer of a key: leading zero bits of sha256(key), halved (fanout 4).
pub fn key_layer(key: &[u8]) -> u8 {
    let h = Sha256::digest(key);
    let mut zeros = 0u32;
    for b in h.iter() {
        if *b == 0 {
            zeros += 8;
        } else {
            zeros += b.leading_zeros();
            break;
        }
    }
    (zeros / 2) as u8
}

pub fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum MstError {
    #[error("MST block {0} is not in the proof")]
    MissingBlock(Cid),
    #[error("MST node {0}: {1}")]
    Decode(Cid, CborError),
    #[error("MST node {0}: {1}")]
    BadNode(Cid, &'static str),
    #[error("MST node {0} is at the wrong layer")]
    Layer(Cid),
    #[error("key {0:?} not found")]
    NotFound(String),
}

/// Where nodes come from.
pub trait BlockSource {
    fn get_block(&self, cid: &Cid) -> Option<&[u8]>;
}

impl BlockSource for crate::atproto::car::CarSlice<'_> {
    fn get_block(&self, cid: &Cid) -> Option<&[u8]> {
        self.get(cid)
    }
}

impl BlockSource for HashMap<Cid, Vec<u8>> {
    fn get_block(&self, cid: &Cid) -> Option<&[u8]> {
        self.get(cid).map(Vec::as_slice)
    }
}

/// A source with nothing in it (build trees from scratch).
pub struct NoBlocks;
impl BlockSource for NoBlocks {
    fn get_block(&self, _: &Cid) -> Option<&[u8]> {
        None
    }
}

/// Wraps a source and records every CID read through it (to compute the
/// proof a commit must carry).
pub struct Recording<'a, S: BlockSource> {
    pub inner: &'a S,
    pub read: RefCell<HashSet<Cid>>,
}

impl<'a, S: BlockSource> Recording<'a, S> {
    pub fn new(inner: &'a S) -> Self {
        Recording { inner, read: RefCell::new(HashSet::new()) }
    }
}

impl<S: BlockSource> BlockSource for Recording<'_, S> {
    fn get_block(&self, cid: &Cid) -> Option<&[u8]> {
        self.read.borrow_mut().insert(*cid);
        self.inner.get_block(cid)
    }
}

/// A decoded node in wire form, keys expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeData {
    pub left: Option<Cid>,
    pub entries: Vec<EntryData>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryData {
    pub key: Vec<u8>,
    pub val: Cid,
    pub right: Option<Cid>,
}

/// Decode an MST node, expanding prefix-compressed keys and checking that
/// keys are strictly increasing and compression is canonical.
pub fn decode_node(cid: &Cid, bytes: &[u8]) -> Result<NodeData, MstError> {
    let mut entries = Vec::new();
    let left = parse_node(cid, bytes, |key, val, right| entries.push(EntryData { key: key.to_vec(), val, right }))?;
    Ok(NodeData { left, entries })
}

/// Parse a node, handing each expanded entry to `on_entry`; returns the
/// left link. Shared by [`decode_node`] and the tree's loader so the hot
/// path builds its own entries without an intermediate copy.
fn parse_node(
    cid: &Cid,
    bytes: &[u8],
    mut on_entry: impl FnMut(Key, Cid, Option<Cid>),
) -> Result<Option<Cid>, MstError> {
    let e = |err| MstError::Decode(*cid, err);
    let bad = |what| MstError::BadNode(*cid, what);
    let mut r = Reader::new(bytes);
    let n = r.map().map_err(e)?;
    let mut left = None;
    let (mut seen_e, mut seen_l) = (false, false);
    // The previous key, for prefix expansion and order checks.
    let mut prev = Key::new();
    for _ in 0..n {
        match r.key_bytes().map_err(e)? {
            b"l" if !seen_l => {
                seen_l = true;
                left = r.opt_cid().map_err(e)?;
            }
            b"e" if !seen_e => {
                seen_e = true;
                let count = r.array().map_err(e)?;
                if count > NODE_ENTRIES_MAX {
                    return Err(bad("too many entries"));
                }
                for i in 0..count {
                    let (key, val, right) = parse_entry(&mut r, &prev, i == 0, cid)?;
                    prev.clear();
                    prev.extend_from_slice(&key);
                    on_entry(key, val, right);
                }
            }
            _ => return Err(bad("unknown or repeated field")),
        }
    }
    r.finish().map_err(e)?;
    if !seen_e || !seen_l {
        return Err(bad("missing field"));
    }
    Ok(left)
}

fn parse_entry(r: &mut Reader<'_>, prev: &[u8], first: bool, cid: &Cid) -> Result<(Key, Cid, Option<Cid>), MstError> {
    let e = |err| MstError::Decode(*cid, err);
    let bad = |what| MstError::BadNode(*cid, what);
    let n = r.map().map_err(e)?;
    let (mut p, mut k, mut v, mut t) = (None, None, None, None);
    for _ in 0..n {
        match r.key_bytes().map_err(e)? {
            b"p" if p.is_none() => p = Some(r.u64().map_err(e)?),
            b"k" if k.is_none() => k = Some(r.bytes().map_err(e)?),
            b"v" if v.is_none() => v = Some(r.cid().map_err(e)?),
            b"t" if t.is_none() => t = Some(r.opt_cid().map_err(e)?),
            _ => return Err(bad("unknown or repeated entry field")),
        }
    }
    let (Some(p), Some(k), Some(v), Some(t)) = (p, k, v, t) else {
        return Err(bad("entry field missing"));
    };
    let p = p as usize;
    if p > prev.len() {
        return Err(bad("prefix longer than previous key"));
    }
    let mut key = Key::with_capacity(p + k.len());
    key.extend_from_slice(&prev[..p]);
    key.extend_from_slice(k);
    if key.is_empty() || key.len() > KEY_BYTES_MAX {
        return Err(bad("key length"));
    }
    if !first && key.as_slice() <= prev {
        return Err(bad("keys not strictly increasing"));
    }
    if common_prefix_len(prev, &key) != p {
        return Err(bad("prefix compression not canonical"));
    }
    Ok((key, v, t))
}

/// Canonical encoding of a node.
pub fn encode_node(node: &NodeData) -> Vec<u8> {
    let mut out = Vec::new();
    encode_parts(&mut out, node.left, node.entries.iter().map(|e| (e.key.as_slice(), &e.val, e.right)));
    out
}

/// Canonical encoding from borrowed parts, `(key, value, right)` per entry,
/// appended to `out`.
fn encode_parts<'k>(
    out: &mut Vec<u8>,
    left: Option<Cid>,
    entries: impl ExactSizeIterator<Item = (&'k [u8], &'k Cid, Option<Cid>)>,
) {
    let mut w = Writer { buf: std::mem::take(out) };
    w.buf.reserve(16 + entries.len() * 96);
    w.map(2);
    w.text("e");
    w.array(entries.len());
    let mut prev: &[u8] = &[];
    for (key, val, right) in entries {
        let p = common_prefix_len(prev, key);
        w.map(4);
        w.text("k");
        w.bytes(&key[p..]);
        w.text("p");
        w.u64(p as u64);
        w.text("t");
        w.opt_cid(right.as_ref());
        w.text("v");
        w.cid(val);
        prev = key;
    }
    w.text("l");
    w.opt_cid(left.as_ref());
    *out = w.into_inner();
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Empty,
    Stub(Cid),
    Node(u32),
}

impl Link {
    fn from_opt(c: Option<Cid>) -> Link {
        c.map_or(Link::Empty, Link::Stub)
    }
}

/// Keys live inline up to 48 bytes (real keys are `collection/tid`, about
/// 32 bytes): no allocation per entry on the hot path.
type Key = smallvec::SmallVec<[u8; 48]>;

#[derive(Clone, Debug)]
struct Entry {
    key: Key,
    val: Cid,
    right: Link,
}

#[derive(Clone, Debug)]
struct Node {
    left: Link,
    entries: Vec<Entry>,
    /// The node's CID while it is unchanged since it was loaded or encoded.
    cid: Option<Cid>,
}

thread_local! {
    static NODE_LISTS: Spares<Node> = const { Spares::new(4, 4096) };
    static ENTRY_LISTS: Spares<Entry> = const { Spares::new(64, 4 * ENTRIES_ROOM) };
    static ENCODE_BUFS: Spares<u8> = const { Spares::new(2, 64 * 1024) };
}

/// Room in a node's entry list: a node holds 4 entries on average (a key
/// goes up a layer with probability 1/4) and more than 32 about once in
/// 10,000 nodes, so a list rarely grows. 64 spare lists: 256 KiB a thread.
const ENTRIES_ROOM: usize = 32;

/// An empty entry list for a node.
fn spare_entries() -> Vec<Entry> {
    ENTRY_LISTS.with(|s| s.take_with_room(ENTRIES_ROOM))
}

/// An entry list for a new node, holding `first`.
fn entries_of(first: Entry) -> Vec<Entry> {
    let mut v = spare_entries();
    v.push(first);
    v
}

/// A partially loaded, mutable MST over a block source.
pub struct Mst<'s, S: BlockSource> {
    store: &'s S,
    nodes: Vec<Node>,
    root: Link,
    /// Layer of the root; meaningful only when `root` is not `Empty`.
    root_layer: u8,
}

impl<'s, S: BlockSource> Mst<'s, S> {
    /// An empty tree.
    pub fn empty(store: &'s S) -> Self {
        Mst { store, nodes: NODE_LISTS.with(Spares::take), root: Link::Empty, root_layer: 0 }
    }

    /// Open the tree rooted at `root`; the root node must be in `store`.
    pub fn load(store: &'s S, root: Cid) -> Result<Self, MstError> {
        let mut m = Mst::empty(store);
        let idx = m.load_node(root, None)?;
        let node = &m.nodes[idx as usize];
        if node.entries.is_empty() {
            if node.left != Link::Empty {
                return Err(MstError::BadNode(root, "root without entries must be pruned"));
            }
            m.nodes.clear();
            return Ok(m); // the empty tree
        }
        m.root_layer = key_layer(&node.entries[0].key);
        m.root = Link::Node(idx);
        Ok(m)
    }

    /// Build a full tree from `(key, value)` pairs (any order).
    pub fn from_entries(store: &'s S, pairs: impl IntoIterator<Item = (Vec<u8>, Cid)>) -> Result<Self, MstError> {
        let mut m = Mst::empty(store);
        for (k, v) in pairs {
            m.put(&k, v)?;
        }
        Ok(m)
    }

    /// Load a node into the arena. `layer` is where its parent places it
    /// (`None` for the root, which may be the empty tree's empty node).
    fn load_node(&mut self, cid: Cid, layer: Option<u8>) -> Result<u32, MstError> {
        let bytes = self.store.get_block(&cid).ok_or(MstError::MissingBlock(cid))?;
        let mut entries = spare_entries();
        let left = parse_node(&cid, bytes, |key, val, right| {
            entries.push(Entry { key, val, right: Link::from_opt(right) });
        })?;
        if let Some(layer) = layer {
            // One hash per node: the first key places the node. Checking every
            // key would cost a SHA-256 per entry on every commit; a signer whose
            // tree mixes layers inside a node only breaks its own proofs.
            if let Some(first) = entries.first() {
                if key_layer(&first.key) != layer {
                    return Err(MstError::Layer(cid));
                }
            }
            if layer == 0 && (left.is_some() || entries.iter().any(|e| e.right != Link::Empty)) {
                return Err(MstError::BadNode(cid, "layer 0 node with subtrees"));
            }
            if entries.is_empty() && left.is_none() {
                return Err(MstError::BadNode(cid, "empty node below the root"));
            }
        }
        self.nodes.push(Node { left: Link::from_opt(left), entries, cid: Some(cid) });
        Ok((self.nodes.len() - 1) as u32)
    }

    /// Resolve a link at `layer` to an arena index, loading a stub.
    fn resolve(&mut self, link: Link, layer: u8) -> Result<Option<u32>, MstError> {
        match link {
            Link::Empty => Ok(None),
            Link::Node(i) => Ok(Some(i)),
            Link::Stub(cid) => self.load_node(cid, Some(layer)).map(Some),
        }
    }

    fn new_node(&mut self, left: Link, entries: Vec<Entry>) -> Link {
        if entries.is_empty() && left == Link::Empty {
            return Link::Empty;
        }
        self.nodes.push(Node { left, entries, cid: None });
        Link::Node((self.nodes.len() - 1) as u32)
    }

    /// Wrap `link` (at layer `from`) in empty nodes up to layer `to`.
    fn raise(&mut self, mut link: Link, from: u8, to: u8) -> Link {
        for _ in from..to {
            link = self.new_node(link, Vec::new());
        }
        link
    }

    fn gap(&self, n: u32, i: usize) -> Link {
        let node = &self.nodes[n as usize];
        if i == 0 {
            node.left
        } else {
            node.entries[i - 1].right
        }
    }

    fn set_gap(&mut self, n: u32, i: usize, l: Link) {
        let node = &mut self.nodes[n as usize];
        if i == 0 {
            node.left = l;
        } else {
            node.entries[i - 1].right = l;
        }
        node.cid = None;
    }

    /// Index of the first entry with key >= `key`, and whether it is equal.
    fn position(&self, n: u32, key: &[u8]) -> (usize, bool) {
        let es = &self.nodes[n as usize].entries;
        match es.binary_search_by(|e| e.key.as_slice().cmp(key)) {
            Ok(i) => (i, true),
            Err(i) => (i, false),
        }
    }

    /// Look a key up.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Cid>, MstError> {
        let Some(mut n) = self.resolve(self.root, self.root_layer)? else {
            return Ok(None);
        };
        self.root = Link::Node(n);
        let mut layer = self.root_layer;
        loop {
            let (i, found) = self.position(n, key);
            if found {
                return Ok(Some(self.nodes[n as usize].entries[i].val));
            }
            if layer == 0 {
                return Ok(None);
            }
            let Some(child) = self.resolve(self.gap(n, i), layer - 1)? else {
                return Ok(None);
            };
            // Loading does not change the node: patch the link, keep its CID.
            let node = &mut self.nodes[n as usize];
            if i == 0 {
                node.left = Link::Node(child);
            } else {
                node.entries[i - 1].right = Link::Node(child);
            }
            n = child;
            layer -= 1;
        }
    }

    /// Does the tree hold a key that starts with `prefix` other than
    /// `near` (itself starting with `prefix`)? Keys with one prefix are
    /// contiguous in key order, so it is enough to look at `near`'s two
    /// neighbours: the walk to `near`'s place visits every node whose
    /// entries bound it (the nodes a Sync 1.1 slice must carry to invert
    /// an operation on `near`). `MissingBlock` when the slice lacks one.
    pub fn has_other_with_prefix(&mut self, prefix: &[u8], near: &[u8]) -> Result<bool, MstError> {
        debug_assert!(near.starts_with(prefix));
        let Some(mut n) = self.resolve(self.root, self.root_layer)? else {
            return Ok(false);
        };
        self.root = Link::Node(n);
        let mut layer = self.root_layer;
        loop {
            let (i, found) = self.position(n, near);
            let es = &self.nodes[n as usize].entries;
            // The entries either side of `near`'s place here are nearer
            // than any seen above (each descent narrows the interval).
            let right = if found { i + 1 } else { i };
            if i > 0 && es[i - 1].key.starts_with(prefix) || es.get(right).is_some_and(|e| e.key.starts_with(prefix)) {
                return Ok(true);
            }
            if found {
                // Present here: its neighbours are the far ends of the two
                // subtrees beside it.
                let (l, r) = (self.gap(n, i), self.gap(n, i + 1));
                return Ok(
                    self.edge_has_prefix(l, layer, prefix, false)? || self.edge_has_prefix(r, layer, prefix, true)?
                );
            }
            if layer == 0 {
                return Ok(false);
            }
            let Some(child) = self.resolve(self.gap(n, i), layer - 1)? else {
                return Ok(false);
            };
            self.set_gap_loaded(n, i, child);
            n = child;
            layer -= 1;
        }
    }

    /// Whether the first (`leftmost`) or last key under `link` (a gap of a
    /// node at `layer`) starts with `prefix`.
    fn edge_has_prefix(
        &mut self,
        mut link: Link,
        mut layer: u8,
        prefix: &[u8],
        leftmost: bool,
    ) -> Result<bool, MstError> {
        while layer > 0 {
            let Some(n) = self.resolve(link, layer - 1)? else { return Ok(false) };
            let node = &self.nodes[n as usize];
            let (next, edge) = if leftmost {
                (node.left, node.entries.first())
            } else {
                (node.entries.last().map_or(node.left, |e| e.right), node.entries.last())
            };
            if next == Link::Empty {
                return Ok(edge.is_some_and(|e| e.key.starts_with(prefix)));
            }
            link = next;
            layer -= 1;
        }
        Ok(false)
    }

    /// A subtree just loaded: patch the link, keep the node's CID.
    fn set_gap_loaded(&mut self, n: u32, i: usize, child: u32) {
        let node = &mut self.nodes[n as usize];
        if i == 0 {
            node.left = Link::Node(child);
        } else {
            node.entries[i - 1].right = Link::Node(child);
        }
    }

    /// Insert or update; returns the previous value.
    pub fn put(&mut self, key: &[u8], val: Cid) -> Result<Option<Cid>, MstError> {
        let kl = key_layer(key);
        if self.root == Link::Empty {
            self.root =
                self.new_node(Link::Empty, entries_of(Entry { key: Key::from_slice(key), val, right: Link::Empty }));
            self.root_layer = kl;
            return Ok(None);
        }
        if kl > self.root_layer {
            let (l, r) = self.split(self.root, self.root_layer, key)?;
            let l = self.raise(l, self.root_layer, kl - 1);
            let r = self.raise(r, self.root_layer, kl - 1);
            self.root = self.new_node(l, entries_of(Entry { key: Key::from_slice(key), val, right: r }));
            self.root_layer = kl;
            return Ok(None);
        }
        let mut prev = None;
        self.root = self.put_at(self.root, self.root_layer, key, val, kl, &mut prev)?;
        Ok(prev)
    }

    fn put_at(
        &mut self,
        link: Link,
        layer: u8,
        key: &[u8],
        val: Cid,
        kl: u8,
        prev: &mut Option<Cid>,
    ) -> Result<Link, MstError> {
        let Some(n) = self.resolve(link, layer)? else {
            let leaf =
                self.new_node(Link::Empty, entries_of(Entry { key: Key::from_slice(key), val, right: Link::Empty }));
            return Ok(self.raise(leaf, kl, layer));
        };
        let (i, found) = self.position(n, key);
        if found {
            let node = &mut self.nodes[n as usize];
            *prev = Some(node.entries[i].val);
            if node.entries[i].val != val {
                node.entries[i].val = val;
                node.cid = None;
            }
            return Ok(Link::Node(n));
        }
        let gap = self.gap(n, i);
        if kl == layer {
            let (gl, gr) = if layer == 0 { (Link::Empty, Link::Empty) } else { self.split(gap, layer - 1, key)? };
            self.set_gap(n, i, gl);
            self.nodes[n as usize].entries.insert(i, Entry { key: Key::from_slice(key), val, right: gr });
        } else {
            let child = self.put_at(gap, layer - 1, key, val, kl, prev)?;
            self.set_gap(n, i, child);
        }
        Ok(Link::Node(n))
    }

    /// Split the subtree at `layer` around `key` (absent from it).
    fn split(&mut self, link: Link, layer: u8, key: &[u8]) -> Result<(Link, Link), MstError> {
        let Some(n) = self.resolve(link, layer)? else {
            return Ok((Link::Empty, Link::Empty));
        };
        let (i, _) = self.position(n, key);
        let gap = self.gap(n, i);
        let (gl, gr) = if layer == 0 { (Link::Empty, Link::Empty) } else { self.split(gap, layer - 1, key)? };
        let mut right_entries = spare_entries();
        right_entries.extend(self.nodes[n as usize].entries.drain(i..));
        let right = self.new_node(gr, right_entries);
        self.set_gap(n, i, gl);
        let node = &self.nodes[n as usize];
        let left = if node.entries.is_empty() && node.left == Link::Empty { Link::Empty } else { Link::Node(n) };
        Ok((left, right))
    }

    /// Delete a key; returns its value.
    pub fn delete(&mut self, key: &[u8]) -> Result<Cid, MstError> {
        let mut removed = None;
        self.root = self.delete_at(self.root, self.root_layer, key, &mut removed)?;
        self.trim_top()?;
        removed.ok_or_else(|| MstError::NotFound(String::from_utf8_lossy(key).into_owned()))
    }

    fn delete_at(&mut self, link: Link, layer: u8, key: &[u8], removed: &mut Option<Cid>) -> Result<Link, MstError> {
        let Some(n) = self.resolve(link, layer)? else {
            return Err(MstError::NotFound(String::from_utf8_lossy(key).into_owned()));
        };
        let (i, found) = self.position(n, key);
        if found {
            let e = self.nodes[n as usize].entries.remove(i);
            *removed = Some(e.val);
            let merged = if layer == 0 { Link::Empty } else { self.merge(self.gap(n, i), e.right, layer - 1)? };
            self.set_gap(n, i, merged);
        } else {
            if layer == 0 {
                return Err(MstError::NotFound(String::from_utf8_lossy(key).into_owned()));
            }
            let child = self.delete_at(self.gap(n, i), layer - 1, key, removed)?;
            self.set_gap(n, i, child);
        }
        let node = &self.nodes[n as usize];
        Ok(if node.entries.is_empty() && node.left == Link::Empty { Link::Empty } else { Link::Node(n) })
    }

    /// Join two adjacent subtrees at `layer` (all keys of `a` < all of `b`).
    fn merge(&mut self, a: Link, b: Link, layer: u8) -> Result<Link, MstError> {
        // Joining with nothing must not load the other side: a proof does
        // not carry nodes that the operation leaves untouched.
        if a == Link::Empty {
            return Ok(b);
        }
        if b == Link::Empty {
            return Ok(a);
        }
        let Some(ai) = self.resolve(a, layer)? else {
            return Ok(b);
        };
        let Some(bi) = self.resolve(b, layer)? else {
            return Ok(Link::Node(ai));
        };
        let a_last = self.nodes[ai as usize].entries.len();
        let mid = if layer == 0 {
            Link::Empty
        } else {
            let a_gap = self.gap(ai, a_last);
            let b_gap = self.nodes[bi as usize].left;
            self.merge(a_gap, b_gap, layer - 1)?
        };
        self.set_gap(ai, a_last, mid);
        let mut moved = std::mem::take(&mut self.nodes[bi as usize].entries);
        self.nodes[ai as usize].entries.append(&mut moved);
        ENTRY_LISTS.with(|s| s.give(moved));
        Ok(Link::Node(ai))
    }

    /// Prune empty nodes at the top after deletions.
    fn trim_top(&mut self) -> Result<(), MstError> {
        loop {
            let Some(n) = self.resolve(self.root, self.root_layer)? else {
                return Ok(());
            };
            self.root = Link::Node(n);
            let node = &self.nodes[n as usize];
            if !node.entries.is_empty() {
                return Ok(());
            }
            if node.left == Link::Empty || self.root_layer == 0 {
                self.root = Link::Empty;
                return Ok(());
            }
            self.root = node.left;
            self.root_layer -= 1;
        }
    }

    /// Compute the root CID, encoding every changed node. Each newly
    /// encoded node is passed to `emit` (to build repositories and proofs).
    pub fn root_with(&mut self, emit: &mut dyn FnMut(Cid, Vec<u8>)) -> Cid {
        self.root_inner(Some(emit))
    }

    /// Compute the root CID (nothing emitted, no block kept).
    pub fn root(&mut self) -> Cid {
        self.root_inner(None)
    }

    fn root_inner(&mut self, mut emit: Option<&mut dyn FnMut(Cid, Vec<u8>)>) -> Cid {
        match self.root {
            Link::Empty => {
                let bytes = encode_node(&NodeData { left: None, entries: Vec::new() });
                let cid = Cid::compute(Codec::DagCbor, &bytes);
                if let Some(emit) = emit.as_mut() {
                    emit(cid, bytes);
                }
                cid
            }
            Link::Stub(c) => c,
            Link::Node(n) => {
                let mut scratch = ENCODE_BUFS.with(Spares::take);
                let cid = self.node_cid(n, &mut emit, &mut scratch);
                ENCODE_BUFS.with(|s| s.give(scratch));
                cid
            }
        }
    }

    fn link_cid(&self, l: Link) -> Option<Cid> {
        match l {
            Link::Empty => None,
            Link::Stub(c) => Some(c),
            Link::Node(n) => Some(self.nodes[n as usize].cid.expect("children encoded first")),
        }
    }

    fn node_cid(&mut self, n: u32, emit: &mut Option<&mut dyn FnMut(Cid, Vec<u8>)>, scratch: &mut Vec<u8>) -> Cid {
        if let Some(c) = self.nodes[n as usize].cid {
            return c;
        }
        // Children first (post-order), so every link below has its CID.
        if let Link::Node(c) = self.nodes[n as usize].left {
            self.node_cid(c, emit, scratch);
        }
        for i in 0..self.nodes[n as usize].entries.len() {
            if let Link::Node(c) = self.nodes[n as usize].entries[i].right {
                self.node_cid(c, emit, scratch);
            }
        }
        let node = &self.nodes[n as usize];
        scratch.clear();
        encode_parts(
            scratch,
            self.link_cid(node.left),
            node.entries.iter().map(|e| (e.key.as_slice(), &e.val, self.link_cid(e.right))),
        );
        let cid = Cid::compute(Codec::DagCbor, scratch);
        if let Some(emit) = emit.as_mut() {
            emit(cid, scratch.clone());
        }
        self.nodes[n as usize].cid = Some(cid);
        cid
    }

    /// Every `(key, value)` in order; loads the whole tree.
    pub fn entries(&mut self) -> Result<Vec<(Vec<u8>, Cid)>, MstError> {
        let mut out = Vec::new();
        let (root, layer) = (self.root, self.root_layer);
        self.walk(root, layer, &mut out)?;
        Ok(out)
    }

    fn walk(&mut self, link: Link, layer: u8, out: &mut Vec<(Vec<u8>, Cid)>) -> Result<(), MstError> {
        let Some(n) = self.resolve(link, layer)? else {
            return Ok(());
        };
        let sub = layer.saturating_sub(1);
        self.walk(self.nodes[n as usize].left, sub, out)?;
        for i in 0..self.nodes[n as usize].entries.len() {
            let e = &self.nodes[n as usize].entries[i];
            out.push((e.key.to_vec(), e.val));
            let r = e.right;
            self.walk(r, sub, out)?;
        }
        Ok(())
    }
}

impl<S: BlockSource> Drop for Mst<'_, S> {
    fn drop(&mut self) {
        let mut nodes = std::mem::take(&mut self.nodes);
        let _ = ENTRY_LISTS.try_with(|s| nodes.iter_mut().for_each(|n| s.give(std::mem::take(&mut n.entries))));
        let _ = NODE_LISTS.try_with(|s| s.give(nodes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn leaf() -> Cid {
        Cid::parse("bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454").unwrap()
    }

    /// Build a store + root for a set of keys from scratch.
    fn build(keys: &[String]) -> (HashMap<Cid, Vec<u8>>, Cid) {
        let mut store = HashMap::new();
        let mut m = Mst::empty(&NoBlocks);
        for k in keys {
            m.put(k.as_bytes(), leaf()).unwrap();
        }
        let root = m.root_with(&mut |c, b| {
            store.insert(c, b);
        });
        (store, root)
    }

    /// `has_other_with_prefix` against a sorted-set model, over trees of
    /// several collections (some with one record), for present and absent
    /// keys.
    #[test]
    fn other_key_with_prefix_matches_a_model() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(23);
        let cols = ["a.b.like", "a.b.post", "a.b.solo", "z.y.x"];
        for round in 0..40 {
            let n = rng.gen_range(1..400);
            let mut keys: std::collections::BTreeSet<String> = Default::default();
            for _ in 0..n {
                let c = cols[rng.gen_range(0..cols.len())];
                if c == "a.b.solo" && round % 2 == 0 {
                    continue;
                }
                keys.insert(format!("{c}/{:08}", rng.gen_range(0..100_000)));
            }
            let v: Vec<String> = keys.iter().cloned().collect();
            let (store, root) = build(&v);
            for _ in 0..50 {
                let c = cols[rng.gen_range(0..cols.len())];
                let near = if rng.gen_bool(0.5) && !v.is_empty() {
                    v[rng.gen_range(0..v.len())].clone()
                } else {
                    format!("{c}/{:08}", rng.gen_range(0..100_000))
                };
                let prefix = format!("{}/", near.split('/').next().unwrap());
                let want = keys.iter().any(|k| k.starts_with(&prefix) && *k != near);
                let mut m = Mst::load(&store, root).unwrap();
                assert_eq!(m.has_other_with_prefix(prefix.as_bytes(), near.as_bytes()).unwrap(), want, "{near}");
            }
        }
    }

    #[test]
    fn empty_tree_root() {
        // The well-known CID of the empty MST node.
        assert_eq!(
            Mst::empty(&NoBlocks).root().to_string(),
            "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
        );
    }

    #[test]
    fn insertion_order_does_not_matter_and_deletes_invert() {
        use rand::{seq::SliceRandom, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let keys: Vec<String> = (0..300).map(|i| format!("app.bsky.feed.post/{i:06}")).collect();
        let (_, want) = build(&keys);
        for _ in 0..5 {
            let mut shuffled = keys.clone();
            shuffled.shuffle(&mut rng);
            let (_, got) = build(&shuffled);
            assert_eq!(got, want);
        }
        // Delete half from the loaded tree and compare with building the rest.
        let (store, root) = build(&keys);
        let mut m = Mst::load(&store, root).unwrap();
        let mut rest: BTreeMap<String, ()> = keys.iter().map(|k| (k.clone(), ())).collect();
        let mut dels = keys.clone();
        dels.shuffle(&mut rng);
        for k in dels.iter().take(150) {
            assert_eq!(m.delete(k.as_bytes()).unwrap(), leaf());
            rest.remove(k);
        }
        let (_, want_rest) = build(&rest.keys().cloned().collect::<Vec<_>>());
        assert_eq!(m.root(), want_rest);
        // and down to nothing
        for k in dels.iter().skip(150) {
            m.delete(k.as_bytes()).unwrap();
        }
        assert_eq!(m.root(), Mst::empty(&NoBlocks).root());
    }

    #[test]
    fn missing_blocks_are_errors() {
        let keys: Vec<String> = (0..200).map(|i| format!("c/{i:04}")).collect();
        let (mut store, root) = build(&keys);
        // Keep only the root: any descent must fail cleanly.
        store.retain(|c, _| *c == root);
        let mut m = Mst::load(&store, root).unwrap();
        let mut missing = 0;
        for k in &keys {
            match m.get(k.as_bytes()) {
                Ok(_) => {}
                Err(MstError::MissingBlock(_)) => missing += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(missing > 0);
    }

    #[test]
    fn node_at_the_wrong_layer_is_an_error() {
        // Root at layer 1 with one key; its left subtree must be layer 0.
        let at = |layer: u8| (0..10_000).map(|i| format!("k/{i:05}")).filter(move |k| key_layer(k.as_bytes()) == layer);
        let top = at(1).nth(1).unwrap();
        let below_ok = at(0).find(|k| *k < top).unwrap();
        let below_bad = at(1).next().unwrap();
        assert!(below_bad < top);
        let node = |left: Option<Cid>, key: &str| {
            let n = NodeData { left, entries: vec![EntryData { key: key.into(), val: leaf(), right: None }] };
            let bytes = encode_node(&n);
            (Cid::compute(Codec::DagCbor, &bytes), bytes)
        };
        for (child_key, want_layer_error) in [(&below_ok, false), (&below_bad, true)] {
            let (child, child_bytes) = node(None, child_key);
            let (root, root_bytes) = node(Some(child), &top);
            let store: HashMap<Cid, Vec<u8>> = [(child, child_bytes), (root, root_bytes)].into_iter().collect();
            let mut m = Mst::load(&store, root).unwrap();
            match m.get(child_key.as_bytes()) {
                Err(MstError::Layer(c)) => assert!(want_layer_error && c == child),
                Ok(v) => assert!(!want_layer_error && v == Some(leaf())),
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn node_codec_round_trip() {
        let (store, root) = build(&["a/1".into(), "a/2".into(), "b/1".into()]);
        for (cid, bytes) in &store {
            let n = decode_node(cid, bytes).unwrap();
            assert_eq!(&encode_node(&n), bytes);
        }
        assert!(store.contains_key(&root));
    }
}
