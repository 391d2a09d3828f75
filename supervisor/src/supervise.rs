//! `sluice run`: the supervisor. Reads the config, raises rlimits, starts
//! the database (embedded default) and runs migrations, creates the shared
//! memory, starts the db-writer and the shards, assigns hosts to shards,
//! restarts children that die, and shuts everything down in order.
//!
//! Shutdown (SIGTERM/SIGINT), in steps:
//! 1. `stop_reading`: shard host tasks stop reading upstream;
//! 2. wait until every ring is empty (the db-writer committed all of it);
//! 3. stop the shards, then the db-writer (it commits what is left);
//! 4. stop the private PostgreSQL.
//!
//! Every step is bounded by `shutdown_timeout_ms`; nothing a consumer saw
//! can be lost, since cursors only advance with commits.

use crate::pg::EmbeddedPg;
use anyhow::Context;
use sluice_common::ipc::ring::Ring;
use sluice_common::ipc::shm::{ControlBlock, WriterCounter, WriterState};
use sluice_common::process::childfds::{ChildFds, ENV_FDS};
use sluice_common::process::config::Config;
use sluice_common::process::host::{Assignment, HostStatus, ToShard};
use sluice_common::process::instance::InstanceLock;
use sluice_common::process::partition::shard_for;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BACKOFF_MAX: Duration = Duration::from_secs(30);
const HOST_POLL: Duration = Duration::from_millis(500);
/// The hosts are read whole at least this often, changed or not.
const HOST_RESYNC: Duration = Duration::from_secs(30);
/// How often the private cluster is checked while the db-writer reports
/// Postgres unavailable.
const PG_CHECK: Duration = Duration::from_secs(1);
/// A child that ran this long before dying starts its backoff afresh: one
/// that ran fine for a while and was then killed comes back in 0.5 s; only
/// a child that keeps dying sooner backs off further (up to BACKOFF_MAX).
const STABLE_AFTER: Duration = Duration::from_secs(5);

/// Raise RLIMIT_NOFILE to its hard limit and, as root, RLIMIT_MEMLOCK so
/// glommio's io_uring buffers fit.
pub fn raise_rlimits() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_MEMLOCK) {
        let want = 256u64 << 20;
        if soft < want && setrlimit(Resource::RLIMIT_MEMLOCK, want, want.max(hard)).is_err() {
            tracing::debug!(soft, "could not raise RLIMIT_MEMLOCK; shards use a small io_uring buffer");
        }
    }
}

struct Proc {
    child: Option<Child>,
    restarts: u32,
    next_start: Instant,
    started: Instant,
    /// Write end of the shard's assignment pipe.
    assign: Option<std::fs::File>,
    last_assignment: Option<Vec<(i64, i64, bool)>>,
}

impl Proc {
    fn idle() -> Proc {
        let now = Instant::now();
        Proc { child: None, restarts: 0, next_start: now, started: now, assign: None, last_assignment: None }
    }
}

/// What the supervisor's loop does now and then, and when it last did.
struct Chores {
    last_poll: Instant,
    last_pg_check: Instant,
    last_procs: Instant,
    last_watchdog: Instant,
    /// Half of `WatchdogSec` (None: no watchdog).
    watchdog: Option<Duration>,
    summary: crate::summary::Summary,
    status: crate::status::StatusWriter,
}

impl Chores {
    fn new(cfg: &Config, control: &ControlBlock) -> Chores {
        let now = Instant::now();
        Chores {
            last_poll: now - HOST_POLL,
            last_pg_check: now,
            last_procs: now - Duration::from_secs(1),
            last_watchdog: now,
            watchdog: crate::notify::watchdog_every(),
            summary: crate::summary::Summary::new(Duration::from_secs(cfg.log_summary_interval_s.into()), control),
            status: crate::status::StatusWriter::default(),
        }
    }
}

/// Hooks for `sluice demo` (a line per second, etc.).
pub type Tick<'a> = Box<dyn FnMut(&ControlBlock) + 'a>;

pub struct Supervisor {
    cfg: Config,
    config_path: std::path::PathBuf,
    control: Arc<ControlBlock>,
    rings: Vec<Ring>,
    writer: Proc,
    shards: Vec<Proc>,
    pg: Option<EmbeddedPg>,
    database_url: String,
    /// The config file, for SIGHUP (None: built in, nothing to reload).
    source: Option<std::path::PathBuf>,
    /// Ring fill for the metrics page, refreshed by the run loop.
    view: crate::metrics::SharedView,
    /// The metrics endpoint (None: it could not bind).
    metrics: Option<crate::metrics::Endpoint>,
    /// `data_dir` is ours while this is held (children inherit it).
    lock: InstanceLock,
    /// `listen`, bound with SO_REUSEPORT but never listening: the shards
    /// share the port, nobody else can bind it while the relay runs.
    _listen_reservation: std::os::fd::OwnedFd,
    /// The hosts table's fingerprint at the last whole read, and when: a
    /// poll reads all hosts only when it changed (at 10,000 hosts, reading
    /// them every 500 ms was most of an idle relay's CPU).
    hosts_seen: Option<(sluice_dbwriter::db::HostsFingerprint, Instant)>,
}

/// Is a socket listening where `addr` would listen (the same port, and the
/// same address or a wildcard on either side)? Read from /proc/net/tcp and
/// tcp6, so connections left over from an earlier run (FIN_WAIT, TIME_WAIT)
/// do not count, only listeners.
fn listener_on(addr: std::net::SocketAddr) -> bool {
    let wild = |ip: std::net::IpAddr| ip.is_unspecified();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (f.get(1), f.get(3)) else { continue };
            if *state != "0A" {
                continue;
            }
            let Some((ip_hex, port_hex)) = local.split_once(':') else { continue };
            if u16::from_str_radix(port_hex, 16).ok() != Some(addr.port()) {
                continue;
            }
            let ip = proc_ip(ip_hex);
            if ip.is_none_or(|ip| ip == addr.ip() || wild(ip) || wild(addr.ip()) || ip.to_canonical() == addr.ip()) {
                return true;
            }
        }
    }
    false
}

/// An address as /proc/net/tcp{,6} prints it (32-bit words in host order).
fn proc_ip(hex: &str) -> Option<std::net::IpAddr> {
    let words: Vec<u32> =
        (0..hex.len() / 8).map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok()).collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match bytes.len() {
        4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

/// Nothing may listen on `addr` yet (another relay, or any program); then
/// reserve it for this relay's shards: a socket with SO_REUSEPORT that is
/// bound but never listens, so it takes no connections and only sockets
/// of this user with SO_REUSEPORT (our shards) can bind there besides it.
fn reserve_listen(addr: std::net::SocketAddr) -> anyhow::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
    probe_free("listen", addr)?;
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(|e| anyhow::anyhow!("listen {addr}: {e}"))?;
    Ok(fd)
}

/// Nothing may listen on `addr` (the metrics endpoint's).
fn probe_free(key: &str, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    if listener_on(addr) {
        anyhow::bail!("{key} {addr}: address in use (another relay or program listens there)");
    }
    Ok(())
}

fn spawn_child(args: &[String], config: &std::path::Path, fds: &ChildFds, death_signal: i32) -> std::io::Result<Child> {
    // The running binary itself, even after its file was replaced or
    // removed (a package upgrade, a rebuild): children always match their
    // supervisor's version, and a restart never fails on a missing path.
    let mut c = Command::new("/proc/self/exe");
    // glibc: allocations from 32 KiB up are mmapped and returned when freed
    // (not kept by the dynamic threshold, which rises to 32 MiB after the
    // first such free), and free heap past 1 MiB at the top is given back:
    // a shard's memory falls back when consumers or large messages leave.
    for (k, v) in [("MALLOC_MMAP_THRESHOLD_", "32768"), ("MALLOC_TRIM_THRESHOLD_", "1048576")] {
        if std::env::var_os(k).is_none() {
            c.env(k, v);
        }
    }
    c.arg0(std::env::current_exe().map_or_else(|_| "sluice".into(), |p| p.to_string_lossy().replace(" (deleted)", "")));
    c.args(args).arg("--config").arg(config);
    c.env(ENV_FDS, fds.encode());
    let keep = fds.all();
    // SAFETY: between fork and exec we only call async-signal-safe
    // functions (fcntl, prctl) on descriptors we own.
    unsafe {
        c.pre_exec(move || {
            for &fd in &keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong, 0, 0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.process_group(0);
    c.spawn()
}

fn cloexec(fd: RawFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map(|_| ()).map_err(std::io::Error::from)
}

impl Supervisor {
    pub fn start(mut cfg: Config) -> anyhow::Result<Supervisor> {
        raise_rlimits();
        std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        cfg.data_dir = cfg.data_dir.canonicalize()?;
        // Before anything else touches the directory or the ports.
        let lock = InstanceLock::acquire(&cfg.data_dir)?;
        let listen_reservation = reserve_listen(cfg.listen)?;
        probe_free("metrics_listen", cfg.metrics_listen)?;
        std::fs::create_dir_all(cfg.run_dir())?;
        // The query socket and the consumer snapshots are the relay's own.
        std::fs::set_permissions(cfg.run_dir(), std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let mut pg = None;
        let database_url = match &cfg.database_url {
            Some(u) => u.clone(),
            None => {
                let p = EmbeddedPg::start(&cfg.data_dir)?;
                let u = p.url();
                pg = Some(p);
                u
            }
        };
        sluice_dbwriter::db::migrate(&database_url, cfg.initial_seq).context("running migrations")?;
        let mut eff = cfg.clone();
        eff.database_url = Some(database_url.clone());
        let config_path = cfg.run_dir().join("effective.toml");
        std::fs::write(&config_path, eff.to_toml())?;
        let control = ControlBlock::create()?;
        cloexec(control.fd())?;
        control.shard_count().store(cfg.shard_count, Ordering::Release);
        let mut rings = Vec::new();
        for k in 0..cfg.shard_count {
            let r = Ring::create(&format!("sluice-ring-{k}"), cfg.ring_size_bytes)?;
            cloexec(r.fd())?;
            rings.push(r);
        }
        let shards = (0..cfg.shard_count).map(|_| Proc::idle()).collect();
        if let Some(b) = &cfg.bootstrap_relay {
            crate::bootstrap::spawn(b.clone(), database_url.clone(), cfg.allow_insecure_hosts);
        }
        let control = Arc::new(control);
        let view = crate::metrics::SharedView::default();
        let metrics = crate::metrics::start(cfg.metrics_listen, control.clone(), view.clone());
        Ok(Supervisor {
            metrics,
            cfg,
            config_path,
            control,
            rings,
            writer: Proc::idle(),
            shards,
            pg,
            database_url,
            source: None,
            view,
            lock,
            _listen_reservation: listen_reservation,
            hosts_seen: None,
        })
    }

    /// Where SIGHUP re-reads the config from.
    pub fn set_source(&mut self, path: Option<std::path::PathBuf>) {
        self.source = path;
    }

    fn start_writer(&mut self) -> anyhow::Result<()> {
        let fds = ChildFds {
            control: self.control.fd(),
            rings: self.rings.iter().map(|r| r.fd()).collect(),
            assign: None,
            lock: self.lock.fd(),
        };
        self.control.set_writer_state(WriterState::Starting);
        let child = spawn_child(&["db-writer".into()], &self.config_path, &fds, libc::SIGTERM)?;
        tracing::info!(pid = child.id(), "db-writer started");
        self.writer.child = Some(child);
        self.writer.started = Instant::now();
        // Wait for it to be ready (migrations done, log repaired).
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.control.writer_state() != WriterState::Ready {
            if let Some(st) = self.writer.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                anyhow::bail!("db-writer exited during start ({st})");
            }
            if Instant::now() > deadline {
                anyhow::bail!("db-writer not ready after 120 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn start_shard(&mut self, k: usize) -> anyhow::Result<()> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let fds = ChildFds {
            control: self.control.fd(),
            rings: vec![self.rings[k].fd()],
            assign: Some(r.as_raw_fd()),
            lock: self.lock.fd(),
        };
        // The previous process of this shard has been reaped (or there was
        // none): the next generation (see `ShardSlot::poisoned`).
        let slot = self.control.shard(k);
        let generation = slot.generation.load(Ordering::Acquire).wrapping_add(1).max(1);
        slot.generation.store(generation, Ordering::Release);
        // What the previous process held (hosts, consumers, windows) went
        // with it; a SIGKILLed one never gave its gauges back.
        slot.clear_gauges();
        let child =
            spawn_child(&["shard".into(), "--id".into(), k.to_string()], &self.config_path, &fds, libc::SIGKILL)?;
        drop::<OwnedFd>(r);
        tracing::info!(shard = k, pid = child.id(), "shard started");
        let p = &mut self.shards[k];
        p.child = Some(child);
        p.started = Instant::now();
        p.assign = Some(std::fs::File::from(w));
        p.last_assignment = None;
        Ok(())
    }

    /// Run until SIGTERM/SIGINT (`term`), then shut down in order.
    pub fn run(
        &mut self,
        term: Arc<AtomicBool>,
        hup: Arc<AtomicBool>,
        mut tick: Option<Tick<'_>>,
    ) -> anyhow::Result<()> {
        self.start_writer()?;
        for k in 0..self.shards.len() {
            self.start_shard(k)?;
        }
        let mut db = sluice_dbwriter::db::connect(&self.database_url)?;
        tracing::info!(listen = %self.cfg.listen, shards = self.shards.len(), "sluice running");
        crate::notify::notify(&format!("READY=1\nSTATUS=relaying with {} shards", self.shards.len()));
        let mut l = Chores::new(&self.cfg, &self.control);
        while !term.load(Ordering::Acquire) {
            if l.watchdog.is_some_and(|every| l.last_watchdog.elapsed() >= every) {
                l.last_watchdog = Instant::now();
                crate::notify::notify("WATCHDOG=1");
            }
            self.reap_and_restart()?;
            // The db-writer waits for Postgres instead of exiting: a private
            // cluster that died is started again from here.
            if self.control.writer_state() == WriterState::DbUnavailable && l.last_pg_check.elapsed() >= PG_CHECK {
                l.last_pg_check = Instant::now();
                if let Some(pg) = self.pg.as_mut() {
                    if let Err(e) = pg.ensure_running() {
                        tracing::warn!(error = %e, "private PostgreSQL does not start; retrying");
                    }
                }
            }
            if l.last_poll.elapsed() >= HOST_POLL {
                l.last_poll = Instant::now();
                self.poll_hosts(&mut db);
            }
            if hup.swap(false, Ordering::AcqRel) {
                self.reload()?;
                l.summary.set_every(Duration::from_secs(self.cfg.log_summary_interval_s.into()));
                l.last_poll = Instant::now() - HOST_POLL;
            }
            self.refresh_view(&mut l);
            if let Some(t) = tick.as_mut() {
                t(&self.control);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.shutdown();
        Ok(())
    }

    /// Read the hosts from Postgres: assignments to the shards, counts by
    /// status for the metrics. A failure reconnects for the next poll.
    fn poll_hosts(&mut self, db: &mut postgres::Client) {
        // A shard (re)started since waits for its assignment.
        let waiting = self.shards.iter().any(|p| p.assign.is_some() && p.last_assignment.is_none());
        let read = sluice_dbwriter::db::hosts_fingerprint(db).and_then(|fp| {
            let same = self.hosts_seen.as_ref().is_some_and(|(seen, at)| *seen == fp && at.elapsed() < HOST_RESYNC);
            if same && !waiting {
                return Ok(None);
            }
            // Read after the fingerprint: a change in between is read now
            // and makes the next poll read again.
            self.hosts_seen = Some((fp, Instant::now()));
            sluice_dbwriter::db::hosts(db).map(Some)
        });
        match read {
            Ok(None) => {}
            Ok(Some(hosts)) => {
                self.assign(&hosts);
                if let Ok(mut v) = self.view.lock() {
                    v.hosts =
                        HostStatus::ALL.map(|st| (st, hosts.iter().filter(|h| h.status == st).count() as u64)).to_vec();
                }
            }
            Err(e) => {
                self.hosts_seen = None;
                tracing::warn!(error = %e, "reading hosts failed; reconnecting");
                if let Ok(c) = sluice_dbwriter::db::connect(&self.database_url) {
                    *db = c;
                }
            }
        }
    }

    /// Ring fill every turn, the process list each second; then the
    /// summary line and the status file, when due.
    fn refresh_view(&mut self, l: &mut Chores) {
        let procs = (l.last_procs.elapsed() >= Duration::from_secs(1)).then(|| self.procs());
        if let Ok(mut v) = self.view.lock() {
            v.rings = self.rings.iter().map(|r| (r.used(), r.capacity())).collect();
            if let Some(p) = procs {
                l.last_procs = Instant::now();
                v.procs = p;
                v.run_dir = Some(self.cfg.run_dir());
            }
            l.summary.tick(&self.control, &v);
            l.status.tick(&self.control, &v);
        }
    }

    /// The relay's processes by name, for the per-process metrics.
    fn procs(&self) -> Vec<(String, u32)> {
        let mut out = vec![("supervisor".to_owned(), std::process::id())];
        if let Some(c) = &self.writer.child {
            out.push(("db-writer".to_owned(), c.id()));
        }
        for (k, p) in self.shards.iter().enumerate() {
            if let Some(c) = &p.child {
                out.push((format!("shard-{k}"), c.id()));
            }
        }
        if let Some(pid) = self.pg.as_ref().and_then(|p| p.postmaster_pid()) {
            out.push(("postgres".to_owned(), pid));
        }
        out
    }

    fn assign(&mut self, hosts: &[sluice_dbwriter::db::HostRow]) {
        let n = self.shards.len() as u32;
        let mut per: Vec<Assignment> = vec![Assignment { hosts: Vec::new() }; n as usize];
        let limits = self.cfg.host_limits();
        for h in hosts.iter().filter(|h| h.status.dialed()) {
            per[shard_for(&h.hostname, n) as usize].hosts.push(h.assignment(&limits));
        }
        for (k, a) in per.into_iter().enumerate() {
            let p = &mut self.shards[k];
            let Some(w) = p.assign.as_mut() else { continue };
            // A running shard acts only on the hosts and their crawl
            // generations: a host going offline and back, or its cursor
            // moving, sends nothing.
            let key = a.key();
            if p.last_assignment.as_ref() == Some(&key) {
                continue;
            }
            match w.write_all(ToShard::Assign(a).line().as_bytes()) {
                Ok(()) => p.last_assignment = Some(key),
                Err(e) => tracing::warn!(shard = k, error = %e, "cannot send the host assignment"),
            }
        }
    }

    fn reap_and_restart(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.writer.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            tracing::error!(status = %st, "db-writer exited; restarting it");
            self.writer.child = None;
            if self.writer.started.elapsed() > STABLE_AFTER {
                self.writer.restarts = 0;
            }
            self.writer.restarts += 1;
            self.control.writer_counter(WriterCounter::Restarts).fetch_add(1, Ordering::Relaxed);
            self.writer.next_start = Instant::now() + backoff(self.writer.restarts);
        }
        if self.writer.child.is_none() && Instant::now() >= self.writer.next_start {
            if let Some(pg) = self.pg.as_mut() {
                // The private database may be what failed.
                if let Err(e) = pg.ensure_running() {
                    tracing::error!(error = %e, "private PostgreSQL cannot be started");
                }
            }
            if let Err(e) = self.start_writer() {
                // Not fatal after the first start: retry with backoff.
                tracing::error!(error = %e, "db-writer failed to start; retrying");
                if let Some(mut c) = self.writer.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                self.writer.restarts += 1;
                self.writer.next_start = Instant::now() + backoff(self.writer.restarts);
            }
        }
        for k in 0..self.shards.len() {
            let p = &mut self.shards[k];
            if let Some(st) = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                tracing::error!(shard = k, status = %st, "shard exited; restarting it");
                p.child = None;
                p.assign = None;
                if p.started.elapsed() > STABLE_AFTER {
                    p.restarts = 0;
                }
                p.restarts += 1;
                self.control.writer_counter(WriterCounter::Restarts).fetch_add(1, Ordering::Relaxed);
                p.next_start = Instant::now() + backoff(p.restarts);
            }
            if p.child.is_none() && Instant::now() >= p.next_start {
                // A shard that cannot be started now (its binary replaced
                // mid-upgrade, out of descriptors...) is retried with
                // backoff; the relay does not stop for it.
                if let Err(e) = self.start_shard(k) {
                    let p = &mut self.shards[k];
                    p.restarts += 1;
                    p.next_start = Instant::now() + backoff(p.restarts);
                    tracing::error!(shard = k, error = %e, "shard failed to start; retrying");
                }
            }
        }
        Ok(())
    }

    /// SIGHUP: re-read the config file. With the same shard_count, ring
    /// size and listen address nothing restarts: the db-writer gets SIGHUP
    /// and re-reads the effective config, each shard gets the new
    /// [`ShardSettings`](sluice_common::process::config::ShardSettings) on its pipe,
    /// consumers stay connected. Otherwise a reshard: the children stop
    /// (consumers get a close frame) and start again on the new rings;
    /// lossless like any restart. Keys only a restart applies
    /// ([`Config::fixed_keys`]) keep their running values, said in a WARN;
    /// an invalid file changes nothing.
    fn reload(&mut self) -> anyhow::Result<()> {
        crate::notify::notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", crate::notify::monotonic_usec()));
        let r = self.reload_config();
        // Whatever happened, the relay runs (on the old or the new config).
        crate::notify::notify(&format!("READY=1\nSTATUS=relaying with {} shards", self.shards.len()));
        r
    }

    fn reload_config(&mut self) -> anyhow::Result<()> {
        let Some(path) = self.source.clone() else {
            tracing::warn!("SIGHUP: no config file to reload (built-in defaults)");
            return Ok(());
        };
        let mut new = match Config::load(Some(&path)) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "SIGHUP: config invalid; keeping the running one");
                return Ok(());
            }
        };
        new.data_dir = std::fs::canonicalize(&new.data_dir).unwrap_or(new.data_dir.clone());
        let fixed = self.cfg.fixed_keys(&new);
        if !fixed.is_empty() {
            tracing::warn!(
                keys = fixed.join(", "),
                "SIGHUP: these keys change only with a restart; keeping the running values"
            );
        }
        let new = self.cfg.keep_fixed(new);
        if new.metrics_listen != self.cfg.metrics_listen {
            // Free the old address first: the new one may be the same port
            // on another interface.
            if let Some(m) = self.metrics.take() {
                m.stop();
            }
            self.metrics = crate::metrics::start(new.metrics_listen, self.control.clone(), self.view.clone());
            tracing::info!(from = %self.cfg.metrics_listen, to = %new.metrics_listen, "SIGHUP: metrics endpoint moved");
        }
        let reshard = self.cfg.reshard_keys(&new);
        if reshard.is_empty() {
            self.apply_in_place(new)?;
            tracing::info!(path = %path.display(), "SIGHUP: settings applied; nothing restarted");
            return Ok(());
        }
        tracing::info!(path = %path.display(), keys = reshard.join(", "), shards_from = self.cfg.shard_count, shards_to = new.shard_count, "SIGHUP: resharding");
        self.reshard(new)?;
        tracing::info!(shards = self.shards.len(), "SIGHUP: reloaded");
        Ok(())
    }

    fn write_effective(&self, cfg: &Config) -> anyhow::Result<()> {
        let mut eff = cfg.clone();
        eff.database_url = Some(self.database_url.clone());
        // Whole or not at all: a child starting now reads one or the other.
        sluice_common::process::runfile::write_whole(&self.config_path, eff.to_toml().as_bytes())?;
        Ok(())
    }

    /// The new settings to the running children.
    fn apply_in_place(&mut self, new: Config) -> anyhow::Result<()> {
        self.write_effective(&new)?;
        if let Some(c) = &self.writer.child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGHUP);
        }
        let line = ToShard::Settings(new.shard_settings()).line();
        for (k, p) in self.shards.iter_mut().enumerate() {
            // A shard being restarted reads the new effective config.
            let Some(w) = p.assign.as_mut() else { continue };
            if let Err(e) = w.write_all(line.as_bytes()) {
                tracing::warn!(shard = k, error = %e, "cannot send the reloaded settings");
            }
        }
        if new.trusted_hosts != self.cfg.trusted_hosts {
            // Which hosts are trusted is in the assignments: read again.
            self.hosts_seen = None;
        }
        self.cfg = new;
        Ok(())
    }

    /// Stop every child and start them again on `new`'s shards, rings and
    /// public port.
    fn reshard(&mut self, new: Config) -> anyhow::Result<()> {
        let reservation = if new.listen != self.cfg.listen {
            match reserve_listen(new.listen) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::error!(listen = %new.listen, error = %e, "SIGHUP: cannot take the new listen address; keeping the running config");
                    return Ok(());
                }
            }
        } else {
            None
        };
        self.stop_children();
        if let Some(r) = reservation {
            self._listen_reservation = r;
        }
        if new.shard_count != self.cfg.shard_count || new.ring_size_bytes != self.cfg.ring_size_bytes {
            let mut rings = Vec::new();
            for k in 0..new.shard_count {
                let r = Ring::create(&format!("sluice-ring-{k}"), new.ring_size_bytes)?;
                cloexec(r.fd())?;
                rings.push(r);
                // A new, empty ring: nothing of a poisoned one is left.
                self.control.shard(k as usize).poisoned.store(0, Ordering::Release);
            }
            self.rings = rings;
        }
        self.write_effective(&new)?;
        self.shards = (0..new.shard_count).map(|_| Proc::idle()).collect();
        self.control.shard_count().store(new.shard_count, Ordering::Release);
        self.control.stop_reading().store(0, Ordering::Release);
        self.cfg = new;
        self.start_writer()?;
        for k in 0..self.shards.len() {
            self.start_shard(k)?;
        }
        Ok(())
    }

    fn shutdown(&mut self) {
        crate::notify::notify("STOPPING=1");
        tracing::info!("shutting down: shards stop reading upstream");
        self.stop_children();
        if let Some(pg) = self.pg.as_mut() {
            pg.stop();
        }
        tracing::info!(last_seq = self.control.committed().load(Ordering::Acquire), "sluice stopped");
    }

    /// Steps 1-3 of the shutdown: stop reading, drain, stop the children.
    fn stop_children(&mut self) {
        let timeout = Duration::from_millis(self.cfg.shutdown_timeout_ms as u64);
        self.control.stop_reading().store(1, Ordering::Release);
        let deadline = Instant::now() + timeout;
        // Rings drain when the db-writer has committed everything in them.
        while Instant::now() < deadline && self.rings.iter().any(|r| r.used() > 0) {
            std::thread::sleep(Duration::from_millis(10));
        }
        for (k, p) in self.shards.iter_mut().enumerate() {
            p.assign = None;
            if let Some(c) = p.child.as_mut() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                wait_bounded(c, Duration::from_secs(5), &format!("shard {k}"));
            }
        }
        if let Some(c) = self.writer.child.as_mut() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            wait_bounded(c, timeout, "db-writer");
        }
        self.writer.child = None;
        for p in &mut self.shards {
            p.child = None;
        }
    }
}

fn backoff(restarts: u32) -> Duration {
    (Duration::from_millis(250) * 2u32.saturating_pow(restarts.min(10))).min(BACKOFF_MAX)
}

fn wait_bounded(c: &mut Child, d: Duration, what: &str) {
    let deadline = Instant::now() + d;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::warn!(what, "did not stop in time; killing it");
    let _ = c.kill();
    let _ = c.wait();
}

#[cfg(test)]
mod listen_tests {
    use super::*;

    #[test]
    fn proc_addresses_and_listeners() {
        assert_eq!(proc_ip("0100007F"), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(proc_ip("00000000000000000000000001000000"), Some("::1".parse().unwrap()));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = l.local_addr().unwrap();
        assert!(listener_on(at));
        assert!(listener_on(format!("0.0.0.0:{}", at.port()).parse().unwrap()), "a wildcard overlaps");
        assert!(reserve_listen(at).is_err());
        drop(l);
        assert!(!listener_on(at));
        let r = reserve_listen(at).unwrap();
        assert!(!listener_on(at), "a reservation does not listen");
        drop(r);
    }
}
