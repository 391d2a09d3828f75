//! sluice-tests: the end-to-end tests (`tests/`) and the bench binaries
//! (`src/bin`: `sluice-bench`, `sluice-scale`, `sluice-fanout`). This library holds only
//! what the benches share; the synthetic network is the `fakenet` crate.

pub mod http;
pub mod ports;
pub mod procinfo;
