//! Every XRPC answer the relay gives, checked against the lexicons in the
//! fixtures (`lexicons/com/atproto/sync/*.json`) by a small schema checker:
//! required fields present, no `null` anywhere (an optional field is
//! omitted, not null), types, string formats (did, cid, tid, handle),
//! integer bounds, known values; error answers are `{"error", "message"?}`
//! with a name the lexicon declares (or the XRPC generic ones).

mod support;

use fakenet::runner::ServeConfig;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;
use support::*;

/// The lexicon documents by id.
fn lexicons() -> HashMap<String, Value> {
    let dir = fixtures().join("lexicons/com/atproto/sync");
    let mut out = HashMap::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let v: Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
        out.insert(v["id"].as_str().unwrap().to_owned(), v);
    }
    assert!(out.len() >= 10, "lexicons missing in {}", dir.display());
    out
}

struct Checker {
    docs: HashMap<String, Value>,
}

impl Checker {
    /// The definition a `ref` names, seen from document `doc`.
    fn resolve(&self, doc: &str, r: &str) -> (String, Value) {
        let (id, name) = match r.split_once('#') {
            Some(("", n)) => (doc.to_owned(), n.to_owned()),
            Some((i, n)) => (i.to_owned(), n.to_owned()),
            None => (r.to_owned(), "main".to_owned()),
        };
        let def = self.docs.get(&id).unwrap_or_else(|| panic!("no lexicon {id}"))["defs"][&name].clone();
        assert!(!def.is_null(), "no def {name} in {id}");
        (id, def)
    }

    fn check(&self, doc: &str, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
        if v.is_null() {
            errs.push(format!("{at}: null (omit an optional field instead)"));
            return;
        }
        match schema["type"].as_str().unwrap_or("") {
            "ref" => {
                let (id, def) = self.resolve(doc, schema["ref"].as_str().unwrap());
                self.check(&id, &def, v, at, errs);
            }
            "object" => {
                let Some(obj) = v.as_object() else {
                    return errs.push(format!("{at}: not an object: {v}"));
                };
                for r in schema["required"].as_array().into_iter().flatten() {
                    let r = r.as_str().unwrap();
                    if !obj.contains_key(r) {
                        errs.push(format!("{at}: required field {r:?} missing"));
                    }
                }
                for (k, val) in obj {
                    let ps = &schema["properties"][k];
                    if ps.is_null() {
                        // Objects are open; a field the lexicon does not name
                        // is allowed, but must not be null either.
                        if val.is_null() {
                            errs.push(format!("{at}.{k}: null"));
                        }
                        continue;
                    }
                    self.check(doc, ps, val, &format!("{at}.{k}"), errs);
                }
            }
            "array" => {
                let Some(items) = v.as_array() else { return errs.push(format!("{at}: not an array: {v}")) };
                for (i, it) in items.iter().enumerate() {
                    self.check(doc, &schema["items"], it, &format!("{at}[{i}]"), errs);
                }
            }
            "boolean" => {
                if !v.is_boolean() {
                    errs.push(format!("{at}: not a boolean: {v}"));
                }
            }
            "integer" => match v.as_i64() {
                None => errs.push(format!("{at}: not an integer: {v}")),
                Some(n) => {
                    if schema["minimum"].as_i64().is_some_and(|m| n < m)
                        || schema["maximum"].as_i64().is_some_and(|m| n > m)
                    {
                        errs.push(format!("{at}: {n} out of bounds"));
                    }
                }
            },
            "string" => {
                let Some(s) = v.as_str() else { return errs.push(format!("{at}: not a string: {v}")) };
                let ok = match schema["format"].as_str() {
                    None => true,
                    Some("did") => sluice_common::atproto::syntax::is_did(s),
                    Some("cid") => sluice_common::atproto::syntax::is_cid_string(s),
                    Some("tid") => sluice_common::atproto::syntax::is_tid(s),
                    Some("handle") => sluice_common::atproto::syntax::is_handle(s),
                    Some("datetime") => s.ends_with('Z') || s.contains('+'),
                    Some(f) => panic!("format {f} not checked here"),
                };
                if !ok {
                    errs.push(format!("{at}: {s:?} is not a {}", schema["format"]));
                }
                if let Some(known) = schema["knownValues"].as_array() {
                    if !known.iter().any(|k| k.as_str() == Some(s)) {
                        errs.push(format!("{at}: {s:?} is not one of {known:?}"));
                    }
                }
            }
            t => panic!("{at}: schema type {t} not handled"),
        }
    }

    /// Check one answer of method `id`.
    fn answer(&self, id: &str, status: u16, body: &str) -> Vec<String> {
        let main = &self.docs[id]["defs"]["main"];
        let mut errs = Vec::new();
        if status != 200 {
            let v: Value = match serde_json::from_str(body) {
                Ok(v) => v,
                Err(e) => return vec![format!("{id}: error answer {status} is not JSON ({e}): {body}")],
            };
            let name = v["error"].as_str().unwrap_or("");
            let declared: Vec<&str> =
                main["errors"].as_array().into_iter().flatten().filter_map(|e| e["name"].as_str()).collect();
            const GENERIC: [&str; 6] = [
                "InvalidRequest",
                "AuthRequired",
                "Forbidden",
                "RateLimitExceeded",
                "InternalServerError",
                "MethodNotImplemented",
            ];
            if !declared.contains(&name) && !GENERIC.contains(&name) {
                errs.push(format!("{id}: error {name:?} ({status}) is neither declared {declared:?} nor generic"));
            }
            if !v["message"].is_null() && !v["message"].is_string() {
                errs.push(format!("{id}: error message is not a string: {body}"));
            }
            for (k, val) in v.as_object().into_iter().flatten() {
                if val.is_null() {
                    errs.push(format!("{id}: error field {k} is null"));
                }
            }
            return errs;
        }
        match &main["output"]["schema"] {
            Value::Null => {
                // No output: nothing, or an empty object.
                if !body.trim().is_empty() && serde_json::from_str::<Value>(body).ok() != Some(serde_json::json!({})) {
                    errs.push(format!("{id}: no output declared but got {body}"));
                }
            }
            schema => match serde_json::from_str::<Value>(body) {
                Ok(v) => self.check(id, schema, &v, id, &mut errs),
                Err(e) => errs.push(format!("{id}: not JSON ({e}): {body}")),
            },
        }
        errs
    }
}

#[test]
fn every_xrpc_answer_matches_its_lexicon() {
    let checker = Checker { docs: lexicons() };
    let dir = tempfile::tempdir().unwrap();
    // An account limit of 5 per host leaves some accounts throttled (no rev).
    let Setup { dir: _dir, net, mut relay } = Setup::start_with(
        dir,
        ServeConfig { hosts: 3, accounts: 8, seed: 94, rate: 0.0, max_events: Some(400), ..ServeConfig::default() },
        1,
        "[limits]\nhost_account_limit_default = 5\n",
        |net| net.wait_generation().expect("fakenet generates"),
    );
    check_exact_or_throttled(&relay);
    let mut asked = 0;
    let mut all = Vec::new();
    let mut ask = |method: &str, verb: &str, query: &str, body: &str| -> (u16, String) {
        let path = format!("/xrpc/com.atproto.sync.{method}{query}");
        let (st, b) = relay.http(verb, &path, body).unwrap_or_else(|| panic!("{path}: no answer"));
        all.extend(checker.answer(&format!("com.atproto.sync.{method}"), st, &b));
        asked += 1;
        (st, b)
    };
    let (_, hosts) = ask("listHosts", "GET", "", "");
    ask("listHosts", "GET", "?limit=1", "");
    ask("listHosts", "GET", "?limit=0", "");
    let host = net.info.hosts[0].clone();
    ask("getHostStatus", "GET", &format!("?hostname={host}"), "");
    assert_eq!(ask("getHostStatus", "GET", "?hostname=no.such.host", "").0, 400);
    ask("getHostStatus", "GET", "", "");
    let (_, repos) = ask("listRepos", "GET", "?limit=3", "");
    let cursor = serde_json::from_str::<Value>(&repos).unwrap()["cursor"].as_str().map(str::to_owned);
    if let Some(c) = cursor {
        ask("listRepos", "GET", &format!("?limit=3&cursor={c}"), "");
    }
    ask("listRepos", "GET", "?limit=1000", "");
    ask("listRepos", "GET", "?limit=x", "");
    let dids: Vec<String> = net.shared.repos.read().unwrap().keys().cloned().collect();
    let mut without_rev = 0;
    for did in &dids {
        let (st, b) = ask("getRepoStatus", "GET", &format!("?did={did}"), "");
        if st == 200 && !b.contains("\"rev\"") {
            without_rev += 1;
        }
        ask("getLatestCommit", "GET", &format!("?did={did}"), "");
    }
    for bad in ["?did=did:plc:nosuchaccountxxxxxxxxxx", "?did=%00%ff", ""] {
        let (st, _) = ask("getRepoStatus", "GET", bad, "");
        assert_eq!(st, 400);
        ask("getLatestCommit", "GET", bad, "");
    }
    ask("requestCrawl", "POST", "", &format!("{{\"hostname\":\"{host}\"}}"));
    ask("requestCrawl", "POST", "", "{}");
    ask("requestCrawl", "POST", "", "not json");
    eprintln!("{asked} answers checked; {} listHosts bytes", hosts.len());
    assert!(asked > 2 * dids.len(), "{asked}");
    // Some accounts were throttled (no commit stored): their answers,
    // without a rev, were among those checked.
    assert!(without_rev > 0, "no account without a rev was asked about");
    assert!(all.is_empty(), "answers off their lexicon:\n{}", all.join("\n"));
    relay.stop();
}

/// The network's events are in (throttled accounts are not relayed, so
/// the exact check does not apply): wait until the hosts' cursors stop
/// moving.
fn check_exact_or_throttled(relay: &Relay) {
    let seq = |r: &Relay| {
        metrics_page(r).lines().find_map(|l| l.strip_prefix("sluice_committed_seq ")?.trim().parse::<u64>().ok())
    };
    let t = std::time::Instant::now();
    let mut last = None;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = seq(relay);
        if now.is_some_and(|n| n > 0) && now == last {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the relay did not settle");
        last = now;
    }
}

/// The checker itself: it refuses what the relay must not answer.
#[test]
fn the_checker_catches_nulls_missing_fields_bad_formats_and_unknown_errors() {
    let c = Checker { docs: lexicons() };
    let ok = c.answer("com.atproto.sync.getRepoStatus", 200, r#"{"did":"did:plc:abc","active":true}"#);
    assert!(ok.is_empty(), "{ok:?}");
    for (id, st, body) in [
        ("com.atproto.sync.getRepoStatus", 200, r#"{"did":"did:plc:abc","active":true,"rev":null}"#),
        ("com.atproto.sync.getRepoStatus", 200, r#"{"did":"did:plc:abc"}"#),
        ("com.atproto.sync.getRepoStatus", 200, r#"{"did":"nope","active":true}"#),
        ("com.atproto.sync.getRepoStatus", 200, r#"{"did":"did:plc:abc","active":false,"status":"gone"}"#),
        ("com.atproto.sync.getLatestCommit", 200, r#"{"cid":"x","rev":"3k2a"}"#),
        ("com.atproto.sync.listHosts", 200, r#"{"hosts":[{"hostname":"a","seq":"1"}]}"#),
        ("com.atproto.sync.getHostStatus", 400, r#"{"error":"NoSuchThing"}"#),
        ("com.atproto.sync.getHostStatus", 500, "oops"),
        ("com.atproto.sync.requestCrawl", 200, r#"{"ok":1}"#),
    ] {
        assert!(!c.answer(id, st, body).is_empty(), "{id} {st} {body} passed");
    }
}
