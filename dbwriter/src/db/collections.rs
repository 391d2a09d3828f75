//! The collection index in Postgres (migration V11): collection names,
//! the bitmaps' chunks, the accounts waiting for a check of their
//! collections, the backfill's position, and the page lookup (account
//! numbers to DIDs and statuses).

use super::accounts::{uuid_of, STATE};
use super::DbError;
use crate::collections::index::CollectionIndex;
use postgres::{Client, Statement, Transaction};
use sluice_common::atproto::did::DidKey;
use sluice_common::atproto::policy::AccountStatus;

/// The index as stored: its chunks with the changes since applied on
/// top; the next account number to give, the next change round, and the
/// change rows waiting for the next compaction.
pub struct Loaded {
    pub index: CollectionIndex,
    pub next_no: u32,
    pub next_round: i64,
    pub change_rows: u64,
}

pub fn load_index(c: &mut Client) -> Result<Loaded, DbError> {
    let mut ix = CollectionIndex::default();
    for r in c.query("SELECT id, nsid FROM collections ORDER BY id", &[])? {
        ix.load_collection(r.get::<_, i32>(0) as u32, r.get(1));
    }
    for r in c.query("SELECT collection, chunk, bits FROM collection_chunks", &[])? {
        let (id, chunk, bits): (i32, i32, &[u8]) = (r.get(0), r.get(1), r.get(2));
        match roaring::RoaringBitmap::deserialize_from(bits) {
            Ok(b) => ix.load_chunk(id as u32, chunk as u16, b),
            Err(e) => tracing::error!(collection = id, chunk, error = %e, "collection index: unreadable chunk skipped"),
        }
    }
    let mut next_round = 0;
    let rows = c.query("SELECT round, collection, no, present FROM collection_changes ORDER BY round", &[])?;
    for r in &rows {
        next_round = r.get::<_, i64>(0) + 1;
        ix.set(r.get::<_, i32>(1) as u32, r.get::<_, i32>(2) as u32, r.get(3));
    }
    let max: Option<i32> = c.query_one("SELECT max(no) FROM accounts WHERE no <> 0", &[])?.get(0);
    Ok(Loaded { index: ix, next_no: max.unwrap_or(0) as u32 + 1, next_round, change_rows: rows.len() as u64 })
}

/// What a round changed in the index, written in its transaction.
#[derive(Default)]
pub struct IndexChanges {
    pub collections: Vec<(u32, String)>,
    /// This round's changes (collection, account number, present), as
    /// rows of `round`; or, when compacting, every chunk changed since
    /// the last compaction, whole, and the change rows emptied.
    pub round: i64,
    pub changes: Vec<(u32, u32, bool)>,
    pub compact: bool,
    pub chunks: Vec<(u32, u16, Vec<u8>)>,
    /// Accounts to check (key, host).
    pub checks: Vec<(DidKey, i64)>,
    /// Checks answered.
    pub checked: Vec<DidKey>,
}

impl IndexChanges {
    pub fn is_empty(&self) -> bool {
        self.collections.is_empty()
            && self.changes.is_empty()
            && !self.compact
            && self.checks.is_empty()
            && self.checked.is_empty()
    }
}

/// The statements of [`write_changes`], prepared with the group commit's
/// ([`super::CommitStatements`]).
pub struct IndexStatements {
    collections: Statement,
    changes: Statement,
    chunks: Statement,
    checked: Statement,
    checks: Statement,
}

impl IndexStatements {
    pub(super) fn prepare(c: &mut Client) -> Result<IndexStatements, DbError> {
        Ok(IndexStatements {
            collections: c.prepare(
                "INSERT INTO collections (id, nsid) SELECT * FROM unnest($1::int4[], $2::text[]) ON CONFLICT DO NOTHING",
            )?,
            changes: c.prepare(
                "INSERT INTO collection_changes (round, collection, no, present)
                 SELECT $1, * FROM unnest($2::int4[], $3::int4[], $4::bool[])",
            )?,
            chunks: c.prepare(
                "INSERT INTO collection_chunks (collection, chunk, bits)
                 SELECT * FROM unnest($1::int4[], $2::int4[], $3::bytea[])
                 ON CONFLICT (collection, chunk) DO UPDATE SET bits = EXCLUDED.bits",
            )?,
            checked: c.prepare("DELETE FROM collection_checks WHERE did = ANY($1)")?,
            checks: c.prepare(
                "INSERT INTO collection_checks (did, host_id) SELECT * FROM unnest($1::uuid[], $2::int4[])
                 ON CONFLICT (did) DO UPDATE SET host_id = EXCLUDED.host_id",
            )?,
        })
    }
}

/// Write a round's changes (a DID checked or queued twice in a round is
/// written once: one statement may not touch a row twice).
pub fn write_changes(t: &mut Transaction<'_>, s: &IndexStatements, ch: &IndexChanges) -> Result<(), DbError> {
    if !ch.collections.is_empty() {
        let (ids, names): (Vec<i32>, Vec<&str>) = ch.collections.iter().map(|(i, n)| (*i as i32, n.as_str())).unzip();
        t.execute(&s.collections, &[&ids, &names])?;
    }
    if !ch.changes.is_empty() {
        let mut ids = Vec::with_capacity(ch.changes.len());
        let mut nos = Vec::with_capacity(ch.changes.len());
        let mut present = Vec::with_capacity(ch.changes.len());
        for (id, no, p) in &ch.changes {
            ids.push(*id as i32);
            nos.push(*no as i32);
            present.push(*p);
        }
        t.execute(&s.changes, &[&ch.round, &ids, &nos, &present])?;
    }
    if ch.compact {
        t.execute("TRUNCATE collection_changes", &[])?;
    }
    if !ch.chunks.is_empty() {
        let mut ids = Vec::new();
        let mut chunks = Vec::new();
        let mut bits: Vec<&[u8]> = Vec::new();
        for (id, chunk, b) in &ch.chunks {
            ids.push(*id as i32);
            chunks.push(i32::from(*chunk));
            bits.push(b);
        }
        t.execute(&s.chunks, &[&ids, &chunks, &bits])?;
    }
    if !ch.checked.is_empty() {
        let mut keys: Vec<uuid::Uuid> = ch.checked.iter().map(uuid_of).collect();
        keys.sort_unstable();
        keys.dedup();
        t.execute(&s.checked, &[&keys])?;
    }
    if !ch.checks.is_empty() {
        // The last host named for a DID wins.
        let last: std::collections::HashMap<uuid::Uuid, i32> =
            ch.checks.iter().map(|(k, h)| (uuid_of(k), *h as i32)).collect();
        let (keys, hosts): (Vec<uuid::Uuid>, Vec<i32>) = last.into_iter().unzip();
        t.execute(&s.checks, &[&keys, &hosts])?;
    }
    Ok(())
}

/// An account whose collections are to be asked of its PDS.
#[derive(Debug, Clone)]
pub struct CheckJob {
    pub key: DidKey,
    pub did: String,
    pub host_id: i64,
    pub hostname: String,
    pub insecure: bool,
}

/// Up to `limit` checks after `after` (key order).
pub fn checks_after(c: &mut Client, after: uuid::Uuid, limit: i64) -> Result<Vec<CheckJob>, DbError> {
    let rows = c.query(
        "SELECT k.did, d.did, k.host_id, h.hostname, h.insecure
         FROM collection_checks k JOIN hosts h ON h.id = k.host_id LEFT JOIN dids d ON d.key = k.did
         WHERE k.did > $1 ORDER BY k.did LIMIT $2",
        &[&after, &limit],
    )?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let key = DidKey(*r.get::<_, uuid::Uuid>(0).as_bytes());
            let did = key.plc_did().or(r.get(1))?;
            Some(CheckJob { key, did, host_id: i64::from(r.get::<_, i32>(2)), hostname: r.get(3), insecure: r.get(4) })
        })
        .collect())
}

pub fn checks_waiting(c: &mut Client) -> Result<i64, DbError> {
    Ok(c.query_one("SELECT count(*) FROM collection_checks", &[])?.get(0))
}

/// The backfill: each call queues a check for up to `limit` accounts
/// after its position that the index has not placed (`no = 0`), and
/// moves the position on; None when not running. Returns (accounts
/// queued, done).
pub fn backfill_step(c: &mut Client, limit: i64) -> Result<Option<(u64, bool)>, DbError> {
    let mut t = c.transaction()?;
    let Some(pos): Option<uuid::Uuid> =
        t.query_one("SELECT collections_backfill FROM relay_meta WHERE id = 1 FOR UPDATE", &[])?.get(0)
    else {
        return Ok(None);
    };
    let rows =
        t.query("SELECT did, host >> 8, no = 0 FROM accounts WHERE did > $1 ORDER BY did LIMIT $2", &[&pos, &limit])?;
    let last: Option<uuid::Uuid> = rows.last().map(|r| r.get(0));
    let (keys, hosts): (Vec<uuid::Uuid>, Vec<i32>) =
        rows.iter().filter(|r| r.get::<_, bool>(2)).map(|r| (r.get::<_, uuid::Uuid>(0), r.get::<_, i32>(1))).unzip();
    if !keys.is_empty() {
        t.execute(
            "INSERT INTO collection_checks (did, host_id) SELECT * FROM unnest($1::uuid[], $2::int4[])
             ON CONFLICT (did) DO NOTHING",
            &[&keys, &hosts],
        )?;
    }
    let done = (rows.len() as i64) < limit;
    t.execute("UPDATE relay_meta SET collections_backfill = $1 WHERE id = 1", &[&if done { None } else { last }])?;
    t.commit()?;
    Ok(Some((keys.len() as u64, done)))
}

/// Start (or restart from the beginning) the backfill; returns the
/// accounts it will walk.
pub fn backfill_start(c: &mut Client) -> Result<i64, postgres::Error> {
    let total: i64 = c.query_one("SELECT count(*) FROM accounts", &[])?.get(0);
    c.execute(
        "UPDATE relay_meta SET collections_backfill = '00000000-0000-0000-0000-000000000000', \
         collections_backfill_total = $1 WHERE id = 1",
        &[&total],
    )?;
    Ok(total)
}

/// The backfill's position as a fraction of the key space (None: not
/// running), and the accounts it walks.
pub fn backfill_progress(c: &mut Client) -> Result<(Option<f64>, i64), DbError> {
    let r = c.query_one("SELECT collections_backfill, coalesce(collections_backfill_total, 0) FROM relay_meta", &[])?;
    let pos: Option<uuid::Uuid> = r.get(0);
    // Keys are uniform in their first bytes after the tag (a did:plc's
    // hash, or a SHA-256): the second and third bytes place it.
    let frac = pos.map(|u| {
        let b = u.as_bytes();
        f64::from(u16::from_be_bytes([b[1], b[2]])) / 65_536.0
    });
    Ok((frac, r.get(1)))
}

/// The query of [`accounts_by_no`]: `no <> 0` stated, or the planner
/// cannot use the partial index `accounts_no` and scans the table.
pub fn accounts_by_no_sql() -> String {
    format!(
        "SELECT {STATE}, d.did FROM accounts a LEFT JOIN dids d ON d.key = a.did WHERE a.no = ANY($1) AND a.no <> 0"
    )
}

/// The query of [`accounts_by_no`] for numbers close together: one range
/// of the index `accounts_no` read in order instead of a descent per
/// number.
pub fn accounts_in_range_sql() -> String {
    format!(
        "SELECT {STATE}, d.did FROM accounts a LEFT JOIN dids d ON d.key = a.did
         WHERE a.no BETWEEN $1 AND $2 AND a.no <> 0"
    )
}

/// A page's numbers span at most this many times their count to be read
/// as one range (a big collection's page: nearly every number).
const RANGE_SPAN_MAX: u64 = 2;

/// Accounts by number (`nos` ascending, as the index pages them): (number,
/// DID, status), those found.
pub fn accounts_by_no(c: &mut Client, nos: &[u32]) -> Result<Vec<(u32, String, AccountStatus)>, postgres::Error> {
    debug_assert!(nos.windows(2).all(|w| w[0] < w[1]), "numbers not ascending");
    let (Some(&lo), Some(&hi)) = (nos.first(), nos.last()) else { return Ok(Vec::new()) };
    let dense = u64::from(hi - lo) < RANGE_SPAN_MAX * nos.len() as u64;
    let rows = if dense {
        c.query(&accounts_in_range_sql(), &[&(lo as i32), &(hi as i32)])?
    } else {
        let ns: Vec<i32> = nos.iter().map(|n| *n as i32).collect();
        c.query(&accounts_by_no_sql(), &[&ns])?
    };
    Ok(rows
        .iter()
        .filter_map(|r| {
            let st = super::accounts::state_of(r, 0);
            // A range holds the numbers between the page's too.
            if dense && nos.binary_search(&st.no).is_err() {
                return None;
            }
            let key = DidKey(*r.get::<_, uuid::Uuid>(0).as_bytes());
            let did = key.plc_did().or(r.get(7))?;
            Some((st.no, did, st.status()))
        })
        .collect())
}
