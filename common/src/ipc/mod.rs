//! What sluice's processes hand each other (ours, not the protocol's):
//! [`shm`] (memfd mappings, futex doorbell, the control block with the
//! committed watermark and every shared counter), [`ring`] (the SPSC
//! shared-memory ring a shard writes and the db-writer reads) and
//! [`ringrec`] (what a ring record carries), [`eventlog`] (the durable
//! log: segments, offset index, repair, retention), [`idwire`] (the identity
//! socket between the shards and the db-writer's identity service).
//!
//! This room and the mappings in it hold nearly all of the workspace's
//! `unsafe`; ARCHITECTURE.md lists each block and the tests that stress it.

pub mod eventlog;
pub mod idwire;
pub mod ring;
pub mod ringrec;
pub mod shm;
