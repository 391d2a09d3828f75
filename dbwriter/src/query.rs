//! Query workers: the XRPC endpoints other than subscribeRepos. Shards
//! forward such requests over the Unix socket `data_dir/run/query.sock`,
//! one request per connection (HTTP/1.1, `Connection: close`); a small pool
//! of threads, each with its own Postgres connection, answers them.
//!
//! Endpoints: `com.atproto.sync.requestCrawl` (POST), `listHosts`,
//! `getHostStatus`, `getRepoStatus`, `listRepos`, `getLatestCommit`, and
//! `getRepo` (a 302 to the account's PDS: the relay keeps no repositories),
//! and `GET /status.json` (the status page's data, written by the
//! supervisor); anything else is a 404 XRPC error.

use postgres::Client;
use serde_json::{json, Value};
use sluice_common::identity::PdsHost;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Requests above this are refused (headers + body).
pub const REQUEST_BYTES_MAX: usize = 64 * 1024;
/// Connections waiting for a worker.
const QUEUE_MAX: usize = 256;

pub struct Response {
    pub status: u16,
    pub body: Value,
    /// `Location` of a redirect (getRepo sends clients to the PDS).
    pub location: Option<String>,
}

impl Response {
    pub fn ok(body: Value) -> Response {
        Response { status: 200, body, location: None }
    }

    pub fn redirect(url: String) -> Response {
        Response { status: 302, body: json!({}), location: Some(url) }
    }
}

/// An XRPC error answer (the admin API's too).
pub(crate) fn error(status: u16, name: &str, message: &str) -> Response {
    Response { status, body: json!({"error": name, "message": message}), location: None }
}

/// What the query workers take from a reload, in place.
#[derive(Debug, Clone, PartialEq)]
pub struct Live {
    /// New hosts requestCrawl accepts per 24 hours.
    pub new_hosts_per_day_max: i64,
    /// account_limit of hosts added by requestCrawl.
    pub host_account_limit_default: i64,
    /// requestCrawl without admin credentials, unless the admin API set it
    /// otherwise (`relay_meta.request_crawl`).
    pub public_request_crawl: bool,
    /// The admin password (None: admin API disabled).
    pub admin_password: Option<String>,
}

impl Live {
    /// From the config; reads `admin_password_file`.
    pub fn from_config(cfg: &sluice_common::config::Config) -> anyhow::Result<Live> {
        let admin_password = match &cfg.admin_password_file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("admin_password_file {}: {e}", p.display()))?
                .trim()
                .to_owned(),
            None => String::new(),
        };
        Ok(Live {
            new_hosts_per_day_max: cfg.limits.new_hosts_per_day_max as i64,
            host_account_limit_default: cfg.limits.host_account_limit_default.min(i64::MAX as u64) as i64,
            public_request_crawl: cfg.public_request_crawl,
            admin_password: Some(admin_password).filter(|p| !p.is_empty()),
        })
    }
}

pub struct QueryConfig {
    pub database_url: String,
    pub allow_insecure_hosts: bool,
    pub workers: usize,
    /// Replaced by a reload; read per request.
    pub live: Arc<std::sync::RwLock<Live>>,
    /// `data_dir/run`, where the shards publish their consumer lists.
    pub run_dir: std::path::PathBuf,
    /// To the sequencer, for admin actions that emit events.
    pub admin: std::sync::mpsc::SyncSender<crate::admin::Command>,
    /// DNS and HTTP for requestCrawl's admission checks.
    pub net: Arc<dyn crate::admission::Net>,
    /// Failed admin authentications per client address.
    pub auth_throttle: crate::throttle::AuthThrottle,
}

impl QueryConfig {
    /// The settings now (a reload may have replaced them).
    pub fn live(&self) -> Live {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Start the listener and the workers; they run until `stop`.
pub fn start(
    socket: &Path,
    cfg: QueryConfig,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    listener.set_nonblocking(true)?;
    let (tx, rx) = flume_like::channel(QUEUE_MAX);
    let mut handles = Vec::new();
    let cfg = Arc::new(cfg);
    for i in 0..cfg.workers.max(1) {
        let rx = rx.clone();
        let cfg = cfg.clone();
        let stop = stop.clone();
        handles.push(std::thread::Builder::new().name(format!("query-{i}")).spawn(move || {
            let mut pg: Option<Client> = None;
            while !stop.load(Ordering::Acquire) {
                let Some(mut s) = rx.recv_timeout(Duration::from_millis(200)) else { continue };
                if pg.as_mut().is_none_or(|c| c.is_closed()) {
                    pg = crate::db::connect(&cfg.database_url)
                        .map_err(|e| tracing::error!(error = %e, "query worker cannot reach Postgres"))
                        .ok();
                }
                let resp = match read_request(&mut s) {
                    Ok(req) => match pg.as_mut() {
                        Some(c) => handle(c, &cfg, &req),
                        None => error(503, "Unavailable", "database unavailable"),
                    },
                    Err(e) => error(400, "InvalidRequest", &e),
                };
                let _ = write_response(&mut s, &resp);
            }
        })?);
    }
    handles.push(std::thread::Builder::new().name("query-accept".into()).spawn(move || {
        while !stop.load(Ordering::Acquire) {
            match listener.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
                    if let Err(mut s) = tx.try_send(s) {
                        let _ = write_response(&mut s, &error(503, "Busy", "too many requests in flight"));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => {
                    tracing::warn!(error = %e, "query socket accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    })?);
    Ok(handles)
}

/// A bounded MPMC queue from std parts (the pool is small; contention is
/// irrelevant).
mod flume_like {
    use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    pub struct Tx<T>(SyncSender<T>);
    pub struct Rx<T>(Arc<Mutex<Receiver<T>>>);
    impl<T> Clone for Rx<T> {
        fn clone(&self) -> Self {
            Rx(self.0.clone())
        }
    }
    pub fn channel<T>(n: usize) -> (Tx<T>, Rx<T>) {
        let (t, r) = sync_channel(n);
        (Tx(t), Rx(Arc::new(Mutex::new(r))))
    }
    impl<T> Tx<T> {
        pub fn try_send(&self, v: T) -> Result<(), T> {
            self.0.try_send(v).map_err(|e| match e {
                TrySendError::Full(v) | TrySendError::Disconnected(v) => v,
            })
        }
    }
    impl<T> Rx<T> {
        pub fn recv_timeout(&self, d: Duration) -> Option<T> {
            self.0.lock().ok()?.recv_timeout(d).ok()
        }
    }
}

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub authorization: Option<String>,
    /// The client's address (from the forwarding shard), for throttling.
    pub peer: Option<String>,
}

fn read_request(s: &mut UnixStream) -> Result<Request, String> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed mid-request".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let h = match sluice_common::http::parse_request_head(&buf, REQUEST_BYTES_MAX) {
            Ok(Some(h)) => h,
            Ok(None) => continue,
            Err(e) => return Err(format!("bad request: {e}")),
        };
        let (head, len) = (h.head_len, h.content_length.min(REQUEST_BYTES_MAX as u64 + 1) as usize);
        if head + len > REQUEST_BYTES_MAX {
            return Err("request too large".into());
        }
        while buf.len() < head + len {
            let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed mid-body".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let (path, query) = split_target(&h.target);
        let body = buf[head..head + len].to_vec();
        return Ok(Request { method: h.method, path, query, body, authorization: h.authorization, peer: h.peer });
    }
}

pub fn split_target(target: &str) -> (String, Vec<(String, String)>) {
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    (path.to_owned(), query)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn write_response(s: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let body = serde_json::to_vec(&r.body).expect("JSON values serialise");
    let reason = match r.status {
        200 => "OK",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        400 => "Bad Request",
        404 => "Not Found",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let location = r.location.as_ref().map(|l| format!("location: {l}\r\n")).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {} {reason}\r\n{location}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        r.status,
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(&body)?;
    s.flush()
}

pub(crate) fn param<'a>(req: &'a Request, k: &str) -> Option<&'a str> {
    req.query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

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
        Some(d) if sluice_common::syntax::is_did(d) => Ok(d),
        Some(_) => Err(error(400, "InvalidRequest", "did is not a valid DID")),
    }
}

pub fn handle(c: &mut Client, cfg: &QueryConfig, req: &Request) -> Response {
    if let Some(r) = crate::admin::handle(c, cfg, req) {
        return r.unwrap_or_else(|e| {
            tracing::error!(path = req.path, error = %e, "admin action failed");
            error(500, "InternalServerError", "internal error")
        });
    }
    let r = match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/xrpc/com.atproto.sync.requestCrawl") => request_crawl(c, cfg, req),
        ("GET", "/xrpc/com.atproto.sync.listHosts") => list_hosts(c, req),
        ("GET", "/xrpc/com.atproto.sync.getHostStatus") => host_status(c, req),
        ("GET", "/xrpc/com.atproto.sync.getRepoStatus") => repo_status(c, req),
        ("GET", "/xrpc/com.atproto.sync.listRepos") => list_repos(c, req),
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
    let public: Option<bool> = c.query_one("SELECT request_crawl FROM relay_meta WHERE id = 1", &[])?.get(0);
    let live = cfg.live();
    if !public.unwrap_or(live.public_request_crawl) && !crate::admin::is_admin(req, live.admin_password.as_deref()) {
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
    let status: Option<String> =
        c.query_opt("SELECT status FROM hosts WHERE hostname = $1", &[&host.name])?.map(|r| r.get(0));
    if status.as_deref() == Some("banned") || crate::db::domain_banned(c, host.hostname())? {
        return Ok(error(400, "HostBanned", "host is banned"));
    }
    if status.is_none() {
        let recent: i64 =
            c.query_one("SELECT count(*) FROM hosts WHERE created_at > now() - interval '1 day'", &[])?.get(0);
        if recent >= live.new_hosts_per_day_max {
            tracing::warn!(host = host.name, recent, "requestCrawl refused: new hosts per day at the limit");
            return Ok(error(429, "TooManyNewHosts", "the relay takes no more new hosts today"));
        }
    }
    // Before anything is stored: its addresses, and that it is a PDS.
    if status.as_deref() != Some("active") {
        if let Err(why) = crate::admission::check_network(&host, cfg.allow_insecure_hosts, cfg.net.as_ref()) {
            return Ok(refused(why));
        }
    }
    let new = crate::db::add_host(c, &host, live.host_account_limit_default)?;
    if new {
        tracing::info!(host = host.name, "new host from requestCrawl");
    } else if matches!(status.as_deref(), Some("idle" | "offline")) {
        // A host an admin disconnected, or one that was unreachable, asks
        // again (and answered describeServer above): crawl it again, its
        // shard restarting the task with the backoff reset.
        if crate::db::recrawl_host(c, &host.name)? {
            tracing::info!(host = host.name, was = status.as_deref(), "host back from requestCrawl");
        }
    }
    Ok(Response::ok(json!({})))
}

/// The host a requestCrawl names, checked by name only (no lookups): the
/// first step of [`crate::admission::admit`]; bootstrap uses it for the
/// names another relay lists (the shards check addresses before dialing).
pub fn crawl_target(raw: &str, allow_insecure: bool) -> Result<PdsHost, String> {
    crate::admission::parse_target(raw, allow_insecure).map_err(|e| e.to_string())
}

fn list_hosts(c: &mut Client, req: &Request) -> Result<Response, postgres::Error> {
    let limit: i64 = param(req, "limit").and_then(|l| l.parse().ok()).unwrap_or(200).clamp(1, 1000);
    let cursor: i64 = param(req, "cursor").and_then(|l| l.parse().ok()).unwrap_or(0);
    let rows = c.query(
        "SELECT id, hostname, cursor, account_count, status FROM hosts WHERE id > $1 ORDER BY id LIMIT $2",
        &[&cursor, &limit],
    )?;
    let hosts: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({"hostname": r.get::<_, String>(1), "seq": r.get::<_, i64>(2),
                   "accountCount": r.get::<_, i64>(3), "status": r.get::<_, String>(4)})
        })
        .collect();
    let mut body = json!({ "hosts": hosts });
    if rows.len() as i64 == limit {
        body["cursor"] = json!(rows.last().map(|r| r.get::<_, i64>(0).to_string()));
    }
    Ok(Response::ok(body))
}

fn host_status(c: &mut Client, req: &Request) -> Result<Response, postgres::Error> {
    let Some(h) = param(req, "hostname") else {
        return Ok(error(400, "InvalidRequest", "missing hostname"));
    };
    let rows = c.query("SELECT hostname, cursor, account_count, status FROM hosts WHERE hostname = $1", &[&h])?;
    Ok(match rows.first() {
        None => error(400, "HostNotFound", "unknown host"),
        Some(r) => Response::ok(json!({"hostname": r.get::<_, String>(0), "seq": r.get::<_, i64>(1),
                                       "accountCount": r.get::<_, i64>(2), "status": r.get::<_, String>(3)})),
    })
}

fn repo_status(c: &mut Client, req: &Request) -> Result<Response, postgres::Error> {
    let did = match did_param(req) {
        Ok(d) => d,
        Err(r) => return Ok(r),
    };
    let rows = c.query("SELECT status, rev FROM accounts WHERE did = $1", &[&did])?;
    Ok(match rows.first() {
        None => error(400, "RepoNotFound", "unknown repo"),
        Some(r) => {
            // `rev` is optional in the lexicon: omitted, not null, before a commit.
            let mut body = json!({"did": did});
            if let Some(rev) = r.get::<_, Option<String>>(1) {
                body["rev"] = json!(rev);
            }
            Response::ok(with_status(body, &r.get::<_, String>(0)))
        }
    })
}

/// `active` and, when not active, `status`, as the sync lexicons put them.
fn with_status(mut body: Value, status: &str) -> Value {
    body["active"] = json!(status == "active");
    if status != "active" {
        body["status"] = json!(status);
    }
    body
}

fn cid_string(bytes: Option<Vec<u8>>) -> Option<String> {
    bytes.and_then(|b| sluice_common::cid::Cid::from_bytes(&b).ok()).map(|c| c.to_string())
}

/// Accounts with a commit, by DID; `cursor` is the last DID of a page.
fn list_repos(c: &mut Client, req: &Request) -> Result<Response, postgres::Error> {
    let limit: i64 = param(req, "limit").and_then(|l| l.parse().ok()).unwrap_or(500).clamp(1, 1000);
    let cursor = param(req, "cursor").unwrap_or("");
    let rows = c.query(
        "SELECT did, commit_cid, rev, status FROM accounts
         WHERE did > $1 AND commit_cid IS NOT NULL AND rev IS NOT NULL ORDER BY did LIMIT $2",
        &[&cursor, &limit],
    )?;
    let repos: Vec<Value> = rows
        .iter()
        .filter_map(|r| {
            let head = cid_string(r.get(1))?;
            let body = json!({"did": r.get::<_, String>(0), "head": head, "rev": r.get::<_, String>(2)});
            Some(with_status(body, &r.get::<_, String>(3)))
        })
        .collect();
    let mut body = json!({ "repos": repos });
    if rows.len() as i64 == limit {
        body["cursor"] = json!(rows.last().map(|r| r.get::<_, String>(0)));
    }
    Ok(Response::ok(body))
}

/// Where the relay's stored state of `did` stops a read: the lexicons'
/// errors for accounts that are not active.
fn inactive(status: &str) -> Option<Response> {
    match status {
        "takendown" => Some(error(400, "RepoTakendown", "repo has been taken down")),
        "suspended" => Some(error(400, "RepoSuspended", "repo is suspended")),
        "deactivated" => Some(error(400, "RepoDeactivated", "repo is deactivated")),
        "deleted" => Some(error(400, "RepoNotFound", "repo was deleted")),
        _ => None,
    }
}

fn latest_commit(c: &mut Client, req: &Request) -> Result<Response, postgres::Error> {
    let did = match did_param(req) {
        Ok(d) => d,
        Err(r) => return Ok(r),
    };
    let Some(r) = c.query_opt("SELECT commit_cid, rev, status FROM accounts WHERE did = $1", &[&did])? else {
        return Ok(error(400, "RepoNotFound", "unknown repo"));
    };
    if let Some(refused) = inactive(&r.get::<_, String>(2)) {
        return Ok(refused);
    }
    Ok(match (cid_string(r.get(0)), r.get::<_, Option<String>>(1)) {
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
    let row = c.query_opt(
        "SELECT a.status, h.hostname, h.insecure FROM accounts a JOIN hosts h ON h.id = a.host_id WHERE a.did = $1",
        &[&did],
    )?;
    let Some(r) = row else {
        return Ok(error(400, "RepoNotFound", "unknown repo"));
    };
    if let Some(refused) = inactive(&r.get::<_, String>(0)) {
        return Ok(refused);
    }
    let scheme = if r.get::<_, bool>(2) { "http" } else { "https" };
    let query: Vec<String> = req
        .query
        .iter()
        .filter(|(k, _)| k == "did" || k == "since")
        .map(|(k, v)| format!("{k}={}", percent_encode(v)))
        .collect();
    Ok(Response::redirect(format!(
        "{scheme}://{}/xrpc/com.atproto.sync.getRepo?{}",
        r.get::<_, String>(1),
        query.join("&")
    )))
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

    #[test]
    fn requests_split_at_every_byte_parse_the_same() {
        let body = "{\"hostname\":\"pds.example.com\"}";
        let req = format!(
            "POST /xrpc/com.atproto.sync.requestCrawl?x=1 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer pw\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        for cut in 1..req.len() {
            let (mut a, mut b) = UnixStream::pair().unwrap();
            let bytes = req.clone().into_bytes();
            let writer = std::thread::spawn(move || {
                a.write_all(&bytes[..cut]).unwrap();
                std::thread::sleep(Duration::from_micros(200));
                a.write_all(&bytes[cut..]).unwrap();
            });
            let r = read_request(&mut b).unwrap_or_else(|e| panic!("split at {cut}: {e}"));
            writer.join().unwrap();
            assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/xrpc/com.atproto.sync.requestCrawl"), "{cut}");
            assert_eq!(r.query, vec![("x".to_owned(), "1".to_owned())], "{cut}");
            assert_eq!(r.authorization.as_deref(), Some("Bearer pw"), "{cut}");
            assert_eq!(r.body, body.as_bytes(), "split at {cut}");
        }
    }

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
