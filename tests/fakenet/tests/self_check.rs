//! fakenet against itself: the checker on a host's own stream, and each
//! connection fault's behaviour on the wire. Bounded: small worlds, short
//! timeouts.

use fakenet::check::{self, CheckConfig};
use fakenet::ledger::{Expect, Ledger};
use fakenet::runner::{self, ServeConfig};
use fakenet::world::FaultRates;
use sluice_common::atproto::frame::{self, Event, Message};
use std::time::{Duration, Instant};

fn start(faults: &str, events: u64, dir: &tempfile::TempDir) -> runner::Running {
    let mut r = runner::start(ServeConfig {
        hosts: 3,
        accounts: 8,
        rate: 0.0,
        max_events: Some(events),
        faults: FaultRates::parse(faults).unwrap(),
        ledger: dir.path().join("ledger.jsonl"),
        web_accounts: 2,
        ..ServeConfig::default()
    })
    .unwrap();
    r.wait_generation().unwrap();
    r
}

fn check_host(r: &runner::Running, host: &str) -> check::Report {
    check::run(&CheckConfig {
        relay: format!("ws://{host}"),
        ledger: r.info.ledger.clone().into(),
        cursor: Some(0),
        timeout: Duration::from_secs(20),
        settle: Duration::from_millis(300),
        wait_done: true,
        only_host: Some(host.to_owned()),
    })
    .unwrap()
}

/// A PDS is itself a firehose: with no faults, each host's own stream
/// matches the ledger exactly.
#[test]
fn checker_passes_on_clean_host_streams() {
    let dir = tempfile::tempdir().unwrap();
    let r = start("none", 600, &dir);
    let mut total = 0;
    for h in &r.info.hosts {
        let rep = check_host(&r, h);
        assert!(rep.ok(), "{h}: {}\n{:?}", rep.summary(), rep.notes);
        total += rep.relayed;
    }
    assert_eq!(total, 600);
}

/// The ledger never lags what a host sent: a checker that does not wait
/// for the ledger's end, reading a host live while generation runs at
/// full speed, finds every frame it sees in the ledger (it follows the
/// file as it grows). Before, frames written in the last 100 ms were not
/// there yet and counted as unexpected.
#[test]
fn no_wait_check_of_a_live_stream_finds_every_frame_in_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let r = runner::start(ServeConfig {
        hosts: 1,
        accounts: 20,
        rate: 2000.0,
        duration: Some(Duration::from_secs(6)),
        ledger: dir.path().join("ledger.jsonl"),
        ..ServeConfig::default()
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let host = r.info.hosts[0].clone();
    let rep = check::run(&CheckConfig {
        relay: format!("ws://{host}"),
        ledger: r.info.ledger.clone().into(),
        cursor: Some(0),
        timeout: Duration::from_secs(4),
        settle: Duration::from_secs(3),
        wait_done: false,
        only_host: Some(host),
    })
    .unwrap();
    assert!(rep.ok(), "{}\n{:?}", rep.summary(), rep.notes);
    // It went on reading well past the ledger it started from.
    assert!(rep.relayed_later > 1000, "{}", rep.summary());
}

/// With faults in the streams, the checker sees every one of them.
#[test]
fn checker_catches_every_in_stream_fault() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(
        "badsig=0.02,missingblock=0.02,badprevdata=0.02,replayedrev=0.02,unknowntype=0.02,futurerev=0.02",
        800,
        &dir,
    );
    let ledger = Ledger::read(std::path::Path::new(&r.info.ledger)).unwrap();
    for h in &r.info.hosts {
        let drops = ledger.entries.iter().filter(|e| &e.host == h && e.hseq.is_some() && e.expect == Expect::Drop);
        // Unknown types are not events a checker can name; every other
        // drop shows up as unexpected (a new id) or duplicate (a replay).
        let nameable = drops.filter(|e| e.why != "unknowntype").count() as u64;
        let rep = check_host(&r, h);
        assert_eq!(rep.missing, 0, "{h}: {}", rep.summary());
        assert_eq!(rep.unexpected + rep.duplicates, nameable, "{h}: {}", rep.summary());
        // Bad signatures, proofs and future revs also fail verification.
        assert!(rep.invalid > 0 || nameable == 0, "{h}: {}", rep.summary());
    }
}

fn subscribe(
    host: &str,
    cursor: Option<i64>,
) -> tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>> {
    let url = match cursor {
        Some(c) => format!("ws://{host}/xrpc/com.atproto.sync.subscribeRepos?cursor={c}"),
        None => format!("ws://{host}/xrpc/com.atproto.sync.subscribeRepos"),
    };
    let (ws, _) = tungstenite::connect(url).unwrap();
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    }
    ws
}

fn post(url: &str) {
    let u = url.strip_prefix("http://").unwrap();
    let (hostport, path) = u.split_once('/').unwrap();
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    use std::io::{Read, Write};
    write!(s, "POST /{path} HTTP/1.1\r\nhost: {hostport}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

/// What a live connection receives within `within`: decoded frames, or
/// `Err` for bytes that do not decode, ending at close or disconnect.
fn observe(
    ws: &mut tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
    within: Duration,
) -> (Vec<Result<String, String>>, bool) {
    let start = Instant::now();
    let mut got = Vec::new();
    while start.elapsed() < within {
        match ws.read() {
            Ok(tungstenite::Message::Binary(b)) => got.push(match frame::decode(&b) {
                Ok(d) => Ok(match d.message {
                    Message::Event(e) => e.type_name().to_owned(),
                    Message::Error { error, .. } => format!("error:{error}"),
                }),
                Err(e) => Err(e.to_string()),
            }),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return (got, true),
        }
    }
    (got, false)
}

#[test]
fn transient_faults_on_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let r = start("none", 50, &dir);
    let host = r.info.hosts[0].clone();
    let control = |kind: &str| post(&format!("{}?kind={kind}&host={host}", r.info.control_url));

    // Malformed, truncated and oversized frames arrive as messages that do
    // not decode.
    for kind in ["malformed", "truncated", "oversized"] {
        let mut ws = subscribe(&host, None);
        control(kind);
        let (got, _) = observe(&mut ws, Duration::from_secs(2));
        assert!(got.iter().any(|g| g.is_err()), "{kind}: {got:?}");
    }
    // A disconnect ends the connection without a close handshake.
    let mut ws = subscribe(&host, None);
    control("disconnect");
    let (_, ended) = observe(&mut ws, Duration::from_secs(3));
    assert!(ended, "disconnect did not end the connection");
    // A reconnect with a cursor does not meet those faults again, and
    // replays the stream.
    let mut ws = subscribe(&host, Some(0));
    let (got, _) = observe(&mut ws, Duration::from_secs(1));
    assert!(!got.is_empty() && got.iter().all(|g| g.is_ok()), "{got:?}");
    // Seq going backwards: an old frame arrives again, live.
    let mut ws = subscribe(&host, None);
    control("seqbackwards");
    let (got, _) = observe(&mut ws, Duration::from_secs(2));
    assert_eq!(got, vec![Ok("#commit".to_owned())]);
    // A future cursor is an error frame.
    let mut ws = subscribe(&host, Some(1 << 40));
    let (got, _) = observe(&mut ws, Duration::from_secs(1));
    assert_eq!(got.first(), Some(&Ok("error:FutureCursor".to_owned())));
}

/// A stall: nothing arrives for a while though events are produced.
#[test]
fn stall_sends_nothing_then_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = runner::start(ServeConfig {
        hosts: 1,
        accounts: 4,
        rate: 50.0,
        duration: Some(Duration::from_secs(6)),
        ledger: dir.path().join("ledger.jsonl"),
        ..ServeConfig::default()
    })
    .unwrap();
    let host = r.info.hosts[0].clone();
    let mut ws = subscribe(&host, None);
    std::thread::sleep(Duration::from_millis(500));
    let (before, _) = observe(&mut ws, Duration::from_millis(500));
    assert!(!before.is_empty());
    post(&format!("{}?kind=stall&host={host}", r.info.control_url));
    // Everything before the stall drains quickly; then silence.
    let _ = observe(&mut ws, Duration::from_millis(300));
    let (during, _) = observe(&mut ws, Duration::from_millis(1000));
    assert!(during.is_empty(), "got {} frames during a stall", during.len());
    let (after, _) = observe(&mut ws, Duration::from_secs(3));
    assert!(!after.is_empty(), "nothing after the stall");
    r.wait_generation().unwrap();
}

/// Split writes: bytes arrive in many small pieces, and still parse.
#[test]
fn split_writes_arrive_in_pieces() {
    use rand::SeedableRng;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let msg = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n".repeat(20);
        let m2 = msg.clone();
        let w = tokio::spawn(async move {
            fakenet::ws::write_maybe_split(&mut a, &m2, Some(&mut rng)).await.unwrap();
        });
        let mut got = Vec::new();
        let mut reads = 0;
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        while got.len() < msg.len() {
            let n = b.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
            reads += 1;
        }
        w.await.unwrap();
        assert_eq!(got, msg);
        assert!(reads > 10, "{reads} reads");
    });
}

/// Same seed, same flags: the same ledger (host names normalised: ports
/// are ephemeral; the world test checks bytes with fixed names).
#[test]
fn ledgers_are_deterministic() {
    let run = || {
        let dir = tempfile::tempdir().unwrap();
        let mut r = runner::start(ServeConfig {
            hosts: 3,
            accounts: 8,
            rate: 0.0,
            max_events: Some(300),
            faults: FaultRates::default_mix(),
            ledger: dir.path().join("ledger.jsonl"),
            ..ServeConfig::default()
        })
        .unwrap();
        r.wait_generation().unwrap();
        let l = Ledger::read(std::path::Path::new(&r.info.ledger)).unwrap();
        let norm = |s: &str| {
            let mut s = s.to_owned();
            for (i, h) in r.info.hosts.iter().enumerate() {
                s = s.replace(h, &format!("host{i}"));
            }
            s
        };
        l.entries.iter().map(|e| (norm(&e.id), norm(&e.host), e.expect, e.why.clone())).collect::<Vec<_>>()
    };
    let (a, b) = (run(), run());
    assert!(a.len() >= 300);
    assert_eq!(a, b);
}

#[test]
fn sync_endpoints_answer() {
    let dir = tempfile::tempdir().unwrap();
    let r = start("none", 100, &dir);
    let host = &r.info.hosts[0];
    let get = |path: &str| -> serde_json::Value {
        let mut s = std::net::TcpStream::connect(host.replace("localhost", "127.0.0.1")).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        use std::io::{Read, Write};
        // Read to its end: a host keeps a connection unless asked not to.
        write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        serde_json::from_str(resp.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    };
    let repos = get("/xrpc/com.atproto.sync.listRepos?limit=100");
    let list = repos["repos"].as_array().unwrap();
    assert!(!list.is_empty());
    let did = list[0]["did"].as_str().unwrap();
    let st = get(&format!("/xrpc/com.atproto.sync.getRepoStatus?did={did}"));
    assert_eq!(st["did"], did);
    let d = get("/xrpc/com.atproto.server.describeServer");
    assert!(d["did"].as_str().unwrap().starts_with("did:web:"));
    let _ = (Event::Unknown { t: "" }, 0);
}

/// `--tls-ca`: hosts speak wss:// with a certificate from a CA generated for
/// the run; a client trusting only that CA reads the same stream; DID
/// documents name https:// endpoints.
#[test]
fn tls_hosts_serve_wss_with_the_generated_ca() {
    use fakenet::tls;
    use tokio_rustls::rustls;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let mut r = runner::start(ServeConfig {
        hosts: 1,
        accounts: 4,
        rate: 0.0,
        max_events: Some(30),
        ledger: dir.path().join("ledger.jsonl"),
        tls_ca_out: Some(ca.clone()),
        ..ServeConfig::default()
    })
    .unwrap();
    r.wait_generation().unwrap();
    assert_eq!(r.info.ca_cert.as_deref(), Some(ca.to_str().unwrap()));
    let host = r.info.hosts[0].clone();
    let port: u16 = host.rsplit_once(':').unwrap().1.parse().unwrap();
    let docs = r.shared.docs.read().unwrap();
    let doc = docs.values().next().unwrap().to_string();
    assert!(doc.contains(&format!("https://{host}")), "{doc}");
    drop(docs);

    let cfg = tls::client_config(&ca).unwrap();
    let conn = rustls::ClientConnection::new(cfg, "localhost".try_into().unwrap()).unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let tls_stream = rustls::StreamOwned::new(conn, tcp);
    let url = format!("wss://{host}/xrpc/com.atproto.sync.subscribeRepos?cursor=0");
    let (mut ws, _) = tungstenite::client(url, tls_stream).unwrap();
    let mut n = 0;
    while n < 30 {
        let b = ws.read().unwrap().into_data();
        match frame::decode(&b).unwrap().message {
            Message::Event(e) => assert!(e.seq().is_some()),
            other => panic!("unexpected {other:?}"),
        }
        n += 1;
    }
    // Plain TCP gets no WebSocket from a TLS host.
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(tungstenite::client(format!("ws://{host}/xrpc/com.atproto.sync.subscribeRepos"), tcp).is_err());
}

/// A corpus generated ahead and served from disk is the same network: each
/// host's stream from cursor 0 checks clean against the corpus' ledger,
/// and the DID documents are served.
#[test]
fn corpus_round_trip_serves_the_same_network() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    let meta = runner::generate_corpus(
        ServeConfig { hosts: 3, accounts: 8, max_events: Some(400), web_accounts: 1, ..ServeConfig::default() },
        &corpus,
    )
    .unwrap();
    // Generation stops once 400 are made (a step may make two).
    assert!((400..=402).contains(&meta.events), "{}", meta.events);
    let info_path = dir.path().join("info.json");
    let r = runner::serve_corpus(&corpus, Some(&info_path)).unwrap();
    assert_eq!(r.events(), meta.events);
    let info: runner::Info = serde_json::from_slice(&std::fs::read(&info_path).unwrap()).unwrap();
    assert_eq!(info.hosts, meta.hosts);
    let mut total = 0;
    for h in &r.info.hosts {
        let rep = check_host(&r, h);
        assert!(rep.ok(), "{h}: {}\n{:?}", rep.summary(), rep.notes);
        total += rep.relayed;
    }
    assert_eq!(total, meta.events);
    // The PLC directory answers from the corpus' documents.
    let did = r.shared.docs.read().unwrap().keys().find(|d| d.starts_with("did:plc:")).unwrap().clone();
    let port: u16 = r.info.plc_url.rsplit_once(':').unwrap().1.parse().unwrap();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(
        &mut s,
        format!("GET /{did} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut body = String::new();
    std::io::Read::read_to_string(&mut s, &mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200") && body.contains(&did), "{body}");
}
