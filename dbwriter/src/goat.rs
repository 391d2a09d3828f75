//! The Go relay's admin API, as `goat relay admin` and its admin page call
//! it (indigo `cmd/relay`), served next to sluice's own `/admin/...`
//! routes: same paths, methods, parameters, bodies and answer shapes. Each
//! route translates to sluice's own action, so both APIs act alike and
//! are audited alike. Auth is the admin API's (Basic `admin:<password>` or
//! `Bearer <password>`), checked before these routes are reached.
//!
//! | path | sluice's action |
//! |---|---|
//! | `POST /admin/repo/takeDown` `{did}` | takedown |
//! | `POST /admin/repo/reverseTakedown` `{did}` | reverse takedown (sluice's path too) |
//! | `GET /admin/repo/takedowns?cursor=&size=` | `{"dids", "cursor"?}`, cursor a string |
//! | `POST /admin/pds/requestCrawl` `{hostname}` | requestCrawl with admin rights |
//! | `POST /admin/pds/block?host=`, `/unblock?host=` | host ban, unban |
//! | `GET /admin/pds/list` | array of host objects (indigo's field names) |
//! | `POST /admin/pds/changeLimits` `{host, repo_limit}` | host account limit |
//! | `POST /admin/subs/banDomain`, `/unbanDomain` `{domain}` | domain ban, unban |
//! | `GET /admin/subs/listDomainBans` | `{"banned_domains": [...]}` |
//! | `GET /admin/consumers/list` | array of consumer objects |
//!
//! Actions answer `{"success": "true"}` (with sluice's own fields) when
//! they succeed, sluice's XRPC error otherwise.

use crate::api::{error, QueryConfig, Request, Response};
use postgres::Client;
use serde_json::{json, Value};
use sluice_common::process::host::HostStatus;

/// Handle a Go-relay admin route; `None` if `req` is not one.
pub fn route(c: &mut Client, cfg: &QueryConfig, req: &Request) -> Option<Result<Response, postgres::Error>> {
    let with = |body: Value| Request { body: body.to_string().into_bytes(), ..req.clone() };
    let query_host = || crate::api::param(req, "host").map(|h| h.trim().to_owned());
    Some(match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/admin/repo/takeDown") => crate::admin::takedown(c, &cfg.admin, req, true).map(success),
        ("POST", "/admin/repo/reverseTakedown") => crate::admin::takedown(c, &cfg.admin, req, false).map(success),
        ("GET", "/admin/repo/takedowns") => takedowns(c, req),
        ("POST", "/admin/pds/requestCrawl") => crate::query::request_crawl(c, cfg, req).map(success),
        ("POST", "/admin/pds/block" | "/admin/pds/unblock") => match query_host() {
            Some(h) => crate::admin::ban(c, &with(json!({ "hostname": h })), req.path.ends_with("/block")).map(success),
            None => Ok(error(400, "InvalidRequest", "must pass a valid hostname (?host=)")),
        },
        ("GET", "/admin/pds/list") => pds_list(c, &cfg.live().limits),
        ("POST", "/admin/pds/changeLimits") => {
            let v: Value = serde_json::from_slice(&req.body).unwrap_or_default();
            match (v["host"].as_str(), v["repo_limit"].as_i64()) {
                (Some(h), Some(l)) => crate::admin::limit(c, &with(json!({"hostname": h, "limit": l}))).map(success),
                (None, _) => Ok(error(400, "InvalidRequest", "invalid hostname")),
                (_, None) => Ok(error(400, "InvalidRequest", "missing repo_limit parameter")),
            }
        }
        ("POST", "/admin/subs/banDomain") => crate::admin::ban_domain(c, req, true).map(success),
        ("POST", "/admin/subs/unbanDomain") => crate::admin::ban_domain(c, req, false).map(success),
        ("GET", "/admin/subs/listDomainBans") => {
            crate::db::domain_bans(c).map(|d| Response::ok(json!({ "banned_domains": d })))
        }
        ("GET", "/admin/consumers/list") => Ok(consumers(cfg)),
        _ => return None,
    })
}

/// A 200 gets `"success": "true"` (what the Go relay answers); anything
/// else stays as it is.
fn success(mut r: Response) -> Response {
    if r.status == 200 {
        match r.body.as_object_mut() {
            Some(m) => {
                m.insert("success".into(), json!("true"));
            }
            None => r.body = json!({"success": "true"}),
        }
    }
    r
}

/// Taken-down accounts, `size` (1..=1000, default 500) after `cursor` (the
/// last DID of the previous page; a string, which goat expects).
fn takedowns(c: &mut Client, req: &Request) -> Result<Response, postgres::Error> {
    let size: i64 = crate::api::param(req, "size").and_then(|s| s.parse().ok()).unwrap_or(500).clamp(1, 1000);
    let after = crate::api::param(req, "cursor").unwrap_or("");
    let dids = crate::db::takedowns(c, after, size)?;
    let mut body = json!({ "dids": dids });
    if dids.len() as i64 == size {
        body["cursor"] = json!(dids.last());
    }
    Ok(Response::ok(body))
}

/// Hosts with the Go relay's field names. Rate limits sluice does not keep
/// per host are `-1`, as the Go relay reports for an unconnected host.
fn pds_list(c: &mut Client, limits: &sluice_common::process::host::HostLimits) -> Result<Response, postgres::Error> {
    let rate = |window: u32| json!({"Max": -1.0, "Window": window});
    let hosts: Vec<Value> = crate::db::host_list(c)?
        .into_iter()
        .map(|h| {
            let (limit, trusted) = h.limit(limits);
            json!({
                "ID": h.id, "CreatedAt": h.created_at, "Host": h.hostname, "SSL": !h.insecure,
                "Cursor": h.cursor, "Registered": h.status == HostStatus::Active, "Blocked": h.status == HostStatus::Banned,
                "CrawlRateLimit": -1.0, "RepoCount": h.account_count, "RepoLimit": limit, "Trusted": trusted,
                "HasActiveConnection": h.status == HostStatus::Active, "EventsSeenSinceStartup": 0,
                "PerSecondEventRate": rate(1), "PerHourEventRate": rate(3600), "PerDayEventRate": rate(86_400),
                "UserCount": h.account_count, "Status": h.status.as_str(),
            })
        })
        .collect();
    Ok(Response::ok(Value::Array(hosts)))
}

/// Consumers with the Go relay's field names (and sluice's own).
fn consumers(cfg: &QueryConfig) -> Response {
    let list: Vec<Value> = crate::admin::consumer_list(&cfg.run_dir)
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let connected =
                c["since"].as_i64().map(|s| sluice_common::atproto::syntax::format_datetime_micros(s * 1_000_000));
            c["id"] = json!(i + 1);
            c["remote_addr"] = c["remote"].clone();
            c["user_agent"] = json!("");
            c["events_consumed"] = c["frames"].clone();
            c["connected_at"] = json!(connected);
            c
        })
        .collect();
    Response::ok(Value::Array(list))
}
