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
//! - `{"amend_wronghost": "either", "did": DID, "host": HOST}`: the
//!   account moved to HOST; `wronghost` commits injected there before the
//!   move become "either" (a relay that reads HOST's backlog after the
//!   move checks them against the new document, which names HOST);
//! - `{"amend_key": "either", "did": DID, "before": N}`: DID's signing key
//!   changed; its signed events (`#commit`, `#sync`) before entry N become
//!   "either" (a relay that resolves the DID after the change cannot
//!   verify them, one that was live before could);
//! - `{"key": {"did", "key"}}`: an account created, first active, or
//!   re-keyed after the header (a commit passes with any key its DID had);
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
    Header {
        ledger: u32,
        seed: u64,
        accounts: Vec<AccountKey>,
    },
    Amend {
        amend: Expect,
        did: String,
        host: String,
    },
    AmendWrongHost {
        amend_wronghost: Expect,
        did: String,
        host: String,
    },
    /// The relay may emit one `#account` of its own for `did` with this
    /// `active` (not in any host's stream): fault `lostreactivation`.
    RelayAccount {
        relay_account: bool,
        did: String,
    },
    /// `did`'s signed events before entry `before` become "either" (its key
    /// changed: `rotatekey`).
    AmendKey {
        amend_key: Expect,
        did: String,
        before: u64,
    },
    /// The events with these ids become "either" (`deactivatedcommit`
    /// faults of an account reactivated since: a relay behind on that
    /// host asks the PDS, which now says active).
    AmendIds {
        amend_ids: Vec<String>,
        did: String,
    },
    Key {
        key: AccountKey,
    },
    Done {
        done: bool,
        events: u64,
    },
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
    /// Every key each DID has had, oldest first (`rotatekey` adds one).
    pub keys: HashMap<String, Vec<String>>,
    pub entries: Vec<Entry>,
    pub done: bool,
    /// `(did, host)` of every amend line so far.
    pub amends: Vec<(String, String)>,
    /// DIDs the relay may emit `#account` events of its own for: the
    /// `active` they would carry, and how many (one per fault).
    pub relay_accounts: HashMap<String, (bool, u32)>,
}

/// What one [`LedgerTail::read_new`] call brought in.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NewLines {
    /// Index in [`Ledger::entries`] of the first new entry.
    pub first_entry: usize,
    /// Amends read by this call, `(did, host)`.
    pub amends: Vec<(String, String)>,
    /// `wronghost` amends read by this call, `(did, host)`.
    pub wronghost_amends: Vec<(String, String)>,
    /// Ids made "either" by this call.
    pub id_amends: Vec<String>,
    /// Key changes read by this call, `(did, before)`.
    pub key_amends: Vec<(String, u64)>,
}

/// Is an event with this ledger id one a signing key vouches for (a
/// commit, named by its CID, or a `#sync`)?
pub fn is_signed_id(id: &str) -> bool {
    !id.starts_with('#') || id.starts_with("#sync|")
}

impl Ledger {
    /// Read the whole file as it is now.
    pub fn read(path: &std::path::Path) -> anyhow::Result<Ledger> {
        let mut tail = LedgerTail::open(path)?;
        let mut l = Ledger::default();
        tail.read_new(&mut l)?;
        Ok(l)
    }

    fn apply(&mut self, line: Line, new: &mut NewLines) {
        match line {
            Line::Header { seed, accounts, .. } => {
                self.seed = seed;
                for a in accounts {
                    self.keys.entry(a.did).or_default().push(a.key);
                }
            }
            Line::Key { key } => {
                let ks = self.keys.entry(key.did).or_default();
                if !ks.contains(&key.key) {
                    ks.push(key.key);
                }
            }
            Line::Amend { did, host, .. } => {
                for e in &mut self.entries {
                    if e.expect == Expect::Relay && e.did.as_ref() == Some(&did) && e.host == host {
                        e.expect = Expect::Either;
                    }
                }
                self.amends.push((did.clone(), host.clone()));
                new.amends.push((did, host));
            }
            Line::AmendWrongHost { did, host, .. } => {
                for e in &mut self.entries {
                    if e.expect == Expect::Drop
                        && e.why == "wronghost"
                        && e.did.as_ref() == Some(&did)
                        && e.host == host
                    {
                        e.expect = Expect::Either;
                    }
                }
                new.wronghost_amends.push((did, host));
            }
            Line::AmendKey { did, before, .. } => {
                for e in &mut self.entries {
                    if e.expect == Expect::Relay && e.did.as_ref() == Some(&did) && e.i < before && is_signed_id(&e.id)
                    {
                        e.expect = Expect::Either;
                    }
                }
                new.key_amends.push((did, before));
            }
            Line::AmendIds { amend_ids, .. } => {
                for e in &mut self.entries {
                    if amend_ids.contains(&e.id) {
                        e.expect = Expect::Either;
                    }
                }
                new.id_amends.extend(amend_ids);
            }
            Line::RelayAccount { relay_account, did } => {
                let e = self.relay_accounts.entry(did).or_insert((relay_account, 0));
                *e = (relay_account, e.1 + 1);
            }
            Line::Done { done, .. } => self.done = done,
            Line::Event(mut e) => {
                // An amend covers the host's events of that DID written after it too.
                if e.expect == Expect::Relay
                    && self.amends.iter().any(|(d, h)| Some(d) == e.did.as_ref() && *h == e.host)
                {
                    e.expect = Expect::Either;
                }
                self.entries.push(e);
            }
        }
    }
}

/// Follows a ledger file as fakenet appends to it: each call reads the
/// complete lines written since the last one (a line still being written
/// waits for the next call).
pub struct LedgerTail {
    file: std::io::BufReader<std::fs::File>,
    partial: String,
    line_no: usize,
}

impl LedgerTail {
    pub fn open(path: &std::path::Path) -> anyhow::Result<LedgerTail> {
        let f = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(LedgerTail { file: std::io::BufReader::new(f), partial: String::new(), line_no: 0 })
    }

    /// Apply every complete line written since the last call to `ledger`.
    pub fn read_new(&mut self, ledger: &mut Ledger) -> anyhow::Result<NewLines> {
        let mut new = NewLines { first_entry: ledger.entries.len(), ..NewLines::default() };
        loop {
            let n = self.file.read_line(&mut self.partial)?;
            if n == 0 || !self.partial.ends_with('\n') {
                return Ok(new);
            }
            self.line_no += 1;
            let line = std::mem::take(&mut self.partial);
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            let parsed: Line =
                serde_json::from_str(line).map_err(|e| anyhow::anyhow!("ledger line {}: {e}", self.line_no))?;
            ledger.apply(parsed, &mut new);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64, did: &str, host: &str) -> Entry {
        Entry {
            i,
            host: host.into(),
            hseq: Some(i as i64),
            did: Some(did.into()),
            t: "#commit".into(),
            id: format!("id{i}"),
            expect: Expect::Relay,
            why: String::new(),
        }
    }

    /// A tail sees lines as they are appended, never half a line, and an
    /// amend turns the DID's earlier and later entries on that host into
    /// "either".
    #[test]
    fn tail_reads_appended_lines_and_amends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.jsonl");
        let mut w = LedgerWriter::create(&path).unwrap();
        w.write(&Line::Header { ledger: 1, seed: 3, accounts: Vec::new() }).unwrap();
        w.write(&Line::Event(entry(1, "did:a", "h1"))).unwrap();
        w.flush().unwrap();
        let mut l = Ledger::default();
        let mut tail = LedgerTail::open(&path).unwrap();
        assert_eq!(tail.read_new(&mut l).unwrap().first_entry, 0);
        assert_eq!((l.seed, l.entries.len()), (3, 1));
        // Half a line: not read yet.
        use std::io::Write;
        let mut raw = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        raw.write_all(br#"{"amend": "either", "did": "did:a","#).unwrap();
        raw.flush().unwrap();
        assert_eq!(tail.read_new(&mut l).unwrap().amends.len(), 0);
        raw.write_all(b" \"host\": \"h1\"}\n").unwrap();
        let line = serde_json::to_string(&Line::Event(entry(2, "did:a", "h1"))).unwrap();
        raw.write_all(format!("{line}\n").as_bytes()).unwrap();
        let line = serde_json::to_string(&Line::Event(entry(3, "did:a", "h2"))).unwrap();
        raw.write_all(format!("{line}\n").as_bytes()).unwrap();
        raw.flush().unwrap();
        let new = tail.read_new(&mut l).unwrap();
        assert_eq!(
            new,
            NewLines { first_entry: 1, amends: vec![("did:a".into(), "h1".into())], ..NewLines::default() }
        );
        let expects: Vec<Expect> = l.entries.iter().map(|e| e.expect).collect();
        assert_eq!(expects, [Expect::Either, Expect::Either, Expect::Relay]);
        assert_eq!(Ledger::read(&path).unwrap().entries, l.entries);
        // A wronghost commit on a host the account later moves to.
        let mut w = entry(4, "did:a", "h3");
        w.expect = Expect::Drop;
        w.why = "wronghost".into();
        let line = serde_json::to_string(&Line::Event(w)).unwrap();
        raw.write_all(format!("{line}\n").as_bytes()).unwrap();
        raw.write_all(b"{\"amend_wronghost\": \"either\", \"did\": \"did:a\", \"host\": \"h3\"}\n").unwrap();
        raw.flush().unwrap();
        let new = tail.read_new(&mut l).unwrap();
        assert_eq!(new.wronghost_amends, vec![("did:a".to_owned(), "h3".to_owned())]);
        assert_eq!(l.entries[3].expect, Expect::Either);
        assert_eq!(l.entries[2].expect, Expect::Relay, "other hosts' entries untouched");
    }
}
