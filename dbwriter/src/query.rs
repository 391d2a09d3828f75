//! The public endpoints: the XRPC methods other than subscribeRepos, which
//! the shards forward to the query workers (`serve`).
//!
//! Endpoints: `com.atproto.sync.requestCrawl` (POST), `listHosts`,
//! `getHostStatus`, `getRepoStatus`, `listRepos`, `getLatestCommit`, and
//! `getRepo` (a 302 to the account's PDS: the relay keeps no repositories),
//! and `GET /status.json` (the status page's data, written by the
//! supervisor); anything else is a 404 XRPC error.

use crate::api::{error, param, QueryConfig, Request, Response};
use postgres::Client;
use serde_json::{json, Value};
use sluice_common::atproto::identity::PdsHost;
use sluice_common::atproto::policy::AccountStatus;
use sluice_common::process::host::{HostLimits, HostStatus};
use std::path::Path;

/// The status page's data, as the supervisor last wrote it (each second).
fn status(run_dir: &Path) -> Response {
    match std::fs::read(run_dir.join("status.json")).map(|b| serde_json::from_slice::<Value>(&b)) {
        Ok(Ok(v)) => Response::ok(v),
        _ => error(503, "Unavailable", "status not written yet"),
    }
}

/// The `did` parameter, present and a DID by its syntax (bad input is a
/// 400, never a query that fails).
fn did_param(req: &Request) -> Result<&str, Response> {
    match param(req, "did") {
        None => Err(error(400, "InvalidRequest", "missing did")),
        Some(d) if sluice_common::atproto::syntax::is_did(d) => Ok(d),
        Some(_) => Err(error(400, "InvalidRequest", "did is not a valid DID")),
    }
}

/// The public endpoints (the admin API is routed in `serve`).
pub fn handle(c: &mut Client, cfg: &QueryConfig, req: &Request) -> Response {
    let r = match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/xrpc/com.atproto.sync.requestCrawl") => request_crawl(c, cfg, req),
        ("GET", "/xrpc/com.atproto.sync.listHosts") => list_hosts(c, &cfg.live().limits, req),
        ("GET", "/xrpc/com.atproto.sync.getHostStatus") => host_status(c, &cfg.live().limits, req),
        ("GET", "/xrpc/com.atproto.sync.getRepoStatus") => repo_status(c, req),
        ("GET", "/xrpc/com.atproto.sync.listRepos") => list_repos(c, req),
        ("GET", "/xrpc/com.atproto.sync.listReposByCollection") => repos_by_collection(c, &cfg.collections, req),
        ("GET", "/xrpc/com.atproto.sync.getLatestCommit") => latest_commit(c, req),
        ("GET", "/xrpc/com.atproto.sync.getRepo") => get_repo(c, req),
        ("GET", "/status.json") => Ok(status(&cfg.run_dir)),
        (_, p) if p.starts_with("/xrpc/") => Ok(error(404, "MethodNotImplemented", "method not implemented")),
        _ => Ok(error(404, "NotFound", "not found")),
    };
    r.unwrap_or_else(|e| {
        tracing::error!(path = req.path, error = %e, "query failed");
        error(500, "InternalServerError", "internal error")
    })
}

pub(crate) fn request_crawl(c: &mut Client, cfg: &QueryConfig, req: &Request) -> Result<Response, postgres::Error> {
    let public = crate::db::request_crawl_override(c)?;
    let live = cfg.live();
    if !public.unwrap_or(live.public_request_crawl) && !crate::api::is_admin(req, live.admin_password.as_deref()) {
        return Ok(error(403, "Forbidden", "requestCrawl takes admin credentials on this relay"));
    }
    let Ok(v) = serde_json::from_slice::<Value>(&req.body) else {
        return Ok(error(400, "InvalidRequest", "body must be JSON {\"hostname\": ...}"));
    };
    let Some(raw) = v.get("hostname").and_then(|h| h.as_str()) else {
        return Ok(error(400, "InvalidRequest", "missing hostname"));
    };
    let refused = |why: crate::admission::Refusal| {
        tracing::info!(host = raw, why = %why, "requestCrawl refused");
        error(400, "InvalidRequest", &why.to_string())
    };
    let host = match crate::admission::parse_target(raw, cfg.allow_insecure_hosts) {
        Ok(h) => h,
        Err(why) => return Ok(refused(why)),
    };
    // None: a host the relay does not know yet.
    let status = crate::db::host_status_by_name(c, &host.name)?;
    if status == Some(HostStatus::Banned) || crate::db::domain_banned(c, host.hostname())? {
        return Ok(error(400, "HostBanned", "host is banned"));
    }
    if status.is_none() {
        let recent = crate::db::hosts_added_today(c)?;
        if recent >= live.new_hosts_per_day_max {
            tracing::warn!(host = host.name, recent, "requestCrawl refused: new hosts per day at the limit");
            return Ok(error(429, "TooManyNewHosts", "the relay takes no more new hosts today"));
        }
    }
    // Before anything is stored: its addresses, and that it is a PDS.
    if status != Some(HostStatus::Active) {
        if let Err(why) = crate::admission::check_network(&host, cfg.allow_insecure_hosts, cfg.net.as_ref()) {
            return Ok(refused(why));
        }
    }
    let new = crate::db::add_host(c, &host)?;
    if new {
        tracing::info!(host = host.name, "new host from requestCrawl");
    } else if matches!(status, Some(HostStatus::Idle | HostStatus::Offline)) {
        // A host an admin disconnected, or one that was unreachable, asks
        // again (and answered describeServer above): crawl it again, its
        // shard restarting the task with the backoff reset.
        if crate::db::recrawl_host(c, &host.name)? {
            tracing::info!(host = host.name, was = ?status, "host back from requestCrawl");
        }
    }
    Ok(Response::ok(json!({})))
}

/// The host a requestCrawl names, checked by name only (no lookups): the
/// first step of [`crate::admission::admit`]; bootstrap uses it for the
/// names another relay lists (the shards check addresses before dialing).
pub fn crawl_target(raw: &str, allow_insecure: bool) -> Result<PdsHost, crate::admission::Refusal> {
    crate::admission::parse_target(raw, allow_insecure)
}

fn list_hosts(c: &mut Client, limits: &HostLimits, req: &Request) -> Result<Response, postgres::Error> {
    let limit: i64 = param(req, "limit").and_then(|l| l.parse().ok()).unwrap_or(200).clamp(1, 1000);
    let cursor: i64 = param(req, "cursor").and_then(|l| l.parse().ok()).unwrap_or(0);
    let rows = crate::db::hosts_page(c, cursor, limit)?;
    let hosts: Vec<Value> = rows.iter().map(|h| host_json(h, limits)).collect();
    let mut body = json!({ "hosts": hosts });
    if rows.len() as i64 == limit {
        body["cursor"] = json!(rows.last().map(|r| r.id.to_string()));
    }
    Ok(Response::ok(body))
}

fn host_status(c: &mut Client, limits: &HostLimits, req: &Request) -> Result<Response, postgres::Error> {
    let Some(h) = param(req, "hostname") else {
        return Ok(error(400, "InvalidRequest", "missing hostname"));
    };
    Ok(match crate::db::host_by_name(c, h)? {
        None => error(400, "HostNotFound", "unknown host"),
        Some(r) => Response::ok(host_json(&r, limits)),
    })
}

fn repo_status(c: &mut Client, req: &Request) -> Result<Response, postgres::Error> {
    let did = match did_param(req) {
        Ok(d) => d,
        Err(r) => return Ok(r),
    };
    Ok(match crate::db::account_head(c, did)? {
        None => error(400, "RepoNotFound", "unknown repo"),
        Some(r) => {
            // `rev` is optional in the lexicon: omitted, not null, before a commit.
            let mut body = json!({"did": did});
            if let Some(rev) = r.rev {
                body["rev"] = json!(rev);
            }
            Response::ok(with_status(body, r.status))
        }
    })
}

/// A host as listHosts and getHostStatus answer it.
/// A host as listHosts and getHostStatus show it: the lexicon's fields,
/// and sluice's own `accountLimit` and `trusted` (an open object: clients
/// that do not know them skip them).
fn host_json(h: &crate::db::HostSummary, limits: &HostLimits) -> Value {
    let (limit, trusted) = h.limit(limits);
    json!({"hostname": h.hostname, "seq": h.cursor, "accountCount": h.account_count, "status": h.status.as_str(),
           "accountLimit": limit, "trusted": trusted})
}

/// `active` and, when not active, `status`, as the sync lexicons put them.
fn with_status(mut body: Value, status: AccountStatus) -> Value {
    let active = status == AccountStatus::Active;
    body["active"] = json!(active);
    if !active {
        body["status"] = json!(status.as_str());
    }
    body
}

fn cid_string(bytes: Option<Vec<u8>>) -> Option<String> {
    bytes.and_then(|b| sluice_common::atproto::cid::Cid::from_bytes(&b).ok()).map(|c| c.to_string())
}

/// Accounts with a commit, by DID; `cursor` is the last DID of a page.
fn list_repos(c: &mut Client, req: &Request) -> Result<Response, postgres::Error> {
    let limit: i64 = param(req, "limit").and_then(|l| l.parse().ok()).unwrap_or(500).clamp(1, 1000);
    let cursor = param(req, "cursor").unwrap_or("");
    let rows = crate::db::repos_page(c, cursor, limit)?;
    let repos: Vec<Value> = rows
        .iter()
        .filter_map(|r| {
            let head = cid_string(r.commit_cid.clone())?;
            let body = json!({"did": r.did, "head": head, "rev": r.rev});
            Some(with_status(body, r.status))
        })
        .collect();
    let mut body = json!({ "repos": repos });
    if rows.len() as i64 == limit {
        body["cursor"] = json!(rows.last().map(|r| r.did.clone()));
    }
    Ok(Response::ok(body))
}

/// `collection` parameters one request may repeat (atproto PR 4733).
pub const COLLECTIONS_PER_REQUEST_MAX: usize = 20;

/// The parameters of listReposByCollection, or the lexicon's error.
fn collection_params(req: &Request) -> Result<(Vec<&str>, usize, Option<u32>), Response> {
    let bad = |m: &str| error(400, "InvalidRequest", m);
    let cols: Vec<&str> = req.query.iter().filter(|(k, _)| k == "collection").map(|(_, v)| v.as_str()).collect();
    if cols.is_empty() {
        return Err(bad("missing collection"));
    }
    if cols.len() > COLLECTIONS_PER_REQUEST_MAX {
        return Err(bad("at most 20 collections a request"));
    }
    if let Some(c) = cols.iter().find(|c| !sluice_common::atproto::syntax::is_nsid(c)) {
        return Err(bad(&format!("collection {c:?} is not a valid NSID")));
    }
    let limit = match param(req, "limit") {
        None => 500,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=2000).contains(&n) => n,
            _ => return Err(bad("limit must be an integer from 1 to 2000")),
        },
    };
    let cursor = match param(req, "cursor") {
        None | Some("") => None,
        Some(c) => Some(c.parse::<u32>().map_err(|_| bad("invalid cursor"))?),
    };
    Ok((cols, limit, cursor))
}

/// Accounts holding records of any of the collections, in account-number
/// order (stable: a repo that holds records throughout a paging is on
/// exactly one page). The cursor is the last number a page looked at.
fn repos_by_collection(
    c: &mut Client,
    index: &crate::collections::Shared,
    req: &Request,
) -> Result<Response, postgres::Error> {
    let (cols, limit, mut after) = match collection_params(req) {
        Ok(p) => p,
        Err(r) => return Ok(r),
    };
    let ids: Vec<u32> = {
        let ix = index.read().unwrap_or_else(|p| p.into_inner());
        cols.iter().filter_map(|c| ix.id(c)).collect()
    };
    let mut repos: Vec<Value> = Vec::with_capacity(limit);
    // Accounts left out (inactive, or numbers without one) cost another
    // look; a few looks at most, then the page ends short with a cursor.
    for _ in 0..4 {
        let want = limit - repos.len();
        let nos = index.read().unwrap_or_else(|p| p.into_inner()).page(&ids, after, want);
        if nos.is_empty() {
            return Ok(Response::ok(json!({ "repos": repos })));
        }
        let found: std::collections::HashMap<u32, (String, AccountStatus)> =
            crate::db::accounts_by_no(c, &nos)?.into_iter().map(|(n, d, s)| (n, (d, s))).collect();
        for no in &nos {
            after = Some(*no);
            if let Some((did, status)) = found.get(no) {
                if inactive(*status).is_none() {
                    repos.push(json!({ "did": did }));
                }
            }
        }
        if nos.len() < want {
            return Ok(Response::ok(json!({ "repos": repos })));
        }
        if repos.len() == limit {
            break;
        }
    }
    Ok(Response::ok(json!({ "repos": repos, "cursor": after.map(|a| a.to_string()) })))
}

/// Where the relay's stored state of `did` stops a read: the lexicons'
/// errors for accounts that are not active.
fn inactive(status: AccountStatus) -> Option<Response> {
    match status {
        AccountStatus::Takendown => Some(error(400, "RepoTakendown", "repo has been taken down")),
        AccountStatus::Suspended => Some(error(400, "RepoSuspended", "repo is suspended")),
        AccountStatus::Deactivated => Some(error(400, "RepoDeactivated", "repo is deactivated")),
        AccountStatus::Deleted => Some(error(400, "RepoNotFound", "repo was deleted")),
        AccountStatus::Active | AccountStatus::Desynchronized | AccountStatus::Throttled => None,
    }
}

fn latest_commit(c: &mut Client, req: &Request) -> Result<Response, postgres::Error> {
    let did = match did_param(req) {
        Ok(d) => d,
        Err(r) => return Ok(r),
    };
    let Some(r) = crate::db::account_head(c, did)? else {
        return Ok(error(400, "RepoNotFound", "unknown repo"));
    };
    if let Some(refused) = inactive(r.status) {
        return Ok(refused);
    }
    Ok(match (cid_string(r.commit_cid), r.rev) {
        (Some(cid), Some(rev)) => Response::ok(json!({"cid": cid, "rev": rev})),
        _ => error(400, "RepoNotFound", "no commit of this repo seen yet"),
    })
}

/// The relay keeps no repositories: send the client to the account's PDS
/// with the same query (`did`, `since`).
fn get_repo(c: &mut Client, req: &Request) -> Result<Response, postgres::Error> {
    let did = match did_param(req) {
        Ok(d) => d,
        Err(r) => return Ok(r),
    };
    let Some((status, hostname, insecure)) = crate::db::account_host(c, did)? else {
        return Ok(error(400, "RepoNotFound", "unknown repo"));
    };
    if let Some(refused) = inactive(status) {
        return Ok(refused);
    }
    let scheme = if insecure { "http" } else { "https" };
    let query: Vec<String> = req
        .query
        .iter()
        .filter(|(k, _)| k == "did" || k == "since")
        .map(|(k, v)| format!("{k}={}", percent_encode(v)))
        .collect();
    Ok(Response::redirect(format!("{scheme}://{hostname}/xrpc/com.atproto.sync.getRepo?{}", query.join("&"))))
}

/// Query-component encoding: unreserved characters and `:` stay.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{percent_decode, split_target};

    #[test]
    fn percent_encoding_round_trips() {
        for s in ["did:plc:abc", "3kabc", "a b&c=d%/é"] {
            assert_eq!(percent_decode(&percent_encode(s)), s);
        }
        assert_eq!(percent_encode("did:web:x.example"), "did:web:x.example");
        assert_eq!(percent_encode("a&b"), "a%26b");
    }

    #[test]
    fn crawl_targets() {
        assert_eq!(crawl_target("pds.example.com", false).unwrap().name, "pds.example.com");
        assert_eq!(crawl_target("https://PDS.example.com/", false).unwrap().name, "pds.example.com");
        assert!(crawl_target("localhost:2583", false).is_err());
        assert!(crawl_target("127.0.0.1:2583", false).is_err());
        assert!(crawl_target("10.1.2.3", false).is_err());
        assert!(crawl_target("http://pds.example.com", false).is_err());
        let h = crawl_target("localhost:2583", true).unwrap();
        assert_eq!((h.name.as_str(), h.insecure), ("localhost:2583", true));
        let h = crawl_target("https://localhost:2583", true).unwrap();
        assert_eq!((h.name.as_str(), h.insecure), ("localhost:2583", false));
        assert!(!crawl_target("pds.example.com", false).unwrap().insecure);
        assert!(crawl_target("not a host", true).is_err());
        assert!(crawl_target("", true).is_err());
        assert!(crawl_target("user@pds.example.com", true).is_err());
    }

    #[test]
    fn targets_and_percent_decoding() {
        let (p, q) = split_target("/xrpc/x?did=did%3Aplc%3Aabc&limit=5&flag");
        assert_eq!(p, "/xrpc/x");
        assert_eq!(q[0], ("did".into(), "did:plc:abc".into()));
        assert_eq!(q[1], ("limit".into(), "5".into()));
        assert_eq!(q[2], ("flag".into(), "".into()));
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
