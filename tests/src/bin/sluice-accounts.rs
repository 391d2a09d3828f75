//! Accounts bench (issue 22): the relay with millions of account rows.
//!
//! 1. The account cache alone: `common::process::clockcache::ClockCache`
//!    of `AccountState` filled to `--cache-entries`, RSS over entries.
//! 2. For each size in `--sizes` (10k, 1M, 10M; `--network` adds 40M):
//!    - fakenet serves `--hosts` hosts whose accounts number the size,
//!      at most `--active` (the accounts that act; a Zipf skew over them);
//!    - `sluice run` starts on an empty data dir and stops; the bench then
//!      writes straight into its PostgreSQL (COPY): a row for every fakenet
//!      account (an old rev, so their commits are new) and its identity
//!      (so the directory is not the bench's subject), and filler accounts
//!      up to the size on a banned host of their own;
//!    - `sluice run` starts again (the time to healthy, Postgres included,
//!      is the start time at that size) and relays fakenet's `--rate`
//!      events/s: after `--warmup-s`, a window of `--steady-s` gives
//!      events/s, CPU per event of the db-writer, the shards and
//!      PostgreSQL, WAL bytes per event, table and index bytes per
//!      account, and each relay process's peak RSS and threads.
//!
//! `cargo build --release --bins && target/release/sluice-accounts`

use clap::Parser;
use fakenet::runner::{self, ServeConfig};
use rand::{Rng, SeedableRng};
use sluice_common::atproto::did::DidKey;
use sluice_common::atproto::policy::{AccountState, AccountStatus, UpstreamStatus};
use sluice_common::ipc::idwire::IdentityRecord;
use sluice_common::process::clockcache::ClockCache;
use sluice_dbwriter::db;
use sluice_tests::http::{metric, request};
use sluice_tests::procinfo::{cpu_ticks, status as proc_status};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Account rows in Postgres, one run each.
    #[arg(long, value_delimiter = ',', default_value = "10000,1000000,10000000")]
    sizes: Vec<u64>,
    /// Also run at the network's size (40M rows).
    #[arg(long)]
    network: bool,
    /// Accounts that act (fakenet's population), at most.
    #[arg(long, default_value_t = 1_000_000)]
    active: u64,
    #[arg(long, default_value_t = 4)]
    hosts: usize,
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Zipf exponent over the acting accounts.
    #[arg(long, default_value_t = 0.8)]
    account_skew: f64,
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Accounts created per thousand events (the network: about 0.3).
    #[arg(long, default_value_t = 0.3)]
    new_accounts_per_mille: f64,
    #[arg(long, default_value_t = 60)]
    warmup_s: u64,
    #[arg(long, default_value_t = 60)]
    steady_s: u64,
    /// Entries for the cache-alone measurement (0: skip it).
    #[arg(long, default_value_t = 1_000_000)]
    cache_entries: usize,
    #[arg(long)]
    sluice: Option<PathBuf>,
}

/// Seconds since the epoch of the rev every loaded account has (2023-01-01):
/// older than any commit fakenet makes.
const OLD_REV_SECS: u64 = 1_672_531_200;

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.cache_entries > 0 {
        cache_alone(a.cache_entries);
    }
    let sluice = a.sluice.clone().unwrap_or_else(|| std::env::current_exe().unwrap().with_file_name("sluice"));
    let mut sizes = a.sizes.clone();
    if a.network {
        sizes.push(40_000_000);
    }
    let root = std::env::temp_dir().join(format!("sluice-accounts-{}", std::process::id()));
    for n in sizes {
        let dir = root.join(n.to_string());
        std::fs::create_dir_all(&dir)?;
        println!("== {n} accounts");
        run_size(&a, &sluice, &dir, n)?;
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir(&root);
    Ok(())
}

/// The account cache filled to `n` entries in this process.
fn cache_alone(n: usize) {
    let me = std::process::id();
    let before = proc_status(me, "VmRSS:");
    let mut c: ClockCache<AccountState> =
        ClockCache::with_bytes((n as u64 + 1) * ClockCache::<AccountState>::ENTRY_BYTES as u64);
    for i in 0..n {
        let k = DidKey::stored(&sluice_common::atproto::did::plc_did(&id_bytes(i as u64, 7)));
        let st = AccountState {
            host_id: 1,
            rev: Some(i as u64),
            commit: Some([i as u8; 32]),
            data_fp: Some(i as i16),
            ..AccountState::new(1)
        };
        c.put(k, st, 1);
    }
    let after = proc_status(me, "VmRSS:");
    println!(
        "account cache alone: {} entries, RSS +{} KiB = {:.0} B an entry ({} B by its own count)",
        c.len(),
        after - before,
        (after - before) as f64 * 1024.0 / c.len() as f64,
        c.bytes() / c.len().max(1)
    );
}

/// 15 bytes of a did:plc id, distinct per (i, salt).
fn id_bytes(i: u64, salt: u64) -> [u8; 15] {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt);
    let mut id = [0u8; 15];
    rng.fill(&mut id);
    id
}

fn run_size(a: &Args, sluice: &Path, dir: &Path, n: u64) -> anyhow::Result<()> {
    let acting = n.min(a.active);
    let per_host = (acting as usize).div_ceil(a.hosts);
    let net = runner::start(ServeConfig {
        hosts: a.hosts,
        // The hosts even over the shards (their CPU per event depends on it).
        base_port: sluice_tests::ports::balanced_base_port(a.hosts, 1, a.shards)?,
        accounts: per_host,
        skew: 0.0,
        seed: 22,
        rate: a.rate,
        duration: Some(Duration::from_secs(a.warmup_s + a.steady_s + 600)),
        new_accounts_per_mille: a.new_accounts_per_mille,
        account_skew: a.account_skew,
        active_share: 1.0,
        ledger: dir.join("ledger.jsonl"),
        wait_subscribers: Some(Duration::from_secs(3600)),
        ..ServeConfig::default()
    })?;
    let population = net.shared.population.clone().expect("a generated network");
    let relay_dir = dir.join("relay");
    let mut relay = Relay::start(sluice, &relay_dir, a, &net.info.plc_url)?;
    let t = Instant::now();
    let mut pg = postgres::Client::connect(&relay.pg_url(), postgres::NoTls)?;
    load(&mut pg, &population, &net.info.hosts, n)?;
    println!("loaded in {:.1} s", t.elapsed().as_secs_f64());
    drop(pg);
    relay.stop();
    let t = Instant::now();
    let relay = Relay::start(sluice, &relay_dir, a, &net.info.plc_url)?;
    println!(
        "start at {n} rows: healthy {:.2} s after `sluice run` (PostgreSQL's start included)",
        t.elapsed().as_secs_f64()
    );
    // The hosts were loaded idle (so the first relay left them alone): a
    // crawl request makes each active.
    for h in &net.info.hosts {
        request(relay.port, "POST", "/xrpc/com.atproto.sync.requestCrawl", &format!("{{\"hostname\":\"{h}\"}}"));
    }
    let mut pg = postgres::Client::connect(&relay.pg_url(), postgres::NoTls)?;
    warm_up(a, &relay);
    steady(a, &relay, &mut pg, n)?;
    sizes(&mut pg, n)?;
    pages(&relay, n, "while the relay takes the traffic")?;
    // The same pages with fakenet stopped: what a page costs alone.
    drop(net);
    std::thread::sleep(Duration::from_secs(5));
    pages(&relay, n, "with the network stopped")?;
    drop(pg);
    let mut relay = relay;
    relay.stop();
    Ok(())
}

/// Hosts, accounts and identities written straight into the relay's tables.
fn load(
    pg: &mut postgres::Client,
    p: &fakenet::population::Population,
    hosts: &[String],
    n: u64,
) -> anyhow::Result<()> {
    let acting = p.initial() as u64;
    let mut host_ids = Vec::new();
    for (h, name) in hosts.iter().enumerate() {
        let count = p.initial_range(h).len() as i64;
        let row = pg.query_one(
            "INSERT INTO hosts (hostname, insecure, account_count, status) VALUES ($1, true, $2, 'idle') RETURNING id",
            &[name, &count],
        )?;
        host_ids.push(row.get::<_, i64>(0) as i32);
    }
    let filler_count = n.saturating_sub(acting) as i64;
    let filler: i64 = pg
        .query_one(
            "INSERT INTO hosts (hostname, status, account_count) VALUES ('filler.invalid', 'banned', $1) RETURNING id",
            &[&filler_count],
        )?
        .get(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as i64;
    let rev = (OLD_REV_SECS * 1_000_000) << 10;
    // The schema of the relay under test: V14's packed `host` column (and
    // host checks in seconds, a 16-bit data fingerprint), or the one
    // before, so one bench binary measures old and new relays alike.
    let packed: bool = pg
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'accounts' AND column_name = 'host')",
            &[],
        )?
        .get(0);
    let t = Instant::now();
    let mut w = pg.copy_in(if packed {
        "COPY accounts (did, rev, host_checked, host, data_fp, commit_cid, no) FROM STDIN (FORMAT text)"
    } else {
        "COPY accounts (did, rev, host_checked, host_id, data_fp, flags, commit_cid, no) FROM STDIN (FORMAT text)"
    })?;
    let mut buf = String::with_capacity(1 << 20);
    let checked = now - 86_400_000_000;
    let row = |buf: &mut String, key: DidKey, host: i64, i: u64, no: u64| {
        use std::fmt::Write as _;
        let mut commit = [0u8; 32];
        rand_chacha::ChaCha8Rng::seed_from_u64(i ^ 0x636f_6d6d).fill(&mut commit);
        let (key, commit) = (uuid_text(&key.0), hex(&commit));
        // An active account with a commit: V14's columns as the db-writer
        // encodes them; before V14, flags 17 (active, status code 1).
        let _ = if packed {
            let st = AccountState {
                upstream_status: UpstreamStatus::Known(AccountStatus::Active),
                data_fp: Some(i as i16),
                ..AccountState::new(host)
            };
            let (secs, host) = (db::checked_secs(checked), db::host_of(&st));
            writeln!(buf, "{key}\t{rev}\t{secs}\t{host}\t{}\t\\\\x{commit}\t{no}", i as i16)
        } else {
            writeln!(buf, "{key}\t{rev}\t{checked}\t{host}\t{}\t17\t\\\\x{commit}\t{no}", i as i32)
        };
    };
    for i in 0..acting {
        row(&mut buf, DidKey::stored(&p.did(i as usize)), host_ids[p.initial_host(i as usize)] as i64, i, i + 1);
        flush(&mut w, &mut buf, false)?;
    }
    for i in 0..filler_count as u64 {
        let mut b = [0u8; 16];
        b[0] = 1;
        b[1..].copy_from_slice(&id_bytes(i, 11));
        row(&mut buf, DidKey(b), filler, i, acting + i + 1);
        flush(&mut w, &mut buf, false)?;
    }
    flush(&mut w, &mut buf, true)?;
    w.finish()?;
    println!("  accounts: {n} rows by COPY in {:.1} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    identities(pg, p, hosts, now)?;
    println!("  identities: {acting} rows in {:.1} s (keys derived from fakenet's seed)", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let pairs = collection(pg, n)?;
    println!("  collection index: {PROFILES} over {pairs} of the accounts in {:.1} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    pg.batch_execute("ANALYZE accounts; ANALYZE identities; CHECKPOINT")?;
    println!("  analyze and checkpoint: {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

/// The collection every account numbered in the bench's index may hold.
const PROFILES: &str = "app.bsky.actor.profile";

/// 85% of the `n` accounts hold a profile: the index's chunks written as
/// the db-writer writes them. Returns the pairs.
fn collection(pg: &mut postgres::Client, n: u64) -> anyhow::Result<u64> {
    let mut ix = sluice_dbwriter::collections::index::CollectionIndex::default();
    let id = ix.id_or_add(PROFILES).expect("room");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(85);
    for no in 1..=n as u32 {
        if rng.gen_bool(0.85) {
            ix.set(id, no, true);
        }
    }
    pg.execute("INSERT INTO collections (id, nsid) VALUES ($1, $2)", &[&(id as i32), &PROFILES])?;
    let mut w = pg.copy_in("COPY collection_chunks (collection, chunk, bits) FROM STDIN (FORMAT text)")?;
    for (id, hi, bits) in ix.take_dirty() {
        writeln!(w, "{id}\t{hi}\t\\\\x{}", hex(&bits))?;
    }
    w.finish()?;
    Ok(ix.len(id))
}

/// Pages of 2,000 of the big collection at random cursors, over HTTP.
fn pages(relay: &Relay, n: u64, when: &str) -> anyhow::Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut ms = Vec::new();
    for _ in 0..200 {
        let cursor = rng.gen_range(0..n);
        let path =
            format!("/xrpc/com.atproto.sync.listReposByCollection?collection={PROFILES}&limit=2000&cursor={cursor}");
        let t = Instant::now();
        let (st, body) = request(relay.port, "GET", &path, "").unwrap_or_default();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(st == 200, "{path}: {st} {body}");
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "listReposByCollection at {n} rows, pages of 2000 of {PROFILES} at random cursors {when}: p50 {:.1} ms, p99 {:.1} ms",
        ms[ms.len() / 2],
        ms[ms.len() * 99 / 100]
    );
    Ok(())
}

fn flush(w: &mut postgres::CopyInWriter<'_>, buf: &mut String, all: bool) -> anyhow::Result<()> {
    if all || buf.len() > (1 << 20) - 512 {
        w.write_all(buf.as_bytes())?;
        buf.clear();
    }
    Ok(())
}

/// Every fakenet account's identity as the relay would have stored it
/// (keys derived on every core).
fn identities(
    pg: &mut postgres::Client,
    p: &fakenet::population::Population,
    hosts: &[String],
    now: i64,
) -> anyhow::Result<()> {
    let mut pds_ids = Vec::new();
    for h in 0..hosts.len() {
        let id: i32 =
            pg.query_one("INSERT INTO pds_endpoints (url) VALUES ($1) RETURNING id", &[&p.endpoint(h)])?.get(0);
        pds_ids.push(id);
    }
    let total = p.initial();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut w = pg.copy_in("COPY identities (did, as_of, pds_id, key, handle) FROM STDIN (FORMAT text)")?;
    const CHUNK: usize = 20_000;
    for start in (0..total).step_by(CHUNK * threads) {
        let parts: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|t| {
                    let pds_ids = &pds_ids;
                    s.spawn(move || {
                        use std::fmt::Write as _;
                        let mut out = String::new();
                        let lo = (start + t * CHUNK).min(total);
                        for i in lo..(lo + CHUNK).min(total) {
                            let host = p.initial_host(i);
                            let did = p.did(i);
                            let rec = IdentityRecord::new(did.clone(), Some(&p.key(i).public_key()), None, None, now);
                            let (curve, point) = rec.key.expect("a key");
                            let _ = writeln!(
                                out,
                                "{}\t{now}\t{}\t\\\\x{:02x}{}\t{}",
                                uuid_text(&DidKey::stored(&did).0),
                                pds_ids[host],
                                curve,
                                hex(&point),
                                p.handle(i, host)
                            );
                        }
                        out
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("a key thread")).collect()
        });
        for part in parts {
            w.write_all(part.as_bytes())?;
        }
    }
    w.finish()?;
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn uuid_text(b: &[u8; 16]) -> String {
    let h = hex(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Let the relay settle: caches fill, fakenet's generation runs.
fn warm_up(a: &Args, relay: &Relay) {
    let t = Instant::now();
    let mut last = 0;
    while t.elapsed() < Duration::from_secs(a.warmup_s) {
        std::thread::sleep(Duration::from_secs(10));
        let rel = metric(relay.metrics, "sluice_events_relayed_total");
        println!("  warm-up {:>4} s: {:>6.0} events/s relayed", t.elapsed().as_secs(), (rel - last) as f64 / 10.0);
        last = rel;
    }
}

/// One relay process's figures over the window.
#[derive(Default)]
struct Proc {
    cpu0: u64,
    cpu: u64,
    rss: u64,
    threads: u64,
}

fn lsn(pg: &mut postgres::Client) -> anyhow::Result<i64> {
    Ok(pg.query_one("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8", &[])?.get(0))
}

/// `accounts`' rows updated and of them HOT-updated so far (the
/// statistics as the backends last reported them, at most a second old).
fn updates(pg: &mut postgres::Client) -> anyhow::Result<(i64, i64)> {
    let r = pg.query_one("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'accounts'", &[])?;
    Ok((r.get(0), r.get(1)))
}

/// The steady window's figures.
fn steady(a: &Args, relay: &Relay, pg: &mut postgres::Client, n: u64) -> anyhow::Result<()> {
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    let mut procs: BTreeMap<String, Proc> = BTreeMap::new();
    let sample = |procs: &mut BTreeMap<String, Proc>, first: bool| {
        for (name, pids) in relay.processes() {
            let e = procs.entry(name).or_default();
            let cpu: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
            if first {
                e.cpu0 = cpu;
            }
            e.cpu = cpu;
            e.rss = e.rss.max(pids.iter().map(|p| proc_status(*p, "VmRSS:")).sum());
            e.threads = e.threads.max(pids.iter().map(|p| proc_status(*p, "Threads:")).sum());
        }
    };
    let (rel0, wal0) = (metric(relay.metrics, "sluice_events_relayed_total"), lsn(pg)?);
    let upd0 = updates(pg)?;
    let t0 = Instant::now();
    sample(&mut procs, true);
    while t0.elapsed() < Duration::from_secs(a.steady_s) {
        std::thread::sleep(Duration::from_millis(500));
        sample(&mut procs, false);
    }
    let secs = t0.elapsed().as_secs_f64();
    let events = metric(relay.metrics, "sluice_events_relayed_total") - rel0;
    let wal = lsn(pg)? - wal0;
    let upd = updates(pg)?;
    let (rows, hot) = (upd.0 - upd0.0, upd.1 - upd0.1);
    println!(
        "steady {secs:.0} s at {n} rows: {:.0} events/s relayed ({} offered); WAL {:.0} B an event; \
         account rows updated {rows}, HOT {hot} ({:.1}%)",
        events as f64 / secs,
        a.rate,
        wal as f64 / events.max(1) as f64,
        hot as f64 * 100.0 / rows.max(1) as f64
    );
    for (name, p) in &procs {
        println!(
            "  {name:<14} CPU {:>6.1} us an event  peak RSS {:>8} KiB  threads {}",
            (p.cpu - p.cpu0) as f64 / tick * 1e6 / events.max(1) as f64,
            p.rss,
            p.threads
        );
    }
    Ok(())
}

/// Postgres bytes per account.
fn sizes(pg: &mut postgres::Client, n: u64) -> anyhow::Result<()> {
    let r = pg.query_one(
        "SELECT pg_table_size('accounts'), pg_indexes_size('accounts') - pg_relation_size('accounts_no'),
                pg_total_relation_size('identities'), (SELECT count(*) FROM accounts),
                pg_relation_size('accounts_no'), pg_total_relation_size('collection_chunks')",
        &[],
    )?;
    let (table, index, ids, rows): (i64, i64, i64, i64) = (r.get(0), r.get(1), r.get(2), r.get(3));
    let (numbers, chunks): (i64, i64) = (r.get(4), r.get(5));
    println!(
        "postgres at {n} rows ({rows} counted): accounts table {} MiB + indexes {} MiB = {:.1} B an account \
         ({:.1} + {:.1}); \
         identities {} MiB; collection index: accounts_no {} MiB ({:.0} B an account), chunks {} KiB",
        table >> 20,
        index >> 20,
        (table + index) as f64 / rows.max(1) as f64,
        table as f64 / rows.max(1) as f64,
        index as f64 / rows.max(1) as f64,
        ids >> 20,
        numbers >> 20,
        numbers as f64 / rows.max(1) as f64,
        chunks >> 10
    );
    Ok(())
}

/// `sluice run` in `dir` against the fakenet directory, its hosts trusted.
struct Relay {
    child: Child,
    dir: PathBuf,
    port: u16,
    metrics: u16,
}

impl Relay {
    fn start(sluice: &Path, dir: &Path, a: &Args, plc: &str) -> anyhow::Result<Relay> {
        std::fs::create_dir_all(dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let cfg = dir.join("relay.toml");
        std::fs::write(
            &cfg,
            format!(
                "shard_count = {}\nlisten = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n\
                 data_dir = {:?}\nplc_url = {plc:?}\nallow_insecure_hosts = true\n\
                 trusted_hosts = [\"127.0.0.1\", \"localhost\"]\n",
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
            anyhow::ensure!(t.elapsed() < Duration::from_secs(300), "relay not healthy");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Relay { child, dir: dir.to_owned(), port, metrics })
    }

    fn pg_url(&self) -> String {
        format!("host={} user=postgres dbname=postgres", self.dir.join("data/pgsock").display())
    }

    /// The relay's processes by role; PostgreSQL's all together.
    fn processes(&self) -> Vec<(String, Vec<u32>)> {
        sluice_tests::procinfo::relay_processes(self.child.id(), &self.dir.join("data"))
    }

    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}
