//! The synthetic network's state and its event generator: pure, seeded,
//! no I/O. [`World::step`] advances a logical clock by one millisecond and
//! returns what the network does in that instant: frames appended to a
//! host's stream, connection faults, identity document changes, and for
//! each a ledger entry saying what a correct relay must do.
//!
//! Determinism: everything comes from one ChaCha8 stream seeded by
//! `--seed` and from the logical clock (which starts at 2025-01-01 and moves
//! one millisecond per step), so two runs with the same seed and flags emit
//! identical bytes. Revs and `time` fields come from that clock: always in
//! the past for a relay, strictly increasing.
//!
//! A fault that a relay must drop leaves the account's repository as it
//! was (snapshot/restore), so the next valid commit chains from the last
//! valid one and nothing else is disturbed.

use super::ledger::{AccountKey, Entry, Expect};
pub use super::population::{did_document, web_did, BrokenWeb, Population};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice_common::atproto::car::{write_car, CarSlice};
use sluice_common::atproto::cbor::Writer;
use sluice_common::atproto::cid::{Cid, Codec};
use sluice_common::atproto::commit::sign_commit;
use sluice_common::atproto::crypto::{Curve, PrivateKey};
use sluice_common::atproto::frame::{self, AccountEvent, Event, IdentityEvent, Message};
use sluice_common::atproto::repo::{Repo, RepoCommit, WriteOp};
use sluice_common::atproto::syntax::{format_datetime_micros, Tid};

/// 2025-01-01T00:00:00Z in unix microseconds: the logical clock's start.
pub const CLOCK_START_MICROS: i64 = 1_735_689_600_000_000;

/// Every fault fakenet can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// Commit signed by a key that is not the account's.
    BadSignature,
    /// Commit whose CAR lacks an MST node the inversion needs.
    MissingBlock,
    /// Commit whose prevData is not the previous root.
    WrongPrevData,
    /// Valid commit for the account from a host it has never lived on.
    /// (Not from a host it left: until a relay reads the new host or its
    /// cached DID document expires, such a commit is indistinguishable from
    /// the old host's own late events, and accepting it moves the stored
    /// rev past the new host's pending commits. No relay can be exact
    /// there without a fresh document per commit; see ARCHITECTURE.md.
    /// If the account moves to that host later, the ledger makes the
    /// commit "either": a relay reading the backlog late sees the new
    /// document.)
    WrongHost,
    /// A frame that is not valid CBOR (connection fault).
    MalformedCbor,
    /// A frame over 5 MB (connection fault).
    Oversized,
    /// A frame cut short (connection fault).
    Truncated,
    /// Close the TCP connection without a WebSocket close.
    Disconnect,
    /// Stop sending and reading for a while, without closing.
    Stall,
    /// Re-send an earlier frame with its old, lower seq.
    SeqBackwards,
    /// Re-send an earlier commit with a new seq (its rev is old).
    ReplayedRev,
    /// Commit whose rev is in the year 2100.
    FutureRev,
    /// A frame of a message type nobody knows.
    UnknownType,
    /// Commit from an account the host itself deactivated (a real commit:
    /// the repository moves on; "either" once the account is active again).
    DeactivatedCommit,
    /// A deactivated account is reactivated but its `#account active`
    /// event is lost (never sent); its later commits are real and must be
    /// relayed: a relay has to ask the PDS (getRepoStatus says active),
    /// and may emit an `#account` of its own for it (indigo#1161).
    LostReactivation,
    /// An account's signing key changes (a new document, its `#identity`);
    /// its later commits are signed with the new key and must be relayed.
    RotateKey,
    /// A host sends a burst of `#identity` events for accounts of other
    /// hosts (a relay must drop them, and not spend its directory budget
    /// on them).
    IdentityFlood,
}

impl Fault {
    pub const ALL: [Fault; 17] = [
        Fault::BadSignature,
        Fault::MissingBlock,
        Fault::WrongPrevData,
        Fault::WrongHost,
        Fault::MalformedCbor,
        Fault::Oversized,
        Fault::Truncated,
        Fault::Disconnect,
        Fault::Stall,
        Fault::SeqBackwards,
        Fault::ReplayedRev,
        Fault::FutureRev,
        Fault::UnknownType,
        Fault::DeactivatedCommit,
        Fault::LostReactivation,
        Fault::RotateKey,
        Fault::IdentityFlood,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::BadSignature => "badsig",
            Fault::MissingBlock => "missingblock",
            Fault::WrongPrevData => "badprevdata",
            Fault::WrongHost => "wronghost",
            Fault::MalformedCbor => "malformed",
            Fault::Oversized => "oversized",
            Fault::Truncated => "truncated",
            Fault::Disconnect => "disconnect",
            Fault::Stall => "stall",
            Fault::SeqBackwards => "seqbackwards",
            Fault::ReplayedRev => "replayedrev",
            Fault::FutureRev => "futurerev",
            Fault::UnknownType => "unknowntype",
            Fault::DeactivatedCommit => "deactivatedcommit",
            Fault::LostReactivation => "lostreactivation",
            Fault::RotateKey => "rotatekey",
            Fault::IdentityFlood => "identityflood",
        }
    }

    pub fn from_name(s: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == s)
    }
}

/// Fault probabilities per step, plus the share of connections whose
/// writes are split at random byte boundaries.
#[derive(Debug, Clone, Default)]
pub struct FaultRates {
    pub per_step: Vec<(Fault, f64)>,
    pub split_connections: f64,
}

impl FaultRates {
    pub fn none() -> FaultRates {
        FaultRates::default()
    }

    /// A mix where roughly 3% of steps carry a fault, every kind present.
    pub fn default_mix() -> FaultRates {
        let mut per_step: Vec<(Fault, f64)> = Fault::ALL.iter().map(|f| (*f, 0.002)).collect();
        for (f, p) in &mut per_step {
            // Connection faults cost a reconnect each; keep them rarer.
            if matches!(f, Fault::Stall | Fault::Oversized) {
                *p = 0.0005;
            }
            // Only where asked for: a relay's recovery from it is rate
            // limited (one status check per account per few minutes).
            if matches!(*f, Fault::LostReactivation | Fault::IdentityFlood) {
                *p = 0.0;
            }
        }
        FaultRates { per_step, split_connections: 0.2 }
    }

    /// `default`, `none`, or `name=rate,name=rate,...` (`split=rate` for
    /// split connections; a bare name means 0.002).
    pub fn parse(s: &str) -> Result<FaultRates, String> {
        match s {
            "default" => return Ok(FaultRates::default_mix()),
            "none" | "" => return Ok(FaultRates::none()),
            _ => {}
        }
        let mut r = FaultRates::none();
        for part in s.split(',') {
            let (name, rate) = match part.split_once('=') {
                Some((n, v)) => (n, v.parse::<f64>().map_err(|e| format!("{part}: {e}"))?),
                None => (part, 0.002),
            };
            if name == "split" {
                r.split_connections = rate;
            } else {
                let f = Fault::from_name(name).ok_or_else(|| format!("unknown fault {name:?}"))?;
                r.per_step.push((f, rate));
            }
        }
        Ok(r)
    }
}

#[derive(Debug, Clone)]
pub struct WorldConfig {
    pub seed: u64,
    /// `localhost:PORT` of each PDS host.
    pub hosts: Vec<String>,
    /// Accounts on the biggest host; others get fewer by `skew`.
    pub accounts_per_host: usize,
    /// Zipf exponent over hosts for account counts and traffic (0 = even).
    pub skew: f64,
    /// `localhost:PORT` of each did:web account (one port per account).
    pub web_hosts: Vec<String>,
    /// Share of accounts with P-256 keys.
    pub p256_share: f64,
    /// Records each account starts with (bulk loaded, no events).
    pub initial_records: usize,
    pub faults: FaultRates,
    /// Accounts may move between hosts.
    pub migrations: bool,
    /// Hosts serve TLS: PDS endpoints are `https://` (else `http://`).
    pub tls: bool,
    /// did:web accounts whose documents cannot be had, and did:plc
    /// accounts the directory does not know: their events are
    /// undeliverable ([`crate::population`]).
    pub broken_web: Vec<BrokenWeb>,
    pub unregistered: usize,
    /// Zipf exponent over a host's accounts for who acts (0 = evenly): a
    /// few hot accounts and a long tail.
    pub account_skew: f64,
    /// Of a thousand ordinary steps, how many create an account.
    pub new_accounts_per_mille: f64,
    /// The share of each host's accounts that act at all (its first ones:
    /// a day's active set), 1.0 for all.
    pub active_share: f64,
}

impl WorldConfig {
    pub fn small(seed: u64, hosts: Vec<String>) -> WorldConfig {
        WorldConfig {
            seed,
            hosts,
            accounts_per_host: 5,
            skew: 0.0,
            web_hosts: Vec::new(),
            p256_share: 0.3,
            initial_records: 3,
            faults: FaultRates::none(),
            migrations: false,
            tls: false,
            broken_web: Vec::new(),
            unregistered: 0,
            account_skew: 0.0,
            new_accounts_per_mille: 10.0,
            active_share: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    Deactivated,
    TakenDown,
    Deleted,
}

/// An account: a few bytes until it first acts ([`World::pick_account`]
/// makes it live: its repository and the rest of [`Live`]); its DID, key
/// and first document come from the [`Population`] meanwhile.
pub struct Account {
    pub host: usize,
    status: Status,
    /// Its place in its host's list (`World::by_host`).
    pos: u32,
    live: Option<Box<Live>>,
}

/// What an account that has acted keeps.
pub struct Live {
    pub did: String,
    pub handle: String,
    pub repo: Repo,
    /// Record paths present, to pick updates and deletes from.
    paths: Paths,
    /// Its last relayed frames (for `replayedrev`; kept only while that
    /// fault may be asked for on a network of a size that affords it).
    last_frames: Vec<(usize, Vec<u8>)>,
    /// Every host the account has lived on, the current one included.
    hosts_lived: Vec<usize>,
    /// Commits since its repository was last compacted.
    commits: u32,
}

/// An account's record paths, in the order they were made, and how many
/// of them each collection has: what the account's collections are is
/// asked at every step that touches it (`describeRepo`'s answer), so it
/// is kept rather than found again from thousands of paths.
#[derive(Clone, Default)]
struct Paths {
    list: Vec<String>,
    per_collection: std::collections::BTreeMap<String, u32>,
}

impl Paths {
    fn collection(path: &str) -> &str {
        path.split_once('/').map_or(path, |(c, _)| c)
    }

    fn push(&mut self, path: String) {
        *self.per_collection.entry(Paths::collection(&path).to_owned()).or_default() += 1;
        self.list.push(path);
    }

    fn remove(&mut self, path: &str) {
        let before = self.list.len();
        self.list.retain(|p| p != path);
        let gone = (before - self.list.len()) as u32;
        let c = Paths::collection(path);
        if let Some(n) = self.per_collection.get_mut(c) {
            *n = n.saturating_sub(gone);
            if *n == 0 {
                self.per_collection.remove(c);
            }
        }
    }

    fn iter(&self) -> std::slice::Iter<'_, String> {
        self.list.iter()
    }
}

impl Account {
    /// The collections its repo holds records of, sorted.
    pub fn collections(&self) -> Vec<String> {
        self.paths.per_collection.keys().cloned().collect()
    }

    pub fn status(&self) -> Status {
        self.status
    }

    pub fn is_live(&self) -> bool {
        self.live.is_some()
    }
}

/// A live account's parts; only accounts that acted are reached this way
/// (picking one makes it live).
impl std::ops::Deref for Account {
    type Target = Live;
    fn deref(&self) -> &Live {
        self.live.as_deref().expect("an account is made live when picked")
    }
}

impl std::ops::DerefMut for Account {
    fn deref_mut(&mut self) -> &mut Live {
        self.live.as_deref_mut().expect("an account is made live when picked")
    }
}

/// `#identity` events one `identityflood` fault sends.
const IDENTITY_FLOOD: usize = 50;

/// A repository is compacted (unreachable blocks dropped) every this many
/// commits.
const COMPACT_EVERY: u32 = 32;
/// Networks up to this many accounts keep recent frames per account (for
/// `replayedrev` on command); larger ones only when the fault is in the mix.
const FRAMES_KEPT_UP_TO: usize = 100_000;

/// What happens on a live connection, not in a host's replayable stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transient {
    /// Send these bytes as one binary WebSocket message.
    Raw(Vec<u8>),
    /// Drop the TCP connection.
    Disconnect,
    /// Send and read nothing for this long.
    Stall(std::time::Duration),
}

/// One thing the network does.
#[derive(Debug, Clone)]
pub enum Output {
    /// A frame in a host's stream (replayable by cursor).
    Frame { host: usize, seq: i64, frame: Vec<u8>, entry: Entry },
    /// A live-connection fault on a host.
    Transient { host: usize, what: Transient, entry: Entry },
    /// A DID document changed (PLC or did:web): serve it before anything
    /// that follows.
    Document { did: String, doc: serde_json::Value },
    /// Events of `did` from `host` become "either" (it migrated away).
    Amend { did: String, host: usize },
    /// `wronghost` commits of `did` injected earlier on `host` become
    /// "either": the account moved there, and a relay reading that host's
    /// backlog late checks them against the new document.
    AmendWrongHost { did: String, host: usize },
    /// A new account (its key, for the ledger).
    NewAccount(AccountKey),
    /// The relay may emit an `#account` of its own for `did` with this
    /// `active` (a lost reactivation it recovers from).
    RelayAccount { did: String, active: bool },
    /// These events of `did` become "either".
    AmendIds { ids: Vec<String>, did: String },
    /// `did`'s signed events before entry `before` become "either" (its
    /// key changed).
    AmendKey { did: String, before: u64 },
}

pub struct World {
    pub cfg: WorldConfig,
    pub population: std::sync::Arc<Population>,
    rng: ChaCha8Rng,
    pub accounts: Vec<Account>,
    /// Next seq per host.
    host_seq: Vec<i64>,
    /// Traffic weights per host (cumulative, for sampling).
    host_cdf: Vec<f64>,
    /// Accounts of each host, hottest first when `account_skew` is set.
    by_host: Vec<Vec<u32>>,
    /// Deactivated accounts of each host (to reactivate one).
    inactive: Vec<Vec<u32>>,
    /// Outputs owed before the step's own (an account made live: its key).
    owed: Vec<Output>,
    /// Keep recent frames per account (see [`FRAMES_KEPT_UP_TO`]).
    keep_frames: bool,
    /// Recent frames per host (for seq-backwards re-sends).
    recent: Vec<Vec<(i64, Vec<u8>)>>,
    clock_micros: i64,
    pub step_index: u64,
    /// Accounts whose reactivation was lost (fault), and the step until
    /// which their status does not change again: a relay's status check
    /// takes a moment, and a change meanwhile would make the commits in
    /// between a matter of timing.
    status_quiet_until: std::collections::HashMap<usize, u64>,
    /// `deactivatedcommit` faults of a still deactivated account (commit
    /// ids): when it is reactivated they become "either".
    deactivated_commits: std::collections::HashMap<usize, Vec<String>>,
    event_index: u64,
}

fn zipf_weights(n: usize, s: f64) -> Vec<f64> {
    (1..=n).map(|r| 1.0 / (r as f64).powf(s)).collect()
}

fn record(kind: &str, text: &str, time: &str) -> Vec<u8> {
    let mut w = Writer::new();
    w.map(3);
    w.text("text");
    w.text(text);
    w.text("$type");
    w.text(kind);
    w.text("createdAt");
    w.text(time);
    w.into_inner()
}

const COLLECTIONS: [&str; 4] =
    ["app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.graph.follow", "app.bsky.feed.repost"];

impl World {
    pub fn new(cfg: WorldConfig) -> World {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let nh = cfg.hosts.len();
        let weights = zipf_weights(nh, cfg.skew);
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let host_cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        let host_seq = (0..nh).map(|_| rng.gen_range(100..10_000)).collect();
        let counts: Vec<usize> =
            weights.iter().map(|w| ((cfg.accounts_per_host as f64) * w).round().max(1.0) as usize).collect();
        let population = std::sync::Arc::new(Population::new(&cfg, &counts));
        let replays = cfg.faults.per_step.iter().any(|(f, p)| *f == Fault::ReplayedRev && *p > 0.0);
        let keep_frames = replays || population.initial() <= FRAMES_KEPT_UP_TO;
        let mut w = World {
            cfg,
            population,
            rng,
            accounts: Vec::new(),
            host_seq,
            host_cdf,
            by_host: vec![Vec::new(); nh],
            inactive: vec![Vec::new(); nh],
            owed: Vec::new(),
            keep_frames,
            recent: vec![Vec::new(); nh],
            clock_micros: CLOCK_START_MICROS,
            step_index: 0,
            status_quiet_until: Default::default(),
            deactivated_commits: Default::default(),
            event_index: 0,
        };
        w.accounts.reserve(w.population.initial());
        for h in 0..nh {
            for _ in w.population.initial_range(h) {
                w.add_account(h);
            }
        }
        w
    }

    /// A new account (not live) on `host`.
    fn add_account(&mut self, host: usize) -> usize {
        let idx = self.accounts.len();
        let pos = self.by_host[host].len() as u32;
        self.accounts.push(Account { host, status: Status::Active, pos, live: None });
        self.by_host[host].push(idx as u32);
        idx
    }

    /// An account created now (live at once: its events follow).
    fn create_account(&mut self, host: usize) -> usize {
        let idx = self.add_account(host);
        self.make_live(idx);
        idx
    }

    /// Give account `a` its repository (initial records, no events) and
    /// the rest of [`Live`], if it has none yet.
    fn make_live(&mut self, a: usize) {
        if self.accounts[a].live.is_some() {
            return;
        }
        let p = &self.population;
        let did = p.did(a);
        let handle = p.handle(a, self.accounts[a].host);
        let mut repo = Repo::new(did.clone(), p.key(a));
        let mut paths = Paths::default();
        let records: Vec<(String, Vec<u8>)> = (0..self.cfg.initial_records)
            .map(|i| {
                let p = format!("app.bsky.feed.post/{}", Tid::from_micros(1_700_000_000_000_000 + i as u64, 0));
                paths.push(p.clone());
                (p, record("app.bsky.feed.post", &format!("hello {i}"), "2024-01-01T00:00:00.000Z"))
            })
            .collect();
        repo.bulk_load(records).expect("fresh repo");
        let host = self.accounts[a].host;
        let live = Live { did, handle, repo, paths, last_frames: Vec::new(), hosts_lived: vec![host], commits: 0 };
        self.accounts[a].live = Some(Box::new(live));
    }

    /// The account with this DID, if it is one of this network's.
    pub fn index_of(&self, did: &str) -> Option<usize> {
        self.population.index_of(did).filter(|i| *i < self.accounts.len())
    }

    /// Change an account's status (keeping the lists of inactive ones).
    pub fn set_status(&mut self, a: usize, s: Status) {
        let (host, old) = (self.accounts[a].host, self.accounts[a].status);
        if old == Status::Deactivated {
            self.inactive[host].retain(|&i| i as usize != a);
        }
        if s == Status::Deactivated {
            self.inactive[host].push(a as u32);
        }
        self.accounts[a].status = s;
    }

    /// Move an account to another host's list.
    fn move_host(&mut self, a: usize, to: usize) {
        let (from, pos) = (self.accounts[a].host, self.accounts[a].pos as usize);
        let last = self.by_host[from].pop().expect("the account is listed") as usize;
        if last != a {
            self.by_host[from][pos] = last as u32;
            self.accounts[last].pos = pos as u32;
        }
        self.accounts[a].host = to;
        self.accounts[a].pos = self.by_host[to].len() as u32;
        self.by_host[to].push(a as u32);
    }

    /// Ledger header entries: the keys of accounts live now (the others'
    /// come as `key` lines when they first act).
    pub fn initial_keys(&self) -> Vec<AccountKey> {
        let live = self.accounts.iter().filter(|a| a.is_live());
        live.map(|a| self.account_key(a)).collect()
    }

    fn account_key(&self, a: &Account) -> AccountKey {
        AccountKey {
            did: a.did.clone(),
            key: a.repo.key().public_key().to_multikey(),
            host: self.cfg.hosts[a.host].clone(),
        }
    }

    pub fn document(&self, a: &Account) -> serde_json::Value {
        did_document(&a.did, &a.handle, a.repo.key(), &self.population.endpoint(a.host))
    }

    /// Now, in unix microseconds, on the logical clock.
    pub fn now_micros(&self) -> i64 {
        self.clock_micros
    }

    fn time(&self) -> String {
        format_datetime_micros(self.clock_micros)
    }

    fn tid(&mut self) -> Tid {
        // A fresh microsecond per TID keeps revs unique and increasing.
        self.clock_micros += 1;
        Tid::from_micros(self.clock_micros as u64, 0)
    }

    fn next_seq(&mut self, host: usize) -> i64 {
        let s = self.host_seq[host];
        self.host_seq[host] += 1;
        s
    }

    fn entry(
        &mut self,
        host: usize,
        hseq: Option<i64>,
        did: Option<&str>,
        t: &str,
        id: String,
        verdict: (Expect, &str),
    ) -> Entry {
        let (mut expect, mut why) = verdict;
        // An account whose identity cannot be resolved: nothing of it can
        // be relayed (a relay relays nothing unverified).
        if expect != Expect::Drop
            && did.and_then(|d| self.population.index_of(d)).is_some_and(|i| self.population.unresolvable(i))
        {
            (expect, why) = (Expect::Drop, "unresolvable");
        }
        self.event_index += 1;
        Entry {
            i: self.event_index,
            host: self.cfg.hosts[host].clone(),
            hseq,
            did: did.map(str::to_owned),
            t: t.to_owned(),
            id,
            expect,
            why: why.to_owned(),
        }
    }

    fn pick_host(&mut self) -> usize {
        let x: f64 = self.rng.gen();
        self.host_cdf.iter().position(|c| x <= *c).unwrap_or(self.host_cdf.len() - 1)
    }

    /// Is `a` within its quiet time after a lost reactivation?
    fn status_quiet(&self, a: usize) -> bool {
        self.status_quiet_until.get(&a).is_some_and(|&until| self.step_index < until)
    }

    /// An account of `host` in `status`, made live (its key goes into the
    /// ledger before the step's own lines). Active ones are drawn with
    /// `account_skew` (a few tries, then among all the host's active).
    fn pick_account(&mut self, host: usize, status: Status) -> Option<usize> {
        let a = match status {
            Status::Active => self.pick_active(host)?,
            Status::Deactivated => {
                let l = &self.inactive[host];
                if l.is_empty() {
                    return None;
                }
                l[self.rng.gen_range(0..l.len())] as usize
            }
            Status::TakenDown | Status::Deleted => return None,
        };
        if !self.accounts[a].is_live() {
            self.make_live(a);
            self.owed.push(Output::NewAccount(self.account_key(&self.accounts[a])));
        }
        Some(a)
    }

    fn pick_active(&mut self, host: usize) -> Option<usize> {
        let all = self.by_host[host].len();
        let n = ((all as f64 * self.cfg.active_share).ceil() as usize).clamp(1, all.max(1));
        if all == 0 {
            return None;
        }
        for _ in 0..16 {
            let pos = if self.cfg.account_skew > 0.0 {
                let z = rand_distr::Zipf::new(n as u64, self.cfg.account_skew).expect("n > 0, skew > 0");
                (rand_distr::Distribution::sample(&z, &mut self.rng) as usize).clamp(1, n) - 1
            } else {
                self.rng.gen_range(0..n)
            };
            let a = self.by_host[host][pos] as usize;
            if self.accounts[a].status == Status::Active {
                return Some(a);
            }
        }
        let active: Vec<u32> = self.by_host[host]
            .iter()
            .copied()
            .filter(|&i| self.accounts[i as usize].status == Status::Active)
            .collect();
        (!active.is_empty()).then(|| active[self.rng.gen_range(0..active.len())] as usize)
    }

    /// Advance one millisecond.
    pub fn step(&mut self) -> Vec<Output> {
        self.step_index += 1;
        self.clock_micros = self.clock_micros.max(CLOCK_START_MICROS + self.step_index as i64 * 1000);
        let mut out = Vec::new();
        let fault_roll: f64 = self.rng.gen();
        let mut acc = 0.0;
        let mut fault = None;
        for (f, p) in &self.cfg.faults.per_step {
            acc += p;
            if fault_roll < acc {
                fault = Some(*f);
                break;
            }
        }
        if let Some(f) = fault {
            self.inject(f, None, &mut out);
        }
        if out.is_empty() {
            self.normal_event(&mut out);
        }
        self.settle(out)
    }

    /// A step's outputs, after what it owes first (keys of accounts it
    /// made live).
    fn settle(&mut self, out: Vec<Output>) -> Vec<Output> {
        if self.owed.is_empty() {
            return out;
        }
        let mut all = std::mem::take(&mut self.owed);
        all.extend(out);
        all
    }

    fn normal_event(&mut self, out: &mut Vec<Output>) {
        let host = self.pick_host();
        let roll = self.rng.gen_range(0..1000);
        // A whole number keeps the one draw (and every seed's schedule); a
        // fraction of a step per mille takes a second draw.
        let per_mille = self.cfg.new_accounts_per_mille;
        let new_account = if per_mille.fract() == 0.0 {
            f64::from(roll) < per_mille
        } else {
            self.rng.gen::<f64>() * 1000.0 < per_mille
        };
        match roll {
            _ if new_account => {
                let a = self.create_account(host);
                let k = self.account_key(&self.accounts[a]);
                out.push(Output::NewAccount(k));
                out.push(Output::Document { did: self.accounts[a].did.clone(), doc: self.document(&self.accounts[a]) });
                self.emit_identity(a, out);
                self.emit_account(a, true, None, out);
            }
            10..=39 => self.new_handle(host, out),
            40..=54 => self.toggle_active(host, out),
            55..=74 => {
                if let Some(a) = self.pick_account(host, Status::Active) {
                    self.emit_sync(a, out);
                }
            }
            75..=77 => {
                if let Some(a) = self.pick_account(host, Status::Active).filter(|&a| !self.status_quiet(a)) {
                    self.set_status(a, Status::TakenDown);
                    self.emit_account(a, false, Some("takendown"), out);
                }
            }
            78..=80 => {
                if let Some(a) = self.pick_account(host, Status::Active).filter(|&a| !self.status_quiet(a)) {
                    self.set_status(a, Status::Deleted);
                    self.emit_account(a, false, Some("deleted"), out);
                }
            }
            81..=85 if self.cfg.migrations && self.cfg.hosts.len() > 1 => {
                if let Some(a) = self.pick_account(host, Status::Active).filter(|&a| !self.status_quiet(a)) {
                    self.migrate(a, out);
                }
            }
            _ => {
                if let Some(a) = self.pick_account(host, Status::Active) {
                    let ops = self.random_ops(a, roll);
                    if let Some(c) = self.commit(a, &ops) {
                        self.emit_commit(a, &c, Expect::Relay, "", out);
                    }
                }
            }
        }
    }

    /// An active account of `host` takes a new handle.
    fn new_handle(&mut self, host: usize, out: &mut Vec<Output>) {
        if let Some(a) = self.pick_account(host, Status::Active) {
            let n = self.accounts[a].handle.matches('-').count();
            let base =
                self.accounts[a].handle.split('.').next().unwrap_or("u").split('-').next().unwrap_or("u").to_owned();
            self.accounts[a].handle = format!("{base}-{}.h{}.test", n + 1, self.accounts[a].host);
            out.push(Output::Document { did: self.accounts[a].did.clone(), doc: self.document(&self.accounts[a]) });
            self.emit_identity(a, out);
        }
    }

    /// Deactivate an active account of `host`, or reactivate one.
    fn toggle_active(&mut self, host: usize, out: &mut Vec<Output>) {
        if self.rng.gen_bool(0.5) {
            if let Some(a) = self.pick_account(host, Status::Active).filter(|&a| !self.status_quiet(a)) {
                self.set_status(a, Status::Deactivated);
                self.emit_account(a, false, Some("deactivated"), out);
            }
        } else if let Some(a) = self.pick_account(host, Status::Deactivated) {
            self.set_status(a, Status::Active);
            self.emit_account(a, true, None, out);
            // A relay behind on this host reads those commits now and,
            // asking the PDS (active again), may relay them with an
            // #account of its own.
            if let Some(ids) = self.deactivated_commits.remove(&a) {
                let did = self.accounts[a].did.clone();
                out.push(Output::AmendIds { ids, did: did.clone() });
                out.push(Output::RelayAccount { did, active: true });
            }
        }
    }

    fn random_ops(&mut self, a: usize, roll: u32) -> Vec<WriteOp> {
        let count = if roll >= 900 { self.rng.gen_range(2..=10) } else { 1 };
        let mut ops = Vec::with_capacity(count);
        let mut touched: Vec<String> = Vec::new();
        for _ in 0..count {
            let time = self.time();
            let r: u32 = self.rng.gen_range(0..100);
            let acct = &self.accounts[a];
            let existing: Vec<&String> = acct.paths.iter().filter(|p| !touched.contains(p)).collect();
            if r < 15 && !existing.is_empty() {
                let p = existing[self.rng.gen_range(0..existing.len())].clone();
                touched.push(p.clone());
                ops.push(WriteOp::Update { path: p, record: record("app.bsky.feed.post", "edited", &time) });
            } else if r < 30 && !existing.is_empty() {
                let p = existing[self.rng.gen_range(0..existing.len())].clone();
                touched.push(p.clone());
                ops.push(WriteOp::Delete { path: p });
            } else {
                let coll = COLLECTIONS[self.rng.gen_range(0..COLLECTIONS.len())];
                let tid = self.tid();
                let p = format!("{coll}/{tid}");
                touched.push(p.clone());
                let text = format!("event {} from {}", self.step_index, self.accounts[a].handle);
                ops.push(WriteOp::Create { path: p, record: record(coll, &text, &time) });
            }
        }
        ops
    }

    /// Apply ops to an account's repo; keeps `paths` in step.
    fn commit(&mut self, a: usize, ops: &[WriteOp]) -> Option<RepoCommit> {
        let rev = self.tid();
        let c = self.accounts[a].repo.commit(ops, rev).ok()?;
        let live = &mut *self.accounts[a];
        live.commits += 1;
        if live.commits >= COMPACT_EVERY {
            live.commits = 0;
            live.repo.compact().expect("our own repository");
        }
        let paths = &mut self.accounts[a].paths;
        for op in ops {
            match op {
                WriteOp::Create { path, .. } => paths.push(path.clone()),
                WriteOp::Delete { path } => paths.remove(path),
                WriteOp::Update { .. } => {}
            }
        }
        Some(c)
    }

    /// A commit that will be dropped: the repo and paths go back to how
    /// they were.
    fn throwaway_commit(&mut self, a: usize) -> Option<RepoCommit> {
        let saved = self.accounts[a].repo.snapshot();
        let saved_paths = self.accounts[a].paths.clone();
        let ops = self.random_ops(a, 0);
        let c = self.commit(a, &ops);
        self.accounts[a].repo.restore(saved);
        self.accounts[a].paths = saved_paths;
        c
    }

    fn emit_commit(&mut self, a: usize, c: &RepoCommit, expect: Expect, why: &str, out: &mut Vec<Output>) {
        let host = self.accounts[a].host;
        self.emit_commit_on(host, a, c, expect, why, out);
    }

    fn emit_commit_on(
        &mut self,
        host: usize,
        a: usize,
        c: &RepoCommit,
        expect: Expect,
        why: &str,
        out: &mut Vec<Output>,
    ) {
        let seq = self.next_seq(host);
        let frame = c.frame(seq, &self.time());
        let did = self.accounts[a].did.clone();
        let entry = self.entry(host, Some(seq), Some(&did), "#commit", c.commit_cid.to_string(), (expect, why));
        self.push_frame(host, a, seq, frame, entry, out);
    }

    fn push_frame(&mut self, host: usize, a: usize, seq: i64, frame: Vec<u8>, entry: Entry, out: &mut Vec<Output>) {
        if entry.expect == Expect::Relay && self.keep_frames {
            let lf = &mut self.accounts[a].last_frames;
            lf.push((host, frame.clone()));
            if lf.len() > 4 {
                lf.remove(0);
            }
        }
        let recent = &mut self.recent[host];
        recent.push((seq, frame.clone()));
        if recent.len() > 16 {
            recent.remove(0);
        }
        out.push(Output::Frame { host, seq, frame, entry });
    }

    fn emit_identity(&mut self, a: usize, out: &mut Vec<Output>) {
        let host = self.accounts[a].host;
        let seq = self.next_seq(host);
        let time = self.time();
        let did = self.accounts[a].did.clone();
        let mut frame = Vec::new();
        IdentityEvent { seq, did: &did, time: &time, handle: Some(&self.accounts[a].handle) }.encode(&mut frame);
        let entry = self.entry(
            host,
            Some(seq),
            Some(&did),
            "#identity",
            format!("#identity|{did}|{time}"),
            (Expect::Relay, ""),
        );
        self.push_frame(host, a, seq, frame, entry, out);
        self.clock_micros += 1;
    }

    fn emit_account(&mut self, a: usize, active: bool, status: Option<&str>, out: &mut Vec<Output>) {
        let host = self.accounts[a].host;
        let seq = self.next_seq(host);
        let time = self.time();
        let did = self.accounts[a].did.clone();
        let mut frame = Vec::new();
        AccountEvent { seq, did: &did, time: &time, active, status }.encode(&mut frame);
        let entry =
            self.entry(host, Some(seq), Some(&did), "#account", format!("#account|{did}|{time}"), (Expect::Relay, ""));
        self.push_frame(host, a, seq, frame, entry, out);
        self.clock_micros += 1;
    }

    fn emit_sync(&mut self, a: usize, out: &mut Vec<Output>) {
        let host = self.accounts[a].host;
        if self.accounts[a].repo.commit_block().is_none() {
            return;
        }
        let seq = self.next_seq(host);
        let time = self.time();
        let frame = self.accounts[a].repo.sync_frame(seq, &time).expect("has a commit");
        let did = self.accounts[a].did.clone();
        // A #sync carries the repository's last commit as it was signed.
        // After a key rotation with no commit since, that is the old key's
        // signature: a relay that has not yet learned of the rotation
        // verifies it and relays it, one that has drops it (PROTOCOL.md 4:
        // refresh once, then drop).
        let verdict = if signed_by_current_key(&frame, &self.accounts[a].repo.key().public_key()) {
            (Expect::Relay, "")
        } else {
            (Expect::Either, "oldkeysync")
        };
        let entry = self.entry(host, Some(seq), Some(&did), "#sync", format!("#sync|{did}|{time}"), verdict);
        self.push_frame(host, a, seq, frame, entry, out);
        self.clock_micros += 1;
    }

    fn migrate(&mut self, a: usize, out: &mut Vec<Output>) {
        let from = self.accounts[a].host;
        let mut to = self.rng.gen_range(0..self.cfg.hosts.len() - 1);
        if to >= from {
            to += 1;
        }
        self.move_host(a, to);
        if !self.accounts[a].hosts_lived.contains(&to) {
            self.accounts[a].hosts_lived.push(to);
        }
        out.push(Output::Amend { did: self.accounts[a].did.clone(), host: from });
        out.push(Output::AmendWrongHost { did: self.accounts[a].did.clone(), host: to });
        out.push(Output::Document { did: self.accounts[a].did.clone(), doc: self.document(&self.accounts[a]) });
        self.emit_identity(a, out);
        self.emit_account(a, true, None, out);
    }

    /// Inject one fault now, on `host` or a random one. Does nothing if no
    /// account fits.
    pub fn inject_fault(&mut self, f: Fault, host: Option<usize>) -> Vec<Output> {
        let mut out = Vec::new();
        self.inject(f, host, &mut out);
        self.settle(out)
    }

    fn inject(&mut self, f: Fault, host: Option<usize>, out: &mut Vec<Output>) {
        let host = host.unwrap_or_else(|| self.pick_host());
        match f {
            Fault::BadSignature | Fault::MissingBlock | Fault::WrongPrevData | Fault::FutureRev => {
                let Some(a) = self.pick_account(host, Status::Active) else { return };
                let Some(c) = self.broken_commit(a, f) else { return };
                self.emit_commit(a, &c, Expect::Drop, f.name(), out);
            }
            Fault::WrongHost => self.inject_wrong_host(f, host, out),
            Fault::DeactivatedCommit => {
                let Some(a) = self.pick_account(host, Status::Deactivated) else { return };
                // A real commit (the repository moves on): a relay that
                // holds it and relays it once the host says the account is
                // active has the repository's own rev, and what the host
                // sends after (a #sync at its head) is not older. A relay
                // that drops it sees the next commit break the chain,
                // which it passes.
                let ops = self.random_ops(a, 0);
                let Some(c) = self.commit(a, &ops) else { return };
                self.emit_commit(a, &c, Expect::Drop, f.name(), out);
                self.deactivated_commits.entry(a).or_default().push(c.commit_cid.to_string());
            }
            Fault::LostReactivation => self.inject_lost_reactivation(host, out),
            Fault::RotateKey => self.inject_rotate_key(host, out),
            Fault::IdentityFlood => self.inject_identity_flood(f, host, out),
            Fault::ReplayedRev => self.inject_replayed_rev(f, host, out),
            Fault::UnknownType => self.inject_unknown_type(f, host, out),
            Fault::SeqBackwards => self.inject_seq_backwards(f, host, out),
            Fault::MalformedCbor | Fault::Oversized | Fault::Truncated => {
                let bytes = self.bad_frame_bytes(f);
                let id = format!("{}|{}|{}", f.name(), self.cfg.hosts[host], self.step_index);
                let entry = self.entry(host, None, None, "?", id, (Expect::Drop, f.name()));
                out.push(Output::Transient { host, what: Transient::Raw(bytes), entry });
            }
            Fault::Disconnect | Fault::Stall => self.inject_transient(f, host, out),
        }
    }

    /// A commit of an account sent by a host it never lived on.
    fn inject_wrong_host(&mut self, f: Fault, host: usize, out: &mut Vec<Output>) {
        if self.cfg.hosts.len() < 2 {
            return;
        }
        let Some(a) = self.pick_account(host, Status::Active) else { return };
        let never: Vec<usize> =
            (0..self.cfg.hosts.len()).filter(|h| !self.accounts[a].hosts_lived.contains(h)).collect();
        if never.is_empty() {
            return;
        }
        let other = never[self.rng.gen_range(0..never.len())];
        let Some(c) = self.throwaway_commit(a) else { return };
        self.emit_commit_on(other, a, &c, Expect::Drop, f.name(), out);
    }

    /// A new signing key for an active account of `host`: its document
    /// changes, its `#identity` follows, later commits use the new key.
    fn inject_rotate_key(&mut self, host: usize, out: &mut Vec<Output>) {
        let Some(a) = self.pick_account(host, Status::Active) else { return };
        let curve = self.accounts[a].repo.key().curve();
        let key = PrivateKey::generate(curve, &mut self.rng);
        self.accounts[a].repo.set_key(key);
        let did = self.accounts[a].did.clone();
        out.push(Output::AmendKey { did, before: self.event_index + 1 });
        out.push(Output::NewAccount(self.account_key(&self.accounts[a])));
        out.push(Output::Document { did: self.accounts[a].did.clone(), doc: self.document(&self.accounts[a]) });
        self.emit_identity(a, out);
    }

    /// `#identity` events from `host` for accounts of other hosts (at most
    /// [`IDENTITY_FLOOD`]): dropped by a relay, whose document says where
    /// they live.
    fn inject_identity_flood(&mut self, f: Fault, host: usize, out: &mut Vec<Output>) {
        let others: Vec<usize> = (0..self.cfg.hosts.len()).filter(|h| *h != host).collect();
        if others.is_empty() {
            return;
        }
        for _ in 0..IDENTITY_FLOOD {
            let other = others[self.rng.gen_range(0..others.len())];
            let Some(a) = self.pick_account(other, Status::Active) else { continue };
            if self.accounts[a].hosts_lived.contains(&host) {
                continue;
            }
            let seq = self.next_seq(host);
            let time = self.time();
            let did = self.accounts[a].did.clone();
            let mut frame = Vec::new();
            IdentityEvent { seq, did: &did, time: &time, handle: None }.encode(&mut frame);
            let id = format!("#identity|{did}|{time}");
            let entry = self.entry(host, Some(seq), Some(&did), "#identity", id, (Expect::Drop, f.name()));
            out.push(Output::Frame { host, seq, frame, entry });
            self.clock_micros += 1;
        }
    }

    /// Deactivate (announced), then reactivate in silence.
    fn inject_lost_reactivation(&mut self, host: usize, out: &mut Vec<Output>) {
        // Deactivate (announced), then reactivate in silence.
        let Some(a) = self.pick_account(host, Status::Active).filter(|&a| !self.status_quiet(a)) else {
            return;
        };
        self.set_status(a, Status::Deactivated);
        self.emit_account(a, false, Some("deactivated"), out);
        self.set_status(a, Status::Active);
        self.status_quiet_until.insert(a, self.step_index + 2000);
        out.push(Output::RelayAccount { did: self.accounts[a].did.clone(), active: true });
    }

    /// An account's first commit again, with a new seq.
    fn inject_replayed_rev(&mut self, f: Fault, host: usize, out: &mut Vec<Output>) {
        let Some(a) = self.pick_account(host, Status::Active) else { return };
        let Some((h, old)) = self.accounts[a].last_frames.first().cloned() else { return };
        let Ok(d) = frame::decode(&old) else { return };
        let (Some(span), Message::Event(Event::Commit(c))) = (d.seq_span, &d.message) else { return };
        let id = c.commit.to_string();
        let did = self.accounts[a].did.clone();
        let seq = self.next_seq(h);
        let mut frame = Vec::new();
        frame::resequence(&old, span, seq, &mut frame);
        let entry = self.entry(h, Some(seq), Some(&did), "#commit", id, (Expect::Drop, f.name()));
        self.push_frame(h, a, seq, frame, entry, out);
    }

    /// A message type no relay knows.
    fn inject_unknown_type(&mut self, f: Fault, host: usize, out: &mut Vec<Output>) {
        let seq = self.next_seq(host);
        let mut w = Writer::new();
        w.map(2);
        w.text("t");
        w.text("#fakenetUnknown");
        w.text("op");
        w.i64(1);
        w.map(2);
        w.text("seq");
        w.i64(seq);
        w.text("note");
        w.text("a message type no relay knows");
        let id = format!("#fakenetUnknown|{}|{seq}", self.cfg.hosts[host]);
        let entry = self.entry(host, Some(seq), None, "#fakenetUnknown", id, (Expect::Drop, f.name()));
        let recent = &mut self.recent[host];
        recent.push((seq, w.buf.clone()));
        out.push(Output::Frame { host, seq, frame: w.into_inner(), entry });
    }

    /// A recent frame again, its seq not above the last.
    fn inject_seq_backwards(&mut self, f: Fault, host: usize, out: &mut Vec<Output>) {
        let Some((seq, frame)) = self.recent[host].first().cloned() else { return };
        let (id, did, t) = match frame::decode(&frame).map(|d| d.message) {
            Ok(Message::Event(Event::Commit(c))) => (c.commit.to_string(), Some(c.repo.to_owned()), "#commit"),
            _ => (format!("seqbackwards|{}|{seq}", self.cfg.hosts[host]), None, "?"),
        };
        let entry = self.entry(host, None, did.as_deref(), t, id, (Expect::Drop, f.name()));
        out.push(Output::Transient { host, what: Transient::Raw(frame), entry });
    }

    /// A disconnect or a stall of the host.
    fn inject_transient(&mut self, f: Fault, host: usize, out: &mut Vec<Output>) {
        let what = if f == Fault::Disconnect {
            Transient::Disconnect
        } else {
            Transient::Stall(std::time::Duration::from_millis(self.rng.gen_range(1500..3000)))
        };
        let id = format!("{}|{}|{}", f.name(), self.cfg.hosts[host], self.step_index);
        let entry = self.entry(host, None, None, "-", id, (Expect::Drop, f.name()));
        out.push(Output::Transient { host, what, entry });
    }

    /// A signed, well-formed commit broken the way `f` says; the repo is
    /// left as it was.
    fn broken_commit(&mut self, a: usize, f: Fault) -> Option<RepoCommit> {
        let saved = self.accounts[a].repo.snapshot();
        let saved_paths = self.accounts[a].paths.clone();
        let ops = self.random_ops(a, 0);
        let c = if f == Fault::FutureRev {
            // 2100-01-01: far beyond any relay's clock.
            let rev = Tid::from_micros(4_102_444_800_000_000 + self.step_index, 0);
            self.accounts[a].repo.commit(&ops, rev).ok()
        } else {
            self.commit(a, &ops)
        };
        self.accounts[a].repo.restore(saved);
        self.accounts[a].paths = saved_paths;
        let mut c = c?;
        match f {
            Fault::BadSignature => {
                let wrong = PrivateKey::generate(Curve::K256, &mut self.rng);
                let (cid, block) = sign_commit(&c.did, &c.data, c.rev.as_str(), &wrong);
                c.car = replace_root(&c.car, c.commit_cid, cid, &block);
                c.commit_cid = cid;
            }
            Fault::MissingBlock => {
                // Drop one of the MST nodes the relay's inversion reads
                // (the rule in ARCHITECTURE.md): any of them must make the
                // commit fail. Nodes the CAR carries beyond those (and
                // record blocks) are not required, so dropping one of them
                // would not be a fault at all.
                let needed: Vec<Cid> = c.proof_nodes.iter().copied().collect();
                let victim = *needed.get(self.rng.gen_range(0..needed.len().max(1)))?;
                c.car = without_block(&c.car, victim);
            }
            Fault::WrongPrevData => {
                c.prev_data =
                    Cid::compute(Codec::DagCbor, format!("not the previous root {}", self.step_index).as_bytes());
            }
            _ => {}
        }
        Some(c)
    }

    fn bad_frame_bytes(&mut self, f: Fault) -> Vec<u8> {
        let mut w = Writer::new();
        w.map(2);
        w.text("t");
        w.text("#commit");
        w.text("op");
        w.i64(1);
        let header = w.into_inner();
        match f {
            Fault::MalformedCbor => {
                // A body map that claims three entries and has one, then a
                // reserved additional-info byte.
                let mut b = header;
                b.extend_from_slice(&[0xa3, 0x63, b's', b'e', b'q', 0x01, 0x1c]);
                b
            }
            Fault::Oversized => {
                let mut b = header;
                let mut body = Writer::new();
                body.map(1);
                body.text("blocks");
                body.bytes(&vec![0u8; frame::FRAME_BYTES_MAX]);
                b.extend_from_slice(&body.buf);
                b
            }
            _ => {
                let mut b = header;
                b.extend_from_slice(&[0xab, 0x63, b'o', b'p', b's', 0x81]);
                b
            }
        }
    }

    /// Live events emitted so far.
    pub fn events(&self) -> u64 {
        self.event_index
    }

    pub fn host_seq(&self, host: usize) -> i64 {
        self.host_seq[host]
    }
}

/// A CAR without the block `victim`.
pub fn without_block(car: &[u8], victim: Cid) -> Vec<u8> {
    let parsed = CarSlice::parse(car).expect("our own CAR");
    let kept: Vec<(Cid, &[u8])> = parsed.iter().filter(|(cid, _)| *cid != victim).collect();
    write_car(&parsed.root(), kept.iter().map(|(c, b)| (c, *b)))
}

/// A CAR with its root block replaced.
fn replace_root(car: &[u8], old: Cid, new: Cid, block: &[u8]) -> Vec<u8> {
    let parsed = CarSlice::parse(car).expect("our own CAR");
    let mut blocks: Vec<(Cid, Vec<u8>)> = vec![(new, block.to_vec())];
    blocks.extend(parsed.iter().filter(|(c, _)| *c != old).map(|(c, b)| (c, b.to_vec())));
    write_car(&new, blocks.iter().map(|(c, b)| (c, b.as_slice())))
}

/// Whether the commit of a `#sync` frame verifies with `key`.
fn signed_by_current_key(frame: &[u8], key: &sluice_common::atproto::crypto::PublicKey) -> bool {
    let Ok(decoded) = frame::decode(frame) else { return false };
    let Message::Event(Event::Sync(sync)) = decoded.message else { return false };
    let now = i64::MAX / 2;
    sluice_common::atproto::commit::check_sync(&sync, now).is_ok_and(|c| c.verify_signature(key).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_common::atproto::commit::{check_commit, CommitError, Mode, ProofError};
    use sluice_common::atproto::crypto::PublicKey;
    use sluice_common::atproto::mst::MstError;

    fn world(faults: FaultRates) -> World {
        let hosts = (0..3).map(|i| format!("localhost:{}", 4000 + i)).collect();
        let mut cfg = WorldConfig::small(7, hosts);
        cfg.faults = faults;
        World::new(cfg)
    }

    fn frames(out: &[Output]) -> Vec<(&Vec<u8>, &Entry)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Frame { frame, entry, .. } => Some((frame, entry)),
                _ => None,
            })
            .collect()
    }

    fn key_of(w: &World, did: &str) -> PublicKey {
        w.accounts[w.index_of(did).unwrap()].repo.key().public_key()
    }

    /// Run a while with no faults: every frame decodes and verifies.
    #[test]
    fn clean_traffic_verifies() {
        let mut w = world(FaultRates::none());
        let mut n = 0;
        for _ in 0..400 {
            for (frame, entry) in frames(&w.step()) {
                assert_eq!(entry.expect, Expect::Relay);
                let d = frame::decode(frame).unwrap();
                let Message::Event(ev) = d.message else { panic!() };
                if let Event::Commit(c) = &ev {
                    let checked = check_commit(c, Mode::Strict, w.now_micros()).unwrap();
                    checked.verify_signature(&key_of(&w, c.repo)).unwrap();
                    assert_eq!(entry.id, c.commit.to_string());
                }
                n += 1;
            }
        }
        assert!(n > 300, "{n}");
    }

    /// The kept per-collection counts say what the paths say, through
    /// creates, deletes and the faults' commits that are rolled back.
    #[test]
    fn an_accounts_collections_follow_its_paths() {
        let mut w = world(FaultRates::default_mix());
        for _ in 0..600 {
            w.step();
        }
        let mut seen = 0;
        for a in w.accounts.iter().filter(|a| a.is_live()) {
            let mut from_paths: Vec<String> = a.paths.iter().map(|p| Paths::collection(p).to_owned()).collect();
            from_paths.sort();
            from_paths.dedup();
            assert_eq!(a.collections(), from_paths, "{}", a.did);
            let counted: u32 = a.paths.per_collection.values().sum();
            assert_eq!(counted as usize, a.paths.list.len(), "{}", a.did);
            seen += usize::from(from_paths.len() > 1);
        }
        assert!(seen > 0, "some account has records in two collections");
    }

    #[test]
    fn same_seed_same_bytes() {
        let run = || {
            let mut w = world(FaultRates::default_mix());
            let mut all = Vec::new();
            for _ in 0..200 {
                for (f, _) in frames(&w.step()) {
                    all.push(f.clone());
                }
            }
            all
        };
        assert_eq!(run(), run());
    }

    fn injected(f: Fault) -> (World, Vec<Output>) {
        let mut w = world(FaultRates::none());
        for _ in 0..50 {
            w.step();
        }
        // Make sure there is a deactivated account for DeactivatedCommit.
        w.set_status(0, Status::Deactivated);
        for i in 1..w.accounts.len() {
            if w.accounts[i].host == 0 {
                w.set_status(i, if f == Fault::DeactivatedCommit { Status::Deactivated } else { Status::Active });
            }
        }
        let mut out = Vec::new();
        for _ in 0..20 {
            w.inject(f, None, &mut out);
            if !out.is_empty() {
                break;
            }
        }
        assert!(!out.is_empty(), "{f:?} produced nothing");
        (w, out)
    }

    fn the_commit(out: &[Output]) -> (Vec<u8>, Entry) {
        let (f, e) = frames(out)[0];
        (f.clone(), e.clone())
    }

    /// A `#sync` right after a key rotation carries the commit the old
    /// key signed: "either" (a relay that has not learned of the rotation
    /// relays it; one that has drops it). After a new commit, "relay".
    #[test]
    fn a_sync_between_a_key_rotation_and_the_next_commit_is_either() {
        let (mut w, out) = injected(Fault::RotateKey);
        let did = frames(&out)[0].1.did.clone().expect("the #identity's DID");
        let a = w.index_of(&did).unwrap();
        let mut out = Vec::new();
        w.emit_sync(a, &mut out);
        let (f, e) = the_commit(&out);
        assert_eq!((e.expect, e.why.as_str()), (Expect::Either, "oldkeysync"));
        let Message::Event(Event::Sync(s)) = frame::decode(&f).unwrap().message else { panic!("a #sync") };
        let checked = sluice_common::atproto::commit::check_sync(&s, w.now_micros()).unwrap();
        assert!(checked.verify_signature(&key_of(&w, &did)).is_err(), "signed by the old key");

        let ops = w.random_ops(a, 0);
        w.commit(a, &ops).unwrap();
        let mut out = Vec::new();
        w.emit_sync(a, &mut out);
        let (_, e) = the_commit(&out);
        assert_eq!((e.expect, e.why.as_str()), (Expect::Relay, ""));
    }

    #[test]
    fn fault_bad_signature() {
        let (w, out) = injected(Fault::BadSignature);
        let (f, e) = the_commit(&out);
        assert_eq!((e.expect, e.why.as_str()), (Expect::Drop, "badsig"));
        let Message::Event(Event::Commit(c)) = frame::decode(&f).unwrap().message else { panic!() };
        let checked = check_commit(&c, Mode::Strict, w.now_micros()).unwrap();
        assert!(checked.verify_signature(&key_of(&w, c.repo)).is_err());
    }

    /// Every injected `missingblock` commit fails the relay's check (the
    /// old fault removed the first node in CID order, which the inversion
    /// sometimes never opens: 7 of 185 were relayed).
    #[test]
    fn fault_missing_block() {
        let hosts = (0..3).map(|i| format!("localhost:{}", 4000 + i)).collect();
        let mut cfg = WorldConfig::small(7, hosts);
        cfg.initial_records = 100;
        let mut w = World::new(cfg);
        let mut all = Vec::new();
        for _ in 0..300 {
            w.step();
            w.inject(Fault::MissingBlock, None, &mut all);
        }
        let commits = frames(&all);
        assert!(commits.len() > 250, "{}", commits.len());
        for (f, e) in commits {
            assert_eq!((e.expect, e.why.as_str()), (Expect::Drop, "missingblock"));
            let Message::Event(Event::Commit(c)) = frame::decode(f).unwrap().message else { panic!() };
            let err = check_commit(&c, Mode::Strict, w.now_micros()).unwrap_err();
            assert!(matches!(err, CommitError::Proof(ProofError::Mst(MstError::MissingBlock(_)))), "{err}");
        }
    }

    /// The rule for which blocks a commit must carry, enumerated: for a
    /// sample of commits (single and multi-op, on trees several layers
    /// deep), remove each block of the CAR in turn; the relay's stateless
    /// check (what a shard runs) must drop the commit exactly when the
    /// removed block is the commit or one of the nodes the inversion reads
    /// (`proof_nodes`, what `missingblock` draws from), and pass it
    /// otherwise (record blocks, nodes the inversion never opens).
    #[test]
    fn every_single_block_removal_matches_the_rule() {
        let hosts = vec!["localhost:4000".to_owned()];
        let mut cfg = WorldConfig::small(11, hosts);
        cfg.accounts_per_host = 4;
        cfg.initial_records = 300;
        let mut w = World::new(cfg);
        let (mut commits, mut removals, mut needed_seen, mut spare_seen) = (0, 0, 0, 0);
        for round in 0..160u32 {
            let a = (round as usize) % w.accounts.len();
            w.make_live(a);
            let roll = if round % 3 == 0 { 950 } else { 100 };
            let ops = w.random_ops(a, roll);
            let Some(c) = w.commit(a, &ops) else { continue };
            commits += 1;
            let frame_bytes = c.frame(1, &w.time());
            let Message::Event(Event::Commit(ev)) = frame::decode(&frame_bytes).unwrap().message else { panic!() };
            check_commit(&ev, Mode::Strict, w.now_micros()).expect("the whole commit passes");
            let car = CarSlice::parse(&c.car).unwrap();
            for (cid, _) in car.iter() {
                let stripped = without_block(&c.car, cid);
                // (Ops re-collected: a commit's ops list is invariant in its
                // lifetime, and `stripped` lives shorter than `ev`.)
                let broken = frame::Commit { blocks: &stripped, ops: ev.ops.iter().cloned().collect(), ..ev.clone() };
                let must_drop = cid == c.commit_cid || c.proof_nodes.contains(&cid);
                let verdict = check_commit(&broken, Mode::Strict, w.now_micros());
                assert_eq!(verdict.is_err(), must_drop, "commit {} without {cid}: {verdict:?}", c.commit_cid);
                if must_drop && cid != c.commit_cid {
                    needed_seen += 1;
                    assert!(
                        matches!(verdict, Err(CommitError::Proof(ProofError::Mst(MstError::MissingBlock(m)))) if m == cid),
                        "{verdict:?}"
                    );
                } else if !must_drop && sluice_common::atproto::mst::decode_node(&cid, car.get(&cid).unwrap()).is_ok() {
                    spare_seen += 1;
                }
                removals += 1;
            }
        }
        assert!(commits >= 150 && removals > 1000, "{commits} commits, {removals} removals");
        // Both sides of the rule were exercised: needed nodes, and nodes
        // carried that the inversion does not open.
        assert!(needed_seen > 500, "{needed_seen}");
        assert!(spare_seen > 0, "no commit carried a node the inversion skips");
    }

    #[test]
    fn fault_wrong_prev_data() {
        let (w, out) = injected(Fault::WrongPrevData);
        let (f, _) = the_commit(&out);
        let Message::Event(Event::Commit(c)) = frame::decode(&f).unwrap().message else { panic!() };
        let err = check_commit(&c, Mode::Strict, w.now_micros()).unwrap_err();
        assert!(matches!(err, CommitError::Proof(ProofError::RootMismatch { .. })), "{err}");
    }

    #[test]
    fn fault_future_rev() {
        let (_, out) = injected(Fault::FutureRev);
        let (f, e) = the_commit(&out);
        assert_eq!(e.why, "futurerev");
        let Message::Event(Event::Commit(c)) = frame::decode(&f).unwrap().message else { panic!() };
        let real_now = 1_800_000_000_000_000;
        assert!(matches!(check_commit(&c, Mode::Strict, real_now), Err(CommitError::FutureRev(_))));
    }

    #[test]
    fn fault_wrong_host() {
        let (w, out) = injected(Fault::WrongHost);
        let (f, e) = the_commit(&out);
        let Message::Event(Event::Commit(c)) = frame::decode(&f).unwrap().message else { panic!() };
        let home = &w.cfg.hosts[w.accounts[w.index_of(c.repo).unwrap()].host];
        assert_ne!(&e.host, home);
        // The commit itself is valid: only its host is wrong.
        check_commit(&c, Mode::Strict, w.now_micros()).unwrap().verify_signature(&key_of(&w, c.repo)).unwrap();
    }

    #[test]
    fn fault_replayed_rev_reuses_commit_with_new_seq() {
        let (_, out) = injected(Fault::ReplayedRev);
        let (f, e) = the_commit(&out);
        let d = frame::decode(&f).unwrap();
        let Message::Event(Event::Commit(c)) = d.message else { panic!() };
        assert_eq!(e.id, c.commit.to_string());
        assert_eq!(Some(c.seq), e.hseq);
        assert_eq!(e.expect, Expect::Drop);
    }

    #[test]
    fn fault_transients() {
        for f in [
            Fault::MalformedCbor,
            Fault::Oversized,
            Fault::Truncated,
            Fault::SeqBackwards,
            Fault::Disconnect,
            Fault::Stall,
        ] {
            let (_, out) = injected(f);
            let Output::Transient { what, entry, .. } = &out[0] else { panic!("{f:?}: {out:?}") };
            assert_eq!(entry.expect, Expect::Drop);
            assert_eq!(entry.hseq, None);
            match (f, what) {
                (Fault::MalformedCbor | Fault::Truncated, Transient::Raw(b)) => assert!(frame::decode(b).is_err()),
                (Fault::Oversized, Transient::Raw(b)) => {
                    assert!(b.len() > frame::FRAME_BYTES_MAX);
                    assert!(matches!(frame::decode(b), Err(frame::FrameError::TooLarge(_))));
                }
                (Fault::SeqBackwards, Transient::Raw(b)) => {
                    assert!(frame::decode(b).unwrap().message != Message::Error { error: "", message: None })
                }
                (Fault::Disconnect, Transient::Disconnect) | (Fault::Stall, Transient::Stall(_)) => {}
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn fault_unknown_type_and_deactivated_commit() {
        let (_, out) = injected(Fault::UnknownType);
        let (f, e) = the_commit(&out);
        assert!(matches!(frame::decode(&f).unwrap().message, Message::Event(Event::Unknown { .. })));
        assert_eq!(e.expect, Expect::Drop);
        let (w, out) = injected(Fault::DeactivatedCommit);
        let (f, e) = the_commit(&out);
        let Message::Event(Event::Commit(c)) = frame::decode(&f).unwrap().message else { panic!() };
        let acct = &w.accounts[w.index_of(c.repo).unwrap()];
        assert_eq!(acct.status(), Status::Deactivated);
        assert_eq!(e.why, "deactivatedcommit");
    }

    #[test]
    fn dropped_faults_leave_the_chain_intact() {
        let mut w = world(FaultRates::parse("badsig=0.1,missingblock=0.1,badprevdata=0.1,futurerev=0.1").unwrap());
        let mut last_data: std::collections::HashMap<String, Cid> = std::collections::HashMap::new();
        for _ in 0..400 {
            for (f, e) in frames(&w.step()) {
                let Ok(d) = frame::decode(f) else { continue };
                let Message::Event(Event::Commit(c)) = d.message else { continue };
                if e.expect != Expect::Relay {
                    continue;
                }
                // Every relayed commit's prevData is the data of the last
                // relayed commit of its account.
                let checked = check_commit(&c, Mode::Strict, w.now_micros()).unwrap();
                if let Some(prev) = last_data.get(c.repo) {
                    assert_eq!(c.prev_data, Some(*prev));
                }
                last_data.insert(c.repo.to_owned(), checked.data);
            }
        }
    }
}
