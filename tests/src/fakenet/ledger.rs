//! The ledger: every event fakenet emitted and what a correct relay must do
//! with it. JSON lines, one object per line:
//!
//! - first line, the header:
//!   `{"ledger": 1, "seed": S, "accounts": [{"did", "key", "host"}...]}`
//!   (`key` is the account's multikey, so a checker can verify signatures);
//! - one line per emitted event ([`Entry`]):
//!   `{"i": N, "host": "localhost:PORT", "hseq": SEQ|null, "did": DID|null,
//!     "t": "#commit", "id": ID, "expect": "relay"|"drop"|"either",
//!     "why": REASON}`
//!   `id` names the event the way it survives relaying: the commit CID for
//!   `#commit`, `"<t>|<did>|<time>"` for `#sync`, `#identity` and
//!   `#account` (fakenet never repeats a `time`). Events that never carry a seq (malformed frames, stalls)
//!   have `hseq: null`; they are connection faults, listed for the record.
//! - `{"amend": "either", "did": DID, "host": HOST}`: every event of DID from
//!   HOST becomes "either" (an account migrated away; a relay that reads the
//!   old host after the move rightly drops its events);
//! - `{"key": {"did", "key"}}`: an account created or re-keyed after the
//!   header;
//! - last line `{"done": true, "events": N}` once generation has stopped.
//!
//! `expect`: "relay" = must appear exactly once; "drop" = must not appear
//! (unless another entry with the same id must); "either" = may appear at
//! most once, counted apart.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, Write};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Relay,
    Drop,
    Either,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub i: u64,
    pub host: String,
    pub hseq: Option<i64>,
    pub did: Option<String>,
    pub t: String,
    pub id: String,
    pub expect: Expect,
    pub why: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountKey {
    pub did: String,
    pub key: String,
    pub host: String,
}

/// One line of the ledger.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Line {
    Header { ledger: u32, seed: u64, accounts: Vec<AccountKey> },
    Amend { amend: Expect, did: String, host: String },
    Key { key: AccountKey },
    Done { done: bool, events: u64 },
    Event(Entry),
}

/// Appends lines; flushes on [`LedgerWriter::flush`] and drop.
pub struct LedgerWriter {
    out: std::io::BufWriter<std::fs::File>,
}

impl LedgerWriter {
    pub fn create(path: &std::path::Path) -> std::io::Result<LedgerWriter> {
        Ok(LedgerWriter { out: std::io::BufWriter::with_capacity(1 << 16, std::fs::File::create(path)?) })
    }

    pub fn write(&mut self, line: &Line) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, line)?;
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// A whole ledger, read back.
#[derive(Debug, Default)]
pub struct Ledger {
    pub seed: u64,
    pub keys: HashMap<String, String>,
    pub entries: Vec<Entry>,
    pub done: bool,
}

impl Ledger {
    pub fn read(path: &std::path::Path) -> anyhow::Result<Ledger> {
        let f = std::io::BufReader::new(std::fs::File::open(path)?);
        let mut l = Ledger::default();
        let mut amends: Vec<(String, String)> = Vec::new();
        for (n, line) in f.lines().enumerate() {
            let line = line?;
            if line.is_empty() {
                continue;
            }
            let parsed: Line =
                serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("ledger line {}: {e}", n + 1))?;
            match parsed {
                Line::Header { seed, accounts, .. } => {
                    l.seed = seed;
                    l.keys.extend(accounts.into_iter().map(|a| (a.did, a.key)));
                }
                Line::Key { key } => {
                    l.keys.insert(key.did, key.key);
                }
                Line::Amend { did, host, .. } => amends.push((did, host)),
                Line::Done { done, .. } => l.done = done,
                Line::Event(e) => l.entries.push(e),
            }
        }
        for e in &mut l.entries {
            if e.expect == Expect::Relay && amends.iter().any(|(d, h)| Some(d) == e.did.as_ref() && *h == e.host) {
                e.expect = Expect::Either;
            }
        }
        Ok(l)
    }
}
