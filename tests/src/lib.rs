//! sluice-tests: the synthetic network `fakenet` (library and binary) and
//! the helpers the end-to-end tests in `tests/tests/` share.

pub mod fakenet;
