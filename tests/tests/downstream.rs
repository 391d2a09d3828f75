//! HTTP hygiene on the public port: every bad request gets an XRPC error
//! answer (never a 500, never a silent close), and a request head has a
//! deadline and a size bound.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use support::*;

/// Send raw bytes, read the whole answer (bounded).
fn raw(relay: &Relay, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status(answer: &str) -> u16 {
    answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[test]
fn bad_requests_get_xrpc_errors_and_heads_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::new(dir.path(), "http://127.0.0.1:9", 1, "");
    relay.start();
    // A 1 MB header: 431 with a JSON body.
    let big = format!("GET /xrpc/_health HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(1 << 20));
    let a = raw(&relay, big.as_bytes());
    assert_eq!(status(&a), 431, "{}", &a[..a.len().min(300)]);
    assert!(a.contains("RequestHeaderFieldsTooLarge"), "{a}");
    // A malformed request line: 400.
    let a = raw(&relay, b"\x16\x03\x01 garbage\r\n\r\n");
    assert_eq!(status(&a), 400, "{a}");
    assert!(a.contains("InvalidRequest"), "{a}");
    // Cursors outside 0..2^53, and not integers: 400 before the upgrade.
    for c in ["-1", "-9223372036854775808", "9007199254740992", "abc"] {
        let req = format!(
            "GET /xrpc/com.atproto.sync.subscribeRepos?cursor={c} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n\
             connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
        );
        let a = raw(&relay, req.as_bytes());
        assert_eq!(status(&a), 400, "cursor={c}: {a}");
        assert!(a.contains("InvalidRequest"), "cursor={c}: {a}");
    }
    // A parameter that is not a DID: 400, not 500.
    for path in [
        "/xrpc/com.atproto.sync.getRepoStatus?did=%00%ff",
        "/xrpc/com.atproto.sync.getLatestCommit?did=not-a-did",
        "/xrpc/com.atproto.sync.getRepo?did=did:",
    ] {
        let (st, body) = relay.http("GET", path, "").unwrap();
        assert_eq!(st, 400, "{path}: {body}");
        assert!(body.contains("InvalidRequest"), "{path}: {body}");
    }
    // A head sent one byte a second is cut at the 10 s deadline.
    let mut s = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let t = Instant::now();
    let head = b"GET /xrpc/_health HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed = false;
    for b in head {
        if s.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        let mut x = [0u8; 64];
        if let Ok(0) = s.read(&mut x) {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(900));
        if t.elapsed() > Duration::from_secs(14) {
            break;
        }
    }
    assert!(closed, "a slow head was held open for {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(12), "closed only after {:?}", t.elapsed());
    relay.stop();
}

/// A subscriber socket with a small receive buffer that never reads past
/// the upgrade answer.
fn stalled_subscriber(relay: &Relay, query: &str) -> TcpStream {
    use nix::sys::socket::{connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    setsockopt(&fd, sockopt::RcvBuf, &4096).unwrap();
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::new(127, 0, 0, 1, relay.port)).unwrap();
    // SAFETY: a connected TCP socket we own.
    let mut s = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    let req = format!(
        "GET /xrpc/com.atproto.sync.subscribeRepos{query} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    // Read the 101 head only (byte by byte: nothing past it).
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "closed before the upgrade");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

fn counter(relay: &Relay, name: &str) -> u64 {
    metrics_page(relay)
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

/// Read what the relay left in the socket until it is closed (bounded).
fn drained_to_close(mut s: TcpStream) -> usize {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return n,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return n,
            Err(e) => panic!("socket still open after {n} bytes: {e}"),
        }
    }
}

/// Consumers that stop reading cannot hold a shard: one whose socket
/// takes nothing for `consumer_write_timeout_s` is cut, and one whose lag
/// passes `consumer_lag_events_max` is cut, both while they still read
/// nothing; each is counted by reason and its socket closed.
#[test]
fn consumers_that_do_not_read_are_cut() {
    use fakenet::runner::{self, ServeConfig};
    let dir = tempfile::tempdir().unwrap();
    let mut net = runner::start(ServeConfig {
        hosts: 2,
        accounts: 10,
        seed: 91,
        rate: 0.0,
        max_events: Some(2500),
        initial_records: 20,
        ledger: dir.path().join("ledger.jsonl"),
        ..ServeConfig::default()
    })
    .unwrap();
    net.wait_generation().unwrap();
    let mut relay = Relay::new(
        dir.path(),
        &net.info.plc_url,
        1,
        "consumer_write_timeout_s = 2\n[limits]\nconsumer_lag_events_max = 2400\n",
    );
    relay.start();
    crawl_all(&relay, &net, "");
    check_exact(&relay, dir.path(), Duration::from_secs(60));
    // The whole window is within the lag limit, and more than the socket
    // buffers hold: the write stalls and the timeout cuts it.
    let t = Instant::now();
    let s = stalled_subscriber(&relay, "?cursor=200");
    while counter(&relay, "sluice_shard_consumers_cut_unwritable_total") < 1 {
        assert!(t.elapsed() < Duration::from_secs(10), "not cut for an unwritable socket\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("unwritable consumer cut after {:?}", t.elapsed());
    assert!(t.elapsed() >= Duration::from_secs(2), "cut before the write timeout");
    let n = drained_to_close(s);
    eprintln!("it had {n} bytes to read, then the close");
    assert_eq!(counter(&relay, "sluice_shard_consumers_cut_lag_total"), 0);
    assert_eq!(counter(&relay, "sluice_shard_consumers"), 0);
    relay.stop();

    // Lag: a live subscriber that reads nothing, a limit of 300 events,
    // new events at 300/s and a write timeout it never reaches: once the
    // socket is full, the lag passes the limit while the write waits.
    let dir2 = tempfile::tempdir().unwrap();
    let mut net2 = runner::start(ServeConfig {
        hosts: 2,
        accounts: 10,
        seed: 92,
        rate: 300.0,
        max_events: Some(3000),
        initial_records: 20,
        ledger: dir2.path().join("ledger.jsonl"),
        ..ServeConfig::default()
    })
    .unwrap();
    let mut relay = Relay::new(
        dir2.path(),
        &net2.info.plc_url,
        1,
        "consumer_write_timeout_s = 30\n[limits]\nconsumer_lag_events_max = 300\n",
    );
    relay.start();
    crawl_all(&relay, &net2, "");
    wait_events(&net2, 200);
    let t = Instant::now();
    let s = stalled_subscriber(&relay, "");
    while counter(&relay, "sluice_shard_consumers_cut_lag_total") < 1 {
        assert!(t.elapsed() < Duration::from_secs(20), "not cut for lag\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("lagging consumer cut after {:?}", t.elapsed());
    drained_to_close(s);
    assert_eq!(counter(&relay, "sluice_shard_consumers_cut_unwritable_total"), 0);
    net2.wait_generation().unwrap();
    relay.stop();
}

/// `sluice tail` follows a relay: one line per event (seq, kind, DID),
/// `--json` bodies as JSON, `--limit` stops it, and an error frame from
/// the relay ends it with the error's name and exit status 1.
#[test]
fn sluice_tail_prints_the_stream() {
    use fakenet::runner::ServeConfig;
    let Setup { dir, net: _net, mut relay } = Setup::start_after_generation(
        ServeConfig { hosts: 2, accounts: 4, seed: 93, rate: 0.0, max_events: Some(50), ..ServeConfig::default() },
        1,
        "",
    );
    check_exact(&relay, dir.path(), Duration::from_secs(60));
    let url = format!("ws://127.0.0.1:{}", relay.port);
    let tail = |args: &[&str]| {
        let mut c = std::process::Command::new(sluice_bin());
        c.arg("tail").arg(&url).args(args);
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = tail(&["--cursor", "0", "--limit", "20"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 20, "{out}");
    for (i, l) in lines.iter().enumerate() {
        let f: Vec<&str> = l.split(' ').collect();
        assert_eq!(f[0].parse::<usize>().ok(), Some(i + 1), "{l}");
        assert!(f[1].starts_with('#') && f[2].starts_with("did:"), "{l}");
    }
    assert!(out.contains(" #commit ") && out.contains(" ops="), "{out}");
    let (code, out, _) = tail(&["--cursor", "0", "--limit", "5", "--json"]);
    assert_eq!(code, Some(0));
    for l in out.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["$type"].as_str().is_some_and(|t| t.starts_with('#')), "{l}");
        assert!(v["seq"].as_i64().is_some(), "{l}");
    }
    let (code, _, err) = tail(&["--cursor", "99999999"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("FutureCursor"), "{err}");
    relay.stop();
}

/// Subscribe from `cursor` and read until `frames` binary frames arrived
/// (bounded by `timeout`); the socket stays open for the caller.
fn subscribe_and_read(port: u16, cursor: i64, frames: usize, timeout: Duration) -> tungstenite::WebSocket<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(timeout)).unwrap();
    let url = format!("ws://127.0.0.1:{port}/xrpc/com.atproto.sync.subscribeRepos?cursor={cursor}");
    let (mut ws, _) = tungstenite::client(url, tcp).expect("subscribe");
    let (mut got, t) = (0, Instant::now());
    while got < frames {
        assert!(t.elapsed() < timeout, "{got} of {frames} frames from cursor {cursor} in {timeout:?}");
        match ws.read() {
            Ok(tungstenite::Message::Binary(_)) => got += 1,
            Ok(_) => {}
            Err(e) => panic!("cursor {cursor}: {e} after {got} frames"),
        }
    }
    ws
}

fn shard_anon_kb(relay: &Relay) -> u64 {
    let shards = children_matching(relay.pid(), " shard ");
    assert!(!shards.is_empty(), "no shard process");
    shards.iter().map(|p| sluice_tests::procinfo::status(*p as u32, "RssAnon")).sum()
}

/// The shard's anonymous memory once it settled (the consumer-list
/// publisher and the allocator's trim run within a couple of seconds).
fn settled_anon_kb(relay: &Relay) -> u64 {
    std::thread::sleep(Duration::from_secs(3));
    shard_anon_kb(relay)
}

/// Issue 9, item 2: at most 64 KiB per consumer while many stream, and
/// the memory goes back when they leave, also after 5,000 subscriptions
/// came and went.
#[test]
fn consumer_memory_is_bounded_and_given_back() {
    use fakenet::runner::ServeConfig;
    const EVENTS: u64 = 3000;
    let Setup { dir, net: _net, mut relay } = Setup::start_after_generation(
        ServeConfig { hosts: 2, accounts: 20, seed: 97, rate: 0.0, max_events: Some(EVENTS), ..ServeConfig::default() },
        1,
        "[limits]\nconsumers_max = 1000\n",
    );
    check_exact(&relay, dir.path(), Duration::from_secs(120));
    let top: i64 = relay
        .http("GET", "/xrpc/_health", "")
        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok()?["seq"].as_i64())
        .expect("health names the seq");
    let port = relay.port;
    // One subscription first: what a shard allocates once, on its first
    // consumer, is not a consumer's.
    drop(subscribe_and_read(port, top - 10, 10, Duration::from_secs(30)));
    let start = settled_anon_kb(&relay);

    // 400 at once, each reading the last 2,000 events, then all open.
    const AT_ONCE: usize = 400;
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let release = std::sync::Arc::new(std::sync::Barrier::new(AT_ONCE + 1));
    let threads: Vec<_> = (0..AT_ONCE)
        .map(|i| {
            let (held_tx, release) = (held_tx.clone(), release.clone());
            std::thread::spawn(move || {
                let cursor = top - 2000 + (i as i64 % 50);
                let ws = subscribe_and_read(port, cursor, 1900, Duration::from_secs(120));
                held_tx.send(()).unwrap();
                release.wait();
                drop(ws);
            })
        })
        .collect();
    for _ in 0..AT_ONCE {
        held_rx.recv_timeout(Duration::from_secs(180)).expect("every consumer read its frames");
    }
    let streaming = shard_anon_kb(&relay);
    release.wait();
    for t in threads {
        t.join().unwrap();
    }
    let after_many = settled_anon_kb(&relay);
    let per_consumer = streaming.saturating_sub(start) as f64 / AT_ONCE as f64;
    eprintln!("shard RssAnon: {start} kB at start, {streaming} kB with {AT_ONCE} consumers ({per_consumer:.1} kB each), {after_many} kB after");
    assert!(per_consumer <= 64.0, "{per_consumer:.1} KiB per consumer");
    assert!(after_many <= start + 5 * 1024, "{after_many} kB after {AT_ONCE} consumers left, {start} kB before");

    // 5,000 subscriptions come and go, 25 at a time, from cursors spread
    // over the window (twice: what the first round allocates for good,
    // the second must not add to).
    let churn = || {
        let t = Instant::now();
        let churners: Vec<_> = (0..25)
            .map(|k| {
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let cursor = 1 + ((k * 200 + i) as i64 * 7919) % (top - 30);
                        drop(subscribe_and_read(port, cursor, 20, Duration::from_secs(60)));
                    }
                })
            })
            .collect();
        for c in churners {
            c.join().unwrap();
        }
        let after = settled_anon_kb(&relay);
        eprintln!("5,000 subscriptions in {:.1} s: shard RssAnon {start} → {after} kB", t.elapsed().as_secs_f64());
        after
    };
    let after_churn = churn();
    let after_second = churn();
    assert!(after_churn <= start + 5 * 1024, "{after_churn} kB after 5,000 subscriptions, {start} kB before");
    assert!(after_second <= start + 5 * 1024, "{after_second} kB after 10,000 subscriptions, {start} kB before");
    assert_eq!(counter(&relay, "sluice_shard_consumers"), 0);
    relay.stop();
}
