//! The periodic summary: one INFO line every `log_summary_interval_s`
//! (default 60) with what an operator reading the journal wants at a
//! glance: events in and out per second over the interval, drops by
//! reason in it, hosts connected and offline, consumers, the committed seq.

use crate::metrics::View;
use sluice_common::ipc::shm::{ControlBlock, WriterCounter};
use sluice_common::process::host::HostStatus;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Relay-wide counters, summed over the shards, and the two gauges
/// (hosts connected, consumers).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub hosts_connected: u64,
    pub consumers: u64,
    pub events_in: u64,
    pub frames_out: u64,
    pub relayed: u64,
    pub dropped_shard: u64,
    pub dropped_stateful: u64,
    pub duplicates: u64,
    pub account_limit: u64,
    pub consumers_cut: u64,
}

impl Totals {
    pub fn read(cb: &ControlBlock) -> Totals {
        let n = cb.shard_count().load(Ordering::Relaxed) as usize;
        let mut t = Totals::default();
        for k in 0..n {
            let s = cb.shard(k);
            t.hosts_connected += s.hosts_connected.load(Ordering::Relaxed);
            t.consumers += s.consumers.load(Ordering::Relaxed);
            t.events_in += s.events_in.load(Ordering::Relaxed);
            t.frames_out += s.frames_out.load(Ordering::Relaxed);
            t.dropped_shard += s.dropped.load(Ordering::Relaxed);
            t.consumers_cut +=
                s.consumers_cut_lag.load(Ordering::Relaxed) + s.consumers_cut_unwritable.load(Ordering::Relaxed);
        }
        let w = |c| cb.writer_counter(c).load(Ordering::Relaxed);
        t.relayed = w(WriterCounter::Relayed);
        t.dropped_stateful = w(WriterCounter::Dropped);
        t.duplicates = w(WriterCounter::Duplicates);
        t.account_limit = w(WriterCounter::HostAccountLimit);
        t
    }
}

pub struct Summary {
    every: Duration,
    last: Instant,
    before: Totals,
}

impl Summary {
    pub fn new(every: Duration, cb: &ControlBlock) -> Summary {
        Summary { every, last: Instant::now(), before: Totals::read(cb) }
    }

    /// A new interval (a reload), counted from now.
    pub fn set_every(&mut self, every: Duration) {
        self.every = every;
    }

    /// Log the line if the interval has passed.
    pub fn tick(&mut self, cb: &ControlBlock, view: &View) {
        if self.every.is_zero() || self.last.elapsed() < self.every {
            return;
        }
        let secs = self.last.elapsed().as_secs_f64().max(0.001);
        let now = Totals::read(cb);
        // Counters restart with a child: a smaller value is a restart.
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let b = self.before;
        let status = |st: HostStatus| view.hosts.iter().find(|(s, _)| *s == st).map_or(0, |(_, n)| *n);
        tracing::info!(
            events_in_per_s = format!("{:.1}", d(now.events_in, b.events_in) as f64 / secs),
            relayed_per_s = format!("{:.1}", d(now.relayed, b.relayed) as f64 / secs),
            frames_out_per_s = format!("{:.1}", d(now.frames_out, b.frames_out) as f64 / secs),
            dropped_invalid = d(now.dropped_shard, b.dropped_shard),
            dropped_stateful = d(now.dropped_stateful, b.dropped_stateful),
            duplicates = d(now.duplicates, b.duplicates),
            dropped_account_limit = d(now.account_limit, b.account_limit),
            consumers_cut = d(now.consumers_cut, b.consumers_cut),
            hosts_connected = now.hosts_connected,
            hosts_offline = status(HostStatus::Offline),
            hosts_idle = status(HostStatus::Idle),
            consumers = now.consumers,
            seq = cb.committed().load(Ordering::Relaxed),
            interval_s = secs.round() as u64,
            "summary"
        );
        self.before = now;
        self.last = Instant::now();
    }
}
