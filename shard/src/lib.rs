//! sluice-shard (built in later steps).
