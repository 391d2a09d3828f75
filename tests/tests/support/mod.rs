//! The end-to-end harness shared by the tests in `tests/`: the fixture
//! most tests start from ([`Setup`]: a temp dir, a fakenet network, `sluice
//! run` on it, every host crawled), a `sluice run` child with its config
//! and log ([`Relay`]), process lookup, stream reading, requestCrawl of a
//! fakenet network, and the exact check. Every wait has a deadline.
#![allow(dead_code)] // each test binary uses its own part of it

use fakenet::check::{self, CheckConfig};
use fakenet::runner;
use sluice_common::atproto::frame::{self, Message};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `sluice` binary: `SLUICE_BIN`, else the one built next to the
/// tests' own binaries (built here if missing).
pub fn sluice_bin() -> PathBuf {
    if let Some(b) = std::env::var_os("SLUICE_BIN") {
        return PathBuf::from(b);
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_sluice-bench")).with_file_name("sluice");
    if !bin.exists() {
        let ok = Command::new(env!("CARGO"))
            .args(["build", "--bin", "sluice"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("cargo build");
        assert!(ok.success(), "building sluice failed");
    }
    bin
}

/// The fixture: a temp dir holding fakenet's ledger and the relay's data,
/// a fakenet network serving `net`, and `sluice run` (`shards`, the extra
/// config lines `extra`) with every fakenet host crawled.
///
/// Fields drop in the order written: the relay stops first, then the
/// network, and only then is the directory deleted (the other way round,
/// a relay still stopping wrote into a deleted data dir and left its
/// `run/` files behind in /tmp).
pub struct Setup {
    pub relay: Relay,
    pub net: runner::Running,
    pub dir: tempfile::TempDir,
}

impl Setup {
    pub fn start(net: runner::ServeConfig, shards: u32, extra: &str) -> Setup {
        Setup::start_with(tempfile::tempdir().unwrap(), net, shards, extra, |_| {})
    }

    /// As [`Setup::start`], but the relay starts only once the network
    /// has generated all it was to (the relay then reads backlogs).
    pub fn start_after_generation(net: runner::ServeConfig, shards: u32, extra: &str) -> Setup {
        Setup::start_with(tempfile::tempdir().unwrap(), net, shards, extra, |net| {
            net.wait_generation().expect("fakenet generates")
        })
    }

    /// The general form: in `dir` (which may hold files the config
    /// names), with `before_relay` run on the network before the relay
    /// starts.
    pub fn start_with(
        dir: tempfile::TempDir,
        net: runner::ServeConfig,
        shards: u32,
        extra: &str,
        before_relay: impl FnOnce(&mut runner::Running),
    ) -> Setup {
        let mut net = runner::start(runner::ServeConfig { ledger: dir.path().join("ledger.jsonl"), ..net })
            .expect("fakenet starts");
        before_relay(&mut net);
        let mut relay = Relay::new(dir.path(), &net.info.plc_url, shards, extra);
        relay.start();
        crawl_all(&relay, &net, "");
        Setup { dir, net, relay }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Relay {
    pub child: Option<Child>,
    pub config: PathBuf,
    pub log: PathBuf,
    pub port: u16,
    pub metrics_port: u16,
    /// Extra environment for `sluice run` (and so its children).
    pub env: Vec<(String, String)>,
}

impl Relay {
    pub fn new(dir: &Path, plc_url: &str, shard_count: u32, extra: &str) -> Relay {
        let port = free_port();
        let metrics_port = free_port();
        let config = dir.join("relay.toml");
        let r = Relay { child: None, config, log: dir.join("relay.log"), port, metrics_port, env: Vec::new() };
        r.write_config(dir, plc_url, shard_count, extra);
        r
    }

    pub fn write_config(&self, dir: &Path, plc_url: &str, shard_count: u32, extra: &str) {
        let (port, metrics_port, config) = (self.port, self.metrics_port, &self.config);
        // Tests run on loopback: plain-text hosts allowed unless `extra` says.
        let insecure = if extra.contains("allow_insecure_hosts") { "" } else { "allow_insecure_hosts = true\n" };
        std::fs::write(
            config,
            format!(
                "shard_count = {shard_count}\nlisten = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\ndata_dir = {:?}\nplc_url = {plc_url:?}\n\
                 {insecure}shutdown_timeout_ms = 20000\n{extra}\n",
                dir.join("data").to_string_lossy()
            ),
        )
        .unwrap();
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(sluice_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            // SLUICE_TEST_LOG: the relay's log filter when a test is
            // looked at closer (e.g. `info,sluice_dbwriter::identity=debug`).
            .env("SLUICE_LOG", std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "info,refinery_core=warn".into()))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_health(Duration::from_secs(120));
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        // Backtrace frames say little in a test failure; the lines around them do.
        let lines: Vec<&str> = s.lines().filter(|l| !l.starts_with("  ")).collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The whole log so far.
    pub fn log_all(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn http(&self, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
        let out = self.http_raw(method, path, body)?;
        let status = out.split(' ').nth(1)?.parse().ok()?;
        Some((status, out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned()))
    }

    /// The whole response, head and body.
    pub fn http_raw(&self, method: &str, path: &str, body: &str) -> Option<String> {
        self.http_raw_with(method, path, body, &[])
    }

    /// [`Relay::http_raw`] with extra request headers.
    pub fn http_raw_with(&self, method: &str, path: &str, body: &str, headers: &[(&str, &str)]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}connection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    pub fn wait_health(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        loop {
            if let Some((200, _)) = self.http("GET", "/xrpc/_health", "") {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("sluice exited ({st}) before it was healthy:\n{}", self.log_tail());
            }
            assert!(Instant::now() < deadline, "relay not healthy in time:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGTERM and wait (bounded); the exit must be clean.
    pub fn stop(&mut self) -> Duration {
        let t = Instant::now();
        let mut c = self.child.take().unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(st.success(), "sluice exited with {st}:\n{}", self.log_tail());
                return t.elapsed();
            }
            if t.elapsed() > Duration::from_secs(60) {
                let _ = c.kill();
                panic!("sluice did not stop within 60 s:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
        }
    }
}

/// Children of `pid` whose command line contains `needle`.
pub fn children_matching(pid: i32, needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
        let ppid: i32 = after.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0);
        let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if ppid == pid && cmd.contains(needle) {
            out.push(p);
        }
    }
    out
}

/// Read the relay's stream from `cursor` until `last` (inclusive). A
/// connection that ends early (a relay process restarting after a crash
/// the test caused) is opened again from the last seq read, within
/// `timeout`.
pub fn read_stream(port: u16, cursor: i64, last: i64, timeout: Duration) -> Vec<(i64, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let mut out: Vec<(i64, Vec<u8>)> = Vec::new();
    while out.last().is_none_or(|(s, _)| *s < last) {
        assert!(Instant::now() < deadline, "stream from {cursor} stalled at {:?}", out.last().map(|x| x.0));
        let from = out.last().map_or(cursor, |(s, _)| *s);
        let url = format!("ws://127.0.0.1:{port}/xrpc/com.atproto.sync.subscribeRepos?cursor={from}");
        let Ok(tcp) = TcpStream::connect(("127.0.0.1", port)) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let Ok((mut ws, _)) = tungstenite::client(url, tcp) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        while out.last().is_none_or(|(s, _)| *s < last) {
            assert!(Instant::now() < deadline, "stream from {cursor} stalled at {:?}", out.last().map(|x| x.0));
            match ws.read() {
                Ok(tungstenite::Message::Binary(b)) => {
                    let d = frame::decode(&b).unwrap();
                    let Message::Event(ev) = d.message else { panic!("error frame from the relay") };
                    let seq = ev.seq().expect("relayed events have a seq");
                    assert!(out.last().is_none_or(|(s, _)| *s < seq), "seq {seq} after {:?}", out.last().map(|x| x.0));
                    out.push((seq, b.to_vec()));
                }
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    continue
                }
                Err(_) => break,
            }
        }
    }
    out
}

/// How a [`watch`]ed subscription ended.
#[derive(Debug, Default)]
pub struct Watched {
    /// Event seqs in the order received.
    pub seqs: Vec<i64>,
    /// `#info` names received.
    pub infos: Vec<String>,
    /// The close frame's code, if the relay sent one.
    pub close_code: Option<u16>,
    /// The connection ended without a close frame (reset, EOF, error).
    pub dropped: Option<String>,
}

/// A [`watch`]ing thread, and how many events it has received so far.
pub struct Watcher {
    thread: std::thread::JoinHandle<Watched>,
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Watcher {
    /// Wait (bounded) until the subscription has received `n` events: a
    /// test that disturbs the relay "mid-stream" first knows the consumer
    /// is streaming, not still connecting.
    pub fn wait_seen(&self, n: usize, timeout: Duration) {
        let t = Instant::now();
        while self.seen.load(std::sync::atomic::Ordering::Acquire) < n {
            assert!(
                t.elapsed() < timeout && !self.thread.is_finished(),
                "the watcher saw {} of {n} events",
                self.seen.load(std::sync::atomic::Ordering::Acquire)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How the subscription ended.
    pub fn join(self) -> std::thread::Result<Watched> {
        self.thread.join()
    }
}

/// One subscription from `cursor`, on one connection, in a thread: reads
/// until the relay closes it, the connection fails, `until` (set later by
/// the test) is reached, or `timeout`.
pub fn watch(
    port: u16,
    cursor: i64,
    until: std::sync::Arc<std::sync::atomic::AtomicI64>,
    timeout: Duration,
) -> Watcher {
    use std::sync::atomic::Ordering;
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    let url = format!("ws://127.0.0.1:{port}/xrpc/com.atproto.sync.subscribeRepos?cursor={cursor}");
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let (mut ws, _) = tungstenite::client(url, tcp).unwrap();
    let thread = std::thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        let mut w = Watched::default();
        while Instant::now() < deadline && w.seqs.last().is_none_or(|s| *s < until.load(Ordering::Acquire)) {
            match ws.read() {
                Ok(tungstenite::Message::Binary(b)) => match frame::decode(&b).unwrap().message {
                    Message::Event(frame::Event::Info(i)) => w.infos.push(i.name.to_owned()),
                    Message::Event(ev) => {
                        w.seqs.push(ev.seq().expect("relayed events have a seq"));
                        counter.store(w.seqs.len(), Ordering::Release);
                    }
                    Message::Error { .. } => w.infos.push("error frame".into()),
                },
                Ok(tungstenite::Message::Close(c)) => {
                    w.close_code = Some(c.map_or(1005, |f| u16::from(f.code)));
                    break;
                }
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    continue
                }
                Err(e) => {
                    w.dropped = Some(e.to_string());
                    break;
                }
            }
        }
        w
    });
    Watcher { thread, seen }
}

/// Seqs that come twice or are skipped, from the first one received.
pub fn gaps_and_repeats(seqs: &[i64]) -> Vec<(i64, i64)> {
    seqs.windows(2).filter(|p| p[1] != p[0] + 1).map(|p| (p[0], p[1])).collect()
}

/// POST requestCrawl for every fakenet host (as given, or with a scheme).
pub fn crawl_all(relay: &Relay, net: &runner::Running, scheme: &str) {
    for h in &net.info.hosts {
        let (st, body) = relay
            .http("POST", "/xrpc/com.atproto.sync.requestCrawl", &format!("{{\"hostname\":\"{scheme}{h}\"}}"))
            .expect("requestCrawl answered");
        assert_eq!(st, 200, "requestCrawl {h}: {body}");
    }
}

/// Wait (bounded) until fakenet generated `n` events.
pub fn wait_events(net: &runner::Running, n: u64) {
    let t = Instant::now();
    while net.events() < n {
        assert!(t.elapsed() < Duration::from_secs(120), "fakenet too slow: {} events", net.events());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The exact check of the relay's whole window against the ledger.
pub fn check_exact(relay: &Relay, dir: &Path, timeout: Duration) -> check::Report {
    let report = check::run(&CheckConfig {
        relay: format!("ws://127.0.0.1:{}", relay.port),
        ledger: dir.join("ledger.jsonl"),
        cursor: Some(0),
        timeout,
        settle: Duration::from_secs(2),
        wait_done: true,
        only_host: None,
    })
    .unwrap();
    assert!(report.ok(), "{}\n{:?}\n{}", report.summary(), report.notes, relay.log_tail());
    report
}

/// The relay's metrics page.
pub fn metrics_page(relay: &Relay) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", relay.metrics_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Sum of the metric `name` over its series; `name` may carry a label
/// (`sluice_x_total{outcome="ok"` without the closing brace matches that
/// series).
pub fn metric(relay: &Relay, name: &str) -> u64 {
    metrics_page(relay)
        .lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name) && l[name.len()..].starts_with(['{', ' ', ',', '}']))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// `$SLUICE_FIXTURES`, else `../shared/fixtures` from the repo root; a test
/// that cannot find them fails (the README's test command fetches them).
pub fn fixtures() -> PathBuf {
    let dir = match std::env::var_os("SLUICE_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"),
    };
    assert!(dir.join("SOURCES.md").is_file(), "fixtures not found at {} (set SLUICE_FIXTURES)", dir.display());
    dir
}
