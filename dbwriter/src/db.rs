//! Postgres access for the db-writer: migrations, the durable relay seq,
//! hosts, accounts, and the one transaction per group commit.

use postgres::{Client, NoTls, Statement};
use sluice_common::policy::AccountState;
use std::collections::HashMap;

mod embedded {
    refinery::embed_migrations!("../migrations");
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("postgres: {0}")]
    Pg(#[from] postgres::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] refinery::Error),
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

pub fn last_seq(c: &mut Client) -> Result<i64, DbError> {
    Ok(c.query_one("SELECT last_seq FROM relay_meta WHERE id = 1", &[])?.get(0))
}

/// A host the relay crawls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRow {
    pub id: i64,
    pub hostname: String,
    pub cursor: i64,
    pub status: String,
    /// Reached over ws:// (else wss://).
    pub insecure: bool,
}

pub fn hosts(c: &mut Client) -> Result<Vec<HostRow>, DbError> {
    let rows = c.query("SELECT id, hostname, cursor, status, insecure FROM hosts ORDER BY id", &[])?;
    Ok(rows
        .iter()
        .map(|r| HostRow { id: r.get(0), hostname: r.get(1), cursor: r.get(2), status: r.get(3), insecure: r.get(4) })
        .collect())
}

/// Load the stored state of `dids` (those not found are absent).
pub fn load_accounts(c: &mut Client, dids: &[&str]) -> Result<HashMap<String, AccountState>, DbError> {
    let rows = c.query(
        "SELECT did, host_id, upstream_active, upstream_status, takendown, rev, commit_cid, data_cid, throttled,
                host_checked_micros
         FROM accounts WHERE did = ANY($1)",
        &[&dids],
    )?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                AccountState {
                    host_id: r.get(1),
                    upstream_active: r.get(2),
                    upstream_status: r.get(3),
                    takendown: r.get(4),
                    rev: r.get(5),
                    commit_cid: r.get(6),
                    data_cid: r.get(7),
                    throttled: r.get(8),
                    host_checked_micros: r.get(9),
                },
            )
        })
        .collect())
}

/// Everything one group commit writes.
#[derive(Default)]
pub struct Batch {
    pub accounts: HashMap<String, AccountState>,
    /// Accounts seen for the first time, per host.
    pub new_accounts: HashMap<i64, i64>,
    /// Accounts that moved between hosts: (from, to).
    pub moves: Vec<(i64, i64)>,
    pub cursors: HashMap<i64, i64>,
    pub last_seq: i64,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty() && self.cursors.is_empty()
    }
}

/// The group commit's statements, prepared once per connection: each
/// commit then costs one Bind/Execute per statement instead of a parse and
/// plan, and host cursors and counters go in one statement each however
/// many hosts the batch touched.
pub struct CommitStatements {
    accounts: Statement,
    counts: Statement,
    cursors: Statement,
    last_seq: Statement,
}

impl CommitStatements {
    pub fn prepare(c: &mut Client) -> Result<CommitStatements, DbError> {
        Ok(CommitStatements {
            accounts: c.prepare(
                "INSERT INTO accounts (did, host_id, upstream_active, upstream_status, takendown, rev, commit_cid, data_cid, status, throttled, host_checked_micros, updated_at)
                 SELECT *, now() FROM unnest($1::text[], $2::int8[], $3::bool[], $4::text[], $5::bool[], $6::text[], $7::bytea[], $8::bytea[], $9::text[], $10::bool[], $11::int8[])
                 ON CONFLICT (did) DO UPDATE SET host_id = EXCLUDED.host_id, upstream_active = EXCLUDED.upstream_active,
                   upstream_status = EXCLUDED.upstream_status, takendown = EXCLUDED.takendown, rev = EXCLUDED.rev,
                   commit_cid = EXCLUDED.commit_cid, data_cid = EXCLUDED.data_cid, status = EXCLUDED.status,
                   throttled = EXCLUDED.throttled, host_checked_micros = EXCLUDED.host_checked_micros, updated_at = now()",
            )?,
            counts: c.prepare(
                "UPDATE hosts h SET account_count = h.account_count + v.delta, updated_at = now()
                 FROM unnest($1::int8[], $2::int8[]) AS v(id, delta) WHERE h.id = v.id",
            )?,
            cursors: c.prepare(
                "UPDATE hosts h SET cursor = GREATEST(h.cursor, v.cursor), updated_at = now()
                 FROM unnest($1::int8[], $2::int8[]) AS v(id, cursor) WHERE h.id = v.id",
            )?,
            last_seq: c.prepare("UPDATE relay_meta SET last_seq = $1 WHERE id = 1")?,
        })
    }
}

/// One transaction: accounts, host cursors and counters, the relay seq.
pub fn commit(c: &mut Client, s: &CommitStatements, b: &Batch) -> Result<(), DbError> {
    let mut t = c.transaction()?;
    if !b.accounts.is_empty() {
        let n = b.accounts.len();
        let mut dids = Vec::with_capacity(n);
        let (mut host, mut ua, mut us, mut td) = (vec![], vec![], vec![], vec![]);
        let (mut rev, mut cc, mut dc, mut st, mut th, mut hc) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        for (did, a) in &b.accounts {
            dids.push(did.as_str());
            host.push(a.host_id);
            ua.push(a.upstream_active);
            us.push(a.upstream_status.as_deref());
            td.push(a.takendown);
            rev.push(a.rev.as_deref());
            cc.push(a.commit_cid.as_deref());
            dc.push(a.data_cid.as_deref());
            st.push(a.status());
            th.push(a.throttled);
            hc.push(a.host_checked_micros);
        }
        t.execute(&s.accounts, &[&dids, &host, &ua, &us, &td, &rev, &cc, &dc, &st, &th, &hc])?;
    }
    let mut deltas: HashMap<i64, i64> = b.new_accounts.clone();
    for &(from, to) in &b.moves {
        *deltas.entry(from).or_default() -= 1;
        *deltas.entry(to).or_default() += 1;
    }
    let (ids, ds): (Vec<i64>, Vec<i64>) = deltas.into_iter().filter(|&(_, d)| d != 0).unzip();
    if !ids.is_empty() {
        t.execute(&s.counts, &[&ids, &ds])?;
    }
    if !b.cursors.is_empty() {
        let (ids, cursors): (Vec<i64>, Vec<i64>) = b.cursors.iter().map(|(h, c)| (*h, *c)).unzip();
        t.execute(&s.cursors, &[&ids, &cursors])?;
    }
    t.execute(&s.last_seq, &[&b.last_seq])?;
    t.commit()?;
    Ok(())
}

/// Add a host to crawl (no-op if known), with `account_limit`. Returns
/// whether it was new.
pub fn add_host(
    c: &mut Client,
    host: &sluice_common::identity::PdsHost,
    account_limit: i64,
) -> Result<bool, postgres::Error> {
    let n = c.execute(
        "INSERT INTO hosts (hostname, insecure, account_limit) VALUES ($1, $2, $3) ON CONFLICT (hostname) DO NOTHING",
        &[&host.name, &host.insecure, &account_limit],
    )?;
    Ok(n > 0)
}

/// Is `hostname` (no port) or a parent domain banned?
pub fn domain_banned(c: &mut Client, hostname: &str) -> Result<bool, postgres::Error> {
    let n: i64 = c
        .query_one("SELECT count(*) FROM domain_bans WHERE $1 = domain OR $1 LIKE '%.' || domain", &[&hostname])?
        .get(0);
    Ok(n > 0)
}

/// Per host: (account_limit, account_count).
pub fn host_limits(c: &mut Client) -> Result<HashMap<i64, (i64, i64)>, DbError> {
    let rows = c.query("SELECT id, account_limit, account_count FROM hosts", &[])?;
    Ok(rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect())
}
