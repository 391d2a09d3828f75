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
}

/// A shard's whole host list (replaces the previous one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub hosts: Vec<HostAssignment>,
}

impl Assignment {
    /// What a running shard acts on: the hosts and their generations
    /// (cursors and offline flags matter only when a task starts).
    pub fn key(&self) -> Vec<(i64, i64)> {
        self.hosts.iter().map(|h| (h.id, h.crawl_gen)).collect()
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
    fn assignment_line_round_trips() {
        let a = Assignment {
            hosts: vec![HostAssignment {
                id: 3,
                hostname: "pds.example.com".into(),
                cursor: 9,
                insecure: false,
                offline: true,
                crawl_gen: 2,
            }],
        };
        let m = ToShard::Assign(a.clone());
        let line = m.line();
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        assert_eq!(ToShard::parse(&line).unwrap(), m);
        assert_eq!(a.key(), vec![(3, 2)]);
        let cfg = crate::process::config::RawConfig::default().validate(1).unwrap();
        let m = ToShard::Settings(cfg.shard_settings());
        assert_eq!(ToShard::parse(&m.line()).unwrap(), m);
        assert!(ToShard::parse("{\"Assign\": 3}").is_err());
    }
}
