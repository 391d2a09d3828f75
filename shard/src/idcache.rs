//! The shard's identity cache: what validation needs of each DID's
//! document (its key, which PDS it names, how recent it is) in about 120
//! bytes an entry, however many entries, with a capacity in bytes.
//!
//! An entry is a slot of a [`ClockCache`] (fixed size, no allocation of
//! its own, CLOCK eviction): the DID as a [`DidKey`] (16 bytes, keyed by a
//! secret of this process), the key as a [`CompactKey`] (65 bytes), the
//! PDS as a keyed hash of its host name (compared with the host's own),
//! the document's `as_of`. A host may hold at most half the cache
//! ([`IdCache::insert`] refuses beyond): one host's accounts cannot push
//! every other host's out.

use sluice_common::atproto::crypto::CompactKey;
use sluice_common::atproto::did::{DidHashKey, DidKey};
use sluice_common::process::clockcache::ClockCache;

/// What the cache holds of a DID's document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub key: Option<CompactKey>,
    /// [`IdCache::pds_hash`] of the PDS host the document names (0: none).
    pub pds: u64,
    /// The document is known current at this time (unix micros).
    pub as_of_micros: i64,
}

pub struct IdCache {
    cache: ClockCache<Entry>,
    did_key: DidHashKey,
}

impl IdCache {
    /// Bytes one entry takes, all counted.
    pub const ENTRY_BYTES: usize = ClockCache::<Entry>::ENTRY_BYTES;

    /// A cache of at most `bytes`.
    pub fn new(bytes: u64) -> IdCache {
        IdCache { cache: ClockCache::with_bytes(bytes), did_key: DidHashKey::random() }
    }

    pub fn key(&self, did: &str) -> DidKey {
        DidKey::new(did, &self.did_key)
    }

    /// A PDS host name (`PdsHost::name`) as entries hold it (never 0).
    pub fn pds_hash(&self, host_name: &str) -> u64 {
        use std::hash::Hasher;
        #[allow(deprecated)]
        let mut h = std::hash::SipHasher::new_with_keys(self.did_key.0[1], self.did_key.0[3]);
        h.write(host_name.as_bytes());
        h.finish().max(1)
    }

    /// A new size (a reload): entries beyond it are evicted now.
    pub fn set_capacity_bytes(&mut self, bytes: u64) {
        self.cache.set_capacity_bytes(bytes);
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// Memory in use (entries stored, and the index as allocated).
    pub fn bytes(&self) -> usize {
        self.cache.bytes()
    }

    pub fn get(&mut self, k: &DidKey) -> Option<Entry> {
        self.cache.get(k)
    }

    /// Replace an entry that is there, if `e` is at least as recent (a
    /// change the identity service pushed). False if it is not there.
    pub fn update(&mut self, k: &DidKey, e: Entry) -> bool {
        self.cache.update(k, |v| {
            if e.as_of_micros >= v.as_of_micros {
                *v = e;
            }
        })
    }

    /// A host may hold at most this many entries.
    pub fn share(&self) -> usize {
        (self.capacity() / 2).max(1)
    }

    /// Insert or replace `k`'s entry, brought by `owner`. False (nothing
    /// stored) when the DID is new and its host holds its share already.
    pub fn insert(&mut self, k: DidKey, e: Entry, owner: i64) -> bool {
        if self.update(&k, e) {
            let _ = self.cache.get(&k);
            return true;
        }
        if self.cache.owned_by(owner) >= self.share() {
            return false;
        }
        self.cache.put(k, e, owner);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn did(i: u32) -> String {
        // 24 base32 characters from the number.
        let a = b"abcdefghijklmnopqrstuvwxyz234567";
        let mut x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let id: String = (0..24)
            .map(|_| {
                let c = a[(x & 31) as usize] as char;
                x = x.rotate_right(5) ^ (i as u64);
                c
            })
            .collect();
        format!("did:plc:{id}")
    }

    fn entry(t: i64) -> Entry {
        Entry { key: None, pds: 7, as_of_micros: t }
    }

    #[test]
    fn small_entries_and_a_byte_capacity() {
        const { assert!(IdCache::ENTRY_BYTES <= 128, "an entry over 128 bytes") };
        let c = IdCache::new(1 << 20);
        assert_eq!(c.capacity(), (1 << 20) / IdCache::ENTRY_BYTES);
    }

    #[test]
    fn get_insert_update_and_clock_eviction() {
        let mut c = IdCache::new(64 * IdCache::ENTRY_BYTES as u64);
        let cap = c.capacity();
        let keys: Vec<DidKey> = (0..cap as u32 * 3).map(|i| c.key(&did(i))).collect();
        for (i, k) in keys.iter().take(cap).enumerate() {
            assert!(c.insert(*k, entry(i as i64), (i % 3) as i64));
        }
        assert_eq!(c.len(), cap);
        // Keep the first ten in use while the rest churn: CLOCK keeps them.
        for round in 0..2 {
            for k in &keys[..10] {
                assert!(c.get(k).is_some(), "round {round}");
            }
            for (i, k) in keys[cap + round * cap / 2..cap + (round + 1) * cap / 2].iter().enumerate() {
                assert!(c.insert(*k, entry(i as i64), (i % 3) as i64));
            }
        }
        for k in &keys[..10] {
            assert!(c.get(k).is_some(), "a used entry was evicted");
        }
        assert_eq!(c.len(), cap, "never above capacity");
        // Only newer documents replace an entry.
        let k = keys[0];
        assert!(c.update(&k, entry(1_000)));
        assert!(c.update(&k, entry(5)));
        assert_eq!(c.get(&k).unwrap().as_of_micros, 1_000);
        assert!(!c.update(&keys[cap * 3 - 1], entry(1)), "update does not insert");
    }

    #[test]
    fn a_host_holds_at_most_half() {
        let mut c = IdCache::new(100 * IdCache::ENTRY_BYTES as u64);
        let share = c.share();
        let mut stored = 0;
        for i in 0..c.capacity() as u32 {
            let k = c.key(&did(i));
            stored += c.insert(k, entry(0), 1) as usize;
        }
        assert_eq!(stored, share);
        // Another host still finds room, and an entry the first holds
        // already can be refreshed.
        let k = c.key(&did(1_000_000));
        assert!(c.insert(k, entry(0), 2));
        let k0 = c.key(&did(0));
        assert!(c.insert(k0, entry(9), 1));
        assert_eq!(c.get(&k0).unwrap().as_of_micros, 9);
    }
}
