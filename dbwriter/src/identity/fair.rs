//! The queue of DIDs waiting for a directory request, fair between hosts:
//! one FIFO per host, served in turn, so a host with a hundred thousand
//! unknown accounts (or a flood of `#identity` events) cannot keep another
//! host's one lookup waiting behind it. Bounded by what the shards can ask
//! (each host's read-ahead window), and in all by [`FairQueue::len`]'s
//! caller.

use std::collections::{HashMap, VecDeque};

#[derive(Debug, Default)]
pub struct FairQueue {
    per_host: HashMap<i64, VecDeque<String>>,
    /// Hosts with something queued, in serving order.
    turn: VecDeque<i64>,
    len: usize,
}

impl FairQueue {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn host_queue(&mut self, host: i64) -> &mut VecDeque<String> {
        let q = self.per_host.entry(host).or_default();
        if q.is_empty() {
            self.turn.push_back(host);
        }
        q
    }

    /// Queue `did` for `host`, behind the host's others.
    pub fn push_back(&mut self, host: i64, did: String) {
        self.host_queue(host).push_back(did);
        self.len += 1;
    }

    /// Queue `did` for `host` ahead of the host's others (a request that
    /// must be made again).
    pub fn push_front(&mut self, host: i64, did: String) {
        self.host_queue(host).push_front(did);
        self.len += 1;
    }

    /// The DID [`FairQueue::pop`] would give, left in place.
    pub fn peek(&self) -> Option<&str> {
        let host = self.turn.front()?;
        self.per_host.get(host).and_then(|q| q.front()).map(String::as_str)
    }

    /// The next DID: the first of the host whose turn it is.
    pub fn pop(&mut self) -> Option<(i64, String)> {
        let host = self.turn.pop_front()?;
        let q = self.per_host.get_mut(&host).expect("a host in turn has a queue");
        let did = q.pop_front().expect("a host in turn has a DID queued");
        if q.is_empty() {
            self.per_host.remove(&host);
        } else {
            self.turn.push_back(host);
        }
        self.len -= 1;
        Some((host, did))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_take_turns_and_a_retry_goes_first() {
        let mut q = FairQueue::default();
        for i in 0..1000 {
            q.push_back(1, format!("big{i}"));
        }
        q.push_back(2, "small0".into());
        q.push_back(2, "small1".into());
        q.push_back(3, "other".into());
        assert_eq!(q.peek(), Some("big0"));
        let first: Vec<String> = (0..6).map(|_| q.pop().unwrap().1).collect();
        assert_eq!(first, ["big0", "small0", "other", "big1", "small1", "big2"]);
        q.push_front(1, "again".into());
        assert_eq!(q.pop().unwrap(), (1, "again".into()));
        assert_eq!(q.len(), 1000 - 3);
        while q.pop().is_some() {}
        assert!(q.is_empty() && q.per_host.is_empty() && q.turn.is_empty());
    }
}
