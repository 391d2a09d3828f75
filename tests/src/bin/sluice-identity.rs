//! Identity at network scale (issue 21): the relay against a network of a
//! million accounts (fakenet in this process, keys derived on demand), a
//! day's active set among them with a skew, live traffic at a fixed rate,
//! and a PLC directory with latency and a rate limit of its own.
//!
//! Phases, each reported:
//! 1. The shard's identity cache alone: bytes per entry as RSS over
//!    entries, at `--cache-entries`.
//! 2. Warm-up: the relay starts knowing nobody; every 10 s, events/s and
//!    directory requests/s, until lookups fall under `--warm-lookups` a
//!    second (or `--warmup-max-s`).
//! 3. Steady (`--steady-s`): events/s, lookups/s by outcome, cache hit
//!    rate, p50/p99 emission to consumer for the host with an
//!    unresolvable account and for the others, p99 ingest to durable,
//!    per-process RSS and threads, bytes per cached identity.
//! 4. A restart of the relay: directory requests in its first minute.
//! 5. The directory's view: most requests within a second, 429s, requests
//!    during a Retry-After, connections.
//!
//! `cargo build --release --bins && target/release/sluice-identity`

use clap::Parser;
use fakenet::runner::{self, ServeConfig};
use fakenet::server::DirectoryConfig;
use sluice_common::atproto::frame::{self, Event, Message};
use sluice_tests::http::{metric, request};
use sluice_tests::procinfo::{children, status as proc_status};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 2)]
    shards: u32,
    #[arg(long, default_value_t = 4)]
    hosts: usize,
    /// Accounts in all (spread evenly over the hosts).
    #[arg(long, default_value_t = 1_000_000)]
    accounts: usize,
    /// The share of each host's accounts that act (a day's active set).
    #[arg(long, default_value_t = 0.02)]
    active_share: f64,
    /// Zipf exponent over the active accounts.
    #[arg(long, default_value_t = 0.8)]
    account_skew: f64,
    /// Live events per second.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Accounts created per thousand events (the network: about 0.3).
    #[arg(long, default_value_t = 0.3)]
    new_accounts_per_mille: f64,
    #[arg(long, default_value_t = 50)]
    plc_latency_ms: u64,
    /// The directory's own rate (429 past it).
    #[arg(long, default_value_t = 100.0)]
    plc_rate: f64,
    /// The relay's `plc_requests_per_second`.
    #[arg(long, default_value_t = 100.0)]
    relay_plc_rate: f64,
    #[arg(long, default_value_t = 8)]
    concurrency: u32,
    /// One account on host 0 that cannot be resolved: `plc` (not
    /// registered), `web-hang` (a did:web host that never answers), `none`.
    #[arg(long, default_value = "plc")]
    unresolvable: String,
    #[arg(long, default_value_t = 900)]
    warmup_max_s: u64,
    /// Warm once directory requests fall under this many a second.
    #[arg(long, default_value_t = 5.0)]
    warm_lookups: f64,
    #[arg(long, default_value_t = 60)]
    steady_s: u64,
    /// Entries for the cache-alone measurement (0: skip it).
    #[arg(long, default_value_t = 1_000_000)]
    cache_entries: usize,
    #[arg(long)]
    sluice: Option<PathBuf>,
    /// The relay is a build from before the identity service (its config
    /// has no identity keys).
    #[arg(long)]
    legacy: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.cache_entries > 0 {
        cache_alone(a.cache_entries);
    }
    let dir = std::env::temp_dir().join(format!("sluice-identity-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let rss0 = proc_status(std::process::id(), "VmRSS:");
    let t = Instant::now();
    let net = runner::start(ServeConfig {
        hosts: a.hosts,
        accounts: a.accounts / a.hosts,
        skew: 0.0,
        seed: 21,
        rate: a.rate,
        duration: Some(Duration::from_secs(a.warmup_max_s + a.steady_s + 180)),
        new_accounts_per_mille: a.new_accounts_per_mille,
        account_skew: a.account_skew,
        active_share: a.active_share,
        broken_web: usize::from(a.unresolvable == "web-hang") * 3,
        unregistered: usize::from(a.unresolvable == "plc"),
        directory: DirectoryConfig {
            latency: Duration::from_millis(a.plc_latency_ms),
            rate: a.plc_rate,
            retry_after_s: 1,
            ..DirectoryConfig::default()
        },
        ledger: dir.join("ledger.jsonl"),
        wait_subscribers: Some(Duration::from_secs(120)),
        emit_times_max: 4_000_000,
        ..ServeConfig::default()
    })?;
    let population = net.shared.population.clone().expect("a generated network");
    println!(
        "fakenet: {} accounts over {} hosts in {:.1} s; this process {} -> {} MiB RSS ({:.0} B an account)",
        population.initial(),
        a.hosts,
        t.elapsed().as_secs_f64(),
        rss0 / 1024,
        proc_status(std::process::id(), "VmRSS:") / 1024,
        (proc_status(std::process::id(), "VmRSS:") - rss0) as f64 * 1024.0 / population.initial() as f64
    );
    let sluice = a.sluice.clone().unwrap_or_else(|| std::env::current_exe().unwrap().with_file_name("sluice"));
    let relay_dir = dir.join("relay");
    let mut relay = Relay::start(&sluice, &relay_dir, &a, &net.info.plc_url)?;
    let lat = Latencies::start(relay.port, net.shared.clone());
    for h in &net.info.hosts {
        request(relay.port, "POST", "/xrpc/com.atproto.sync.requestCrawl", &format!("{{\"hostname\":\"{h}\"}}"));
    }
    let dirs = &net.shared.dir_stats;
    let doc_requests = || dirs.doc_requests.load(Ordering::Relaxed);
    warm_up(&a, &relay, &doc_requests);
    steady(&a, &relay, &lat, &doc_requests);
    // A restart: what it asks the directory in its first minute.
    relay.stop();
    let before = doc_requests();
    let t = Instant::now();
    relay = Relay::start(&sluice, &relay_dir, &a, &net.info.plc_url)?;
    let up = t.elapsed();
    std::thread::sleep(Duration::from_secs(60).saturating_sub(up));
    println!(
        "restart: healthy in {:.1} s; {} directory requests in its first minute; relayed {} since",
        up.as_secs_f64(),
        doc_requests() - before,
        metric(relay.metrics, "sluice_events_relayed_total")
    );
    println!(
        "directory: at most {} requests within a second (its limit {}, the relay's {}); {} answered 429, {} came \
         during a Retry-After; {} documents and {} export pages over {} connections",
        dirs.max_per_second.load(Ordering::Relaxed),
        a.plc_rate,
        a.relay_plc_rate,
        dirs.answered_429.load(Ordering::Relaxed),
        dirs.during_retry_after.load(Ordering::Relaxed),
        doc_requests(),
        dirs.export_requests.load(Ordering::Relaxed),
        dirs.connections.load(Ordering::Relaxed)
    );
    println!(
        "fakenet at the end: {} MiB RSS for {} accounts, {} of them live",
        proc_status(std::process::id(), "VmRSS:") / 1024,
        population.initial(),
        net.shared.repos.read().unwrap().len()
    );
    lat.stop();
    relay.stop();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The shard's identity cache filled to `n` entries in this process: RSS
/// over entries.
fn cache_alone(n: usize) {
    use sluice_shard::idcache::{Entry, IdCache};
    let me = std::process::id();
    let before = proc_status(me, "VmRSS:");
    let mut c = IdCache::new((n as u64 + 1) * IdCache::ENTRY_BYTES as u64);
    let key =
        sluice_common::atproto::crypto::PrivateKey::from_bytes(sluice_common::atproto::crypto::Curve::K256, &[7u8; 32])
            .expect("a key")
            .public_key()
            .compact();
    let p =
        fakenet::population::Population::new(&fakenet::world::WorldConfig::small(1, vec!["localhost:1".into()]), &[n]);
    for i in 0..n {
        let k = c.key(&p.did(i));
        c.insert(k, Entry { key: Some(key), pds: 1, as_of_micros: i as i64 }, (i % 64) as i64);
    }
    let after = proc_status(me, "VmRSS:");
    println!(
        "identity cache alone: {} entries, RSS +{} KiB = {:.0} B an entry ({} B by its own count)",
        c.len(),
        after - before,
        (after - before) as f64 * 1024.0 / c.len() as f64,
        c.bytes() / c.len().max(1)
    );
}

/// Warm-up: report every 10 s until lookups fall under the threshold.
fn warm_up(a: &Args, relay: &Relay, doc_requests: &dyn Fn() -> u64) {
    let t = Instant::now();
    let (mut last_rel, mut last_doc) = (0, doc_requests());
    loop {
        std::thread::sleep(Duration::from_secs(10));
        let (rel, doc) = (metric(relay.metrics, "sluice_events_relayed_total"), doc_requests());
        let (ev, lk) = ((rel - last_rel) as f64 / 10.0, (doc - last_doc) as f64 / 10.0);
        println!(
            "warm-up {:>4} s: {ev:>6.0} events/s relayed, {lk:>6.1} lookups/s, queue {}, cache {} identities",
            t.elapsed().as_secs(),
            metric(relay.metrics, "sluice_identity_queue_depth"),
            metric(relay.metrics, "sluice_identity_cache_entries")
        );
        (last_rel, last_doc) = (rel, doc);
        if (lk < a.warm_lookups && t.elapsed() >= Duration::from_secs(60))
            || t.elapsed() >= Duration::from_secs(a.warmup_max_s)
        {
            println!("warm after {} s", t.elapsed().as_secs());
            return;
        }
    }
}

/// The steady window's figures.
fn steady(a: &Args, relay: &Relay, lat: &Latencies, doc_requests: &dyn Fn() -> u64) {
    let m = |n: &str| metric(relay.metrics, n);
    let outcomes = ["ok", "not_found", "invalid", "rate_limited", "error", "refused"];
    let fetches = || outcomes.map(|o| m(&format!("sluice_identity_fetches_total{{outcome=\"{o}\"")));
    let (rel0, doc0, f0, hit0, miss0) = (
        m("sluice_events_relayed_total"),
        doc_requests(),
        fetches(),
        m("sluice_identity_cache_hits_total"),
        m("sluice_identity_cache_misses_total"),
    );
    let t0 = Instant::now();
    lat.clear();
    let mut peak: std::collections::BTreeMap<String, (u64, u64, u64)> = Default::default();
    while t0.elapsed() < Duration::from_secs(a.steady_s) {
        let mut procs = children(relay.child.id());
        procs.push((relay.child.id(), "supervisor".into()));
        for (p, name) in procs {
            let name = name.split(" --config").next().unwrap_or("").to_owned();
            let e = peak.entry(name).or_default();
            e.0 = e.0.max(proc_status(p, "VmRSS:"));
            e.1 = e.1.max(proc_status(p, "RssAnon:"));
            e.2 = e.2.max(proc_status(p, "Threads:"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let secs = t0.elapsed().as_secs_f64();
    let f1 = fetches();
    let (hits, misses) =
        (m("sluice_identity_cache_hits_total") - hit0, m("sluice_identity_cache_misses_total") - miss0);
    println!(
        "steady {secs:.0} s: {:.0} events/s relayed ({} offered); {:.2} lookups/s; cache hit rate {:.4}",
        (m("sluice_events_relayed_total") - rel0) as f64 / secs,
        a.rate,
        (doc_requests() - doc0) as f64 / secs,
        hits as f64 / (hits + misses).max(1) as f64
    );
    let by_outcome: Vec<String> =
        outcomes.iter().zip(f1.iter().zip(f0.iter())).map(|(o, (x, y))| format!("{o} {}", x - y)).collect();
    println!("  directory requests by outcome: {}", by_outcome.join(", "));
    let (h0, rest) = lat.percentiles();
    println!("  emission to consumer, host 0 (one unresolvable account): {h0}");
    println!("  emission to consumer, other hosts:                       {rest}");
    let entries = m("sluice_identity_cache_entries");
    println!(
        "  identity cache: {entries} identities; {} KiB allocated for its capacity",
        m("sluice_identity_cache_bytes") / 1024
    );
    let unresolved: u64 = (0..a.shards)
        .map(|k| m(&format!("sluice_shard_drops_total{{shard=\"{k}\",reason=\"identity_unresolved\"")))
        .sum();
    println!("  events of unresolvable identities dropped: {unresolved}");
    for (name, (rss, anon, threads)) in &peak {
        println!("  {name:<14} peak RSS {rss:>8} KiB (anon {anon:>7} KiB)  threads {threads}");
    }
}

/// Emission (fakenet handing a commit to its host) to the consumer's read,
/// per commit, by whether the commit's host is host 0.
struct Latencies {
    samples: Arc<Mutex<(Vec<Duration>, Vec<Duration>)>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Latencies {
    fn start(port: u16, shared: Arc<fakenet::server::Shared>) -> Latencies {
        let population = shared.population.clone().expect("a generated network");
        let samples: Arc<Mutex<(Vec<Duration>, Vec<Duration>)>> = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            tcp.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            let url = format!("ws://127.0.0.1:{port}/xrpc/com.atproto.sync.subscribeRepos");
            let (mut ws, _) = tungstenite::client(url, tcp).expect("subscribe");
            while !st.load(Ordering::Acquire) {
                let Ok(tungstenite::Message::Binary(b)) = ws.read() else { continue };
                let now = Instant::now();
                let Ok(d) = frame::decode(&b) else { continue };
                let Message::Event(Event::Commit(c)) = d.message else { continue };
                let Some(emitted) = shared.emit_times.lock().unwrap().get(&c.commit.to_string()).copied() else {
                    continue;
                };
                let host0 = population.index_of(c.repo).is_some_and(|i| population.initial_host(i) == 0);
                let mut g = s.lock().unwrap();
                let l = now.duration_since(emitted);
                if host0 {
                    g.0.push(l)
                } else {
                    g.1.push(l)
                }
            }
        });
        Latencies { samples, stop, thread: Some(thread) }
    }

    fn clear(&self) {
        let mut g = self.samples.lock().unwrap();
        g.0.clear();
        g.1.clear();
    }

    fn percentiles(&self) -> (String, String) {
        let g = self.samples.lock().unwrap();
        let f = |v: &Vec<Duration>| {
            let mut v = v.clone();
            v.sort();
            let p = |q: f64| {
                v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1))).copied().unwrap_or_default()
            };
            format!(
                "{} commits, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                v.len(),
                p(0.5).as_secs_f64() * 1e3,
                p(0.99).as_secs_f64() * 1e3,
                v.last().copied().unwrap_or_default().as_secs_f64() * 1e3
            )
        };
        (f(&g.0), f(&g.1))
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `sluice run` in `dir` against the fakenet directory.
struct Relay {
    child: Child,
    port: u16,
    metrics: u16,
}

impl Relay {
    fn start(sluice: &Path, dir: &Path, a: &Args, plc: &str) -> anyhow::Result<Relay> {
        std::fs::create_dir_all(dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let cfg = dir.join("relay.toml");
        let identity = if a.legacy {
            String::new()
        } else {
            format!("plc_requests_per_second = {}\nidentity_fetch_concurrency = {}\n", a.relay_plc_rate, a.concurrency)
        };
        std::fs::write(
            &cfg,
            format!(
                "shard_count = {}\nlisten = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n\
                 data_dir = {:?}\nplc_url = {plc:?}\nallow_insecure_hosts = true\n{identity}",
                a.shards,
                dir.join("data").to_string_lossy(),
            ),
        )?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("relay.log"))?;
        let child = Command::new(sluice)
            .args(["run", "--config"])
            .arg(&cfg)
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let t = Instant::now();
        while request(port, "GET", "/xrpc/_health", "").map(|r| r.0) != Some(200) {
            anyhow::ensure!(t.elapsed() < Duration::from_secs(120), "relay not healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Relay { child, port, metrics })
    }

    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}
