//! The exact checker: subscribe to a relay (or any firehose) and compare
//! what it sends with the ledger.
//!
//! Verdicts: every "relay" event appears exactly once; no "drop" event
//! appears (unless a "relay" entry shares its id); "either" events appear at
//! most once; per-DID order follows the ledger; the stream's seq strictly
//! increases; every frame decodes; every commit verifies (signature with
//! the ledger's key, Sync 1.1 proof). The summary line names each count.

use super::ledger::{Expect, Ledger};
use sluice_common::commit::{check_commit, check_sync, Mode};
use sluice_common::crypto::PublicKey;
use sluice_common::frame::{self, Event, Message};
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
    /// Only entries from these hosts count (checking one host's own stream).
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
    pub either_missing: u64,
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
            "relayed={} missing={} unexpected={} duplicates={} out_of_order={} invalid={} either_seen={} either_missing={} frames={} last_seq={}",
            self.relayed,
            self.missing,
            self.unexpected,
            self.duplicates,
            self.out_of_order,
            self.invalid,
            self.either_seen,
            self.either_missing,
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

fn wait_for_done(path: &std::path::Path, deadline: Instant) -> anyhow::Result<Ledger> {
    loop {
        let l = Ledger::read(path)?;
        if l.done || Instant::now() >= deadline {
            return Ok(l);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn run(cfg: &CheckConfig) -> anyhow::Result<Report> {
    let started = Instant::now();
    let deadline = started + cfg.timeout;
    let ledger = if cfg.wait_done { wait_for_done(&cfg.ledger, deadline)? } else { Ledger::read(&cfg.ledger)? };
    let keys: HashMap<&str, PublicKey> =
        ledger.keys.iter().filter_map(|(d, k)| PublicKey::from_multikey(k).ok().map(|k| (d.as_str(), k))).collect();
    // id -> (expectation, ledger index, did)
    let mut expected: HashMap<&str, (Expect, u64, Option<&str>)> = HashMap::new();
    for e in &ledger.entries {
        if cfg.only_host.as_ref().is_some_and(|h| h != &e.host) || e.hseq.is_none() {
            continue;
        }
        let slot = expected.entry(e.id.as_str()).or_insert((e.expect, e.i, e.did.as_deref()));
        // A "relay" entry wins over a "drop" with the same id (a replay).
        if e.expect == Expect::Relay || (e.expect == Expect::Either && slot.0 == Expect::Drop) {
            *slot = (e.expect, e.i, e.did.as_deref());
        }
    }
    let must = expected.values().filter(|v| v.0 == Expect::Relay).count() as u64;
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut last_by_did: HashMap<String, u64> = HashMap::new();
    let mut report = Report::default();
    let url = match cfg.cursor {
        Some(c) => format!("{}/xrpc/com.atproto.sync.subscribeRepos?cursor={c}", cfg.relay),
        None => format!("{}/xrpc/com.atproto.sync.subscribeRepos", cfg.relay),
    };
    let (mut sock, _) = tungstenite::connect(url.as_str())?;
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = sock.get_mut() {
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
    }
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64;
    let mut all_seen_at: Option<Instant> = None;
    while Instant::now() < deadline {
        if report.relayed >= must && all_seen_at.is_none() {
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
                report.note(format!("connection ended: {e}"));
                break;
            }
        };
        let tungstenite::Message::Binary(bytes) = msg else { continue };
        report.frames += 1;
        let decoded = match frame::decode(&bytes) {
            Ok(d) => d,
            Err(e) => {
                report.invalid += 1;
                report.note(format!("undecodable frame: {e}"));
                continue;
            }
        };
        let ev = match decoded.message {
            Message::Event(ev) => ev,
            Message::Error { error, message } => {
                report.note(format!("error frame {error}: {message:?}"));
                break;
            }
        };
        if let Some(seq) = ev.seq() {
            if seq <= report.last_seq {
                report.out_of_order += 1;
                report.note(format!("seq {seq} after {}", report.last_seq));
            }
            report.last_seq = seq;
        }
        let Some(id) = frame_id(&ev) else { continue };
        verify(&ev, &keys, now(), &mut report);
        let count = seen.entry(id.clone()).or_insert(0);
        *count += 1;
        match expected.get(id.as_str()) {
            None => {
                report.unexpected += 1;
                report.note(format!("not in the ledger: {id}"));
            }
            Some((Expect::Drop, ..)) => {
                report.unexpected += 1;
                report.note(format!("must-drop relayed: {id}"));
            }
            Some((exp, i, did)) => {
                if *count > 1 {
                    report.duplicates += 1;
                    report.note(format!("duplicate: {id}"));
                    continue;
                }
                if *exp == Expect::Relay {
                    report.relayed += 1;
                } else {
                    report.either_seen += 1;
                }
                if let Some(did) = did {
                    let last = last_by_did.entry(did.to_string()).or_insert(0);
                    if *i < *last {
                        report.out_of_order += 1;
                        report.note(format!("{did}: ledger event {i} after {last}"));
                    }
                    *last = (*last).max(*i);
                }
            }
        }
    }
    for (id, (exp, ..)) in &expected {
        let n = seen.get(*id).copied().unwrap_or(0);
        match exp {
            Expect::Relay if n == 0 => {
                report.missing += 1;
                report.note(format!("missing: {id}"));
            }
            Expect::Either if n == 0 => report.either_missing += 1,
            _ => {}
        }
    }
    Ok(report)
}

fn verify(ev: &Event<'_>, keys: &HashMap<&str, PublicKey>, now: i64, report: &mut Report) {
    let checked = match ev {
        Event::Commit(c) => check_commit(c, Mode::Strict, now),
        Event::Sync(s) => check_sync(s, now),
        _ => return,
    };
    let did = ev.did().unwrap_or("");
    match (checked, keys.get(did)) {
        (Ok(c), Some(k)) => {
            if let Err(e) = c.verify_signature(k) {
                report.invalid += 1;
                report.note(format!("{did}: signature: {e}"));
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
