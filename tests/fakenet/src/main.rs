//! `fakenet`: a synthetic AT Protocol network (PDS hosts, PLC directory,
//! did:web documents, a fake upstream relay) with a ledger of what a relay
//! must do, and the checker that holds a relay to it.

use anyhow::Context;
use clap::{Parser, Subcommand};
use fakenet::{check, runner, world::FaultRates};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "fakenet", about = "A synthetic AT Protocol network and an exact relay checker")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start PDS hosts, a PLC directory and did:web documents on 127.0.0.1
    /// and generate traffic; keeps serving until interrupted.
    Serve(ServeArgs),
    /// Subscribe to a relay and check its stream against a ledger; exits
    /// non-zero on any mismatch.
    Check(CheckArgs),
    /// Generate traffic ahead into a corpus directory (ledger, DID
    /// documents, each host's frames), for `serve --corpus`: replaying
    /// costs no signing. Takes the generation flags of `serve`; the ports
    /// are part of the corpus (fix them with --base-port).
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Directory to write the corpus into.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Number of PDS hosts (one port each, named localhost:PORT).
    #[arg(long, default_value_t = 3)]
    hosts: usize,
    /// Accounts on the biggest host; smaller hosts get fewer by --skew.
    #[arg(long, default_value_t = 10)]
    accounts: usize,
    /// Zipf exponent spreading accounts and traffic over hosts (0 = even).
    #[arg(long, default_value_t = 1.0)]
    skew: f64,
    /// Accounts with did:web identities (each served on its own port).
    #[arg(long, default_value_t = 0)]
    web_accounts: usize,
    /// did:web accounts whose documents cannot be had (in turn: a name
    /// that does not exist, a host answering 500, a host never answering);
    /// their events are undeliverable.
    #[arg(long, default_value_t = 0)]
    broken_web: usize,
    /// did:plc accounts the directory does not know (undeliverable too).
    #[arg(long, default_value_t = 0)]
    unregistered: usize,
    /// Zipf exponent over a host's accounts for who acts (0 = evenly): a
    /// few hot accounts and a long tail.
    #[arg(long, default_value_t = 0.0)]
    account_skew: f64,
    /// The share of accounts with P-256 signing keys (the rest K-256).
    #[arg(long, default_value_t = 0.3)]
    p256_share: f64,
    /// Of a thousand ordinary steps, how many create an account.
    #[arg(long, default_value_t = 10.0)]
    new_accounts_per_mille: f64,
    /// The share of each host's accounts that act at all (a day's active
    /// set; 1 = all).
    #[arg(long, default_value_t = 1.0)]
    active_share: f64,
    /// The PLC directory's latency on every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    plc_latency_ms: u64,
    /// Requests per second the PLC directory takes before it answers 429
    /// (0: no limit).
    #[arg(long, default_value_t = 0.0)]
    plc_rate: f64,
    /// The Retry-After of its 429s, in seconds.
    #[arg(long, default_value_t = 1)]
    plc_retry_after: u64,
    /// Every this many seconds the PLC directory answers 502 for
    /// `--plc-burst-len` seconds.
    #[arg(long)]
    plc_burst_every: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    plc_burst_len: f64,
    /// The PLC directory serves no `/export`.
    #[arg(long)]
    plc_no_export: bool,
    /// Seed: the same seed and flags give the same events, byte for byte.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Events per second over all hosts (0 = as fast as possible).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Stop generating after this many seconds (keeps serving).
    #[arg(long)]
    duration: Option<f64>,
    /// Stop generating after this many events (keeps serving).
    #[arg(long)]
    events: Option<u64>,
    /// Faults: `default`, `none`, or `name=rate,...` with names badsig,
    /// missingblock, badprevdata, wronghost, malformed, oversized,
    /// truncated, disconnect, stall, seqbackwards, replayedrev, futurerev,
    /// unknowntype, deactivatedcommit, and split (share of connections
    /// whose writes are split at random byte boundaries).
    #[arg(long, default_value = "none")]
    faults: String,
    /// Let accounts migrate between hosts.
    #[arg(long)]
    migrations: bool,
    /// Ledger file (JSON lines; see tests/README.md).
    #[arg(long, default_value = "fakenet-ledger.jsonl")]
    ledger: PathBuf,
    /// Write {plc_url, hosts, relay_listhosts_url, ledger, ...} here once
    /// every listener is up.
    #[arg(long)]
    info: Option<PathBuf>,
    /// Before generating, wait up to this many seconds for every host to
    /// have a subscriber.
    #[arg(long)]
    wait_subscribers: Option<f64>,
    /// Then stay silent this many seconds before generating.
    #[arg(long)]
    start_delay: Option<f64>,
    /// Items each host keeps for cursor replay.
    #[arg(long, default_value_t = 200_000)]
    backlog: usize,
    /// First port (hosts, then did:web, then the directory); 0 = ephemeral.
    #[arg(long, default_value_t = 0)]
    base_port: u16,
    /// Every 10 s, one second at 5x the rate.
    #[arg(long)]
    bursts: bool,
    /// Records each account starts with.
    #[arg(long, default_value_t = 5)]
    initial_records: usize,
    /// Serve the hosts over TLS (wss://; DID documents name https://
    /// endpoints) with a CA generated for this run; its certificate (PEM) is
    /// written to this file for clients to trust.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// Serve a corpus written by `fakenet generate` (every generation flag
    /// is then ignored): each host's backlog holds all its frames from the
    /// start, for full-speed replay from cursor 0.
    #[arg(long, value_name = "DIR")]
    corpus: Option<PathBuf>,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// The relay, `ws://HOST:PORT`.
    #[arg(long)]
    relay: String,
    /// The ledger fakenet wrote.
    #[arg(long)]
    ledger: PathBuf,
    /// Subscribe from this cursor (default 0: the relay's whole window).
    #[arg(long, default_value_t = 0)]
    cursor: i64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// After everything expected arrived, keep listening this long.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// Check only the events of this host (to check a host's own stream).
    #[arg(long)]
    only_host: Option<String>,
    /// Do not wait for the ledger's done line.
    #[arg(long)]
    no_wait: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_target(false).init();
    match Cli::parse().cmd {
        Cmd::Serve(a) => serve(a),
        Cmd::Generate(a) => generate(a),
        Cmd::Check(a) => {
            let report = check::run(&check::CheckConfig {
                relay: check::normalise_url(&a.relay),
                ledger: a.ledger,
                cursor: Some(a.cursor),
                timeout: Duration::from_secs_f64(a.timeout),
                settle: Duration::from_secs_f64(a.settle),
                wait_done: !a.no_wait,
                only_host: a.only_host,
            })?;
            for n in &report.notes {
                eprintln!("  {n}");
            }
            println!("{}", report.summary());
            std::process::exit(if report.ok() { 0 } else { 1 })
        }
    }
}

fn serve_config(a: ServeArgs) -> anyhow::Result<runner::ServeConfig> {
    let faults = FaultRates::parse(&a.faults).map_err(|e| anyhow::anyhow!("--faults: {e}"))?;
    Ok(runner::ServeConfig {
        hosts: a.hosts,
        accounts: a.accounts,
        skew: a.skew,
        web_accounts: a.web_accounts,
        broken_web: a.broken_web,
        unregistered: a.unregistered,
        account_skew: a.account_skew,
        p256_share: a.p256_share,
        new_accounts_per_mille: a.new_accounts_per_mille,
        active_share: a.active_share,
        directory: fakenet::server::DirectoryConfig {
            latency: Duration::from_millis(a.plc_latency_ms),
            rate: a.plc_rate,
            retry_after_s: a.plc_retry_after,
            burst_every: a.plc_burst_every.map(Duration::from_secs_f64),
            burst_len: Duration::from_secs_f64(a.plc_burst_len),
            no_export: a.plc_no_export,
        },
        seed: a.seed,
        rate: a.rate,
        duration: a.duration.map(Duration::from_secs_f64),
        max_events: a.events,
        faults,
        migrations: a.migrations,
        ledger: a.ledger,
        info: a.info,
        wait_subscribers: a.wait_subscribers.map(Duration::from_secs_f64),
        start_delay: a.start_delay.map(Duration::from_secs_f64),
        backlog_items: a.backlog,
        base_port: a.base_port,
        bursts: a.bursts,
        initial_records: a.initial_records,
        emit_times_max: 0,
        pregenerate: false,
        tls_ca_out: a.tls_ca.clone(),
    })
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let out = a.out.clone();
    let t = std::time::Instant::now();
    let meta = runner::generate_corpus(serve_config(a.serve)?, &out)?;
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "fakenet: corpus of {} events for {} hosts in {} ({:.1} s, {:.0} events/s)",
        meta.events,
        meta.hosts.len(),
        out.display(),
        secs,
        meta.events as f64 / secs
    );
    Ok(())
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    if let Some(dir) = a.corpus.clone() {
        let r = runner::serve_corpus(&dir, a.info.as_deref())?;
        eprintln!(
            "fakenet: serving the corpus in {} ({} events, {} hosts, PLC at {}) until interrupted",
            dir.display(),
            r.events(),
            r.info.hosts.len(),
            r.info.plc_url
        );
        loop {
            std::thread::park();
        }
    }
    let mut running = runner::start(serve_config(a)?).context("starting fakenet")?;
    eprintln!("fakenet: {} hosts, PLC at {}", running.info.hosts.len(), running.info.plc_url);
    running.wait_generation()?;
    eprintln!("fakenet: generation done, {} events; serving until interrupted", running.events());
    loop {
        std::thread::park();
    }
}
