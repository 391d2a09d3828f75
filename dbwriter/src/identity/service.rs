//! The service loop: every request, answer, fetch and export page passes
//! through [`Service::on_event`] / [`Service::on_request`], one at a time,
//! on one thread; everything that blocks (Postgres, HTTP, sockets) is on
//! the threads around it. The behaviours are in the module docs of
//! [`super`]; the decision for one DID is [`Service::decide`].

use super::fair::FairQueue;
use super::fetch::{self, FetchError, EXPORT_COUNT};
use super::store::{ExportBatch, StoreJob};
use super::{ConnId, Event, ServiceConfig, PENDING_MAX, TICK};
use sluice_common::atproto::plc::PlcState;
use sluice_common::atproto::syntax::{format_datetime_micros, is_did};
use sluice_common::ipc::idwire::{Answer, IdentityRecord, Reason, Request, ToShard};
use sluice_common::ipc::shm::{ControlBlock, Hist, IdentityStat};
use sluice_common::process::rate::TokenBucket;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A DID's document is fetched at most once per this (an event that needs
/// a fresher one waits out the rest).
pub const REFETCH_MIN: Duration = Duration::from_secs(5);
/// An `#identity` event costs a fetch only if its DID was not fetched
/// within this.
pub const IDENTITY_REFRESH_MIN: Duration = Duration::from_secs(60);
/// An event that needs a fresh `did:plc` document waits at most this for
/// the next export poll, then asks the directory.
const FOLLOWER_WAIT_MAX: Duration = Duration::from_secs(5);
/// The export is read this often once caught up.
const EXPORT_POLL_EVERY: Duration = Duration::from_secs(1);
/// A caught-up read of the export vouches for the stored `did:plc`
/// documents this long (then, without a newer one, events that need a
/// fresh document ask the directory).
const EXPORT_VOUCHES_FOR: Duration = Duration::from_secs(15);
/// An unresolved DID is asked about again after this, doubling to
/// [`NEGATIVE_MAX`] while it stays unresolved.
const NEGATIVE_FIRST: Duration = Duration::from_secs(60);
const NEGATIVE_MAX: Duration = Duration::from_secs(3600);
/// Unresolved DIDs remembered at once.
const NEGATIVES_MAX: usize = 100_000;
/// While an unresolved DID is checked again in the background, its events
/// are answered "unresolved" with this retry time.
const RECHECK_ANSWER: Duration = Duration::from_secs(2);
/// The pause after a directory's 429, 503 or failure: doubles from the
/// first to the last while they repeat.
const PAUSE_FIRST: Duration = Duration::from_secs(1);
const PAUSE_MAX: Duration = Duration::from_secs(60);
/// A did:web document that fails is asked again after 1, 2, 4, 8 s...
const WEB_RETRY_MAX: Duration = Duration::from_secs(8);

/// What a directory worker is asked to do.
#[derive(Debug)]
pub enum FetchJob {
    Doc { did: String },
    Export { after: String },
}

/// A backoff plus up to a quarter at random: retries after failures
/// that come on a schedule (a directory's 5xx every few seconds) do not
/// keep step with it.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(1.0 + 0.25 * rand::random::<f64>())
}

fn now_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// A directory worker: one blocking request at a time.
pub fn start_worker(
    i: usize,
    dir: Arc<fetch::Directory>,
    jobs: flume::Receiver<FetchJob>,
    events: flume::Sender<Event>,
    control: Arc<ControlBlock>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(format!("identity-fetch-{i}")).spawn(move || {
        for job in jobs.iter() {
            let (sent_micros, began) = (now_micros(), Instant::now());
            let ev = match job {
                FetchJob::Doc { did } => {
                    let result = dir.document(&did).map(|id| {
                        let handle = id.handle.map(|h| h.into_string());
                        IdentityRecord::new(did.clone(), id.signing_key.as_ref(), id.pds_endpoint, handle, sent_micros)
                    });
                    Event::Fetched { did, sent_micros, result }
                }
                FetchJob::Export { after } => Event::ExportPage { sent_micros, result: dir.export_page(&after) },
            };
            control.histogram(Hist::IdentityFetch).observe(began.elapsed().as_micros() as u64);
            if events.send(ev).is_err() {
                return;
            }
        }
    })
}

/// A request waiting for its DID.
#[derive(Debug, Clone, Copy)]
struct Waiter {
    conn: ConnId,
    id: u64,
    reason: Reason,
    received: i64,
    host_id: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Asked of the store.
    Loading,
    /// To be decided ([`Service::decide`]).
    Idle,
    /// In the fair queue for a directory request.
    Queued,
    Fetching,
    /// Waiting to be fetched again no sooner than this.
    Retry(Instant),
    /// Waiting for the next export poll, at most until this.
    Follower(Instant),
}

/// A DID being resolved (one per DID, relay-wide).
#[derive(Debug)]
struct Pending {
    waiters: Vec<Waiter>,
    stage: Stage,
    stored: Option<IdentityRecord>,
    /// The host it is queued for (fairness).
    host_id: i64,
    first_failure: Option<Instant>,
    failures: u32,
    /// A fetch nobody waits for: the stored document is past its TTL.
    background: bool,
    /// The stored record came from a fetch made for these waiters.
    fetched: bool,
    /// When the first of its waiters asked (`identity_wait_max_s` counts
    /// from here).
    asked_at: Instant,
}

#[derive(Debug, Clone)]
struct Negative {
    until: Instant,
    backoff: Duration,
    permanent: bool,
    why: String,
}

/// Following the PLC export.
#[derive(Debug, Default)]
struct Follower {
    /// Where to read from; None until the store said (or at first start).
    cursor: Option<String>,
    /// A page is being read or applied.
    busy: bool,
    next_poll: Option<Instant>,
    /// The last read that reached the end: when its request was sent
    /// (unix micros), and when it was applied.
    caught_up: Option<(i64, Instant)>,
    /// Operations already applied that the next page may carry again.
    boundary: HashSet<String>,
    backoff: Duration,
    failing: bool,
}

pub struct Service {
    cfg: ServiceConfig,
    control: Arc<ControlBlock>,
    store: flume::Sender<StoreJob>,
    fetch: flume::Sender<FetchJob>,
    conns: HashMap<ConnId, flume::Sender<ToShard>>,
    pending: HashMap<String, Pending>,
    queue: FairQueue,
    /// Directory requests under way.
    busy: usize,
    plc_bucket: TokenBucket,
    /// PLC requests wait until then (a 429, 503 or failure).
    paused_until: Option<Instant>,
    pause: Duration,
    /// When the current pause began (unix micros): a failure of a request
    /// sent before then belongs to the wave that began it and does not
    /// double the pause again.
    paused_at_micros: i64,
    /// The PLC pace has a token again then.
    token_at: Option<Instant>,
    /// When the PLC directory last answered (anything but a failure).
    plc_ok_at: Option<Instant>,
    negatives: HashMap<String, Negative>,
    /// When each DID's document was last asked for (pruned past
    /// [`IDENTITY_REFRESH_MIN`]).
    recent_fetch: HashMap<String, Instant>,
    host_refresh: HashMap<i64, TokenBucket>,
    follower: Follower,
    timers: BinaryHeap<Reverse<(Instant, String)>>,
    last_gauges: Instant,
}

enum Wake {
    Event(Event),
    Request(ConnId, Request),
    Idle,
    Gone,
}

impl Service {
    pub fn new(
        cfg: ServiceConfig,
        control: Arc<ControlBlock>,
        store: flume::Sender<StoreJob>,
        fetch: flume::Sender<FetchJob>,
    ) -> Service {
        let now = Instant::now();
        let rate = cfg.settings.plc_requests_per_second;
        let follower = Follower { backoff: PAUSE_FIRST, ..Follower::default() };
        Service {
            cfg,
            control,
            store,
            fetch,
            conns: HashMap::new(),
            pending: HashMap::new(),
            queue: FairQueue::default(),
            busy: 0,
            plc_bucket: TokenBucket::new(rate, 1.0, now),
            paused_until: None,
            paused_at_micros: 0,
            pause: PAUSE_FIRST,
            token_at: None,
            plc_ok_at: None,
            negatives: HashMap::new(),
            recent_fetch: HashMap::new(),
            host_refresh: HashMap::new(),
            follower,
            timers: BinaryHeap::new(),
            last_gauges: now,
        }
    }

    pub fn run(
        mut self,
        events: flume::Receiver<Event>,
        requests: flume::Receiver<(ConnId, Request)>,
        stop: &AtomicBool,
    ) {
        while !stop.load(Ordering::Acquire) {
            let timeout = self.next_wake().saturating_duration_since(Instant::now()).min(TICK);
            let wake = if self.pending.len() < PENDING_MAX {
                flume::Selector::new()
                    .recv(&events, |e| e.map_or(Wake::Gone, Wake::Event))
                    .recv(&requests, |r| r.map_or(Wake::Gone, |(c, r)| Wake::Request(c, r)))
                    .wait_timeout(timeout)
                    .unwrap_or(Wake::Idle)
            } else {
                match events.recv_timeout(timeout) {
                    Ok(e) => Wake::Event(e),
                    Err(flume::RecvTimeoutError::Timeout) => Wake::Idle,
                    Err(flume::RecvTimeoutError::Disconnected) => Wake::Gone,
                }
            };
            match wake {
                Wake::Event(e) => self.on_event(e),
                Wake::Request(c, r) => self.on_request(c, r),
                Wake::Idle => {}
                Wake::Gone => return,
            }
            self.fire_timers();
            self.dispatch();
            self.publish_gauges();
        }
    }

    fn count(&self, s: IdentityStat) {
        self.control.identity_stat(s).fetch_add(1, Ordering::Relaxed);
    }

    /// The earliest time something is due: a timer, or (with a worker
    /// free) PLC work that waits for the end of a pause or for a token.
    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut at = now + TICK;
        if let Some(Reverse((t, _))) = self.timers.peek() {
            at = at.min(*t);
        }
        if self.busy >= self.cfg.settings.fetch_concurrency as usize {
            return at; // a worker's answer wakes the loop
        }
        let plc_ready = match self.paused_until.filter(|t| *t > now) {
            Some(t) => t,
            None => self.token_at.filter(|t| *t > now).unwrap_or(now),
        };
        if self.queue.peek().is_some_and(|d| d.starts_with("did:plc:")) {
            at = at.min(plc_ready);
        } else if !self.queue.is_empty() {
            at = now;
        }
        if let Some(t) = self.follower.next_poll.filter(|_| !self.follower.busy) {
            at = at.min(t.max(plc_ready));
        }
        at
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::Connected { conn, out } => {
                self.conns.insert(conn, out);
            }
            Event::Disconnected { conn } => {
                self.conns.remove(&conn);
            }
            Event::Cursor(c) => self.start_following(c),
            Event::Loaded(results) => {
                for (did, stored) in results {
                    if let Some(p) = self.pending.get_mut(&did) {
                        p.stored = stored;
                        p.stage = Stage::Idle;
                        self.decide(&did);
                    }
                }
            }
            Event::Fetched { did, sent_micros, result } => self.fetched(did, sent_micros, result),
            Event::ExportPage { sent_micros, result } => self.export_page(sent_micros, result),
            Event::ExportApplied { changed, cursor, full, sent_micros } => {
                self.export_applied(changed, cursor, full, sent_micros)
            }
            Event::Settings { settings, refreshes_per_host_per_second } => {
                self.plc_bucket.set_rate(settings.plc_requests_per_second, 1.0);
                self.cfg.settings = settings;
                self.cfg.refreshes_per_host_per_second = refreshes_per_host_per_second;
                self.host_refresh.clear();
            }
        }
    }

    fn on_request(&mut self, conn: ConnId, req: Request) {
        self.count(IdentityStat::Requests);
        let Request { id, did, host_id, reason, received_micros } = req;
        let w = Waiter { conn, id, reason, received: received_micros, host_id };
        if !is_did(&did) {
            self.unresolved_answer(w, true, NEGATIVE_MAX, format!("{did:?} is not a DID"));
            return;
        }
        if let Some(n) = self.negatives.get(&did).cloned() {
            let now = Instant::now();
            if n.until > now {
                self.unresolved_answer(w, n.permanent, n.until - now, n.why);
                return;
            }
            // Due for a re-check: made in the background, the events
            // dropped meanwhile (a DID that stays unresolved never holds
            // its host back again).
            self.unresolved_answer(w, n.permanent, RECHECK_ANSWER, n.why);
            if !self.pending.contains_key(&did) {
                self.recheck(did);
            }
            return;
        }
        match self.pending.get_mut(&did) {
            Some(p) => {
                p.waiters.push(w);
                if matches!(p.stage, Stage::Follower(_) | Stage::Retry(_)) {
                    let stage = p.stage;
                    p.stage = Stage::Idle;
                    self.decide_from(&did, stage);
                }
            }
            None => {
                let p = Pending {
                    waiters: vec![w],
                    stage: Stage::Loading,
                    stored: None,
                    host_id,
                    first_failure: None,
                    failures: 0,
                    background: false,
                    fetched: false,
                    asked_at: Instant::now(),
                };
                self.pending.insert(did.clone(), p);
                let _ = self.store.send(StoreJob::Load(did));
            }
        }
    }

    /// Ask about an unresolved DID again, nobody waiting.
    fn recheck(&mut self, did: String) {
        let p = Pending {
            waiters: Vec::new(),
            stage: Stage::Loading,
            stored: None,
            host_id: 0,
            first_failure: None,
            failures: 0,
            background: true,
            fetched: false,
            asked_at: Instant::now(),
        };
        self.pending.insert(did.clone(), p);
        let _ = self.store.send(StoreJob::Load(did));
    }

    /// When the stored document of `did` is known current at: when it was
    /// fetched (or changed by the export), or, for a `did:plc` while the
    /// export is followed and caught up, when it was last read to its end.
    fn fresh_as_of(&self, did: &str, stored: &IdentityRecord) -> i64 {
        match self.follower_as_of() {
            Some(f) if did.starts_with("did:plc:") => stored.as_of_micros.max(f),
            _ => stored.as_of_micros,
        }
    }

    /// The export is followed and not failing: it vouches for stored
    /// did:plc documents once its next read ends (at start, its first).
    fn follower_expected(&self) -> bool {
        self.cfg.settings.plc_export && !self.follower.failing
    }

    fn follower_as_of(&self) -> Option<i64> {
        let (sent, at) = self.follower.caught_up?;
        (self.cfg.settings.plc_export && at.elapsed() < EXPORT_VOUCHES_FOR).then_some(sent)
    }

    fn ttl(&self, did: &str) -> Duration {
        let hours =
            if did.starts_with("did:plc:") { self.cfg.settings.plc_ttl_hours } else { self.cfg.settings.web_ttl_hours };
        Duration::from_secs_f64(hours * 3600.0)
    }

    /// Should a refresh for an event of `host` be skipped, the stored
    /// document answering (an `#identity` whose DID was fetched lately;
    /// any refresh past the host's rate)?
    fn skip_refresh(&mut self, did: &str, reason: Reason, host: i64, now: Instant) -> bool {
        let lately = self.recent_fetch.get(did).is_some_and(|t| now < *t + IDENTITY_REFRESH_MIN);
        if reason == Reason::Identity && lately {
            return true;
        }
        let rate = self.cfg.refreshes_per_host_per_second;
        let b = self.host_refresh.entry(host).or_insert_with(|| TokenBucket::new(rate, rate * 10.0, now));
        b.take(now).is_some()
    }

    fn decide(&mut self, did: &str) {
        self.decide_from(did, Stage::Idle);
    }

    /// Answer what the stored document satisfies, and for the rest (or a
    /// TTL refresh) choose: wait for the export, wait out the refetch
    /// spacing, or queue a directory request. `was`: the stage it left
    /// (a wait for the export keeps its deadline).
    fn decide_from(&mut self, did: &str, was: Stage) {
        let Some(mut p) = self.pending.remove(did) else { return };
        if matches!(p.stage, Stage::Loading | Stage::Queued | Stage::Fetching) {
            self.pending.insert(did.to_owned(), p);
            return;
        }
        let now = Instant::now();
        let mut left = Vec::new();
        if let Some(stored) = p.stored.clone() {
            let fresh = self.fresh_as_of(did, &stored);
            let answer = IdentityRecord { as_of_micros: fresh, ..stored };
            for w in std::mem::take(&mut p.waiters) {
                let satisfied = match w.reason {
                    Reason::Miss => true,
                    _ if fresh >= w.received => true,
                    // With the export followed, a fresh did:plc document
                    // costs no request: wait for the next poll instead.
                    _ if did.starts_with("did:plc:") && self.follower_expected() => false,
                    reason => {
                        let skip = self.skip_refresh(did, reason, w.host_id, now);
                        if skip {
                            self.count(IdentityStat::RefreshSkipped);
                        }
                        skip
                    }
                };
                if satisfied {
                    self.count(if p.fetched { IdentityStat::AnsweredFetched } else { IdentityStat::AnsweredStored });
                    self.send(w.conn, ToShard::Answer { id: w.id, answer: Answer::Found(answer.clone()) });
                } else {
                    left.push(w);
                }
            }
            // Past its TTL: answered all the same, and fetched again.
            p.background = (fresh as i128) < now_micros() as i128 - self.ttl(did).as_micros() as i128;
        } else {
            left = std::mem::take(&mut p.waiters);
        }
        p.waiters = left;
        p.fetched = false;
        if p.waiters.is_empty() && !p.background {
            return;
        }
        if let Some(w) = p.waiters.first() {
            p.host_id = w.host_id;
        }
        p.stage = self.next_stage(did, was, now, p.stored.is_some());
        match p.stage {
            Stage::Queued => self.queue.push_back(p.host_id, did.to_owned()),
            Stage::Retry(t) | Stage::Follower(t) => self.timers.push(Reverse((t, did.to_owned()))),
            _ => {}
        }
        if !did.starts_with("did:plc:") && !p.waiters.is_empty() {
            // A did:web host that does not answer costs its waiters no more
            // than the wait allowed, whatever its request is doing.
            self.timers.push(Reverse((p.asked_at + self.wait_max(), did.to_owned())));
        }
        self.pending.insert(did.to_owned(), p);
    }

    fn wait_max(&self) -> Duration {
        Duration::from_secs(self.cfg.settings.wait_max_s as u64)
    }

    /// Where a DID that needs a (fresher) document goes next.
    fn next_stage(&self, did: &str, was: Stage, now: Instant, stored: bool) -> Stage {
        if stored && did.starts_with("did:plc:") && self.follower_expected() {
            match was {
                Stage::Follower(deadline) if deadline <= now => {}
                Stage::Follower(deadline) => return Stage::Follower(deadline),
                _ => return Stage::Follower(now + FOLLOWER_WAIT_MAX),
            }
        }
        match self.recent_fetch.get(did) {
            Some(t) if now < *t + REFETCH_MIN => Stage::Retry(*t + REFETCH_MIN),
            _ => Stage::Queued,
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((t, _))) = self.timers.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((_, did))) = self.timers.pop() else { break };
            let wait_max = self.wait_max();
            let Some(p) = self.pending.get_mut(&did) else { continue };
            let stage = p.stage;
            if !p.waiters.is_empty() && !did.starts_with("did:plc:") && p.asked_at + wait_max <= now {
                // Its own host did not answer in time: the waiters go,
                // the request (if under way) may still land.
                let waiters = std::mem::take(&mut p.waiters);
                let why = format!("no answer within {} s", self.cfg.settings.wait_max_s);
                self.unresolved(&did, waiters, false, why);
                if !matches!(stage, Stage::Fetching) {
                    self.pending.remove(&did);
                }
                continue;
            }
            match stage {
                Stage::Retry(t) | Stage::Follower(t) if t <= now => {
                    p.stage = Stage::Idle;
                    if let Stage::Retry(_) = stage {
                        // Spaced out: it may be fetched now.
                        self.recent_fetch.remove(&did);
                    }
                    self.decide_from(&did, stage);
                }
                _ => {}
            }
        }
    }

    /// May a PLC request go now? No while paused, or with no token yet
    /// (then [`Service::next_wake`] wakes the loop when one is there).
    fn plc_may_send(&mut self, now: Instant) -> bool {
        if self.paused_until.is_some_and(|t| now < t) {
            return false;
        }
        match self.plc_bucket.take(now) {
            None => {
                self.token_at = None;
                true
            }
            Some(wait) => {
                self.token_at = Some(now + wait);
                false
            }
        }
    }

    /// Hand work to free directory workers: the export poll first (it
    /// makes per-DID requests unnecessary), then the fair queue. PLC
    /// requests wait for the pace and any pause; did:web ones only for a
    /// worker.
    fn dispatch(&mut self) {
        let now = Instant::now();
        let workers = self.cfg.settings.fetch_concurrency as usize;
        if self.export_due(now) && self.busy < workers && self.plc_may_send(now) {
            let after = self.follower.cursor.clone().expect("due only with a cursor");
            if self.fetch.try_send(FetchJob::Export { after }).is_ok() {
                self.busy += 1;
                self.follower.busy = true;
                self.follower.next_poll = None;
            }
        }
        while self.busy < workers {
            let Some(did) = self.queue.peek().map(str::to_owned) else { break };
            if did.starts_with("did:plc:") && !self.plc_may_send(now) {
                break;
            }
            let Some((_, did)) = self.queue.pop() else { break };
            if self.fetch.try_send(FetchJob::Doc { did: did.clone() }).is_err() {
                let host = self.pending.get(&did).map_or(0, |p| p.host_id);
                self.queue.push_front(host, did);
                break;
            }
            self.busy += 1;
            self.recent_fetch.insert(did.clone(), now);
            if let Some(p) = self.pending.get_mut(&did) {
                p.stage = Stage::Fetching;
            }
        }
    }

    fn export_due(&self, now: Instant) -> bool {
        self.cfg.settings.plc_export
            && !self.follower.busy
            && self.follower.cursor.is_some()
            && self.follower.next_poll.is_some_and(|t| t <= now)
    }

    /// Send to a shard; a shard whose queue is full has stopped reading: it
    /// is cut, and asks again when it reconnects.
    fn send(&mut self, conn: ConnId, msg: ToShard) {
        let Some(tx) = self.conns.get(&conn) else { return };
        if tx.try_send(msg).is_err() {
            tracing::warn!(conn, "identity socket: a shard does not read its answers; closing its connection");
            self.conns.remove(&conn);
        }
    }

    /// Tell every shard a DID's identity changed.
    fn push(&mut self, rec: &IdentityRecord) {
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for c in conns {
            self.send(c, ToShard::Changed(rec.clone()));
        }
        self.count(IdentityStat::Pushed);
    }

    fn unresolved_answer(&mut self, w: Waiter, permanent: bool, retry_after: Duration, why: String) {
        self.count(IdentityStat::AnsweredUnresolved);
        let answer = Answer::Unresolved { permanent, retry_after_ms: retry_after.as_millis() as u64, why };
        self.send(w.conn, ToShard::Answer { id: w.id, answer });
    }

    /// Give up on `did` for now: answer every waiter "unresolved", and
    /// remember it for a backoff that doubles while it stays so.
    fn give_up(&mut self, did: &str, p: Pending, permanent: bool, why: String) {
        self.unresolved(did, p.waiters, permanent, why);
    }

    /// Answer `waiters` "unresolved" and remember `did` so for a backoff
    /// that doubles while it stays so.
    fn unresolved(&mut self, did: &str, waiters: Vec<Waiter>, permanent: bool, why: String) {
        let now = Instant::now();
        let backoff = self.negatives.get(did).map_or(NEGATIVE_FIRST, |n| (n.backoff * 2).min(NEGATIVE_MAX));
        tracing::debug!(did, permanent, why, retry_in_s = backoff.as_secs(), "identity unresolved");
        if self.negatives.len() >= NEGATIVES_MAX {
            self.negatives.retain(|_, n| n.until > now);
        }
        if self.negatives.len() < NEGATIVES_MAX || self.negatives.contains_key(did) {
            let n = Negative { until: now + backoff, backoff, permanent, why: why.clone() };
            self.negatives.insert(did.to_owned(), n);
        }
        for w in waiters {
            self.unresolved_answer(w, permanent, backoff, why.clone());
        }
    }

    fn fetched(&mut self, did: String, sent_micros: i64, result: Result<IdentityRecord, FetchError>) {
        self.busy = self.busy.saturating_sub(1);
        let plc = did.starts_with("did:plc:");
        let now = Instant::now();
        self.count(match &result {
            Ok(_) => IdentityStat::FetchOk,
            Err(FetchError::NotFound(_)) => IdentityStat::FetchNotFound,
            Err(FetchError::Invalid(_)) => IdentityStat::FetchInvalid,
            Err(FetchError::Refused(_)) => IdentityStat::FetchRefused,
            Err(FetchError::RateLimited { .. }) => IdentityStat::FetchRateLimited,
            Err(FetchError::Failed(_)) => IdentityStat::FetchError,
        });
        if plc && result.as_ref().err().is_none_or(FetchError::is_permanent) {
            self.plc_answered(now);
        }
        let Some(mut p) = self.pending.remove(&did) else { return };
        match result {
            Ok(rec) => {
                let changed = p.stored.as_ref().is_some_and(|s| !s.same_identity(&rec));
                let _ = self.store.send(StoreJob::Save(rec.clone()));
                if changed {
                    self.push(&rec);
                }
                self.negatives.remove(&did);
                p.stored = Some(rec);
                (p.first_failure, p.failures, p.background, p.fetched) = (None, 0, false, true);
                p.stage = Stage::Idle;
                self.pending.insert(did.clone(), p);
                self.decide(&did);
            }
            Err(e) if e.is_permanent() => {
                if p.stored.is_some() {
                    let _ = self.store.send(StoreJob::Delete(did.clone()));
                }
                self.give_up(&did, p, true, e.to_string());
            }
            Err(FetchError::RateLimited { retry_after, why }) if plc => {
                self.pause_plc(now, sent_micros, retry_after, &why);
                p.stage = Stage::Queued;
                self.queue.push_front(p.host_id, did.clone());
                self.pending.insert(did, p);
            }
            Err(e) => self.failed(did, p, sent_micros, e, now),
        }
    }

    /// A directory request for `did` sent at `sent_micros` failed (not
    /// permanently).
    fn failed(&mut self, did: String, mut p: Pending, sent_micros: i64, e: FetchError, now: Instant) {
        let plc = did.starts_with("did:plc:");
        let first = *p.first_failure.get_or_insert(now);
        p.failures += 1;
        let waited = now.duration_since(p.asked_at) >= self.wait_max();
        if p.waiters.is_empty() {
            // A background refresh: the stored document stays; a re-check
            // of an unresolved DID renews its backoff.
            if p.stored.is_none() {
                self.give_up(&did, p, false, e.to_string());
            }
            return;
        }
        if plc {
            // The directory failing for everyone is waited for; failing
            // for this DID while it answers others is this DID's.
            self.pause_plc(now, sent_micros, None, &e.to_string());
            if waited && self.plc_ok_at.is_some_and(|t| t > first) {
                return self.give_up(&did, p, false, format!("{e} (for {} s)", now.duration_since(first).as_secs()));
            }
            p.stage = Stage::Queued;
            self.queue.push_front(p.host_id, did.clone());
        } else {
            if waited {
                return self.give_up(&did, p, false, format!("{e} (for {} s)", now.duration_since(first).as_secs()));
            }
            let wait = Duration::from_secs(1 << p.failures.min(8)).min(WEB_RETRY_MAX) / 2;
            p.stage = Stage::Retry(now + wait);
            self.recent_fetch.remove(&did);
            self.timers.push(Reverse((now + wait, did.clone())));
        }
        self.pending.insert(did, p);
    }

    /// The PLC directory answered (a document, or a definite "no"): pauses
    /// end and the backoff starts again from the first.
    fn plc_answered(&mut self, now: Instant) {
        self.plc_ok_at = Some(now);
        self.pause = PAUSE_FIRST;
    }

    /// Pause every PLC request: for the directory's Retry-After if it gave
    /// one, and at least the backoff, which doubles while this repeats.
    /// The answers of requests already on their way when a pause began
    /// (`sent_micros` before it) are one wave: they may lengthen the pause
    /// to their Retry-After but do not double it again (four requests
    /// failing in one burst would otherwise wait 16 s at once). The
    /// backoff is [`jittered`].
    fn pause_plc(&mut self, now: Instant, sent_micros: i64, retry_after: Option<Duration>, why: &str) {
        let same_wave = sent_micros < self.paused_at_micros;
        let wait = if same_wave {
            retry_after.unwrap_or_default()
        } else {
            let backoff = jittered(self.pause);
            retry_after.unwrap_or_default().max(backoff)
        };
        let until = now + wait;
        if self.paused_until.is_none_or(|t| t < until) {
            if self.pause == PAUSE_FIRST && !same_wave {
                tracing::info!(why, pause_ms = wait.as_millis() as u64, "PLC directory: pausing requests");
            }
            self.paused_until = Some(until);
        }
        if !same_wave {
            self.paused_at_micros = now_micros();
            self.pause = (self.pause * 2).min(PAUSE_MAX);
        }
    }

    /// The store's cursor came: follow from there (or, the first time,
    /// from now: DIDs met later are fetched whole anyway).
    fn start_following(&mut self, cursor: Option<String>) {
        let c = cursor.unwrap_or_else(|| format_datetime_micros(now_micros()));
        self.follower.cursor = Some(c);
        self.follower.next_poll = Some(Instant::now());
    }

    fn export_page(&mut self, sent_micros: i64, result: Result<fetch::ExportPage, FetchError>) {
        self.busy = self.busy.saturating_sub(1);
        let now = Instant::now();
        let page = match result {
            Ok(p) => p,
            Err(e) => {
                self.count(IdentityStat::ExportErrors);
                if let FetchError::RateLimited { retry_after, why } = &e {
                    self.pause_plc(now, sent_micros, *retry_after, why);
                }
                if !self.follower.failing {
                    tracing::warn!(error = %e, "PLC export: read failed; retrying with backoff");
                }
                self.follower.failing = true;
                self.follower.busy = false;
                self.follower.next_poll = Some(now + jittered(self.follower.backoff));
                self.follower.backoff = (self.follower.backoff * 2).min(PAUSE_MAX);
                return;
            }
        };
        self.count(IdentityStat::ExportPages);
        self.plc_answered(now);
        if page.bad_lines > 0 {
            tracing::warn!(lines = page.bad_lines, "PLC export: lines that do not parse, skipped");
        }
        let batch = self.export_batch(page, sent_micros);
        let _ = self.store.send(StoreJob::ApplyExport(batch));
    }

    /// The latest operation per DID of a page, less those already applied,
    /// and where to read next. A full page may end amid operations of one
    /// millisecond, so the next read starts a millisecond before its last
    /// and skips what this one applied.
    fn export_batch(&mut self, page: fetch::ExportPage, sent_micros: i64) -> ExportBatch {
        let full = page.lines >= EXPORT_COUNT as usize;
        let mut latest: HashMap<String, sluice_common::atproto::plc::PlcOp> = HashMap::new();
        let mut cursor = self.follower.cursor.clone().unwrap_or_default();
        let mut last_micros = None;
        for op in page.ops {
            last_micros = Some(op.created_micros);
            cursor = op.created_at.clone();
            if op.nullified || self.follower.boundary.contains(&op.cid) {
                continue;
            }
            match latest.get(&op.did) {
                Some(prev) if prev.created_micros > op.created_micros => {}
                _ => {
                    latest.insert(op.did.clone(), op);
                }
            }
        }
        self.follower.boundary.clear();
        if let (true, Some(last)) = (full, last_micros) {
            cursor = format_datetime_micros(last - 1000);
            self.follower.boundary =
                latest.values().filter(|o| o.created_micros >= last - 1000).map(|o| o.cid.clone()).collect();
        }
        let (mut ops, mut tombstones) = (Vec::new(), Vec::new());
        for (did, op) in latest {
            match op.state {
                PlcState::Active { signing_key, pds, handle } => {
                    ops.push(IdentityRecord::new(did, signing_key.as_ref(), pds, handle, op.created_micros))
                }
                PlcState::Tombstone => tombstones.push((did, op.created_micros)),
            }
        }
        ExportBatch { ops, tombstones, cursor, full, sent_micros }
    }

    fn export_applied(&mut self, changed: Vec<IdentityRecord>, cursor: String, full: bool, sent_micros: i64) {
        let now = Instant::now();
        self.follower.busy = false;
        self.follower.failing = false;
        self.follower.backoff = PAUSE_FIRST;
        self.follower.cursor = Some(cursor);
        self.control.identity_stat(IdentityStat::ExportApplied).fetch_add(changed.len() as u64, Ordering::Relaxed);
        for rec in changed {
            self.push(&rec);
            if let Some(p) = self.pending.get_mut(&rec.did) {
                p.stored = Some(rec);
            }
        }
        if full {
            self.follower.next_poll = Some(now);
        } else {
            self.follower.caught_up = Some((sent_micros, now));
            self.follower.next_poll = Some(now + EXPORT_POLL_EVERY);
        }
        let waiting: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| matches!(p.stage, Stage::Follower(_)))
            .map(|(d, _)| d.clone())
            .collect();
        for did in waiting {
            let p = self.pending.get_mut(&did).expect("listed");
            let stage = p.stage;
            p.stage = Stage::Idle;
            self.decide_from(&did, stage);
        }
    }

    /// Gauges, at most every [`TICK`]; old entries of the bounded maps go.
    fn publish_gauges(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_gauges) < TICK {
            return;
        }
        self.last_gauges = now;
        self.recent_fetch.retain(|_, t| now.duration_since(*t) < IDENTITY_REFRESH_MIN);
        if self.host_refresh.len() > 100_000 {
            self.host_refresh.clear();
        }
        let set = |s: IdentityStat, v: usize| self.control.identity_stat(s).store(v as u64, Ordering::Relaxed);
        set(IdentityStat::QueueDepth, self.queue.len());
        set(IdentityStat::Pending, self.pending.len());
        set(IdentityStat::InFlight, self.busy);
        let lag = match (self.cfg.settings.plc_export, self.follower_as_of()) {
            (false, _) => 0,
            (true, Some(_)) => 0,
            (true, None) => {
                let read_to = self
                    .follower
                    .cursor
                    .as_deref()
                    .and_then(sluice_common::atproto::syntax::Datetime::parse)
                    .map_or(0, |d| d.unix_micros());
                ((now_micros() - read_to).max(0) / 1_000_000) as usize
            }
        };
        set(IdentityStat::ExportLagSeconds, lag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_common::process::config::IdentitySettings;

    fn service() -> Service {
        let settings = IdentitySettings {
            plc_requests_per_second: 50.0,
            plc_export: true,
            fetch_concurrency: 4,
            wait_max_s: 10,
            plc_ttl_hours: 168.0,
            web_ttl_hours: 6.0,
        };
        let cfg = ServiceConfig {
            socket: "/nonexistent".into(),
            database_url: String::new(),
            plc_url: "http://127.0.0.1:1".into(),
            allow_insecure: true,
            settings,
            refreshes_per_host_per_second: 1.0,
            tls: sluice_common::process::tls::client_config(None).expect("tls"),
        };
        let control = Arc::new(ControlBlock::create().expect("control block"));
        Service::new(cfg, control, flume::unbounded().0, flume::unbounded().0)
    }

    fn paused_for(s: &Service, now: Instant) -> Duration {
        s.paused_until.expect("paused").saturating_duration_since(now)
    }

    /// Four requests in flight failing in one 5xx burst pause the
    /// directory once (1 s and its jitter), not 1 + 2 + 4 + 8 s; a
    /// Retry-After among them still lengthens it; the next failure after
    /// the pause doubles it.
    #[test]
    fn a_wave_of_failures_doubles_the_pause_once() {
        let mut s = service();
        let (now, sent) = (Instant::now(), now_micros() - 1_000);
        for _ in 0..4 {
            s.pause_plc(now, sent, None, "502");
        }
        assert_eq!(s.pause, PAUSE_FIRST * 2);
        let first = paused_for(&s, now);
        assert!(first >= PAUSE_FIRST && first <= PAUSE_FIRST.mul_f64(1.25), "{first:?}");
        s.pause_plc(now, sent, Some(Duration::from_secs(3)), "429");
        assert_eq!((s.pause, paused_for(&s, now)), (PAUSE_FIRST * 2, Duration::from_secs(3)));
        // A request sent after the pause began fails too: a new wave.
        s.pause_plc(now, now_micros() + 1, None, "502");
        assert_eq!(s.pause, PAUSE_FIRST * 4);
        assert!(paused_for(&s, now) >= Duration::from_secs(3));
        // An answer ends the backoff.
        s.plc_answered(now);
        assert_eq!(s.pause, PAUSE_FIRST);
    }

    /// The jitter spreads pauses over a quarter of the backoff.
    #[test]
    fn the_backoff_is_jittered() {
        let pauses: HashSet<u128> = (0..20)
            .map(|_| {
                let mut s = service();
                let now = Instant::now();
                s.pause_plc(now, now_micros(), None, "502");
                paused_for(&s, now).as_micros()
            })
            .collect();
        assert!(pauses.len() > 10, "{pauses:?}");
        assert!(pauses.iter().all(|p| (1_000_000..=1_250_000).contains(p)), "{pauses:?}");
    }
}
