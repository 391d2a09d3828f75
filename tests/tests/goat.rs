//! `goat relay admin` works unchanged: every Go-relay admin path goat
//! calls, with the request goat sends (method, query, JSON body, Basic
//! `admin:<password>` or Bearer auth), answers 200 and decodes the way
//! goat decodes it (arrays where goat expects arrays, a string cursor).

mod support;

use base64::Engine;
use fakenet::runner::ServeConfig;
use serde_json::{json, Value};
use std::time::Duration;
use support::*;

struct Goat<'a> {
    relay: &'a Relay,
    auth: String,
}

impl Goat<'_> {
    /// goat's `RelayAdminClient.Do`: query params, an optional JSON body;
    /// anything but 200 is an error.
    fn call(&self, method: &str, path: &str, params: &[(&str, &str)], body: Option<Value>) -> Value {
        let (st, text) = self.raw(method, path, params, body);
        assert_eq!(st, 200, "{method} {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"))
    }

    fn raw(&self, method: &str, path: &str, params: &[(&str, &str)], body: Option<Value>) -> (u16, String) {
        let q: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let target = if q.is_empty() { path.to_owned() } else { format!("{path}?{}", q.join("&")) };
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let raw = self.relay.http_raw_with(method, &target, &body, &[("authorization", &self.auth)]).expect("answered");
        let status = raw.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, raw.split("\r\n\r\n").nth(1).unwrap_or("").to_owned())
    }
}

#[test]
fn goat_relay_admin_paths_work_as_goat_calls_them() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("admin.pw");
    std::fs::write(&pw, "goat-secret\n").unwrap();
    let Setup { dir, net, mut relay } = Setup::start_with(
        dir,
        ServeConfig { hosts: 2, accounts: 4, seed: 95, rate: 0.0, max_events: Some(80), ..ServeConfig::default() },
        1,
        &format!("admin_password_file = {pw:?}\n"),
        |net| net.wait_generation().expect("fakenet generates"),
    );
    check_exact(&relay, dir.path(), Duration::from_secs(60));
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("admin:goat-secret"));
    let goat = Goat { relay: &relay, auth: basic };
    let bearer = Goat { relay: &relay, auth: "Bearer goat-secret".into() };
    let wrong = Goat { relay: &relay, auth: "Bearer nope".into() };
    assert_eq!(wrong.raw("GET", "/admin/pds/list", &[], None).0, 401);

    // Accounts: takedown, list (paged as goat pages), reverse.
    let mut dids: Vec<String> = net.shared.repos.read().unwrap().keys().cloned().collect();
    dids.sort();
    for d in &dids[..2] {
        assert_eq!(goat.call("POST", "/admin/repo/takeDown", &[], Some(json!({"did": d})))["success"], "true");
    }
    let list = |size: &str| {
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let resp = goat.call("GET", "/admin/repo/takedowns", &[("cursor", &cursor), ("size", size)], None);
            for d in resp["dids"].as_array().expect("dids is an array") {
                out.push(d.as_str().unwrap().to_owned());
            }
            match resp.get("cursor") {
                None => break,
                Some(c) if c == "" => break,
                Some(c) => cursor = c.as_str().expect("goat reads the cursor as a string").to_owned(),
            }
        }
        out
    };
    assert_eq!(list("500"), dids[..2].to_vec());
    assert_eq!(list("1"), dids[..2].to_vec(), "paging one at a time");
    bearer.call("POST", "/admin/repo/reverseTakedown", &[], Some(json!({"did": dids[0]})));
    assert_eq!(list("500"), dids[1..2].to_vec());

    // Hosts: requestCrawl, list, block/unblock (?host=), changeLimits.
    let host = net.info.hosts[0].clone();
    goat.call("POST", "/admin/pds/requestCrawl", &[], Some(json!({"hostname": host})));
    let row = |g: &Goat| -> Value {
        let rows = g.call("GET", "/admin/pds/list", &[], None);
        let rows = rows.as_array().expect("goat decodes []map[string]any").clone();
        assert_eq!(rows.len(), 2);
        rows.into_iter().find(|r| r["Host"] == host.as_str()).expect("the host is listed")
    };
    let r = row(&goat);
    for k in [
        "ID",
        "CreatedAt",
        "Host",
        "SSL",
        "Cursor",
        "Registered",
        "Blocked",
        "RepoCount",
        "RepoLimit",
        "HasActiveConnection",
        "UserCount",
    ] {
        assert!(!r[k].is_null(), "{k} missing in {r}");
    }
    assert_eq!(r["Blocked"], false);
    goat.call("POST", "/admin/pds/block", &[("host", &host)], None);
    assert_eq!(row(&goat)["Blocked"], true);
    goat.call("POST", "/admin/pds/unblock", &[("host", &host)], None);
    assert_eq!(row(&goat)["Blocked"], false);
    goat.call("POST", "/admin/pds/changeLimits", &[], Some(json!({"host": host, "repo_limit": 7})));
    assert_eq!(row(&goat)["RepoLimit"], 7);
    assert_eq!(goat.raw("POST", "/admin/pds/changeLimits", &[], Some(json!({"host": host}))).0, 400);

    // Domains.
    goat.call("POST", "/admin/subs/banDomain", &[], Some(json!({"domain": "bad.example"})));
    let bans = goat.call("GET", "/admin/subs/listDomainBans", &[], None);
    assert_eq!(bans["banned_domains"], json!(["bad.example"]));
    goat.call("POST", "/admin/subs/unbanDomain", &[], Some(json!({"domain": "bad.example"})));
    assert_eq!(goat.call("GET", "/admin/subs/listDomainBans", &[], None)["banned_domains"], json!([]));

    // Consumers: an array of objects, one per subscriber.
    let tcp = std::net::TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
    let url = format!("ws://127.0.0.1:{}/xrpc/com.atproto.sync.subscribeRepos", relay.port);
    let (_ws, _) = tungstenite::client(url, tcp).unwrap();
    let t = std::time::Instant::now();
    loop {
        let rows = goat.call("GET", "/admin/consumers/list", &[], None);
        let rows = rows.as_array().expect("goat decodes []map[string]any");
        if let Some(r) = rows.first() {
            assert!(r["remote_addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.1")), "{r}");
            assert!(r["id"].is_number() && r["events_consumed"].is_number(), "{r}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the consumer is never listed");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The actions are in the audit log like sluice's own.
    let audit = goat.call("GET", "/admin/audit", &[("limit", "50")], None);
    let actions: Vec<&str> = audit["entries"].as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    for a in
        ["takedown", "reverse_takedown", "ban_host", "unban_host", "host_account_limit", "ban_domain", "unban_domain"]
    {
        assert!(actions.contains(&a), "{a} not audited: {actions:?}");
    }
    relay.stop();
}
