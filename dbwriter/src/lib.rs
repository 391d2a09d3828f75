//! The db-writer process (`sluice db-writer`): plain threads, blocking I/O,
//! the only writer of Postgres and of the event log.
//!
//! - [`sequencer`]: drains the shards' rings, applies the stateful checks,
//!   assigns relay seqs, appends to the event log, group-commits.
//! - [`query`]: the XRPC endpoints other than subscribeRepos, answered over
//!   a Unix socket for the shards.
//! - [`db`]: Postgres (migrations, hosts, accounts, identities, the commit
//!   transaction).
//! - [`identity`]: the identity service: every shard's DID lookups, the
//!   identity store, the PLC directory's export followed.
//!
//! Started by the supervisor with the control block and every ring passed
//! as inherited file descriptors.

pub mod admin;
pub mod admission;
pub mod api;
pub mod collections;
pub mod db;
pub mod goat;
pub mod held;
pub mod identity;
pub mod messages;
pub mod query;
pub mod recheck;
pub mod sequencer;
pub mod serve;
pub mod throttle;

use sluice_common::ipc::eventlog::LogWriter;
use sluice_common::ipc::ring::{Consumer, Ring};
use sluice_common::ipc::shm::{ControlBlock, WriterCounter, WriterState};
use sluice_common::process::config::Config;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A reload: SIGHUP (passed on by the supervisor) sets `hup`, and the
/// effective config at `path` (rewritten by the supervisor) is applied in
/// place: the sequencer's settings and the query workers'.
pub struct Reload {
    pub path: std::path::PathBuf,
    pub hup: Arc<AtomicBool>,
}

/// Run the db-writer until `stop` is set and the rings are drained.
///
/// # Safety
/// `control_fd` and `ring_fds` must be the descriptors the supervisor
/// passed (memfds this process owns from now on).
pub unsafe fn run(
    cfg: &Config,
    database_url: &str,
    control_fd: RawFd,
    ring_fds: &[RawFd],
    stop: Arc<AtomicBool>,
    reload: Option<Reload>,
) -> anyhow::Result<()> {
    // SAFETY: forwarded to the caller.
    let control = Arc::new(unsafe { ControlBlock::from_raw_fd(control_fd) }?);
    control.set_writer_state(WriterState::Starting);
    let mut rings = Vec::new();
    for &fd in ring_fds {
        // SAFETY: forwarded to the caller.
        rings.push(Consumer::new(unsafe { Ring::from_raw_fd(fd) }?));
    }
    let mut pg = db::connect(database_url)?;
    let durable = db::last_seq(&mut pg)?;
    let log = LogWriter::open(&cfg.events_dir(), cfg.segment_size_bytes, durable)?;
    control.committed().store(durable.max(0) as u64, Ordering::Release);
    if let Some(first) = log.oldest_seq()? {
        control.oldest().store(first as u64, Ordering::Release);
    }
    let keeper = collections::Keeper::new(db::load_index(&mut pg)?, cfg.limits.collection_changes_max, control.clone());
    let index = keeper.index.clone();
    let (admin_tx, admin_rx) = messages::channel();
    let live = Arc::new(std::sync::RwLock::new(api::Live::from_config(cfg)?));
    let query_stop = Arc::new(AtomicBool::new(false));
    let mut workers = serve::start(
        &cfg.query_socket(),
        query_config(cfg, database_url, &control, live.clone(), admin_tx.clone(), index.clone())?,
        query_stop.clone(),
    )?;
    let identity = identity::start(identity_config(cfg, database_url)?, control.clone(), query_stop.clone())?;
    workers.extend(identity.threads);
    let mut seq = sequencer::Sequencer::new(pg, log, control.clone(), rings, sequencer::Settings::from_config(cfg))?;
    seq.apply_settings(sequencer::Settings::from_config(cfg));
    seq.database_url = Some(database_url.to_owned());
    seq.admin = Some(admin_rx);
    seq.collections = Some(keeper);
    let checker = collections::check::start(
        database_url.to_owned(),
        sluice_common::process::tls::client_config(cfg.tls_ca_file.as_deref())?,
        cfg.limits.collection_checks_per_host_per_second,
        control.clone(),
        query_stop.clone(),
    )?;
    seq.collection_answers = Some(checker.answers);
    workers.extend(checker.threads);
    seq.recheck =
        Some(recheck::start(sluice_common::process::tls::client_config(cfg.tls_ca_file.as_deref())?, admin_tx)?);
    if let Some(r) = reload {
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        seq.settings = Some(rx);
        workers.push(start_reloader(r, live, tx, identity.events, query_stop.clone())?);
    }
    let flagger = admin::start_flagger(cfg.events_dir(), control.clone())?;
    // A crash may have cut a flagging scan short: flag the taken-down
    // accounts' records once more (idempotent, one pass for all).
    let taken = db::taken_down_dids(&mut seq.pg)?;
    seq.flag_jobs = Some(flagger);
    if !taken.is_empty() {
        seq.queue_flags(admin::FlagJob { dids: taken, upto_seq: durable, on: true });
    }
    control.set_writer_state(WriterState::Ready);
    tracing::info!(durable_seq = durable, "db-writer ready");
    let r = seq.run(&stop);
    control.set_writer_state(WriterState::Stopping);
    query_stop.store(true, Ordering::Release);
    for w in workers {
        let _ = w.join();
    }
    log_stopped(&control, seq.log.next_seq() - 1);
    control.set_writer_state(WriterState::Stopped);
    r
}

/// The INFO line a stopping db-writer leaves.
fn log_stopped(control: &ControlBlock, last_seq: i64) {
    let n = |c| control.writer_counter(c).load(Ordering::Relaxed);
    tracing::info!(
        last_seq,
        relayed = n(WriterCounter::Relayed),
        dropped = n(WriterCounter::Dropped),
        duplicates = n(WriterCounter::Duplicates),
        chain_breaks = n(WriterCounter::ChainBreaks),
        "db-writer stopped"
    );
}

/// The identity service's configuration.
fn identity_config(cfg: &Config, database_url: &str) -> anyhow::Result<identity::ServiceConfig> {
    Ok(identity::ServiceConfig {
        socket: cfg.identity_socket(),
        database_url: database_url.to_owned(),
        plc_url: cfg.plc_url.clone(),
        allow_insecure: cfg.allow_insecure_hosts,
        settings: cfg.identity.clone(),
        refreshes_per_host_per_second: cfg.limits.identity_refreshes_per_host_per_second,
        tls: sluice_common::process::tls::client_config(cfg.tls_ca_file.as_deref())?,
    })
}

/// The query workers' configuration.
fn query_config(
    cfg: &Config,
    database_url: &str,
    control: &Arc<ControlBlock>,
    live: Arc<std::sync::RwLock<api::Live>>,
    admin: std::sync::mpsc::SyncSender<messages::Command>,
    collections: collections::Shared,
) -> anyhow::Result<api::QueryConfig> {
    let control = control.clone();
    Ok(api::QueryConfig {
        database_url: database_url.to_owned(),
        allow_insecure_hosts: cfg.allow_insecure_hosts,
        workers: 2,
        live,
        collections,
        run_dir: cfg.run_dir(),
        admin,
        net: Arc::new(admission::SystemNet::new(sluice_common::process::tls::client_config(
            cfg.tls_ca_file.as_deref(),
        )?)),
        auth_throttle: throttle::AuthThrottle::new(Box::new(move || {
            control.writer_counter(WriterCounter::AdminAuthFailures).fetch_add(1, Ordering::Relaxed);
        })),
    })
}

/// The thread that applies a reload: on SIGHUP, read the effective config
/// again and hand its settings to the query workers and the sequencer. A
/// file that does not load changes nothing (the supervisor checked it).
fn start_reloader(
    r: Reload,
    live: Arc<std::sync::RwLock<api::Live>>,
    to_sequencer: std::sync::mpsc::SyncSender<sequencer::Settings>,
    to_identity: flume::Sender<identity::Event>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("reload".into()).spawn(move || {
        while !stop.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(100));
            if !r.hup.swap(false, Ordering::AcqRel) {
                continue;
            }
            let cfg = match Config::from_effective(&r.path) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(path = %r.path.display(), error = %e, "reload: effective config unreadable; keeping the running settings");
                    continue;
                }
            };
            match api::Live::from_config(&cfg) {
                Ok(l) => *live.write().unwrap_or_else(|p| p.into_inner()) = l,
                Err(e) => tracing::error!(error = %e, "reload: keeping the running admin settings"),
            }
            // Full: the sequencer has not taken the last ones yet; the
            // next SIGHUP brings these again.
            let _ = to_sequencer.try_send(sequencer::Settings::from_config(&cfg));
            let _ = to_identity.send(identity::Event::Settings {
                settings: cfg.identity.clone(),
                refreshes_per_host_per_second: cfg.limits.identity_refreshes_per_host_per_second,
            });
        }
    })
}
