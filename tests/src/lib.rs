//! End-to-end tests and fakenet.
