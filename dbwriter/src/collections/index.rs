//! The collection index in memory: for each collection (an NSID, numbered
//! in `collections`), the accounts holding records of it, as account
//! numbers (`accounts.no`) in 65,536-wide chunks, each a compressed bitmap
//! (`roaring`). A chunk is also the unit written to Postgres
//! (`collection_chunks`): the ones a round changed, whole, in the round's
//! transaction.
//!
//! Invariants:
//! - `ids[name] == i` iff `names[i] == name`; collection ids are dense
//!   from 0 and never reused.
//! - No chunk is empty in memory (an emptied chunk is removed here and
//!   written as an empty bitmap, which the loader skips).
//! - `dirty` names every (collection, chunk) changed since the last
//!   [`CollectionIndex::take_dirty`].

use roaring::RoaringBitmap;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Collections the index holds at most (the network has about a
/// thousand; a host inventing names is bounded here, counted as shed).
pub const COLLECTIONS_MAX: usize = 100_000;

#[derive(Default)]
struct Collection {
    chunks: BTreeMap<u16, RoaringBitmap>,
}

#[derive(Default)]
pub struct CollectionIndex {
    names: Vec<String>,
    ids: HashMap<String, u32>,
    sets: Vec<Collection>,
    /// Collections added since the last `take_new` (id, name).
    new: Vec<(u32, String)>,
    dirty: BTreeSet<(u32, u16)>,
}

fn split(no: u32) -> (u16, u32) {
    ((no >> 16) as u16, no & 0xffff)
}

impl CollectionIndex {
    /// A collection's id, None if unknown.
    pub fn id(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    pub fn name(&self, id: u32) -> Option<&str> {
        self.names.get(id as usize).map(String::as_str)
    }

    pub fn collections(&self) -> usize {
        self.names.len()
    }

    /// A collection's id, added if new; None past [`COLLECTIONS_MAX`].
    pub fn id_or_add(&mut self, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.get(name) {
            return Some(*id);
        }
        if self.names.len() >= COLLECTIONS_MAX {
            return None;
        }
        let id = self.names.len() as u32;
        self.names.push(name.to_owned());
        self.ids.insert(name.to_owned(), id);
        self.sets.push(Collection::default());
        self.new.push((id, name.to_owned()));
        Some(id)
    }

    /// A collection as stored (at start): no news to write.
    pub fn load_collection(&mut self, id: u32, name: &str) {
        let i = id as usize;
        if self.names.len() <= i {
            self.names.resize(i + 1, String::new());
            self.sets.resize_with(i + 1, Collection::default);
        }
        self.names[i] = name.to_owned();
        self.ids.insert(name.to_owned(), id);
    }

    /// A chunk as stored (at start).
    pub fn load_chunk(&mut self, id: u32, chunk: u16, bits: RoaringBitmap) {
        if let Some(c) = self.sets.get_mut(id as usize) {
            if !bits.is_empty() {
                c.chunks.insert(chunk, bits);
            }
        }
    }

    /// Set (`present`) or clear account `no` in collection `id`; true if
    /// that changed anything.
    pub fn set(&mut self, id: u32, no: u32, present: bool) -> bool {
        let Some(c) = self.sets.get_mut(id as usize) else { return false };
        let (hi, lo) = split(no);
        let changed = if present {
            c.chunks.entry(hi).or_default().insert(lo)
        } else {
            match c.chunks.get_mut(&hi) {
                Some(b) => {
                    let removed = b.remove(lo);
                    if b.is_empty() {
                        c.chunks.remove(&hi);
                    }
                    removed
                }
                None => false,
            }
        };
        if changed {
            self.dirty.insert((id, hi));
        }
        changed
    }

    pub fn contains(&self, id: u32, no: u32) -> bool {
        let (hi, lo) = split(no);
        self.sets.get(id as usize).and_then(|c| c.chunks.get(&hi)).is_some_and(|b| b.contains(lo))
    }

    /// The collections holding account `no`.
    pub fn of_account(&self, no: u32) -> Vec<u32> {
        (0..self.sets.len() as u32).filter(|&id| self.contains(id, no)).collect()
    }

    /// Accounts in collection `id`.
    pub fn len(&self, id: u32) -> u64 {
        self.sets.get(id as usize).map_or(0, |c| c.chunks.values().map(|b| b.len()).sum())
    }

    /// Pairs in all.
    pub fn pairs(&self) -> u64 {
        (0..self.sets.len() as u32).map(|id| self.len(id)).sum()
    }

    /// Bytes the bitmaps take serialized (about their size in memory).
    pub fn bitmap_bytes(&self) -> u64 {
        self.sets.iter().flat_map(|c| c.chunks.values()).map(|b| b.serialized_size() as u64).sum()
    }

    /// Up to `n` account numbers above `after` (None: from the start) in
    /// any of `ids`, ascending, each once.
    pub fn page(&self, ids: &[u32], after: Option<u32>, n: usize) -> Vec<u32> {
        let start = after.map_or(Some(0u32), |a| a.checked_add(1));
        let Some(start) = start else { return Vec::new() };
        let (hi0, lo0) = split(start);
        let mut out: Vec<u32> = Vec::with_capacity(n.min(4096));
        // Chunk by chunk in order: the union of the collections' chunks
        // of that number range, so merging stays within 65,536 numbers.
        let mut his: BTreeSet<u16> = BTreeSet::new();
        for &id in ids {
            if let Some(c) = self.sets.get(id as usize) {
                his.extend(c.chunks.range(hi0..).map(|(h, _)| *h).take(n.saturating_add(1)));
            }
        }
        for hi in his {
            let mut union = RoaringBitmap::new();
            for &id in ids {
                if let Some(b) = self.sets.get(id as usize).and_then(|c| c.chunks.get(&hi)) {
                    union |= b;
                }
            }
            let base = u32::from(hi) << 16;
            for lo in union.iter().filter(|&lo| hi != hi0 || lo >= lo0) {
                out.push(base | lo);
                if out.len() >= n {
                    return out;
                }
            }
        }
        out
    }

    /// Collections added since the last call.
    pub fn take_new(&mut self) -> Vec<(u32, String)> {
        std::mem::take(&mut self.new)
    }

    /// The changed chunks, serialized, since the last call.
    pub fn take_dirty(&mut self) -> Vec<(u32, u16, Vec<u8>)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .map(|(id, hi)| {
                let mut bytes = Vec::new();
                if let Some(b) = self.sets.get(id as usize).and_then(|c| c.chunks.get(&hi)) {
                    b.serialize_into(&mut bytes).expect("writing to a Vec");
                } else {
                    RoaringBitmap::new().serialize_into(&mut bytes).expect("writing to a Vec");
                }
                (id, hi, bytes)
            })
            .collect()
    }

    /// Put back what a failed commit did not write.
    pub fn restore(&mut self, new: Vec<(u32, String)>, chunks: &[(u32, u16, Vec<u8>)]) {
        let mut new = new;
        new.append(&mut self.new);
        self.new = new;
        self.dirty.extend(chunks.iter().map(|(id, hi, _)| (*id, *hi)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The index against a model (a set of pairs), through random sets and
    /// clears, pages of every size, and a reload from its own chunks.
    #[test]
    fn matches_a_model_and_reloads_from_its_chunks() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(23);
        let mut ix = CollectionIndex::default();
        let names = ["app.bsky.feed.post", "app.bsky.feed.like", "com.example.rare"];
        let ids: Vec<u32> = names.iter().map(|n| ix.id_or_add(n).unwrap()).collect();
        let mut model: BTreeSet<(u32, u32)> = BTreeSet::new();
        let mut stored: HashMap<(u32, u16), Vec<u8>> = HashMap::new();
        for round in 0..50 {
            for _ in 0..200 {
                let id = ids[rng.gen_range(0..3)];
                let no = if rng.gen_bool(0.5) { rng.gen_range(0..300_000) } else { rng.gen_range(0..2_000) };
                let present = rng.gen_bool(0.6);
                let was = model.contains(&(id, no));
                assert_eq!(ix.set(id, no, present), was != present);
                if present {
                    model.insert((id, no));
                } else {
                    model.remove(&(id, no));
                }
            }
            for (id, hi, b) in ix.take_dirty() {
                stored.insert((id, hi), b);
            }
            let pick: Vec<u32> = ids.iter().copied().filter(|_| rng.gen_bool(0.6)).collect();
            let want: Vec<u32> = model
                .iter()
                .filter(|(id, _)| pick.contains(id))
                .map(|(_, no)| *no)
                .collect::<BTreeSet<u32>>()
                .into_iter()
                .collect();
            let size = [1, 7, 500, 2000][round % 4];
            let mut got: Vec<u32> = Vec::new();
            let mut after = None;
            loop {
                let p = ix.page(&pick, after, size);
                assert!(p.len() <= size);
                got.extend(&p);
                match p.last() {
                    Some(l) if p.len() == size => after = Some(*l),
                    _ => break,
                }
            }
            assert_eq!(got, want, "round {round}");
        }
        let mut back = CollectionIndex::default();
        for (i, n) in names.iter().enumerate() {
            back.load_collection(i as u32, n);
        }
        for ((id, hi), b) in stored {
            back.load_chunk(id, hi, RoaringBitmap::deserialize_from(&b[..]).unwrap());
        }
        for &id in &ids {
            assert_eq!(back.page(&[id], None, usize::MAX), ix.page(&[id], None, usize::MAX));
            assert_eq!(back.len(id), model.iter().filter(|p| p.0 == id).count() as u64);
        }
    }
}
