//! A cache of fixed-size values keyed by [`DidKey`], for the millions of
//! accounts a relay touches: one array of slots (key, value, owner, a
//! "used" bit) and a `hashbrown` table of slot numbers. Nothing is
//! allocated per entry; the array and the table are sized once from the
//! capacity, and their pages are touched only as entries come. Eviction
//! is CLOCK: LRU's order without its two pointers per entry.
//!
//! Owners (a host's id, for example) are counted, so a caller can keep
//! each one to a share ([`ClockCache::owned_by`]); the capacity can change
//! at run time (a reload), evicting down to a smaller one.
//!
//! Used by the shard's identity cache and the db-writer's account cache.

use crate::atproto::did::DidKey;
use hashbrown::HashTable;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy)]
struct Slot<V: Copy> {
    key: DidKey,
    value: V,
    owner: i64,
    used: bool,
}

/// Bytes of index per entry (hashbrown: a 4-byte slot number and a
/// control byte per bucket, at most 7/8 full, buckets a power of two).
const INDEX_BYTES_PER_ENTRY: usize = 8;

pub struct ClockCache<V: Copy> {
    slots: Vec<Slot<V>>,
    index: HashTable<u32>,
    capacity: usize,
    hand: usize,
    owners: HashMap<i64, u32>,
}

fn hash_of(k: &DidKey) -> u64 {
    // Both forms of a DidKey are random past the tag byte.
    u64::from_le_bytes(k.0[1..9].try_into().expect("8 bytes"))
}

impl<V: Copy> ClockCache<V> {
    /// Bytes one entry takes, everything counted.
    pub const ENTRY_BYTES: usize = std::mem::size_of::<Slot<V>>() + INDEX_BYTES_PER_ENTRY;

    /// A cache of at most `bytes` (at least 16 entries).
    pub fn with_bytes(bytes: u64) -> ClockCache<V> {
        let capacity = ((bytes as usize) / Self::ENTRY_BYTES).clamp(16, u32::MAX as usize);
        ClockCache {
            slots: Vec::with_capacity(capacity),
            index: HashTable::with_capacity(capacity),
            capacity,
            hand: 0,
            owners: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Memory in use: the slots filled, and the index as allocated.
    pub fn bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Slot<V>>() + self.index.capacity() * 5
    }

    /// Entries `owner` holds.
    pub fn owned_by(&self, owner: i64) -> usize {
        self.owners.get(&owner).copied().unwrap_or(0) as usize
    }

    fn find(&self, k: &DidKey) -> Option<usize> {
        self.index.find(hash_of(k), |&i| self.slots[i as usize].key == *k).map(|&i| i as usize)
    }

    pub fn contains(&self, k: &DidKey) -> bool {
        self.find(k).is_some()
    }

    /// The value, marked used.
    pub fn get(&mut self, k: &DidKey) -> Option<V> {
        let i = self.find(k)?;
        self.slots[i].used = true;
        Some(self.slots[i].value)
    }

    /// The value, not marked used (a peek).
    pub fn peek(&self, k: &DidKey) -> Option<V> {
        self.find(k).map(|i| self.slots[i].value)
    }

    /// Change the value of an entry that is there; false if it is not.
    pub fn update(&mut self, k: &DidKey, f: impl FnOnce(&mut V)) -> bool {
        let Some(i) = self.find(k) else { return false };
        f(&mut self.slots[i].value);
        true
    }

    /// Insert or replace; the slot of the least recently used entry (by
    /// CLOCK) is taken when full.
    pub fn put(&mut self, k: DidKey, v: V, owner: i64) {
        if let Some(i) = self.find(&k) {
            let s = &mut self.slots[i];
            s.value = v;
            s.used = true;
            return;
        }
        let slot = Slot { key: k, value: v, owner, used: false };
        let i = if self.slots.len() < self.capacity {
            self.slots.push(slot);
            self.slots.len() - 1
        } else {
            let victim = self.victim();
            self.forget(victim);
            self.slots[victim] = slot;
            victim
        };
        *self.owners.entry(owner).or_default() += 1;
        let slots = &self.slots;
        self.index.insert_unique(hash_of(&k), i as u32, |&j| hash_of(&slots[j as usize].key));
    }

    pub fn remove(&mut self, k: &DidKey) {
        let Some(i) = self.find(k) else { return };
        self.forget(i);
        // Keep the array dense: the last slot moves into the hole.
        let last = self.slots.len() - 1;
        if i != last {
            let moved = self.slots[last];
            if let Ok(e) = self.index.find_entry(hash_of(&moved.key), |&j| j as usize == last) {
                e.remove();
            }
            self.slots[i] = moved;
            let slots = &self.slots;
            self.index.insert_unique(hash_of(&moved.key), i as u32, |&j| hash_of(&slots[j as usize].key));
        }
        self.slots.pop();
        if self.hand >= self.slots.len() {
            self.hand = 0;
        }
    }

    pub fn clear(&mut self) {
        self.slots.clear();
        self.index.clear();
        self.owners.clear();
        self.hand = 0;
    }

    /// A new capacity (a reload): a smaller one evicts, by CLOCK, down to it.
    pub fn set_capacity_bytes(&mut self, bytes: u64) {
        let capacity = ((bytes as usize) / Self::ENTRY_BYTES).clamp(16, u32::MAX as usize);
        while self.slots.len() > capacity {
            let v = self.victim();
            let k = self.slots[v].key;
            self.remove(&k);
        }
        self.capacity = capacity;
        if self.index.capacity() < capacity {
            let slots = &self.slots;
            self.index.reserve(capacity - self.index.len(), |&j| hash_of(&slots[j as usize].key));
        }
    }

    /// The slot the hand evicts: the first not used since it last passed
    /// (at most two turns of the hand).
    fn victim(&mut self) -> usize {
        loop {
            let i = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            if std::mem::take(&mut self.slots[i].used) {
                continue;
            }
            return i;
        }
    }

    /// Drop slot `i` from the index and its owner's count (the slot is
    /// then reused or removed).
    fn forget(&mut self, i: usize) {
        let s = self.slots[i];
        if let Ok(e) = self.index.find_entry(hash_of(&s.key), |&j| j as usize == i) {
            e.remove();
        }
        if let Some(n) = self.owners.get_mut(&s.owner) {
            *n -= 1;
            if *n == 0 {
                self.owners.remove(&s.owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> DidKey {
        let mut k = [0u8; 16];
        k[0] = 1;
        let h = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64);
        k[1..9].copy_from_slice(&h.to_le_bytes());
        k[9..13].copy_from_slice(&i.to_le_bytes());
        DidKey(k)
    }

    #[test]
    fn get_put_update_remove_and_clock_eviction() {
        let mut c: ClockCache<u64> = ClockCache::with_bytes(64 * ClockCache::<u64>::ENTRY_BYTES as u64);
        let cap = c.capacity();
        assert_eq!(cap, 64);
        for i in 0..cap as u32 {
            c.put(key(i), i as u64, (i % 3) as i64);
        }
        assert_eq!(c.len(), cap);
        // Keep the first ten in use while the rest churn: CLOCK keeps them.
        for round in 0..3u32 {
            for i in 0..10 {
                assert_eq!(c.get(&key(i)), Some(i as u64), "round {round}");
            }
            for i in 0..32 {
                let n = 1000 + round * 100 + i;
                c.put(key(n), n as u64, 7);
            }
        }
        for i in 0..10 {
            assert!(c.contains(&key(i)), "a used entry was evicted");
        }
        assert_eq!(c.len(), cap, "never above capacity");
        assert!(c.update(&key(0), |v| *v = 99));
        assert_eq!(c.peek(&key(0)), Some(99));
        assert!(!c.update(&key(5000), |v| *v = 1), "update does not insert");
        let counted: u32 = c.owners.values().sum();
        assert_eq!(counted as usize, c.len());
        c.remove(&key(0));
        assert!(!c.contains(&key(0)) && c.len() == cap - 1);
        for i in 1..10 {
            assert_eq!(c.get(&key(i)), Some(i as u64), "the slot that moved is found");
        }
        // Shrinking evicts down to the new capacity; growing keeps all.
        c.set_capacity_bytes(20 * ClockCache::<u64>::ENTRY_BYTES as u64);
        assert_eq!((c.len(), c.capacity()), (20, 20));
        let counted: u32 = c.owners.values().sum();
        assert_eq!(counted, 20);
        c.set_capacity_bytes(200 * ClockCache::<u64>::ENTRY_BYTES as u64);
        assert_eq!((c.len(), c.capacity()), (20, 200));
        for i in 0..150 {
            c.put(key(20_000 + i), 1, 0);
        }
        assert_eq!(c.len(), 170);
        c.clear();
        assert!(c.is_empty() && c.owned_by(0) == 0);
    }
}
