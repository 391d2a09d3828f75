//! The stateful checks (PROTOCOL.md §5, items 5-8), as a pure function of
//! the stored account state and one validated event. The db-writer's
//! sequencer calls [`decide`] for every event, in upstream order per host,
//! and stores the returned state in the same transaction that makes the
//! event durable.
//!
//! Behaviours:
//! - `#commit` from an account that is not active (upstream deactivated,
//!   suspended, deleted, or taken down here) is dropped.
//! - `#commit` whose rev is not strictly greater than the stored rev is
//!   dropped (replays, reordering).
//! - Strict mode: a `#commit` without `prevData` is dropped unless it is
//!   the first commit seen for the account.
//! - A chain break (`prevData` differs from the stored data CID) on an
//!   otherwise valid commit passes, moves the stored state, and is counted.
//! - `#sync` with a rev older than the stored one is dropped; otherwise it
//!   resets (rev, data).
//! - `#account` stores the upstream status and passes; `#identity` passes.
//! - A taken-down account's events are dropped whatever they are.
//! - An event from a host other than the account's current one moves the
//!   account only if the shard checked it against a DID document fetched
//!   after the one behind the current host (`identity_micros`); otherwise
//!   it is a stale host's event (read late, from before the account moved
//!   away) and is dropped. Shards cache documents separately, so a
//!   lagging old host can pass its shard's check on a cached document.

use crate::atproto::cid::{binary_digest, binary_fingerprint};
use crate::atproto::syntax::tid_value;
use crate::ipc::ringrec::{EventRecord, Kind, PROOF_ABSENT, PROOF_FAILED};

/// An account's status as the relay reports it (getRepoStatus, listRepos,
/// its own `#account` events; stored in `accounts.status`): the values the
/// sync lexicons know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccountStatus {
    Active,
    Takendown,
    Suspended,
    Deleted,
    Deactivated,
    Desynchronized,
    Throttled,
}

impl AccountStatus {
    pub const ALL: [AccountStatus; 7] = [
        AccountStatus::Active,
        AccountStatus::Takendown,
        AccountStatus::Suspended,
        AccountStatus::Deleted,
        AccountStatus::Deactivated,
        AccountStatus::Desynchronized,
        AccountStatus::Throttled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AccountStatus::Active => "active",
            AccountStatus::Takendown => "takendown",
            AccountStatus::Suspended => "suspended",
            AccountStatus::Deleted => "deleted",
            AccountStatus::Deactivated => "deactivated",
            AccountStatus::Desynchronized => "desynchronized",
            AccountStatus::Throttled => "throttled",
        }
    }

    pub fn parse(s: &str) -> Option<AccountStatus> {
        AccountStatus::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// The reason an inactive account's host gave (`#account` status,
    /// getRepoStatus): a word the lexicons do not know, or none, is
    /// reported as `deactivated` (the raw word stays in
    /// [`AccountState::upstream_status`]).
    pub fn from_upstream(word: Option<&str>) -> AccountStatus {
        match word.and_then(AccountStatus::parse) {
            None | Some(AccountStatus::Active) => AccountStatus::Deactivated,
            Some(s) => s,
        }
    }
}

impl std::fmt::Display for AccountStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status word an account's host last gave, compactly: none (active),
/// one the lexicons know, or another (kept as its host said only in the
/// store, `accounts.upstream_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum UpstreamStatus {
    #[default]
    None,
    Known(AccountStatus),
    Other,
}

impl UpstreamStatus {
    pub fn from_word(word: Option<&str>) -> UpstreamStatus {
        match word {
            None | Some("") => UpstreamStatus::None,
            Some(w) => AccountStatus::parse(w).map_or(UpstreamStatus::Other, UpstreamStatus::Known),
        }
    }

    /// A code in 0..=15 (stores keep it in four bits).
    pub fn code(self) -> u8 {
        match self {
            UpstreamStatus::None => 0,
            UpstreamStatus::Known(s) => 1 + AccountStatus::ALL.iter().position(|a| *a == s).expect("listed") as u8,
            UpstreamStatus::Other => 15,
        }
    }

    pub fn from_code(c: u8) -> UpstreamStatus {
        match c {
            0 => UpstreamStatus::None,
            c if (1..=AccountStatus::ALL.len() as u8).contains(&c) => {
                UpstreamStatus::Known(AccountStatus::ALL[c as usize - 1])
            }
            _ => UpstreamStatus::Other,
        }
    }
}

/// What the relay stores per account, compactly (no heap: the cache of
/// millions of accounts holds it as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AccountState {
    pub host_id: i64,
    /// Upstream: active flag and status word as the host last said.
    pub upstream_active: bool,
    pub upstream_status: UpstreamStatus,
    /// Local moderation: taken down by the relay's admin.
    pub takendown: bool,
    /// Not admitted: it appeared on a host already at its account limit.
    /// Nothing of it is relayed, and it is not in the host's account count,
    /// until the host has room (the sequencer checks before [`decide`]).
    pub throttled: bool,
    /// The last commit's rev, as its number (`syntax::tid_value`).
    pub rev: Option<u64>,
    /// The last commit's CID's sha-256 digest (a commit is dag-cbor).
    pub commit: Option<[u8; 32]>,
    /// 16 bits of the last commit's data CID (`cid::binary_fingerprint`):
    /// whether the next `prevData` follows it.
    pub data_fp: Option<i16>,
    /// Newest `identity_micros` of an event accepted from `host_id`.
    pub host_checked_micros: i64,
    /// Its number in the collection index (`accounts.no`); 0: not placed
    /// in the index yet.
    pub no: u32,
}

impl AccountState {
    pub fn new(host_id: i64) -> AccountState {
        AccountState { host_id, upstream_active: true, ..Default::default() }
    }

    /// The status the relay reports: local takedown wins.
    pub fn status(&self) -> AccountStatus {
        if self.takendown {
            AccountStatus::Takendown
        } else if self.throttled {
            AccountStatus::Throttled
        } else if self.upstream_active {
            AccountStatus::Active
        } else {
            match self.upstream_status {
                UpstreamStatus::Known(s) if s != AccountStatus::Active => s,
                _ => AccountStatus::Deactivated,
            }
        }
    }

    /// The host said the account is deleted.
    pub fn deleted_upstream(&self) -> bool {
        self.upstream_status == UpstreamStatus::Known(AccountStatus::Deleted)
    }

    /// The last commit's CID.
    pub fn commit_cid(&self) -> Option<crate::atproto::cid::Cid> {
        self.commit.map(|d| crate::atproto::cid::Cid::new(crate::atproto::cid::Codec::DagCbor, d))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    TakenDown,
    Inactive,
    RevNotNewer,
    PrevDataMissing,
    SyncRevOlder,
    StaleHost,
}

impl Drop {
    pub fn name(self) -> &'static str {
        match self {
            Drop::TakenDown => "takendown",
            Drop::Inactive => "inactive",
            Drop::RevNotNewer => "rev_not_newer",
            Drop::PrevDataMissing => "prevdata_missing",
            Drop::SyncRevOlder => "sync_rev_older",
            Drop::StaleHost => "stale_host",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Sequence it. `chain_break`: prevData did not follow the stored
    /// data; `proof_failed`: lenient pass of a failed proof.
    Relay {
        chain_break: bool,
        proof_failed: bool,
    },
    Drop(Drop),
}

/// Decide on `ev` given the stored state (None = never seen); returns the
/// verdict and the state to store (unchanged on drop).
pub fn decide(stored: Option<&AccountState>, ev: &EventRecord<'_>, strict: bool) -> (Verdict, AccountState) {
    let st = stored.copied().unwrap_or_else(|| AccountState::new(ev.host_id));
    if st.takendown {
        return (Verdict::Drop(Drop::TakenDown), st);
    }
    let moved = stored.is_some_and(|s| s.host_id != ev.host_id);
    if moved && ev.identity_micros <= st.host_checked_micros {
        return (Verdict::Drop(Drop::StaleHost), st);
    }
    let (verdict, mut st) = decide_kind(st, ev, strict);
    if matches!(verdict, Verdict::Relay { .. }) {
        st.host_checked_micros =
            if moved { ev.identity_micros } else { st.host_checked_micros.max(ev.identity_micros) };
    }
    (verdict, st)
}

fn decide_kind(mut st: AccountState, ev: &EventRecord<'_>, strict: bool) -> (Verdict, AccountState) {
    let drop = |d, st| (Verdict::Drop(d), st);
    let relay = Verdict::Relay { chain_break: false, proof_failed: false };
    match Kind::from_u8(ev.kind) {
        Some(Kind::Commit) => {
            if !st.upstream_active {
                return drop(Drop::Inactive, st);
            }
            // A shard relays only revs that are TIDs.
            let Some(rev) = tid_value(ev.rev) else { return drop(Drop::RevNotNewer, st) };
            if st.rev.is_some_and(|r| rev <= r) {
                return drop(Drop::RevNotNewer, st);
            }
            if strict && ev.proof == PROOF_ABSENT && st.data_fp.is_some() {
                return drop(Drop::PrevDataMissing, st);
            }
            let chain_break = match (st.data_fp, binary_fingerprint(ev.prev_data)) {
                (Some(d), Some(p)) => d != p,
                _ => false,
            };
            st.host_id = ev.host_id;
            st.rev = Some(rev);
            st.commit = binary_digest(ev.commit_cid);
            st.data_fp = binary_fingerprint(ev.data_cid);
            (Verdict::Relay { chain_break, proof_failed: ev.proof == PROOF_FAILED }, st)
        }
        Some(Kind::Sync) => {
            let Some(rev) = tid_value(ev.rev) else { return drop(Drop::SyncRevOlder, st) };
            if st.rev.is_some_and(|r| rev < r) {
                return drop(Drop::SyncRevOlder, st);
            }
            st.host_id = ev.host_id;
            st.rev = Some(rev);
            st.commit = binary_digest(ev.commit_cid);
            st.data_fp = binary_fingerprint(ev.data_cid);
            (relay, st)
        }
        Some(Kind::Account) => {
            st.host_id = ev.host_id;
            st.upstream_active = ev.active;
            st.upstream_status = UpstreamStatus::from_word(Some(ev.status));
            (relay, st)
        }
        Some(Kind::Identity) | None => {
            st.host_id = ev.host_id;
            (relay, st)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atproto::cid::{Cid, Codec};
    use crate::atproto::syntax::Tid;
    use crate::ipc::ringrec::PROOF_VERIFIED;

    /// A rev named by a letter: "a" < "b" < ... as TIDs; "" is none.
    fn r(name: &str) -> &'static str {
        match name.bytes().next() {
            None => "",
            Some(b) => Box::leak(Tid::from_micros(1_700_000_000_000_000 + b as u64, 0).into_string().into_boxed_str()),
        }
    }

    /// A binary CID named by a string; "" is none.
    fn c(name: &str) -> &'static [u8] {
        if name.is_empty() {
            return &[];
        }
        Box::leak(Cid::compute(Codec::DagCbor, name.as_bytes()).to_bytes().to_vec().into_boxed_slice())
    }

    fn ev<'a>(kind: Kind, rev: &'a str, data: &'a [u8], prev: &'a [u8]) -> EventRecord<'a> {
        EventRecord {
            host_id: 1,
            upstream_seq: 1,
            kind: kind as u8,
            did: "did:plc:a",
            rev,
            since: "",
            commit_cid: c("the commit"),
            data_cid: data,
            prev_data: prev,
            proof: if prev.is_empty() { PROOF_ABSENT } else { PROOF_VERIFIED },
            active: true,
            status: "",
            time_micros: 0,
            identity_micros: 10,
            frame: b"",
            seq_start: 0,
            seq_end: 0,
            collections: &[],
        }
    }

    const RELAY: Verdict = Verdict::Relay { chain_break: false, proof_failed: false };

    #[test]
    fn rev_order_chain_and_first_commit() {
        let (v, s) = decide(None, &ev(Kind::Commit, r("b"), c("d1"), c("")), true);
        assert_eq!(v, RELAY, "first commit may lack prevData");
        let (v, _) = decide(Some(&s), &ev(Kind::Commit, r("b"), c("d2"), c("d1")), true);
        assert_eq!(v, Verdict::Drop(Drop::RevNotNewer));
        let (v, _) = decide(Some(&s), &ev(Kind::Commit, r("a"), c("d2"), c("d1")), true);
        assert_eq!(v, Verdict::Drop(Drop::RevNotNewer));
        let (v, _) = decide(Some(&s), &ev(Kind::Commit, r("c"), c("d2"), c("")), true);
        assert_eq!(v, Verdict::Drop(Drop::PrevDataMissing));
        let (v, _) = decide(Some(&s), &ev(Kind::Commit, r("c"), c("d2"), c("")), false);
        assert_eq!(v, RELAY, "lenient allows a missing prevData");
        let (v, s2) = decide(Some(&s), &ev(Kind::Commit, r("c"), c("d2"), c("d1")), true);
        assert_eq!(v, RELAY);
        let (v, s3) = decide(Some(&s2), &ev(Kind::Commit, r("d"), c("d3"), c("zz")), true);
        assert_eq!(v, Verdict::Relay { chain_break: true, proof_failed: false });
        assert_eq!(s3.data_fp, binary_fingerprint(c("d3")));
        assert_eq!(s3.rev, tid_value(r("d")));
        assert_eq!(s3.commit_cid(), Cid::from_bytes(c("the commit")).ok());
    }

    /// A late event from the host an account left passes its shard on a
    /// cached document; it must not move the account back, nor may its
    /// stale `#account` gate the new host's commits.
    #[test]
    fn stale_host_events_do_not_move_the_account() {
        let (_, s) = decide(None, &ev(Kind::Commit, r("b"), c("d1"), c("")), true);
        assert_eq!(s.host_checked_micros, 10);
        // The account moves to host 2 on a document fetched at 50.
        let mut moved = ev(Kind::Identity, r(""), c(""), c(""));
        moved.host_id = 2;
        moved.identity_micros = 50;
        let (v, s) = decide(Some(&s), &moved, true);
        assert_eq!((v, s.host_id, s.host_checked_micros), (RELAY, 2, 50));
        // Host 1, read late, on its shard's document from 10 (or 50 itself).
        for at in [10, 50] {
            let mut stale = ev(Kind::Account, r(""), c(""), c(""));
            stale.active = false;
            stale.status = "deactivated";
            stale.identity_micros = at;
            let (v, same) = decide(Some(&s), &stale, true);
            assert_eq!(v, Verdict::Drop(Drop::StaleHost));
            assert_eq!(same, s);
        }
        // Host 2's events on older cached documents still pass (same host).
        let mut next = ev(Kind::Commit, r("c"), c("d2"), c("d1"));
        next.host_id = 2;
        next.identity_micros = 20;
        let (v, s) = decide(Some(&s), &next, true);
        assert_eq!((v, s.host_checked_micros), (RELAY, 50));
        // Moving back to host 1 on a newer document is a move.
        let mut back = ev(Kind::Identity, r(""), c(""), c(""));
        back.identity_micros = 60;
        let (v, s) = decide(Some(&s), &back, true);
        assert_eq!((v, s.host_id, s.host_checked_micros), (RELAY, 1, 60));
    }

    #[test]
    fn account_status_gates_commits_and_sync_resets() {
        let (_, s) = decide(None, &ev(Kind::Commit, r("b"), c("d1"), c("")), true);
        let mut deact = ev(Kind::Account, r(""), c(""), c(""));
        deact.active = false;
        deact.status = "deactivated";
        let (v, s) = decide(Some(&s), &deact, true);
        assert_eq!(v, RELAY);
        assert_eq!(s.status(), AccountStatus::Deactivated);
        let (v, _) = decide(Some(&s), &ev(Kind::Commit, r("c"), c("d2"), c("d1")), true);
        assert_eq!(v, Verdict::Drop(Drop::Inactive));
        let (v, s) = decide(Some(&s), &ev(Kind::Account, r(""), c(""), c("")), true);
        assert_eq!(v, RELAY);
        assert_eq!(s.status(), AccountStatus::Active);
        // #sync at the same rev passes and resets data; older is dropped.
        let (v, s) = decide(Some(&s), &ev(Kind::Sync, r("b"), c("d9"), c("")), true);
        assert_eq!(v, RELAY);
        assert_eq!(s.data_fp, binary_fingerprint(c("d9")));
        let (v, _) = decide(Some(&s), &ev(Kind::Sync, r("a"), c("d8"), c("")), true);
        assert_eq!(v, Verdict::Drop(Drop::SyncRevOlder));
        let mut t = s;
        t.takendown = true;
        assert_eq!(t.status(), AccountStatus::Takendown);
        let mut th = s;
        th.throttled = true;
        assert_eq!(th.status(), AccountStatus::Throttled);
        th.takendown = true;
        assert_eq!(th.status(), AccountStatus::Takendown, "a takedown wins over throttling");
        // A word the lexicons do not know is reported as deactivated.
        let mut odd = s;
        odd.upstream_active = false;
        odd.upstream_status = UpstreamStatus::from_word(Some("on-vacation"));
        assert_eq!(odd.upstream_status, UpstreamStatus::Other);
        assert_eq!(odd.status(), AccountStatus::Deactivated);
        odd.upstream_status = UpstreamStatus::from_word(Some("suspended"));
        assert_eq!(odd.status(), AccountStatus::Suspended);
        for u in [UpstreamStatus::None, UpstreamStatus::Other]
            .into_iter()
            .chain(AccountStatus::ALL.map(UpstreamStatus::Known))
        {
            assert_eq!(UpstreamStatus::from_code(u.code()), u);
            assert!(u.code() < 16);
        }
        assert!(AccountStatus::ALL.iter().all(|a| AccountStatus::parse(a.as_str()) == Some(*a)));
        let (v, _) = decide(Some(&t), &ev(Kind::Identity, r(""), c(""), c("")), true);
        assert_eq!(v, Verdict::Drop(Drop::TakenDown));
    }
}
