//! fakenet: a synthetic AT Protocol network for tests, the demo and
//! benchmarks: a crate of its own (library and the `fakenet` binary) that
//! the shipped `sluice` binary does not link (its `demo` feature, which
//! packaging leaves off, is the only way in). The ledger format is in [`ledger`]'s docs, the corpus
//! layout in [`runner`]'s, the flags in `fakenet --help`.
//!
//! - [`world`]: the seeded generator (accounts, repos, events, faults);
//! - [`ledger`]: what was emitted and what a relay must do with it;
//! - [`server`]: the hosts, the PLC directory, did:web documents, the fake
//!   upstream relay's listHosts, the control endpoint (tokio);
//! - [`check`]: the exact checker that subscribes to a relay;
//! - [`hostile`]: hosts that misbehave on the wire, one mode each.

pub mod check;
pub mod hostile;
pub mod ledger;
pub mod population;
pub mod runner;
pub mod server;
pub mod tls;
pub mod world;
pub mod ws;
