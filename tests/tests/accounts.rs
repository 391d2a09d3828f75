//! Accounts at network scale, end to end: fakenet hosts of Bluesky's size
//! (500,000 accounts each, a day's share of them active), one trusted by
//! `trusted_hosts` and one not. The trusted host is relayed in full, past
//! the default account limit, exactly (`fakenet check` on its events); the
//! other is held at its limit, its further accounts stored throttled; the
//! host listings show each host's limit and trust; and a reload that
//! trusts the second host admits its throttled accounts from their next
//! event, without a restart.

mod support;

use fakenet::check::{self, CheckConfig};
use fakenet::runner::{self, ServeConfig};
use std::time::{Duration, Instant};
use support::*;

/// The default account limit in this test (the trusted one is 10M).
const LIMIT: u64 = 150;

/// A host as listHosts shows it.
fn listed(relay: &Relay, host: &str) -> serde_json::Value {
    let (st, body) = relay.http("GET", "/xrpc/com.atproto.sync.listHosts?limit=10", "").unwrap();
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["hosts"].as_array().unwrap().iter().find(|h| h["hostname"] == host).cloned().unwrap_or_default()
}

fn account_count(relay: &Relay, host: &str) -> u64 {
    listed(relay, host)["accountCount"].as_u64().unwrap_or(0)
}

/// Wait (bounded) until `f` holds.
fn wait_for(what: &str, relay: &Relay, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "{what} not within {timeout:?}\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_trusted_host_is_relayed_in_full_and_an_untrusted_one_held_at_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    // Two hosts of 500,000 accounts, 0.3% of them active (1,500 each):
    // about 4,000 events each reach well past LIMIT accounts.
    let mut net = runner::start(ServeConfig {
        hosts: 2,
        accounts: 500_000,
        skew: 0.0,
        active_share: 0.003,
        new_accounts_per_mille: 0.0,
        seed: 2201,
        rate: 300.0,
        max_events: Some(8_000),
        ledger: dir.path().join("ledger.jsonl"),
        ..ServeConfig::default()
    })
    .unwrap();
    let (trusted, other) = (net.info.hosts[0].clone(), net.info.hosts[1].clone());
    let population = net.shared.population.clone().expect("a derived population");
    for k in 0..2 {
        let n = population.initial_range(k).len();
        assert!(n >= 500_000, "{} holds {n} accounts", net.info.hosts[k]);
    }
    let config = |trust: &str| {
        format!(
            "plc_requests_per_second = 2000\nidentity_fetch_concurrency = 8\ntrusted_hosts = [{trust}]\n\
             [limits]\nhost_account_limit_default = {LIMIT}\n"
        )
    };
    let mut relay = Relay::new(dir.path(), &net.info.plc_url, 2, &config(&format!("{trusted:?}")));
    relay.start();
    crawl_all(&relay, &net, "");

    // The untrusted host reaches its limit and stays there while more of
    // its accounts act; the trusted one passes it.
    let dropped = || metric(&relay, "sluice_events_dropped_host_account_limit_total");
    wait_for("the untrusted host at its limit, accounts refused", &relay, Duration::from_secs(90), || {
        account_count(&relay, &other) == LIMIT && dropped() > 0
    });
    wait_for("the trusted host past the default limit", &relay, Duration::from_secs(90), || {
        account_count(&relay, &trusted) > 2 * LIMIT
    });
    assert_eq!(account_count(&relay, &other), LIMIT, "the limit holds");
    let (t, o) = (listed(&relay, &trusted), listed(&relay, &other));
    assert_eq!((t["trusted"].as_bool(), t["accountLimit"].as_u64()), (Some(true), Some(10_000_000)), "{t}");
    assert_eq!((o["trusted"].as_bool(), o["accountLimit"].as_u64()), (Some(false), Some(LIMIT)), "{o}");
    let (st, body) = relay.http("GET", &format!("/xrpc/com.atproto.sync.getHostStatus?hostname={other}"), "").unwrap();
    assert_eq!(st, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["accountLimit"].as_u64(), Some(LIMIT), "{status}");

    // A reload that trusts both: the second host's throttled accounts come
    // in from their next event; nothing restarts.
    assert!(net.events() < 6_000, "fakenet ran ahead of the relay ({} events): too little left", net.events());
    relay.write_config(dir.path(), &net.info.plc_url, 2, &config(&format!("{trusted:?}, {other:?}")));
    let pid = nix::unistd::Pid::from_raw(relay.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_for("the reload", &relay, Duration::from_secs(30), || relay.log_all().contains("SIGHUP: settings applied"));
    wait_for("the second host past its old limit", &relay, Duration::from_secs(90), || {
        account_count(&relay, &other) > LIMIT
    });
    assert_eq!(listed(&relay, &other)["trusted"].as_bool(), Some(true));

    // The trusted host, exactly: every one of its events, once, in order.
    net.wait_generation().unwrap();
    let report = check::run(&CheckConfig {
        relay: format!("ws://127.0.0.1:{}", relay.port),
        ledger: dir.path().join("ledger.jsonl"),
        cursor: Some(0),
        timeout: Duration::from_secs(120),
        settle: Duration::from_secs(1),
        wait_done: true,
        only_host: Some(trusted.clone()),
    })
    .unwrap();
    assert!(report.ok(), "{}\n{:?}\n{}", report.summary(), report.notes, relay.log_tail());
    assert!(report.other_hosts > 0, "the second host's events were in the stream too");
    relay.stop();
}
