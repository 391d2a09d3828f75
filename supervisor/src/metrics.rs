//! Prometheus text exposition on `metrics_listen` (default
//! 127.0.0.1:2471), served by the supervisor from the shared control block:
//! per-shard counters, the db-writer's counters, ring fill, watermarks.
//! One small blocking thread; a request gets the whole page.

use sluice_common::ipc::shm::{
    CollectionStat, ControlBlock, DropReason, Hist, IdentityStat, UpstreamClose, WriterCounter,
};
use sluice_common::process::consumers::{read_snapshots, top_hosts, HostInfo};
use sluice_common::process::host::HostStatus;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// What only the supervisor knows, refreshed by its loop.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Ring fill: (used, capacity) per shard.
    pub rings: Vec<(u64, u64)>,
    /// Hosts per status, as of the last host poll.
    pub hosts: Vec<(HostStatus, u64)>,
    /// The relay's processes: (name, pid).
    pub procs: Vec<(String, u32)>,
    /// `data_dir/run`, where the shards publish their snapshots (per-host
    /// series); None: no per-host series.
    pub run_dir: Option<std::path::PathBuf>,
}

pub type SharedView = Arc<std::sync::Mutex<View>>;

/// Hosts named in the per-host series, relay-wide; the rest are summed as
/// `host="_other"` (a relay may read 10,000 hosts).
pub const HOST_SERIES_MAX: usize = 50;
/// A shard snapshot older than this is a stopped shard's.
const SNAPSHOT_STALE_SECS: u64 = 10;

/// One metric family: HELP, TYPE and its samples (`labels` include the
/// braces, or are empty).
fn family(out: &mut String, name: &str, help: &str, kind: &str, values: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in values {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

fn one(v: u64) -> [(String, u64); 1] {
    [(String::new(), v)]
}

/// A label value, escaped as the exposition format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub fn render(cb: &ControlBlock, view: &View) -> String {
    let mut out = String::with_capacity(16 * 1024);
    relay(&mut out, cb);
    shards(&mut out, cb);
    histograms(&mut out, cb);
    hosts(&mut out, view);
    rings(&mut out, view);
    processes(&mut out, view);
    out
}

fn relay(out: &mut String, cb: &ControlBlock) {
    family(
        out,
        "sluice_committed_seq",
        "Highest durable relay seq.",
        "gauge",
        &one(cb.committed().load(Ordering::Relaxed)),
    );
    family(
        out,
        "sluice_oldest_seq",
        "Lowest relay seq still in the event log.",
        "gauge",
        &one(cb.oldest().load(Ordering::Relaxed)),
    );
    family(
        out,
        "sluice_disk_full",
        "1 while intake is paused because the event log or Postgres is out of space.",
        "gauge",
        &one(u64::from(cb.writer_state() == sluice_common::ipc::shm::WriterState::DiskFull)),
    );
    for c in WriterCounter::ALL {
        let (name, help) = c.describe();
        family(out, name, help, "counter", &one(cb.writer_counter(c).load(Ordering::Relaxed)));
    }
    labelled(out, &IdentityStat::ALL.map(|s| (s.describe(), cb.identity_stat(s).load(Ordering::Relaxed))));
    labelled(out, &CollectionStat::ALL.map(|s| (s.describe(), cb.collection_stat(s).load(Ordering::Relaxed))));
}

/// A stat's (name, labels, help, gauge).
type Described = (&'static str, &'static str, &'static str, bool);

/// A service's counters and gauges, as (name, labels, help, gauge) and
/// value; neighbours that share a name are one family with a label each.
fn labelled(out: &mut String, stats: &[(Described, u64)]) {
    let mut i = 0;
    while i < stats.len() {
        let ((name, _, help, gauge), _) = stats[i];
        let mut values = Vec::new();
        while let Some(((_, labels, _, _), v)) = stats.get(i).filter(|s| s.0 .0 == name) {
            values.push((labels.to_string(), *v));
            i += 1;
        }
        family(out, name, help, if gauge { "gauge" } else { "counter" }, &values);
    }
}

/// A per-shard counter or gauge: name, help, kind, and how to read it.
type Field = fn(&sluice_common::ipc::shm::ShardSlot<'_>) -> u64;

const PER_SHARD: [(&str, &str, &str, Field); 14] = [
    (
        "sluice_shard_stalls_total",
        "Times a shard's task queue ran 10 ms past its budget (a bug: shard code must not block).",
        "counter",
        |s| s.stalls.load(Ordering::Relaxed),
    ),
    ("sluice_shard_hosts_connected", "Upstream hosts connected.", "gauge", |s| {
        s.hosts_connected.load(Ordering::Relaxed)
    }),
    ("sluice_shard_consumers", "Consumers subscribed.", "gauge", |s| s.consumers.load(Ordering::Relaxed)),
    ("sluice_shard_events_in_total", "Validated events written into the ring.", "counter", |s| {
        s.events_in.load(Ordering::Relaxed)
    }),
    ("sluice_shard_frames_out_total", "Frames sent to consumers.", "counter", |s| s.frames_out.load(Ordering::Relaxed)),
    ("sluice_shard_bytes_out_total", "Bytes of frames sent to consumers.", "counter", |s| {
        s.bytes_out.load(Ordering::Relaxed)
    }),
    (
        "sluice_shard_consumers_cut_lag_total",
        "Consumers cut for lagging past consumer_lag_events_max.",
        "counter",
        |s| s.consumers_cut_lag.load(Ordering::Relaxed),
    ),
    (
        "sluice_shard_consumers_cut_unwritable_total",
        "Consumers cut because their socket took nothing for consumer_write_timeout_s.",
        "counter",
        |s| s.consumers_cut_unwritable.load(Ordering::Relaxed),
    ),
    (
        "sluice_shard_events_dropped_total",
        "Upstream events or frames dropped by the stateless checks, and connection faults.",
        "counter",
        |s| s.dropped.load(Ordering::Relaxed),
    ),
    ("sluice_identity_cache_hits_total", "Events whose DID the shard's identity cache held.", "counter", |s| {
        s.identity_hits.load(Ordering::Relaxed)
    }),
    (
        "sluice_identity_cache_misses_total",
        "Events whose DID the shard's identity cache lacked (asked of the identity service).",
        "counter",
        |s| s.identity_misses.load(Ordering::Relaxed),
    ),
    ("sluice_identity_cache_entries", "Identities in the shard's cache.", "gauge", |s| {
        s.identity_cache_entries.load(Ordering::Relaxed)
    }),
    ("sluice_identity_cache_bytes", "Memory the shard's identity cache takes.", "gauge", |s| {
        s.identity_cache_bytes.load(Ordering::Relaxed)
    }),
    (
        "sluice_upstream_window_frames",
        "Frames read and waiting behind an identity lookup to enter the ring in their host's order.",
        "gauge",
        |s| s.window_frames.load(Ordering::Relaxed),
    ),
];

fn shards(out: &mut String, cb: &ControlBlock) {
    let n = cb.shard_count().load(Ordering::Relaxed) as usize;
    for (name, help, kind, field) in PER_SHARD {
        let values: Vec<(String, u64)> = (0..n).map(|k| (format!("{{shard=\"{k}\"}}"), field(&cb.shard(k)))).collect();
        family(out, name, help, kind, &values);
    }
    shard_reasons(out, cb, n);
}

/// Drops and upstream closes, per shard and reason.
fn shard_reasons(out: &mut String, cb: &ControlBlock, n: usize) {
    let by_reason =
        |f: &dyn Fn(&sluice_common::ipc::shm::ShardSlot<'_>, usize) -> u64, names: &[&str]| -> Vec<(String, u64)> {
            (0..n)
                .flat_map(|k| {
                    let slot = cb.shard(k);
                    names
                        .iter()
                        .enumerate()
                        .map(|(i, r)| (format!("{{shard=\"{k}\",reason=\"{r}\"}}"), f(&slot, i)))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
    let drop_names: Vec<&str> = DropReason::ALL.iter().map(|r| r.name()).collect();
    family(
        out,
        "sluice_shard_drops_total",
        "Upstream events dropped by the stateless checks, by reason (the connection stays up).",
        "counter",
        &by_reason(&|s, i| s.drops[i].load(Ordering::Relaxed), &drop_names),
    );
    let close_names: Vec<&str> = UpstreamClose::ALL.iter().map(|r| r.name()).collect();
    family(
        out,
        "sluice_shard_upstream_closes_total",
        "Upstream connections ended (or never established), by reason.",
        "counter",
        &by_reason(&|s, i| s.upstream_closes[i].load(Ordering::Relaxed), &close_names),
    );
}

fn histograms(out: &mut String, cb: &ControlBlock) {
    for h in Hist::ALL {
        let (name, help, micros) = h.describe();
        let g = cb.histogram(h);
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let scale = |v: u64| if micros { format!("{}", v as f64 / 1e6) } else { v.to_string() };
        let cumulative = g.cumulative();
        for (b, c) in h.bounds().iter().zip(&cumulative) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {c}", scale(*b));
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", cumulative.last().copied().unwrap_or(0));
        let _ = writeln!(out, "{name}_sum {}", scale(g.sum.load(Ordering::Relaxed)));
        let _ = writeln!(out, "{name}_count {}", g.count.load(Ordering::Relaxed));
    }
}

/// Hosts by status, and the busiest [`HOST_SERIES_MAX`] hosts by name
/// from the shards' snapshots (the rest as `_other`).
fn hosts(out: &mut String, view: &View) {
    let hosts: Vec<(String, u64)> =
        view.hosts.iter().map(|(st, n)| (format!("{{status=\"{}\"}}", st.as_str()), *n)).collect();
    family(out, "sluice_hosts", "Upstream hosts known, by status (active, offline, idle, banned).", "gauge", &hosts);
    let snapshots = view.run_dir.as_deref().map(|d| read_snapshots(d, SNAPSHOT_STALE_SECS)).unwrap_or_default();
    let mut all: Vec<HostInfo> = Vec::new();
    let mut other = HostInfo { hostname: "_other".into(), ..HostInfo::default() };
    for s in snapshots {
        all.extend(s.hosts);
        if let Some(o) = &s.other_hosts {
            other.absorb(o);
        }
    }
    let (mut named, rest) = top_hosts(all, HOST_SERIES_MAX, "_other");
    if let Some(r) = &rest {
        other.absorb(r);
    }
    if other.events > 0 || other.dropped() > 0 || rest.is_some() {
        named.push(other);
    }
    let per = |f: &dyn Fn(&HostInfo) -> u64| -> Vec<(String, u64)> {
        named.iter().map(|h| (format!("{{host=\"{}\"}}", label(&h.hostname)), f(h))).collect()
    };
    family(
        out,
        "sluice_host_events_total",
        "Validated events per host (busiest hosts; the rest as _other).",
        "counter",
        &per(&|h| h.events),
    );
    family(
        out,
        "sluice_host_connected",
        "1 while the host's connection is up (_other: any of the rest).",
        "gauge",
        &per(&|h| u64::from(h.connected)),
    );
    family(
        out,
        "sluice_host_last_event_timestamp_seconds",
        "Unix time of the host's last validated event (0: none since its shard started).",
        "gauge",
        &per(&|h| (h.last_event_micros / 1_000_000).max(0) as u64),
    );
    let drops: Vec<(String, u64)> = named
        .iter()
        .flat_map(|h| {
            DropReason::ALL.iter().map(|r| {
                let n = h.drops.get(*r as usize).copied().unwrap_or(0);
                (format!("{{host=\"{}\",reason=\"{}\"}}", label(&h.hostname), r.name()), n)
            })
        })
        .collect();
    family(
        out,
        "sluice_host_drops_total",
        "Events dropped per host and reason (busiest hosts; the rest as _other).",
        "counter",
        &drops,
    );
}

fn rings(out: &mut String, view: &View) {
    let fill: Vec<(String, u64)> =
        view.rings.iter().enumerate().map(|(k, r)| (format!("{{shard=\"{k}\"}}"), r.0)).collect();
    family(out, "sluice_ring_used_bytes", "Bytes in the shard's ring not yet committed.", "gauge", &fill);
    let cap: Vec<(String, u64)> =
        view.rings.iter().enumerate().map(|(k, r)| (format!("{{shard=\"{k}\"}}"), r.1)).collect();
    family(out, "sluice_ring_capacity_bytes", "Ring capacity.", "gauge", &cap);
}

/// RSS, descriptors, threads and CPU of each of the relay's processes.
fn processes(out: &mut String, view: &View) {
    let stats: Vec<(String, crate::procstat::ProcStat)> =
        view.procs.iter().filter_map(|(name, pid)| Some((name.clone(), crate::procstat::read(*pid)?))).collect();
    let per = |f: &dyn Fn(&crate::procstat::ProcStat) -> u64| -> Vec<(String, u64)> {
        stats.iter().map(|(n, s)| (format!("{{process=\"{n}\"}}"), f(s))).collect()
    };
    family(
        out,
        "sluice_process_resident_memory_bytes",
        "Resident memory per process.",
        "gauge",
        &per(&|s| s.rss_bytes),
    );
    family(out, "sluice_process_open_fds", "Open file descriptors per process.", "gauge", &per(&|s| s.fds));
    family(out, "sluice_process_threads", "Threads per process.", "gauge", &per(&|s| s.threads));
    let cpu: Vec<String> = stats
        .iter()
        .map(|(n, s)| format!("sluice_process_cpu_seconds_total{{process=\"{n}\"}} {:.2}", s.cpu_seconds))
        .collect();
    let _ = writeln!(out, "# HELP sluice_process_cpu_seconds_total CPU time (user and system) per process.\n# TYPE sluice_process_cpu_seconds_total counter");
    for l in cpu {
        let _ = writeln!(out, "{l}");
    }
}

/// The running endpoint; [`Endpoint::stop`] ends it (SIGHUP with a new
/// `metrics_listen`).
pub struct Endpoint {
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Endpoint {
    /// Stop serving and free the address: set the flag, then wake the
    /// blocked accept with a connection of our own.
    pub fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// Serve on `addr` until stopped or the process ends. A bind failure is
/// logged, not fatal (None).
pub fn start(addr: SocketAddr, cb: Arc<ControlBlock>, view: SharedView) -> Option<Endpoint> {
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "metrics endpoint not started");
            return None;
        }
    };
    let addr = listener.local_addr().unwrap_or(addr);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let spawned = std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for s in listener.incoming() {
            if stopped.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 2048];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                let view = view.lock().map(|v| v.clone()).unwrap_or_default();
                ("200 OK", render(&cb, &view))
            } else {
                ("404 Not Found", "not found\n".to_owned())
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    match spawned {
        Ok(_) => Some(Endpoint { addr, stop }),
        Err(e) => {
            tracing::warn!(error = %e, "metrics thread not started");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_has_every_metric_with_help_type_and_per_shard_values() {
        let cb = ControlBlock::create().unwrap();
        cb.shard_count().store(2, Ordering::Relaxed);
        cb.shard(1).hosts_connected.store(7, Ordering::Relaxed);
        cb.shard(0).frames_out.store(42, Ordering::Relaxed);
        cb.committed().store(9, Ordering::Relaxed);
        let view = View {
            rings: vec![(1, 10), (2, 10)],
            hosts: vec![(HostStatus::Active, 3), (HostStatus::Offline, 1)],
            procs: vec![("supervisor".into(), std::process::id())],
            run_dir: None,
        };
        cb.histogram(Hist::GroupCommit).observe(300);
        let page = render(&cb, &view);
        for line in [
            "# TYPE sluice_committed_seq gauge",
            "sluice_committed_seq 9",
            "# HELP sluice_shard_hosts_connected Upstream hosts connected.",
            "# TYPE sluice_shard_hosts_connected gauge",
            "sluice_shard_hosts_connected{shard=\"0\"} 0",
            "sluice_shard_hosts_connected{shard=\"1\"} 7",
            "# TYPE sluice_shard_frames_out_total counter",
            "sluice_shard_frames_out_total{shard=\"0\"} 42",
            "sluice_shard_events_dropped_total{shard=\"1\"} 0",
            "sluice_shard_consumers{shard=\"1\"} 0",
            "sluice_shard_events_in_total{shard=\"0\"} 0",
            "sluice_ring_used_bytes{shard=\"1\"} 2",
            "sluice_group_commits_total 0",
            "sluice_hosts{status=\"offline\"} 1",
            "# TYPE sluice_group_commit_seconds histogram",
            "sluice_group_commit_seconds_bucket{le=\"0.00025\"} 0",
            "sluice_group_commit_seconds_bucket{le=\"0.0005\"} 1",
            "sluice_group_commit_seconds_bucket{le=\"+Inf\"} 1",
            "sluice_group_commit_seconds_sum 0.0003",
            "sluice_group_commit_seconds_count 1",
            "sluice_consumer_lag_events_bucket{le=\"1000\"} 0",
            "sluice_shard_drops_total{shard=\"1\",reason=\"bad_signature\"} 0",
            "sluice_shard_stalls_total{shard=\"0\"} 0",
            "sluice_process_threads{process=\"supervisor\"} ",
        ] {
            let found = if line.ends_with(' ') {
                page.lines().any(|l| l.starts_with(line))
            } else {
                page.lines().any(|l| l == line)
            };
            assert!(found, "missing {line:?} in\n{page}");
        }
    }
}
