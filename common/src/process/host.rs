//! Upstream hosts as the processes exchange them: the status a host has
//! (stored in `hosts.status`, shown by listHosts/getHostStatus), and the
//! assignment the supervisor sends each shard (one JSON line per change on
//! the shard's assignment pipe).
//!
//! Status rules (ARCHITECTURE.md "Behaviours"):
//! - `active` and `offline` hosts are dialed; `offline` ones are those
//!   their shard could not reach for a while (it backs off up to an hour).
//! - `idle` hosts are not dialed until a requestCrawl (an admin
//!   disconnect, or `host_offline_idle_days` offline).
//! - `banned` hosts are never dialed; `throttled` is the lexicon's and is
//!   not used by sluice (account limits throttle accounts, not hosts).
//!
//! Limits ([`HostLimits`]): a host whose name matches a `trusted_hosts`
//! pattern (`*.host.bsky.network`: any name ending `.host.bsky.network`;
//! or a whole name) gets the trusted account limit and event rate; any
//! other host the default ones. A limit an operator set for one host
//! (`sluice admin limit`, goat's `changeLimits`) wins over both.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostStatus {
    Active,
    Idle,
    Offline,
    Throttled,
    Banned,
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a host status")]
pub struct UnknownStatus(pub String);

impl HostStatus {
    pub const ALL: [HostStatus; 5] =
        [HostStatus::Active, HostStatus::Idle, HostStatus::Offline, HostStatus::Throttled, HostStatus::Banned];

    /// The name stored in Postgres and shown in the API (the lexicon's
    /// `com.atproto.sync.defs#hostStatus` values).
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Active => "active",
            HostStatus::Idle => "idle",
            HostStatus::Offline => "offline",
            HostStatus::Throttled => "throttled",
            HostStatus::Banned => "banned",
        }
    }

    pub fn parse(s: &str) -> Result<HostStatus, UnknownStatus> {
        HostStatus::ALL.into_iter().find(|h| h.as_str() == s).ok_or_else(|| UnknownStatus(s.to_owned()))
    }

    /// Does a shard keep a connection to a host in this status?
    pub fn dialed(self) -> bool {
        matches!(self, HostStatus::Active | HostStatus::Offline)
    }
}

impl std::fmt::Display for HostStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which hosts are trusted, and the limits of trusted and other hosts
/// (from the config; a reload changes them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostLimits {
    /// Lower-case name patterns: `*.suffix` (any port), a whole name (any
    /// port) or `name:port` (that port only).
    pub trusted: Vec<String>,
    pub trusted_account_limit: i64,
    pub trusted_events_per_second: u32,
    pub default_account_limit: i64,
    pub default_events_per_second: u32,
}

/// Is `pattern` a pattern `trusted_hosts` takes (`*.example.com`, a name,
/// or `name:port`)?
pub fn valid_pattern(pattern: &str) -> bool {
    let (name, port) = match pattern.split_once(':') {
        Some((n, p)) if !n.starts_with('*') => (n, Some(p)),
        _ => (pattern, None),
    };
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return false;
    }
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

impl HostLimits {
    /// Is the host `hostname` (a `PdsHost` name: lower case, `:port` when
    /// not the default) trusted?
    pub fn is_trusted(&self, hostname: &str) -> bool {
        let whole = hostname.to_ascii_lowercase();
        let name = whole.rsplit_once(':').map_or(whole.as_str(), |(h, _)| h);
        self.trusted.iter().any(|p| match p.strip_prefix('*') {
            Some(suffix) => name.ends_with(suffix) && name.len() > suffix.len(),
            None if p.contains(':') => whole == *p,
            None => name == *p,
        })
    }

    /// A host's account limit: the one an operator set for it, else its
    /// kind's.
    pub fn account_limit(&self, hostname: &str, set_by_operator: Option<i64>) -> i64 {
        match set_by_operator {
            Some(l) => l,
            None if self.is_trusted(hostname) => self.trusted_account_limit,
            None => self.default_account_limit,
        }
    }

    pub fn events_per_second(&self, trusted: bool) -> u32 {
        if trusted {
            self.trusted_events_per_second
        } else {
            self.default_events_per_second
        }
    }
}

/// One host a shard is to crawl.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostAssignment {
    /// `hosts.id`.
    pub id: i64,
    /// Name, with `:port` when not the default.
    pub hostname: String,
    /// Durable upstream cursor when the assignment was made; a task starts
    /// (and restarts) from it.
    pub cursor: i64,
    /// ws:// (plain text) instead of wss://.
    pub insecure: bool,
    /// Stored as `offline`: the task starts with a long backoff's count of
    /// failures instead of afresh, so a relay restart does not dial every
    /// dead host at once and log each again.
    pub offline: bool,
    /// Bumped by each requestCrawl of an offline or idle host: a shard
    /// whose task runs an older generation restarts it, backoff reset.
    pub crawl_gen: i64,
    /// Matches `trusted_hosts`: read at the trusted event rate.
    #[serde(default)]
    pub trusted: bool,
}

/// A shard's whole host list (replaces the previous one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub hosts: Vec<HostAssignment>,
}

impl Assignment {
    /// What a running shard acts on: the hosts, their generations and
    /// trust (cursors and offline flags matter only when a task starts).
    pub fn key(&self) -> Vec<(i64, i64, bool)> {
        self.hosts.iter().map(|h| (h.id, h.crawl_gen, h.trusted)).collect()
    }
}

/// A message from the supervisor to a shard, one JSON line each on the
/// shard's assignment pipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToShard {
    /// The hosts this shard reads (the whole list, replacing the last).
    Assign(Assignment),
    /// Settings changed by a reload, applied without a restart.
    Settings(crate::process::config::ShardSettings),
}

impl ToShard {
    /// The line written on the pipe, newline included.
    pub fn line(&self) -> String {
        serde_json::to_string(self).expect("a supervisor message serializes") + "\n"
    }

    pub fn parse(line: &str) -> Result<ToShard, serde_json::Error> {
        serde_json::from_str(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip_and_match_serde() {
        for s in HostStatus::ALL {
            assert_eq!(HostStatus::parse(s.as_str()).unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), serde_json::json!(s.as_str()));
        }
        assert!(HostStatus::parse("Active").is_err());
        assert!(HostStatus::Offline.dialed() && HostStatus::Active.dialed());
        assert!(!HostStatus::Idle.dialed() && !HostStatus::Banned.dialed());
    }

    #[test]
    fn trusted_patterns() {
        let l = HostLimits {
            trusted: vec!["*.host.bsky.network".into(), "pds.example.com".into()],
            trusted_account_limit: 10_000_000,
            trusted_events_per_second: 50_000,
            default_account_limit: 100,
            default_events_per_second: 50,
        };
        assert!(l.is_trusted("morel.us-east.host.bsky.network"));
        assert!(l.is_trusted("Morel.US-East.host.bsky.network:443"));
        assert!(!l.is_trusted("host.bsky.network"), "the suffix alone is not a host under it");
        assert!(!l.is_trusted("evilhost.bsky.network"));
        assert!(l.is_trusted("pds.example.com") && !l.is_trusted("x.pds.example.com"));
        let ported = HostLimits { trusted: vec!["localhost:2470".into()], ..l.clone() };
        assert!(ported.is_trusted("localhost:2470") && !ported.is_trusted("localhost:2471"));
        assert!(!ported.is_trusted("localhost"));
        assert_eq!(l.account_limit("a.host.bsky.network", None), 10_000_000);
        assert_eq!(l.account_limit("a.host.bsky.network", Some(5)), 5, "the operator's wins");
        assert_eq!(l.account_limit("small.example", None), 100);
        assert_eq!((l.events_per_second(true), l.events_per_second(false)), (50_000, 50));
        assert!(valid_pattern("*.host.bsky.network") && valid_pattern("localhost"));
        assert!(valid_pattern("localhost:2470"));
        assert!(!valid_pattern("*") && !valid_pattern("a..b") && !valid_pattern("*.x:443") && !valid_pattern(""));
        assert!(!valid_pattern("localhost:") && !valid_pattern("localhost:99999") && !valid_pattern("a:b:1"));
    }

    #[test]
    fn assignment_line_round_trips() {
        let a = Assignment {
            hosts: vec![HostAssignment {
                id: 3,
                hostname: "pds.example.com".into(),
                cursor: 9,
                insecure: false,
                offline: true,
                crawl_gen: 2,
                trusted: false,
            }],
        };
        let m = ToShard::Assign(a.clone());
        let line = m.line();
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        assert_eq!(ToShard::parse(&line).unwrap(), m);
        assert_eq!(a.key(), vec![(3, 2, false)]);
        let cfg = crate::process::config::RawConfig::default().validate(1).unwrap();
        let m = ToShard::Settings(cfg.shard_settings());
        assert_eq!(ToShard::parse(&m.line()).unwrap(), m);
        assert!(ToShard::parse("{\"Assign\": 3}").is_err());
    }
}
