//! What each shard publishes about itself every second, written to
//! `data_dir/run/shard-K.json` (see the shard's `consumers` module): its
//! consumers, read by the db-writer's admin endpoints and the status page,
//! and its busiest hosts, read by the supervisor's per-host metrics.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConsumerInfo {
    pub remote: String,
    /// Unix seconds when the subscription began.
    pub since: u64,
    /// The `cursor` it asked for (None: live).
    pub cursor: Option<i64>,
    /// The last seq handed to it (0: none yet).
    pub last_seq: i64,
    pub frames: u64,
}

/// What a shard publishes.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub shard: usize,
    /// Unix seconds of the snapshot: a file of a dead shard goes stale.
    pub at: u64,
    /// The committed seq when taken (lag = committed - last_seq).
    pub committed: i64,
    pub consumers: Vec<ConsumerInfo>,
    /// The shard's hosts with the most events and drops, at most
    /// [`HOSTS_PUBLISHED_MAX`]; the rest summed in `other_hosts`.
    #[serde(default)]
    pub hosts: Vec<HostInfo>,
    #[serde(default)]
    pub other_hosts: Option<HostInfo>,
}

impl Snapshot {
    /// How far `c` is behind the committed seq when the snapshot was taken.
    pub fn lag(&self, c: &ConsumerInfo) -> i64 {
        if c.last_seq > 0 {
            self.committed - c.last_seq
        } else {
            self.committed
        }
    }

    /// One consumer as the admin API and the status page list it.
    pub fn consumer_json(&self, c: &ConsumerInfo) -> serde_json::Value {
        serde_json::json!({"shard": self.shard, "remote": c.remote, "since": c.since, "cursor": c.cursor,
                           "lastSeq": c.last_seq, "frames": c.frames, "lag": self.lag(c)})
    }
}

/// Hosts a shard lists by name in its snapshot.
pub const HOSTS_PUBLISHED_MAX: usize = 100;

/// One upstream host as its shard sees it (since the shard started).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HostInfo {
    pub hostname: String,
    pub connected: bool,
    /// Validated events written into the ring.
    pub events: u64,
    /// Events dropped, indexed by `shm::DropReason`.
    pub drops: Vec<u64>,
    /// Unix micros of the last validated event (0: none yet).
    pub last_event_micros: i64,
}

impl HostInfo {
    pub fn dropped(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Add `o`'s counts into this one (for the summed rest).
    pub fn absorb(&mut self, o: &HostInfo) {
        self.connected |= o.connected;
        self.events += o.events;
        if self.drops.len() < o.drops.len() {
            self.drops.resize(o.drops.len(), 0);
        }
        for (a, b) in self.drops.iter_mut().zip(&o.drops) {
            *a += b;
        }
        self.last_event_micros = self.last_event_micros.max(o.last_event_micros);
    }
}

/// Keep the `max` hosts with the most events and drops, by name; sum the
/// rest into one entry named `other`.
pub fn top_hosts(mut hosts: Vec<HostInfo>, max: usize, other: &str) -> (Vec<HostInfo>, Option<HostInfo>) {
    hosts.sort_by(|a, b| (b.events + b.dropped()).cmp(&(a.events + a.dropped())).then(a.hostname.cmp(&b.hostname)));
    if hosts.len() <= max {
        return (hosts, None);
    }
    let rest = hosts.split_off(max);
    let mut sum = HostInfo { hostname: other.to_owned(), ..HostInfo::default() };
    for h in &rest {
        sum.absorb(h);
    }
    (hosts, Some(sum))
}

pub fn snapshot_path(run_dir: &Path, shard: usize) -> PathBuf {
    run_dir.join(format!("shard-{shard}.json"))
}

/// Every fresh shard snapshot in `run_dir` (at most `stale_secs` old).
pub fn read_snapshots(run_dir: &Path, stale_secs: u64) -> Vec<Snapshot> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut out: Vec<Snapshot> = crate::process::runfile::read_json_files(run_dir, "shard-");
    out.retain(|s| now.saturating_sub(s.at) <= stale_secs);
    out.sort_by_key(|s| s.shard);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_hosts_keeps_the_busiest_and_sums_the_rest() {
        let h = |n: &str, events, drop| HostInfo {
            hostname: n.into(),
            events,
            drops: vec![drop, 1],
            last_event_micros: events as i64,
            connected: n == "c",
        };
        let (top, rest) = top_hosts(vec![h("a", 5, 0), h("b", 1, 0), h("c", 2, 9), h("d", 3, 0)], 2, "_other");
        assert_eq!(top.iter().map(|h| h.hostname.as_str()).collect::<Vec<_>>(), ["c", "a"]);
        let rest = rest.unwrap();
        assert_eq!(
            (rest.hostname.as_str(), rest.events, rest.drops.clone(), rest.last_event_micros),
            ("_other", 4, vec![0, 2], 3)
        );
        assert!(!rest.connected);
        assert!(top_hosts(vec![h("a", 1, 0)], 2, "_other").1.is_none());
    }
}
