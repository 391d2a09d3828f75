//! Postgres access for the db-writer: migrations, the durable relay seq,
//! the one transaction per group commit, held records and the admin
//! audit here; hosts, accounts and identities each in their own file.

use postgres::{Client, NoTls, Statement};
use sluice_common::atproto::did::DidKey;
use sluice_common::atproto::policy::AccountState;
use sluice_common::process::host::HostStatus;
use std::collections::HashMap;

mod accounts;
mod collections;
mod hosts;
mod identities;

pub use accounts::*;
pub use collections::*;
pub use hosts::*;
pub use identities::*;

mod embedded {
    refinery::embed_migrations!("../migrations");
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("postgres: {}", detail(.0))]
    Pg(#[from] postgres::Error),
    #[error("migrations: {}", migrate_detail(.0))]
    Migrate(#[from] refinery::Error),
}

/// A failed migration with the server's words (a migration that refuses
/// to run says why in its exception), which refinery's own message
/// leaves out ("error applying update, db error").
fn migrate_detail(e: &refinery::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(pg) = s.downcast_ref::<postgres::Error>() {
            out.push_str(": ");
            out.push_str(&detail(pg));
            break;
        }
        source = s.source();
    }
    out
}

/// A Postgres error with the server's own words when it sent some
/// (`postgres::Error` alone says only "db error").
fn detail(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} ({}): {}", d.message(), d.code().code(), d.detail().unwrap_or("")),
        None => e.to_string(),
    }
}

pub fn connect(url: &str) -> Result<Client, DbError> {
    Ok(Client::connect(url, NoTls)?)
}

/// Apply every migration in `migrations/` not yet applied, and create the
/// relay_meta row (last_seq = initial_seq - 1) if it is missing.
pub fn migrate(url: &str, initial_seq: i64) -> Result<(), DbError> {
    let mut c = connect(url)?;
    embedded::migrations::runner().run(&mut c)?;
    c.execute(
        "INSERT INTO relay_meta (id, last_seq) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        &[&(initial_seq.max(1) - 1)],
    )?;
    Ok(())
}

/// Apply the migrations up to and including `version` only (tests of a
/// migration: the schema as an older release left it).
pub fn migrate_to(url: &str, version: u32) -> Result<(), DbError> {
    let mut c = connect(url)?;
    embedded::migrations::runner().set_target(refinery::Target::Version(version)).run(&mut c)?;
    Ok(())
}

pub fn last_seq(c: &mut Client) -> Result<i64, DbError> {
    Ok(c.query_one("SELECT last_seq FROM relay_meta WHERE id = 1", &[])?.get(0))
}

/// Everything one group commit writes.
#[derive(Default)]
pub struct Batch {
    pub accounts: HashMap<DidKey, AccountState>,
    /// The DIDs of this round's accounts whose key is not the DID itself
    /// (not did:plc), for `dids`.
    pub names: HashMap<DidKey, String>,
    /// Upstream status words the lexicons do not know, as the host said
    /// them (`UpstreamStatus::Other`).
    pub words: HashMap<DidKey, String>,
    /// Accounts seen for the first time, per host.
    pub new_accounts: HashMap<i64, i64>,
    /// Accounts that moved between hosts: (from, to).
    pub moves: Vec<(i64, i64)>,
    pub cursors: HashMap<i64, i64>,
    /// Host reachability reported by the shards (`true`: offline), last
    /// report per host.
    pub host_offline: HashMap<i64, bool>,
    /// Held lists that changed in the round, whole (empty: released).
    pub held: Vec<(String, Vec<Vec<u8>>)>,
    /// The collection index's changes (`collections`).
    pub index: IndexChanges,
    pub last_seq: i64,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty() && self.cursors.is_empty() && self.host_offline.is_empty()
    }

    /// Empty for the next round; the maps and lists keep their room.
    /// Every field is named, so one added later cannot be carried into
    /// the next round's commit by being forgotten here.
    pub fn clear(&mut self) {
        let Batch { accounts, names, words, new_accounts, moves, cursors, host_offline, held, index, last_seq } = self;
        accounts.clear();
        names.clear();
        words.clear();
        new_accounts.clear();
        moves.clear();
        cursors.clear();
        host_offline.clear();
        held.clear();
        *index = IndexChanges::default();
        *last_seq = 0;
    }

    /// `did`'s state as this round leaves it.
    pub fn put(&mut self, did: &str, st: AccountState) {
        let k = DidKey::stored(did);
        if !k.is_plc() {
            self.names.entry(k).or_insert_with(|| did.to_owned());
        }
        self.accounts.insert(k, st);
    }
}

/// The group commit's statements, prepared once per connection: each
/// commit then costs one Bind/Execute per statement instead of a parse and
/// plan. What every round writes (accounts, host cursors and counters,
/// `last_seq`) is one statement ([`round_statement`]): a round with nothing else is
/// one round trip and its own transaction, no BEGIN or COMMIT.
pub struct CommitStatements {
    round: Statement,
    names: Statement,
    offline: Statement,
    /// The accounts a round's prefetch lacks ([`CommitStatements::load_accounts`]).
    load: Statement,
    index: IndexStatements,
}

/// One round's accounts ([`UPSERT`], `$1` to `$8`), hosts' counters and
/// cursors (`$9` ids, `$10` account deltas, `$11` cursors; a cursor of
/// -1 keeps the stored one) and the relay seq (`$12`), in one statement:
/// its data-modifying parts run whether or not the last one reads them.
fn round_statement() -> String {
    let n = UPSERT_PARAMS;
    format!(
        "WITH a AS ({UPSERT}),
         h AS (UPDATE hosts h SET account_count = h.account_count + v.delta,
                 cursor = GREATEST(h.cursor, v.cursor), updated_at = now()
               FROM unnest(${}::int8[], ${}::int8[], ${}::int8[]) AS v(id, delta, cursor) WHERE h.id = v.id)
         UPDATE relay_meta SET last_seq = ${} WHERE id = 1",
        n + 1,
        n + 2,
        n + 3,
        n + 4
    )
}

/// A round's hosts as [`round_statement`]'s arrays: account count deltas
/// (new accounts, moves) and cursors, one entry per host.
fn host_columns(b: &Batch) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
    let mut hosts: HashMap<i64, (i64, i64)> = HashMap::new();
    for (&h, &n) in &b.new_accounts {
        hosts.entry(h).or_insert((0, -1)).0 += n;
    }
    for &(from, to) in &b.moves {
        hosts.entry(from).or_insert((0, -1)).0 -= 1;
        hosts.entry(to).or_insert((0, -1)).0 += 1;
    }
    for (&h, &c) in &b.cursors {
        hosts.entry(h).or_insert((0, -1)).1 = c;
    }
    let mut cols = (Vec::new(), Vec::new(), Vec::new());
    for (h, (delta, cursor)) in hosts {
        if delta != 0 || cursor >= 0 {
            cols.0.push(h);
            cols.1.push(delta);
            cols.2.push(cursor);
        }
    }
    cols
}

/// For a connection that runs the same few statements many times a second
/// (the sequencer's, the identity store's): each prepared statement is
/// planned once. By default PostgreSQL plans a statement whose parameters
/// are arrays afresh at every execution (its custom plans never look
/// worse than the generic one), which was 28% of the identity store's
/// backend in sluice-bench's throughput phase. The plans do not depend on
/// the values: keys by their primary key, arrays unnested, and every
/// query on a partial index states the index's predicate itself.
pub fn plan_once(c: &mut Client) -> Result<(), DbError> {
    c.batch_execute("SET plan_cache_mode = force_generic_plan")?;
    Ok(())
}

impl CommitStatements {
    /// Prepare on `c` (and [`plan_once`] there).
    pub fn prepare(c: &mut Client) -> Result<CommitStatements, DbError> {
        plan_once(c)?;
        Ok(CommitStatements {
            round: c.prepare(&round_statement())?,
            names: c.prepare(NAMES)?,
            offline: c.prepare(
                "UPDATE hosts h SET status = CASE WHEN v.offline THEN 'offline' ELSE 'active' END,
                   offline_since = CASE WHEN v.offline THEN now() END, updated_at = now()
                 FROM unnest($1::int8[], $2::bool[]) AS v(id, offline)
                 WHERE h.id = v.id AND h.status = CASE WHEN v.offline THEN 'active' ELSE 'offline' END
                 RETURNING h.hostname, h.status",
            )?,
            load: c.prepare(&accounts::load_sql())?,
            index: IndexStatements::prepare(c)?,
        })
    }

    /// [`load_accounts`] with the prepared query.
    pub fn load_accounts(&self, c: &mut Client, keys: &[DidKey]) -> Result<HashMap<DidKey, AccountState>, DbError> {
        accounts::load_with(c, &self.load, keys)
    }
}

/// One transaction: accounts, host cursors, counters and reachability, the
/// relay seq. Returns the hosts whose status changed (see [`set_offline`]).
/// A round with only accounts, cursors and counters (most of them) is the
/// one statement of [`round_statement`] on its own.
pub fn commit(c: &mut Client, s: &CommitStatements, b: &Batch) -> Result<Vec<(String, HostStatus)>, DbError> {
    let columns = UpsertColumns::new(&b.accounts, &b.words);
    let (ids, deltas, cursors) = host_columns(b);
    let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> = columns.params().to_vec();
    let hosts: [&(dyn postgres::types::ToSql + Sync); 4] = [&ids, &deltas, &cursors, &b.last_seq];
    params.extend(hosts);
    let alone = b.names.is_empty() && b.host_offline.is_empty() && b.held.is_empty() && b.index.is_empty();
    if alone {
        c.execute(&s.round, &params)?;
        return Ok(Vec::new());
    }
    let mut t = c.transaction()?;
    if !b.names.is_empty() {
        let (keys, dids): (Vec<uuid::Uuid>, Vec<&str>) = b.names.iter().map(|(k, d)| (uuid_of(k), d.as_str())).unzip();
        t.execute(&s.names, &[&keys, &dids])?;
    }
    t.execute(&s.round, &params)?;
    let changed = if b.host_offline.is_empty() { Vec::new() } else { set_offline(&mut t, s, &b.host_offline)? };
    if !b.held.is_empty() {
        save_held(&mut t, &b.held)?;
    }
    if !b.index.is_empty() {
        write_changes(&mut t, &s.index, &b.index)?;
    }
    t.commit()?;
    Ok(changed)
}

/// Replace the held lists of these DIDs (`crate::held`).
fn save_held(t: &mut postgres::Transaction<'_>, lists: &[(String, Vec<Vec<u8>>)]) -> Result<(), DbError> {
    let dids: Vec<&str> = lists.iter().map(|(d, _)| d.as_str()).collect();
    t.execute("DELETE FROM held_events WHERE did = ANY($1)", &[&dids])?;
    let (mut ds, mut ns, mut recs) = (Vec::new(), Vec::new(), Vec::new());
    for (d, list) in lists {
        for (n, r) in list.iter().enumerate() {
            ds.push(d.as_str());
            ns.push(n as i32);
            recs.push(r.as_slice());
        }
    }
    if !ds.is_empty() {
        t.execute(
            "INSERT INTO held_events (did, n, record) SELECT * FROM unnest($1::text[], $2::int4[], $3::bytea[])",
            &[&ds, &ns, &recs],
        )?;
    }
    Ok(())
}

/// Every held list, in order.
pub fn held_events(c: &mut Client) -> Result<HashMap<String, Vec<Vec<u8>>>, DbError> {
    let mut out: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for r in c.query("SELECT did, record FROM held_events ORDER BY did, n", &[])? {
        out.entry(r.get(0)).or_default().push(r.get(1));
    }
    Ok(out)
}

/// One admin audit entry.
pub struct AuditEntry {
    pub id: i64,
    /// RFC 3339, UTC.
    pub at: String,
    pub action: String,
    pub subject: String,
    /// JSON text.
    pub detail: Option<String>,
}

/// Audit entries older than id `before`, newest first, at most `limit`.
pub fn audit_entries(c: &mut Client, before: i64, limit: i64) -> Result<Vec<AuditEntry>, postgres::Error> {
    let rows = c.query(
        "SELECT id, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), action, subject, detail::text
         FROM admin_audit WHERE id < $1 ORDER BY id DESC LIMIT $2",
        &[&before, &limit],
    )?;
    Ok(rows
        .iter()
        .map(|r| AuditEntry { id: r.get(0), at: r.get(1), action: r.get(2), subject: r.get(3), detail: r.get(4) })
        .collect())
}

/// The admin API's setting of public requestCrawl (None: the config's).
pub fn request_crawl_override(c: &mut Client) -> Result<Option<bool>, postgres::Error> {
    Ok(c.query_one("SELECT request_crawl FROM relay_meta WHERE id = 1", &[])?.get(0))
}

// The admin API's writes.

pub fn audit(c: &mut Client, action: &str, subject: &str, detail_json: &str) -> Result<(), postgres::Error> {
    c.execute(
        "INSERT INTO admin_audit (action, subject, detail) VALUES ($1, $2, $3::text::jsonb)",
        &[&action, &subject, &detail_json],
    )?;
    Ok(())
}

/// Public requestCrawl on or off, kept over restarts.
pub fn set_request_crawl(c: &mut Client, public: bool) -> Result<(), postgres::Error> {
    c.execute("UPDATE relay_meta SET request_crawl = $1 WHERE id = 1", &[&public])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters and cursors of a round, one entry per host: a move counts
    /// on both hosts, a host without a new cursor keeps its own (-1), a
    /// host whose changes cancel out is left out.
    #[test]
    fn host_columns_merge_counters_and_cursors() {
        let mut b = Batch::default();
        b.new_accounts.insert(1, 3);
        b.moves = vec![(2, 1), (3, 4), (4, 3)];
        b.cursors.insert(5, 77);
        b.cursors.insert(1, 0);
        let (ids, deltas, cursors) = host_columns(&b);
        let mut rows: Vec<(i64, i64, i64)> =
            ids.into_iter().zip(deltas).zip(cursors).map(|((h, d), c)| (h, d, c)).collect();
        rows.sort();
        assert_eq!(rows, vec![(1, 4, 0), (2, -1, -1), (5, 0, 77)]);
    }
}
