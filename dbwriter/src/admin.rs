//! The admin API (HTTP, behind `admin_password_file`): takedowns and their
//! reversal, host bans and cursors, the host list, the audit log. Actions that emit events (a
//! takedown is an `#account` event with status `takendown`) go through the
//! sequencer, so they get a relay seq and are durable before the answer.
//! Every action is written to `admin_audit`.
//!
//! Auth: `Authorization: Bearer <password>` or HTTP Basic with user
//! `admin`. Without `admin_password_file` every admin route answers 403.

use crate::api::{error, QueryConfig, Request, Response};
pub use crate::messages::{channel, Command, FlagJob, QUEUE_MAX};
use postgres::Client;
use serde_json::{json, Value};
use sluice_common::atproto::policy::AccountStatus;
use sluice_common::process::host::{HostLimits, HostStatus};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::time::Duration;

/// The thread that applies [`FlagJob`]s, one at a time, off the
/// sequencer's path (a scan of the whole window can take a while).
pub fn start_flagger(
    events_dir: std::path::PathBuf,
    control: std::sync::Arc<sluice_common::ipc::shm::ControlBlock>,
) -> std::io::Result<SyncSender<FlagJob>> {
    let (tx, rx) = sync_channel::<FlagJob>(QUEUE_MAX);
    std::thread::Builder::new().name("log-flags".into()).spawn(move || {
        while let Ok(job) = rx.recv() {
            use sluice_common::atproto::frame::{decode, Event, Message};
            let dids: std::collections::HashSet<&str> = job.dids.iter().map(String::as_str).collect();
            let hashes: std::collections::HashSet<u64> =
                dids.iter().map(|d| sluice_common::ipc::ringrec::did_hash(d)).collect();
            let matches = |frame: &[u8]| {
                decode(frame).ok().is_some_and(|d| match d.message {
                    // The takedown notice itself stays visible.
                    Message::Event(Event::Account(a)) if a.status == Some(AccountStatus::Takendown.as_str()) => false,
                    Message::Event(e) => e.did().is_some_and(|x| dids.contains(x)),
                    _ => false,
                })
            };
            let flag = sluice_common::ipc::eventlog::FLAG_TAKEDOWN;
            let first = job.dids.first().map(String::as_str).unwrap_or("");
            let r = sluice_common::ipc::eventlog::set_flags(
                &events_dir,
                |h| hashes.contains(&h),
                job.upto_seq,
                flag,
                job.on,
                matches,
            );
            // Shards re-read (and re-frame) what they cached.
            control.flags_generation().fetch_add(1, std::sync::atomic::Ordering::Release);
            match r {
                Ok(n) => tracing::info!(
                    dids = job.dids.len(),
                    did = first,
                    upto_seq = job.upto_seq,
                    records = n,
                    hidden = job.on,
                    "takedown flags applied"
                ),
                Err(e) => tracing::error!(did = first, upto_seq = job.upto_seq, error = %e, "takedown flags failed"),
            }
        }
    })?;
    Ok(tx)
}

fn body_field(req: &Request, name: &str) -> Option<String> {
    serde_json::from_slice::<Value>(&req.body).ok()?.get(name)?.as_str().map(str::to_owned)
}

fn audit(c: &mut Client, action: &str, subject: &str, detail: Value) -> Result<(), postgres::Error> {
    crate::db::audit(c, action, subject, &detail.to_string())
}

/// sluice's own admin routes, for an authenticated request (`serve`
/// checks the credentials and tries goat's paths first).
pub fn route(c: &mut Client, cfg: &QueryConfig, req: &Request) -> Result<Response, postgres::Error> {
    let (tx, run_dir) = (&cfg.admin, cfg.run_dir.as_path());
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/admin/repo/takedown") => takedown(c, tx, req, true),
        ("POST", "/admin/repo/reverseTakedown") => takedown(c, tx, req, false),
        ("POST", "/admin/host/ban") => ban(c, req, true),
        ("POST", "/admin/host/disconnect") => disconnect(c, req),
        ("POST", "/admin/requestCrawl") => set_request_crawl(c, req),
        ("POST", "/admin/host/unban") => ban(c, req, false),
        ("GET", "/admin/hosts") => hosts(c, &cfg.live().limits),
        ("GET", "/admin/consumers") => Ok(consumers(run_dir)),
        ("POST", "/admin/host/limit") => limit(c, req),
        ("POST", "/admin/domain/ban") => ban_domain(c, req, true),
        ("POST", "/admin/domain/unban") => ban_domain(c, req, false),
        ("POST", "/admin/host/cursor") => host_cursor(c, tx, req),
        ("GET", "/admin/audit") => audit_log(c, req),
        ("POST", "/admin/collections/backfill") => collections_backfill(c),
        _ => Ok(error(404, "NotFound", "no such admin route")),
    }
}

/// Start the collection backfill (from the beginning; a running one is
/// restarted): every known account the index has not placed is checked.
fn collections_backfill(c: &mut Client) -> Result<Response, postgres::Error> {
    let total = crate::db::backfill_start(c)?;
    audit(c, "collections_backfill", "", json!({ "accounts": total }))?;
    tracing::info!(accounts = total, "collection backfill started");
    Ok(Response::ok(json!({ "accounts": total })))
}

pub(crate) fn takedown(
    c: &mut Client,
    tx: &SyncSender<Command>,
    req: &Request,
    takedown: bool,
) -> Result<Response, postgres::Error> {
    let Some(did) = body_field(req, "did") else {
        return Ok(error(400, "InvalidRequest", "body must be {\"did\": ...}"));
    };
    let (reply, rx) = sync_channel(1);
    if tx.try_send(Command::Takedown { did: did.clone(), takedown, reply }).is_err() {
        return Ok(error(503, "Busy", "the sequencer's admin queue is full"));
    }
    let action = if takedown { "takedown" } else { "reverse_takedown" };
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(seq)) => {
            audit(c, action, &did, json!({"seq": seq}))?;
            tracing::info!(did, seq, action, "admin");
            Ok(Response::ok(json!({"did": did, "seq": seq})))
        }
        Ok(Err(why)) => Ok(error(400, "InvalidRequest", &why.to_string())),
        Err(_) => {
            // The command is queued and may still take effect: the audit
            // log must say it was asked for.
            audit(c, action, &did, json!({"answered": false}))?;
            tracing::warn!(did, action, "admin: the sequencer did not answer in 30 s; the action may still apply");
            Ok(error(503, "Timeout", "the sequencer did not answer in time; the action may still apply"))
        }
    }
}

/// Set where the relay next reads a host from: its cursor (stored, and the
/// sequencer's duplicate floor) and a new crawl generation, so its shard
/// restarts the connection from there. Events at or below the new cursor
/// that were relayed before are relayed again if the host sends them.
fn host_cursor(c: &mut Client, tx: &SyncSender<Command>, req: &Request) -> Result<Response, postgres::Error> {
    let v: Value = serde_json::from_slice(&req.body).unwrap_or_default();
    let (Some(host), Some(cursor)) = (v["hostname"].as_str(), v["cursor"].as_i64()) else {
        return Ok(error(400, "InvalidRequest", "body must be {\"hostname\": ..., \"cursor\": N}"));
    };
    if !(0..sluice_common::atproto::frame::SEQ_MAX).contains(&cursor) {
        return Ok(error(400, "InvalidRequest", "cursor must be an integer from 0 to 2^53"));
    }
    let Some(row) = crate::db::host_by_name(c, host)? else {
        return Ok(error(400, "HostNotFound", "unknown host"));
    };
    let (reply, rx) = sync_channel(1);
    if tx.try_send(Command::HostCursor { host_id: row.id, cursor, reply }).is_err() {
        return Ok(error(503, "Busy", "the sequencer's admin queue is full"));
    }
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(from)) => {
            audit(c, "host_cursor", host, json!({"from": from, "to": cursor}))?;
            tracing::info!(host, from, to = cursor, "admin: host cursor set");
            Ok(Response::ok(json!({"hostname": host, "cursor": cursor, "previous": from})))
        }
        Ok(Err(why)) => Ok(error(400, "InvalidRequest", &why.to_string())),
        Err(_) => {
            audit(c, "host_cursor", host, json!({"to": cursor, "answered": false}))?;
            Ok(error(503, "Timeout", "the sequencer did not answer in time; the action may still apply"))
        }
    }
}

/// The audit log, newest first: `?limit=` (1..1000, default 100) and
/// `?before=` (an entry id, for the next page; the answer's `cursor`).
fn audit_log(c: &mut Client, req: &Request) -> Result<Response, postgres::Error> {
    let limit: i64 = crate::api::param(req, "limit").and_then(|l| l.parse().ok()).unwrap_or(100).clamp(1, 1000);
    let before: i64 = crate::api::param(req, "before").and_then(|b| b.parse().ok()).unwrap_or(i64::MAX);
    let rows = crate::db::audit_entries(c, before, limit)?;
    let entries: Vec<Value> = rows
        .iter()
        .map(|e| {
            json!({"id": e.id, "at": e.at, "action": e.action, "subject": e.subject,
                   "detail": e.detail.as_deref().and_then(|d| serde_json::from_str::<Value>(d).ok()).unwrap_or(Value::Null)})
        })
        .collect();
    let mut body = json!({ "entries": entries });
    if rows.len() as i64 == limit {
        if let Some(last) = rows.last() {
            body["cursor"] = json!(last.id.to_string());
        }
    }
    Ok(Response::ok(body))
}

pub(crate) fn ban(c: &mut Client, req: &Request, ban: bool) -> Result<Response, postgres::Error> {
    let Some(host) = body_field(req, "hostname") else {
        return Ok(error(400, "InvalidRequest", "body must be {\"hostname\": ...}"));
    };
    let status = if ban { HostStatus::Banned } else { HostStatus::Active };
    if !crate::db::set_host_status(c, &host, status)? {
        return Ok(error(400, "HostNotFound", "unknown host"));
    }
    audit(c, if ban { "ban_host" } else { "unban_host" }, &host, json!({}))?;
    tracing::info!(host, %status, "admin");
    Ok(Response::ok(json!({"hostname": host, "status": status.as_str()})))
}

/// A shard's consumer list older than this is a dead or removed shard's.
const CONSUMERS_STALE_SECS: u64 = 10;
/// Consumers listed in one answer (the shard proxy takes 4 MiB answers);
/// `total` says how many there are.
const CONSUMERS_LISTED_MAX: usize = 10_000;

/// Every shard's consumers, from the lists the shards publish each second
/// in `data_dir/run/shard-K.json`, with how far each is behind.
fn consumers(run_dir: &std::path::Path) -> Response {
    let (list, total, shards) = consumer_rows(run_dir);
    Response::ok(json!({"consumers": list, "total": total, "shardsReporting": shards}))
}

/// Every shard's consumers (at most [`CONSUMERS_LISTED_MAX`]), as JSON
/// objects.
pub(crate) fn consumer_list(run_dir: &std::path::Path) -> Vec<Value> {
    consumer_rows(run_dir).0
}

fn consumer_rows(run_dir: &std::path::Path) -> (Vec<Value>, usize, Vec<usize>) {
    let mut list = Vec::new();
    let mut shards = Vec::new();
    let mut total = 0usize;
    for s in sluice_common::process::consumers::read_snapshots(run_dir, CONSUMERS_STALE_SECS) {
        shards.push(s.shard);
        for c in &s.consumers {
            total += 1;
            if list.len() == CONSUMERS_LISTED_MAX {
                continue;
            }
            list.push(s.consumer_json(c));
        }
    }
    shards.sort_unstable();
    (list, total, shards)
}

/// Close an upstream connection: the host goes `idle` (not crawled) until
/// it asks again with requestCrawl. A banned host stays banned.
fn disconnect(c: &mut Client, req: &Request) -> Result<Response, postgres::Error> {
    let Some(host) = body_field(req, "hostname") else {
        return Ok(error(400, "InvalidRequest", "body must be {\"hostname\": ...}"));
    };
    let Some(status) = crate::db::host_status_by_name(c, &host)? else {
        return Ok(error(400, "HostNotFound", "unknown host"));
    };
    if status == HostStatus::Banned {
        return Ok(error(400, "HostBanned", "host is banned; unban it first"));
    }
    crate::db::set_host_status(c, &host, HostStatus::Idle)?;
    audit(c, "disconnect_host", &host, json!({}))?;
    tracing::info!(host, "admin: host disconnected until its next requestCrawl");
    Ok(Response::ok(json!({"hostname": host, "status": HostStatus::Idle.as_str()})))
}

/// Open requestCrawl to the public or make it admin-only; kept in Postgres
/// over restarts (over the config's `public_request_crawl`).
fn set_request_crawl(c: &mut Client, req: &Request) -> Result<Response, postgres::Error> {
    let Some(open) = serde_json::from_slice::<Value>(&req.body).ok().and_then(|v| v.get("public")?.as_bool()) else {
        return Ok(error(400, "InvalidRequest", "body must be {\"public\": true|false}"));
    };
    crate::db::set_request_crawl(c, open)?;
    audit(c, "request_crawl", if open { "public" } else { "admin-only" }, json!({}))?;
    tracing::info!(public = open, "admin: requestCrawl");
    Ok(Response::ok(json!({"public": open})))
}

/// Ban a domain: requestCrawl and bootstrap refuse it and its subdomains,
/// and the hosts under it now are banned. Unbanning lifts the ban for new
/// crawls; hosts banned with it are unbanned one by one.
pub(crate) fn ban_domain(c: &mut Client, req: &Request, ban: bool) -> Result<Response, postgres::Error> {
    let Some(domain) = body_field(req, "domain").map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase()) else {
        return Ok(error(400, "InvalidRequest", "body must be {\"domain\": ...}"));
    };
    if domain.is_empty() || domain.contains(['/', ':', '%', '_', ' ']) {
        return Ok(error(400, "InvalidRequest", "not a domain name"));
    }
    let hosts =
        if ban { crate::db::ban_domain(c, &domain)? } else { crate::db::unban_domain(c, &domain).map(|()| 0)? };
    audit(c, if ban { "ban_domain" } else { "unban_domain" }, &domain, json!({ "hosts_banned": hosts }))?;
    tracing::info!(domain, ban, hosts, "admin: domain");
    Ok(Response::ok(json!({"domain": domain, "banned": ban, "hostsBanned": hosts})))
}

pub(crate) fn limit(c: &mut Client, req: &Request) -> Result<Response, postgres::Error> {
    let v: Value = serde_json::from_slice(&req.body).unwrap_or_default();
    let (Some(host), Some(limit)) = (v["hostname"].as_str(), v["limit"].as_i64()) else {
        return Ok(error(400, "InvalidRequest", "body must be {\"hostname\": ..., \"limit\": N}"));
    };
    if limit < 0 {
        return Ok(error(400, "InvalidRequest", "limit must be >= 0"));
    }
    if !crate::db::set_account_limit(c, host, limit)? {
        return Ok(error(400, "HostNotFound", "unknown host"));
    }
    audit(c, "host_account_limit", host, json!({ "limit": limit }))?;
    tracing::info!(host, limit, "admin: host account limit");
    Ok(Response::ok(json!({"hostname": host, "accountLimit": limit})))
}

fn hosts(c: &mut Client, limits: &HostLimits) -> Result<Response, postgres::Error> {
    let list: Vec<Value> = crate::db::host_list(c)?
        .into_iter()
        .map(|h| {
            let (limit, trusted) = h.limit(limits);
            json!({"hostname": h.hostname, "status": h.status.as_str(), "seq": h.cursor, "accountCount": h.account_count,
                   "insecure": h.insecure, "accountLimit": limit, "trusted": trusted})
        })
        .collect();
    Ok(Response::ok(json!({ "hosts": list })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::authorized;
    use base64::Engine;

    fn req(auth: Option<&str>) -> Request {
        Request {
            method: "GET".into(),
            path: "/admin/hosts".into(),
            query: vec![],
            body: vec![],
            authorization: auth.map(str::to_owned),
            peer: None,
        }
    }

    #[test]
    fn auth_schemes() {
        assert!(authorized(&req(Some("Bearer s3cret")), "s3cret"));
        assert!(!authorized(&req(Some("Bearer s3cre")), "s3cret"));
        assert!(!authorized(&req(None), "s3cret"));
        let basic = base64::engine::general_purpose::STANDARD.encode("admin:s3cret");
        assert!(authorized(&req(Some(&format!("Basic {basic}"))), "s3cret"));
        let other = base64::engine::general_purpose::STANDARD.encode("root:s3cret");
        assert!(!authorized(&req(Some(&format!("Basic {other}"))), "s3cret"));
        assert!(!authorized(&req(Some("Basic !!!")), "s3cret"));
    }

    #[test]
    fn consumer_lists_merge_fresh_shards_only() {
        use sluice_common::process::consumers::{snapshot_path, ConsumerInfo, Snapshot};
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let info =
            |last_seq| ConsumerInfo { remote: "127.0.0.1:9".into(), since: now, cursor: None, last_seq, frames: 3 };
        let write = |shard, at, consumers| {
            let s = Snapshot { shard, at, committed: 100, consumers, hosts: Vec::new(), other_hosts: None };
            std::fs::write(snapshot_path(dir.path(), shard), serde_json::to_vec(&s).unwrap()).unwrap();
        };
        write(0, now, vec![info(90), info(0)]);
        write(1, now - 60, vec![info(50)]); // a shard that stopped reporting
        std::fs::write(dir.path().join("shard-2.json"), b"{not json").unwrap();
        let r = consumers(dir.path());
        assert_eq!(r.body["shardsReporting"], json!([0]));
        assert_eq!(r.body["total"], 2);
        let lags: Vec<i64> =
            r.body["consumers"].as_array().unwrap().iter().map(|c| c["lag"].as_i64().unwrap()).collect();
        assert_eq!(lags, [10, 100]);
    }
}
