//! Shared helpers for the fixture tests: where the fixtures are, and how
//! the JSON forms in them become DAG-CBOR frames.
#![allow(dead_code)]

use sluice_common::atproto::cbor::{Value, Writer};
use std::path::PathBuf;

/// `$SLUICE_FIXTURES`, else `../shared/fixtures` from the repo root. A test
/// that cannot find them fails: the README's test command fetches them.
pub fn fixtures() -> PathBuf {
    let dir = match std::env::var_os("SLUICE_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"),
    };
    assert!(
        dir.join("SOURCES.md").is_file(),
        "fixtures not found at {} (set SLUICE_FIXTURES, or run scripts/test which fetches them)",
        dir.display()
    );
    dir
}

pub fn read(rel: &str) -> Vec<u8> {
    let p = fixtures().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn json(rel: &str) -> serde_json::Value {
    serde_json::from_slice(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Lines of a syntax list: comments (`#...`) and blank lines skipped,
/// whitespace kept (it is what some cases test).
pub fn lines(rel: &str) -> Vec<String> {
    String::from_utf8(read(rel))
        .unwrap()
        .split('\n')
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// Build a frame from a JSON `{header: {op, t}, body}` as the scenarios
/// and indigo's test data write them.
pub fn frame_from_json(header: &serde_json::Value, body: &serde_json::Value) -> Vec<u8> {
    let mut w = Writer::new();
    Value::from_json(header).unwrap().write(&mut w);
    Value::from_json(body).unwrap().write(&mut w);
    w.into_inner()
}

pub fn b64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD.decode(s.trim_end_matches('=')).unwrap()
}
