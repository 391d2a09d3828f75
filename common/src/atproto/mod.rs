//! The AT Protocol, as far as a relay needs it (PROTOCOL.md): no I/O, no
//! clock, nothing of sluice's own process shape. Another relay could take
//! this room whole.
//!
//! Encodings: [`cbor`] (strict zero-copy DAG-CBOR), [`cid`], [`car`] (CAR
//! slices), [`syntax`] (DIDs, TIDs, handles, NSIDs). Identity: [`crypto`]
//! (keys and signatures), [`identity`] (DID documents), [`did`] (a DID as
//! compact bytes, for stores and caches), [`plc`] (PLC directory
//! operations, as its export log carries them). Repositories: [`mst`]
//! (Merkle Search Trees, partial trees, inversion), [`commit`] (stateless
//! `#commit`/`#sync` validation), [`repo`] (the write side, for fakenet
//! and tests). The stream: [`frame`] (subscribeRepos frames). The relay's
//! rules over it: [`policy`] (the stateful checks of PROTOCOL.md §5, as a
//! pure function). `spare` keeps the validation path's vectors per thread
//! for reuse.

pub mod car;
pub mod cbor;
pub mod cid;
pub mod commit;
pub mod crypto;
pub mod did;
pub mod frame;
pub mod identity;
pub mod mst;
pub mod plc;
pub mod policy;
pub mod repo;
mod spare;
pub mod syntax;
