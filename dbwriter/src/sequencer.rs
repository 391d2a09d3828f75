//! The sequencer thread: the durable path of every event.
//!
//! One round, written as steps:
//! 0. Pace: unless [`COMMIT_GATHER_BYTES`] wait in the rings, let
//!    `commit_pace` (`flush_interval_ms`, default 2 ms) pass since the
//!    previous round began.
//! 1. Read up to [`BATCH_PER_RING`] records from each ring in turn (fair).
//!    Each turn reads its records twice: first to load, in one query, the
//!    accounts the cache lacks; then to apply them.
//! 2. Per record: drop what an earlier run already made durable (upstream
//!    seq at or below the host's durable cursor: a restarted shard re-reads
//!    from that cursor); load the account (cache, else Postgres); apply
//!    `policy::decide`; on relay, assign the next relay seq, re-sequence the
//!    frame and append it to the event log.
//! 3. `fsync` the log.
//! 4. One Postgres transaction: accounts, host cursors and counters,
//!    `relay_meta.last_seq`.
//! 5. Publish the committed watermark and release the ring space read.
//!
//! A crash anywhere before 4 commits leaves Postgres at the previous
//! round; on start the log is cut back to Postgres' last_seq and the rings
//! still hold the unreleased records, so nothing is lost or doubled. The
//! failpoints `sequencer-after-log-sync` (between 3 and 4) and
//! `sequencer-after-pg-commit` (between 4 and 5) let the e2e tests crash
//! exactly there (`common::process::failpoint`).

use crate::db::{self, Batch};
use crate::held::Held;
use crate::messages::Refused;
use postgres::Client;
use sluice_common::atproto::did::DidKey;
use sluice_common::atproto::frame;
use sluice_common::atproto::policy::{self, AccountState, AccountStatus, UpstreamStatus, Verdict};
use sluice_common::ipc::eventlog::LogWriter;
use sluice_common::ipc::ring::Consumer;
use sluice_common::ipc::ringrec::{did_hash, RingRecord};
use sluice_common::ipc::shm::{ControlBlock, Hist, WriterCounter, WriterState};
use sluice_common::process::clockcache::ClockCache;
use sluice_common::process::failpoint;
use sluice_common::process::host::HostLimits;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Waiting ring bytes that start a round at once, however short the time
/// since the previous one (see `Sequencer::commit_pace`).
pub const COMMIT_GATHER_BYTES: u64 = 1 << 20;

/// How often the per-host account limits are re-read from Postgres.
pub const LIMITS_RELOAD: Duration = Duration::from_secs(2);

/// Records taken from one ring per round.
pub const BATCH_PER_RING: usize = 2048;

pub struct Sequencer {
    pub pg: Client,
    /// The group commit's statements, prepared on `pg`.
    stmts: db::CommitStatements,
    /// Accounts this round's prefetch loaded from Postgres (`None`: not
    /// there, an account not seen before). Cleared every round; at most
    /// [`BATCH_PER_RING`] per ring.
    loaded: HashMap<DidKey, Option<AccountState>>,
    /// The last round's batch, emptied: its maps keep their room, so a
    /// round in the steady state allocates nothing per event for them
    /// (bounded by the largest round, [`BATCH_PER_RING`] per ring).
    spare_batch: Batch,
    pub log: LogWriter,
    pub control: Arc<ControlBlock>,
    pub rings: Vec<Consumer>,
    pub strict: bool,
    /// Accounts as Postgres holds them, by `DidKey::stored`, within
    /// `limits.account_cache_bytes` (never below two ring turns' worth).
    pub cache: ClockCache<AccountState>,
    /// Durable upstream cursor per host (as far as this process knows).
    pub host_floor: HashMap<i64, i64>,
    pub retention_micros: i64,
    pub scratch: Vec<u8>,
    /// Admin actions from the query workers.
    pub admin: Option<std::sync::mpsc::Receiver<crate::messages::Command>>,
    /// Per host: (account_limit, account_count as committed), reloaded
    /// every [`LIMITS_RELOAD`] (admin changes) and kept current between.
    pub host_limits: HashMap<i64, (i64, i64)>,
    pub limits_loaded: Option<Instant>,
    /// Trusted hosts and the limits of each kind (from the config).
    pub limits: HostLimits,
    /// Shortest time between the starts of two group commits while less
    /// than [`COMMIT_GATHER_BYTES`] wait (`flush_interval_ms`). A commit
    /// costs a log fsync and a Postgres commit, about 0.55 ms of CPU
    /// between this process and Postgres whatever its size; committing as
    /// soon as anything waited made 1,140 commits/s of 10 events each at
    /// 11,300 events/s (sluice-bench, BENCHMARKS.md).
    pub commit_pace: Duration,
    /// To the thread that flags a taken-down account's records.
    pub flag_jobs: Option<std::sync::mpsc::SyncSender<crate::messages::FlagJob>>,
    /// Flag jobs the flagger's queue had no room for yet, in order; sent
    /// as room frees, never dropped. Neighbours of the same kind merge, so
    /// this grows only with admin actions during one long scan.
    pending_flags: std::collections::VecDeque<crate::messages::FlagJob>,
    /// Offline this long, a host goes idle (`host_offline_idle_days`).
    pub offline_idle_after: Duration,
    /// Intake paused (disk full or Postgres away): since when, and why.
    paused: Option<(Instant, WriterState)>,
    /// Where to reconnect when Postgres goes away (None: the error ends
    /// the process, as in tests that build a sequencer by hand).
    pub database_url: Option<String>,
    /// Asks PDSes about accounts stuck inactive (`crate::recheck`).
    pub recheck: Option<std::sync::mpsc::SyncSender<crate::recheck::Request>>,
    /// Per account asked about: when, and whether the answer is still due.
    rechecked: HashMap<String, (Instant, bool)>,
    /// Commits held while their account's PDS is asked (and what follows
    /// them), in order, encoded; durable with each round.
    held: Held,
    /// Held records are being applied: a commit that still fails is
    /// dropped, not held again.
    releasing: bool,
    /// hosts.id -> (hostname, insecure), for the recheck requests.
    host_names: HashMap<i64, (String, bool)>,
    /// New settings from a reload (SIGHUP), taken between rounds.
    pub settings: Option<std::sync::mpsc::Receiver<Settings>>,
    /// When the shards read this round's events (unix micros), for the
    /// ingest-to-durable histogram; at most a round's records.
    ingested: Vec<i64>,
    /// The collection index (`crate::collections`) and the PDS answers
    /// for its checks.
    pub collections: Option<crate::collections::Keeper>,
    pub collection_answers: Option<flume::Receiver<crate::collections::check::Answer>>,
    gauges_at: Option<Instant>,
}

/// Keep the per-host account counts true as `state` is relayed: a new
/// account (`counted` None) adds to its host, a move moves it, a deletion
/// leaves the count and a restore comes back.
fn count_change(batch: &mut Batch, counted: Option<&AccountState>, state: &AccountState) {
    match counted {
        None => {
            *batch.new_accounts.entry(state.host_id).or_default() += 1;
        }
        Some(old) if old.host_id != state.host_id => batch.moves.push((old.host_id, state.host_id)),
        _ => {}
    }
    // Counts stay true both ways: a deleted account leaves its host's
    // count, and comes back if it is restored.
    if let Some(old) = counted {
        match (old.deleted_upstream(), state.deleted_upstream()) {
            (false, true) => *batch.new_accounts.entry(state.host_id).or_default() -= 1,
            (true, false) => *batch.new_accounts.entry(state.host_id).or_default() += 1,
            _ => {}
        }
    }
}

/// A takedown applied in this round, answered once it is durable: the
/// reply channel, the seq of its `#account` event, the DID, on or off.
type TakedownReply = (std::sync::mpsc::SyncSender<Result<i64, Refused>>, i64, String, bool);

/// The account cache's size: `bytes`, but never under two ring turns of
/// accounts, so what a turn's prefetch finds (and marks used) is still
/// there when the turn's records apply.
fn cache_floor(bytes: u64, rings: usize) -> u64 {
    let per = ClockCache::<AccountState>::ENTRY_BYTES as u64;
    bytes.max(per * (2 * BATCH_PER_RING * rings.max(1)) as u64)
}

/// What the sequencer takes from a reload, in place.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub strict: bool,
    pub retention_hours: f64,
    pub flush_interval_ms: u32,
    pub host_offline_idle_days: f64,
    pub account_cache_bytes: u64,
    pub limits: HostLimits,
}

impl Settings {
    pub fn from_config(cfg: &sluice_common::process::config::Config) -> Settings {
        Settings {
            strict: cfg.validation == sluice_common::process::config::Validation::Strict,
            retention_hours: cfg.retention_hours,
            flush_interval_ms: cfg.flush_interval_ms,
            host_offline_idle_days: cfg.host_offline_idle_days,
            account_cache_bytes: cfg.limits.account_cache_bytes,
            limits: cfg.host_limits(),
        }
    }
}

/// An account is asked about at most this often.
pub const RECHECK_EVERY: Duration = Duration::from_secs(300);
/// Accounts remembered as asked about (older entries are forgotten first).
pub const RECHECKED_MAX: usize = 10_000;
/// A question not answered in this long (the answer was lost) is asked again.
pub const RECHECK_ANSWER_MAX: Duration = Duration::from_secs(60);

/// Wait between attempts while the disk is full.
pub const DISK_FULL_RETRY: Duration = Duration::from_secs(1);

/// Did a group commit fail for want of space: ENOSPC/EDQUOT writing the
/// event log, or Postgres' `disk_full` (53100)? (A Postgres that panicked
/// on a full WAL disk drops the connection instead: the db-writer then
/// exits and the supervisor restarts the cluster and it.)
pub fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<sluice_common::ipc::eventlog::LogError>().is_some_and(|l| l.is_disk_full())
            || c.downcast_ref::<postgres::Error>()
                .is_some_and(|p| p.code() == Some(&postgres::error::SqlState::DISK_FULL))
            || c.downcast_ref::<db::DbError>().is_some_and(
                |d| matches!(d, db::DbError::Pg(p) if p.code() == Some(&postgres::error::SqlState::DISK_FULL)),
            )
    })
}

/// Did Postgres go away (connection closed or refused, an I/O error),
/// rather than refuse a statement?
pub fn is_db_lost(e: &anyhow::Error) -> bool {
    // Server-side: shutdown or crash of the server (class 57: a killed
    // postmaster makes its backends say "crash of another server
    // process"), or a connection exception (class 08).
    let lost = |p: &postgres::Error| {
        p.is_closed()
            || p.as_db_error().is_none_or(|d| {
                let code = d.code().code();
                code.starts_with("57") || code.starts_with("08")
            })
    };
    e.chain().any(|c| {
        c.downcast_ref::<postgres::Error>().is_some_and(lost)
            || c.downcast_ref::<db::DbError>().is_some_and(|d| matches!(d, db::DbError::Pg(p) if lost(p)))
    })
}

/// How often offline hosts are checked for turning idle.
pub const IDLE_SWEEP: Duration = Duration::from_secs(10);

/// Append `job` to the waiting flag jobs, merged into the last one when it
/// is of the same kind (hide or show): order between kinds is kept.
fn coalesce(pending: &mut std::collections::VecDeque<crate::messages::FlagJob>, job: crate::messages::FlagJob) {
    match pending.back_mut() {
        Some(last) if last.on == job.on => {
            last.dids.extend(job.dids);
            last.upto_seq = last.upto_seq.max(job.upto_seq);
        }
        _ => pending.push_back(job),
    }
}

fn now_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

impl Sequencer {
    pub fn new(
        mut pg: Client,
        log: LogWriter,
        control: Arc<ControlBlock>,
        rings: Vec<Consumer>,
        settings: Settings,
    ) -> Result<Sequencer, db::DbError> {
        let host_floor = db::hosts(&mut pg)?.into_iter().map(|h| (h.id, h.cursor)).collect();
        let stmts = db::CommitStatements::prepare(&mut pg)?;
        let held = Held::from_stored(db::held_events(&mut pg)?);
        // Whatever was held when the last run ended: its question to the
        // PDS died with it; the next round gives it up (commits dropped,
        // what waited behind them applied, in order).
        let overdue = Instant::now().checked_sub(RECHECK_ANSWER_MAX * 2).unwrap_or_else(Instant::now);
        let rechecked = held.dids().map(|d| (d.clone(), (overdue, true))).collect();
        let cache = ClockCache::with_bytes(cache_floor(settings.account_cache_bytes, rings.len()));
        Ok(Sequencer {
            pg,
            stmts,
            loaded: HashMap::new(),
            spare_batch: Batch::default(),
            log,
            control,
            rings,
            strict: settings.strict,
            cache,
            host_floor,
            retention_micros: (settings.retention_hours * 3_600_000_000.0) as i64,
            scratch: Vec::new(),
            admin: None,
            flag_jobs: None,
            pending_flags: Default::default(),
            host_limits: HashMap::new(),
            limits_loaded: None,
            limits: settings.limits.clone(),
            commit_pace: Duration::from_millis(2),
            offline_idle_after: Duration::from_secs(7 * 86_400),
            paused: None,
            database_url: None,
            recheck: None,
            rechecked,
            held,
            releasing: false,
            host_names: HashMap::new(),
            settings: None,
            ingested: Vec::new(),
            collections: None,
            collection_answers: None,
            gauges_at: None,
        })
    }

    /// Validation, the replay window, the commit pace and the idle delay.
    pub fn apply_settings(&mut self, s: Settings) {
        self.strict = s.strict;
        self.cache.set_capacity_bytes(cache_floor(s.account_cache_bytes, self.rings.len()));
        if s.limits != self.limits {
            self.limits = s.limits;
            self.limits_loaded = None;
        }
        self.retention_micros = (s.retention_hours * 3_600_000_000.0) as i64;
        self.commit_pace = Duration::from_millis(s.flush_interval_ms.into());
        self.offline_idle_after = Duration::from_secs_f64(s.host_offline_idle_days * 86_400.0);
    }

    /// The latest settings a reload sent, if any.
    fn take_settings(&mut self) {
        let Some(rx) = &self.settings else { return };
        if let Some(s) = rx.try_iter().last() {
            tracing::info!(
                strict = s.strict,
                retention_hours = s.retention_hours,
                flush_interval_ms = s.flush_interval_ms,
                account_cache_bytes = s.account_cache_bytes,
                trusted_hosts = ?s.limits.trusted,
                "db-writer settings reloaded"
            );
            self.apply_settings(s);
        }
    }

    /// Run until `stop` is set and every ring is empty.
    pub fn run(&mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        let mut last_retention = Instant::now();
        let mut last_idle_sweep = Instant::now() - IDLE_SWEEP;
        let mut round_began = Instant::now();
        loop {
            self.beat();
            self.take_settings();
            let since = round_began.elapsed();
            if since < self.commit_pace && self.unread_bytes() < COMMIT_GATHER_BYTES {
                std::thread::sleep(self.commit_pace - since);
            }
            round_began = Instant::now();
            self.send_flags();
            let n = match self.round() {
                Ok(n) => {
                    self.resumed();
                    n
                }
                Err(e) if is_disk_full(&e) => {
                    self.pause_for_disk(&e, stop)?;
                    if stop.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) if is_db_lost(&e) && self.database_url.is_some() => {
                    self.pause_for_db(&e, stop)?;
                    if stop.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            if n == 0 {
                if stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                let rings = &self.rings;
                self.control.writer_doorbell().wait(Duration::from_millis(20), || rings.iter().any(|r| r.has_data()));
            }
            if last_idle_sweep.elapsed() >= IDLE_SWEEP {
                last_idle_sweep = Instant::now();
                self.idle_sweep();
            }
            // Once a minute, or four times per window when it is shorter.
            let every = Duration::from_micros((self.retention_micros / 4).clamp(100_000, 60_000_000) as u64);
            if last_retention.elapsed() > every {
                last_retention = Instant::now();
                if let Some(first) = self.log.retain(now_micros() - self.retention_micros)? {
                    self.control.oldest().store(first as u64, Ordering::Release);
                }
            }
        }
    }

    /// Hosts offline past `host_offline_idle_days` go idle. A failure here
    /// is Postgres going away: the next round finds out and pauses.
    fn idle_sweep(&mut self) {
        match db::idle_offline_hosts(&mut self.pg, self.offline_idle_after) {
            Ok(hosts) => {
                for host in hosts {
                    tracing::warn!(
                        host,
                        days = self.offline_idle_after.as_secs_f64() / 86_400.0,
                        "host offline too long: now idle, not dialed until its next requestCrawl"
                    );
                }
            }
            Err(e) => tracing::debug!(error = %e, "idle-host sweep failed"),
        }
    }

    /// A round went through: if intake was paused, it resumes.
    fn resumed(&mut self) {
        if let Some((since, why)) = self.paused.take() {
            self.control.set_writer_state(WriterState::Ready);
            let what = if why == WriterState::DiskFull { "disk space is back" } else { "Postgres answers again" };
            tracing::info!(paused_s = since.elapsed().as_secs(), "{what}; intake resumed");
        }
    }

    /// A group commit failed for want of space: undo the round (the log
    /// back to what Postgres holds, the rings back to their released
    /// positions: the records are read again), say so on `_health` and in
    /// the metrics, and wait [`DISK_FULL_RETRY`] before the caller tries
    /// again. Intake stops meanwhile: the rings fill and the shards stop
    /// reading their hosts. One WARN per pause.
    fn pause_for_disk(&mut self, e: &anyhow::Error, stop: &AtomicBool) -> anyhow::Result<()> {
        if self.pause(WriterState::DiskFull, WriterCounter::DiskFullPauses) {
            tracing::warn!(
                error = %e,
                seq = self.log.next_seq() - 1,
                "disk full: intake paused, nothing is lost; retrying every second until space returns"
            );
        }
        let deadline = Instant::now() + DISK_FULL_RETRY;
        loop {
            self.beat();
            for r in &mut self.rings {
                r.rewind();
            }
            let durable = db::last_seq(&mut self.pg)?;
            self.held = Held::from_stored(db::held_events(&mut self.pg)?);
            match self.log.reopen(durable) {
                Ok(()) => break,
                Err(le) if le.is_disk_full() => {}
                Err(le) => return Err(le.into()),
            }
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        while Instant::now() < deadline && !stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Postgres stopped answering mid-round: undo the round as for a full
    /// disk, say so (`_health` 503 "database unavailable"), and reconnect
    /// every second until it answers (the supervisor restarts a private
    /// cluster that died). Intake stops meanwhile; nothing is lost. One
    /// WARN per pause.
    fn pause_for_db(&mut self, e: &anyhow::Error, stop: &AtomicBool) -> anyhow::Result<()> {
        if self.pause(WriterState::DbUnavailable, WriterCounter::DbPauses) {
            tracing::warn!(
                error = %e,
                seq = self.log.next_seq() - 1,
                "Postgres does not answer: intake paused, nothing is lost; reconnecting every second"
            );
        }
        let url = self.database_url.clone().expect("checked by the caller");
        loop {
            self.beat();
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let attempt = db::connect(&url).and_then(|mut pg| {
                let stmts = db::CommitStatements::prepare(&mut pg)?;
                let durable = db::last_seq(&mut pg)?;
                let floors: HashMap<i64, i64> = db::hosts(&mut pg)?.into_iter().map(|h| (h.id, h.cursor)).collect();
                let held = db::held_events(&mut pg)?;
                Ok((pg, stmts, durable, floors, held))
            });
            match attempt {
                Ok((pg, stmts, durable, floors, held)) => {
                    self.held = Held::from_stored(held);
                    self.pg = pg;
                    self.stmts = stmts;
                    for r in &mut self.rings {
                        r.rewind();
                    }
                    self.log.reopen(durable)?;
                    self.limits_loaded = None;
                    // The failed commit may have gone through (the server
                    // committed, the answer was lost): what Postgres holds
                    // is the truth. Its cursors make the re-read records
                    // duplicates, its accounts replace the cache, and what
                    // it made durable is visible to consumers.
                    self.host_floor = floors;
                    self.cache.clear();
                    self.control.committed().fetch_max(durable.max(0) as u64, Ordering::AcqRel);
                    return Ok(());
                }
                Err(err) => tracing::debug!(error = %err, "Postgres still unavailable"),
            }
            std::thread::sleep(DISK_FULL_RETRY);
        }
    }

    /// Enter a pause for `why` unless already in one: the writer state on
    /// `_health`, the counter. True when it began now (the caller logs).
    fn pause(&mut self, why: WriterState, counter: WriterCounter) -> bool {
        if self.paused.is_some() {
            return false;
        }
        self.paused = Some((Instant::now(), why));
        self.control.set_writer_state(why);
        self.count(counter);
        true
    }

    /// The heartbeat `_health` and the supervisor read.
    fn beat(&self) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.control.writer_heartbeat().store(now, Ordering::Relaxed);
    }

    fn unread_bytes(&self) -> u64 {
        self.rings.iter().map(|r| r.unread()).sum()
    }

    /// One group commit. Returns how many ring records it consumed.
    pub fn round(&mut self) -> anyhow::Result<usize> {
        if self.limits_loaded.is_none_or(|t| t.elapsed() > LIMITS_RELOAD) {
            self.host_limits = db::host_limits(&mut self.pg, &self.limits)?;
            self.limits_loaded = Some(Instant::now());
        }
        let mut batch = std::mem::take(&mut self.spare_batch);
        batch.last_seq = self.log.next_seq() - 1;
        // `loaded` is Postgres as of this round's start; accounts relayed in
        // this round are in `batch.accounts`, checked first.
        self.loaded.clear();
        self.ingested.clear();
        let mut ends: Vec<Option<u64>> = vec![None; self.rings.len()];
        let mut taken = 0;
        // Admin actions first: they are few and someone waits for them.
        let mut replies = Vec::new();
        taken += self.admin_commands(&mut batch, &mut replies)?;
        taken += self.release_overdue(&mut batch)?;
        taken += self.collection_answers(&mut batch)?;
        let mut rings = std::mem::take(&mut self.rings);
        let result = self.read_rings(&mut rings, &mut batch, &mut ends, &mut taken);
        self.rings = rings;
        result?;
        if taken == 0 {
            batch.clear();
            self.spare_batch = batch;
            return Ok(0);
        }
        let commit_began = Instant::now();
        batch.held = self.held.take_changed();
        self.log.sync()?;
        failpoint::hit("sequencer-after-log-sync");
        batch.last_seq = self.log.next_seq() - 1;
        self.commit(&mut batch)?;
        failpoint::hit("sequencer-after-pg-commit");
        self.keep_committed(&mut batch);
        self.control.committed().store(batch.last_seq.max(0) as u64, Ordering::Release);
        if self.control.oldest().load(Ordering::Acquire) == 0 {
            if let Some(first) = self.log.oldest_seq()? {
                self.control.oldest().store(first as u64, Ordering::Release);
            }
        }
        for (k, e) in ends.into_iter().enumerate() {
            if let Some(e) = e {
                self.rings[k].release(e);
            }
        }
        self.count(WriterCounter::Commits);
        self.observe_commit(commit_began);
        for (reply, seq, did, on) in replies {
            let _ = reply.send(Ok(seq));
            // Hide (or show again) the account's earlier records on replay.
            self.queue_flags(crate::messages::FlagJob { dids: vec![did], upto_seq: seq - 1, on });
        }
        self.send_flags();
        batch.clear();
        self.spare_batch = batch;
        Ok(taken)
    }

    /// Step 4: the round's transaction, with the collection index's
    /// changes (put back for the next round if it fails).
    fn commit(&mut self, batch: &mut Batch) -> anyhow::Result<()> {
        if let Some(k) = self.collections.as_mut() {
            k.take(&mut batch.index);
        }
        let changed = match db::commit(&mut self.pg, &self.stmts, batch) {
            Ok(c) => c,
            Err(e) => {
                if let Some(k) = self.collections.as_mut() {
                    k.restore(std::mem::take(&mut batch.index));
                }
                return Err(e.into());
            }
        };
        for (host, status) in changed {
            // The shard logged the change, with its reason.
            tracing::debug!(host, status = %status, "host status stored");
        }
        if let Some(k) = self.collections.as_mut() {
            k.committed(&batch.index);
            if self.gauges_at.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                self.gauges_at = Some(Instant::now());
                k.gauges();
                k.bytes_gauge();
            }
        }
        Ok(())
    }

    /// Apply the PDSes' answers about accounts' collections (at most a
    /// ring batch's worth a round). Returns how many were applied.
    fn collection_answers(&mut self, batch: &mut Batch) -> anyhow::Result<usize> {
        let Some(rx) = self.collection_answers.clone() else { return Ok(0) };
        let mut n = 0;
        while n < BATCH_PER_RING {
            let Ok(a) = rx.try_recv() else { break };
            let mut st = self.account(&a.did, batch)?;
            let Some(k) = self.collections.as_mut() else { break };
            if let crate::collections::Applied::Placed { numbered } = k.on_answer(&a, st.as_mut(), &mut batch.index) {
                if numbered {
                    batch.put(&a.did, st.expect("numbered: it has a state"));
                }
                n += 1;
            }
        }
        Ok(n)
    }

    /// Held lists whose PDS answer is overdue (lost, or asked by a run that
    /// ended): their commits are dropped, what waited behind them applies.
    /// Returns how many lists.
    fn release_overdue(&mut self, batch: &mut Batch) -> anyhow::Result<usize> {
        let overdue: Vec<String> = self
            .held
            .dids()
            .filter(|d| {
                self.rechecked.get(*d).is_none_or(|(at, pending)| *pending && at.elapsed() > RECHECK_ANSWER_MAX)
            })
            .cloned()
            .collect();
        for did in &overdue {
            self.rechecked.insert(did.clone(), (Instant::now(), false));
            self.release_held(did, batch)?;
        }
        Ok(overdue.len())
    }

    /// Apply the admin actions waiting (at most a queue's worth); returns
    /// how many. Takedowns answer once their round is durable (`replies`).
    fn admin_commands(&mut self, batch: &mut Batch, replies: &mut Vec<TakedownReply>) -> anyhow::Result<usize> {
        let mut taken = 0;
        let commands: Vec<crate::messages::Command> = match &self.admin {
            Some(rx) => std::iter::from_fn(|| rx.try_recv().ok()).take(crate::messages::QUEUE_MAX).collect(),
            None => Vec::new(),
        };
        for cmd in commands {
            taken += 1;
            match cmd {
                crate::messages::Command::UpstreamStatus(a) => self.upstream_status(a, batch)?,
                crate::messages::Command::HostCursor { host_id, cursor, reply } => {
                    let r = db::set_host_cursor(&mut self.pg, host_id, cursor)
                        .map_err(|e| Refused::Failed { subject: format!("host {host_id}"), detail: e.to_string() });
                    if r.is_ok() {
                        // Events above the new cursor are new again.
                        self.host_floor.insert(host_id, cursor);
                    }
                    let _ = reply.send(r);
                }
                crate::messages::Command::Takedown { did, takedown, reply } => {
                    match self.takedown(&did, takedown, batch) {
                        Ok(seq) => replies.push((reply, seq, did, takedown)),
                        Err(why) => {
                            let _ = reply.send(Err(why));
                        }
                    }
                }
            }
        }
        Ok(taken)
    }

    /// After a commit: the batch's account states, cursors and account
    /// counts are what Postgres now holds.
    fn keep_committed(&mut self, batch: &mut Batch) {
        // The batch's account states are what Postgres now holds: they move
        // to the cache (read batch first, then cache, so nothing changes
        // for lookups; one clone per event less).
        for (k, st) in batch.accounts.drain() {
            self.cache.put(k, st, st.host_id);
        }
        for (host, c) in &batch.cursors {
            let f = self.host_floor.entry(*host).or_insert(0);
            *f = (*f).max(*c);
        }
        for (host, d) in &batch.new_accounts {
            if let Some(l) = self.host_limits.get_mut(host) {
                l.1 += d;
            }
        }
        for (from, to) in &batch.moves {
            if let Some(l) = self.host_limits.get_mut(from) {
                l.1 -= 1;
            }
            if let Some(l) = self.host_limits.get_mut(to) {
                l.1 += 1;
            }
        }
    }

    /// The commit's time and each event's from the shard to durable.
    fn observe_commit(&mut self, began: Instant) {
        self.control.histogram(Hist::GroupCommit).observe(began.elapsed().as_micros() as u64);
        let now = now_micros();
        let h = self.control.histogram(Hist::IngestToDurable);
        for t in self.ingested.drain(..) {
            h.observe(now.saturating_sub(t).max(0) as u64);
        }
    }

    /// Queue a flag job for the flagger thread (see `pending_flags`).
    pub fn queue_flags(&mut self, job: crate::messages::FlagJob) {
        coalesce(&mut self.pending_flags, job);
        self.send_flags();
    }

    /// Hand waiting flag jobs to the flagger while its queue has room.
    fn send_flags(&mut self) {
        use std::sync::mpsc::TrySendError;
        let Some(tx) = &self.flag_jobs else { return };
        while let Some(job) = self.pending_flags.pop_front() {
            match tx.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(job)) => {
                    self.pending_flags.push_front(job);
                    return;
                }
                Err(TrySendError::Disconnected(job)) => {
                    tracing::error!(
                        dids = job.dids.len(),
                        did = job.dids.first().map(String::as_str).unwrap_or(""),
                        "the takedown flagger is gone; records stay as they are until the next start"
                    );
                    self.pending_flags.clear();
                    return;
                }
            }
        }
    }

    fn read_rings(
        &mut self,
        rings: &mut [Consumer],
        batch: &mut Batch,
        ends: &mut [Option<u64>],
        taken: &mut usize,
    ) -> anyhow::Result<()> {
        for (k, ring) in rings.iter_mut().enumerate() {
            let slot = self.control.shard(k);
            let poisoned = slot.poisoned.load(Ordering::Acquire);
            if poisoned != 0 {
                if slot.generation.load(Ordering::Acquire) == poisoned {
                    // Its shard may still be writing: nothing from it counts.
                    continue;
                }
                // The successor runs and waits for this: drop what the
                // poisoned process left, then let the successor write.
                ring.discard_all();
                ends[k] = Some(ring.position());
                *taken += 1;
                slot.poisoned.store(0, Ordering::Release);
                tracing::info!(shard = k, "corrupt ring cleared for the restarted shard");
                continue;
            }
            self.prefetch(ring, batch)?;
            let mut n = 0;
            let mut poisoned = false;
            while n < BATCH_PER_RING {
                let rec = match ring.next_record() {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(shard = k, error = %e, "ring corrupt; discarding it and restarting the shard");
                        poisoned = true;
                        break;
                    }
                };
                ends[k] = Some(rec.end);
                n += 1;
                *taken += 1;
                match RingRecord::decode(rec.payload) {
                    Ok(r) => self.apply(&r, batch)?,
                    Err(e) => {
                        tracing::error!(shard = k, error = %e, "undecodable ring record; restarting the shard");
                        poisoned = true;
                        break;
                    }
                }
            }
            if poisoned {
                // Never trust a corrupt ring: drop its content and make the
                // shard restart from its durable cursors.
                self.count(WriterCounter::CorruptRings);
                ring.discard_all();
                ends[k] = Some(ring.position());
                *taken += 1;
                // The generation that wrote it: that process must exit,
                // and this ring is not read again until its successor runs.
                let slot = self.control.shard(k);
                slot.poisoned.store(slot.generation.load(Ordering::Acquire).max(1), Ordering::Release);
            }
        }
        Ok(())
    }

    /// Take an account down (or reverse it): store the flag and emit the
    /// relay's `#account` event with the combined status.
    fn takedown(&mut self, did: &str, takedown: bool, batch: &mut Batch) -> Result<i64, Refused> {
        if !sluice_common::atproto::syntax::is_did(did) {
            return Err(Refused::NotADid(did.to_owned()));
        }
        let failed = |e: &dyn std::fmt::Display| Refused::Failed { subject: did.to_owned(), detail: e.to_string() };
        let stored = self.account(did, batch).map_err(|e| failed(&e))?;
        let Some(mut st) = stored else {
            return Err(Refused::UnknownAccount(did.to_owned()));
        };
        st.takendown = takedown;
        self.emit_account(did, st, batch).map_err(|e| failed(&e))
    }

    /// The relay's own `#account` event for `did` with the combined status
    /// of `st`, which becomes the stored state. Returns its seq.
    fn emit_account(
        &mut self,
        did: &str,
        st: AccountState,
        batch: &mut Batch,
    ) -> Result<i64, sluice_common::ipc::eventlog::LogError> {
        let status = st.status();
        let active = status == AccountStatus::Active;
        let seq = self.log.next_seq();
        let now = now_micros();
        let time = sluice_common::atproto::syntax::format_datetime_micros(now);
        self.scratch.clear();
        frame::AccountEvent { seq, did, time: &time, active, status: (!active).then_some(status.as_str()) }
            .encode(&mut self.scratch);
        self.log.append(seq, sluice_common::ipc::ringrec::Kind::Account as u8, 0, did_hash(did), now, &self.scratch)?;
        self.count(WriterCounter::Relayed);
        batch.put(did, st);
        Ok(seq)
    }

    /// A commit of an account stored as inactive, from its own host: hold
    /// it and ask the PDS (once per [`RECHECK_EVERY`]). False when it is
    /// not held (no recheck thread, asked lately and answered, or the
    /// bounds are reached): the caller drops it.
    fn hold_and_ask(
        &mut self,
        r: &RingRecord<'_>,
        e: &sluice_common::ipc::ringrec::EventRecord<'_>,
        batch: &mut Batch,
    ) -> anyhow::Result<bool> {
        let Some(tx) = self.recheck.clone() else { return Ok(false) };
        let pending = match self.rechecked.get(e.did) {
            // An answer lost on a full queue: what waited for it is dropped
            // (counted), and the PDS is asked afresh.
            Some((at, true)) if at.elapsed() > RECHECK_ANSWER_MAX => {
                self.release_held(e.did, batch)?;
                false
            }
            Some((at, pending)) if at.elapsed() < RECHECK_EVERY => {
                if !pending {
                    return Ok(false);
                }
                true
            }
            _ => false,
        };
        let mut rec = Vec::new();
        r.encode(&mut rec);
        if !self.held.has_room(e.did, rec.len()) {
            return Ok(false);
        }
        if !pending {
            if !self.host_names.contains_key(&e.host_id) {
                self.host_names =
                    db::hosts(&mut self.pg)?.into_iter().map(|h| (h.id, (h.hostname, h.insecure))).collect();
            }
            let Some((hostname, insecure)) = self.host_names.get(&e.host_id).cloned() else { return Ok(false) };
            let req = crate::recheck::Request { did: e.did.to_owned(), host_id: e.host_id, hostname, insecure };
            if tx.try_send(req).is_err() {
                return Ok(false);
            }
            if self.rechecked.len() >= RECHECKED_MAX {
                // Forget the answered ones first; they are the stale part.
                self.rechecked.retain(|_, (at, pending)| *pending && at.elapsed() < RECHECK_EVERY);
            }
            self.rechecked.insert(e.did.to_owned(), (Instant::now(), true));
            tracing::debug!(did = e.did, host = e.host_id, "commit from an account held inactive: asking its PDS");
        }
        self.held.push(e.did, rec);
        Ok(true)
    }

    /// Apply `did`'s held records in order: a PDS answer came, or none
    /// will. Each goes through the checks as it would have without
    /// holding (a commit of an account still stored inactive is dropped,
    /// counted, not held again); an `#account` among them applies in its
    /// place, so the commits after it see the account as it says.
    fn release_held(&mut self, did: &str, batch: &mut Batch) -> anyhow::Result<()> {
        let releasing = std::mem::replace(&mut self.releasing, true);
        let r = self.held.take(did).iter().try_for_each(|rec| -> anyhow::Result<()> {
            let r = RingRecord::decode(rec)?;
            if let RingRecord::Event(e) = &r {
                self.apply_event(&r, e, batch)?;
            }
            Ok(())
        });
        self.releasing = releasing;
        r
    }

    /// While `did` has commits held, its later events from the same host
    /// wait behind them (an `#identity` or `#sync` must not overtake a
    /// commit the PDS is being asked about). False when there is no room
    /// (the caller then gives the held commits up, in order).
    fn hold_behind(&mut self, r: &RingRecord<'_>, e: &sluice_common::ipc::ringrec::EventRecord<'_>) -> bool {
        // An answer overdue: the checks decide (a commit gives up on it).
        if self.rechecked.get(e.did).is_some_and(|(at, pending)| *pending && at.elapsed() > RECHECK_ANSWER_MAX) {
            return false;
        }
        let mut rec = Vec::new();
        r.encode(&mut rec);
        if self.held.first_host(e.did) != Some(e.host_id) || !self.held.has_room(e.did, rec.len()) {
            return false;
        }
        self.held.push(e.did, rec);
        true
    }

    /// The PDS answered about an account held inactive: if it says
    /// active (and the account still lives there, still inactive), store
    /// that and emit the relay's `#account`; then apply the held records in
    /// order (commits that still fail are dropped).
    fn upstream_status(&mut self, a: crate::recheck::Answer, batch: &mut Batch) -> anyhow::Result<()> {
        let held = self.held.len_of(&a.did);
        self.rechecked.insert(a.did.clone(), (Instant::now(), false));
        let stored = self.account(&a.did, batch)?;
        let stuck = stored.as_ref().is_some_and(|s| s.host_id == a.host_id && !s.upstream_active);
        let Some(mut st) = stored.filter(|_| stuck && a.active) else {
            tracing::debug!(did = a.did, active = a.active, held, "PDS answer changes nothing");
            return self.release_held(&a.did, batch);
        };
        st.upstream_active = true;
        st.upstream_status = UpstreamStatus::None;
        let seq = self.emit_account(&a.did, st, batch)?;
        tracing::info!(
            did = a.did,
            host = a.host_id,
            seq,
            held,
            "account active upstream (its PDS says so) though its #account never came: status corrected"
        );
        self.release_held(&a.did, batch)
    }

    /// Is `host` at its account limit, counting this batch's new accounts?
    fn host_full(&mut self, host: i64, batch: &Batch) -> anyhow::Result<bool> {
        if !self.host_limits.contains_key(&host) {
            self.host_limits = db::host_limits(&mut self.pg, &self.limits)?;
        }
        let Some(&(limit, count)) = self.host_limits.get(&host) else { return Ok(false) };
        Ok(count + batch.new_accounts.get(&host).copied().unwrap_or(0) >= limit)
    }

    fn count(&self, c: WriterCounter) {
        self.control.writer_counter(c).fetch_add(1, Ordering::Relaxed);
    }

    fn account(&mut self, did: &str, batch: &Batch) -> anyhow::Result<Option<AccountState>> {
        let k = DidKey::stored(did);
        if let Some(a) = batch.accounts.get(&k) {
            return Ok(Some(*a));
        }
        if let Some(a) = self.cache.get(&k) {
            return Ok(Some(a));
        }
        if let Some(a) = self.loaded.get(&k) {
            return Ok(*a);
        }
        self.count(WriterCounter::AccountLoads);
        let mut m = self.stmts.load_accounts(&mut self.pg, &[k])?;
        Ok(m.remove(&k))
    }

    /// First read of a ring's turn: load the accounts of its next
    /// [`BATCH_PER_RING`] records that neither the batch nor the cache
    /// holds, in one query, then step back so the records are applied in
    /// order. A cold cache (every db-writer start) would otherwise cost a
    /// Postgres round trip per account, one after another. A record that
    /// does not read or decode is left for the applying pass to report.
    fn prefetch(&mut self, ring: &mut Consumer, batch: &Batch) -> anyhow::Result<()> {
        let start = ring.position();
        let mut missing: Vec<DidKey> = Vec::new();
        for _ in 0..BATCH_PER_RING {
            let Ok(Some(rec)) = ring.next_record() else { break };
            if let Ok(RingRecord::Event(e)) = RingRecord::decode(rec.payload) {
                let k = DidKey::stored(e.did);
                // `get` marks a hit used, so this turn's puts do not evict it
                // (the cache holds at least two turns).
                if !batch.accounts.contains_key(&k) && self.cache.get(&k).is_none() && !self.loaded.contains_key(&k) {
                    missing.push(k);
                }
            }
        }
        ring.seek_back(start);
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort_unstable();
        missing.dedup();
        self.count(WriterCounter::AccountLoads);
        let mut found = self.stmts.load_accounts(&mut self.pg, &missing)?;
        for k in missing {
            let st = found.remove(&k);
            self.loaded.insert(k, st);
        }
        Ok(())
    }

    fn apply(&mut self, r: &RingRecord<'_>, batch: &mut Batch) -> anyhow::Result<()> {
        let (host, useq) = match r {
            RingRecord::Event(e) => (e.host_id, e.upstream_seq),
            RingRecord::Cursor { host_id, upstream_seq } => (*host_id, *upstream_seq),
            RingRecord::HostState { host_id, offline } => {
                batch.host_offline.insert(*host_id, *offline);
                return Ok(());
            }
        };
        let floor =
            batch.cursors.get(&host).copied().unwrap_or(i64::MIN).max(self.host_floor.get(&host).copied().unwrap_or(0));
        if useq <= floor {
            self.count(WriterCounter::Duplicates);
            return Ok(());
        }
        batch.cursors.insert(host, useq);
        let RingRecord::Event(e) = r else { return Ok(()) };
        self.apply_event(r, e, batch)
    }

    /// Apply one event past the duplicate check (also for held commits).
    fn apply_event(
        &mut self,
        r: &RingRecord<'_>,
        e: &sluice_common::ipc::ringrec::EventRecord<'_>,
        batch: &mut Batch,
    ) -> anyhow::Result<()> {
        let (host, useq) = (e.host_id, e.upstream_seq);
        if self.held.contains(e.did) {
            if self.hold_behind(r, e) {
                return Ok(());
            }
            // No room behind the held commit (or another host's event, or
            // an answer overdue): the held commits are dropped, as they
            // would have been without holding, and what waited behind them
            // applies first, so the account's events keep their order.
            self.release_held(e.did, batch)?;
        }
        let mut stored = self.account(e.did, batch)?;
        // Not in its host's account count yet: never seen, or throttled
        // when it appeared (its host was at its account limit).
        let admitting = stored.as_ref().is_none_or(|s| s.throttled);
        if admitting && self.host_full(host, batch)? {
            // Not admitted (yet): stored as throttled, nothing relayed,
            // until an admin gives the host room.
            self.count(WriterCounter::HostAccountLimit);
            tracing::debug!(did = e.did, host, upstream_seq = useq, "host at its account limit");
            if stored.is_none() {
                let st = AccountState { throttled: true, ..AccountState::new(host) };
                batch.put(e.did, st);
            }
            return Ok(());
        }
        if let Some(s) = stored.as_mut() {
            s.throttled = false;
        }
        let (verdict, state) = policy::decide(stored.as_ref(), e, self.strict);
        match verdict {
            Verdict::Drop(policy::Drop::Inactive)
                if !self.releasing
                    && stored.as_ref().is_some_and(|s| s.host_id == host)
                    && self.hold_and_ask(r, e, batch)? =>
            {
                return Ok(());
            }
            Verdict::Drop(d) => {
                self.count(WriterCounter::Dropped);
                tracing::debug!(did = e.did, host, upstream_seq = useq, reason = d.name(), "dropped");
                return Ok(());
            }
            Verdict::Relay { chain_break, proof_failed } => {
                if chain_break {
                    self.count(WriterCounter::ChainBreaks);
                }
                if proof_failed {
                    self.count(WriterCounter::ProofFailed);
                }
            }
        }
        // The account as its host's count knows it (None: not counted).
        count_change(batch, if admitting { None } else { stored.as_ref() }, &state);
        self.relay(e, stored.is_none(), state, batch)
    }

    /// Sequence a relayed event: the log, then what it changes of the
    /// account's state (and of the collection index).
    fn relay(
        &mut self,
        e: &sluice_common::ipc::ringrec::EventRecord<'_>,
        first_seen: bool,
        mut state: AccountState,
        batch: &mut Batch,
    ) -> anyhow::Result<()> {
        let seq = self.log.next_seq();
        self.scratch.clear();
        frame::resequence(e.frame, (e.seq_start as usize, e.seq_end as usize), seq, &mut self.scratch);
        self.log.append(seq, e.kind, 0, did_hash(e.did), e.time_micros, &self.scratch)?;
        self.ingested.push(e.time_micros);
        self.count(WriterCounter::Relayed);
        if e.kind == sluice_common::ipc::ringrec::Kind::Account as u8 {
            // News from the host itself: an account may be asked about
            // again after its next change, however recent the last answer.
            self.rechecked.remove(e.did);
        }
        if state.upstream_status == UpstreamStatus::Other && e.kind == sluice_common::ipc::ringrec::Kind::Account as u8
        {
            batch.words.insert(DidKey::stored(e.did), e.status.to_owned());
        }
        if let Some(k) = self.collections.as_mut() {
            k.on_event(e, first_seen, &mut state, &mut batch.index);
        }
        batch.put(e.did, state);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::FlagJob;

    #[test]
    fn waiting_flag_jobs_merge_by_kind_and_keep_order() {
        let job = |did: &str, upto, on| FlagJob { dids: vec![did.to_owned()], upto_seq: upto, on };
        let mut q = std::collections::VecDeque::new();
        coalesce(&mut q, job("a", 10, true));
        coalesce(&mut q, job("b", 20, true));
        coalesce(&mut q, job("a", 30, false));
        coalesce(&mut q, job("c", 25, false));
        coalesce(&mut q, job("a", 40, true));
        let got: Vec<(Vec<String>, i64, bool)> = q.into_iter().map(|j| (j.dids, j.upto_seq, j.on)).collect();
        assert_eq!(
            got,
            [
                (vec!["a".to_owned(), "b".to_owned()], 20, true),
                (vec!["a".to_owned(), "c".to_owned()], 30, false),
                (vec!["a".to_owned()], 40, true)
            ]
        );
    }
}
