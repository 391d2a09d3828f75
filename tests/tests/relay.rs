//! The relay end to end, in every process it has in production: `sluice
//! run` (supervisor, db-writer, 2 shards, its private PostgreSQL started
//! with initdb/pg_ctl in a temp dir) against fakenet (20 hosts × 50
//! accounts, the default fault mix), checked exactly against fakenet's
//! ledger. Bounded: a fixed event count, every wait has a deadline.

mod support;

use fakenet::check::{self, CheckConfig};
use fakenet::runner::{self, ServeConfig};
use fakenet::world::FaultRates;
use sluice_common::atproto::frame::{self, Message};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

#[test]
fn relays_a_faulty_network_exactly_across_restart_and_process_kills() {
    let dir = tempfile::tempdir().unwrap();
    const EVENTS: u64 = 3000;
    let mut net = runner::start(ServeConfig {
        hosts: 20,
        accounts: 50,
        seed: 42,
        rate: 150.0,
        max_events: Some(EVENTS),
        faults: FaultRates::default_mix(),
        migrations: true,
        ledger: dir.path().join("ledger.jsonl"),
        web_accounts: 3,
        ..ServeConfig::default()
    })
    .unwrap();
    let mut relay = Relay::new(dir.path(), &net.info.plc_url, 2, "");
    relay.start();
    for h in &net.info.hosts {
        let (st, body) = relay
            .http("POST", "/xrpc/com.atproto.sync.requestCrawl", &format!("{{\"hostname\":\"{h}\"}}"))
            .expect("requestCrawl answered");
        assert_eq!(st, 200, "requestCrawl {h}: {body}");
    }
    // A public-looking hostname without allow_insecure would be crawled;
    // garbage is refused.
    let (st, _) = relay.http("POST", "/xrpc/com.atproto.sync.requestCrawl", "{\"hostname\":\"not a host\"}").unwrap();
    assert_eq!(st, 400);

    // Mid-stream: a clean restart.
    let wait_events = |n: u64, net: &runner::Running| {
        let t = Instant::now();
        while net.events() < n {
            assert!(t.elapsed() < Duration::from_secs(120), "fakenet too slow: {} events", net.events());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_events(EVENTS / 4, &net);
    let took = relay.stop();
    eprintln!("SIGTERM stop took {took:?}");
    assert!(took < Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    relay.start();

    // Later: kill -9 one shard; the supervisor restarts it.
    wait_events(EVENTS * 6 / 10, &net);
    let shards = children_matching(relay.pid(), "shard --id 0");
    assert_eq!(shards.len(), 1, "shard 0 not found");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shards[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    let t = Instant::now();
    loop {
        let now = children_matching(relay.pid(), "shard --id 0");
        if now.len() == 1 && now[0] != shards[0] {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "shard 0 was not restarted:\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Later still: kill -9 the db-writer mid-commit-stream; the supervisor
    // restarts it, it cuts the log back to Postgres and re-reads the rings.
    wait_events(EVENTS * 8 / 10, &net);
    let writers = children_matching(relay.pid(), "db-writer");
    assert_eq!(writers.len(), 1, "db-writer not found");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(writers[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    let t = Instant::now();
    loop {
        let now = children_matching(relay.pid(), "db-writer");
        if now.len() == 1 && now[0] != writers[0] {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "db-writer was not restarted:\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    relay.wait_health(Duration::from_secs(60));
    net.wait_generation().unwrap();

    // Everything, exactly, from the start of the window.
    let report = check::run(&CheckConfig {
        relay: format!("ws://127.0.0.1:{}", relay.port),
        ledger: dir.path().join("ledger.jsonl"),
        cursor: Some(0),
        timeout: Duration::from_secs(180),
        settle: Duration::from_secs(3),
        wait_done: true,
        only_host: None,
    })
    .unwrap();
    eprintln!("{}", report.summary());
    assert!(report.ok(), "{}\n{:?}\n{}", report.summary(), report.notes, relay.log_tail());
    assert!(report.relayed > EVENTS / 2, "{}", report.summary());

    // Seqs are dense from 1, and two replays from 0 are identical.
    let last = report.last_seq;
    let a = read_stream(relay.port, 0, last, Duration::from_secs(60));
    let b = read_stream(relay.port, 0, last, Duration::from_secs(60));
    assert_eq!(a.len() as i64, last);
    for (i, (s, _)) in a.iter().enumerate() {
        assert_eq!(*s, i as i64 + 1);
    }
    assert!(a == b, "two replays from cursor 0 differ");
    // A cursor in the middle gives exactly the rest.
    let mid = last / 2;
    let c = read_stream(relay.port, mid, last, Duration::from_secs(60));
    assert_eq!(c.first().map(|x| x.0), Some(mid + 1));
    assert!(c[..] == a[mid as usize..]);

    let took = relay.stop();
    eprintln!("final SIGTERM stop took {took:?}");
}

fn first_frame(port: u16, query: &str) -> Message<'static> {
    let url = format!("ws://127.0.0.1:{port}/xrpc/com.atproto.sync.subscribeRepos{query}");
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (mut ws, _) = tungstenite::client(url, tcp).unwrap();
    let b: &'static [u8] = ws.read().unwrap().into_data().to_vec().leak();
    frame::decode(b).unwrap().message
}

#[test]
fn cursor_errors_health_and_routes() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = runner::start(ServeConfig {
        hosts: 1,
        accounts: 3,
        rate: 0.0,
        max_events: Some(40),
        ledger: dir.path().join("ledger.jsonl"),
        ..ServeConfig::default()
    })
    .unwrap();
    net.wait_generation().unwrap();
    let mut relay = Relay::new(dir.path(), &net.info.plc_url, 1, "[limits]\nconsumer_lag_events_max = 10");
    relay.start();
    let (st, body) = relay.http("GET", "/xrpc/_health", "").unwrap();
    assert_eq!(st, 200);
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    let (st, _) = relay.http("GET", "/xrpc/com.atproto.sync.nothingHere", "").unwrap();
    assert_eq!(st, 404);
    let (st, body) = relay.http("GET", "/xrpc/com.atproto.sync.listHosts", "").unwrap();
    assert_eq!((st, body.as_str()), (200, "{\"hosts\":[]}"));
    // Requests that arrive in two pieces, split at every byte (PROTOCOL.md
    // section 8): a GET the shard answers, a POST with a body it forwards
    // to the query workers, and a WebSocket upgrade.
    let upgrade = "GET /xrpc/com.atproto.sync.subscribeRepos HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n\
                   connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n";
    let post_body = "{\"hostname\":\"not a host\"}";
    let post = format!(
        "POST /xrpc/com.atproto.sync.requestCrawl HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{post_body}",
        post_body.len()
    );
    let get = "GET /xrpc/_health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    for (req, want) in [(get, "HTTP/1.1 200"), (post.as_str(), "HTTP/1.1 400"), (upgrade, "HTTP/1.1 101")] {
        for cut in 1..req.len() {
            let mut s = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
            s.set_nodelay(true).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&req.as_bytes()[..cut]).unwrap();
            std::thread::sleep(Duration::from_millis(1));
            s.write_all(&req.as_bytes()[cut..]).unwrap();
            let mut got = [0u8; 12];
            s.read_exact(&mut got).unwrap();
            assert_eq!(std::str::from_utf8(&got).unwrap(), want, "split at byte {cut} of {req:?}");
        }
    }
    // A cursor ahead of the stream: error frame FutureCursor.
    match first_frame(relay.port, "?cursor=999999") {
        Message::Error { error, .. } => assert_eq!(error, "FutureCursor"),
        other => panic!("expected FutureCursor, got {other:?}"),
    }
    let host = &net.info.hosts[0];
    let (st, _) =
        relay.http("POST", "/xrpc/com.atproto.sync.requestCrawl", &format!("{{\"hostname\":\"{host}\"}}")).unwrap();
    assert_eq!(st, 200);
    let t = Instant::now();
    loop {
        let (_, body) = relay.http("GET", "/xrpc/_health", "").unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["seq"].as_i64().unwrap_or(0) >= 40 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "events did not arrive: {body}\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (st, body) = relay.http("GET", &format!("/xrpc/com.atproto.sync.getHostStatus?hostname={host}"), "").unwrap();
    assert_eq!(st, 200, "{body}");
    let upstream_last = net.shared.hosts[0].last_seq();
    assert!(body.contains(&format!("\"seq\":{upstream_last}")), "{body} (host at {upstream_last})");
    // Metrics: the counters agree with what happened.
    let mut m = TcpStream::connect(("127.0.0.1", relay.metrics_port)).unwrap();
    m.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut page = String::new();
    m.read_to_string(&mut page).unwrap();
    let metric = |name: &str| -> u64 {
        page.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(u64::MAX)
    };
    let committed = metric("sluice_committed_seq ");
    assert!(committed >= 40, "{page}");
    assert_eq!(metric("sluice_events_relayed_total "), committed, "{page}");
    assert_eq!(metric("sluice_shard_hosts_connected{shard=\"0\"} "), 1, "{page}");
    assert!(metric("sluice_ring_capacity_bytes{shard=\"0\"} ") > 0, "{page}");
    // More than consumer_lag_events_max behind: ConsumerTooSlow.
    match first_frame(relay.port, "?cursor=1") {
        Message::Error { error, .. } => assert_eq!(error, "ConsumerTooSlow"),
        other => panic!("expected ConsumerTooSlow, got {other:?}"),
    }
    // Within the lag: the events after the cursor, in order.
    match first_frame(relay.port, "?cursor=35") {
        Message::Event(e) => assert_eq!(e.seq(), Some(36)),
        other => panic!("expected seq 36, got {other:?}"),
    }
    relay.stop();
}

/// The replay window: retention (here 0.002 h, 7.2 s) removes whole
/// segments once their newest record is older than the window, never the
/// current one; a cursor before the window gets `#info OutdatedCursor` and
/// then the window from its first event; cursor 0 starts at the window's
/// first event.
#[test]
fn retention_removes_old_segments_and_cursors_before_them_are_outdated() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = runner::start(ServeConfig {
        hosts: 4,
        accounts: 20,
        seed: 5,
        rate: 0.0,
        max_events: Some(9_000),
        ledger: dir.path().join("ledger.jsonl"),
        ..ServeConfig::default()
    })
    .unwrap();
    net.wait_generation().unwrap();
    // The smallest segments the config allows (8 MiB), so a few exist.
    let mut relay =
        Relay::new(dir.path(), &net.info.plc_url, 1, "segment_size_bytes = 8388608\nretention_hours = 0.002");
    relay.start();
    for h in &net.info.hosts {
        relay.http("POST", "/xrpc/com.atproto.sync.requestCrawl", &format!("{{\"hostname\":\"{h}\"}}")).unwrap();
    }
    let events_dir = dir.path().join("data").join("events");
    let t = Instant::now();
    let mut seq = 0;
    let mut most_segments = 0;
    while seq < 9_000 {
        let (_, body) = relay.http("GET", "/xrpc/_health", "").unwrap();
        seq = serde_json::from_str::<serde_json::Value>(&body).unwrap()["seq"].as_i64().unwrap_or(0);
        most_segments = most_segments.max(sluice_common::ipc::eventlog::list_segments(&events_dir).unwrap().len());
        assert!(t.elapsed() < Duration::from_secs(120), "only {seq} events relayed:\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    }
    // Retention leaves the current segment only.
    let t = Instant::now();
    let oldest = loop {
        let segs = sluice_common::ipc::eventlog::list_segments(&events_dir).unwrap();
        most_segments = most_segments.max(segs.len());
        if segs.len() == 1 && segs[0] > 1 {
            break segs[0];
        }
        assert!(t.elapsed() < Duration::from_secs(60), "retention left {segs:?}:\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(most_segments >= 2, "expected several segments, saw at most {most_segments}");
    match first_frame(relay.port, "?cursor=0") {
        Message::Event(e) => assert_eq!(e.seq(), Some(oldest)),
        other => panic!("expected seq {oldest}, got {other:?}"),
    }
    let url = format!("ws://127.0.0.1:{}/xrpc/com.atproto.sync.subscribeRepos?cursor=5", relay.port);
    let tcp = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (mut ws, _) = tungstenite::client(url, tcp).unwrap();
    let info = ws.read().unwrap().into_data();
    match frame::decode(&info).unwrap().message {
        Message::Event(sluice_common::atproto::frame::Event::Info(i)) => assert_eq!(i.name, "OutdatedCursor"),
        other => panic!("expected #info OutdatedCursor, got {other:?}"),
    }
    let next = ws.read().unwrap().into_data();
    match frame::decode(&next).unwrap().message {
        Message::Event(e) => assert_eq!(e.seq(), Some(oldest)),
        other => panic!("expected seq {oldest}, got {other:?}"),
    }
    relay.stop();
}

/// wss:// upstreams: fakenet's hosts speak TLS with a CA made for the run;
/// the relay trusts it through `tls_ca_file`, hosts enter as https:// URLs,
/// and the stream checks exact. A host entered without its scheme is
/// plain text (loopback) and gets nothing from a TLS host, not garbage.
#[test]
fn relays_wss_upstreams_with_an_extra_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let mut net = runner::start(ServeConfig {
        hosts: 3,
        accounts: 10,
        seed: 11,
        rate: 0.0,
        max_events: Some(600),
        faults: FaultRates::parse("badsig,missingblock,wronghost,futurerev").unwrap(),
        ledger: dir.path().join("ledger.jsonl"),
        tls_ca_out: Some(ca.clone()),
        ..ServeConfig::default()
    })
    .unwrap();
    net.wait_generation().unwrap();
    let mut relay = Relay::new(dir.path(), &net.info.plc_url, 2, &format!("tls_ca_file = {:?}", ca.to_string_lossy()));
    relay.start();
    for h in &net.info.hosts {
        let (st, body) = relay
            .http("POST", "/xrpc/com.atproto.sync.requestCrawl", &format!("{{\"hostname\":\"https://{h}\"}}"))
            .unwrap();
        assert_eq!(st, 200, "{body}");
    }
    let report = check::run(&CheckConfig {
        relay: format!("ws://127.0.0.1:{}", relay.port),
        ledger: dir.path().join("ledger.jsonl"),
        cursor: Some(0),
        timeout: Duration::from_secs(60),
        settle: Duration::from_secs(2),
        wait_done: true,
        only_host: None,
    })
    .unwrap();
    assert!(report.ok(), "{}\n{:?}\n{}", report.summary(), report.notes, relay.log_tail());
    assert!(report.relayed > 300, "{}", report.summary());
    relay.stop();
}

/// `bootstrap_relay`: the relay lists another relay's hosts at start and
/// crawls them without any requestCrawl.
#[test]
fn bootstraps_hosts_from_another_relays_list() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = runner::start(ServeConfig {
        hosts: 3,
        accounts: 5,
        rate: 0.0,
        max_events: Some(120),
        ledger: dir.path().join("ledger.jsonl"),
        ..ServeConfig::default()
    })
    .unwrap();
    net.wait_generation().unwrap();
    let extra = format!("bootstrap_relay = {:?}", net.info.relay_listhosts_url);
    let mut relay = Relay::new(dir.path(), &net.info.plc_url, 1, &extra);
    relay.start();
    let report = check::run(&CheckConfig {
        relay: format!("ws://127.0.0.1:{}", relay.port),
        ledger: dir.path().join("ledger.jsonl"),
        cursor: Some(0),
        timeout: Duration::from_secs(60),
        settle: Duration::from_millis(500),
        wait_done: true,
        only_host: None,
    })
    .unwrap();
    assert!(report.ok(), "{}\n{:?}\n{}", report.summary(), report.notes, relay.log_tail());
    assert_eq!(report.relayed, net.events(), "every event of a network without faults");
    let (_, body) = relay.http("GET", "/xrpc/com.atproto.sync.listHosts", "").unwrap();
    for h in &net.info.hosts {
        assert!(body.contains(h.as_str()), "{h} missing from {body}");
    }
    check_repo_endpoints(&relay, &net);
    relay.stop();
}

/// listRepos (paged), getLatestCommit and getRepo against the last commit
/// or sync of each account in the relay's own stream.
fn check_repo_endpoints(relay: &Relay, net: &runner::Running) {
    use serde_json::Value;
    use std::collections::BTreeMap;
    let (_, body) = relay.http("GET", "/xrpc/com.atproto.sync.getLatestCommit?did=did:plc:nobody", "").unwrap();
    assert!(body.contains("RepoNotFound"), "{body}");
    // did -> (head, rev) of its last #commit (None for a #sync: head unchecked).
    let mut want: BTreeMap<String, (Option<String>, String)> = BTreeMap::new();
    let frames = {
        // Everything relayed so far: read until the stream has been quiet.
        let url = format!("ws://127.0.0.1:{}/xrpc/com.atproto.sync.subscribeRepos?cursor=0", relay.port);
        let tcp = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
        let (mut ws, _) = tungstenite::client(url, tcp).unwrap();
        let mut out = Vec::new();
        while let Ok(m) = ws.read() {
            if let tungstenite::Message::Binary(b) = m {
                out.push(b.to_vec());
            }
            assert!(out.len() <= 10_000, "stream longer than the network");
        }
        out
    };
    assert!(!frames.is_empty());
    for f in &frames {
        match frame::decode(f).unwrap().message {
            Message::Event(frame::Event::Commit(c)) => {
                want.insert(c.repo.to_owned(), (Some(c.commit.to_string()), c.rev.to_owned()));
            }
            Message::Event(frame::Event::Sync(s)) => {
                want.insert(s.did.to_owned(), (None, s.rev.to_owned()));
            }
            _ => {}
        }
    }
    // listRepos, four at a time.
    let mut listed: BTreeMap<String, Value> = BTreeMap::new();
    let mut cursor = String::new();
    for page in 0.. {
        assert!(page < 100, "listRepos does not end");
        let (st, body) = relay.http("GET", &format!("/xrpc/com.atproto.sync.listRepos?limit=4{cursor}"), "").unwrap();
        assert_eq!(st, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let repos = v["repos"].as_array().unwrap();
        assert!(repos.len() <= 4);
        for r in repos {
            let did = r["did"].as_str().unwrap().to_owned();
            // Pages follow the store's key order (not the DIDs'): each
            // account once.
            assert!(listed.insert(did.clone(), r.clone()).is_none(), "listRepos lists {did} twice");
        }
        match v["cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(listed.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "listRepos vs the stream");
    let mut active = None;
    for (did, r) in &listed {
        let (head, rev) = &want[did];
        assert_eq!(r["rev"].as_str(), Some(rev.as_str()), "{did}: {r}");
        if let Some(head) = head {
            assert_eq!(r["head"].as_str(), Some(head.as_str()), "{did}: {r}");
        }
        let (st, body) = relay.http("GET", &format!("/xrpc/com.atproto.sync.getLatestCommit?did={did}"), "").unwrap();
        if r["active"] == Value::Bool(true) {
            assert_eq!(st, 200, "{did}: {body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!((&v["cid"], &v["rev"]), (&r["head"], &r["rev"]), "{did}");
            active = Some(did.clone());
        } else {
            let status = r["status"].as_str().unwrap();
            assert!(st == 400 || !["takendown", "suspended", "deactivated", "deleted"].contains(&status), "{body}");
        }
    }
    // getRepo: a redirect to the account's PDS, with the query kept.
    let did = active.expect("an active account");
    let raw = relay.http_raw("GET", &format!("/xrpc/com.atproto.sync.getRepo?did={did}&since=abc"), "").unwrap();
    assert!(raw.starts_with("HTTP/1.1 302"), "{raw}");
    let location = raw.lines().find_map(|l| l.strip_prefix("location: ")).expect("a location header").trim();
    assert!(
        net.info
            .hosts
            .iter()
            .any(|h| location == format!("http://{h}/xrpc/com.atproto.sync.getRepo?did={did}&since=abc")),
        "{location}"
    );
}

/// SIGHUP with a new shard_count: the supervisor restarts the db-writer and
/// the shards on the new config, mid-stream, and nothing is lost or doubled.
#[test]
fn reload_to_more_shards_mid_stream_loses_nothing() {
    const EVENTS: u64 = 1500;
    let Setup { dir, mut net, mut relay } = Setup::start(
        ServeConfig {
            hosts: 6,
            accounts: 10,
            seed: 21,
            rate: 150.0,
            max_events: Some(EVENTS),
            ..ServeConfig::default()
        },
        1,
        "",
    );
    wait_events(&net, EVENTS / 3);
    assert_eq!(children_matching(relay.pid(), "shard --id").len(), 1);
    // A consumer across the reshard: every event up to the restart, then
    // `#info RelayRestarting` and a close frame (1012), not a dropped TCP.
    let until = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX));
    let watcher = watch(relay.port, 0, until, Duration::from_secs(60));
    // Only once it is streaming: a SIGHUP that came first would find it
    // still waiting for its first event (seen in CI: no seqs, then 1012).
    watcher.wait_seen(1, Duration::from_secs(30));
    // The reload also moves the metrics endpoint.
    relay.metrics_port = free_port();
    relay.write_config(dir.path(), &net.info.plc_url, 2, "");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(relay.pid()), nix::sys::signal::Signal::SIGHUP).unwrap();
    let t = Instant::now();
    while children_matching(relay.pid(), "shard --id").len() != 2 {
        assert!(t.elapsed() < Duration::from_secs(30), "no second shard after SIGHUP:\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    relay.wait_health(Duration::from_secs(30));
    let w = watcher.join().unwrap();
    assert_eq!(w.close_code, Some(1012), "{w:?}");
    assert_eq!(w.infos, ["RelayRestarting"], "{w:?}");
    assert!(w.dropped.is_none() && !w.seqs.is_empty(), "{w:?}");
    assert_eq!(gaps_and_repeats(&w.seqs), [], "{w:?}");
    let metrics_page = |port: u16| -> Option<String> {
        let mut m = TcpStream::connect(("127.0.0.1", port)).ok()?;
        m.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").ok()?;
        let mut page = String::new();
        m.read_to_string(&mut page).ok()?;
        Some(page)
    };
    let t = Instant::now();
    while !metrics_page(relay.metrics_port).is_some_and(|p| p.contains("sluice_committed_seq")) {
        assert!(t.elapsed() < Duration::from_secs(10), "no metrics on the new port:\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    // (Whether the old port is free is not asserted: a test running in
    // parallel may take it.)
    let log = std::fs::read_to_string(&relay.log).unwrap();
    assert!(log.contains("SIGHUP: metrics endpoint moved"), "{}", relay.log_tail());
    net.wait_generation().unwrap();
    let report = check_exact(&relay, dir.path(), Duration::from_secs(120));
    assert!(report.relayed >= EVENTS * 9 / 10, "{}", report.summary());
    relay.stop();
}

/// SIGHUP with shard_count, ring size and listen unchanged restarts
/// nothing: the same shard and db-writer processes run on, a consumer
/// connected across the reload sees every event on one connection, and the
/// changed settings apply (one per process: the shard's `consumers_max`,
/// the query workers' `public_request_crawl`).
#[test]
fn reload_in_place_keeps_consumers_and_applies_settings() {
    const EVENTS: u64 = 1200;
    let Setup { dir, mut net, mut relay } = Setup::start(
        ServeConfig {
            hosts: 4,
            accounts: 10,
            seed: 23,
            rate: 150.0,
            max_events: Some(EVENTS),
            ..ServeConfig::default()
        },
        1,
        "",
    );
    let until = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX));
    let watcher = watch(relay.port, 0, until.clone(), Duration::from_secs(180));
    wait_events(&net, EVENTS / 3);
    let before = (children_matching(relay.pid(), "shard --id"), children_matching(relay.pid(), "db-writer"));
    relay.write_config(dir.path(), &net.info.plc_url, 1, "public_request_crawl = false\n[limits]\nconsumers_max = 1");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(relay.pid()), nix::sys::signal::Signal::SIGHUP).unwrap();
    let t = Instant::now();
    while !relay.log_all().contains("SIGHUP: settings applied") {
        assert!(t.elapsed() < Duration::from_secs(10), "no reload:\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The shard takes its settings from the pipe, the db-writer from
    // SIGHUP: both within a second.
    let t = Instant::now();
    loop {
        let sub = relay.http_raw_with(
            "GET",
            "/xrpc/com.atproto.sync.subscribeRepos",
            "",
            &[
                ("upgrade", "websocket"),
                ("connection", "Upgrade"),
                ("sec-websocket-version", "13"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
        );
        let crawl = relay.http("POST", "/xrpc/com.atproto.sync.requestCrawl", "{\"hostname\":\"example.com\"}");
        let full = sub.as_deref().is_some_and(|r| r.starts_with("HTTP/1.1 503") && r.contains("TooManyConsumers"));
        let closed = crawl.as_ref().is_some_and(|(st, _)| *st == 401 || *st == 403);
        if full && closed {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "settings not applied: {sub:?} {crawl:?}\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    // And back, for the check's own subscription.
    relay.write_config(dir.path(), &net.info.plc_url, 1, "public_request_crawl = false");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(relay.pid()), nix::sys::signal::Signal::SIGHUP).unwrap();
    let t = Instant::now();
    while relay.log_all().matches("SIGHUP: settings applied").count() < 2 {
        assert!(t.elapsed() < Duration::from_secs(10), "no second reload:\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = (children_matching(relay.pid(), "shard --id"), children_matching(relay.pid(), "db-writer"));
    assert_eq!(before, after, "a process was restarted");
    net.wait_generation().unwrap();
    let report = check_exact(&relay, dir.path(), Duration::from_secs(120));
    let committed = sluice_tests::http::metric(relay.metrics_port, "sluice_committed_seq") as i64;
    until.store(committed, std::sync::atomic::Ordering::Release);
    let w = watcher.join().unwrap();
    assert!(w.dropped.is_none() && w.close_code.is_none(), "{w:?}");
    assert_eq!(w.seqs.first(), Some(&1), "{w:?}");
    assert_eq!(w.seqs.last(), Some(&committed), "{w:?}");
    assert_eq!(gaps_and_repeats(&w.seqs), [], "{w:?}");
    assert!(report.relayed >= EVENTS * 9 / 10, "{}", report.summary());
    relay.stop();
}

/// The private PostgreSQL is killed (SIGKILL to the postmaster) mid-stream:
/// the db-writer pauses intake (`_health` 503 "database unavailable")
/// instead of exiting, the supervisor starts the cluster again (crash
/// recovery), the writer reconnects and resumes; nothing is lost or
/// doubled, and no child restarts.
#[test]
fn survives_a_postgres_crash_mid_stream() {
    const EVENTS: u64 = 1500;
    let Setup { dir, mut net, mut relay } = Setup::start(
        ServeConfig {
            hosts: 4,
            accounts: 10,
            seed: 31,
            rate: 150.0,
            max_events: Some(EVENTS),
            ..ServeConfig::default()
        },
        1,
        "",
    );
    wait_events(&net, EVENTS / 3);
    let pid_file = std::fs::read_to_string(dir.path().join("data/pg/postmaster.pid")).unwrap();
    let pg: i32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pg), nix::sys::signal::Signal::SIGKILL).unwrap();
    net.wait_generation().unwrap();
    let report = check_exact(&relay, dir.path(), Duration::from_secs(150));
    assert!(report.relayed >= EVENTS * 9 / 10, "{}", report.summary());
    let log = std::fs::read_to_string(&relay.log).unwrap();
    assert!(log.contains("private PostgreSQL is not running; starting it"), "no PostgreSQL restart in the log");
    assert!(
        log.contains("Postgres does not answer: intake paused"),
        "the db-writer did not pause:\n{}",
        relay.log_tail()
    );
    assert!(log.contains("Postgres answers again; intake resumed"), "the db-writer did not resume");
    assert!(!log.contains("db-writer exited"), "the db-writer exited instead of pausing");
    relay.stop();
}

/// The admin API through `sluice admin`: a takedown is an `#account` event
/// with the relay's seq and status takendown, reversible; a disconnected
/// host comes back with requestCrawl; requestCrawl can be made admin-only;
/// a banned host is disconnected; no password, no admin.
#[test]
fn admin_takedown_and_host_ban() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("admin.pw");
    std::fs::write(&pw, "hunter2\n").unwrap();
    let Setup { dir, net, mut relay } = Setup::start_with(
        dir,
        ServeConfig { hosts: 2, accounts: 5, seed: 41, rate: 0.0, max_events: Some(100), ..ServeConfig::default() },
        1,
        &format!("admin_password_file = {:?}", pw.to_string_lossy()),
        |net| net.wait_generation().expect("fakenet generates"),
    );
    check_exact(&relay, dir.path(), Duration::from_secs(60));
    let admin = |args: &[&str]| {
        let out = Command::new(sluice_bin())
            .args(["admin", "--url", &format!("http://127.0.0.1:{}", relay.port), "--password-file"])
            .arg(&pw)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "sluice admin {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // An account active upstream (fakenet also deactivates some), so the
    // reversal's combined status is "active".
    let did = net.shared.repos.read().unwrap().iter().find(|(_, r)| r.active).map(|(d, _)| d.clone()).unwrap();
    let seq = admin(&["takedown", &did])["seq"].as_i64().unwrap();
    match first_frame(relay.port, &format!("?cursor={}", seq - 1)) {
        Message::Event(sluice_common::atproto::frame::Event::Account(a)) => {
            assert_eq!((a.seq, a.did, a.active, a.status), (seq, did.as_str(), false, Some("takendown")));
        }
        other => panic!("expected the takedown #account, got {other:?}"),
    }
    let (_, body) = relay.http("GET", &format!("/xrpc/com.atproto.sync.getRepoStatus?did={did}"), "").unwrap();
    assert!(body.contains("\"status\":\"takendown\""), "{body}");
    let seq2 = admin(&["reverse-takedown", &did])["seq"].as_i64().unwrap();
    assert_eq!(seq2, seq + 1);
    match first_frame(relay.port, &format!("?cursor={seq}")) {
        Message::Event(sluice_common::atproto::frame::Event::Account(a)) => assert!(a.active && a.status.is_none()),
        other => panic!("expected the reversal #account, got {other:?}"),
    }
    // While taken down, replay hides the account's earlier records; after
    // the reversal they are back (the flagging runs in the background).
    let did_events = |upto: i64| -> usize {
        read_stream(relay.port, 0, upto, Duration::from_secs(30))
            .iter()
            .filter(|(s, b)| {
                *s < seq
                    && matches!(frame::decode(b).unwrap().message, Message::Event(e) if e.did() == Some(did.as_str()))
            })
            .count()
    };
    let t = Instant::now();
    while did_events(seq2) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the account's events did not come back after the first reversal"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    admin(&["takedown", &did]);
    let t = Instant::now();
    while did_events(seq2 + 1) > 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "taken-down records still replayed");
        std::thread::sleep(Duration::from_millis(200));
    }
    admin(&["reverse-takedown", &did]);
    let t = Instant::now();
    while did_events(seq2 + 2) == 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "records not back after the reversal");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Without credentials: 401.
    let (st, _) = relay.http("POST", "/admin/repo/takedown", &format!("{{\"did\":\"{did}\"}}")).unwrap();
    assert_eq!(st, 401);
    let wait_connected = |n: usize, why: &str| {
        let want = format!("sluice_shard_hosts_connected{{shard=\"0\"}} {n}");
        let t = Instant::now();
        loop {
            let mut m = TcpStream::connect(("127.0.0.1", relay.metrics_port)).unwrap();
            m.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
            let mut page = String::new();
            m.read_to_string(&mut page).unwrap();
            if page.lines().any(|l| l == want) {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{why}: not {n} hosts connected:\n{page}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_connected(2, "both hosts");
    // A consumer from cursor 5 shows in the consumer list with its progress.
    let tcp = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
    let url = format!("ws://127.0.0.1:{}/xrpc/com.atproto.sync.subscribeRepos?cursor=5", relay.port);
    let (consumer, _) = tungstenite::client(url, tcp).unwrap();
    let t = Instant::now();
    loop {
        let list = admin(&["consumers"]);
        let found = list["consumers"].as_array().unwrap().iter().any(|c| {
            c["cursor"] == 5
                && c["lastSeq"].as_i64().unwrap_or(0) > 5
                && c["remote"].as_str().unwrap().starts_with("127.0.0.1:")
        });
        if found {
            assert_eq!(list["shardsReporting"], serde_json::json!([0]), "{list}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "consumer not listed: {list}");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(consumer);
    // Disconnect a host: it goes idle until it asks with requestCrawl.
    let other = net.info.hosts[1].clone();
    assert_eq!(admin(&["disconnect", &other])["status"], "idle");
    wait_connected(1, "after disconnect");
    let crawl = format!("{{\"hostname\":\"{other}\"}}");
    let (st, body) = relay.http("POST", "/xrpc/com.atproto.sync.requestCrawl", &crawl).unwrap();
    assert_eq!(st, 200, "{body}");
    let (_, body) = relay.http("GET", &format!("/xrpc/com.atproto.sync.getHostStatus?hostname={other}"), "").unwrap();
    assert!(body.contains("\"status\":\"active\""), "{body}");
    wait_connected(2, "after requestCrawl");
    // requestCrawl made admin-only: refused without credentials, taken with
    // them; public again after.
    assert_eq!(admin(&["request-crawl", "admin-only"])["public"], false);
    let (st, body) = relay.http("POST", "/xrpc/com.atproto.sync.requestCrawl", &crawl).unwrap();
    assert_eq!(st, 403, "{body}");
    let raw = {
        let mut s = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
        let req = format!(
            "POST /xrpc/com.atproto.sync.requestCrawl HTTP/1.1\r\nhost: x\r\nauthorization: Bearer hunter2\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{crawl}",
            crawl.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert_eq!(admin(&["request-crawl", "public"])["public"], true);
    let (st, body) = relay.http("POST", "/xrpc/com.atproto.sync.requestCrawl", &crawl).unwrap();
    assert_eq!(st, 200, "{body}");
    // Ban a host: it is disconnected and stays so.
    let host = net.info.hosts[0].clone();
    assert_eq!(admin(&["ban", &host])["status"], "banned");
    let hosts = admin(&["hosts"]);
    assert!(hosts["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["hostname"] == host.as_str() && h["status"] == "banned"));
    wait_connected(1, "after the ban");
    // Ban the domain every fakenet host is under: all hosts banned, and a
    // new one under it is refused.
    assert_eq!(admin(&["ban-domain", "localhost"])["hostsBanned"], 2);
    let (st, body) =
        relay.http("POST", "/xrpc/com.atproto.sync.requestCrawl", "{\"hostname\":\"localhost:1\"}").unwrap();
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("HostBanned"), "{body}");
    relay.stop();
}

/// Failpoints crash the db-writer at each step of the durable path that a
/// random kill rarely hits: after the log fsync but before the Postgres
/// commit, after the commit but before the watermark and ring release, and
/// in the middle of a takedown's flagging scan. Each fires once; after each
/// restart the stream is still exact and the taken-down account's records
/// are all hidden on replay.
#[test]
fn crashes_between_durable_steps_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = runner::start(ServeConfig {
        hosts: 4,
        accounts: 10,
        seed: 71,
        rate: 0.0,
        max_events: Some(7000),
        ledger: dir.path().join("ledger.jsonl"),
        ..ServeConfig::default()
    })
    .unwrap();
    net.wait_generation().unwrap();
    let pw = dir.path().join("admin.pw");
    std::fs::write(&pw, "pw").unwrap();
    let fired = dir.path().join("failpoints");
    std::fs::create_dir_all(&fired).unwrap();
    let extra = format!("admin_password_file = {:?}\nsegment_size_bytes = 8388608", pw.to_string_lossy());
    let mut relay = Relay::new(dir.path(), &net.info.plc_url, 1, &extra);
    // A round takes at most 2,048 records: the first writer commits one
    // round before its crash, so the second has at least 4,952 records,
    // three rounds, left for its own crash at the second commit.
    relay.env = vec![
        (
            "SLUICE_FAILPOINTS".into(),
            "sequencer-after-log-sync=crash@2,sequencer-after-pg-commit=crash@2,flags-after-segment=crash@1".into(),
        ),
        ("SLUICE_FAILPOINT_DIR".into(), fired.to_string_lossy().into_owned()),
    ];
    relay.start();
    crawl_all(&relay, &net, "");
    let report = check_exact(&relay, dir.path(), Duration::from_secs(120));
    assert_eq!(report.relayed, net.events(), "{}", report.summary());
    assert!(report.relayed >= 7000);
    for point in ["sequencer-after-log-sync", "sequencer-after-pg-commit"] {
        assert!(fired.join(format!("{point}.fired")).exists(), "{point} never fired:\n{}", relay.log_tail());
    }
    let mut segments: Vec<i64> = std::fs::read_dir(dir.path().join("data/events"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_string_lossy().strip_suffix(".seg").and_then(|x| x.parse().ok()))
        .collect();
    segments.sort_unstable();
    assert!(segments.len() >= 2, "the flagging crash needs more than one segment, got {segments:?}");
    // Take down an account active upstream with records in the first and
    // the last segment: the flagging scan crashes after the first; the
    // restarted db-writer flags everything once more.
    let last_segment = *segments.last().unwrap();
    let mut spread: std::collections::HashMap<String, (bool, bool)> = Default::default();
    for (s, b) in read_stream(relay.port, 0, 7000, Duration::from_secs(30)) {
        if let Message::Event(e) = frame::decode(&b).unwrap().message {
            if let Some(d) = e.did() {
                let x = spread.entry(d.to_owned()).or_default();
                x.0 |= s < segments[1];
                x.1 |= s >= last_segment;
            }
        }
    }
    let did = net
        .shared
        .repos
        .read()
        .unwrap()
        .iter()
        .find(|(d, r)| r.active && spread.get(*d) == Some(&(true, true)))
        .map(|(d, _)| d.clone())
        .expect("an active account with records in the first and the last segment");
    let out = Command::new(sluice_bin())
        .args(["admin", "--url", &format!("http://127.0.0.1:{}", relay.port), "--password-file"])
        .arg(&pw)
        .args(["takedown", &did])
        .output()
        .unwrap();
    // The crash may beat the reply out of the process: the takedown is
    // durable before the reply, so find its seq in the stream instead.
    let _ = out;
    let t = Instant::now();
    while !fired.join("flags-after-segment.fired").exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "the flagging failpoint never fired:\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    relay.wait_health(Duration::from_secs(60));
    let (_, health) = relay.http("GET", "/xrpc/_health", "").unwrap();
    let top = serde_json::from_str::<serde_json::Value>(&health).unwrap()["seq"].as_i64().unwrap();
    let seq = read_stream(relay.port, 0, top, Duration::from_secs(30))
        .iter()
        .find_map(|(s, b)| match frame::decode(b).unwrap().message {
            Message::Event(frame::Event::Account(a)) if a.did == did && a.status == Some("takendown") => Some(*s),
            _ => None,
        })
        .expect("the takedown #account is in the stream");
    let t = Instant::now();
    loop {
        let visible = read_stream(relay.port, 0, seq, Duration::from_secs(30))
            .iter()
            .filter(|(s, b)| {
                *s < seq
                    && matches!(frame::decode(b).unwrap().message, Message::Event(e) if e.did() == Some(did.as_str()))
            })
            .count();
        if visible == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{visible} records of {did} still replayed after the restart:\n{}",
            relay.log_tail()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let log = std::fs::read_to_string(&relay.log).unwrap();
    assert_eq!(log.matches("crashing on purpose").count(), 3, "{}", relay.log_tail());
    relay.stop();
}

/// Per-host account limits: new accounts beyond a host's limit are not
/// admitted (their events are dropped and counted) until an admin raises
/// the limit; the host's account count never passes it.
#[test]
fn host_account_limit_admits_accounts_up_to_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("admin.pw");
    std::fs::write(&pw, "pw").unwrap();
    let extra = format!("admin_password_file = {:?}\n[limits]\nhost_account_limit_default = 3", pw.to_string_lossy());
    let Setup { dir: _dir, mut net, mut relay } = Setup::start_with(
        dir,
        ServeConfig { hosts: 1, accounts: 8, seed: 51, rate: 100.0, max_events: Some(1000), ..ServeConfig::default() },
        1,
        &extra,
        |_| {},
    );
    wait_events(&net, 300);
    let dids_in_stream = |relay: &Relay| -> std::collections::HashSet<String> {
        let (_, body) = relay.http("GET", "/xrpc/_health", "").unwrap();
        let top = serde_json::from_str::<serde_json::Value>(&body).unwrap()["seq"].as_i64().unwrap();
        read_stream(relay.port, 0, top, Duration::from_secs(30))
            .iter()
            .filter_map(|(_, b)| match frame::decode(b).unwrap().message {
                Message::Event(e) => e.did().map(str::to_owned),
                _ => None,
            })
            .collect()
    };
    // The relay may lag fakenet (a loaded machine): wait until three
    // accounts are in its stream, then check no fourth came with them.
    let t = Instant::now();
    let mut admitted = dids_in_stream(&relay);
    while admitted.len() < 3 && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
        admitted = dids_in_stream(&relay);
    }
    assert_eq!(admitted.len(), 3, "only the first 3 accounts are admitted\n{}", relay.log_tail());
    // The others are stored as throttled (PROTOCOL.md section 5.8).
    let repo_status = |did: &str| -> serde_json::Value {
        let (_, body) = relay.http("GET", &format!("/xrpc/com.atproto.sync.getRepoStatus?did={did}"), "").unwrap();
        serde_json::from_str(&body).unwrap()
    };
    let others: Vec<String> =
        net.shared.repos.read().unwrap().keys().filter(|d| !admitted.contains(*d)).cloned().collect();
    let throttled: Vec<&String> = others.iter().filter(|d| repo_status(d)["status"] == "throttled").collect();
    assert!(!throttled.is_empty(), "no account reported throttled among {others:?}");
    for d in &throttled {
        assert_eq!(repo_status(d)["active"], false);
    }
    for d in &admitted {
        assert_eq!(repo_status(d)["active"], true, "{d}");
    }
    let host = net.info.hosts[0].clone();
    let auth = "Bearer pw";
    let mut s = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
    let body = format!("{{\"hostname\":\"{host}\",\"limit\":100}}");
    write!(
        s,
        "POST /admin/host/limit HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    net.wait_generation().unwrap();
    let t = Instant::now();
    while dids_in_stream(&relay).len() <= 3 {
        assert!(t.elapsed() < Duration::from_secs(60), "no new account admitted after raising the limit");
        std::thread::sleep(Duration::from_millis(300));
    }
    // A formerly throttled account that got in is no longer throttled
    // (active, or whatever its host said since).
    let now_in = dids_in_stream(&relay);
    for d in throttled.iter().filter(|d| now_in.contains(d.as_str())) {
        assert_ne!(repo_status(d)["status"], "throttled", "{d}");
    }
    let mut m = TcpStream::connect(("127.0.0.1", relay.metrics_port)).unwrap();
    m.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut page = String::new();
    m.read_to_string(&mut page).unwrap();
    let dropped: u64 = page
        .lines()
        .find_map(|l| l.strip_prefix("sluice_events_dropped_host_account_limit_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(dropped > 0, "{page}");
    relay.stop();
}

/// Limits on hosts: requestCrawl takes at most `new_hosts_per_day_max` new
/// hosts a day (429 after), and a host faster than
/// `host_events_per_second_max` is slowed down, not cut: every event still
/// arrives, exactly.
#[test]
fn new_host_and_host_rate_limits() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = runner::start(ServeConfig {
        hosts: 2,
        accounts: 10,
        seed: 61,
        rate: 0.0,
        max_events: Some(400),
        ledger: dir.path().join("ledger.jsonl"),
        ..ServeConfig::default()
    })
    .unwrap();
    net.wait_generation().unwrap();
    const RATE: u64 = 50;
    let extra = format!("[limits]\nhost_events_per_second_max = {RATE}\nnew_hosts_per_day_max = 1");
    let mut relay = Relay::new(dir.path(), &net.info.plc_url, 1, &extra);
    relay.start();
    let (a, b) = (net.info.hosts[0].clone(), net.info.hosts[1].clone());
    let t = Instant::now();
    let (st, _) =
        relay.http("POST", "/xrpc/com.atproto.sync.requestCrawl", &format!("{{\"hostname\":\"{a}\"}}")).unwrap();
    assert_eq!(st, 200);
    let (st, body) =
        relay.http("POST", "/xrpc/com.atproto.sync.requestCrawl", &format!("{{\"hostname\":\"{b}\"}}")).unwrap();
    assert_eq!(st, 429, "{body}");
    assert!(body.contains("TooManyNewHosts"), "{body}");
    let events = net.shared.hosts[0].frames().len() as u64;
    assert!(events > 2 * RATE, "host 0 has only {events} events");
    let report = check::run(&CheckConfig {
        relay: format!("ws://127.0.0.1:{}", relay.port),
        ledger: dir.path().join("ledger.jsonl"),
        cursor: Some(0),
        timeout: Duration::from_secs(60),
        settle: Duration::from_millis(300),
        wait_done: true,
        only_host: Some(a.clone()),
    })
    .unwrap();
    let took = t.elapsed();
    assert!(report.ok(), "{}\n{:?}\n{}", report.summary(), report.notes, relay.log_tail());
    assert_eq!(report.relayed, events);
    // One second of burst, then RATE per second.
    let floor = Duration::from_secs_f64((events - RATE) as f64 / RATE as f64 * 0.9);
    assert!(took >= floor, "{events} events in {took:?}: not rate limited (floor {floor:?})");
    relay.stop();
}

/// `sluice admin host-cursor` makes the relay read a host again from an
/// earlier seq (a PDS restored from a backup sends old seqs again): the
/// host's events are relayed again, its stored cursor comes back to its
/// head, and `sluice admin audit` lists the action with both cursors.
#[test]
fn admin_host_cursor_rereads_a_host_and_the_audit_log_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("admin.pw");
    std::fs::write(&pw, "hunter2\n").unwrap();
    let Setup { dir, net, mut relay } = Setup::start_with(
        dir,
        ServeConfig { hosts: 2, accounts: 4, seed: 43, rate: 0.0, max_events: Some(120), ..ServeConfig::default() },
        1,
        &format!("admin_password_file = {:?}", pw.to_string_lossy()),
        |net| net.wait_generation().expect("fakenet generates"),
    );
    let report = check_exact(&relay, dir.path(), Duration::from_secs(60));
    let admin = |args: &[&str]| {
        let out = Command::new(sluice_bin())
            .args(["admin", "--url", &format!("http://127.0.0.1:{}", relay.port), "--password-file"])
            .arg(&pw)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "sluice admin {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let host = net.info.hosts[0].clone();
    let host_seq = |r: &Relay| -> i64 {
        let (_, body) = r.http("GET", &format!("/xrpc/com.atproto.sync.getHostStatus?hostname={host}"), "").unwrap();
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["seq"].as_i64().unwrap()
    };
    let head = host_seq(&relay);
    assert!(head > 10, "{head}");
    let answer = admin(&["host-cursor", &host, "0"]);
    assert_eq!(answer["previous"].as_i64(), Some(head), "{answer}");
    assert_eq!(answer["cursor"].as_i64(), Some(0));
    // Read again from 0: the host's events come through once more (stateful
    // checks drop the re-sent commits as replays; #identity and #account
    // events pass), and its cursor is back at its head.
    let t = std::time::Instant::now();
    while host_seq(&relay) < head {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "host not re-read: seq {}\n{}",
            host_seq(&relay),
            relay.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let page = metrics_page(&relay);
    let dup: u64 = page
        .lines()
        .find_map(|l| l.strip_prefix("sluice_events_dropped_stateful_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(dup > 0, "the re-read host's commits were not seen again:\n{page}");
    // Bad input is refused.
    let out = Command::new(sluice_bin())
        .args(["admin", "--url", &format!("http://127.0.0.1:{}", relay.port), "--password-file"])
        .arg(&pw)
        .args(["host-cursor", "no.such.host", "5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let audit = admin(&["audit", "--limit", "5"]);
    let first = &audit["entries"][0];
    assert_eq!(first["action"], "host_cursor", "{audit}");
    assert_eq!(first["subject"], host.as_str());
    assert_eq!(first["detail"]["from"].as_i64(), Some(head));
    assert_eq!(first["detail"]["to"].as_i64(), Some(0));
    assert!(first["at"].as_str().is_some_and(|t| t.ends_with('Z')), "{audit}");
    assert!(report.relayed > 0);
    relay.stop();
}

/// Accounts never stuck (indigo#1161): fakenet's `lostreactivation` fault
/// deactivates an account (announced) and reactivates it without its
/// `#account` event. The relay, seeing a commit from an account it holds
/// inactive on that account's own host, asks the PDS (getRepoStatus),
/// corrects the status with an `#account` of its own, and relays the
/// commit it held and those after: the stream is exact.
#[test]
fn accounts_whose_reactivation_was_lost_recover() {
    let Setup { dir, mut net, mut relay } = Setup::start(
        ServeConfig {
            hosts: 2,
            accounts: 20,
            seed: 44,
            rate: 300.0,
            max_events: Some(2500),
            faults: FaultRates {
                per_step: vec![(fakenet::world::Fault::LostReactivation, 0.004)],
                split_connections: 0.0,
            },
            ..ServeConfig::default()
        },
        1,
        "",
    );
    net.wait_generation().unwrap();
    let report = check_exact(&relay, dir.path(), Duration::from_secs(90));
    eprintln!("{}", report.summary());
    let log = relay.log_all();
    let corrected = log.matches("status corrected").count();
    eprintln!("{corrected} accounts corrected; {} relay #account events seen", report.either_seen);
    assert!(corrected >= 2, "too few lost reactivations exercised\n{}", relay.log_tail());
    assert_eq!(report.either_seen, corrected as u64, "one #account of the relay's own per correction");
    relay.stop();
}

/// A commit an account's host sent while the account was deactivated is
/// held, and relayed once the host says the account is active (the relay
/// may pass it: the ledger says "either"); what the host sends after it
/// (its `#sync` at the repository's head) must still come through. The
/// chaos run of issue 22 lost such a `#sync`: fakenet's commit was made
/// and undone (its rev ahead of the repository's head), so once relayed,
/// the `#sync` after the reactivation looked older than the stored rev.
/// A deactivated account's commit is a real commit now; this schedule (a
/// relay reading the hosts' backlogs late, so every question about a held
/// commit finds the account reactivated) replays what the chaos run met.
#[test]
fn a_commit_held_while_inactive_does_not_hide_what_follows() {
    let Setup { dir, net, relay } = Setup::start_after_generation(
        ServeConfig {
            hosts: 2,
            accounts: 8,
            skew: 0.0,
            seed: 46,
            rate: 0.0,
            max_events: Some(3000),
            faults: FaultRates::parse("deactivatedcommit=0.03").unwrap(),
            ..ServeConfig::default()
        },
        1,
        "",
    );
    let report = check_exact(&relay, dir.path(), Duration::from_secs(120));
    eprintln!("{}", report.summary());
    let ledger = fakenet::ledger::Ledger::read(&dir.path().join("ledger.jsonl")).unwrap();
    let held = ledger.entries.iter().filter(|e| e.why == "deactivatedcommit").count();
    assert!(held >= 20, "only {held} commits of deactivated accounts");
    assert!(report.either_seen > 0, "no held commit was relayed: the schedule missed the case");
    assert!(report.relayed > 2000 && report.relayed < net.events());
}
