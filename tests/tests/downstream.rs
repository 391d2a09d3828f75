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
