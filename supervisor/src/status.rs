//! The status page's data: once a second the supervisor writes
//! `data_dir/run/status.json` (write, then rename) from what it sees: the
//! control block, its view (rings, hosts by status), the shards' snapshots
//! (busiest hosts, consumers) and every process's recent errors. The
//! db-writer's query workers serve the file as `GET /status.json`; the
//! shards serve the page itself (`GET /`, `shard/src/status.html`).

use crate::metrics::View;
use crate::summary::Totals;
use serde_json::{json, Value};
use sluice_common::ipc::shm::{CollectionStat, ControlBlock, DropReason, WriterCounter};
use sluice_common::process::consumers::{read_snapshots, top_hosts};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub const WRITE_EVERY: Duration = Duration::from_secs(1);
/// Hosts and consumers listed by name on the page.
const HOSTS_SHOWN: usize = 25;
const CONSUMERS_SHOWN: usize = 25;
const ERRORS_SHOWN: usize = 20;

pub struct StatusWriter {
    last: Instant,
    /// Totals a few seconds back, for the rates.
    window: std::collections::VecDeque<(Instant, Totals)>,
}

impl Default for StatusWriter {
    fn default() -> Self {
        StatusWriter { last: Instant::now() - WRITE_EVERY, window: Default::default() }
    }
}

impl StatusWriter {
    /// Write the file if a second has passed.
    pub fn tick(&mut self, cb: &ControlBlock, view: &View) {
        if self.last.elapsed() < WRITE_EVERY {
            return;
        }
        self.last = Instant::now();
        let Some(run_dir) = view.run_dir.as_deref() else { return };
        let now = Totals::read(cb);
        self.window.push_back((Instant::now(), now));
        while self.window.len() > 6 {
            self.window.pop_front();
        }
        let body = self.build(cb, view, run_dir, now);
        let path = run_dir.join("status.json");
        if let Err(e) = sluice_common::process::runfile::write_whole(&path, body.to_string().as_bytes()) {
            tracing::debug!(path = %path.display(), error = %e, "status not written");
        }
    }

    fn build(&self, cb: &ControlBlock, view: &View, run_dir: &std::path::Path, now: Totals) -> Value {
        let (t0, first) = self.window.front().copied().unwrap_or((Instant::now(), now));
        let secs = t0.elapsed().as_secs_f64();
        let rate =
            |a: u64, b: u64| if secs > 0.0 { (a.saturating_sub(b) as f64 / secs * 10.0).round() / 10.0 } else { 0.0 };
        let n = cb.shard_count().load(Ordering::Relaxed) as usize;
        let snapshots = read_snapshots(run_dir, 10);
        let mut hosts = Vec::new();
        let mut consumers = Vec::new();
        for s in &snapshots {
            hosts.extend(s.hosts.iter().cloned());
            consumers.extend(s.consumers.iter().map(|c| s.consumer_json(c)));
        }
        let consumers_total = consumers.len();
        consumers.sort_by_key(|c| std::cmp::Reverse(c["lag"].as_i64().unwrap_or(0)));
        consumers.truncate(CONSUMERS_SHOWN);
        let (busiest, _) = top_hosts(hosts, HOSTS_SHOWN, "_other");
        let busiest: Vec<Value> = busiest.iter().map(host_json).collect();
        let shard_drops: serde_json::Map<String, Value> = DropReason::ALL
            .iter()
            .map(|r| {
                let total: u64 = (0..n).map(|k| cb.shard(k).drops[*r as usize].load(Ordering::Relaxed)).sum();
                (r.name().to_owned(), json!(total))
            })
            .collect();
        let w = |c| cb.writer_counter(c).load(Ordering::Relaxed);
        let cs = |c| cb.collection_stat(c).load(Ordering::Relaxed);
        let (errors, shed) = crate::recent::read_all(run_dir, ERRORS_SHOWN);
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "atMicros": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64),
            "seq": cb.committed().load(Ordering::Relaxed),
            "oldestSeq": cb.oldest().load(Ordering::Relaxed),
            "writerState": format!("{:?}", cb.writer_state()),
            "rates": {
                "eventsIn": rate(now.events_in, first.events_in),
                "relayed": rate(now.relayed, first.relayed),
                "framesOut": rate(now.frames_out, first.frames_out),
            },
            "hostsByStatus": view.hosts.iter().map(|(st, n)| (st.as_str().to_owned(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "hostsConnected": now.hosts_connected,
            "hosts": busiest,
            "drops": {
                "shard": shard_drops,
                "stateful": w(WriterCounter::Dropped),
                "duplicates": w(WriterCounter::Duplicates),
                "hostAccountLimit": w(WriterCounter::HostAccountLimit),
            },
            "consumersTotal": consumers_total,
            "consumers": consumers,
            "collections": {
                "collections": cs(CollectionStat::Collections),
                "pairs": cs(CollectionStat::Pairs),
                "checksWaiting": cs(CollectionStat::ChecksWaiting),
                "backfillPermille": cs(CollectionStat::BackfillPermille),
            },
            "rings": view.rings.iter().enumerate().map(|(k, (used, cap))| json!({"shard": k, "used": used, "capacity": cap})).collect::<Vec<_>>(),
            "errors": errors,
            "errorsShed": shed,
        })
    }
}

/// One host's row on the page (drops by reason, non-zero only).
fn host_json(h: &sluice_common::process::consumers::HostInfo) -> Value {
    let drops: serde_json::Map<String, Value> = h
        .drops
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .filter_map(|(i, n)| Some((DropReason::ALL.get(i)?.name().to_owned(), json!(n))))
        .collect();
    json!({"hostname": h.hostname, "connected": h.connected, "events": h.events,
               "dropped": h.dropped(), "drops": drops, "lastEventMicros": h.last_event_micros})
}
