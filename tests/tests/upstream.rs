//! Upstream on a hostile and quiet network, end to end: `sluice run` with
//! short keep-alive settings (ping after 1 s of silence, cut after 3 s,
//! 2 s to connect and upgrade) against fakenet's normal hosts and one
//! hostile host per mode. Bounded: fixed event counts and deadlines.

mod support;

use fakenet::hostile::{self, Mode};
use fakenet::runner::{self, ServeConfig};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::*;

const KEEPALIVE: &str = "upstream_ping_interval_s = 1\nupstream_idle_timeout_s = 3\nupstream_connect_timeout_s = 2\n";

/// `name{labels} value` lines of the metrics page whose name is `name`.
fn metric(relay: &Relay, name: &str) -> HashMap<String, u64> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", relay.metrics_port)).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k[name.len()..].to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// Upstream closes summed over shards, by reason.
fn closes(relay: &Relay) -> HashMap<String, u64> {
    let mut by = HashMap::new();
    for (labels, v) in metric(relay, "sluice_shard_upstream_closes_total") {
        let reason = labels.split("reason=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?").to_owned();
        *by.entry(reason).or_insert(0) += v;
    }
    by
}

fn total(m: &HashMap<String, u64>) -> u64 {
    m.values().sum()
}

/// Every hostile mode at once beside a normal network: each hostile
/// connection ends within its bound and is counted by reason, `_health`
/// answers within 100 ms (p99; every answer within a second), the normal hosts' stream is exact,
/// and no shard restarts.
#[test]
fn hostile_hosts_cannot_freeze_a_shard_or_disturb_the_others() {
    let dir = tempfile::tempdir().unwrap();
    const EVENTS: u64 = 2500;
    let mut net = runner::start(ServeConfig {
        hosts: 4,
        accounts: 10,
        seed: 14,
        rate: 150.0,
        max_events: Some(EVENTS),
        ledger: dir.path().join("ledger.jsonl"),
        ..ServeConfig::default()
    })
    .unwrap();
    let hostiles: Vec<hostile::Hostile> = Mode::ALL.iter().map(|m| hostile::start(*m).unwrap()).collect();
    let mut relay = Relay::new(dir.path(), &net.info.plc_url, 2, KEEPALIVE);
    relay.start();
    crawl_all(&relay, &net, "");
    for h in &hostiles {
        let (st, body) = relay
            .http("POST", "/xrpc/com.atproto.sync.requestCrawl", &format!("{{\"hostname\":\"{}\"}}", h.host))
            .unwrap();
        assert_eq!(st, 200, "requestCrawl {}: {body}", h.host);
    }
    // While the network runs: _health stays quick on both shards (the
    // public port spreads connections over them).
    let mut took = Vec::new();
    while !net.shared.generation_done.load(std::sync::atomic::Ordering::Acquire) {
        let t = Instant::now();
        let (st, _) = relay.http("GET", "/xrpc/_health", "").expect("health answered");
        took.push(t.elapsed());
        assert_eq!(st, 200);
        std::thread::sleep(Duration::from_millis(50));
    }
    took.sort();
    let pct = |p: usize| took[(took.len() - 1) * p / 100];
    eprintln!(
        "_health during the hostile run: {} asked, p50 {:?}, p99 {:?}, max {:?}",
        took.len(),
        pct(50),
        pct(99),
        pct(100)
    );
    // A shard frozen by a hostile host would answer in seconds, not ms;
    // one answer just over 100 ms is this 2-core machine scheduling the
    // tests around it (seen in a full run: max 100.7 ms, p99 19.7 ms).
    assert!(pct(99) < Duration::from_millis(100), "_health p99 {:?}\n{}", pct(99), relay.log_tail());
    assert!(pct(100) < Duration::from_secs(1), "_health took {:?}\n{}", pct(100), relay.log_tail());
    net.wait_generation().unwrap();
    let report = check_exact(&relay, dir.path(), Duration::from_secs(60));
    assert!(report.relayed > EVENTS * 9 / 10, "{}", report.summary());
    let by = closes(&relay);
    eprintln!("upstream closes by reason: {by:?}");
    for h in &hostiles {
        assert!(h.connections.load(std::sync::atomic::Ordering::Relaxed) >= 1, "{:?} never dialed", h.mode);
    }
    let at_least = |reason: &str, n: u64| {
        assert!(by.get(reason).copied().unwrap_or(0) >= n, "{reason}: {by:?}\n{}", relay.log_tail());
    };
    // Empty continuations, 1-byte fragments, a 2^62 length: bytes without
    // a message. Pings past the rate. The slow status line: the deadline.
    // A silent host: no pong. Garbage, deep nesting, 2^32 items: bad frames.
    at_least("oversized", 3);
    at_least("ping_flood", 1);
    at_least("handshake_timeout", 1);
    at_least("idle", 1);
    at_least("bad_frame", 3);
    let restarts = metric(&relay, "sluice_child_restarts_total");
    assert_eq!(total(&restarts), 0, "a child restarted: {restarts:?}\n{}", relay.log_tail());
    relay.stop();
}

/// Quiet hosts stay connected: after the network goes silent, the relay
/// pings them and they answer, so for several idle timeouts no connection
/// ends and none is re-dialed.
#[test]
fn quiet_hosts_stay_connected() {
    let Setup { dir, mut net, mut relay } = Setup::start(
        ServeConfig { hosts: 3, accounts: 5, seed: 15, rate: 200.0, max_events: Some(200), ..ServeConfig::default() },
        1,
        KEEPALIVE,
    );
    net.wait_generation().unwrap();
    check_exact(&relay, dir.path(), Duration::from_secs(30));
    let before = closes(&relay);
    let connected = |r: &Relay| total(&metric(r, "sluice_shard_hosts_connected"));
    assert_eq!(connected(&relay), 3);
    // Three idle timeouts of silence.
    for _ in 0..18 {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(connected(&relay), 3, "a quiet host was cut: {:?}", closes(&relay));
    }
    let after = closes(&relay);
    assert_eq!(total(&after), total(&before), "connections ended while quiet: {before:?} -> {after:?}");
    relay.stop();
}

/// requestCrawl is hostile input: without allow_insecure_hosts, internal
/// names and addresses are refused with a reason and nothing is stored;
/// with it, a host that does not answer describeServer is refused too.
#[test]
fn request_crawl_refuses_internal_and_non_pds_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::new(dir.path(), "http://127.0.0.1:9", 1, "allow_insecure_hosts = false\n");
    relay.start();
    let refused = [
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0:2470",
        "127.0.0.1:2470",
        "10.0.0.1",
        "localhost",
        "metadata.google.internal",
        "printer.local",
        "foo.internal",
        "nas.home.arpa",
        "intranet",
        "http://pds.example.com",
        "[::1]",
    ];
    for h in refused {
        let (st, body) =
            relay.http("POST", "/xrpc/com.atproto.sync.requestCrawl", &format!("{{\"hostname\":\"{h}\"}}")).unwrap();
        assert_eq!(st, 400, "{h}: {body}");
        assert!(body.contains("InvalidRequest"), "{h}: {body}");
    }
    let (st, body) = relay.http("GET", "/xrpc/com.atproto.sync.listHosts", "").unwrap();
    assert_eq!(st, 200);
    assert!(!body.contains("hostname"), "a refused host was stored: {body}");
    relay.stop();

    // On loopback (allow_insecure_hosts): a port with no PDS behind it.
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::new(dir.path(), "http://127.0.0.1:9", 1, "");
    relay.start();
    let closed = free_port();
    let (st, body) = relay
        .http("POST", "/xrpc/com.atproto.sync.requestCrawl", &format!("{{\"hostname\":\"localhost:{closed}\"}}"))
        .unwrap();
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("describeServer"), "{body}");
    let (_, body) = relay.http("GET", "/xrpc/com.atproto.sync.listHosts", "").unwrap();
    assert!(!body.contains("hostname"), "{body}");
    relay.stop();
}

/// Host status tells the truth: hosts that go away turn `offline` (one
/// WARN each, not one per retry), then `idle` after
/// `host_offline_idle_days` (no longer dialed), and a requestCrawl once
/// they are back makes them `active` and connected again.
#[test]
fn unreachable_hosts_go_offline_then_idle_and_return_on_request_crawl() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |dir: &std::path::Path, base_port: u16| ServeConfig {
        hosts: 2,
        accounts: 4,
        seed: 16,
        rate: 200.0,
        max_events: Some(60),
        ledger: dir.join("ledger.jsonl"),
        base_port,
        ..ServeConfig::default()
    };
    // A free port can be taken by a test running alongside before fakenet
    // binds it: try another (bounded).
    let (base, mut net) = (0..5)
        .find_map(|_| {
            let base = free_port();
            runner::start(cfg(dir.path(), base)).ok().map(|net| (base, net))
        })
        .expect("fakenet could not bind a free port in 5 tries");
    // 0.0001 days: offline 8.6 s makes a host idle.
    let mut relay =
        Relay::new(dir.path(), &net.info.plc_url, 1, &format!("{KEEPALIVE}host_offline_idle_days = 0.0001\n"));
    relay.start();
    crawl_all(&relay, &net, "");
    net.wait_generation().unwrap();
    check_exact(&relay, dir.path(), Duration::from_secs(30));
    let hosts = net.info.hosts.clone();
    let status = |r: &Relay, h: &str| -> String {
        let (st, body) =
            r.http("GET", &format!("/xrpc/com.atproto.sync.getHostStatus?hostname={h}"), "").expect("answered");
        assert_eq!(st, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["status"].as_str().unwrap().to_owned()
    };
    let wait_all = |r: &Relay, want: &str, within: Duration| {
        let t = Instant::now();
        while !hosts.iter().all(|h| status(r, h) == want) {
            let now: Vec<String> = hosts.iter().map(|h| status(r, h)).collect();
            assert!(t.elapsed() < within, "not all {want} after {within:?}: {now:?}\n{}", r.log_tail());
            std::thread::sleep(Duration::from_millis(200));
        }
        t.elapsed()
    };
    drop(net);
    let took = wait_all(&relay, "offline", Duration::from_secs(40));
    eprintln!("both hosts offline {took:?} after the network went away");
    // The gauge follows within the supervisor's host poll (500 ms).
    let t = Instant::now();
    while !metrics_page(&relay).lines().any(|l| l == "sluice_hosts{status=\"offline\"} 2") {
        assert!(t.elapsed() < Duration::from_secs(3), "{}", metrics_page(&relay));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, list) = relay.http("GET", "/xrpc/com.atproto.sync.listHosts", "").unwrap();
    assert_eq!(list.matches("\"offline\"").count(), 2, "{list}");
    let took = wait_all(&relay, "idle", Duration::from_secs(40));
    eprintln!("both hosts idle {took:?} later");
    let log = relay.log_all();
    for h in &hosts {
        let offline = log.lines().filter(|l| l.contains("host offline:") && l.contains(h.as_str())).count();
        assert_eq!(offline, 1, "{h}: one WARN for going offline\n{log}");
        assert_eq!(log.lines().filter(|l| l.contains("now idle") && l.contains(h.as_str())).count(), 1, "{log}");
    }
    // Back on the same ports (same seed: the same hosts and history), but
    // idle hosts are not dialed until they ask.
    let dir2 = tempfile::tempdir().unwrap();
    let mut net = runner::start(cfg(dir2.path(), base)).unwrap();
    net.wait_generation().unwrap();
    let connected = |r: &Relay| total(&metric(r, "sluice_shard_hosts_connected"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(connected(&relay), 0, "an idle host was dialed");
    crawl_all(&relay, &net, "");
    wait_all(&relay, "active", Duration::from_secs(5));
    let t = Instant::now();
    while connected(&relay) < 2 {
        assert!(t.elapsed() < Duration::from_secs(15), "hosts not reconnected\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("both hosts connected {:?} after requestCrawl", t.elapsed());
    relay.stop();
}
