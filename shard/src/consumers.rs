//! The shard as an operator sees it: its consumers (`sluice admin
//! consumers`, kept current by the consumer tasks) and its hosts' counts
//! ([`HostStats`], kept by the host tasks), written every
//! [`PUBLISH_EVERY`] to `data_dir/run/shard-K.json` by a helper thread (the
//! executor never touches the file system), read and merged by the
//! db-writer's admin endpoints and the supervisor's metrics.

use sluice_common::ipc::shm::DropReason;
pub use sluice_common::process::consumers::{snapshot_path, ConsumerInfo, HostInfo, Snapshot, HOSTS_PUBLISHED_MAX};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::time::Duration;

pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// The live table (executor thread only).
#[derive(Default)]
pub struct Table {
    next_id: u64,
    live: BTreeMap<u64, ConsumerInfo>,
}

impl Table {
    pub fn add(&mut self, remote: Option<SocketAddr>, cursor: Option<i64>) -> u64 {
        self.next_id += 1;
        let info = ConsumerInfo {
            remote: remote.map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
            since: unix_now(),
            cursor,
            last_seq: 0,
            frames: 0,
        };
        self.live.insert(self.next_id, info);
        self.next_id
    }

    pub fn progress(&mut self, id: u64, last_seq: i64, frames: u64) {
        if let Some(c) = self.live.get_mut(&id) {
            c.last_seq = last_seq;
            c.frames += frames;
        }
    }

    pub fn remove(&mut self, id: u64) {
        self.live.remove(&id);
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    pub fn snapshot(&self, shard: usize, committed: i64, hosts: &HostTable) -> Snapshot {
        let (hosts, other_hosts) = busiest(hosts);
        Snapshot {
            shard,
            at: unix_now(),
            committed,
            consumers: self.live.values().cloned().collect(),
            hosts,
            other_hosts,
        }
    }
}

/// The [`HOSTS_PUBLISHED_MAX`] hosts with the most events and drops, and
/// the rest summed. Runs on the executor each second: only the listed
/// hosts are copied out (a shard may read thousands).
fn busiest(hosts: &HostTable) -> (Vec<HostInfo>, Option<HostInfo>) {
    // Weights computed once, not at every comparison; ties broken by
    // host id (most hosts tie at an idle moment).
    let mut all: Vec<(u64, i64, &HostStats)> = hosts.iter().map(|(id, h)| (h.weight(), *id, h.as_ref())).collect();
    let by_weight = |a: &(u64, i64, &HostStats), b: &(u64, i64, &HostStats)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
    if all.len() > HOSTS_PUBLISHED_MAX {
        all.select_nth_unstable_by(HOSTS_PUBLISHED_MAX, by_weight);
    }
    let rest = all.split_off(all.len().min(HOSTS_PUBLISHED_MAX));
    all.sort_unstable_by(by_weight);
    let other = (!rest.is_empty()).then(|| {
        let mut sum = HostInfo { hostname: "_other".into(), ..HostInfo::default() };
        for (_, _, h) in rest {
            h.add_to(&mut sum);
        }
        sum
    });
    (all.into_iter().map(|(_, _, h)| h.info()).collect(), other)
}

/// One host's counts while its task runs (executor thread only; a few
/// `Cell`s, no lookups per event).
pub struct HostStats {
    pub hostname: String,
    pub connected: Cell<bool>,
    events: Cell<u64>,
    drops: [Cell<u64>; DropReason::ALL.len()],
    last_event_micros: Cell<i64>,
}

/// Every running host task's counts, by `hosts.id`.
pub type HostTable = std::collections::HashMap<i64, std::rc::Rc<HostStats>>;

impl HostStats {
    pub fn new(hostname: &str) -> HostStats {
        HostStats {
            hostname: hostname.to_owned(),
            connected: Cell::new(false),
            events: Cell::new(0),
            drops: Default::default(),
            last_event_micros: Cell::new(0),
        }
    }

    pub fn event(&self, now_micros: i64) {
        self.events.set(self.events.get() + 1);
        self.last_event_micros.set(now_micros);
    }

    pub fn drop(&self, r: DropReason) {
        let c = &self.drops[r as usize];
        c.set(c.get() + 1);
    }

    /// What ranks a host among the busiest: events and drops.
    fn weight(&self) -> u64 {
        self.events.get() + self.drops.iter().map(Cell::get).sum::<u64>()
    }

    /// Add this host's counts into `sum` (the hosts not listed by name).
    fn add_to(&self, sum: &mut HostInfo) {
        sum.connected |= self.connected.get();
        sum.events += self.events.get();
        sum.drops.resize(self.drops.len(), 0);
        for (a, b) in sum.drops.iter_mut().zip(&self.drops) {
            *a += b.get();
        }
        sum.last_event_micros = sum.last_event_micros.max(self.last_event_micros.get());
    }

    pub fn info(&self) -> HostInfo {
        HostInfo {
            hostname: self.hostname.clone(),
            connected: self.connected.get(),
            events: self.events.get(),
            drops: self.drops.iter().map(Cell::get).collect(),
            last_event_micros: self.last_event_micros.get(),
        }
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Consumers that must have left (since the most there were) before the
/// writer gives the freed heap back ([`sluice_common::process::heap::give_back`]).
pub const LEFT_BEFORE_GIVE_BACK: usize = 32;

/// Whether the heap should be given back now that `now` consumers are
/// left of the `peak` since the last give-back (`peak` follows).
fn give_back_due(peak: &mut usize, now: usize) -> bool {
    *peak = (*peak).max(now);
    let due = *peak - now >= LEFT_BEFORE_GIVE_BACK || (now == 0 && *peak > 0);
    if due {
        *peak = now;
    }
    due
}

/// The helper thread that writes snapshots (write to a temporary file,
/// then rename: readers never see half a file). One snapshot in flight at
/// most; a newer one waits for the next tick. When consumers left, it
/// also gives the heap they freed back to the kernel (here, off the
/// executor: glibc walks every arena for that).
pub fn start_writer(path: PathBuf) -> std::io::Result<SyncSender<Snapshot>> {
    let (tx, rx) = sync_channel::<Snapshot>(1);
    std::thread::Builder::new().name("consumers".into()).spawn(move || {
        let mut peak = 0;
        while let Ok(s) = rx.recv() {
            let body = serde_json::to_vec(&s).expect("snapshots serialise");
            if let Err(e) = sluice_common::process::runfile::write_whole(&path, &body) {
                tracing::warn!(shard = s.shard, path = %path.display(), error = %e, "consumer list not written");
            }
            if give_back_due(&mut peak, s.consumers.len()) {
                drop((s, body));
                sluice_common::process::heap::give_back();
            }
        }
    })?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busiest_hosts_are_listed_and_the_rest_summed() {
        let mut hosts = HostTable::new();
        for i in 0..(HOSTS_PUBLISHED_MAX as i64 + 3) {
            let h = HostStats::new(&format!("h{i:03}"));
            for _ in 0..i {
                h.event(i);
            }
            h.drop(DropReason::BadSignature);
            hosts.insert(i, std::rc::Rc::new(h));
        }
        let (top, rest) = busiest(&hosts);
        assert_eq!(top.len(), HOSTS_PUBLISHED_MAX);
        assert_eq!(top[0].hostname, format!("h{:03}", HOSTS_PUBLISHED_MAX + 2));
        let rest = rest.unwrap();
        // h000, h001, h002: 0 + 1 + 2 events, a drop each.
        assert_eq!((rest.hostname.as_str(), rest.events, rest.dropped(), rest.last_event_micros), ("_other", 3, 3, 2));
        assert!(busiest(&HostTable::new()).1.is_none());
    }

    #[test]
    fn the_heap_is_given_back_once_consumers_left() {
        let mut peak = 0;
        assert!(!give_back_due(&mut peak, 0), "nobody came");
        assert!(!give_back_due(&mut peak, 500));
        assert!(!give_back_due(&mut peak, 500 - LEFT_BEFORE_GIVE_BACK + 1), "a few left");
        assert!(give_back_due(&mut peak, 500 - LEFT_BEFORE_GIVE_BACK), "enough left");
        assert!(!give_back_due(&mut peak, 500 - LEFT_BEFORE_GIVE_BACK), "once");
        assert!(!give_back_due(&mut peak, 600));
        assert!(give_back_due(&mut peak, 0), "the last left");
        assert!(!give_back_due(&mut peak, 0));
    }

    #[test]
    fn table_tracks_consumers_and_snapshots_are_written_whole() {
        let mut t = Table::default();
        let a = t.add(Some("127.0.0.1:5000".parse().unwrap()), Some(7));
        let b = t.add(None, None);
        t.progress(a, 42, 35);
        t.progress(a, 50, 8);
        t.remove(b);
        t.progress(b, 1, 1); // gone: ignored
        let hosts = HostTable::new();
        let s = t.snapshot(3, 60, &hosts);
        assert_eq!(s.consumers.len(), 1);
        assert_eq!((s.consumers[0].last_seq, s.consumers[0].frames, s.consumers[0].cursor), (50, 43, Some(7)));
        let dir = tempfile::tempdir().unwrap();
        let path = snapshot_path(dir.path(), 3);
        let tx = start_writer(path.clone()).unwrap();
        tx.send(s).unwrap();
        let t0 = std::time::Instant::now();
        while !path.exists() {
            assert!(t0.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(10));
        }
        let back: Snapshot = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!((back.shard, back.committed, back.consumers[0].remote.as_str()), (3, 60, "127.0.0.1:5000"));
    }
}
