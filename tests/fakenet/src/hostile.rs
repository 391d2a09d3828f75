//! Hostile hosts: a PDS that misbehaves on the wire in one of a catalogue
//! of ways ([`Mode`]), for testing that one host cannot freeze a shard,
//! cost it unbounded memory, or hold a connection it should lose. Each
//! host is a listener on 127.0.0.1 with a thread per connection (blocking
//! std I/O: these hosts are few); every connection is bounded in bytes
//! ([`BYTES_MAX`]) and time ([`LIFETIME`]) and ends when the peer goes.
//!
//! A valid stream with every write split at a random byte is fakenet's own
//! `split` fault (`FaultRates::split_connections`), not a mode here.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes one hostile connection sends at most.
pub const BYTES_MAX: u64 = 64 << 20;
/// How long one hostile connection lives at most.
pub const LIFETIME: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Upgrade, one non-final binary frame, then endless empty continuations.
    EmptyContinuations,
    /// Upgrade, then a message in endless 1-byte fragments.
    OneByteFragments,
    /// Upgrade, then endless pings.
    PingFlood,
    /// Upgrade, then a frame header declaring 2^62 bytes.
    OversizedLength,
    /// The `101` status line and headers one byte every 2 s.
    Slowloris,
    /// Upgrade, then nothing: never a frame, never a pong.
    Silent,
    /// Upgrade, then a message that is not CBOR.
    GarbageCbor,
    /// Upgrade, then a message nested 10,000 arrays deep.
    DeepNesting,
    /// Upgrade, then a message whose body claims 2^32 items.
    HugeContainer,
}

impl Mode {
    pub const ALL: [Mode; 9] = [
        Mode::EmptyContinuations,
        Mode::OneByteFragments,
        Mode::PingFlood,
        Mode::OversizedLength,
        Mode::Slowloris,
        Mode::Silent,
        Mode::GarbageCbor,
        Mode::DeepNesting,
        Mode::HugeContainer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::EmptyContinuations => "empty-continuations",
            Mode::OneByteFragments => "one-byte-fragments",
            Mode::PingFlood => "ping-flood",
            Mode::OversizedLength => "oversized-length",
            Mode::Slowloris => "slowloris",
            Mode::Silent => "silent",
            Mode::GarbageCbor => "garbage-cbor",
            Mode::DeepNesting => "deep-nesting",
            Mode::HugeContainer => "huge-container",
        }
    }

    pub fn from_name(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// A running hostile host.
pub struct Hostile {
    pub mode: Mode,
    /// `localhost:PORT`, as a relay is told to crawl it.
    pub host: String,
    /// Connections accepted so far.
    pub connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Start a hostile host on an ephemeral 127.0.0.1 port.
pub fn start(mode: Mode) -> std::io::Result<Hostile> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    l.set_nonblocking(true)?;
    let host = format!("localhost:{}", l.local_addr()?.port());
    let connections = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (c, s) = (connections.clone(), stop.clone());
    std::thread::Builder::new().name(format!("hostile-{}", mode.name())).spawn(move || {
        while !s.load(Ordering::Acquire) {
            match l.accept() {
                Ok((sock, _)) => {
                    c.fetch_add(1, Ordering::Relaxed);
                    let s = s.clone();
                    let _ = std::thread::Builder::new().spawn(move || {
                        let _ = serve(sock, mode, &s);
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    })?;
    Ok(Hostile { mode, host, connections, stop })
}

/// Read the request head; returns the target and the Sec-WebSocket-Key.
fn read_head(sock: &mut TcpStream) -> std::io::Result<(String, String)> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut b)?;
        if n == 0 || buf.len() > 16 * 1024 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&b[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    let target = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let key = text
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-key")))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    Ok((target, key))
}

fn upgrade_answer(key: &str) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n")
        .into_bytes()
}

/// An unmasked server frame.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n < 65536 => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// `{op: 1, t: "#commit"}`: what a frame's header says.
fn commit_header() -> Vec<u8> {
    let mut w = sluice_common::atproto::cbor::Writer::new();
    w.map(2);
    w.text("t");
    w.text("#commit");
    w.text("op");
    w.i64(1);
    w.into_inner()
}

/// Send `chunk` over and over until a bound, a stop, or the peer goes.
fn repeat(sock: &mut TcpStream, chunk: &[u8], stop: &AtomicBool) -> std::io::Result<()> {
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < BYTES_MAX && t.elapsed() < LIFETIME && !stop.load(Ordering::Acquire) {
        sock.write_all(chunk)?;
        sent += chunk.len() as u64;
    }
    Ok(())
}

/// Hold the connection open, reading and discarding, until it ends.
fn hold(sock: &mut TcpStream, stop: &AtomicBool) -> std::io::Result<()> {
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let t = Instant::now();
    let mut b = [0u8; 4096];
    while t.elapsed() < LIFETIME && !stop.load(Ordering::Acquire) {
        match sock.read(&mut b) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn serve(mut sock: TcpStream, mode: Mode, stop: &AtomicBool) -> std::io::Result<()> {
    sock.set_nonblocking(false)?;
    let (target, key) = read_head(&mut sock)?;
    // It passes requestCrawl's check like any PDS; the stream is the trouble.
    if target.contains("describeServer") {
        let body = format!("{{\"did\":\"did:web:hostile-{}.test\",\"availableUserDomains\":[]}}", mode.name());
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        sock.write_all(head.as_bytes())?;
        return sock.write_all(body.as_bytes());
    }
    let answer = upgrade_answer(&key);
    if mode == Mode::Slowloris {
        let t = Instant::now();
        for b in answer {
            if t.elapsed() > LIFETIME || stop.load(Ordering::Acquire) {
                break;
            }
            sock.write_all(&[b])?;
            std::thread::sleep(Duration::from_secs(2));
        }
        return hold(&mut sock, stop);
    }
    sock.write_all(&answer)?;
    match mode {
        Mode::EmptyContinuations => {
            sock.write_all(&frame(false, 0x2, b"x"))?;
            repeat(&mut sock, &frame(false, 0x0, b"").repeat(4096), stop)
        }
        Mode::OneByteFragments => {
            sock.write_all(&frame(false, 0x2, b"x"))?;
            repeat(&mut sock, &frame(false, 0x0, b"y").repeat(4096), stop)
        }
        Mode::PingFlood => repeat(&mut sock, &frame(true, 0x9, b"").repeat(4096), stop),
        Mode::OversizedLength => {
            let mut f = vec![0x82, 127];
            f.extend_from_slice(&(1u64 << 62).to_be_bytes());
            sock.write_all(&f)?;
            repeat(&mut sock, &[0u8; 4096], stop)
        }
        Mode::Silent => hold(&mut sock, stop),
        Mode::GarbageCbor => {
            let mut body = commit_header();
            body.extend_from_slice(&[0xa3, 0x63, b's', b'e', b'q', 0x1c, 0xff, 0xff]);
            sock.write_all(&frame(true, 0x2, &body))?;
            hold(&mut sock, stop)
        }
        Mode::DeepNesting => {
            let mut body = commit_header();
            body.extend(std::iter::repeat_n(0x81u8, 10_000));
            body.push(0x00);
            sock.write_all(&frame(true, 0x2, &body))?;
            hold(&mut sock, stop)
        }
        Mode::HugeContainer => {
            let mut body = commit_header();
            body.extend_from_slice(&[0xa1, 0x63, b'o', b'p', b's', 0x9b, 0, 0, 0, 1, 0, 0, 0, 0]);
            sock.write_all(&frame(true, 0x2, &body))?;
            hold(&mut sock, stop)
        }
        Mode::Slowloris => unreachable!("handled above"),
    }
}
