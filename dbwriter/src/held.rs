//! Ring records held for accounts whose PDS is being asked about (see the
//! sequencer's `hold_and_ask`): a commit of an account stored inactive,
//! and the account's later events from that host behind it, in order.
//!
//! Held records are durable: each group commit writes the held lists that
//! changed in its round (`held_events`, in the same transaction as the
//! host cursors that passed them), and a db-writer that starts, or undoes
//! a round, reads them back. So a crash while an answer is due loses
//! nothing: the host's cursor may have passed them, but they are kept.
//! Bounded: [`HELD_PER_ACCOUNT_MAX`] records an account, [`HELD_BYTES_MAX`]
//! in all.

use sluice_common::ipc::ringrec::RingRecord;
use std::collections::{HashMap, HashSet};

/// Records held for accounts being asked about, in all and per account.
pub const HELD_BYTES_MAX: usize = 8 << 20;
pub const HELD_PER_ACCOUNT_MAX: usize = 32;

#[derive(Debug, Default)]
pub struct Held {
    by_did: HashMap<String, Vec<Vec<u8>>>,
    bytes: usize,
    /// DIDs whose list changed since the last [`Held::take_changed`].
    changed: HashSet<String>,
}

impl Held {
    /// The lists as stored (at start, or after an undone round).
    pub fn from_stored(by_did: HashMap<String, Vec<Vec<u8>>>) -> Held {
        let bytes = by_did.values().flatten().map(Vec::len).sum();
        Held { by_did, bytes, changed: HashSet::new() }
    }

    pub fn contains(&self, did: &str) -> bool {
        self.by_did.contains_key(did)
    }

    pub fn len_of(&self, did: &str) -> usize {
        self.by_did.get(did).map_or(0, Vec::len)
    }

    pub fn dids(&self) -> impl Iterator<Item = &String> {
        self.by_did.keys()
    }

    /// The host of `did`'s first held record.
    pub fn first_host(&self, did: &str) -> Option<i64> {
        self.by_did.get(did)?.first().and_then(|rec| match RingRecord::decode(rec) {
            Ok(RingRecord::Event(f)) => Some(f.host_id),
            _ => None,
        })
    }

    /// Is there room for `len` more bytes behind `did`?
    pub fn has_room(&self, did: &str, len: usize) -> bool {
        self.len_of(did) < HELD_PER_ACCOUNT_MAX && self.bytes + len <= HELD_BYTES_MAX
    }

    pub fn push(&mut self, did: &str, rec: Vec<u8>) {
        self.bytes += rec.len();
        self.by_did.entry(did.to_owned()).or_default().push(rec);
        self.changed.insert(did.to_owned());
    }

    /// Take `did`'s records out, in order.
    pub fn take(&mut self, did: &str) -> Vec<Vec<u8>> {
        let recs = self.by_did.remove(did).unwrap_or_default();
        self.bytes -= recs.iter().map(Vec::len).sum::<usize>();
        if !recs.is_empty() {
            self.changed.insert(did.to_owned());
        }
        recs
    }

    /// The lists that changed since the last call, as they are now (empty:
    /// released), for the round's commit.
    pub fn take_changed(&mut self) -> Vec<(String, Vec<Vec<u8>>)> {
        let changed = std::mem::take(&mut self.changed);
        changed
            .into_iter()
            .map(|d| (self.by_did.get(&d).cloned().unwrap_or_default(), d))
            .map(|(v, d)| (d, v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_keep_order_bytes_and_what_changed() {
        let mut h = Held::default();
        h.push("a", vec![1; 10]);
        h.push("a", vec![2; 10]);
        h.push("b", vec![3; 5]);
        assert_eq!((h.len_of("a"), h.bytes), (2, 25));
        let mut changed = h.take_changed();
        changed.sort();
        assert_eq!(changed, [("a".to_owned(), vec![vec![1; 10], vec![2; 10]]), ("b".to_owned(), vec![vec![3; 5]])]);
        assert!(h.take_changed().is_empty());
        assert_eq!(h.take("a"), [vec![1; 10], vec![2; 10]]);
        assert_eq!(h.take_changed(), [("a".to_owned(), Vec::<Vec<u8>>::new())], "released: written as empty");
        assert_eq!(h.bytes, 5);
        let h2 = Held::from_stored(HashMap::from([("c".to_owned(), vec![vec![0; 7]])]));
        assert!(h2.contains("c") && h2.bytes == 7 && h2.changed.is_empty());
        assert!(!h2.has_room("c", HELD_BYTES_MAX));
    }
}
