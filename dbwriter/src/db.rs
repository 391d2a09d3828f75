//! Postgres access for the db-writer: migrations, the durable relay seq,
//! hosts, accounts, and the one transaction per group commit.

use postgres::{Client, NoTls, Statement};
use sluice_common::atproto::did::{did_bytes, did_from_bytes};
use sluice_common::atproto::policy::{AccountState, AccountStatus};
use sluice_common::ipc::idwire::IdentityRecord;
use sluice_common::process::host::{HostAssignment, HostStatus};
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
    pub status: HostStatus,
    /// Reached over ws:// (else wss://).
    pub insecure: bool,
    /// See [`sluice_common::process::host::HostAssignment::crawl_gen`].
    pub crawl_gen: i64,
}

impl HostRow {
    pub fn assignment(&self) -> HostAssignment {
        HostAssignment {
            id: self.id,
            hostname: self.hostname.clone(),
            cursor: self.cursor,
            insecure: self.insecure,
            offline: self.status == HostStatus::Offline,
            crawl_gen: self.crawl_gen,
        }
    }
}

/// What the supervisor's assignments depend on, summed over every host
/// (the count and an order-free hash of id, name, status, plain text and
/// crawl generation; not the cursor, which moves with every commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostsFingerprint {
    count: i64,
    hash: String,
}

pub fn hosts_fingerprint(c: &mut Client) -> Result<HostsFingerprint, DbError> {
    let r = c.query_one(
        "SELECT count(*), coalesce(sum(hashtextextended(
             id::text || '/' || hostname || '/' || status || '/' || insecure::text || '/' || crawl_gen::text, 0
         )::numeric), 0)::text
         FROM hosts",
        &[],
    )?;
    Ok(HostsFingerprint { count: r.get(0), hash: r.get(1) })
}

pub fn hosts(c: &mut Client) -> Result<Vec<HostRow>, DbError> {
    let rows = c.query("SELECT id, hostname, cursor, status, insecure, crawl_gen FROM hosts ORDER BY id", &[])?;
    Ok(rows
        .iter()
        .map(|r| HostRow {
            id: r.get(0),
            hostname: r.get(1),
            cursor: r.get(2),
            status: host_status_col(r, 3),
            insecure: r.get(4),
            crawl_gen: r.get(5),
        })
        .collect())
}

/// Hosts a shard reports reachable again (`false`) or not (`true`): an
/// `active` host goes `offline` (since now), an `offline` one `active`.
/// Idle and banned hosts keep their status (a report from a task that was
/// still running when an admin acted). Returns the hosts that changed,
/// with their new status, for the one log line per change.
pub fn set_offline(
    t: &mut postgres::Transaction<'_>,
    s: &CommitStatements,
    states: &HashMap<i64, bool>,
) -> Result<Vec<(String, HostStatus)>, DbError> {
    let (ids, offline): (Vec<i64>, Vec<bool>) = states.iter().map(|(h, o)| (*h, *o)).unzip();
    let rows = t.query(&s.offline, &[&ids, &offline])?;
    Ok(rows.iter().map(|r| (r.get(0), host_status_col(r, 1))).collect())
}

/// Offline hosts offline longer than `idle_after` become `idle` (no
/// longer dialed until a requestCrawl). Returns their names.
pub fn idle_offline_hosts(c: &mut Client, idle_after: std::time::Duration) -> Result<Vec<String>, DbError> {
    let secs = idle_after.as_secs_f64();
    let rows = c.query(
        "UPDATE hosts SET status = 'idle', updated_at = now()
         WHERE status = 'offline' AND offline_since < now() - make_interval(secs => $1)
         RETURNING hostname",
        &[&secs],
    )?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
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
    /// Host reachability reported by the shards (`true`: offline), last
    /// report per host.
    pub host_offline: HashMap<i64, bool>,
    /// Held lists that changed in the round, whole (empty: released).
    pub held: Vec<(String, Vec<Vec<u8>>)>,
    pub last_seq: i64,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty() && self.cursors.is_empty() && self.host_offline.is_empty()
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
    offline: Statement,
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
            offline: c.prepare(
                "UPDATE hosts h SET status = CASE WHEN v.offline THEN 'offline' ELSE 'active' END,
                   offline_since = CASE WHEN v.offline THEN now() END, updated_at = now()
                 FROM unnest($1::int8[], $2::bool[]) AS v(id, offline)
                 WHERE h.id = v.id AND h.status = CASE WHEN v.offline THEN 'active' ELSE 'offline' END
                 RETURNING h.hostname, h.status",
            )?,
            last_seq: c.prepare("UPDATE relay_meta SET last_seq = $1 WHERE id = 1")?,
        })
    }
}

/// One transaction: accounts, host cursors, counters and reachability, the
/// relay seq. Returns the hosts whose status changed (see [`set_offline`]).
pub fn commit(c: &mut Client, s: &CommitStatements, b: &Batch) -> Result<Vec<(String, HostStatus)>, DbError> {
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
            st.push(a.status().as_str());
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
    let changed = if b.host_offline.is_empty() { Vec::new() } else { set_offline(&mut t, s, &b.host_offline)? };
    if !b.held.is_empty() {
        save_held(&mut t, &b.held)?;
    }
    t.execute(&s.last_seq, &[&b.last_seq])?;
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

/// Add a host to crawl (no-op if known), with `account_limit`. Returns
/// whether it was new.
pub fn add_host(
    c: &mut Client,
    host: &sluice_common::atproto::identity::PdsHost,
    account_limit: i64,
) -> Result<bool, postgres::Error> {
    let n = c.execute(
        "INSERT INTO hosts (hostname, insecure, account_limit) VALUES ($1, $2, $3) ON CONFLICT (hostname) DO NOTHING",
        &[&host.name, &host.insecure, &account_limit],
    )?;
    Ok(n > 0)
}

/// An idle or offline host asked for a crawl: make it active and bump its
/// crawl generation (its shard restarts the task, backoff reset). False
/// if it was neither (banned, or already active).
pub fn recrawl_host(c: &mut Client, hostname: &str) -> Result<bool, postgres::Error> {
    let n = c.execute(
        "UPDATE hosts SET status = 'active', offline_since = NULL, crawl_gen = crawl_gen + 1, updated_at = now()
         WHERE hostname = $1 AND status IN ('idle', 'offline')",
        &[&hostname],
    )?;
    Ok(n > 0)
}

/// Set a host's cursor (admin) and bump its crawl generation so its shard
/// reconnects from there. Returns the previous cursor.
pub fn set_host_cursor(c: &mut Client, host_id: i64, cursor: i64) -> Result<i64, postgres::Error> {
    let row = c.query_one(
        "UPDATE hosts h SET cursor = $2, crawl_gen = h.crawl_gen + 1, updated_at = now()
         FROM (SELECT id, cursor AS before FROM hosts WHERE id = $1 FOR UPDATE) old
         WHERE h.id = old.id RETURNING old.before",
        &[&host_id, &cursor],
    )?;
    Ok(row.get(0))
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

/// Taken-down accounts after `after` (DID order), at most `limit`.
pub fn takedowns(c: &mut Client, after: &str, limit: i64) -> Result<Vec<String>, postgres::Error> {
    let rows =
        c.query("SELECT did FROM accounts WHERE takendown AND did > $1 ORDER BY did LIMIT $2", &[&after, &limit])?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Every taken-down account (at most a million), for the flagging pass at
/// start.
pub fn taken_down_dids(c: &mut Client) -> Result<Vec<String>, postgres::Error> {
    Ok(c.query("SELECT did FROM accounts WHERE takendown LIMIT 1000000", &[])?.iter().map(|r| r.get(0)).collect())
}

/// Banned domains, sorted.
pub fn domain_bans(c: &mut Client) -> Result<Vec<String>, postgres::Error> {
    Ok(c.query("SELECT domain FROM domain_bans ORDER BY domain", &[])?.iter().map(|r| r.get(0)).collect())
}

/// A host as the admin lists show it.
pub struct HostListing {
    pub id: i64,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub hostname: String,
    pub insecure: bool,
    pub cursor: i64,
    pub status: HostStatus,
    pub account_count: i64,
    pub account_limit: i64,
}

/// Every host (10,000 at most), by id.
pub fn host_list(c: &mut Client) -> Result<Vec<HostListing>, postgres::Error> {
    let rows = c.query(
        "SELECT id, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), hostname, insecure,
                cursor, status, account_count, account_limit
         FROM hosts ORDER BY id LIMIT 10000",
        &[],
    )?;
    Ok(rows
        .iter()
        .map(|r| HostListing {
            id: r.get(0),
            created_at: r.get(1),
            hostname: r.get(2),
            insecure: r.get(3),
            cursor: r.get(4),
            status: host_status_col(r, 5),
            account_count: r.get(6),
            account_limit: r.get(7),
        })
        .collect())
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

// The query workers' reads (XRPC endpoints and requestCrawl).

/// A host as the sync endpoints show it.
#[derive(Debug, Clone)]
pub struct HostSummary {
    pub id: i64,
    pub hostname: String,
    pub cursor: i64,
    pub account_count: i64,
    pub status: HostStatus,
}

fn host_summary(r: &postgres::Row) -> HostSummary {
    let status = host_status_col(r, 4);
    HostSummary { id: r.get(0), hostname: r.get(1), cursor: r.get(2), account_count: r.get(3), status }
}

/// A `hosts.status` column. Only [`HostStatus`]'s names are stored (the
/// V7 check constraint); were another there, the host counts as idle (not
/// dialed) and the ERROR names it.
fn host_status_col(r: &postgres::Row, i: usize) -> HostStatus {
    let s: &str = r.get(i);
    HostStatus::parse(s).unwrap_or_else(|e| {
        tracing::error!(error = %e, "a host with an unknown status in Postgres; treated as idle");
        HostStatus::Idle
    })
}

/// Hosts after `after_id`, by id, at most `limit`.
pub fn hosts_page(c: &mut Client, after_id: i64, limit: i64) -> Result<Vec<HostSummary>, postgres::Error> {
    let rows = c.query(
        "SELECT id, hostname, cursor, account_count, status FROM hosts WHERE id > $1 ORDER BY id LIMIT $2",
        &[&after_id, &limit],
    )?;
    Ok(rows.iter().map(host_summary).collect())
}

pub fn host_by_name(c: &mut Client, hostname: &str) -> Result<Option<HostSummary>, postgres::Error> {
    let row =
        c.query_opt("SELECT id, hostname, cursor, account_count, status FROM hosts WHERE hostname = $1", &[&hostname])?;
    Ok(row.as_ref().map(host_summary))
}

/// A host's stored status (None: not known).
pub fn host_status_by_name(c: &mut Client, hostname: &str) -> Result<Option<HostStatus>, postgres::Error> {
    Ok(c.query_opt("SELECT status FROM hosts WHERE hostname = $1", &[&hostname])?.map(|r| host_status_col(&r, 0)))
}

/// Hosts added in the last 24 hours.
pub fn hosts_added_today(c: &mut Client) -> Result<i64, postgres::Error> {
    Ok(c.query_one("SELECT count(*) FROM hosts WHERE created_at > now() - interval '1 day'", &[])?.get(0))
}

/// The admin API's setting of public requestCrawl (None: the config's).
pub fn request_crawl_override(c: &mut Client) -> Result<Option<bool>, postgres::Error> {
    Ok(c.query_one("SELECT request_crawl FROM relay_meta WHERE id = 1", &[])?.get(0))
}

/// An account's head as stored: its status, rev and commit.
#[derive(Debug, Clone)]
pub struct AccountHead {
    pub did: String,
    pub status: AccountStatus,
    pub rev: Option<String>,
    pub commit_cid: Option<Vec<u8>>,
}

pub fn account_head(c: &mut Client, did: &str) -> Result<Option<AccountHead>, postgres::Error> {
    let row = c.query_opt("SELECT did, status, rev, commit_cid FROM accounts WHERE did = $1", &[&did])?;
    Ok(row.as_ref().map(account_head_row))
}

/// Accounts with a commit after `after` (DID order), at most `limit`.
pub fn repos_page(c: &mut Client, after: &str, limit: i64) -> Result<Vec<AccountHead>, postgres::Error> {
    let rows = c.query(
        "SELECT did, status, rev, commit_cid FROM accounts
         WHERE did > $1 AND commit_cid IS NOT NULL AND rev IS NOT NULL ORDER BY did LIMIT $2",
        &[&after, &limit],
    )?;
    Ok(rows.iter().map(account_head_row).collect())
}

fn account_head_row(r: &postgres::Row) -> AccountHead {
    AccountHead { did: r.get(0), status: account_status_col(r, 1), rev: r.get(2), commit_cid: r.get(3) }
}

/// An `accounts.status` column. Only [`AccountStatus`]'s names are stored
/// (the V7 check constraint); were another there, it reads as
/// `deactivated` and the ERROR names it.
fn account_status_col(r: &postgres::Row, i: usize) -> AccountStatus {
    let s: &str = r.get(i);
    AccountStatus::parse(s).unwrap_or_else(|| {
        tracing::error!(status = s, "an account with an unknown status in Postgres; reported as deactivated");
        AccountStatus::Deactivated
    })
}

/// An account's status and its host (name, plain text or not).
pub fn account_host(c: &mut Client, did: &str) -> Result<Option<(AccountStatus, String, bool)>, postgres::Error> {
    let row = c.query_opt(
        "SELECT a.status, h.hostname, h.insecure FROM accounts a JOIN hosts h ON h.id = a.host_id WHERE a.did = $1",
        &[&did],
    )?;
    Ok(row.map(|r| (account_status_col(&r, 0), r.get(1), r.get(2))))
}

// The admin API's writes.

pub fn audit(c: &mut Client, action: &str, subject: &str, detail_json: &str) -> Result<(), postgres::Error> {
    c.execute(
        "INSERT INTO admin_audit (action, subject, detail) VALUES ($1, $2, $3::text::jsonb)",
        &[&action, &subject, &detail_json],
    )?;
    Ok(())
}

/// Set a host's status; false if there is no such host.
pub fn set_host_status(c: &mut Client, hostname: &str, status: HostStatus) -> Result<bool, postgres::Error> {
    let status = status.as_str();
    Ok(c.execute("UPDATE hosts SET status = $2, updated_at = now() WHERE hostname = $1", &[&hostname, &status])? > 0)
}

/// Set a host's account limit; false if there is no such host.
pub fn set_account_limit(c: &mut Client, hostname: &str, limit: i64) -> Result<bool, postgres::Error> {
    let n =
        c.execute("UPDATE hosts SET account_limit = $2, updated_at = now() WHERE hostname = $1", &[&hostname, &limit])?;
    Ok(n > 0)
}

/// Public requestCrawl on or off, kept over restarts.
pub fn set_request_crawl(c: &mut Client, public: bool) -> Result<(), postgres::Error> {
    c.execute("UPDATE relay_meta SET request_crawl = $1 WHERE id = 1", &[&public])?;
    Ok(())
}

/// Ban `domain` and its subdomains; returns the hosts under it now banned.
pub fn ban_domain(c: &mut Client, domain: &str) -> Result<u64, postgres::Error> {
    c.execute("INSERT INTO domain_bans (domain) VALUES ($1) ON CONFLICT DO NOTHING", &[&domain])?;
    c.execute(
        "UPDATE hosts SET status = 'banned', updated_at = now()
         WHERE split_part(hostname, ':', 1) = $1 OR split_part(hostname, ':', 1) LIKE '%.' || $1",
        &[&domain],
    )
}

pub fn unban_domain(c: &mut Client, domain: &str) -> Result<(), postgres::Error> {
    c.execute("DELETE FROM domain_bans WHERE domain = $1", &[&domain])?;
    Ok(())
}

// The identity service's store (`crate::identity`).

/// A stored identity's key column: curve code ‖ compressed point.
fn key_col(r: &IdentityRecord) -> Option<Vec<u8>> {
    r.key.as_ref().map(|(c, p)| {
        let mut v = Vec::with_capacity(34);
        v.push(*c);
        v.extend_from_slice(p);
        v
    })
}

fn identity_row(r: &postgres::Row) -> Option<IdentityRecord> {
    let did = did_from_bytes(r.get::<_, &[u8]>(0))?;
    let key = r.get::<_, Option<&[u8]>>(1).and_then(|k| {
        let (c, p) = k.split_first()?;
        Some((*c, <[u8; 33]>::try_from(p).ok()?))
    });
    Some(IdentityRecord { did, key, pds: r.get(2), handle: r.get(3), as_of_micros: r.get(4) })
}

/// The stored identities of `dids` (those not stored are absent).
pub fn load_identities(c: &mut Client, dids: &[&str]) -> Result<HashMap<String, IdentityRecord>, DbError> {
    let keys: Vec<Vec<u8>> = dids.iter().map(|d| did_bytes(d)).collect();
    let rows = c.query(
        "SELECT i.did, i.key, e.url, i.handle, i.as_of FROM identities i LEFT JOIN pds_endpoints e ON e.id = i.pds_id
         WHERE i.did = ANY($1)",
        &[&keys],
    )?;
    Ok(rows.iter().filter_map(identity_row).map(|r| (r.did.clone(), r)).collect())
}

/// Make sure every endpoint of `urls` has a number.
fn intern_endpoints<'a>(
    t: &mut impl postgres::GenericClient,
    urls: impl Iterator<Item = &'a str>,
) -> Result<(), DbError> {
    let mut urls: Vec<&str> = urls.collect();
    urls.sort_unstable();
    urls.dedup();
    if !urls.is_empty() {
        t.execute(
            "INSERT INTO pds_endpoints (url) SELECT u FROM unnest($1::text[]) AS u
             WHERE NOT EXISTS (SELECT 1 FROM pds_endpoints e WHERE e.url = u) ON CONFLICT (url) DO NOTHING",
            &[&urls],
        )?;
    }
    Ok(())
}

/// Store fetched identities (newer than what is stored: a slower fetch
/// never overwrites a newer answer).
pub fn save_identities(c: &mut Client, recs: &[IdentityRecord]) -> Result<(), DbError> {
    if recs.is_empty() {
        return Ok(());
    }
    let mut t = c.transaction()?;
    intern_endpoints(&mut t, recs.iter().filter_map(|r| r.pds.as_deref()))?;
    let dids: Vec<Vec<u8>> = recs.iter().map(|r| did_bytes(&r.did)).collect();
    let keys: Vec<Option<Vec<u8>>> = recs.iter().map(key_col).collect();
    let pds: Vec<Option<&str>> = recs.iter().map(|r| r.pds.as_deref()).collect();
    let handles: Vec<Option<&str>> = recs.iter().map(|r| r.handle.as_deref()).collect();
    let as_of: Vec<i64> = recs.iter().map(|r| r.as_of_micros).collect();
    t.execute(
        "INSERT INTO identities (did, key, pds_id, handle, as_of)
         SELECT v.d, v.k, e.id, v.h, v.a FROM unnest($1::bytea[], $2::bytea[], $3::text[], $4::text[], $5::int8[])
           AS v(d, k, u, h, a) LEFT JOIN pds_endpoints e ON e.url = v.u
         ON CONFLICT (did) DO UPDATE SET key = EXCLUDED.key, pds_id = EXCLUDED.pds_id, handle = EXCLUDED.handle,
           as_of = EXCLUDED.as_of
         WHERE identities.as_of <= EXCLUDED.as_of",
        &[&dids, &keys, &pds, &handles, &as_of],
    )?;
    t.commit()?;
    Ok(())
}

/// A DID the directory says has no document (any more).
pub fn delete_identity(c: &mut Client, did: &str) -> Result<(), DbError> {
    c.execute("DELETE FROM identities WHERE did = $1", &[&did_bytes(did)])?;
    Ok(())
}

/// Apply the PLC export's operations to the DIDs the store holds (others
/// are skipped), each only if newer than what is stored, and move the
/// export cursor, in one transaction. `ops` holds at most one operation
/// per DID (the latest). Returns the identities that changed (a tombstone
/// as a record with no key and no endpoint).
pub fn apply_plc_ops(
    c: &mut Client,
    ops: &[IdentityRecord],
    tombstones: &[(String, i64)],
    cursor: &str,
) -> Result<Vec<IdentityRecord>, DbError> {
    let mut t = c.transaction()?;
    let mut changed = Vec::new();
    if !ops.is_empty() {
        let dids: Vec<Vec<u8>> = ops.iter().map(|r| did_bytes(&r.did)).collect();
        // Only endpoints of DIDs the store holds get a number.
        let known: std::collections::HashSet<Vec<u8>> = t
            .query("SELECT did FROM identities WHERE did = ANY($1)", &[&dids])?
            .iter()
            .map(|r| r.get::<_, Vec<u8>>(0))
            .collect();
        let ops: Vec<&IdentityRecord> = ops.iter().filter(|r| known.contains(&did_bytes(&r.did))).collect();
        intern_endpoints(&mut t, ops.iter().filter_map(|r| r.pds.as_deref()))?;
        let dids: Vec<Vec<u8>> = ops.iter().map(|r| did_bytes(&r.did)).collect();
        let keys: Vec<Option<Vec<u8>>> = ops.iter().map(|r| key_col(r)).collect();
        let pds: Vec<Option<&str>> = ops.iter().map(|r| r.pds.as_deref()).collect();
        let handles: Vec<Option<&str>> = ops.iter().map(|r| r.handle.as_deref()).collect();
        let as_of: Vec<i64> = ops.iter().map(|r| r.as_of_micros).collect();
        let rows = t.query(
            "UPDATE identities i SET key = v.k, pds_id = e.id, handle = v.h, as_of = v.a
             FROM unnest($1::bytea[], $2::bytea[], $3::text[], $4::text[], $5::int8[]) AS v(d, k, u, h, a)
               LEFT JOIN pds_endpoints e ON e.url = v.u
             WHERE i.did = v.d AND i.as_of < v.a
             RETURNING i.did, i.key, v.u, i.handle, i.as_of",
            &[&dids, &keys, &pds, &handles, &as_of],
        )?;
        changed.extend(rows.iter().filter_map(identity_row));
    }
    if !tombstones.is_empty() {
        let dids: Vec<Vec<u8>> = tombstones.iter().map(|(d, _)| did_bytes(d)).collect();
        let at: Vec<i64> = tombstones.iter().map(|(_, a)| *a).collect();
        let rows = t.query(
            "DELETE FROM identities i USING unnest($1::bytea[], $2::int8[]) AS v(d, a)
             WHERE i.did = v.d AND i.as_of < v.a RETURNING i.did, v.a",
            &[&dids, &at],
        )?;
        for r in &rows {
            if let Some(did) = did_from_bytes(r.get::<_, &[u8]>(0)) {
                changed.push(IdentityRecord { did, key: None, pds: None, handle: None, as_of_micros: r.get(1) });
            }
        }
    }
    t.execute("UPDATE relay_meta SET plc_cursor = $1 WHERE id = 1", &[&cursor])?;
    t.commit()?;
    Ok(changed)
}

/// Where the PLC export was read up to (None: never followed).
pub fn plc_cursor(c: &mut Client) -> Result<Option<String>, DbError> {
    Ok(c.query_one("SELECT plc_cursor FROM relay_meta WHERE id = 1", &[])?.get(0))
}

pub fn set_plc_cursor(c: &mut Client, cursor: &str) -> Result<(), DbError> {
    c.execute("UPDATE relay_meta SET plc_cursor = $1 WHERE id = 1", &[&cursor])?;
    Ok(())
}
