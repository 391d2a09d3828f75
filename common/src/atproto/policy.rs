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

/// What the relay stores per account.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccountState {
    pub host_id: i64,
    /// Upstream: active flag and status word as the host last said.
    pub upstream_active: bool,
    pub upstream_status: Option<String>,
    /// Local moderation: taken down by the relay's admin.
    pub takendown: bool,
    /// Not admitted: it appeared on a host already at its account limit.
    /// Nothing of it is relayed, and it is not in the host's account count,
    /// until the host has room (the sequencer checks before [`decide`]).
    pub throttled: bool,
    pub rev: Option<String>,
    pub commit_cid: Option<Vec<u8>>,
    pub data_cid: Option<Vec<u8>>,
    /// Newest `identity_micros` of an event accepted from `host_id`.
    pub host_checked_micros: i64,
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
            AccountStatus::from_upstream(self.upstream_status.as_deref())
        }
    }

    /// The host said the account is deleted.
    pub fn deleted_upstream(&self) -> bool {
        self.upstream_status.as_deref() == Some(AccountStatus::Deleted.as_str())
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
    let st = stored.cloned().unwrap_or_else(|| AccountState::new(ev.host_id));
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
            if let Some(r) = &st.rev {
                if ev.rev <= r.as_str() {
                    return drop(Drop::RevNotNewer, st);
                }
            }
            if strict && ev.proof == PROOF_ABSENT && st.data_cid.is_some() {
                return drop(Drop::PrevDataMissing, st);
            }
            let chain_break = match (&st.data_cid, ev.prev_data.is_empty()) {
                (Some(d), false) => d.as_slice() != ev.prev_data,
                _ => false,
            };
            st.host_id = ev.host_id;
            st.rev = Some(ev.rev.to_owned());
            st.commit_cid = Some(ev.commit_cid.to_vec());
            st.data_cid = Some(ev.data_cid.to_vec());
            (Verdict::Relay { chain_break, proof_failed: ev.proof == PROOF_FAILED }, st)
        }
        Some(Kind::Sync) => {
            if let Some(r) = &st.rev {
                if ev.rev < r.as_str() {
                    return drop(Drop::SyncRevOlder, st);
                }
            }
            st.host_id = ev.host_id;
            st.rev = Some(ev.rev.to_owned());
            st.commit_cid = Some(ev.commit_cid.to_vec());
            st.data_cid = Some(ev.data_cid.to_vec());
            (relay, st)
        }
        Some(Kind::Account) => {
            st.host_id = ev.host_id;
            st.upstream_active = ev.active;
            st.upstream_status = (!ev.status.is_empty()).then(|| ev.status.to_owned());
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
    use crate::ipc::ringrec::PROOF_VERIFIED;

    fn ev<'a>(kind: Kind, rev: &'a str, data: &'a [u8], prev: &'a [u8]) -> EventRecord<'a> {
        EventRecord {
            host_id: 1,
            upstream_seq: 1,
            kind: kind as u8,
            did: "did:plc:a",
            rev,
            since: "",
            commit_cid: b"c",
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
        }
    }

    const RELAY: Verdict = Verdict::Relay { chain_break: false, proof_failed: false };

    #[test]
    fn rev_order_chain_and_first_commit() {
        let (v, s) = decide(None, &ev(Kind::Commit, "b", b"d1", b""), true);
        assert_eq!(v, RELAY, "first commit may lack prevData");
        let (v, _) = decide(Some(&s), &ev(Kind::Commit, "b", b"d2", b"d1"), true);
        assert_eq!(v, Verdict::Drop(Drop::RevNotNewer));
        let (v, _) = decide(Some(&s), &ev(Kind::Commit, "a", b"d2", b"d1"), true);
        assert_eq!(v, Verdict::Drop(Drop::RevNotNewer));
        let (v, _) = decide(Some(&s), &ev(Kind::Commit, "c", b"d2", b""), true);
        assert_eq!(v, Verdict::Drop(Drop::PrevDataMissing));
        let (v, _) = decide(Some(&s), &ev(Kind::Commit, "c", b"d2", b""), false);
        assert_eq!(v, RELAY, "lenient allows a missing prevData");
        let (v, s2) = decide(Some(&s), &ev(Kind::Commit, "c", b"d2", b"d1"), true);
        assert_eq!(v, RELAY);
        let (v, s3) = decide(Some(&s2), &ev(Kind::Commit, "d", b"d3", b"zz"), true);
        assert_eq!(v, Verdict::Relay { chain_break: true, proof_failed: false });
        assert_eq!(s3.data_cid.as_deref(), Some(&b"d3"[..]));
    }

    /// A late event from the host an account left passes its shard on a
    /// cached document; it must not move the account back, nor may its
    /// stale `#account` gate the new host's commits.
    #[test]
    fn stale_host_events_do_not_move_the_account() {
        let (_, s) = decide(None, &ev(Kind::Commit, "b", b"d1", b""), true);
        assert_eq!(s.host_checked_micros, 10);
        // The account moves to host 2 on a document fetched at 50.
        let mut moved = ev(Kind::Identity, "", b"", b"");
        moved.host_id = 2;
        moved.identity_micros = 50;
        let (v, s) = decide(Some(&s), &moved, true);
        assert_eq!((v, s.host_id, s.host_checked_micros), (RELAY, 2, 50));
        // Host 1, read late, on its shard's document from 10 (or 50 itself).
        for at in [10, 50] {
            let mut stale = ev(Kind::Account, "", b"", b"");
            stale.active = false;
            stale.status = "deactivated";
            stale.identity_micros = at;
            let (v, same) = decide(Some(&s), &stale, true);
            assert_eq!(v, Verdict::Drop(Drop::StaleHost));
            assert_eq!(same, s);
        }
        // Host 2's events on older cached documents still pass (same host).
        let mut c = ev(Kind::Commit, "c", b"d2", b"d1");
        c.host_id = 2;
        c.identity_micros = 20;
        let (v, s) = decide(Some(&s), &c, true);
        assert_eq!((v, s.host_checked_micros), (RELAY, 50));
        // Moving back to host 1 on a newer document is a move.
        let mut back = ev(Kind::Identity, "", b"", b"");
        back.identity_micros = 60;
        let (v, s) = decide(Some(&s), &back, true);
        assert_eq!((v, s.host_id, s.host_checked_micros), (RELAY, 1, 60));
    }

    #[test]
    fn account_status_gates_commits_and_sync_resets() {
        let (_, s) = decide(None, &ev(Kind::Commit, "b", b"d1", b""), true);
        let mut deact = ev(Kind::Account, "", b"", b"");
        deact.active = false;
        deact.status = "deactivated";
        let (v, s) = decide(Some(&s), &deact, true);
        assert_eq!(v, RELAY);
        assert_eq!(s.status(), AccountStatus::Deactivated);
        let (v, _) = decide(Some(&s), &ev(Kind::Commit, "c", b"d2", b"d1"), true);
        assert_eq!(v, Verdict::Drop(Drop::Inactive));
        let (v, s) = decide(Some(&s), &ev(Kind::Account, "", b"", b""), true);
        assert_eq!(v, RELAY);
        assert_eq!(s.status(), AccountStatus::Active);
        // #sync at the same rev passes and resets data; older is dropped.
        let (v, s) = decide(Some(&s), &ev(Kind::Sync, "b", b"d9", b""), true);
        assert_eq!(v, RELAY);
        assert_eq!(s.data_cid.as_deref(), Some(&b"d9"[..]));
        let (v, _) = decide(Some(&s), &ev(Kind::Sync, "a", b"d8", b""), true);
        assert_eq!(v, Verdict::Drop(Drop::SyncRevOlder));
        let mut t = s.clone();
        t.takendown = true;
        assert_eq!(t.status(), AccountStatus::Takendown);
        let mut th = s.clone();
        th.throttled = true;
        assert_eq!(th.status(), AccountStatus::Throttled);
        th.takendown = true;
        assert_eq!(th.status(), AccountStatus::Takendown, "a takedown wins over throttling");
        // A word the lexicons do not know is reported as deactivated.
        let mut odd = s.clone();
        odd.upstream_active = false;
        odd.upstream_status = Some("on-vacation".into());
        assert_eq!(odd.status(), AccountStatus::Deactivated);
        odd.upstream_status = Some("suspended".into());
        assert_eq!(odd.status(), AccountStatus::Suspended);
        assert!(AccountStatus::ALL.iter().all(|a| AccountStatus::parse(a.as_str()) == Some(*a)));
        let (v, _) = decide(Some(&t), &ev(Kind::Identity, "", b"", b""), true);
        assert_eq!(v, Verdict::Drop(Drop::TakenDown));
    }
}
