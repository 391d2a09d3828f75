//! Every list in atproto-interop-tests/syntax.
mod support;
use sluice_common::atproto::syntax::*;

fn check(file: &str, f: impl Fn(&str) -> bool, want: bool) {
    let lines = support::lines(&format!("atproto-interop-tests/syntax/{file}"));
    assert!(!lines.is_empty(), "{file} is empty");
    let wrong: Vec<&String> = lines.iter().filter(|l| f(l) != want).collect();
    assert!(wrong.is_empty(), "{file}: {} of {} wrong: {:?}", wrong.len(), lines.len(), wrong);
}

#[test]
fn did() {
    check("did_syntax_valid.txt", is_did, true);
    check("did_syntax_invalid.txt", is_did, false);
}

#[test]
fn handle() {
    check("handle_syntax_valid.txt", is_handle, true);
    check("handle_syntax_invalid.txt", is_handle, false);
}

#[test]
fn nsid() {
    check("nsid_syntax_valid.txt", is_nsid, true);
    check("nsid_syntax_invalid.txt", is_nsid, false);
}

#[test]
fn record_key() {
    check("recordkey_syntax_valid.txt", is_record_key, true);
    check("recordkey_syntax_invalid.txt", is_record_key, false);
}

#[test]
fn tid() {
    check("tid_syntax_valid.txt", is_tid, true);
    check("tid_syntax_invalid.txt", is_tid, false);
}

#[test]
fn at_identifier() {
    check("atidentifier_syntax_valid.txt", is_at_identifier, true);
    check("atidentifier_syntax_invalid.txt", is_at_identifier, false);
}

#[test]
fn at_uri() {
    check("aturi_syntax_valid.txt", is_at_uri, true);
    check("aturi_syntax_invalid.txt", is_at_uri, false);
}

#[test]
fn cid() {
    check("cid_syntax_valid.txt", is_cid_string, true);
    check("cid_syntax_invalid.txt", is_cid_string, false);
}

#[test]
fn uri() {
    check("uri_syntax_valid.txt", is_uri, true);
    check("uri_syntax_invalid.txt", is_uri, false);
}

#[test]
fn language() {
    check("language_syntax_valid.txt", |s| is_language(s) && is_valid_language(s), true);
    check("language_syntax_invalid.txt", is_language, false);
    check("language_parse_invalid.txt", is_language, true);
    check("language_parse_invalid.txt", is_valid_language, false);
}

#[test]
fn datetime() {
    check("datetime_syntax_valid.txt", |s| is_datetime_syntax(s) && Datetime::parse(s).is_some(), true);
    check("datetime_syntax_invalid.txt", is_datetime_syntax, false);
    check("datetime_parse_invalid.txt", is_datetime_syntax, true);
    check("datetime_parse_invalid.txt", |s| Datetime::parse(s).is_some(), false);
}
