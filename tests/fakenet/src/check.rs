//! The exact checker: subscribe to a relay (or any firehose) and compare
//! what it sends with the ledger.
//!
//! Verdicts: every "relay" event appears exactly once; no "drop" event
//! appears (unless a "relay" entry shares its id); "either" events appear at
//! most once; per-DID order follows the ledger within each host's stream
//! (an account that moved has two streams, read independently); the
//! stream's seq strictly
//! increases; every frame decodes; every commit verifies (signature with
//! the ledger's key, Sync 1.1 proof). The summary line names each count.

use super::ledger::{Expect, Ledger, LedgerTail};
use sluice_common::atproto::commit::{check_commit, check_sync, Mode};
use sluice_common::atproto::crypto::PublicKey;
use sluice_common::atproto::frame::{self, Event, Message};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct CheckConfig {
    /// `ws://host:port` of the relay (or a host).
    pub relay: String,
    pub ledger: PathBuf,
    /// Cursor to subscribe from (`None` = live only).
    pub cursor: Option<i64>,
    /// Give up after this long in total.
    pub timeout: Duration,
    /// Once everything expected was seen, listen this much longer for
    /// duplicates and strays.
    pub settle: Duration,
    /// Wait for the ledger's `done` line first.
    pub wait_done: bool,
    /// Only entries from this host count (checking one host's own stream,
    /// or one host of several: frames of the others' events are skipped).
    pub only_host: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub frames: u64,
    pub relayed: u64,
    pub missing: u64,
    pub unexpected: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub invalid: u64,
    pub either_seen: u64,
    /// Frames of hosts `only_host` left out (skipped).
    pub other_hosts: u64,
    pub either_missing: u64,
    /// "relay" events written to the ledger after the check began, seen.
    pub relayed_later: u64,
    pub last_seq: i64,
    /// A few examples of each problem, for humans.
    pub notes: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.unexpected == 0 && self.duplicates == 0 && self.out_of_order == 0 && self.invalid == 0
    }

    pub fn summary(&self) -> String {
        format!(
            "relayed={} missing={} unexpected={} duplicates={} out_of_order={} invalid={} either_seen={} either_missing={} relayed_later={} frames={} last_seq={}",
            self.relayed,
            self.missing,
            self.unexpected,
            self.duplicates,
            self.out_of_order,
            self.invalid,
            self.either_seen,
            self.either_missing,
            self.relayed_later,
            self.frames,
            self.last_seq
        )
    }

    fn note(&mut self, s: String) {
        if self.notes.len() < 20 {
            self.notes.push(s);
        }
    }
}

/// The id under which the ledger knows a frame.
fn frame_id(ev: &Event<'_>) -> Option<String> {
    Some(match ev {
        Event::Commit(c) => c.commit.to_string(),
        Event::Sync(s) => format!("#sync|{}|{}", s.did, s.time),
        Event::Identity(i) => format!("#identity|{}|{}", i.did, i.time),
        Event::Account(a) => format!("#account|{}|{}", a.did, a.time),
        Event::Info(_) | Event::Unknown { .. } => return None,
    })
}

fn wait_for_done(path: &std::path::Path, deadline: Instant) -> anyhow::Result<(Ledger, LedgerTail)> {
    let mut tail = LedgerTail::open(path)?;
    let mut ledger = Ledger::default();
    loop {
        tail.read_new(&mut ledger)?;
        if ledger.done || Instant::now() >= deadline {
            return Ok((ledger, tail));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the checker expects of one id.
struct Expected {
    expect: Expect,
    /// Ledger index (per-DID order).
    i: u64,
    did: Option<String>,
    host: String,
    /// The event's kind (`#commit`, `#sync`...), for the notes.
    t: String,
    /// The ledger's reason (for a "drop": the fault), for the notes.
    why: String,
    /// In the ledger when the check began: only these can be missing.
    counted: bool,
}

/// The checker's state: the ledger as read so far (followed as fakenet
/// appends to it), and what the stream has shown.
struct Checker<'c> {
    cfg: &'c CheckConfig,
    ledger: Ledger,
    tail: LedgerTail,
    /// Every key each DID has had.
    keys: HashMap<String, Vec<PublicKey>>,
    expected: HashMap<String, Expected>,
    /// DID -> ids of its events, for amends that arrive later.
    ids_by_did: HashMap<String, Vec<String>>,
    /// Events of hosts `only_host` leaves out: their frames are skipped.
    others: std::collections::HashSet<String>,
    seen: HashMap<String, u64>,
    last_by_did: HashMap<String, u64>,
    must: u64,
    report: Report,
}

impl<'c> Checker<'c> {
    fn new(cfg: &'c CheckConfig, ledger: Ledger, tail: LedgerTail) -> Checker<'c> {
        let mut c = Checker {
            cfg,
            ledger,
            tail,
            keys: HashMap::new(),
            expected: HashMap::new(),
            ids_by_did: HashMap::new(),
            others: Default::default(),
            seen: HashMap::new(),
            last_by_did: HashMap::new(),
            must: 0,
            report: Report::default(),
        };
        c.absorb(0, true);
        c.must = c.expected.values().filter(|v| v.counted && v.expect == Expect::Relay).count() as u64;
        c
    }

    /// Take ledger entries from index `from` into the expectations.
    fn absorb(&mut self, from: usize, counted: bool) {
        for (d, ks) in &self.ledger.keys {
            let have = self.keys.entry(d.clone()).or_default();
            for k in ks.iter().skip(have.len()) {
                if let Ok(k) = PublicKey::from_multikey(k) {
                    have.push(k);
                }
            }
        }
        for e in &self.ledger.entries[from..] {
            if e.hseq.is_none() {
                continue;
            }
            if self.cfg.only_host.as_ref().is_some_and(|h| h != &e.host) {
                self.others.insert(e.id.clone());
                continue;
            }
            if let Some(d) = &e.did {
                self.ids_by_did.entry(d.clone()).or_default().push(e.id.clone());
            }
            let fresh = || Expected {
                expect: e.expect,
                i: e.i,
                did: e.did.clone(),
                host: e.host.clone(),
                t: e.t.clone(),
                why: e.why.clone(),
                counted,
            };
            let slot = self.expected.entry(e.id.clone()).or_insert_with(fresh);
            // A "relay" entry wins over a "drop" with the same id (a replay).
            if e.expect == Expect::Relay || (e.expect == Expect::Either && slot.expect == Expect::Drop) {
                let counted = counted || slot.counted;
                *slot = Expected { counted, ..fresh() };
            }
        }
    }

    /// Read what fakenet appended since; returns whether anything came.
    fn follow(&mut self) -> anyhow::Result<bool> {
        let new = self.tail.read_new(&mut self.ledger)?;
        let grew = new.first_entry < self.ledger.entries.len()
            || !new.amends.is_empty()
            || !new.id_amends.is_empty()
            || !new.key_amends.is_empty();
        // Entries already taken in, which the amends make "either" (the
        // ledger did the same to its own copy).
        let wronghost = |x: &Expected| x.expect == Expect::Drop && x.why == "wronghost";
        for (did, host) in &new.wronghost_amends {
            self.amend(did, host, wronghost);
        }
        for (did, host) in &new.amends {
            self.amend(did, host, |x| x.expect == Expect::Relay);
        }
        for (did, before) in &new.key_amends {
            for id in self.ids_by_did.get(did).cloned().unwrap_or_default() {
                let Some(x) = self.expected.get_mut(&id) else { continue };
                if x.expect == Expect::Relay && x.i < *before && super::ledger::is_signed_id(&id) {
                    if x.counted {
                        self.must -= 1;
                    }
                    x.expect = Expect::Either;
                }
            }
        }
        for id in &new.id_amends {
            if let Some(x) = self.expected.get_mut(id) {
                if x.expect == Expect::Relay && x.counted {
                    self.must -= 1;
                }
                x.expect = Expect::Either;
            }
        }
        self.absorb(new.first_entry, false);
        Ok(grew)
    }

    /// Make `did`'s expectations from `host` that `applies` "either".
    fn amend(&mut self, did: &str, host: &str, applies: impl Fn(&Expected) -> bool) {
        for id in self.ids_by_did.get(did).into_iter().flatten() {
            let Some(x) = self.expected.get_mut(id) else { continue };
            if x.host == host && applies(x) {
                if x.expect == Expect::Relay && x.counted {
                    self.must -= 1;
                }
                x.expect = Expect::Either;
            }
        }
    }

    /// One frame from the stream.
    fn frame(&mut self, bytes: &[u8]) -> anyhow::Result<bool> {
        self.report.frames += 1;
        let decoded = match frame::decode(bytes) {
            Ok(d) => d,
            Err(e) => {
                self.report.invalid += 1;
                self.report.note(format!("undecodable frame: {e}"));
                return Ok(true);
            }
        };
        let ev = match decoded.message {
            Message::Event(ev) => ev,
            Message::Error { error, message } => {
                self.report.note(format!("error frame {error}: {message:?}"));
                return Ok(false);
            }
        };
        if let Some(seq) = ev.seq() {
            if seq <= self.report.last_seq {
                self.report.out_of_order += 1;
                self.report.note(format!("seq {seq} after {}", self.report.last_seq));
            }
            self.report.last_seq = seq;
        }
        let Some(id) = frame_id(&ev) else { return Ok(true) };
        if !self.expected.contains_key(&id) && !self.others.contains(&id) {
            // Sent after the checker read the ledger: fakenet wrote it
            // there before sending it.
            self.follow()?;
        }
        if self.others.contains(&id) {
            self.report.other_hosts += 1;
            return Ok(true);
        }
        // The relay's own #account for a lost reactivation (one allowed).
        if let Event::Account(a) = &ev {
            let allowed = self.ledger.relay_accounts.get_mut(a.did).filter(|(active, n)| *active == a.active && *n > 0);
            if let Some((_, n)) = allowed.filter(|_| !self.expected.contains_key(&id)) {
                *n -= 1;
                self.report.either_seen += 1;
                // Allowed, so not a problem: noted only while the notes are
                // few, so they never crowd out the problems.
                if self.report.notes.len() < 5 {
                    self.report.note(format!("the relay's own #account for {} (active={})", a.did, a.active));
                }
                return Ok(true);
            }
        }
        verify(&ev, &self.keys, now_micros(), &mut self.report);
        self.classify(id);
        Ok(true)
    }

    fn classify(&mut self, id: String) {
        let count = self.seen.entry(id.clone()).or_insert(0);
        *count += 1;
        let count = *count;
        let report = &mut self.report;
        match self.expected.get(&id) {
            None => {
                report.unexpected += 1;
                report.note(format!("not in the ledger: {id}"));
            }
            Some(Expected { expect: Expect::Drop, why, host, i, did, .. }) => {
                report.unexpected += 1;
                let did = did.as_deref().unwrap_or("-");
                report.note(format!("must-drop relayed: {id} (ledger event {i}: {why}, {did} on {host})"));
            }
            Some(x) => {
                if count > 1 {
                    report.duplicates += 1;
                    report.note(format!("duplicate: {id}"));
                    return;
                }
                if x.expect == Expect::Relay && x.counted {
                    report.relayed += 1;
                } else if x.expect == Expect::Relay {
                    report.relayed_later += 1;
                } else {
                    report.either_seen += 1;
                }
                if let Some(did) = &x.did {
                    // Order holds within one host's stream; an account that
                    // moved has events on two hosts, which a relay reads
                    // independently (each at its own lag).
                    let last = self.last_by_did.entry(format!("{did} {}", x.host)).or_insert(0);
                    if x.i < *last {
                        report.out_of_order += 1;
                        report.note(format!("{did}: ledger event {} after {last}", x.i));
                    }
                    *last = (*last).max(x.i);
                }
            }
        }
    }

    fn finish(mut self) -> Report {
        // Missing events by host (count, first and last ledger event) and
        // by kind, then the ten earliest, ahead of the other notes: one
        // stalled host and scattered losses read differently.
        let mut by_host: std::collections::BTreeMap<&str, (u64, u64, u64)> = Default::default();
        let mut by_kind: std::collections::BTreeMap<&str, u64> = Default::default();
        let mut missing = Vec::new();
        for (id, x) in &self.expected {
            let n = self.seen.get(id).copied().unwrap_or(0);
            match x.expect {
                Expect::Relay if n == 0 && x.counted => {
                    self.report.missing += 1;
                    let h = by_host.entry(&x.host).or_insert((0, u64::MAX, 0));
                    *h = (h.0 + 1, h.1.min(x.i), h.2.max(x.i));
                    *by_kind.entry(&x.t).or_insert(0) += 1;
                    missing.push((x.i, id, x));
                }
                Expect::Either if n == 0 => self.report.either_missing += 1,
                _ => {}
            }
        }
        if !missing.is_empty() {
            let hosts: Vec<String> = by_host
                .iter()
                .map(|(h, (n, first, last))| format!("{h}: {n} (ledger events {first}..={last})"))
                .collect();
            let kinds: Vec<String> = by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let summary = format!("missing by host: {}; by kind: {}", hosts.join(", "), kinds.join(", "));
            missing.sort_by_key(|(i, ..)| *i);
            let earliest = missing.iter().take(10).map(|(i, id, x)| {
                format!("missing: {id} (ledger event {i}, {} on {})", x.did.as_deref().unwrap_or("-"), x.host)
            });
            self.report.notes.splice(0..0, std::iter::once(summary).chain(earliest));
        }
        self.report
    }
}

fn now_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// Subscribe and check until every expected event arrived (then `settle`
/// longer), the stream ends, or the timeout.
pub fn run(cfg: &CheckConfig) -> anyhow::Result<Report> {
    let started = Instant::now();
    let deadline = started + cfg.timeout;
    let (ledger, tail) = if cfg.wait_done {
        wait_for_done(&cfg.ledger, deadline)?
    } else {
        let mut tail = LedgerTail::open(&cfg.ledger)?;
        let mut ledger = Ledger::default();
        tail.read_new(&mut ledger)?;
        (ledger, tail)
    };
    let mut checker = Checker::new(cfg, ledger, tail);
    let url = match cfg.cursor {
        Some(c) => format!("{}/xrpc/com.atproto.sync.subscribeRepos?cursor={c}", cfg.relay),
        None => format!("{}/xrpc/com.atproto.sync.subscribeRepos", cfg.relay),
    };
    let (mut sock, _) = tungstenite::connect(url.as_str())?;
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = sock.get_mut() {
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
    }
    let mut all_seen_at: Option<Instant> = None;
    while Instant::now() < deadline {
        if checker.report.relayed >= checker.must && all_seen_at.is_none() {
            all_seen_at = Some(Instant::now());
        }
        if all_seen_at.is_some_and(|t| t.elapsed() >= cfg.settle) {
            break;
        }
        let msg = match sock.read() {
            Ok(m) => m,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                continue
            }
            Err(e) => {
                checker.report.note(format!("connection ended: {e}"));
                break;
            }
        };
        let tungstenite::Message::Binary(bytes) = msg else { continue };
        if !checker.frame(&bytes)? {
            break;
        }
    }
    Ok(checker.finish())
}

fn verify(ev: &Event<'_>, keys: &HashMap<String, Vec<PublicKey>>, now: i64, report: &mut Report) {
    let checked = match ev {
        Event::Commit(c) => check_commit(c, Mode::Strict, now),
        Event::Sync(s) => check_sync(s, now),
        _ => return,
    };
    let did = ev.did().unwrap_or("");
    match (checked, keys.get(did).filter(|ks| !ks.is_empty())) {
        (Ok(c), Some(ks)) => {
            if !ks.iter().any(|k| c.verify_signature(k).is_ok()) {
                report.invalid += 1;
                report.note(format!("{did}: signature verifies with none of its {} keys", ks.len()));
            }
        }
        (Ok(_), None) => {
            report.invalid += 1;
            report.note(format!("{did}: no key in the ledger"));
        }
        (Err(e), _) => {
            report.invalid += 1;
            report.note(format!("{did}: {e}"));
        }
    }
}

/// Used by `--relay` values given as `host:port`.
pub fn normalise_url(s: &str) -> String {
    if s.starts_with("ws://") || s.starts_with("wss://") {
        s.trim_end_matches('/').to_owned()
    } else {
        format!("ws://{}", s.trim_end_matches('/'))
    }
}
