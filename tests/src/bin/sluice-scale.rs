//! Scale bench (issue 14): many quiet hosts. For each host count, fakenet
//! serves that many hosts (one account each; split over processes of at
//! most `--per-process` hosts, since each host costs fakenet two
//! descriptors against a 20,000 hard limit here), `sluice run` crawls them
//! all (requestCrawl, `--crawlers` at a time), and the bench reports per
//! relay process RSS, RssAnon, PSS, threads and descriptors; the time to
//! connect every host; connections ended per minute while every host is
//! silent (`--idle-secs`; must be 0); CPU while idle and while the hosts
//! send `--rate` events/s together.
//!
//! The fakenet processes each have their own PLC directory; the bench
//! serves the relay one `plc_url` that asks each directory in turn.
//!
//! `cargo build --release --bins && target/release/sluice-scale --hosts 1000,2800,10000`

use clap::Parser;
use sluice_tests::http::{metric, request as http};
use sluice_tests::procinfo;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Host counts to run, one after another.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    hosts: Vec<usize>,
    /// Hosts per fakenet process at most.
    #[arg(long, default_value_t = 5000)]
    per_process: usize,
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Serve the hosts over TLS (wss://).
    #[arg(long)]
    tls: bool,
    /// Seconds of silence measured once every host is connected.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Events per second from all hosts together in the load phase.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds of the load phase (0: skip it).
    #[arg(long, default_value_t = 30)]
    load_secs: u64,
    /// requestCrawls in flight at once.
    #[arg(long, default_value_t = 8)]
    crawlers: usize,
    /// The sluice and fakenet binaries (default: next to this one).
    #[arg(long)]
    sluice: Option<PathBuf>,
    #[arg(long)]
    fakenet: Option<PathBuf>,
}

/// One process (or the Postgres group) at one moment.
#[derive(Debug, Clone, Default)]
struct Mem {
    rss_kb: u64,
    anon_kb: u64,
    pss_kb: u64,
    threads: u64,
    fds: u64,
}

impl Mem {
    fn of(pids: &[u32]) -> Mem {
        let mut m = Mem::default();
        for &p in pids {
            m.rss_kb += procinfo::status(p, "VmRSS:");
            m.anon_kb += procinfo::status(p, "RssAnon:");
            m.pss_kb += procinfo::pss_kb(p);
            m.threads += procinfo::status(p, "Threads:");
            m.fds += procinfo::fds(p);
        }
        m
    }
}

struct Row {
    hosts: usize,
    connected: u64,
    crawl: Duration,
    connect: Duration,
    procs: Vec<(String, Mem)>,
    postgres: Mem,
    shard_anon_before_kb: u64,
    idle_closes: u64,
    idle_secs: u64,
    idle_cpu_pct: f64,
    load_cpu_pct: Option<f64>,
    load_events_per_s: Option<f64>,
}

fn mib(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok()).expect("url with a port")
}

/// The relay's `plc_url`: each DID document is asked of every fakenet
/// directory in turn; the first 200 answers. A few threads on one
/// listener (the relay resolves with at most four requests per shard).
fn start_plc_proxy(directories: Vec<u16>) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    for _ in 0..8 {
        let l = listener.try_clone()?;
        let dirs = directories.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut line = String::new();
                if BufReader::new(&s).read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
                let found = dirs.iter().find_map(|d| http(*d, "GET", &path, "").filter(|(st, _)| *st == 200));
                let (status, body) = found.unwrap_or((404, "{\"message\":\"DID not registered\"}".into()));
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
    }
    Ok(port)
}

struct Fakenet {
    child: Child,
    info: serde_json::Value,
}

fn start_fakenets(a: &Args, bin: &Path, dir: &Path, n: usize) -> anyhow::Result<Vec<Fakenet>> {
    let procs = n.div_ceil(a.per_process);
    let mut out = Vec::new();
    for i in 0..procs {
        let hosts = n / procs + usize::from(i < n % procs);
        let info = dir.join(format!("fakenet-{i}.json"));
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--hosts", &hosts.to_string(), "--accounts", "1", "--initial-records", "1"])
            .args(["--seed", &(100 + i).to_string(), "--backlog", "10000"])
            .args(["--rate", &format!("{}", a.rate * hosts as f64 / n as f64)])
            .args(["--duration", &(a.load_secs + 5).to_string()])
            .args(["--wait-subscribers", "3600", "--start-delay", &(a.idle_secs + 20).to_string()])
            .arg("--ledger")
            .arg(dir.join(format!("ledger-{i}.jsonl")))
            .arg("--info")
            .arg(&info);
        if a.tls {
            cmd.arg("--tls-ca").arg(dir.join(format!("ca-{i}.pem")));
        }
        let log = std::fs::File::create(dir.join(format!("fakenet-{i}.log")))?;
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn()?;
        out.push(Fakenet { child, info: serde_json::Value::Null });
    }
    for (i, f) in out.iter_mut().enumerate() {
        let path = dir.join(format!("fakenet-{i}.json"));
        let t = Instant::now();
        while !path.exists() {
            anyhow::ensure!(t.elapsed() < Duration::from_secs(300), "fakenet {i} did not start");
            anyhow::ensure!(f.child.try_wait()?.is_none(), "fakenet {i} exited");
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(100));
        f.info = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    }
    Ok(out)
}

fn run_one(a: &Args, sluice: &Path, fakenet: &Path, n: usize) -> anyhow::Result<Row> {
    let dir = std::env::temp_dir().join(format!("sluice-scale-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut nets = start_fakenets(a, fakenet, &dir, n)?;
    let plc = start_plc_proxy(nets.iter().map(|f| port_of(f.info["plc_url"].as_str().unwrap_or(""))).collect())?;
    let listen = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let metrics = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut config = format!(
        "shard_count = {}\nlisten = \"127.0.0.1:{listen}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n\
         data_dir = \"{}\"\nplc_url = \"http://127.0.0.1:{plc}\"\nallow_insecure_hosts = true\n",
        a.shards,
        dir.join("data").display()
    );
    if a.tls {
        let mut pem = String::new();
        for i in 0..nets.len() {
            pem += &std::fs::read_to_string(dir.join(format!("ca-{i}.pem")))?;
        }
        std::fs::write(dir.join("cas.pem"), pem)?;
        config += &format!("tls_ca_file = \"{}\"\n", dir.join("cas.pem").display());
    }
    config += "[limits]\nnew_hosts_per_day_max = 1000000\n";
    std::fs::write(dir.join("sluice.toml"), config)?;
    let log = std::fs::File::create(dir.join("sluice.log"))?;
    let mut relay = Command::new(sluice)
        .args(["run", "--config"])
        .arg(dir.join("sluice.toml"))
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let t = Instant::now();
    while http(listen, "GET", "/xrpc/_health", "").is_none_or(|(s, _)| s != 200) {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(120), "relay not healthy");
        anyhow::ensure!(relay.try_wait()?.is_none(), "relay exited; see {}", dir.join("sluice.log").display());
        std::thread::sleep(Duration::from_millis(200));
    }
    let pg_pids = || -> Vec<u32> {
        let pid = std::fs::read_to_string(dir.join("data/pg/postmaster.pid")).unwrap_or_default();
        pid.lines().next().and_then(|l| l.trim().parse().ok()).map_or(Vec::new(), procinfo::tree)
    };
    let relay_procs = || -> Vec<(String, u32)> {
        let pg = pg_pids();
        let mut v = vec![("supervisor".to_owned(), relay.id())];
        for (p, name) in procinfo::children(relay.id()) {
            if !pg.contains(&p) && !name.starts_with("pg_ctl") && !name.starts_with("runuser") {
                v.push((name.split(" --config").next().unwrap_or(&name).to_owned(), p));
            }
        }
        v.sort();
        v
    };
    let shard_anon = || -> u64 {
        relay_procs().iter().filter(|(n, _)| n.contains("shard")).map(|(_, p)| procinfo::status(*p, "RssAnon:")).sum()
    };
    let shard_anon_before_kb = shard_anon();

    // Crawl every host, `crawlers` at a time.
    let scheme = if a.tls { "https://" } else { "" };
    let names: Vec<String> = nets
        .iter()
        .flat_map(|f| f.info["hosts"].as_array().cloned().unwrap_or_default())
        .filter_map(|h| h.as_str().map(|h| format!("{scheme}{h}")))
        .collect();
    anyhow::ensure!(names.len() == n, "fakenet serves {} hosts, not {n}", names.len());
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let names = Arc::new(names);
    let workers: Vec<_> = (0..a.crawlers)
        .map(|_| {
            let (next, refused, names) = (next.clone(), refused.clone(), names.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(h) = names.get(i) else { return };
                let body = format!("{{\"hostname\":\"{h}\"}}");
                match http(listen, "POST", "/xrpc/com.atproto.sync.requestCrawl", &body) {
                    Some((200, _)) => {}
                    other => {
                        if refused.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("requestCrawl {h}: {other:?}");
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let crawl = started.elapsed();
    anyhow::ensure!(refused.load(Ordering::Relaxed) == 0, "{} requestCrawls failed", refused.load(Ordering::Relaxed));
    let mut connected = 0;
    while connected < n as u64 {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(1800), "only {connected} of {n} hosts connected");
        std::thread::sleep(Duration::from_millis(250));
        connected = metric(metrics, "sluice_shard_hosts_connected");
    }
    let connect = started.elapsed();
    eprintln!("{n} hosts: crawled in {crawl:.1?}, all connected after {connect:.1?}");

    // Idle: every host silent (fakenet waits out its start delay).
    std::thread::sleep(Duration::from_secs(5));
    let ticks = |procs: &[(String, u32)]| -> u64 { procs.iter().map(|(_, p)| procinfo::cpu_ticks(*p)).sum() };
    let procs = relay_procs();
    let (closes0, cpu0) = (metric(metrics, "sluice_shard_upstream_closes_total"), ticks(&procs));
    std::thread::sleep(Duration::from_secs(a.idle_secs));
    let (closes1, cpu1) = (metric(metrics, "sluice_shard_upstream_closes_total"), ticks(&procs));
    let idle_cpu_pct = (cpu1 - cpu0) as f64 / a.idle_secs as f64;
    let mem: Vec<(String, Mem)> = procs.iter().map(|(name, p)| (name.clone(), Mem::of(&[*p]))).collect();
    let postgres = Mem::of(&pg_pids());
    let connected_after_idle = metric(metrics, "sluice_shard_hosts_connected");

    // Load: fakenet starts sending after its delay; measure once the
    // committed seq moves.
    let (mut load_cpu_pct, mut load_events_per_s) = (None, None);
    if a.load_secs > 0 {
        let seq0 = metric(metrics, "sluice_committed_seq");
        let t = Instant::now();
        while metric(metrics, "sluice_committed_seq") == seq0 {
            anyhow::ensure!(t.elapsed() < Duration::from_secs(120), "no events arrived for the load phase");
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(2));
        let window = Duration::from_secs(a.load_secs.saturating_sub(4).max(1));
        let (seq1, cpu1, t1) = (metric(metrics, "sluice_committed_seq"), ticks(&procs), Instant::now());
        std::thread::sleep(window);
        let (seq2, cpu2) = (metric(metrics, "sluice_committed_seq"), ticks(&procs));
        let secs = t1.elapsed().as_secs_f64();
        load_cpu_pct = Some((cpu2 - cpu1) as f64 / secs);
        load_events_per_s = Some((seq2 - seq1) as f64 / secs);
    }

    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(relay.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let t = Instant::now();
    while relay.try_wait()?.is_none() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = relay.kill();
    for f in &mut nets {
        let _ = f.child.kill();
        let _ = f.child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Row {
        hosts: n,
        connected: connected_after_idle,
        crawl,
        connect,
        procs: mem,
        postgres,
        shard_anon_before_kb,
        idle_closes: closes1 - closes0,
        idle_secs: a.idle_secs,
        idle_cpu_pct,
        load_cpu_pct,
        load_events_per_s,
    })
}

fn print(a: &Args, rows: &[Row]) {
    println!(
        "\n## sluice-scale: {} shards, {}, idle {} s, load {} ev/s\n",
        a.shards,
        if a.tls { "TLS (wss://)" } else { "plain text (ws://)" },
        a.idle_secs,
        a.rate
    );
    println!("| hosts | connected | crawl / all connected | relay RSS sum (PSS) MiB | shard RssAnon per host | threads | fds | idle closes/min | CPU idle | CPU at load (ev/s) | Postgres PSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let rss: u64 = r.procs.iter().map(|(_, m)| m.rss_kb).sum();
        let pss: u64 = r.procs.iter().map(|(_, m)| m.pss_kb).sum();
        let threads: u64 = r.procs.iter().map(|(_, m)| m.threads).sum();
        let fds: u64 = r.procs.iter().map(|(_, m)| m.fds).sum();
        let shard_anon: u64 = r.procs.iter().filter(|(n, _)| n.contains("shard")).map(|(_, m)| m.anon_kb).sum();
        let per = shard_anon.saturating_sub(r.shard_anon_before_kb) as f64 / r.hosts as f64;
        let load = match (r.load_cpu_pct, r.load_events_per_s) {
            (Some(c), Some(e)) => format!("{c:.1} % ({e:.0})"),
            _ => "-".into(),
        };
        println!(
            "| {} | {} | {:.1} s / {:.1} s | {} ({}) | {per:.1} KiB | {threads} | {fds} | {:.1} | {:.1} % | {load} | {} |",
            r.hosts,
            r.connected,
            r.crawl.as_secs_f64(),
            r.connect.as_secs_f64(),
            mib(rss),
            mib(pss),
            r.idle_closes as f64 * 60.0 / r.idle_secs as f64,
            r.idle_cpu_pct,
            mib(r.postgres.pss_kb),
        );
    }
    for r in rows {
        println!("\n{} hosts, per process after the idle phase:\n", r.hosts);
        println!("| process | RSS MiB | RssAnon MiB | PSS MiB | threads | fds |");
        println!("|---|---|---|---|---|---|");
        for (name, m) in r.procs.iter().chain(std::iter::once(&("postgres (all)".to_owned(), r.postgres.clone()))) {
            println!(
                "| {name} | {} | {} | {} | {} | {} |",
                mib(m.rss_kb),
                mib(m.anon_kb),
                mib(m.pss_kb),
                m.threads,
                m.fds
            );
        }
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let here = std::env::current_exe()?;
    let sluice = a.sluice.clone().unwrap_or_else(|| here.with_file_name("sluice"));
    let fakenet = a.fakenet.clone().unwrap_or_else(|| here.with_file_name("fakenet"));
    // Children inherit it: the relay's shards and fakenet hold a
    // descriptor per host.
    if let Ok((_, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let mut rows = Vec::new();
    for &n in &a.hosts {
        rows.push(run_one(&a, &sluice, &fakenet, n)?);
        print(&a, &rows);
    }
    Ok(())
}
