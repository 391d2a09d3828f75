//! Identity at network scale, end to end: a relay against fakenet's
//! misbehaving PLC directory (latency, 429 with Retry-After, 502 bursts),
//! broken did:web hosts, unregistered DIDs and an `#identity` flood, with
//! the exact check, and the directory's own counts of what it was asked
//! (`fakenet::server::DirStats`) held to the relay's rules: one lookup per
//! DID at a time, its rate kept, its Retry-After obeyed, nothing asked
//! again after a restart, a shard's death or a reshard, and no host held
//! back by an account whose identity cannot be had.

mod support;

use fakenet::runner::ServeConfig;
use fakenet::server::DirectoryConfig;
use fakenet::world::FaultRates;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::*;

fn stat(v: &std::sync::atomic::AtomicU64) -> u64 {
    v.load(Ordering::Relaxed)
}

/// A slow directory (400 ms an answer) and 120 accounts on one host: the
/// lookups run side by side (one per DID, each DID asked once), while the
/// host's frames for accounts already known flow behind them. One at a
/// time, the lookups alone would take 48 s.
#[test]
fn a_slow_directory_is_asked_concurrently_and_once_per_did() {
    let net = ServeConfig {
        hosts: 1,
        accounts: 120,
        skew: 0.0,
        seed: 101,
        rate: 0.0,
        max_events: Some(900),
        new_accounts_per_mille: 0.0,
        directory: DirectoryConfig { latency: Duration::from_millis(400), ..DirectoryConfig::default() },
        ..ServeConfig::default()
    };
    let s = Setup::start_after_generation(net, 1, "identity_fetch_concurrency = 8\nplc_requests_per_second = 1000");
    let t = Instant::now();
    let report = check_exact(&s.relay, s.dir.path(), Duration::from_secs(90));
    let took = t.elapsed();
    assert_eq!(report.relayed, s.net.events(), "{}", report.summary());
    let st = &s.net.shared.dir_stats;
    let asked = stat(&st.doc_requests);
    assert!(asked >= 100, "only {asked} documents asked for");
    assert!(took < Duration::from_secs(30), "{asked} lookups of 400 ms took {took:?}: not side by side");
    assert!(stat(&st.max_in_flight) >= 4, "at most {} requests at once", stat(&st.max_in_flight));
    assert_eq!(st.dids_asked_concurrently(), 0, "a DID asked twice at once");
    assert_eq!(st.max_requests_per_did(), 1, "a DID asked twice");
    assert_eq!(metric(&s.relay, "sluice_identity_fetches_total{outcome=\"ok\""), asked);
}

/// A directory that takes 5 requests a second (429 with Retry-After: 2
/// past it) and fails in 502 bursts, and a relay configured for far more:
/// nothing is lost, the relay stops on the first 429 for its Retry-After,
/// and keeps its connections.
#[test]
fn a_directory_that_says_slow_down_is_obeyed() {
    let net = ServeConfig {
        hosts: 2,
        accounts: 40,
        skew: 0.0,
        seed: 102,
        rate: 0.0,
        max_events: Some(500),
        new_accounts_per_mille: 0.0,
        directory: DirectoryConfig {
            latency: Duration::from_millis(20),
            rate: 5.0,
            retry_after_s: 2,
            burst_every: Some(Duration::from_secs(4)),
            burst_len: Duration::from_millis(600),
            ..DirectoryConfig::default()
        },
        ..ServeConfig::default()
    };
    let s = Setup::start_after_generation(net, 2, "identity_fetch_concurrency = 4\nplc_requests_per_second = 100");
    let report = check_exact(&s.relay, s.dir.path(), Duration::from_secs(180));
    assert_eq!(report.relayed, s.net.events(), "{}", report.summary());
    let st = &s.net.shared.dir_stats;
    let (asked, limited) = (stat(&st.doc_requests) + stat(&st.export_requests), stat(&st.answered_429));
    assert!(limited > 0, "the relay never ran into the directory's rate ({asked} requests)");
    assert!(
        stat(&st.during_retry_after) <= 4,
        "{} requests came while a Retry-After ran",
        stat(&st.during_retry_after)
    );
    assert!(stat(&st.connections) <= 16, "{} connections for {asked} requests: not kept", stat(&st.connections));
    assert!(metric(&s.relay, "sluice_identity_fetches_total{outcome=\"rate_limited\"") > 0);
}

/// A relay kept under the directory's rate never sees a 429, and no
/// second of requests goes over its own `plc_requests_per_second`.
#[test]
fn the_relay_keeps_to_its_own_rate() {
    let net = ServeConfig {
        hosts: 2,
        accounts: 30,
        skew: 0.0,
        seed: 103,
        rate: 0.0,
        max_events: Some(300),
        new_accounts_per_mille: 0.0,
        directory: DirectoryConfig { rate: 10.0, retry_after_s: 1, ..DirectoryConfig::default() },
        ..ServeConfig::default()
    };
    let s = Setup::start_after_generation(net, 1, "plc_requests_per_second = 6");
    let report = check_exact(&s.relay, s.dir.path(), Duration::from_secs(120));
    assert_eq!(report.relayed, s.net.events(), "{}", report.summary());
    let st = &s.net.shared.dir_stats;
    assert_eq!(stat(&st.answered_429), 0);
    assert!(stat(&st.max_per_second) <= 7, "{} requests within a second", stat(&st.max_per_second));
}

/// What the relay resolved is stored: a restart, a shard killed and a
/// reshard ask the directory nothing more about accounts it knows, and
/// key rotations reach it through the directory's export (no request per
/// DID); the directory never sees more than the relay's rate.
#[test]
fn identities_persist_and_the_export_is_followed() {
    let net = ServeConfig {
        hosts: 3,
        accounts: 25,
        skew: 0.0,
        seed: 104,
        rate: 120.0,
        duration: Some(Duration::from_secs(28)),
        new_accounts_per_mille: 0.0,
        faults: FaultRates::parse("rotatekey=0.01").unwrap(),
        ..ServeConfig::default()
    };
    let Setup { dir, net, mut relay } = Setup::start(net, 1, "plc_requests_per_second = 20");
    // Warm: every account has acted (25 + 13 + 8 of them, 120 events/s).
    wait_events(&net, 1200);
    let st = &net.shared.dir_stats;
    let warm = stat(&st.doc_requests);
    assert!(warm >= 40, "only {warm} documents fetched while warming");
    // A restart.
    relay.stop();
    relay.start();
    wait_events(&net, 1800);
    // A shard killed (its successor starts with an empty cache).
    let shards = children_matching(relay.pid(), "shard --id 0");
    assert_eq!(shards.len(), 1);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shards[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_events(&net, 2400);
    // A reshard to two shards.
    relay.write_config(dir.path(), &net.info.plc_url, 2, "plc_requests_per_second = 20");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(relay.pid()), nix::sys::signal::Signal::SIGHUP).unwrap();
    let t = Instant::now();
    while children_matching(relay.pid(), "shard --id").len() != 2 {
        assert!(t.elapsed() < Duration::from_secs(30), "no second shard after SIGHUP:\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    relay.wait_health(Duration::from_secs(30));
    let report = check_exact(&relay, dir.path(), Duration::from_secs(120));
    assert!(report.relayed > 2400, "{}", report.summary());
    let after = stat(&st.doc_requests);
    assert!(after - warm <= 2, "{} documents asked for again after warming ({warm} before)", after - warm);
    assert!(stat(&st.export_requests) > 10, "the export was not followed");
    assert!(metric(&relay, "sluice_identity_export_applied_total") > 0, "no rotation came through the export");
    assert!(stat(&st.max_per_second) <= 21, "{} requests within a second", stat(&st.max_per_second));
}

/// Accounts whose identity cannot be had (a did:web name that does not
/// exist, a did:web host answering 500, one never answering, did:plc
/// accounts the directory does not know) lose their own events, counted,
/// and nothing else: their hosts stay connected and active, every other
/// account's events come through, exactly.
#[test]
fn unresolvable_accounts_never_hold_back_their_host() {
    let net = ServeConfig {
        hosts: 2,
        accounts: 30,
        skew: 0.0,
        seed: 105,
        rate: 80.0,
        duration: Some(Duration::from_secs(12)),
        new_accounts_per_mille: 0.0,
        broken_web: 3,
        unregistered: 2,
        ..ServeConfig::default()
    };
    let s = Setup::start(net, 2, "identity_wait_max_s = 3");
    let report = check_exact(&s.relay, s.dir.path(), Duration::from_secs(120));
    assert!(report.relayed > 500, "{}", report.summary());
    assert!(
        metric(&s.relay, "sluice_shard_drops_total{shard=\"0\",reason=\"identity_unresolved\"") > 0
            || metric(&s.relay, "sluice_shard_drops_total{shard=\"1\",reason=\"identity_unresolved\"") > 0
    );
    let (_, hosts) = s.relay.http("GET", "/xrpc/com.atproto.sync.listHosts", "").unwrap();
    assert!(!hosts.contains("offline") && !hosts.contains("idle"), "{hosts}");
    // Unresolved DIDs are remembered: the directory is not asked about
    // an unregistered DID for each of its events.
    let st = &s.net.shared.dir_stats;
    let p = s.net.shared.population.as_ref().unwrap();
    let unregistered: Vec<String> = (3..5).map(|i| p.did(i)).collect();
    for d in &unregistered {
        assert!(st.for_did(d).0 <= 2, "{d} asked {} times", st.for_did(d).0);
    }
}

/// A host floods `#identity` events for other hosts' accounts: they are
/// dropped, the directory is asked little for them (the host's refresh
/// rate), and the other hosts' events come through exactly.
#[test]
fn an_identity_flood_costs_the_directory_little() {
    let net = ServeConfig {
        hosts: 3,
        accounts: 20,
        skew: 0.0,
        seed: 106,
        rate: 100.0,
        duration: Some(Duration::from_secs(12)),
        new_accounts_per_mille: 0.0,
        faults: FaultRates::parse("identityflood=0.02").unwrap(),
        ..ServeConfig::default()
    };
    let s = Setup::start(net, 1, "plc_export = false\n[limits]\nidentity_refreshes_per_host_per_second = 1");
    let report = check_exact(&s.relay, s.dir.path(), Duration::from_secs(120));
    assert!(report.relayed > 600, "{}", report.summary());
    let ledger = fakenet::ledger::Ledger::read(&s.dir.path().join("ledger.jsonl")).unwrap();
    let flood = ledger.entries.iter().filter(|e| e.why == "identityflood").count() as u64;
    assert!(flood >= 500, "only {flood} flooded #identity events");
    let asked = stat(&s.net.shared.dir_stats.doc_requests);
    // 60 accounts, fetched once; refreshes: 3 hosts x (1 a second x 15 s
    // + a burst of 10).
    assert!(asked <= 60 + 75, "{asked} documents asked for during a flood of {flood}");
    assert!(metric(&s.relay, "sluice_identity_refreshes_skipped_total") > 0);
}
