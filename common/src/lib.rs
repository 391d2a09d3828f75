//! sluice-common: everything the relay's processes share that needs no I/O
//! runtime, in three rooms:
//!
//! - [`atproto`]: the AT Protocol (DAG-CBOR, CIDs, CAR slices, keys, DID
//!   documents, MSTs, frames, commit validation, the relay's stateful
//!   rules). Nothing in it knows sluice's processes.
//! - [`ipc`]: what sluice's processes hand each other: shared memory and
//!   the control block, the rings and their records, the event log.
//! - [`process`]: sluice's process plumbing: configuration, host
//!   assignment, files in `data_dir/run`, the instance lock, failpoints,
//!   address checks, TLS roots.
//!
//! Nothing here spawns threads or tasks; the validation code does no I/O
//! and takes the time from its callers. What does block, and so runs only
//! on threads (or, for the log reader, on a shard's executor where
//! ARCHITECTURE.md says so): the event log's writes and fsyncs
//! (`ipc::eventlog`), the instance lock (`process::instance`), the doorbell
//! wait (`ipc::shm`), TLS roots loading (`process::tls`).

pub mod atproto;
pub mod ipc;
pub mod process;
