//! The shard process (`sluice shard --id K`): one glommio executor pinned
//! to one core, io_uring for every socket. Never blocks its executor:
//! DNS goes through [`resolver`]'s helper threads, identities through its
//! cache ([`idcache`]) and the db-writer's identity service (a socket kept
//! by helper threads); Postgres is the db-writer's.
//!
//! - [`upstream`]: one task per assigned host (WebSocket client, ring
//!   producer), its read-ahead [`window`], the checks of a frame
//!   ([`validate`]).
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
pub mod idcache;
pub mod resolver;
pub mod stalls;
pub mod upstream;
pub mod validate;
pub mod window;
pub mod wsin;
pub mod wsout;

use sluice_common::ipc::eventlog::LogReader;
use sluice_common::ipc::ring::{Producer, Ring};
use sluice_common::ipc::shm::{ControlBlock, ShardSlot};
use sluice_common::process::config::{Config, ShardSettings};
use sluice_common::process::host::ToShard;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    pub allow_insecure: bool,
    /// TLS for wss:// upstreams: web PKI roots plus `tls_ca_file`.
    pub tls: Arc<futures_rustls::rustls::ClientConfig>,
    pub listen: SocketAddr,
    pub query_socket: PathBuf,
    /// What a reload may change (validation, limits, timeouts): read
    /// where used, so a new value applies from the next event, connection
    /// or consumer check.
    pub settings: std::cell::Cell<ShardSettings>,
    /// The shard is stopping: consumers get a close frame once they have
    /// every committed event (see [`downstream`]).
    pub closing: std::cell::Cell<bool>,
    /// This shard's consumers (`sluice admin consumers`).
    pub consumers: RefCell<consumers::Table>,
    /// This shard's host tasks' counts (per-host metrics).
    pub hosts: RefCell<consumers::HostTable>,
    /// Consumers waiting for the committed seq to move.
    pub watermark: downstream::Watermark,
    /// Recent events, framed once for all consumers.
    pub frames: RefCell<wsout::FrameCache>,
    /// Consumer lag after each batch, gathered here and added to the
    /// shared histogram each second (see [`sluice_common::ipc::shm::LocalHist`]).
    pub lag_hist: RefCell<sluice_common::ipc::shm::LocalHist>,
    /// The assigned hosts that match `trusted_hosts` (their event rate is
    /// `limits.trusted_host_events_per_second_max`), as of the last
    /// assignment.
    pub trusted: RefCell<std::collections::HashSet<i64>>,
}

impl Shared {
    pub fn slot(&self) -> ShardSlot<'_> {
        self.control.shard(self.id)
    }

    pub fn settings(&self) -> ShardSettings {
        self.settings.get()
    }

    /// A host's event rate: `limits.trusted_host_events_per_second_max`
    /// for a trusted host, else `limits.host_events_per_second_max` (as
    /// reloaded).
    pub fn events_per_second(&self, host_id: i64) -> f64 {
        let s = self.settings();
        let rate = if self.trusted.borrow().contains(&host_id) {
            s.trusted_host_events_per_second_max
        } else {
            s.host_events_per_second_max
        };
        f64::from(rate.max(1))
    }
}

/// The client TLS config: the web PKI roots, plus the certificates in
/// `extra_ca` (PEM) when given.
pub fn tls_config(extra_ca: Option<&std::path::Path>) -> anyhow::Result<Arc<futures_rustls::rustls::ClientConfig>> {
    Ok(sluice_common::process::tls::client_config(extra_ca)?)
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
    // A host's trust (its rate) changes in place: no reconnect.
    *sh.trusted.borrow_mut() = wanted.values().filter(|h| h.trusted).map(|h| h.id).collect();
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

/// How long a stopping shard waits for its consumers to take the last
/// committed events and their close frame (the supervisor allows 5 s).
const FAREWELL_MAX: Duration = Duration::from_secs(3);

/// The descriptors the supervisor passed to a shard.
pub struct ShardFds {
    pub control: RawFd,
    pub ring: RawFd,
    pub assign: RawFd,
}

/// Run shard `id` until SIGTERM (`term`), the assignment pipe closing, or
/// the ring being poisoned.
///
/// # Safety
/// The descriptors must be the ones the supervisor passed to this process.
pub unsafe fn run(cfg: &Config, id: usize, fds: ShardFds, term: Arc<AtomicBool>) -> anyhow::Result<()> {
    // SAFETY: forwarded to the caller.
    let control = Arc::new(unsafe { ControlBlock::from_raw_fd(fds.control) }?);
    // SAFETY: forwarded to the caller.
    let ring = unsafe { Ring::from_raw_fd(fds.ring) }?;
    // SAFETY: forwarded to the caller; the pipe is ours alone.
    let messages = read_messages(unsafe { std::fs::File::from_raw_fd(fds.assign) })?;
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
        // Stalls are detected by [`stalls`], not by glommio's detector
        // (which loads the debug information on the first one).
        .make()
        .map_err(|e| anyhow::anyhow!("starting the glommio executor: {e}"))?;
    ex.run(async move {
        let payload_max = ring.payload_max();
        // The shards share the configured identity cache bytes.
        let cache_bytes = cfg.limits.identity_cache_bytes / u64::from(cfg.shard_count.max(1));
        let (resolver, answers) = resolver::Resolver::new(cfg.identity_socket(), cache_bytes)?;
        glommio::spawn_local(resolver.clone().serve_answers(answers)).detach();
        let sh = Rc::new(Shared {
            id,
            control: control.clone(),
            producer: RefCell::new(Producer::new(ring)),
            payload_max,
            resolver,
            log: RefCell::new(LogReader::new(&cfg.events_dir())),
            allow_insecure: cfg.allow_insecure_hosts,
            tls,
            listen: cfg.listen,
            query_socket: cfg.query_socket(),
            settings: std::cell::Cell::new(cfg.shard_settings()),
            closing: std::cell::Cell::new(false),
            consumers: RefCell::new(consumers::Table::default()),
            hosts: RefCell::new(consumers::HostTable::new()),
            watermark: downstream::Watermark::default(),
            frames: RefCell::new(wsout::FrameCache::default()),
            lag_hist: RefCell::new(sluice_common::ipc::shm::LocalHist::new(sluice_common::ipc::shm::Hist::ConsumerLag)),
            trusted: RefCell::default(),
        });
        stalls::spawn(control.clone(), id)?;
        spawn_services(&sh, &cfg)?;
        let mut running = main_loop(&sh, &messages, &term).await;
        farewell(&sh, &mut running).await;
        anyhow::Ok(())
    })
}

/// The supervisor's messages, read by a helper thread (a blocking pipe
/// read) into a bounded channel.
fn read_messages(pipe: std::fs::File) -> std::io::Result<flume::Receiver<ToShard>> {
    let (tx, rx) = flume::bounded::<ToShard>(16);
    std::thread::Builder::new().name("assign".into()).spawn(move || {
        for line in std::io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            match ToShard::parse(&line) {
                Ok(m) => {
                    if tx.send(m).is_err() {
                        break;
                    }
                }
                Err(e) => tracing::error!(error = %e, "bad message from the supervisor"),
            }
        }
    })?;
    Ok(rx)
}

/// The consumer-list publisher and the public port.
fn spawn_services(sh: &Rc<Shared>, cfg: &Config) -> anyhow::Result<()> {
    // Publish the consumer list for the admin API, through a helper
    // thread; a snapshot still being written makes this tick skip.
    let snapshots = consumers::start_writer(consumers::snapshot_path(&cfg.run_dir(), sh.id))?;
    let pub_sh = sh.clone();
    glommio::spawn_local(async move {
        loop {
            let committed = pub_sh.control.committed().load(Ordering::Acquire) as i64;
            let snapshot = pub_sh.consumers.borrow().snapshot(pub_sh.id, committed, &pub_sh.hosts.borrow());
            let _ = snapshots.try_send(snapshot);
            pub_sh.lag_hist.borrow_mut().flush(&pub_sh.control.histogram(sluice_common::ipc::shm::Hist::ConsumerLag));
            let (entries, bytes) = pub_sh.resolver.cache_size();
            pub_sh.slot().identity_cache_entries.store(entries as u64, Ordering::Relaxed);
            pub_sh.slot().identity_cache_bytes.store(bytes as u64, Ordering::Relaxed);
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
    Ok(())
}

/// What wakes the shard's main loop.
enum Wake {
    Message(ToShard),
    /// The supervisor is gone or stopping this shard.
    PipeClosed,
    /// Time for the housekeeping (heartbeat, poison and stop checks).
    Tick,
}

async fn next_wake(messages: &flume::Receiver<ToShard>, every: Duration) -> Wake {
    match futures::future::select(Box::pin(messages.recv_async()), Box::pin(glommio::timer::sleep(every))).await {
        futures::future::Either::Left((Ok(m), _)) => Wake::Message(m),
        futures::future::Either::Left((Err(_), _)) => Wake::PipeClosed,
        futures::future::Either::Right(_) => Wake::Tick,
    }
}

/// Host assignments and settings from the supervisor, until SIGTERM or the
/// pipe closing; returns the host tasks still running.
async fn main_loop(sh: &Rc<Shared>, messages: &flume::Receiver<ToShard>, term: &AtomicBool) -> HashMap<i64, Running> {
    let mut running: HashMap<i64, Running> = HashMap::new();
    // This process's generation (`ShardSlot::poisoned`): set by the
    // supervisor before it spawned us.
    let generation = sh.slot().generation.load(Ordering::Acquire);
    // An assignment waiting for the ring to be cleared.
    let mut pending: Option<Vec<HostAssignment>> = None;
    let mut waited_for_ring = false;
    while !term.load(Ordering::Acquire) {
        housekeeping(sh, generation, &mut running);
        // A predecessor's ring is still being cleared: write nothing.
        if sh.slot().poisoned.load(Ordering::Acquire) == 0 {
            if let Some(hosts) = pending.take() {
                if waited_for_ring {
                    tracing::info!(shard = sh.id, "ring cleared by the db-writer; starting host tasks");
                }
                apply_assignment(sh, &mut running, hosts);
            }
        } else if !waited_for_ring {
            waited_for_ring = true;
            tracing::info!(shard = sh.id, "waiting for the db-writer to clear the previous process's corrupt ring");
        }
        let every = Duration::from_millis(if pending.is_some() { 10 } else { 100 });
        match next_wake(messages, every).await {
            Wake::Message(ToShard::Assign(a)) => pending = Some(a.hosts),
            Wake::Message(ToShard::Settings(new)) => apply_settings(sh, new),
            Wake::PipeClosed => {
                tracing::info!(shard = sh.id, "assignment pipe closed; stopping");
                break;
            }
            Wake::Tick => {}
        }
    }
    running
}

/// Heartbeat, the poison check, and the relay-wide stop.
fn housekeeping(sh: &Shared, generation: u32, running: &mut HashMap<i64, Running>) {
    sh.slot().heartbeat.store(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        Ordering::Relaxed,
    );
    if sh.slot().poisoned.load(Ordering::Acquire) == generation {
        tracing::error!(shard = sh.id, "ring marked corrupt by the db-writer; exiting for a clean restart");
        std::process::exit(4);
    }
    // The relay is stopping: wake every host task now (they do not poll
    // the flag on timers of their own).
    if sh.control.stop_reading().load(Ordering::Acquire) != 0 {
        for (_, r) in running.drain() {
            r.handle.cancel.fire();
        }
    }
}

/// A reload's new settings: used from the next event, connection and
/// consumer check on.
fn apply_settings(sh: &Shared, new: ShardSettings) {
    let old = sh.settings.replace(new);
    if old.identity_cache_bytes != new.identity_cache_bytes {
        sh.resolver.set_cache_bytes(new.identity_cache_bytes);
    }
    if old != new {
        tracing::info!(shard = sh.id, identity_cache_bytes = new.identity_cache_bytes, "settings reloaded");
    }
}

/// Stop: host tasks cancelled, and every consumer sent what is committed,
/// then an `#info` and a close frame (code 1012, "service restart"), for
/// at most [`FAREWELL_MAX`].
async fn farewell(sh: &Rc<Shared>, running: &mut HashMap<i64, Running>) {
    for (_, r) in running.drain() {
        r.handle.cancel.fire();
    }
    sh.closing.set(true);
    sh.watermark.wake_all();
    let deadline = std::time::Instant::now() + FAREWELL_MAX;
    while sh.slot().consumers.load(Ordering::Relaxed) > 0 && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    tracing::info!(shard = sh.id, consumers_left = sh.slot().consumers.load(Ordering::Relaxed), "shard stopped");
}
