//! Process plumbing (ours): what the supervisor, the shards and the
//! db-writer need around the protocol. [`config`] (TOML and environment
//! into a validated `Config`), [`clockcache`] (a cache of millions of
//! fixed-size entries, CLOCK eviction), [`host`] (host status and the shard
//! assignment), [`partition`] (host → shard), [`consumers`] and
//! [`runfile`] (the files shards publish in `data_dir/run`), [`instance`]
//! (one relay per data directory), [`childfds`] (descriptors passed to
//! children), [`failpoint`] (faults on purpose, for tests), [`http`] (the
//! one HTTP request-head parser), [`netguard`] (which addresses may be
//! dialed), [`rate`] (a token bucket), [`tls`] (client TLS roots), [`heap`] (freed heap back to the
//! kernel).

pub mod childfds;
pub mod clockcache;
pub mod config;
pub mod consumers;
pub mod failpoint;
pub mod heap;
pub mod host;
pub mod http;
pub mod instance;
pub mod netguard;
pub mod partition;
pub mod rate;
pub mod runfile;
pub mod tls;
