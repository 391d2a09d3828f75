//! Fan-out bench (issue 9): N live consumers of one relay at a fixed
//! event rate. fakenet (in process) waits until the relay subscribed to
//! every host, stays silent while the bench opens N subscriptions from the
//! same cursor, then sends `--rate` events/s for `--seconds`. So frame k
//! of every consumer is relay seq cursor + k.
//!
//! Consumers are cheap: a tokio runtime of `--consumer-threads` workers
//! (2: one thread could not read 2 GB/s while sharing a core), raw
//! WebSocket frame parsing (server frames are unmasked), no decoding; each
//! keeps the arrival time of every `--sample`-th frame. One more consumer
//! on its own thread decodes everything and maps seq to fakenet's
//! emission time. Latency = a consumer's arrival − fakenet handing the
//! event to its host (an upper bound on commit → read).
//!
//! Reports per N: frames delivered of those due, p50/p99/max latency, relay
//! CPU per delivered frame, shard RssAnon per consumer while streaming,
//! the shards' RssAnon after they leave, and the consumer thread's CPU.
//! Then (`--churn`) that many subscriptions come and go, and the shards'
//! RssAnon before and after.
//!
//! `cargo build --release --bins && target/release/sluice-fanout --consumers 1,100,1000`

use clap::Parser;
use fakenet::runner::{self, ServeConfig};
use sluice_tests::http::{metric, request as http};
use sluice_tests::procinfo;
use std::collections::HashMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    consumers: Vec<usize>,
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Threads the consumers share (a tokio runtime of that many workers).
    #[arg(long, default_value_t = 2)]
    consumer_threads: usize,
    /// Keep the arrival time of every n-th frame per consumer.
    #[arg(long, default_value_t = 10)]
    sample: u64,
    /// Subscriptions that come and go after the last run (0: none).
    #[arg(long, default_value_t = 5000)]
    churn: u64,
    #[arg(long)]
    sluice: Option<PathBuf>,
    /// fakenet generates and signs every event before the run and only
    /// hands them to its hosts at the rate (its signing off the cores
    /// the relay is measured on).
    #[arg(long)]
    pregenerate: bool,
    /// Also print latency p50/p99/max per second of emission.
    #[arg(long)]
    timeline: bool,
}

struct Relay {
    child: Child,
    port: u16,
    metrics: u16,
}

impl Relay {
    fn start(sluice: &Path, dir: &Path, shards: u32, plc: &str) -> anyhow::Result<Relay> {
        std::fs::create_dir_all(dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        std::fs::write(
            dir.join("relay.toml"),
            format!(
                "shard_count = {shards}\nlisten = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n\
                 data_dir = {:?}\nplc_url = {plc:?}\nallow_insecure_hosts = true\n[limits]\nconsumers_max = 20000\n",
                dir.join("data").to_string_lossy()
            ),
        )?;
        let child = Command::new(sluice)
            .args(["run", "--config"])
            .arg(dir.join("relay.toml"))
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("relay.log"))?)
            .spawn()?;
        let t = Instant::now();
        while http(port, "GET", "/xrpc/_health", "").is_none_or(|(st, _)| st != 200) {
            anyhow::ensure!(t.elapsed() < Duration::from_secs(120), "relay not healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Relay { child, port, metrics })
    }

    fn pids(&self) -> Vec<(String, u32)> {
        let mut v = vec![("supervisor".to_owned(), self.child.id())];
        for (p, name) in procinfo::children(self.child.id()) {
            if name.starts_with("shard") || name.starts_with("db-writer") {
                v.push((name.split(" --config").next().unwrap_or(&name).to_owned(), p));
            }
        }
        v
    }

    fn shard_anon_kb(&self) -> u64 {
        self.pids().iter().filter(|(n, _)| n.starts_with("shard")).map(|(_, p)| procinfo::status(*p, "RssAnon:")).sum()
    }

    fn cpu_ticks(&self) -> u64 {
        self.pids().iter().map(|(_, p)| procinfo::cpu_ticks(*p)).sum()
    }

    fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// What the consumers saw: per consumer, the arrival of every sampled
/// frame index; and the frames and bytes in all.
#[derive(Default)]
struct Seen {
    arrivals: Vec<Vec<(u64, Instant)>>,
    frames: u64,
    bytes: u64,
}

const UPGRADE: &str = "upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n";

/// One cheap consumer: upgrade, then count binary frames by header only.
async fn consume(
    port: u16,
    cursor: u64,
    sample: u64,
    stop: Arc<AtomicBool>,
    stopping: Arc<tokio::sync::Notify>,
    frames: Arc<AtomicU64>,
) -> std::io::Result<(Vec<(u64, Instant)>, u64)> {
    // Created before the stop is announced (every consumer starts first),
    // and kept across reads: no timer per read.
    let stopped = stopping.notified();
    tokio::pin!(stopped);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let req = format!("GET /xrpc/com.atproto.sync.subscribeRepos?cursor={cursor} HTTP/1.1\r\nhost: x\r\n{UPGRADE}");
    s.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0usize;
    // The 101 head.
    let mut start = loop {
        let n = s.read(&mut buf[have..]).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed during the upgrade"));
        }
        have += n;
        if let Some(i) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let (mut k, mut bytes) = (0u64, 0u64);
    let mut arrivals = Vec::new();
    // Frames: FIN/opcode, length (7, 16 or 64 bits), payload; unmasked.
    let mut need_skip = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let mut pos = start;
        loop {
            if need_skip > 0 {
                let take = need_skip.min(have - pos);
                pos += take;
                need_skip -= take;
                if need_skip > 0 {
                    break;
                }
            }
            if have - pos < 2 {
                break;
            }
            let op = buf[pos] & 0x0f;
            let (len, hl) = match buf[pos + 1] & 0x7f {
                126 if have - pos >= 4 => (u16::from_be_bytes([buf[pos + 2], buf[pos + 3]]) as usize, 4),
                127 if have - pos >= 10 => {
                    (u64::from_be_bytes(buf[pos + 2..pos + 10].try_into().expect("8 bytes")) as usize, 10)
                }
                126 | 127 => break,
                l => (l as usize, 2),
            };
            pos += hl;
            if op == 2 {
                if k % sample == 0 {
                    arrivals.push((k, Instant::now()));
                }
                k += 1;
                frames.fetch_add(1, Ordering::Relaxed);
                bytes += len as u64;
            } else if op == 8 {
                return Err(std::io::Error::other(format!("close frame from the relay after {k} frames")));
            }
            need_skip = len;
        }
        buf.copy_within(pos..have, 0);
        have -= pos;
        start = 0;
        let n = tokio::select! {
            n = s.read(&mut buf[have..]) => n?,
            _ = &mut stopped => break,
        };
        if n == 0 {
            break;
        }
        have += n;
    }
    Ok((arrivals, bytes))
}

/// The decoding consumer: relay seq → arrival, for mapping to emission.
fn probe(port: u16, cursor: u64, stop: Arc<AtomicBool>) -> Vec<(i64, String)> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let url = format!("ws://127.0.0.1:{port}/xrpc/com.atproto.sync.subscribeRepos?cursor={cursor}");
    let (mut ws, _) = tungstenite::client(url, tcp).expect("subscribe");
    let mut out = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let Ok(tungstenite::Message::Binary(b)) = ws.read() else { continue };
        let decoded = sluice_common::atproto::frame::decode(&b);
        if let Ok(d) = decoded {
            if let sluice_common::atproto::frame::Message::Event(e) = &d.message {
                let cid = match e {
                    sluice_common::atproto::frame::Event::Commit(c) => c.commit.to_string(),
                    _ => String::new(),
                };
                out.push((e.seq().unwrap_or(0), cid));
            }
        }
    }
    out
}

struct Row {
    consumers: usize,
    due: u64,
    delivered: u64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    relay_cpu_s: f64,
    frames_out: u64,
    anon_per_consumer_kb: f64,
    anon_before_kb: u64,
    anon_after_kb: u64,
    client_cpu_s: f64,
}

/// CPU ticks of this process's threads named `name`.
fn threads_ticks(name: &str) -> u64 {
    let mut ticks = 0;
    for t in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let dir = t.path();
        if std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == name) {
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
            let f: Vec<&str> = after.split_whitespace().collect();
            ticks += f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ticks
}

/// The consumer threads' name (their CPU is summed by it).
const CONSUMER_THREADS: &str = "consumers";

fn run_one(a: &Args, sluice: &Path, dir: &Path, n: usize) -> anyhow::Result<Row> {
    let setup = Duration::from_secs(10 + n as u64 / 100);
    let mut net = runner::start(ServeConfig {
        hosts: 10,
        accounts: 20,
        seed: 20 + n as u64,
        rate: a.rate,
        duration: Some(Duration::from_secs(a.seconds)),
        ledger: dir.join(format!("ledger-{n}.jsonl")),
        wait_subscribers: Some(Duration::from_secs(120)),
        start_delay: Some(setup),
        emit_times_max: 10_000_000,
        pregenerate: a.pregenerate,
        ..ServeConfig::default()
    })?;
    let relay = Relay::start(sluice, &dir.join(format!("relay-{n}")), a.shards, &net.info.plc_url)?;
    for h in &net.info.hosts {
        anyhow::ensure!(http(
            relay.port,
            "POST",
            "/xrpc/com.atproto.sync.requestCrawl",
            &format!("{{\"hostname\":\"{h}\"}}")
        )
        .is_some_and(|(st, _)| st == 200));
    }
    // Every host subscribed: fakenet's start delay runs from here.
    let t = Instant::now();
    while !net.shared.hosts.iter().all(|h| h.subscribed.load(Ordering::Acquire)) {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "relay did not subscribe to every host");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    let cursor = metric(relay.metrics, "sluice_committed_seq");
    let anon_before_kb = relay.shard_anon_kb();
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Arc::new(tokio::sync::Notify::new());
    let frames = Arc::new(AtomicU64::new(0));
    let (port, sample) = (relay.port, a.sample);
    let consumers = {
        let (stop, stopping, frames) = (stop.clone(), stopping.clone(), frames.clone());
        let threads = a.consumer_threads.max(1);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name(CONSUMER_THREADS)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for _ in 0..n {
                    tasks.push(tokio::spawn(consume(
                        port,
                        cursor,
                        sample,
                        stop.clone(),
                        stopping.clone(),
                        frames.clone(),
                    )));
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let mut seen = Seen::default();
                for t in tasks {
                    match t.await {
                        Ok(Ok((arr, bytes))) => {
                            seen.bytes += bytes;
                            seen.arrivals.push(arr);
                        }
                        Ok(Err(e)) => eprintln!("a consumer failed: {e}"),
                        Err(e) => eprintln!("a consumer task failed: {e}"),
                    }
                }
                seen.frames = frames.load(Ordering::Relaxed);
                seen
            })
        })
    };
    let probe_stop = stop.clone();
    let prober = std::thread::spawn(move || probe(port, cursor, probe_stop));
    // Connected before fakenet starts sending.
    let t = Instant::now();
    while metric(relay.metrics, "sluice_shard_consumers") < n as u64 + 1 {
        anyhow::ensure!(
            t.elapsed() < setup,
            "only {} consumers connected",
            metric(relay.metrics, "sluice_shard_consumers")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Steady state: measure CPU and frames over the middle of the run.
    let t = Instant::now();
    while metric(relay.metrics, "sluice_committed_seq") == cursor {
        anyhow::ensure!(t.elapsed() < setup + Duration::from_secs(10), "no events");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(2));
    let window = Duration::from_secs(a.seconds.saturating_sub(5).max(2));
    let (cpu0, out0, cl0) =
        (relay.cpu_ticks(), metric(relay.metrics, "sluice_shard_frames_out_total"), threads_ticks(CONSUMER_THREADS));
    std::thread::sleep(window);
    let (cpu1, out1, cl1) =
        (relay.cpu_ticks(), metric(relay.metrics, "sluice_shard_frames_out_total"), threads_ticks(CONSUMER_THREADS));
    let anon_streaming = relay.shard_anon_kb();
    net.wait_generation()?;
    let last = net.events() as u64;
    let end = Instant::now() + Duration::from_secs(15);
    while frames.load(Ordering::Relaxed) < last * n as u64 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Release);
    stopping.notify_waiters();
    let seen = consumers.join().map_err(|_| anyhow::anyhow!("consumer thread panicked"))?;
    let probed = prober.join().map_err(|_| anyhow::anyhow!("probe panicked"))?;
    std::thread::sleep(Duration::from_secs(2));
    let anon_after_kb = relay.shard_anon_kb();
    let cuts = (
        metric(relay.metrics, "sluice_shard_consumers_cut_lag_total"),
        metric(relay.metrics, "sluice_shard_consumers_cut_unwritable_total"),
    );
    if seen.frames < last * n as u64 || cuts != (0, 0) {
        eprintln!(
            "{n} consumers: {} frames short; consumers cut (lag, unwritable): {cuts:?}; {} of {n} consumer tasks ended cleanly; logs in {}",
            last * n as u64 - seen.frames.min(last * n as u64),
            seen.arrivals.len(),
            dir.display()
        );
    }
    // Frame index k is seq cursor + 1 + k; its emission from fakenet.
    let emitted = net.shared.emit_times.lock().unwrap().clone();
    let by_seq: HashMap<i64, Instant> =
        probed.iter().filter_map(|(seq, cid)| emitted.get(cid).map(|t| (*seq, *t))).collect();
    let mut lat: Vec<Duration> = seen
        .arrivals
        .iter()
        .flatten()
        .filter_map(|(k, at)| by_seq.get(&(cursor as i64 + 1 + *k as i64)).map(|e| at.saturating_duration_since(*e)))
        .collect();
    if a.timeline {
        timeline(&seen.arrivals, &by_seq, cursor);
    }
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or_default()
    };
    let row = Row {
        consumers: n,
        due: last * n as u64,
        delivered: seen.frames,
        p50: pct(0.5),
        p99: pct(0.99),
        max: lat.last().copied().unwrap_or_default(),
        relay_cpu_s: (cpu1 - cpu0) as f64 / 100.0,
        frames_out: out1 - out0,
        anon_per_consumer_kb: anon_streaming.saturating_sub(anon_before_kb) as f64 / n as f64,
        anon_before_kb,
        anon_after_kb,
        client_cpu_s: (cl1 - cl0) as f64 / 100.0,
    };
    eprintln!(
        "{n} consumers: {} of {} frames, {} latencies, relay CPU {:.2} s for {} frames out in {window:?}",
        row.delivered,
        row.due,
        lat.len(),
        row.relay_cpu_s,
        row.frames_out
    );
    if a.churn > 0 && n == *a.consumers.last().unwrap_or(&0) {
        churn(a.churn, &relay, cursor);
    }
    relay.stop();
    Ok(row)
}

/// Latency by the second of emission (from the first event's): where in
/// the run a backlog builds.
fn timeline(arrivals: &[Vec<(u64, Instant)>], by_seq: &HashMap<i64, Instant>, cursor: u64) {
    let Some(t0) = by_seq.values().min().copied() else { return };
    let mut by_second: std::collections::BTreeMap<u64, Vec<Duration>> = Default::default();
    for (k, at) in arrivals.iter().flatten() {
        if let Some(e) = by_seq.get(&(cursor as i64 + 1 + *k as i64)) {
            by_second.entry(e.duration_since(t0).as_secs()).or_default().push(at.saturating_duration_since(*e));
        }
    }
    for (sec, mut l) in by_second {
        l.sort();
        let at = |p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)].as_secs_f64() * 1e3;
        eprintln!(
            "  second {sec:>3}: {:>7} samples, p50 {:>8.1} p99 {:>8.1} max {:>8.1} ms",
            l.len(),
            at(0.5),
            at(0.99),
            at(1.0)
        );
    }
}

/// `count` subscriptions from cursors spread over the window, each reading
/// 100 frames and hanging up; the shards' RssAnon before and after.
fn churn(count: u64, relay: &Relay, first: u64) {
    let top = metric(relay.metrics, "sluice_committed_seq");
    let before = relay.shard_anon_kb();
    let t = Instant::now();
    let port = relay.port;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let span = top.saturating_sub(first).max(1);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..count {
            let cursor = first + (i * 7919) % span;
            let stop = stop.clone();
            tasks.spawn(async move {
                let frames = Arc::new(AtomicU64::new(0));
                let f2 = frames.clone();
                let s2 = Arc::new(AtomicBool::new(false));
                let s3 = s2.clone();
                let stopping = Arc::new(tokio::sync::Notify::new());
                let reader = tokio::spawn(consume(port, cursor, 1000, s3, stopping.clone(), f2));
                let t = Instant::now();
                while frames.load(Ordering::Relaxed) < 100
                    && t.elapsed() < Duration::from_secs(10)
                    && !stop.load(Ordering::Relaxed)
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                s2.store(true, Ordering::Relaxed);
                stopping.notify_waiters();
                let _ = reader.await;
            });
            // At most 50 at once.
            while tasks.len() >= 50 {
                tasks.join_next().await;
            }
        }
        while tasks.join_next().await.is_some() {}
    });
    std::thread::sleep(Duration::from_secs(3));
    let after = relay.shard_anon_kb();
    println!(
        "\nchurn: {count} subscriptions (100 frames each) in {:.1} s; shards' RssAnon {:.1} → {:.1} MiB ({:+.1} MiB)",
        t.elapsed().as_secs_f64(),
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after as f64 - before as f64) / 1024.0
    );
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let sluice = a.sluice.clone().unwrap_or_else(|| std::env::current_exe().expect("exe").with_file_name("sluice"));
    if let Ok((_, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let dir = std::env::temp_dir().join(format!("sluice-fanout-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut rows = Vec::new();
    for &n in &a.consumers {
        rows.push(run_one(&a, &sluice, &dir, n)?);
    }
    if rows.iter().all(|r| r.delivered == r.due) {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("\n## sluice-fanout: {} shards, {} events/s for {} s\n", a.shards, a.rate, a.seconds);
    println!("| consumers | delivered / due | latency p50 / p99 / max | relay CPU per frame out | shard RssAnon per consumer | shards' RssAnon before → after | consumer threads' CPU |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} / {} | {:.1} / {:.1} / {:.1} ms | {:.2} µs | {:.1} KiB | {:.1} → {:.1} MiB | {:.2} s vs relay {:.2} s |",
            r.consumers,
            r.delivered,
            r.due,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.max.as_secs_f64() * 1e3,
            r.relay_cpu_s * 1e6 / r.frames_out.max(1) as f64,
            r.anon_per_consumer_kb,
            r.anon_before_kb as f64 / 1024.0,
            r.anon_after_kb as f64 / 1024.0,
            r.client_cpu_s,
            r.relay_cpu_s,
        );
    }
    if rows.len() >= 2 {
        let (a0, b0) = (&rows[0], &rows[rows.len() - 1]);
        let extra = (b0.relay_cpu_s - a0.relay_cpu_s) / (b0.frames_out.saturating_sub(a0.frames_out)).max(1) as f64;
        println!(
            "\nmarginal relay CPU per frame for one more consumer ({} → {}): {:.2} µs",
            a0.consumers,
            b0.consumers,
            extra * 1e6
        );
    }
    Ok(())
}
