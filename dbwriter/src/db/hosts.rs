//! Hosts: the crawl list, cursors, reachability, limits, bans.

use super::{CommitStatements, DbError};
use postgres::Client;
use sluice_common::process::host::{HostAssignment, HostLimits, HostStatus};
use std::collections::HashMap;

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
    pub fn assignment(&self, limits: &HostLimits) -> HostAssignment {
        HostAssignment {
            trusted: limits.is_trusted(&self.hostname),
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

/// Add a host to crawl (no-op if known), its limits its kind's
/// ([`HostLimits`]). Returns whether it was new. A known host takes no id
/// from the sequence (`ON CONFLICT` alone would take one each time): ids
/// stay below `accounts::HOST_ID_LIMIT`, which the table checks (V14).
pub fn add_host(c: &mut Client, host: &sluice_common::atproto::identity::PdsHost) -> Result<bool, postgres::Error> {
    let n = c.execute(
        "INSERT INTO hosts (hostname, insecure) SELECT $1, $2 WHERE NOT EXISTS (SELECT 1 FROM hosts WHERE hostname = $1)
         ON CONFLICT (hostname) DO NOTHING",
        &[&host.name, &host.insecure],
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
    /// The account limit an operator set for it (None: its kind's).
    pub account_limit_set: Option<i64>,
}

impl HostListing {
    /// Its account limit now, and whether it is trusted.
    pub fn limit(&self, limits: &HostLimits) -> (i64, bool) {
        (limits.account_limit(&self.hostname, self.account_limit_set), limits.is_trusted(&self.hostname))
    }
}

/// Every host (10,000 at most), by id.
pub fn host_list(c: &mut Client) -> Result<Vec<HostListing>, postgres::Error> {
    let rows = c.query(
        "SELECT id, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), hostname, insecure,
                cursor, status, account_count, CASE WHEN account_limit_set THEN account_limit END
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
            account_limit_set: r.get(7),
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

/// Per host: (its account limit now, account_count as committed), the
/// limit from `limits` unless an operator set one for it; `hosts.trusted`
/// brought in line with `limits` on the way.
pub fn host_limits(c: &mut Client, limits: &HostLimits) -> Result<HashMap<i64, (i64, i64)>, DbError> {
    let rows = c.query(
        "SELECT id, hostname, CASE WHEN account_limit_set THEN account_limit END, account_count, trusted FROM hosts",
        &[],
    )?;
    let mut out = HashMap::with_capacity(rows.len());
    let mut trust: (Vec<i64>, Vec<bool>) = (Vec::new(), Vec::new());
    for r in &rows {
        let (id, name): (i64, &str) = (r.get(0), r.get(1));
        out.insert(id, (limits.account_limit(name, r.get(2)), r.get(3)));
        let trusted = limits.is_trusted(name);
        if trusted != r.get::<_, bool>(4) {
            trust.0.push(id);
            trust.1.push(trusted);
        }
    }
    // `hosts.trusted` follows the patterns (a reload may change them).
    if !trust.0.is_empty() {
        c.execute(
            "UPDATE hosts h SET trusted = v.t FROM unnest($1::int8[], $2::bool[]) AS v(id, t) WHERE h.id = v.id",
            &[&trust.0, &trust.1],
        )?;
    }
    Ok(out)
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
    /// The account limit an operator set for it (None: its kind's).
    pub account_limit_set: Option<i64>,
}

impl HostSummary {
    /// Its account limit now, and whether it is trusted.
    pub fn limit(&self, limits: &HostLimits) -> (i64, bool) {
        (limits.account_limit(&self.hostname, self.account_limit_set), limits.is_trusted(&self.hostname))
    }
}

/// The columns [`host_summary`] reads.
const SUMMARY: &str = "id, hostname, cursor, account_count, status, CASE WHEN account_limit_set THEN account_limit END";

fn host_summary(r: &postgres::Row) -> HostSummary {
    let status = host_status_col(r, 4);
    HostSummary {
        id: r.get(0),
        hostname: r.get(1),
        cursor: r.get(2),
        account_count: r.get(3),
        status,
        account_limit_set: r.get(5),
    }
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
    let rows =
        c.query(&format!("SELECT {SUMMARY} FROM hosts WHERE id > $1 ORDER BY id LIMIT $2"), &[&after_id, &limit])?;
    Ok(rows.iter().map(host_summary).collect())
}

pub fn host_by_name(c: &mut Client, hostname: &str) -> Result<Option<HostSummary>, postgres::Error> {
    let row = c.query_opt(&format!("SELECT {SUMMARY} FROM hosts WHERE hostname = $1"), &[&hostname])?;
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

/// Set a host's status; false if there is no such host.
pub fn set_host_status(c: &mut Client, hostname: &str, status: HostStatus) -> Result<bool, postgres::Error> {
    let status = status.as_str();
    Ok(c.execute("UPDATE hosts SET status = $2, updated_at = now() WHERE hostname = $1", &[&hostname, &status])? > 0)
}

/// Set a host's account limit; false if there is no such host.
pub fn set_account_limit(c: &mut Client, hostname: &str, limit: i64) -> Result<bool, postgres::Error> {
    let n = c.execute(
        "UPDATE hosts SET account_limit = $2, account_limit_set = TRUE, updated_at = now() WHERE hostname = $1",
        &[&hostname, &limit],
    )?;
    Ok(n > 0)
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
