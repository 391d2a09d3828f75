//! Accounts in Postgres, compact (migrations V10, V12, V14): the DID as
//! its 16-byte key (`DidKey::stored`, a `uuid` column; a DID that is not
//! did:plc is kept whole in `dids`), the rev as the TID's number, the
//! commit CID as its digest, the data CID as 16 bits, the host's id and
//! the flags (the booleans, the upstream status's code) in one `host`
//! column, the host check in whole seconds. A row is 72 bytes of data, 96
//! with its header. No column holds NULL (V12: a row without NULLs has no
//! null bitmap, 8 bytes less): "none" is 0 for `rev`, `host_checked` and
//! `no`, empty for `commit_cid` and `upstream_status`, and a flag for
//! `data_fp`. [`host_of`], [`state_of`] and [`UpsertColumns`] are the one
//! place that encoding lives.

use super::DbError;
use postgres::Client;
use sluice_common::atproto::did::DidKey;
use sluice_common::atproto::policy::{AccountState, AccountStatus, UpstreamStatus};
use sluice_common::atproto::syntax::Tid;
use std::collections::HashMap;

/// Flags, the low byte of `accounts.host` (the SQL here and the
/// migrations spell them as numbers: taken down is `(host & 2) <> 0`).
const ACTIVE: i32 = 1;
const TAKENDOWN: i32 = 2;
const THROTTLED: i32 = 4;
/// `data_fp` holds a fingerprint (every 16-bit value is one).
const HAS_DATA: i32 = 8;
/// `accounts.host` is the host's id times this, plus the flags.
const HOST_SHIFT: u32 = 8;
/// Host ids stay below this (8,388,608), so `host` stays positive.
pub const HOST_ID_LIMIT: i64 = 1 << (31 - HOST_SHIFT);

/// `accounts.host_checked` counts seconds from here (2024-01-01 UTC).
const CHECKED_EPOCH_SECS: i64 = 1_704_067_200;

/// A key as the `uuid` column takes it.
pub fn uuid_of(k: &DidKey) -> uuid::Uuid {
    uuid::Uuid::from_bytes(k.0)
}

fn key_of(u: uuid::Uuid) -> DidKey {
    DidKey(*u.as_bytes())
}

/// `accounts.host` for `a`: its host's id and its flags.
pub fn host_of(a: &AccountState) -> i32 {
    debug_assert!((0..HOST_ID_LIMIT).contains(&a.host_id), "host id {} out of range", a.host_id);
    ((a.host_id as i32) << HOST_SHIFT)
        | (if a.upstream_active { ACTIVE } else { 0 })
        | (if a.takendown { TAKENDOWN } else { 0 })
        | (if a.throttled { THROTTLED } else { 0 })
        | (if a.data_fp.is_some() { HAS_DATA } else { 0 })
        | (i32::from(a.upstream_status.code()) << 4)
}

/// `accounts.host_checked` for a time in microseconds: whole seconds
/// since [`CHECKED_EPOCH_SECS`], rounded down (0: never, or before it).
/// Rounding down is the safe side of the stale-host rule
/// (`policy::decide`): a time read back is never later than the one
/// stored, so an account's move is never held for a check that did not
/// happen; the in-memory state keeps the microseconds.
pub fn checked_secs(micros: i64) -> i32 {
    (micros.div_euclid(1_000_000) - CHECKED_EPOCH_SECS).clamp(0, i64::from(i32::MAX)) as i32
}

/// The time [`checked_secs`] stored, in microseconds.
pub fn checked_micros(secs: i32) -> i64 {
    if secs <= 0 {
        0
    } else {
        (CHECKED_EPOCH_SECS + i64::from(secs)) * 1_000_000
    }
}

/// The state a row holds ([`STATE`]'s columns from column `at` on).
pub(super) fn state_of(r: &postgres::Row, at: usize) -> AccountState {
    let host: i32 = r.get(at + 3);
    let commit: &[u8] = r.get(at + 5);
    AccountState {
        rev: Some(r.get::<_, i64>(at + 1) as u64).filter(|&v| v != 0),
        host_checked_micros: checked_micros(r.get(at + 2)),
        host_id: i64::from(host >> HOST_SHIFT),
        data_fp: Some(r.get::<_, i16>(at + 4)).filter(|_| host & HAS_DATA != 0),
        upstream_active: host & ACTIVE != 0,
        takendown: host & TAKENDOWN != 0,
        throttled: host & THROTTLED != 0,
        upstream_status: UpstreamStatus::from_code(((host >> 4) & 15) as u8),
        commit: commit.try_into().ok(),
        no: r.get::<_, i32>(at + 6) as u32,
    }
}

/// The columns [`state_of`] reads, of `accounts a` (seven: a query's own
/// columns after them start at 7).
pub(super) const STATE: &str = "a.did, a.rev, a.host_checked, a.host, a.data_fp, a.commit_cid, a.no";

/// The query of [`load_accounts`] (`$1`: the keys).
pub(super) fn load_sql() -> String {
    format!("SELECT {STATE} FROM accounts a WHERE a.did = ANY($1)")
}

/// Load the stored state of `keys` (those not found are absent).
pub fn load_accounts(c: &mut Client, keys: &[DidKey]) -> Result<HashMap<DidKey, AccountState>, DbError> {
    load_with(c, load_sql().as_str(), keys)
}

/// [`load_accounts`] with its query as given (prepared or not).
pub(super) fn load_with<T: ?Sized + postgres::ToStatement>(
    c: &mut Client,
    query: &T,
    keys: &[DidKey],
) -> Result<HashMap<DidKey, AccountState>, DbError> {
    let ids: Vec<uuid::Uuid> = keys.iter().map(uuid_of).collect();
    let rows = c.query(query, &[&ids])?;
    Ok(rows.iter().map(|r| (key_of(r.get(0)), state_of(r, 0))).collect())
}

/// The statement writing a round's accounts: inserted, or updated only
/// where something changed (an `#identity` that moves nothing rewrites
/// nothing), never touching the key (HOT updates in the page's room). A
/// word the lexicons do not know is written when an `#account` brings it
/// (`$7` not empty), kept otherwise, dropped with its code; an account's
/// number (`$8`) is written once.
pub const UPSERT: &str = "INSERT INTO accounts (did, rev, host_checked, host, data_fp, commit_cid, upstream_status, no)
     SELECT * FROM unnest($1::uuid[], $2::int8[], $3::int4[], $4::int4[], $5::int2[], $6::bytea[], $7::text[],
                          $8::int4[])
     ON CONFLICT (did) DO UPDATE SET rev = EXCLUDED.rev, host_checked = EXCLUDED.host_checked,
       host = EXCLUDED.host, data_fp = EXCLUDED.data_fp, commit_cid = EXCLUDED.commit_cid,
       upstream_status = CASE WHEN (EXCLUDED.host >> 4) & 15 <> 15 THEN ''
                              WHEN EXCLUDED.upstream_status <> '' THEN EXCLUDED.upstream_status
                              ELSE accounts.upstream_status END,
       no = CASE WHEN accounts.no = 0 THEN EXCLUDED.no ELSE accounts.no END
     WHERE (accounts.rev, accounts.host_checked, accounts.host, accounts.data_fp, accounts.commit_cid)
           IS DISTINCT FROM
           (EXCLUDED.rev, EXCLUDED.host_checked, EXCLUDED.host, EXCLUDED.data_fp, EXCLUDED.commit_cid)
        OR EXCLUDED.upstream_status <> ''
        OR (EXCLUDED.no <> 0 AND accounts.no = 0)";

/// How many parameters [`UPSERT`] takes.
pub const UPSERT_PARAMS: usize = 8;

/// A round's accounts as [`UPSERT`]'s arrays, one per column; the commit
/// digests and status words borrowed from the round's maps (no allocation
/// per account).
#[derive(Default)]
pub struct UpsertColumns<'a> {
    did: Vec<uuid::Uuid>,
    rev: Vec<i64>,
    host_checked: Vec<i32>,
    host: Vec<i32>,
    data_fp: Vec<i16>,
    commit: Vec<&'a [u8]>,
    word: Vec<&'a str>,
    no: Vec<i32>,
}

impl<'a> UpsertColumns<'a> {
    pub fn new(accounts: &'a HashMap<DidKey, AccountState>, words: &'a HashMap<DidKey, String>) -> UpsertColumns<'a> {
        let n = accounts.len();
        let mut p = UpsertColumns {
            did: Vec::with_capacity(n),
            rev: Vec::with_capacity(n),
            host_checked: Vec::with_capacity(n),
            host: Vec::with_capacity(n),
            data_fp: Vec::with_capacity(n),
            commit: Vec::with_capacity(n),
            word: Vec::with_capacity(n),
            no: Vec::with_capacity(n),
        };
        for (k, a) in accounts {
            p.did.push(uuid_of(k));
            p.rev.push(a.rev.unwrap_or(0) as i64);
            p.host_checked.push(checked_secs(a.host_checked_micros));
            p.host.push(host_of(a));
            p.data_fp.push(a.data_fp.unwrap_or(0));
            p.commit.push(a.commit.as_ref().map_or(&[][..], |c| &c[..]));
            p.word.push(words.get(k).map_or("", String::as_str));
            p.no.push(a.no as i32);
        }
        p
    }

    /// The statement's parameters, `$1` to `$8`.
    pub fn params(&self) -> [&(dyn postgres::types::ToSql + Sync); UPSERT_PARAMS] {
        [&self.did, &self.rev, &self.host_checked, &self.host, &self.data_fp, &self.commit, &self.word, &self.no]
    }
}

/// Statement storing the DIDs of keys that are not a did:plc's own bytes.
pub const NAMES: &str =
    "INSERT INTO dids (key, did) SELECT * FROM unnest($1::uuid[], $2::text[]) ON CONFLICT (key) DO NOTHING";

/// The DID of a key (None: a key whose DID was never stored).
fn did_of(k: DidKey, stored: Option<String>) -> Option<String> {
    k.plc_did().or(stored)
}

/// Taken-down accounts after `after` (key order), at most `limit`.
pub fn takedowns(c: &mut Client, after: &str, limit: i64) -> Result<Vec<String>, postgres::Error> {
    let after = if after.is_empty() { uuid::Uuid::nil() } else { uuid_of(&DidKey::stored(after)) };
    let rows = c.query(
        "SELECT a.did, d.did FROM accounts a LEFT JOIN dids d ON d.key = a.did
         WHERE (a.host & 2) <> 0 AND a.did > $1 ORDER BY a.did LIMIT $2",
        &[&after, &limit],
    )?;
    Ok(rows.iter().filter_map(|r| did_of(key_of(r.get(0)), r.get(1))).collect())
}

/// Every taken-down account (at most a million), for the flagging pass at
/// start (through the partial index: no scan of the table).
pub fn taken_down_dids(c: &mut Client) -> Result<Vec<String>, postgres::Error> {
    let rows = c.query(
        "SELECT a.did, d.did FROM accounts a LEFT JOIN dids d ON d.key = a.did WHERE (a.host & 2) <> 0 LIMIT 1000000",
        &[],
    )?;
    Ok(rows.iter().filter_map(|r| did_of(key_of(r.get(0)), r.get(1))).collect())
}

/// An account's head as stored: its status, rev and commit.
#[derive(Debug, Clone)]
pub struct AccountHead {
    pub did: String,
    pub status: AccountStatus,
    pub rev: Option<String>,
    /// The binary CID.
    pub commit_cid: Option<Vec<u8>>,
}

fn head_of(did: String, st: &AccountState) -> AccountHead {
    AccountHead {
        did,
        status: st.status(),
        rev: st.rev.map(|v| Tid::from_value(v).into_string()),
        commit_cid: st.commit_cid().map(|c| c.to_bytes().to_vec()),
    }
}

pub fn account_head(c: &mut Client, did: &str) -> Result<Option<AccountHead>, postgres::Error> {
    let row =
        c.query_opt(&format!("SELECT {STATE} FROM accounts a WHERE a.did = $1"), &[&uuid_of(&DidKey::stored(did))])?;
    Ok(row.map(|r| head_of(did.to_owned(), &state_of(&r, 0))))
}

/// Accounts with a commit after the one `after` names (key order: stable
/// while accounts come and go), at most `limit`.
pub fn repos_page(c: &mut Client, after: &str, limit: i64) -> Result<Vec<AccountHead>, postgres::Error> {
    let after = if after.is_empty() { uuid::Uuid::nil() } else { uuid_of(&DidKey::stored(after)) };
    let rows = c.query(
        &format!(
            "SELECT {STATE}, d.did FROM accounts a LEFT JOIN dids d ON d.key = a.did
             WHERE a.did > $1 AND a.commit_cid <> '' AND a.rev <> 0 ORDER BY a.did LIMIT $2"
        ),
        &[&after, &limit],
    )?;
    Ok(rows.iter().filter_map(|r| Some(head_of(did_of(key_of(r.get(0)), r.get(7))?, &state_of(r, 0)))).collect())
}

/// An account's status and its host (name, plain text or not).
pub fn account_host(c: &mut Client, did: &str) -> Result<Option<(AccountStatus, String, bool)>, postgres::Error> {
    let row = c.query_opt(
        &format!(
            "SELECT {STATE}, h.hostname, h.insecure FROM accounts a JOIN hosts h ON h.id = a.host >> 8 WHERE a.did = $1"
        ),
        &[&uuid_of(&DidKey::stored(did))],
    )?;
    Ok(row.map(|r| (state_of(&r, 0).status(), r.get(7), r.get(8))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_column_round_trips_every_flag_and_host() {
        for host_id in [0, 1, 77, HOST_ID_LIMIT - 1] {
            for ua in [false, true] {
                for td in [false, true] {
                    for th in [false, true] {
                        for fp in [None, Some(0), Some(-1), Some(i16::MIN)] {
                            for us in AccountStatus::ALL
                                .map(UpstreamStatus::Known)
                                .into_iter()
                                .chain([UpstreamStatus::None, UpstreamStatus::Other])
                            {
                                let a = AccountState {
                                    host_id,
                                    upstream_active: ua,
                                    takendown: td,
                                    throttled: th,
                                    upstream_status: us,
                                    data_fp: fp,
                                    ..AccountState::default()
                                };
                                let h = host_of(&a);
                                assert!(h >= 0, "{a:?}");
                                assert_eq!(i64::from(h >> HOST_SHIFT), host_id);
                                assert_eq!(h & ACTIVE != 0, ua);
                                assert_eq!(h & TAKENDOWN != 0, td);
                                assert_eq!(h & THROTTLED != 0, th);
                                assert_eq!(h & HAS_DATA != 0, fp.is_some());
                                assert_eq!(UpstreamStatus::from_code(((h >> 4) & 15) as u8), us);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn host_checked_rounds_down_to_whole_seconds() {
        let t = (CHECKED_EPOCH_SECS + 1_000) * 1_000_000;
        assert_eq!(checked_micros(checked_secs(t)), t);
        assert_eq!(checked_micros(checked_secs(t + 999_999)), t);
        assert_eq!(checked_micros(checked_secs(t - 1)), t - 1_000_000);
        // Never, and anything up to the epoch's first second, read back
        // as never (0): still not later than the time stored.
        for m in [0, -5, 1, CHECKED_EPOCH_SECS * 1_000_000 + 999_999] {
            assert_eq!(checked_micros(checked_secs(m)), 0, "{m}");
        }
        // The far end saturates instead of wrapping.
        assert_eq!(checked_secs(i64::MAX), i32::MAX);
        // Never later than stored, at most a second earlier.
        for m in [t + 1, t + 500_000, 2_000_000_000_000_000] {
            let back = checked_micros(checked_secs(m));
            assert!(back <= m && m - back < 1_000_000, "{m} -> {back}");
        }
    }
}
