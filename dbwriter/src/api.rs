//! The query workers' HTTP plumbing, shared by the public endpoints
//! (`query`), the admin API (`admin`, `goat`) and the worker pool
//! (`serve`): the request and response types, the configuration the
//! workers share (with what a reload replaces), admin authentication. It
//! imports none of them.

use serde_json::{json, Value};
use std::sync::Arc;

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
    /// Trusted hosts and each kind's limits, for the host listings.
    pub limits: sluice_common::process::host::HostLimits,
    /// requestCrawl without admin credentials, unless the admin API set it
    /// otherwise (`relay_meta.request_crawl`).
    pub public_request_crawl: bool,
    /// The admin password (None: admin API disabled).
    pub admin_password: Option<String>,
}

impl Live {
    /// From the config; reads `admin_password_file`.
    pub fn from_config(cfg: &sluice_common::process::config::Config) -> anyhow::Result<Live> {
        let admin_password = match &cfg.admin_password_file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("admin_password_file {}: {e}", p.display()))?
                .trim()
                .to_owned(),
            None => String::new(),
        };
        Ok(Live {
            new_hosts_per_day_max: cfg.limits.new_hosts_per_day_max as i64,
            limits: cfg.host_limits(),
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
    /// The collection index, for listReposByCollection.
    pub collections: crate::collections::Shared,
    /// `data_dir/run`, where the shards publish their consumer lists.
    pub run_dir: std::path::PathBuf,
    /// To the sequencer, for admin actions that emit events.
    pub admin: std::sync::mpsc::SyncSender<crate::messages::Command>,
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

pub use sluice_common::process::http::{percent_decode, split_target};

pub(crate) fn param<'a>(req: &'a Request, k: &str) -> Option<&'a str> {
    req.query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

/// Does `req` carry the admin credentials (and is the admin API enabled)?
pub fn is_admin(req: &Request, password: Option<&str>) -> bool {
    password.is_some_and(|p| authorized(req, p))
}

pub(crate) fn authorized(req: &Request, password: &str) -> bool {
    use base64::Engine;
    let Some(h) = req.authorization.as_deref() else { return false };
    let given = if let Some(t) = h.strip_prefix("Bearer ") {
        t.trim().to_owned()
    } else if let Some(b) = h.strip_prefix("Basic ") {
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b.trim()) else { return false };
        match String::from_utf8_lossy(&raw).split_once(':') {
            Some(("admin", p)) => p.to_owned(),
            _ => return false,
        }
    } else {
        return false;
    };
    // Length-independent comparison of the bytes.
    let (a, b) = (given.as_bytes(), password.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Check an admin request's credentials (with the failure throttle):
/// `Err` is the answer to send instead.
pub fn authenticate(cfg: &QueryConfig, req: &Request) -> Result<(), Response> {
    let live = cfg.live();
    let Some(password) = live.admin_password.as_deref() else {
        return Err(error(403, "AdminDisabled", "set admin_password_file to enable the admin API"));
    };
    let throttle = &cfg.auth_throttle;
    let peer = req.peer.as_deref().unwrap_or("local");
    let now = std::time::Instant::now();
    if throttle.blocked(peer, now) {
        return Err(error(429, "TooManyRequests", "too many failed admin authentications; wait a minute"));
    }
    if !authorized(req, password) {
        let f = throttle.failed(peer, now);
        if f.log {
            tracing::warn!(peer, path = req.path, blocked = f.blocked, "admin authentication failed");
        }
        return Err(error(401, "Unauthorized", "admin credentials required"));
    }
    Ok(())
}
