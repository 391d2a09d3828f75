//! Prometheus text exposition on `metrics_listen` (default
//! 127.0.0.1:2471), served by the supervisor from the shared control block:
//! per-shard counters, the db-writer's counters, ring fill, watermarks.
//! One small blocking thread; a request gets the whole page.

use sluice_common::host::HostStatus;
use sluice_common::shm::{ControlBlock, UpstreamClose, WriterCounter};
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
}

pub type SharedView = Arc<std::sync::Mutex<View>>;

pub fn render(cb: &ControlBlock, view: &View) -> String {
    let rings = &view.rings;
    let mut out = String::with_capacity(4096);
    let mut gauge = |name: &str, help: &str, kind: &str, values: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in values {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    gauge(
        "sluice_committed_seq",
        "Highest durable relay seq.",
        "gauge",
        &[(String::new(), cb.committed().load(Ordering::Relaxed))],
    );
    gauge(
        "sluice_oldest_seq",
        "Lowest relay seq still in the event log.",
        "gauge",
        &[(String::new(), cb.oldest().load(Ordering::Relaxed))],
    );
    gauge(
        "sluice_disk_full",
        "1 while intake is paused because the event log or Postgres is out of space.",
        "gauge",
        &[(String::new(), u64::from(cb.writer_state() == sluice_common::shm::WriterState::DiskFull))],
    );
    for c in WriterCounter::ALL {
        let (name, help) = c.describe();
        gauge(name, help, "counter", &[(String::new(), cb.writer_counter(c).load(Ordering::Relaxed))]);
    }
    let n = cb.shard_count().load(Ordering::Relaxed) as usize;
    let per = |f: &dyn Fn(usize) -> u64| -> Vec<(String, u64)> {
        (0..n).map(|k| (format!("{{shard=\"{k}\"}}"), f(k))).collect()
    };
    type Field = fn(&sluice_common::shm::ShardSlot<'_>) -> u64;
    let per_shard: [(&str, &str, &str, Field); 7] = [
        ("sluice_shard_hosts_connected", "Upstream hosts connected.", "gauge", |s| {
            s.hosts_connected.load(Ordering::Relaxed)
        }),
        ("sluice_shard_consumers", "Consumers subscribed.", "gauge", |s| s.consumers.load(Ordering::Relaxed)),
        ("sluice_shard_events_in_total", "Validated events written into the ring.", "counter", |s| {
            s.events_in.load(Ordering::Relaxed)
        }),
        ("sluice_shard_frames_out_total", "Frames sent to consumers.", "counter", |s| {
            s.frames_out.load(Ordering::Relaxed)
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
    ];
    for (name, help, kind, field) in per_shard {
        gauge(name, help, kind, &per(&|k| field(&cb.shard(k))));
    }
    let closes: Vec<(String, u64)> = (0..n)
        .flat_map(|k| {
            let slot = cb.shard(k);
            UpstreamClose::ALL.map(|r| {
                (
                    format!("{{shard=\"{k}\",reason=\"{}\"}}", r.name()),
                    slot.upstream_closes[r as usize].load(Ordering::Relaxed),
                )
            })
        })
        .collect();
    gauge(
        "sluice_shard_upstream_closes_total",
        "Upstream connections ended (or never established), by reason.",
        "counter",
        &closes,
    );
    let hosts: Vec<(String, u64)> =
        view.hosts.iter().map(|(st, n)| (format!("{{status=\"{}\"}}", st.as_str()), *n)).collect();
    gauge("sluice_hosts", "Upstream hosts known, by status (active, offline, idle, banned).", "gauge", &hosts);
    let fill: Vec<(String, u64)> = rings.iter().enumerate().map(|(k, r)| (format!("{{shard=\"{k}\"}}"), r.0)).collect();
    gauge("sluice_ring_used_bytes", "Bytes in the shard's ring not yet committed.", "gauge", &fill);
    let cap: Vec<(String, u64)> = rings.iter().enumerate().map(|(k, r)| (format!("{{shard=\"{k}\"}}"), r.1)).collect();
    gauge("sluice_ring_capacity_bytes", "Ring capacity.", "gauge", &cap);
    out
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
        let view =
            View { rings: vec![(1, 10), (2, 10)], hosts: vec![(HostStatus::Active, 3), (HostStatus::Offline, 1)] };
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
        ] {
            assert!(page.lines().any(|l| l == line), "missing {line:?} in\n{page}");
        }
    }
}
