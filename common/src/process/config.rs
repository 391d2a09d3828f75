//! Configuration, parsed once: TOML file → [`RawConfig`] (every field
//! optional, unknown keys rejected) → environment overrides (`SLUICE_*`) →
//! [`Config`] (every default filled in one place, validated, errors name
//! the key). The supervisor writes the effective config to
//! `data_dir/run/effective.toml`; children read that file, so every process
//! of one relay runs on the same values.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where `sluice run` looks when no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/sluice/sluice.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("{path}: {err}")]
    Parse { path: PathBuf, err: String },
    #[error("config key {key}: {msg}")]
    Invalid { key: &'static str, msg: String },
}

fn invalid(key: &'static str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, msg: msg.into() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Validation {
    Strict,
    Lenient,
}

/// `log_format`: lines for people (`text`, the default) or one JSON object
/// per line (`json`, for log pipelines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `shard_count`: a number, or "auto" (one per core).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ShardCount {
    Number(u32),
    Word(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub host_events_per_second_max: Option<u32>,
    pub host_account_limit_default: Option<u64>,
    pub new_hosts_per_day_max: Option<u32>,
    pub consumers_max: Option<u32>,
    pub consumer_lag_events_max: Option<u64>,
    /// The shards' identity caches together (each shard takes its share).
    pub identity_cache_bytes: Option<u64>,
    pub identity_refreshes_per_host_per_second: Option<f64>,
    pub collection_checks_per_host_per_second: Option<f64>,
    pub collection_changes_max: Option<u64>,
    pub host_window_frames_max: Option<u32>,
    pub host_window_bytes_max: Option<u64>,
    pub trusted_host_account_limit: Option<u64>,
    pub trusted_host_events_per_second_max: Option<u32>,
    pub account_cache_bytes: Option<u64>,
    /// Replaced by `identity_cache_bytes`: read as this many times
    /// [`BYTES_PER_REPLACED_ENTRY`] when that is not set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_cache_entries_max: Option<u64>,
    /// Replaced by `account_cache_bytes`, read likewise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_cache_entries_max: Option<u64>,
}

/// What an entry of the caches sized in entries (before 0.2) is read as.
pub const BYTES_PER_REPLACED_ENTRY: u64 = 128;

impl RawLimits {
    /// Keys set here that newer ones replaced (`sluice run` warns).
    pub fn replaced_keys(&self) -> Vec<(&'static str, &'static str)> {
        let mut out = Vec::new();
        if self.identity_cache_entries_max.is_some() {
            out.push(("limits.identity_cache_entries_max", "limits.identity_cache_bytes"));
        }
        if self.account_cache_entries_max.is_some() {
            out.push(("limits.account_cache_entries_max", "limits.account_cache_bytes"));
        }
        out
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub shard_count: Option<ShardCount>,
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub plc_url: Option<String>,
    /// Whole or fractional hours (serde takes a TOML integer for an f64).
    pub retention_hours: Option<f64>,
    pub bootstrap_relay: Option<String>,
    pub validation: Option<Validation>,
    pub limits: Option<RawLimits>,
    pub admin_password_file: Option<PathBuf>,
    /// Extra trust anchors (PEM) for wss:// upstreams, besides the web PKI roots.
    pub tls_ca_file: Option<PathBuf>,
    pub allow_insecure_hosts: Option<bool>,
    pub initial_seq: Option<i64>,
    pub ring_size_bytes: Option<u64>,
    pub flush_interval_ms: Option<u32>,
    pub segment_size_bytes: Option<u64>,
    pub shutdown_timeout_ms: Option<u32>,
    pub public_request_crawl: Option<bool>,
    pub upstream_ping_interval_s: Option<u32>,
    pub upstream_idle_timeout_s: Option<u32>,
    pub upstream_connect_timeout_s: Option<u32>,
    /// Whole or fractional days.
    pub host_offline_idle_days: Option<f64>,
    pub consumer_write_timeout_s: Option<u32>,
    pub log_format: Option<LogFormat>,
    pub log_summary_interval_s: Option<u32>,
    pub plc_requests_per_second: Option<f64>,
    pub plc_export: Option<bool>,
    pub identity_fetch_concurrency: Option<u32>,
    pub identity_wait_max_s: Option<u32>,
    /// Whole or fractional hours.
    pub identity_plc_ttl_hours: Option<f64>,
    pub identity_web_ttl_hours: Option<f64>,
    /// Host name patterns (`*.host.bsky.network`) with the trusted limits.
    pub trusted_hosts: Option<Vec<String>>,
}

/// How the shards keep upstream connections (PROTOCOL §8: a PDS sends
/// nothing to an idle subscriber and never pings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamTimeouts {
    /// Silence after which the shard pings the host.
    pub ping_interval_s: u32,
    /// Silence (no frame, no pong) after which the connection is cut.
    pub idle_timeout_s: u32,
    /// Deadline for TCP connect, TLS and the WebSocket upgrade together.
    pub connect_timeout_s: u32,
}

impl RawConfig {
    fn upstream(&self) -> Result<UpstreamTimeouts, ConfigError> {
        let u = UpstreamTimeouts {
            ping_interval_s: self.upstream_ping_interval_s.unwrap_or(30),
            idle_timeout_s: self.upstream_idle_timeout_s.unwrap_or(120),
            connect_timeout_s: self.upstream_connect_timeout_s.unwrap_or(10),
        };
        if !(1..=3600).contains(&u.ping_interval_s) {
            return Err(invalid("upstream_ping_interval_s", "from 1 to 3600"));
        }
        if u.idle_timeout_s <= u.ping_interval_s || u.idle_timeout_s > 86_400 {
            return Err(invalid("upstream_idle_timeout_s", "above upstream_ping_interval_s, at most 86400"));
        }
        if !(1..=300).contains(&u.connect_timeout_s) {
            return Err(invalid("upstream_connect_timeout_s", "from 1 to 300"));
        }
        Ok(u)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    /// Events per second one upstream host may send before it is slowed.
    pub host_events_per_second_max: u32,
    /// Accounts a new host may have before further new accounts are
    /// marked throttled (per-host limits in Postgres override this).
    pub host_account_limit_default: u64,
    pub new_hosts_per_day_max: u32,
    pub consumers_max: u32,
    /// A consumer further behind the head than this gets ConsumerTooSlow.
    pub consumer_lag_events_max: u64,
    /// The shards' identity caches together, in bytes.
    pub identity_cache_bytes: u64,
    /// `#identity` events of one host that may each cost a directory
    /// request, per second (beyond, the stored document answers).
    pub identity_refreshes_per_host_per_second: f64,
    /// describeRepo requests a host gets from the collection index at
    /// most, a second.
    pub collection_checks_per_host_per_second: f64,
    /// Change rows of the collection index before the chunks are written
    /// whole (`dbwriter::collections`).
    pub collection_changes_max: u64,
    /// A host's frames read ahead while an identity resolves: they enter
    /// the ring in order, so past these the host is read no further
    /// (TCP backpressure) until the lookup ends.
    pub host_window_frames_max: u32,
    pub host_window_bytes_max: u64,
    /// Hosts matching `trusted_hosts`: their account limit and event rate.
    pub trusted_host_account_limit: u64,
    pub trusted_host_events_per_second_max: u32,
    /// The db-writer's account cache, in bytes (about 120 an account).
    pub account_cache_bytes: u64,
}

/// How the relay resolves identities (the db-writer's identity service).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdentitySettings {
    /// Relay-wide requests per second to the PLC directory (documents and
    /// export pages together).
    pub plc_requests_per_second: f64,
    /// Follow the PLC directory's operation log (`/export`) to learn key
    /// and endpoint changes of known DIDs without asking per DID.
    pub plc_export: bool,
    /// Directory requests at once (one thread each).
    pub fetch_concurrency: u32,
    /// How long an event waits for its DID when the DID's own document
    /// cannot be fetched (a did:web host failing, a PLC directory failing
    /// for that DID only) before it is dropped as unresolved.
    pub wait_max_s: u32,
    /// A stored document older than this is fetched again (in the
    /// background; the stored one serves meanwhile).
    pub plc_ttl_hours: f64,
    pub web_ttl_hours: f64,
}

/// The validated configuration every process runs on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub shard_count: u32,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub plc_url: String,
    /// The replay window, in hours (fractions allowed: 0.5 is 30 minutes).
    pub retention_hours: f64,
    pub bootstrap_relay: Option<String>,
    pub validation: Validation,
    pub limits: Limits,
    pub admin_password_file: Option<PathBuf>,
    /// Extra trust anchors (PEM) for wss:// upstreams, besides the web PKI roots.
    pub tls_ca_file: Option<PathBuf>,
    pub allow_insecure_hosts: bool,
    pub initial_seq: i64,
    pub ring_size_bytes: u64,
    /// Group commit pacing: at most one log fsync + Postgres commit per this
    /// many ms while less than 1 MiB of events waits (db-writer).
    pub flush_interval_ms: u32,
    pub segment_size_bytes: u64,
    pub shutdown_timeout_ms: u32,
    pub public_request_crawl: bool,
    pub upstream: UpstreamTimeouts,
    /// An offline host turns idle (no longer dialed until requestCrawl)
    /// after this many days offline.
    pub host_offline_idle_days: f64,
    /// A consumer whose socket takes no bytes this long is cut.
    pub consumer_write_timeout_s: u32,
    pub log_format: LogFormat,
    /// One INFO line summing the relay up this often (0: never).
    pub log_summary_interval_s: u32,
    pub identity: IdentitySettings,
    /// Lower-case host name patterns: `*.suffix` or a whole name.
    pub trusted_hosts: Vec<String>,
}

/// What a running shard takes from a reload (SIGHUP) without restarting:
/// the supervisor sends it on the assignment pipe
/// ([`crate::process::host::ToShard::Settings`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ShardSettings {
    pub strict: bool,
    pub host_events_per_second_max: u32,
    pub consumers_max: u32,
    pub consumer_lag_events_max: u64,
    pub consumer_write_timeout_s: u32,
    pub upstream: UpstreamTimeouts,
    pub host_window_frames_max: u32,
    pub host_window_bytes_max: u64,
    pub trusted_host_events_per_second_max: u32,
    pub identity_cache_bytes: u64,
}

/// Environment variables that override file keys, and their keys.
pub const ENV_KEYS: &[(&str, &str)] = &[
    ("SLUICE_SHARD_COUNT", "shard_count"),
    ("SLUICE_LISTEN", "listen"),
    ("SLUICE_METRICS_LISTEN", "metrics_listen"),
    ("SLUICE_DATA_DIR", "data_dir"),
    ("SLUICE_DATABASE_URL", "database_url"),
    ("SLUICE_PLC_URL", "plc_url"),
    ("SLUICE_RETENTION_HOURS", "retention_hours"),
    ("SLUICE_BOOTSTRAP_RELAY", "bootstrap_relay"),
    ("SLUICE_VALIDATION", "validation"),
    ("SLUICE_ADMIN_PASSWORD_FILE", "admin_password_file"),
    ("SLUICE_TLS_CA_FILE", "tls_ca_file"),
    ("SLUICE_ALLOW_INSECURE_HOSTS", "allow_insecure_hosts"),
    ("SLUICE_INITIAL_SEQ", "initial_seq"),
    ("SLUICE_RING_SIZE_BYTES", "ring_size_bytes"),
    ("SLUICE_FLUSH_INTERVAL_MS", "flush_interval_ms"),
    ("SLUICE_SEGMENT_SIZE_BYTES", "segment_size_bytes"),
    ("SLUICE_PUBLIC_REQUEST_CRAWL", "public_request_crawl"),
    ("SLUICE_LOG_FORMAT", "log_format"),
    ("SLUICE_PLC_REQUESTS_PER_SECOND", "plc_requests_per_second"),
    ("SLUICE_PLC_EXPORT", "plc_export"),
    ("SLUICE_CONSUMER_LAG_EVENTS_MAX", "limits.consumer_lag_events_max"),
    ("SLUICE_CONSUMERS_MAX", "limits.consumers_max"),
    ("SLUICE_HOST_ACCOUNT_LIMIT_DEFAULT", "limits.host_account_limit_default"),
];

impl RawConfig {
    pub fn from_toml(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), err: e.to_string() })
    }

    /// Read `path`; a missing file at the default path means "all defaults".
    pub fn load(path: Option<&Path>) -> Result<RawConfig, ConfigError> {
        let (p, required) = match path {
            Some(p) => (p.to_owned(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        match std::fs::read_to_string(&p) {
            Ok(t) => RawConfig::from_toml(&t, &p),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(RawConfig::default()),
            Err(err) => Err(ConfigError::Read { path: p, err }),
        }
    }

    /// Apply `SLUICE_*` overrides from `env` (a lookup function, so tests
    /// need not touch the process environment).
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let parse_num = |k: &'static str, v: &str| -> Result<u64, ConfigError> {
            v.trim().parse::<u64>().map_err(|e| invalid(k, format!("{v:?}: {e}")))
        };
        let parse_bool = |k: &'static str, v: &str| -> Result<bool, ConfigError> {
            match v.trim() {
                "1" | "true" | "yes" => Ok(true),
                "0" | "false" | "no" => Ok(false),
                _ => Err(invalid(k, format!("{v:?} is not a boolean"))),
            }
        };
        for (var, key) in ENV_KEYS {
            let Some(v) = env(var) else { continue };
            let limits = self.limits.get_or_insert_with(RawLimits::default);
            match *key {
                "shard_count" => {
                    self.shard_count = Some(match v.trim().parse::<u32>() {
                        Ok(n) => ShardCount::Number(n),
                        Err(_) => ShardCount::Word(v.trim().to_owned()),
                    })
                }
                "listen" => self.listen = Some(v),
                "metrics_listen" => self.metrics_listen = Some(v),
                "data_dir" => self.data_dir = Some(PathBuf::from(v)),
                "database_url" => self.database_url = Some(v),
                "plc_url" => self.plc_url = Some(v),
                "retention_hours" => {
                    let h = v.trim().parse::<f64>().map_err(|e| invalid(key, format!("{v:?}: {e}")))?;
                    self.retention_hours = Some(h);
                }
                "bootstrap_relay" => self.bootstrap_relay = Some(v),
                "validation" => {
                    self.validation = Some(match v.trim() {
                        "strict" => Validation::Strict,
                        "lenient" => Validation::Lenient,
                        _ => return Err(invalid(key, format!("{v:?} is not strict or lenient"))),
                    })
                }
                "admin_password_file" => self.admin_password_file = Some(PathBuf::from(v)),
                "tls_ca_file" => self.tls_ca_file = Some(PathBuf::from(v)),
                "allow_insecure_hosts" => self.allow_insecure_hosts = Some(parse_bool(key, &v)?),
                "initial_seq" => {
                    self.initial_seq = Some(v.trim().parse().map_err(|e| invalid(key, format!("{v:?}: {e}")))?)
                }
                "ring_size_bytes" => self.ring_size_bytes = Some(parse_num(key, &v)?),
                "flush_interval_ms" => self.flush_interval_ms = Some(parse_num(key, &v)? as u32),
                "segment_size_bytes" => self.segment_size_bytes = Some(parse_num(key, &v)?),
                "public_request_crawl" => self.public_request_crawl = Some(parse_bool(key, &v)?),
                "log_format" => {
                    self.log_format = Some(match v.trim() {
                        "text" => LogFormat::Text,
                        "json" => LogFormat::Json,
                        _ => return Err(invalid(key, format!("{v:?} is not text or json"))),
                    })
                }
                "plc_requests_per_second" => {
                    let r = v.trim().parse::<f64>().map_err(|e| invalid(key, format!("{v:?}: {e}")))?;
                    self.plc_requests_per_second = Some(r);
                }
                "plc_export" => self.plc_export = Some(parse_bool(key, &v)?),
                "limits.consumer_lag_events_max" => limits.consumer_lag_events_max = Some(parse_num(key, &v)?),
                "limits.consumers_max" => limits.consumers_max = Some(parse_num(key, &v)? as u32),
                "limits.host_account_limit_default" => limits.host_account_limit_default = Some(parse_num(key, &v)?),
                _ => unreachable!("every ENV_KEYS entry is handled"),
            }
        }
        Ok(())
    }

    /// Fill defaults and validate. `cores` is used for `shard_count = "auto"`.
    pub fn validate(self, cores: u32) -> Result<Config, ConfigError> {
        let upstream = self.upstream()?;
        let host_offline_idle_days = self.host_offline_idle_days()?;
        let consumer_write_timeout_s = self.consumer_write_timeout_s.unwrap_or(30);
        if !(1..=3600).contains(&consumer_write_timeout_s) {
            return Err(invalid("consumer_write_timeout_s", "from 1 to 3600"));
        }
        let shard_count = self.shard_count(cores)?;
        let addr = |key: &'static str, v: Option<String>, d: &str| -> Result<SocketAddr, ConfigError> {
            let s = v.unwrap_or_else(|| d.to_owned());
            s.parse().map_err(|e| invalid(key, format!("{s:?}: {e}")))
        };
        let limits = self.limits()?;
        let identity = self.identity()?;
        let trusted_hosts = self.trusted_hosts()?;
        let (ring_size_bytes, segment_size_bytes) = self.sizes()?;
        let initial_seq = self.initial_seq.unwrap_or(1);
        if !(1..crate::atproto::frame::SEQ_MAX).contains(&initial_seq) {
            return Err(invalid("initial_seq", "a positive integer below 2^53"));
        }
        let plc_url = self.plc_url.unwrap_or_else(|| "https://plc.directory".into()).trim_end_matches('/').to_owned();
        if !(plc_url.starts_with("https://") || plc_url.starts_with("http://")) {
            return Err(invalid("plc_url", "must be an http(s) URL"));
        }
        if let Some(u) = &self.database_url {
            if u.trim().is_empty() {
                return Err(invalid("database_url", "empty"));
            }
        }
        let flush_interval_ms = self.flush_interval_ms.unwrap_or(2);
        if !(1..=1000).contains(&flush_interval_ms) {
            return Err(invalid("flush_interval_ms", "from 1 to 1000"));
        }
        Ok(Config {
            shard_count,
            listen: addr("listen", self.listen, "0.0.0.0:2470")?,
            metrics_listen: addr("metrics_listen", self.metrics_listen, "127.0.0.1:2471")?,
            data_dir: self.data_dir.unwrap_or_else(|| PathBuf::from("./sluice-data")),
            database_url: self.database_url,
            plc_url,
            retention_hours: {
                let h = self.retention_hours.unwrap_or(72.0);
                if !(h > 0.0 && h <= 1_000_000.0) {
                    return Err(invalid("retention_hours", "more than 0 and at most 1000000"));
                }
                h
            },
            bootstrap_relay: self.bootstrap_relay,
            validation: self.validation.unwrap_or(Validation::Strict),
            limits,
            admin_password_file: self.admin_password_file,
            tls_ca_file: self.tls_ca_file,
            allow_insecure_hosts: self.allow_insecure_hosts.unwrap_or(false),
            initial_seq,
            ring_size_bytes,
            flush_interval_ms,
            segment_size_bytes,
            shutdown_timeout_ms: self.shutdown_timeout_ms.unwrap_or(30_000),
            public_request_crawl: self.public_request_crawl.unwrap_or(true),
            upstream,
            host_offline_idle_days,
            consumer_write_timeout_s,
            log_format: self.log_format.unwrap_or(LogFormat::Text),
            log_summary_interval_s: match self.log_summary_interval_s.unwrap_or(60) {
                s if s <= 86_400 => s,
                _ => return Err(invalid("log_summary_interval_s", "from 0 (never) to 86400")),
            },
            identity,
            trusted_hosts,
        })
    }

    /// `trusted_hosts` (default: Bluesky's own PDS hosts), lower case.
    fn trusted_hosts(&self) -> Result<Vec<String>, ConfigError> {
        let v = self.trusted_hosts.clone().unwrap_or_else(|| vec!["*.host.bsky.network".to_owned()]);
        v.into_iter()
            .map(|p| {
                let p = p.trim().to_ascii_lowercase();
                if crate::process::host::valid_pattern(&p) {
                    Ok(p)
                } else {
                    Err(invalid("trusted_hosts", format!("{p:?} is not a host name or *.suffix pattern")))
                }
            })
            .collect()
    }

    fn identity(&self) -> Result<IdentitySettings, ConfigError> {
        let s = IdentitySettings {
            plc_requests_per_second: self.plc_requests_per_second.unwrap_or(50.0),
            plc_export: self.plc_export.unwrap_or(true),
            fetch_concurrency: self.identity_fetch_concurrency.unwrap_or(4),
            wait_max_s: self.identity_wait_max_s.unwrap_or(10),
            plc_ttl_hours: self.identity_plc_ttl_hours.unwrap_or(168.0),
            web_ttl_hours: self.identity_web_ttl_hours.unwrap_or(6.0),
        };
        if !(s.plc_requests_per_second > 0.0 && s.plc_requests_per_second <= 100_000.0) {
            return Err(invalid("plc_requests_per_second", "more than 0 and at most 100000"));
        }
        if !(1..=256).contains(&s.fetch_concurrency) {
            return Err(invalid("identity_fetch_concurrency", "from 1 to 256"));
        }
        if !(1..=3600).contains(&s.wait_max_s) {
            return Err(invalid("identity_wait_max_s", "from 1 to 3600"));
        }
        for (key, h) in [("identity_plc_ttl_hours", s.plc_ttl_hours), ("identity_web_ttl_hours", s.web_ttl_hours)] {
            if !(h > 0.0 && h <= 87_600.0) {
                return Err(invalid(key, "more than 0 and at most 87600"));
            }
        }
        Ok(s)
    }

    fn shard_count(&self, cores: u32) -> Result<u32, ConfigError> {
        let shard_count = match &self.shard_count {
            None => 1,
            Some(ShardCount::Number(0)) => return Err(invalid("shard_count", "must be at least 1")),
            Some(ShardCount::Number(n)) => *n,
            Some(ShardCount::Word(w)) if w == "auto" => cores.max(1),
            Some(ShardCount::Word(w)) => {
                return Err(invalid("shard_count", format!("{w:?} is not a number or \"auto\"")))
            }
        };
        if shard_count > 256 {
            return Err(invalid("shard_count", "at most 256"));
        }
        Ok(shard_count)
    }

    fn limits(&self) -> Result<Limits, ConfigError> {
        let l = self.limits.clone().unwrap_or_default();
        let limits = Limits {
            host_events_per_second_max: l.host_events_per_second_max.unwrap_or(5_000),
            host_account_limit_default: l.host_account_limit_default.unwrap_or(100_000),
            new_hosts_per_day_max: l.new_hosts_per_day_max.unwrap_or(500),
            consumers_max: l.consumers_max.unwrap_or(1_000),
            consumer_lag_events_max: l.consumer_lag_events_max.unwrap_or(2_000_000),
            identity_cache_bytes: l
                .identity_cache_bytes
                .or(l.identity_cache_entries_max.map(|n| n.saturating_mul(BYTES_PER_REPLACED_ENTRY).max(1 << 20)))
                .unwrap_or(256 << 20),
            identity_refreshes_per_host_per_second: l.identity_refreshes_per_host_per_second.unwrap_or(5.0),
            collection_checks_per_host_per_second: l.collection_checks_per_host_per_second.unwrap_or(5.0),
            collection_changes_max: l.collection_changes_max.unwrap_or(200_000),
            host_window_frames_max: l.host_window_frames_max.unwrap_or(1024),
            host_window_bytes_max: l.host_window_bytes_max.unwrap_or(16 << 20),
            trusted_host_account_limit: l.trusted_host_account_limit.unwrap_or(10_000_000),
            trusted_host_events_per_second_max: l.trusted_host_events_per_second_max.unwrap_or(50_000),
            account_cache_bytes: l
                .account_cache_bytes
                .or(l.account_cache_entries_max.map(|n| n.saturating_mul(BYTES_PER_REPLACED_ENTRY).max(1 << 20)))
                .unwrap_or(512 << 20),
        };
        if !(1 << 20..=1 << 40).contains(&limits.account_cache_bytes) {
            return Err(invalid("limits.account_cache_bytes", "from 1 MiB to 1 TiB"));
        }
        if limits.trusted_host_events_per_second_max == 0 {
            return Err(invalid("limits.trusted_host_events_per_second_max", "must be at least 1"));
        }
        if limits.consumers_max == 0 {
            return Err(invalid("limits.consumers_max", "must be at least 1"));
        }
        if !(1 << 20..=1 << 40).contains(&limits.identity_cache_bytes) {
            return Err(invalid("limits.identity_cache_bytes", "from 1 MiB to 1 TiB"));
        }
        if !(1..=100_000_000).contains(&limits.collection_changes_max) {
            return Err(invalid("limits.collection_changes_max", "from 1 to 100000000"));
        }
        let c = limits.collection_checks_per_host_per_second;
        if !(c > 0.0 && c <= 100_000.0) {
            return Err(invalid("limits.collection_checks_per_host_per_second", "more than 0 and at most 100000"));
        }
        let r = limits.identity_refreshes_per_host_per_second;
        if !(r > 0.0 && r <= 100_000.0) {
            return Err(invalid("limits.identity_refreshes_per_host_per_second", "more than 0 and at most 100000"));
        }
        if !(1..=1_000_000).contains(&limits.host_window_frames_max) {
            return Err(invalid("limits.host_window_frames_max", "from 1 to 1000000"));
        }
        // A window holds at least one maximal frame.
        if !(2 * crate::atproto::frame::FRAME_BYTES_MAX as u64..=1 << 32).contains(&limits.host_window_bytes_max) {
            return Err(invalid("limits.host_window_bytes_max", "from two maximal frames (10 MB) to 4 GiB"));
        }
        Ok(limits)
    }

    /// The ring and event log segment sizes.
    fn sizes(&self) -> Result<(u64, u64), ConfigError> {
        let ring_size_bytes = self.ring_size_bytes.unwrap_or(64 << 20);
        if !ring_size_bytes.is_power_of_two() || !(1 << 16..=1 << 32).contains(&ring_size_bytes) {
            return Err(invalid("ring_size_bytes", "a power of two from 64 KiB to 4 GiB"));
        }
        // A ring must hold at least one maximal record.
        if ring_size_bytes < 2 * crate::atproto::frame::FRAME_BYTES_MAX as u64 + (1 << 16) {
            return Err(invalid("ring_size_bytes", "must hold two maximal frames (at least 16 MiB)"));
        }
        let segment_size_bytes = self.segment_size_bytes.unwrap_or(256 << 20);
        if !(8 << 20..=1 << 34).contains(&segment_size_bytes) {
            return Err(invalid("segment_size_bytes", "from 8 MiB to 16 GiB"));
        }
        Ok((ring_size_bytes, segment_size_bytes))
    }

    fn host_offline_idle_days(&self) -> Result<f64, ConfigError> {
        let d = self.host_offline_idle_days.unwrap_or(7.0);
        if !(d > 0.0 && d <= 3650.0) {
            return Err(invalid("host_offline_idle_days", "more than 0 and at most 3650"));
        }
        Ok(d)
    }
}

/// The keys only a restart applies, as (name => field path): the one
/// list [`Config::fixed_keys`] and [`Config::keep_fixed`] both expand.
macro_rules! fixed_fields {
    ($m:ident) => {
        $m!(
            "data_dir" => data_dir,
            "database_url" => database_url,
            "plc_url" => plc_url,
            "tls_ca_file" => tls_ca_file,
            "allow_insecure_hosts" => allow_insecure_hosts,
            "segment_size_bytes" => segment_size_bytes,
            "plc_export" => identity.plc_export,
            "identity_fetch_concurrency" => identity.fetch_concurrency,
            "log_format" => log_format
        )
    };
}

impl Config {
    /// Load the file (or defaults), apply the environment, validate.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut raw = RawConfig::load(path)?;
        raw.apply_env(|k| std::env::var(k).ok())?;
        let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        raw.validate(cores)
    }

    /// The effective config as TOML (children read this).
    pub fn to_toml(&self) -> String {
        let raw = RawConfig {
            shard_count: Some(ShardCount::Number(self.shard_count)),
            listen: Some(self.listen.to_string()),
            metrics_listen: Some(self.metrics_listen.to_string()),
            data_dir: Some(self.data_dir.clone()),
            database_url: self.database_url.clone(),
            plc_url: Some(self.plc_url.clone()),
            retention_hours: Some(self.retention_hours),
            bootstrap_relay: self.bootstrap_relay.clone(),
            validation: Some(self.validation),
            limits: Some(RawLimits {
                host_events_per_second_max: Some(self.limits.host_events_per_second_max),
                host_account_limit_default: Some(self.limits.host_account_limit_default),
                new_hosts_per_day_max: Some(self.limits.new_hosts_per_day_max),
                consumers_max: Some(self.limits.consumers_max),
                consumer_lag_events_max: Some(self.limits.consumer_lag_events_max),
                identity_cache_bytes: Some(self.limits.identity_cache_bytes),
                identity_refreshes_per_host_per_second: Some(self.limits.identity_refreshes_per_host_per_second),
                collection_checks_per_host_per_second: Some(self.limits.collection_checks_per_host_per_second),
                collection_changes_max: Some(self.limits.collection_changes_max),
                host_window_frames_max: Some(self.limits.host_window_frames_max),
                host_window_bytes_max: Some(self.limits.host_window_bytes_max),
                trusted_host_account_limit: Some(self.limits.trusted_host_account_limit),
                trusted_host_events_per_second_max: Some(self.limits.trusted_host_events_per_second_max),
                account_cache_bytes: Some(self.limits.account_cache_bytes),
                identity_cache_entries_max: None,
                account_cache_entries_max: None,
            }),
            admin_password_file: self.admin_password_file.clone(),
            tls_ca_file: self.tls_ca_file.clone(),
            allow_insecure_hosts: Some(self.allow_insecure_hosts),
            initial_seq: Some(self.initial_seq),
            ring_size_bytes: Some(self.ring_size_bytes),
            flush_interval_ms: Some(self.flush_interval_ms),
            segment_size_bytes: Some(self.segment_size_bytes),
            shutdown_timeout_ms: Some(self.shutdown_timeout_ms),
            public_request_crawl: Some(self.public_request_crawl),
            upstream_ping_interval_s: Some(self.upstream.ping_interval_s),
            upstream_idle_timeout_s: Some(self.upstream.idle_timeout_s),
            upstream_connect_timeout_s: Some(self.upstream.connect_timeout_s),
            host_offline_idle_days: Some(self.host_offline_idle_days),
            consumer_write_timeout_s: Some(self.consumer_write_timeout_s),
            log_format: Some(self.log_format),
            log_summary_interval_s: Some(self.log_summary_interval_s),
            plc_requests_per_second: Some(self.identity.plc_requests_per_second),
            plc_export: Some(self.identity.plc_export),
            identity_fetch_concurrency: Some(self.identity.fetch_concurrency),
            identity_wait_max_s: Some(self.identity.wait_max_s),
            identity_plc_ttl_hours: Some(self.identity.plc_ttl_hours),
            identity_web_ttl_hours: Some(self.identity.web_ttl_hours),
            trusted_hosts: Some(self.trusted_hosts.clone()),
        };
        toml::to_string(&raw).expect("config serializes")
    }

    /// Read back what [`Config::to_toml`] wrote (no environment applied).
    pub fn from_effective(path: &Path) -> Result<Config, ConfigError> {
        let raw = RawConfig::load(Some(path))?;
        raw.validate(1)
    }

    pub fn shard_settings(&self) -> ShardSettings {
        ShardSettings {
            strict: self.validation == Validation::Strict,
            host_events_per_second_max: self.limits.host_events_per_second_max,
            consumers_max: self.limits.consumers_max,
            consumer_lag_events_max: self.limits.consumer_lag_events_max,
            consumer_write_timeout_s: self.consumer_write_timeout_s,
            upstream: self.upstream,
            host_window_frames_max: self.limits.host_window_frames_max,
            host_window_bytes_max: self.limits.host_window_bytes_max,
            trusted_host_events_per_second_max: self.limits.trusted_host_events_per_second_max,
            identity_cache_bytes: self.limits.identity_cache_bytes / u64::from(self.shard_count.max(1)),
        }
    }

    /// Which hosts are trusted, and the limits of each kind.
    pub fn host_limits(&self) -> crate::process::host::HostLimits {
        crate::process::host::HostLimits {
            trusted: self.trusted_hosts.clone(),
            trusted_account_limit: self.limits.trusted_host_account_limit.min(i64::MAX as u64) as i64,
            trusted_events_per_second: self.limits.trusted_host_events_per_second_max,
            default_account_limit: self.limits.host_account_limit_default.min(i64::MAX as u64) as i64,
            default_events_per_second: self.limits.host_events_per_second_max,
        }
    }

    /// The keys, changed in `new`, that a reload applies only by
    /// restarting the shards and the db-writer (a reshard): the rings and
    /// the public port are made for them.
    pub fn reshard_keys(&self, new: &Config) -> Vec<&'static str> {
        let mut k = Vec::new();
        if self.shard_count != new.shard_count {
            k.push("shard_count");
        }
        if self.ring_size_bytes != new.ring_size_bytes {
            k.push("ring_size_bytes");
        }
        if self.listen != new.listen {
            k.push("listen");
        }
        k
    }

    /// The keys, changed in `new`, that only a restart of the relay
    /// applies (a reload keeps the running values and says so): they are
    /// built into the processes' long-lived parts (the database, the
    /// resolvers, TLS, the event log, the caches, logging).
    pub fn fixed_keys(&self, new: &Config) -> Vec<&'static str> {
        let mut k = Vec::new();
        macro_rules! changed {
            ($($name:literal => $($f:ident).+),+) => {
                $(if self.$($f).+ != new.$($f).+ {
                    k.push($name);
                })+
            };
        }
        fixed_fields!(changed);
        k
    }

    /// `new` with the keys of [`Config::fixed_keys`] set back to this
    /// config's values (`bootstrap_relay` and `initial_seq` matter only at
    /// the first start).
    pub fn keep_fixed(&self, mut new: Config) -> Config {
        macro_rules! keep {
            ($($name:literal => $($f:ident).+),+) => {
                $(new.$($f).+ = self.$($f).+.clone();)+
            };
        }
        fixed_fields!(keep);
        new.bootstrap_relay = self.bootstrap_relay.clone();
        new.initial_seq = self.initial_seq;
        new
    }

    pub fn run_dir(&self) -> PathBuf {
        self.data_dir.join("run")
    }

    pub fn events_dir(&self) -> PathBuf {
        self.data_dir.join("events")
    }

    pub fn query_socket(&self) -> PathBuf {
        self.run_dir().join("query.sock")
    }

    /// Where the db-writer's identity service listens for the shards.
    pub fn identity_socket(&self) -> PathBuf {
        self.run_dir().join("identity.sock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_env() {
        let mut raw =
            RawConfig::from_toml("shard_count = \"auto\"\nallow_insecure_hosts = true\n", Path::new("x")).unwrap();
        raw.apply_env(|k| match k {
            "SLUICE_LISTEN" => Some("127.0.0.1:9999".into()),
            "SLUICE_CONSUMERS_MAX" => Some("7".into()),
            _ => None,
        })
        .unwrap();
        let c = raw.validate(4).unwrap();
        assert_eq!(c.shard_count, 4);
        assert_eq!(c.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(c.limits.consumers_max, 7);
        assert!(c.allow_insecure_hosts);
        assert_eq!(c.retention_hours, 72.0);
        assert_eq!(c.validation, Validation::Strict);
        assert_eq!(c.identity.plc_requests_per_second, 50.0);
        assert!(c.identity.plc_export);
        assert_eq!(c.limits.identity_cache_bytes, 256 << 20);
        // round trip through the effective file
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.toml");
        std::fs::write(&p, c.to_toml()).unwrap();
        assert_eq!(Config::from_effective(&p).unwrap(), c);
    }

    #[test]
    fn errors_name_the_key() {
        let e = RawConfig::from_toml("shard_count = 0", Path::new("x")).unwrap().validate(2).unwrap_err();
        assert!(e.to_string().contains("shard_count"), "{e}");
        let e = RawConfig::from_toml("listen = \"nope\"", Path::new("x")).unwrap().validate(2).unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
        let e = RawConfig::from_toml("bogus = 1", Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let mut raw = RawConfig::default();
        let e = raw.apply_env(|k| (k == "SLUICE_VALIDATION").then(|| "loose".into())).unwrap_err();
        assert!(e.to_string().contains("validation"), "{e}");
        let e = RawConfig::from_toml("ring_size_bytes = 1000", Path::new("x")).unwrap().validate(2).unwrap_err();
        assert!(e.to_string().contains("ring_size_bytes"), "{e}");
        for (bad, key) in [
            ("plc_requests_per_second = 0", "plc_requests_per_second"),
            ("identity_fetch_concurrency = 0", "identity_fetch_concurrency"),
            ("identity_wait_max_s = 0", "identity_wait_max_s"),
            ("identity_web_ttl_hours = -1", "identity_web_ttl_hours"),
            ("[limits]\nidentity_cache_bytes = 10", "limits.identity_cache_bytes"),
            ("[limits]\nhost_window_bytes_max = 1000", "limits.host_window_bytes_max"),
        ] {
            let e = RawConfig::from_toml(bad, Path::new("x")).and_then(|r| r.validate(2)).unwrap_err();
            assert!(e.to_string().contains(key), "{bad}: {e}");
        }
        for bad in ["retention_hours = 0", "retention_hours = -1.5"] {
            let e = RawConfig::from_toml(bad, Path::new("x")).unwrap().validate(2).unwrap_err();
            assert!(e.to_string().contains("retention_hours"), "{bad}: {e}");
        }
    }

    #[test]
    fn cache_sizes_in_entries_are_read_as_bytes() {
        let raw = RawConfig::from_toml(
            "[limits]\nidentity_cache_entries_max = 200000\naccount_cache_entries_max = 500000",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(raw.limits.as_ref().unwrap().replaced_keys().len(), 2);
        let cfg = raw.validate(2).unwrap();
        assert_eq!(cfg.limits.identity_cache_bytes, 200_000 * BYTES_PER_REPLACED_ENTRY);
        assert_eq!(cfg.limits.account_cache_bytes, 500_000 * BYTES_PER_REPLACED_ENTRY);
        assert!(!cfg.to_toml().contains("entries_max"), "the effective config has the new keys only");
        let both = "[limits]\naccount_cache_entries_max = 5\naccount_cache_bytes = 2097152";
        let cfg = RawConfig::from_toml(both, Path::new("x")).unwrap().validate(2).unwrap();
        assert_eq!(cfg.limits.account_cache_bytes, 2 << 20, "the new key wins");
    }

    #[test]
    fn retention_hours_whole_or_fraction() {
        let hours =
            |toml: &str| RawConfig::from_toml(toml, Path::new("x")).unwrap().validate(2).unwrap().retention_hours;
        assert_eq!(hours("retention_hours = 24"), 24.0);
        assert_eq!(hours("retention_hours = 0.5"), 0.5);
        let mut raw = RawConfig::default();
        raw.apply_env(|k| (k == "SLUICE_RETENTION_HOURS").then(|| "0.25".into())).unwrap();
        assert_eq!(raw.validate(2).unwrap().retention_hours, 0.25);
        let mut raw = RawConfig::default();
        assert!(raw.apply_env(|k| (k == "SLUICE_RETENTION_HOURS").then(|| "soon".into())).is_err());
    }

    #[test]
    fn reload_sorts_keys_into_in_place_reshard_and_restart() {
        let cfg = |toml: &str| RawConfig::from_toml(toml, Path::new("x")).unwrap().validate(2).unwrap();
        let old = cfg("shard_count = 2");
        let new = cfg("shard_count = 2\nvalidation = \"lenient\"\n[limits]\nconsumers_max = 5");
        assert!(old.reshard_keys(&new).is_empty() && old.fixed_keys(&new).is_empty());
        assert_ne!(old.shard_settings(), new.shard_settings());
        assert!(!new.shard_settings().strict);
        let new = cfg("shard_count = 3\nlisten = \"127.0.0.1:9\"");
        assert_eq!(old.reshard_keys(&new), ["shard_count", "listen"]);
        let new = cfg("shard_count = 2\nplc_url = \"http://plc.test\"\nlog_format = \"json\"\nretention_hours = 1");
        assert_eq!(old.fixed_keys(&new), ["plc_url", "log_format"]);
        let kept = old.keep_fixed(new);
        assert!(old.fixed_keys(&kept).is_empty());
        assert_eq!(kept.retention_hours, 1.0, "what a reload may change is not kept back");
        let mut raw = RawConfig::default();
        raw.apply_env(|k| (k == "SLUICE_LOG_FORMAT").then(|| "json".into())).unwrap();
        assert_eq!(raw.validate(1).unwrap().log_format, LogFormat::Json);
        let back = RawConfig::from_toml(&kept.to_toml(), Path::new("x")).unwrap().validate(1).unwrap();
        assert_eq!(back, kept);
    }
}
