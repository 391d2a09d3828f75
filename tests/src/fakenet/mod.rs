//! fakenet: a synthetic AT Protocol network for tests, the demo and
//! benchmarks. See `tests/README.md` for the ledger format and flags.
//!
//! - [`world`]: the seeded generator (accounts, repos, events, faults);
//! - [`ledger`]: what was emitted and what a relay must do with it;
//! - [`server`]: the hosts, the PLC directory, did:web documents, the fake
//!   upstream relay's listHosts, the control endpoint (tokio);
//! - [`check`]: the exact checker that subscribes to a relay.

pub mod check;
pub mod ledger;
pub mod runner;
pub mod server;
pub mod tls;
pub mod world;
pub mod ws;
