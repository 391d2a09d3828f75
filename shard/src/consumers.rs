//! The shard as an operator sees it: its consumers (`sluice admin
//! consumers`, kept current by the consumer tasks) and its hosts' counts
//! ([`HostStats`], kept by the host tasks), written every
//! [`PUBLISH_EVERY`] to `data_dir/run/shard-K.json` by a helper thread (the
//! executor never touches the file system), read and merged by the
//! db-writer's admin endpoints and the supervisor's metrics.

pub use sluice_common::consumers::{snapshot_path, ConsumerInfo, HostInfo, Snapshot, HOSTS_PUBLISHED_MAX};
use sluice_common::shm::DropReason;
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

    pub fn snapshot(&self, shard: usize, committed: i64, hosts: &HostTable) -> Snapshot {
        let all = hosts.values().map(|h| h.info()).collect();
        let (hosts, other_hosts) = sluice_common::consumers::top_hosts(all, HOSTS_PUBLISHED_MAX, "_other");
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

/// The helper thread that writes snapshots (write to a temporary file,
/// then rename: readers never see half a file). One snapshot in flight at
/// most; a newer one waits for the next tick.
pub fn start_writer(path: PathBuf) -> std::io::Result<SyncSender<Snapshot>> {
    let (tx, rx) = sync_channel::<Snapshot>(1);
    std::thread::Builder::new().name("consumers".into()).spawn(move || {
        let tmp = path.with_extension("json.tmp");
        while let Ok(s) = rx.recv() {
            let body = serde_json::to_vec(&s).expect("snapshots serialise");
            if let Err(e) = std::fs::write(&tmp, body).and_then(|_| std::fs::rename(&tmp, &path)) {
                tracing::warn!(shard = s.shard, path = %path.display(), error = %e, "consumer list not written");
            }
        }
    })?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

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
