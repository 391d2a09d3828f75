//! The db-writer process (`sluice db-writer`): plain threads, blocking I/O,
//! the only writer of Postgres and of the event log.
//!
//! - [`sequencer`]: drains the shards' rings, applies the stateful checks,
//!   assigns relay seqs, appends to the event log, group-commits.
//! - [`query`]: the XRPC endpoints other than subscribeRepos, answered over
//!   a Unix socket for the shards.
//! - [`db`]: Postgres (migrations, hosts, accounts, the commit transaction).
//!
//! Started by the supervisor with the control block and every ring passed
//! as inherited file descriptors.

pub mod admin;
pub mod admission;
pub mod db;
pub mod goat;
pub mod query;
pub mod recheck;
pub mod sequencer;
pub mod throttle;

use sluice_common::config::{Config, Validation};
use sluice_common::eventlog::LogWriter;
use sluice_common::ring::{Consumer, Ring};
use sluice_common::shm::{ControlBlock, WriterCounter, WriterState};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
    let admin_password = match &cfg.admin_password_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("admin_password_file {}: {e}", p.display()))?
                .trim()
                .to_owned(),
        )
        .filter(|p| !p.is_empty()),
        None => None,
    };
    let (admin_tx, admin_rx) = admin::channel();
    let admin_tx_recheck = admin_tx.clone();
    let query_stop = Arc::new(AtomicBool::new(false));
    let workers = query::start(
        &cfg.query_socket(),
        query::QueryConfig {
            database_url: database_url.to_owned(),
            allow_insecure_hosts: cfg.allow_insecure_hosts,
            workers: 2,
            new_hosts_per_day_max: cfg.limits.new_hosts_per_day_max as i64,
            host_account_limit_default: cfg.limits.host_account_limit_default.min(i64::MAX as u64) as i64,
            public_request_crawl: cfg.public_request_crawl,
            run_dir: cfg.run_dir(),
            admin_password,
            admin: admin_tx,
            net: Arc::new(admission::SystemNet::new(sluice_common::tls::client_config(cfg.tls_ca_file.as_deref())?)),
            auth_throttle: {
                let control = control.clone();
                throttle::AuthThrottle::new(Box::new(move || {
                    control.writer_counter(WriterCounter::AdminAuthFailures).fetch_add(1, Ordering::Relaxed);
                }))
            },
        },
        query_stop.clone(),
    )?;
    let mut seq = sequencer::Sequencer::new(
        pg,
        log,
        control.clone(),
        rings,
        cfg.validation == Validation::Strict,
        cfg.limits.account_cache_entries_max as usize,
        cfg.retention_hours,
    )?;
    seq.commit_pace = std::time::Duration::from_millis(cfg.flush_interval_ms.into());
    seq.database_url = Some(database_url.to_owned());
    seq.offline_idle_after = std::time::Duration::from_secs_f64(cfg.host_offline_idle_days * 86_400.0);
    seq.admin = Some(admin_rx);
    seq.recheck =
        Some(recheck::start(sluice_common::tls::client_config(cfg.tls_ca_file.as_deref())?, admin_tx_recheck)?);
    let flagger = admin::start_flagger(cfg.events_dir(), control.clone())?;
    // A crash may have cut a flagging scan short: flag the taken-down
    // accounts' records once more (idempotent, one pass for all).
    let taken: Vec<String> =
        seq.pg.query("SELECT did FROM accounts WHERE takendown LIMIT 1000000", &[])?.iter().map(|r| r.get(0)).collect();
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
    let n = |c| control.writer_counter(c).load(Ordering::Relaxed);
    tracing::info!(
        last_seq = seq.log.next_seq() - 1,
        relayed = n(WriterCounter::Relayed),
        dropped = n(WriterCounter::Dropped),
        duplicates = n(WriterCounter::Duplicates),
        chain_breaks = n(WriterCounter::ChainBreaks),
        "db-writer stopped"
    );
    control.set_writer_state(WriterState::Stopped);
    r
}
