//! Admin password guessing: failures are counted in a metric, and past 10
//! failures a minute an address gets 429 (even with the right password)
//! for a minute; other requests are unaffected.

mod support;

use support::*;

#[test]
fn failed_admin_logins_are_counted_and_throttled() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("admin.pw");
    std::fs::write(&pw, "right-password\n").unwrap();
    let mut relay = Relay::new(dir.path(), "http://127.0.0.1:9", 1, &format!("admin_password_file = {pw:?}\n"));
    relay.start();
    let get = |auth: &str| {
        let raw = relay.http_raw_with("GET", "/admin/hosts", "", &[("authorization", auth)]).expect("answered");
        raw.split(' ').nth(1).and_then(|s| s.parse::<u16>().ok()).unwrap_or(0)
    };
    assert_eq!(get("Bearer right-password"), 200);
    for i in 0..11 {
        assert_eq!(get("Bearer guess"), 401, "guess {i}");
    }
    assert_eq!(get("Bearer right-password"), 429, "blocked after 11 failures in a minute");
    assert_eq!(get("Bearer guess"), 429);
    // The public API is not throttled.
    let (st, _) = relay.http("GET", "/xrpc/com.atproto.sync.listHosts", "").unwrap();
    assert_eq!(st, 200);
    let metrics = metrics_page(&relay);
    let failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_admin_auth_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no failure counter:\n{metrics}"));
    assert_eq!(failures, 11);
    relay.stop();
}
