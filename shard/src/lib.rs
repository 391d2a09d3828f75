//! The shard process (`sluice shard --id K`): one glommio executor pinned
//! to one core, io_uring for every socket. Never blocks its executor:
//! DNS and DID documents go through [`resolver`]'s helper threads;
//! Postgres is the db-writer's.
//!
//! - [`upstream`]: one task per assigned host (WebSocket client, validation,
//!   ring producer).
//! - [`downstream`]: the public port (subscribeRepos from the event log,
//!   health, forwarding to the query workers).
//! - assignment: the supervisor writes the shard's host list as JSON lines
//!   on an inherited pipe; a helper thread reads it into a channel.
//!
//! The shard exits when the db-writer marks its ring poisoned (the
//! supervisor restarts it; it resumes from the durable cursors).

pub mod consumers;
pub mod downstream;
pub mod health;
pub mod meter;
pub mod resolver;
pub mod upstream;
pub mod wsout;

use sluice_common::config::{Config, Validation};
use sluice_common::eventlog::LogReader;
use sluice_common::host::Assignment;
use sluice_common::ring::{Producer, Ring};
use sluice_common::shm::{ControlBlock, ShardSlot};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use upstream::{HostAssignment, HostHandle};

/// glommio's registered I/O memory: small enough for an 8 MiB
/// RLIMIT_MEMLOCK with room to spare.
const IO_MEMORY_BYTES: usize = 512 * 1024;

/// glommio's errors as `std::io::Error` (they are not `Sync`, so `anyhow`
/// cannot take them directly).
pub fn io(e: glommio::GlommioError<()>) -> std::io::Error {
    e.into()
}

/// What every task of the shard shares (single-threaded).
/// Longest stretch the executor runs tasks before it polls the reactor.
const PREEMPT: std::time::Duration = std::time::Duration::from_millis(10);

pub struct Shared {
    pub id: usize,
    pub control: Arc<ControlBlock>,
    pub producer: RefCell<Producer>,
    pub payload_max: usize,
    pub resolver: Rc<resolver::Resolver>,
    pub log: RefCell<LogReader>,
    pub strict: bool,
    pub allow_insecure: bool,
    /// TLS for wss:// upstreams: web PKI roots plus `tls_ca_file`.
    pub tls: Arc<futures_rustls::rustls::ClientConfig>,
    pub listen: SocketAddr,
    pub query_socket: PathBuf,
    pub consumers_max: u64,
    /// Events per second one host may send (`limits.host_events_per_second_max`).
    pub host_rate: u32,
    pub upstream: sluice_common::config::UpstreamTimeouts,
    pub consumer_lag_max: u64,
    /// A consumer whose socket takes nothing this long is cut.
    pub consumer_write_timeout: Duration,
    /// This shard's consumers (`sluice admin consumers`).
    pub consumers: RefCell<consumers::Table>,
    /// Consumers waiting for the committed seq to move.
    pub watermark: downstream::Watermark,
    /// Recent events, framed once for all consumers.
    pub frames: RefCell<wsout::FrameCache>,
}

impl Shared {
    pub fn slot(&self) -> ShardSlot<'_> {
        self.control.shard(self.id)
    }
}

/// The client TLS config: the web PKI roots, plus the certificates in
/// `extra_ca` (PEM) when given.
pub fn tls_config(extra_ca: Option<&std::path::Path>) -> anyhow::Result<Arc<futures_rustls::rustls::ClientConfig>> {
    Ok(sluice_common::tls::client_config(extra_ca)?)
}

/// A running host task.
struct Running {
    hostname: String,
    crawl_gen: i64,
    handle: HostHandle,
}

/// Start, stop or restart host tasks to match a new host list: a host no
/// longer listed is cancelled; one whose crawl generation changed (a
/// requestCrawl of an offline or idle host) restarts with its backoff
/// reset. One log line per change of the list, not one per host.
fn apply_assignment(sh: &Rc<Shared>, running: &mut HashMap<i64, Running>, hosts: Vec<HostAssignment>) {
    let wanted: HashMap<i64, HostAssignment> = hosts.into_iter().map(|h| (h.id, h)).collect();
    let (mut stopped, mut restarted, mut started) = (0usize, 0usize, 0usize);
    running.retain(|hid, r| {
        let keep = wanted.get(hid).is_some_and(|h| h.crawl_gen == r.crawl_gen);
        if !keep {
            if wanted.contains_key(hid) {
                restarted += 1;
                tracing::debug!(shard = sh.id, host = r.hostname.as_str(), "host crawled again; restarting its task");
            } else {
                stopped += 1;
                tracing::debug!(shard = sh.id, host = r.hostname.as_str(), "host no longer assigned here");
            }
            r.handle.cancel.fire();
        }
        keep
    });
    for (hid, h) in wanted {
        if running.contains_key(&hid) {
            continue;
        }
        started += 1;
        let cancel = Rc::new(upstream::Cancel::default());
        running.insert(
            hid,
            Running {
                hostname: h.hostname.clone(),
                crawl_gen: h.crawl_gen,
                handle: HostHandle { cancel: cancel.clone() },
            },
        );
        tracing::debug!(shard = sh.id, host = h.hostname.as_str(), cursor = h.cursor, "host assigned");
        glommio::spawn_local(upstream::run_host(sh.clone(), h, cancel)).detach();
    }
    let new = started - restarted;
    tracing::info!(shard = sh.id, hosts = running.len(), new, stopped, restarted, "host assignment");
}

/// Run shard `id` until the assignment pipe closes or the ring is poisoned.
///
/// # Safety
/// The descriptors must be the ones the supervisor passed to this process.
pub unsafe fn run(cfg: &Config, id: usize, control_fd: RawFd, ring_fd: RawFd, assign_fd: RawFd) -> anyhow::Result<()> {
    // SAFETY: forwarded to the caller.
    let control = Arc::new(unsafe { ControlBlock::from_raw_fd(control_fd) }?);
    // SAFETY: forwarded to the caller.
    let ring = unsafe { Ring::from_raw_fd(ring_fd) }?;
    // SAFETY: forwarded to the caller; the pipe is ours alone.
    let assign = unsafe { std::fs::File::from_raw_fd(assign_fd) };
    let (atx, arx) = flume::bounded::<Vec<HostAssignment>>(16);
    std::thread::Builder::new().name("assign".into()).spawn(move || {
        for line in std::io::BufReader::new(assign).lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Assignment>(&line) {
                Ok(a) => {
                    if atx.send(a.hosts).is_err() {
                        break;
                    }
                }
                Err(e) => tracing::error!(error = %e, "bad assignment line from the supervisor"),
            }
        }
    })?;
    let tls = tls_config(cfg.tls_ca_file.as_deref())?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cfg = cfg.clone();
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(id % cores))
        .name(&format!("shard-{id}"))
        .io_memory(IO_MEMORY_BYTES)
        .ring_depth(256)
        // The reactor (accepts, reads, timers) gets a turn at least this
        // often however many tasks are runnable: a host task that yields
        // goes behind the reactor, not only behind the other tasks.
        .preempt_timer(PREEMPT)
        // A task queue that runs 10 ms past that budget is a stall, a bug
        // (shard code never blocks the executor): glommio logs it, with a
        // backtrace, as a WARN (through tracing's log bridge).
        .detect_stalls(Some(Box::new(glommio::DefaultStallDetectionHandler {})))
        .make()
        .map_err(|e| anyhow::anyhow!("starting the glommio executor: {e}"))?;
    ex.run(async move {
        let payload_max = ring.payload_max();
        let sh = Rc::new(Shared {
            id,
            control: control.clone(),
            producer: RefCell::new(Producer::new(ring)),
            payload_max,
            resolver: resolver::Resolver::new(
                &cfg.plc_url,
                cfg.allow_insecure_hosts,
                4,
                cfg.limits.identity_cache_entries_max as usize,
            )?,
            log: RefCell::new(LogReader::new(&cfg.events_dir())),
            strict: cfg.validation == Validation::Strict,
            allow_insecure: cfg.allow_insecure_hosts,
            tls,
            listen: cfg.listen,
            query_socket: cfg.query_socket(),
            consumers_max: cfg.limits.consumers_max as u64,
            host_rate: cfg.limits.host_events_per_second_max,
            upstream: cfg.upstream,
            consumer_lag_max: cfg.limits.consumer_lag_events_max,
            consumer_write_timeout: Duration::from_secs(cfg.consumer_write_timeout_s.into()),
            consumers: RefCell::new(consumers::Table::default()),
            watermark: downstream::Watermark::default(),
            frames: RefCell::new(wsout::FrameCache::default()),
        });
        // Publish the consumer list for the admin API, through a helper
        // thread; a snapshot still being written makes this tick skip.
        let snapshots = consumers::start_writer(consumers::snapshot_path(&cfg.run_dir(), id))?;
        let pub_sh = sh.clone();
        glommio::spawn_local(async move {
            loop {
                let committed = pub_sh.control.committed().load(Ordering::Acquire) as i64;
                let _ = snapshots.try_send(pub_sh.consumers.borrow().snapshot(pub_sh.id, committed));
                glommio::timer::sleep(consumers::PUBLISH_EVERY).await;
            }
        })
        .detach();
        let ds = sh.clone();
        glommio::spawn_local(async move {
            if let Err(e) = downstream::serve(ds).await {
                tracing::error!(error = %e, "cannot serve consumers");
                std::process::exit(3);
            }
        })
        .detach();
        let mut running: HashMap<i64, Running> = HashMap::new();
        // This process's generation (`ShardSlot::poisoned`): set by the
        // supervisor before it spawned us.
        let generation = sh.slot().generation.load(Ordering::Acquire);
        // An assignment waiting for the ring to be cleared.
        let mut pending: Option<Vec<HostAssignment>> = None;
        let mut waited_for_ring = false;
        loop {
            // Heartbeat and poison check, between assignment messages.
            sh.slot().heartbeat.store(
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                Ordering::Relaxed,
            );
            let poisoned = sh.slot().poisoned.load(Ordering::Acquire);
            if poisoned == generation {
                tracing::error!(shard = id, "ring marked corrupt by the db-writer; exiting for a clean restart");
                std::process::exit(4);
            }
            // The relay is stopping: wake every host task now (they do not
            // poll the flag on timers of their own).
            if sh.control.stop_reading().load(Ordering::Acquire) != 0 {
                for (_, r) in running.drain() {
                    r.handle.cancel.fire();
                }
            }
            // A predecessor's ring is still being cleared: write nothing.
            if poisoned == 0 {
                if let Some(hosts) = pending.take() {
                    if waited_for_ring {
                        tracing::info!(shard = id, "ring cleared by the db-writer; starting host tasks");
                    }
                    apply_assignment(&sh, &mut running, hosts);
                }
            } else if !waited_for_ring {
                waited_for_ring = true;
                tracing::info!(shard = id, "waiting for the db-writer to clear the previous process's corrupt ring");
            }
            let msg = futures::future::select(
                Box::pin(arx.recv_async()),
                Box::pin(glommio::timer::sleep(Duration::from_millis(if pending.is_some() { 10 } else { 100 }))),
            )
            .await;
            match msg {
                futures::future::Either::Left((Ok(h), _)) => pending = Some(h),
                futures::future::Either::Left((Err(_), _)) => break,
                futures::future::Either::Right(_) => continue,
            }
        }
        tracing::info!(shard = id, "assignment pipe closed; exiting");
        anyhow::Ok(())
    })
}
