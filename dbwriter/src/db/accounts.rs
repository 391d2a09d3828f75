//! Accounts in Postgres, compact (migration V10): the DID as its 16-byte
//! key (`DidKey::stored`, a `uuid` column; a DID that is not did:plc is
//! kept whole in `dids`), the rev as the TID's number, the commit CID as
//! its digest, the data CID as 32 bits, the booleans and the upstream
//! status's code in `flags`. No column holds NULL (migration V12: a row
//! without NULLs has no null bitmap, 8 bytes less): "none" is 0 for `rev`,
//! `data_fp` and `no`, empty for `commit_cid` and `upstream_status`.
//! [`flags_of`], [`state_of`] and [`UpsertColumns`] are the one place that
//! encoding lives.

use super::DbError;
use postgres::Client;
use sluice_common::atproto::did::DidKey;
use sluice_common::atproto::policy::{AccountState, AccountStatus, UpstreamStatus};
use sluice_common::atproto::syntax::Tid;
use std::collections::HashMap;

const ACTIVE: i16 = 1;
const TAKENDOWN: i16 = 2;
const THROTTLED: i16 = 4;

/// A key as the `uuid` column takes it.
pub fn uuid_of(k: &DidKey) -> uuid::Uuid {
    uuid::Uuid::from_bytes(k.0)
}

fn key_of(u: uuid::Uuid) -> DidKey {
    DidKey(*u.as_bytes())
}

/// `accounts.flags` for `a`.
pub fn flags_of(a: &AccountState) -> i16 {
    (if a.upstream_active { ACTIVE } else { 0 })
        | (if a.takendown { TAKENDOWN } else { 0 })
        | (if a.throttled { THROTTLED } else { 0 })
        | (i16::from(a.upstream_status.code()) << 4)
}

/// The state a row holds (`did, rev, host_checked, host_id, data_fp,
/// flags, commit_cid, no` from column `at` on).
pub(super) fn state_of(r: &postgres::Row, at: usize) -> AccountState {
    let flags: i16 = r.get(at + 5);
    let commit: &[u8] = r.get(at + 6);
    AccountState {
        rev: Some(r.get::<_, i64>(at + 1) as u64).filter(|&v| v != 0),
        host_checked_micros: r.get(at + 2),
        host_id: i64::from(r.get::<_, i32>(at + 3)),
        data_fp: Some(r.get::<_, i32>(at + 4)).filter(|&v| v != 0),
        upstream_active: flags & ACTIVE != 0,
        takendown: flags & TAKENDOWN != 0,
        throttled: flags & THROTTLED != 0,
        upstream_status: UpstreamStatus::from_code(((flags >> 4) & 15) as u8),
        commit: commit.try_into().ok(),
        no: r.get::<_, i32>(at + 7) as u32,
    }
}

/// The columns [`state_of`] reads, of `accounts a`.
pub(super) const STATE: &str = "a.did, a.rev, a.host_checked, a.host_id, a.data_fp, a.flags, a.commit_cid, a.no";

/// Load the stored state of `keys` (those not found are absent).
pub fn load_accounts(c: &mut Client, keys: &[DidKey]) -> Result<HashMap<DidKey, AccountState>, DbError> {
    let ids: Vec<uuid::Uuid> = keys.iter().map(uuid_of).collect();
    let rows = c.query(&format!("SELECT {STATE} FROM accounts a WHERE a.did = ANY($1)"), &[&ids])?;
    Ok(rows.iter().map(|r| (key_of(r.get(0)), state_of(r, 0))).collect())
}

/// The statement writing a round's accounts: inserted, or updated only
/// where something changed (an `#identity` that moves nothing rewrites
/// nothing), never touching the key (HOT updates in the page's room). A
/// word the lexicons do not know is written when an `#account` brings it
/// (`$8` not empty), kept otherwise, dropped with its code; an account's
/// number (`$9`) is written once.
pub const UPSERT: &str = "INSERT INTO accounts (did, rev, host_checked, host_id, data_fp, flags, commit_cid, upstream_status, no)
     SELECT * FROM unnest($1::uuid[], $2::int8[], $3::int8[], $4::int4[], $5::int4[], $6::int2[], $7::bytea[], $8::text[],
                          $9::int4[])
     ON CONFLICT (did) DO UPDATE SET rev = EXCLUDED.rev, host_checked = EXCLUDED.host_checked,
       host_id = EXCLUDED.host_id, data_fp = EXCLUDED.data_fp, flags = EXCLUDED.flags, commit_cid = EXCLUDED.commit_cid,
       upstream_status = CASE WHEN (EXCLUDED.flags >> 4) & 15 <> 15 THEN ''
                              WHEN EXCLUDED.upstream_status <> '' THEN EXCLUDED.upstream_status
                              ELSE accounts.upstream_status END,
       no = CASE WHEN accounts.no = 0 THEN EXCLUDED.no ELSE accounts.no END
     WHERE (accounts.rev, accounts.host_checked, accounts.host_id, accounts.data_fp, accounts.flags, accounts.commit_cid)
           IS DISTINCT FROM
           (EXCLUDED.rev, EXCLUDED.host_checked, EXCLUDED.host_id, EXCLUDED.data_fp, EXCLUDED.flags, EXCLUDED.commit_cid)
        OR EXCLUDED.upstream_status <> ''
        OR (EXCLUDED.no <> 0 AND accounts.no = 0)";

/// A round's accounts as [`UPSERT`]'s arrays, one per column; the commit
/// digests and status words borrowed from the round's maps (no allocation
/// per account).
#[derive(Default)]
pub struct UpsertColumns<'a> {
    did: Vec<uuid::Uuid>,
    rev: Vec<i64>,
    host_checked: Vec<i64>,
    host_id: Vec<i32>,
    data_fp: Vec<i32>,
    flags: Vec<i16>,
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
            host_id: Vec::with_capacity(n),
            data_fp: Vec::with_capacity(n),
            flags: Vec::with_capacity(n),
            commit: Vec::with_capacity(n),
            word: Vec::with_capacity(n),
            no: Vec::with_capacity(n),
        };
        for (k, a) in accounts {
            p.did.push(uuid_of(k));
            p.rev.push(a.rev.unwrap_or(0) as i64);
            p.host_checked.push(a.host_checked_micros);
            p.host_id.push(a.host_id as i32);
            p.data_fp.push(a.data_fp.unwrap_or(0));
            p.flags.push(flags_of(a));
            p.commit.push(a.commit.as_ref().map_or(&[][..], |c| &c[..]));
            p.word.push(words.get(k).map_or("", String::as_str));
            p.no.push(a.no as i32);
        }
        p
    }

    /// The statement's parameters, `$1` to `$9`.
    pub fn params(&self) -> [&(dyn postgres::types::ToSql + Sync); 9] {
        [
            &self.did,
            &self.rev,
            &self.host_checked,
            &self.host_id,
            &self.data_fp,
            &self.flags,
            &self.commit,
            &self.word,
            &self.no,
        ]
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
         WHERE (a.flags & 2) <> 0 AND a.did > $1 ORDER BY a.did LIMIT $2",
        &[&after, &limit],
    )?;
    Ok(rows.iter().filter_map(|r| did_of(key_of(r.get(0)), r.get(1))).collect())
}

/// Every taken-down account (at most a million), for the flagging pass at
/// start (through the partial index: no scan of the table).
pub fn taken_down_dids(c: &mut Client) -> Result<Vec<String>, postgres::Error> {
    let rows = c.query(
        "SELECT a.did, d.did FROM accounts a LEFT JOIN dids d ON d.key = a.did WHERE (a.flags & 2) <> 0 LIMIT 1000000",
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
    Ok(rows.iter().filter_map(|r| Some(head_of(did_of(key_of(r.get(0)), r.get(8))?, &state_of(r, 0)))).collect())
}

/// An account's status and its host (name, plain text or not).
pub fn account_host(c: &mut Client, did: &str) -> Result<Option<(AccountStatus, String, bool)>, postgres::Error> {
    let row = c.query_opt(
        &format!(
            "SELECT {STATE}, h.hostname, h.insecure FROM accounts a JOIN hosts h ON h.id = a.host_id WHERE a.did = $1"
        ),
        &[&uuid_of(&DidKey::stored(did))],
    )?;
    Ok(row.map(|r| (state_of(&r, 0).status(), r.get(8), r.get(9))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_round_trip_every_status() {
        for ua in [false, true] {
            for td in [false, true] {
                for th in [false, true] {
                    for us in AccountStatus::ALL
                        .map(UpstreamStatus::Known)
                        .into_iter()
                        .chain([UpstreamStatus::None, UpstreamStatus::Other])
                    {
                        let a = AccountState {
                            upstream_active: ua,
                            takendown: td,
                            throttled: th,
                            upstream_status: us,
                            ..AccountState::default()
                        };
                        let f = flags_of(&a);
                        assert_eq!(f & ACTIVE != 0, ua);
                        assert_eq!(f & TAKENDOWN != 0, td);
                        assert_eq!(f & THROTTLED != 0, th);
                        assert_eq!(UpstreamStatus::from_code(((f >> 4) & 15) as u8), us);
                    }
                }
            }
        }
    }
}
