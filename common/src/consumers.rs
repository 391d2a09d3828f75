//! The consumer lists shards publish for the admin API: written by each
//! shard to `data_dir/run/consumers-K.json` (see the shard's `consumers`
//! module), read by the db-writer's `GET /admin/consumers`.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConsumerInfo {
    pub remote: String,
    /// Unix seconds when the subscription began.
    pub since: u64,
    /// The `cursor` it asked for (None: live).
    pub cursor: Option<i64>,
    /// The last seq handed to it (0: none yet).
    pub last_seq: i64,
    pub frames: u64,
}

/// What a shard publishes.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub shard: usize,
    /// Unix seconds of the snapshot: a file of a dead shard goes stale.
    pub at: u64,
    /// The committed seq when taken (lag = committed - last_seq).
    pub committed: i64,
    pub consumers: Vec<ConsumerInfo>,
}

pub fn snapshot_path(run_dir: &Path, shard: usize) -> PathBuf {
    run_dir.join(format!("consumers-{shard}.json"))
}
