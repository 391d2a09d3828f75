//! sluice-common: everything the relay's processes share that needs no I/O
//! runtime.
//!
//! Protocol core (PROTOCOL.md): [`cbor`] (strict zero-copy DAG-CBOR),
//! [`cid`], [`car`] (CAR slices), [`syntax`] (identifiers), [`crypto`] (keys
//! and signatures), [`identity`] (DID documents), [`mst`] (Merkle Search
//! Trees, partial trees, inversion), [`frame`] (subscribeRepos frames) and
//! [`commit`] (stateless `#commit`/`#sync` validation).
//!
//! Relay plumbing shared by its processes: [`config`], [`shm`] (control
//! block), [`ring`] (SPSC shared-memory ring) and [`ringrec`] (what the
//! ring carries), [`eventlog`] (segments, index, repair), [`policy`]
//! (stateful checks), [`partition`] (host → shard), [`http`] (the one
//! HTTP request-head parser), [`netguard`] (which hosts may be dialed),
//! [`host`] (host status and the shard assignment), [`failpoint`] (faults
//! on purpose, for tests), [`heap`] (freed heap back to the kernel). Nothing here spawns threads or tasks; the
//! validation code does no I/O and takes the time from its callers. What
//! does block, and so runs only on threads (or, for the log reader, on a
//! shard's executor where ARCHITECTURE.md says so): the event log's writes
//! and fsyncs (`eventlog`), the instance lock (`instance`), the doorbell
//! wait (`shm`), TLS roots loading (`tls`).

pub mod car;
pub mod cbor;
pub mod childfds;
pub mod cid;
pub mod commit;
pub mod config;
pub mod consumers;
pub mod crypto;
pub mod eventlog;
pub mod failpoint;
pub mod frame;
pub mod heap;
pub mod host;
pub mod http;
pub mod identity;
pub mod instance;
pub mod mst;
pub mod netguard;
pub mod partition;
pub mod policy;
pub mod repo;
pub mod ring;
pub mod ringrec;
pub mod runfile;
pub mod shm;
pub mod syntax;
pub mod tls;
