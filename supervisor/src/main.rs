//! `sluice`: the relay's one binary. `sluice run` is the supervisor; it
//! starts itself again as `sluice db-writer` and `sluice shard --id K`
//! (see ARCHITECTURE.md); `sluice demo` runs the relay against a synthetic
//! network on loopback (only in builds with the `demo` feature: the
//! packaged binary holds no fakenet code).

mod bootstrap;
#[cfg(feature = "demo")]
mod demo;
mod metrics;
mod notify;
mod pg;
mod procstat;
mod recent;
mod status;
mod summary;
mod supervise;
mod tail;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_common::process::childfds::ChildFds;
use sluice_common::process::config::{Config, LogFormat, DEFAULT_CONFIG_PATH};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "sluice", version, about = "sluice: an AT Protocol relay")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate the config file and environment (an error names the key,
    /// and the exit status is non-zero) and print the effective
    /// configuration, every default filled in, secrets masked.
    Check {
        /// Config file (TOML); default /etc/sluice/sluice.toml if it exists.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay (the supervisor): db-writer and shards as child processes.
    Run {
        /// Config file (TOML). Default /etc/sluice/sluice.toml if it exists,
        /// else built-in defaults; SLUICE_* environment variables override.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The configuration: `sluice config check` validates it and prints it
    /// as the relay would run with it.
    Config {
        #[command(subcommand)]
        what: ConfigCmd,
    },
    /// Run a synthetic network (fakenet) and the relay on loopback, offline.
    Demo {
        /// Where the demo keeps its data (event log, private PostgreSQL).
        #[arg(long, default_value = "./sluice-demo")]
        data_dir: PathBuf,
        /// Port for consumers.
        #[arg(long, default_value_t = 2470)]
        port: u16,
        /// Fake PDS hosts.
        #[arg(long, default_value_t = 4)]
        hosts: usize,
        /// Events per second from the network.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Log every dropped event with its reason (stateless drops in
        /// the shards, stateful ones in the db-writer).
        #[arg(long)]
        drops: bool,
    },
    /// Follow a relay's stream (this one by default): one line per event.
    Tail {
        /// The relay (ws://, wss://, http:// or https://; the
        /// subscribeRepos path is added when the URL has none).
        #[arg(default_value = "ws://127.0.0.1:2470")]
        url: String,
        /// Start after this seq (0: the whole replay window).
        #[arg(long)]
        cursor: Option<i64>,
        /// Print each event's body as JSON.
        #[arg(long)]
        json: bool,
        /// Stop after this many events.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// The admin API from the command line, against a running relay.
    Admin {
        /// The relay's public URL.
        #[arg(long, default_value = "http://127.0.0.1:2470")]
        url: String,
        /// File holding the admin password (else $SLUICE_ADMIN_PASSWORD).
        #[arg(long)]
        password_file: Option<PathBuf>,
        #[command(subcommand)]
        action: AdminAction,
    },
    /// (internal) The db-writer process, started by `sluice run`.
    #[command(name = "db-writer", hide = true)]
    DbWriter {
        #[arg(long)]
        config: PathBuf,
    },
    /// (internal) A shard process, started by `sluice run`.
    #[command(hide = true)]
    Shard {
        #[arg(long)]
        id: usize,
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum AdminAction {
    /// Stop relaying an account and emit `#account` (status takendown).
    Takedown { did: String },
    /// Reverse a takedown.
    ReverseTakedown { did: String },
    /// Stop crawling a host.
    Ban { hostname: String },
    /// Crawl a banned host again.
    Unban { hostname: String },
    /// Close the connection to a host; it is crawled again when it next
    /// calls requestCrawl.
    Disconnect { hostname: String },
    /// requestCrawl open to anyone (`public`) or only with admin
    /// credentials (`admin-only`); kept over restarts.
    RequestCrawl {
        #[arg(value_parser = ["public", "admin-only"])]
        mode: String,
    },
    /// List the hosts with their status and cursor.
    Hosts,
    /// List the consumers of every shard: address, cursor, last seq sent,
    /// lag behind the committed seq.
    Consumers,
    /// Ban a domain and its subdomains (hosts under it stop being crawled).
    BanDomain { domain: String },
    /// Lift a domain ban for new crawls.
    UnbanDomain { domain: String },
    /// Set how many accounts a host may have; new accounts beyond it are
    /// not relayed until the limit allows them.
    Limit { hostname: String, limit: i64 },
    /// Read a host again from this upstream seq (after its seq went
    /// backwards: a PDS restored from a backup or rebuilt).
    HostCursor { hostname: String, cursor: i64 },
    /// Fill the collection index (listReposByCollection) for the accounts
    /// the relay knows but has not placed: each is asked of its PDS
    /// (describeRepo), within `limits.collection_checks_per_host_per_second`.
    /// Resumable (its position is kept); progress in
    /// `sluice_collections_backfill_permille` and on the status page.
    CollectionsBackfill,
    /// The admin audit log, newest first.
    Audit {
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Entries older than this id (the previous answer's `cursor`).
        #[arg(long)]
        before: Option<i64>,
    },
}

fn admin(url: &str, password_file: Option<&Path>, action: AdminAction) -> anyhow::Result<()> {
    let password = match password_file {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?.trim().to_owned(),
        None => std::env::var("SLUICE_ADMIN_PASSWORD").context("--password-file or SLUICE_ADMIN_PASSWORD is needed")?,
    };
    let agent = ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(60)).build();
    let base = url.trim_end_matches('/');
    let auth = format!("Bearer {password}");
    let (req, body) = match action {
        AdminAction::Hosts => (agent.get(&format!("{base}/admin/hosts")), None),
        AdminAction::CollectionsBackfill => {
            (agent.post(&format!("{base}/admin/collections/backfill")), Some(serde_json::json!({})))
        }
        AdminAction::Consumers => (agent.get(&format!("{base}/admin/consumers")), None),
        AdminAction::Takedown { did } => {
            (agent.post(&format!("{base}/admin/repo/takedown")), Some(serde_json::json!({ "did": did })))
        }
        AdminAction::ReverseTakedown { did } => {
            (agent.post(&format!("{base}/admin/repo/reverseTakedown")), Some(serde_json::json!({ "did": did })))
        }
        AdminAction::Ban { hostname } => {
            (agent.post(&format!("{base}/admin/host/ban")), Some(serde_json::json!({ "hostname": hostname })))
        }
        AdminAction::BanDomain { domain } => {
            (agent.post(&format!("{base}/admin/domain/ban")), Some(serde_json::json!({ "domain": domain })))
        }
        AdminAction::UnbanDomain { domain } => {
            (agent.post(&format!("{base}/admin/domain/unban")), Some(serde_json::json!({ "domain": domain })))
        }
        AdminAction::Limit { hostname, limit } => (
            agent.post(&format!("{base}/admin/host/limit")),
            Some(serde_json::json!({ "hostname": hostname, "limit": limit })),
        ),
        AdminAction::Disconnect { hostname } => {
            (agent.post(&format!("{base}/admin/host/disconnect")), Some(serde_json::json!({ "hostname": hostname })))
        }
        AdminAction::RequestCrawl { mode } => {
            (agent.post(&format!("{base}/admin/requestCrawl")), Some(serde_json::json!({ "public": mode == "public" })))
        }
        AdminAction::HostCursor { hostname, cursor } => (
            agent.post(&format!("{base}/admin/host/cursor")),
            Some(serde_json::json!({ "hostname": hostname, "cursor": cursor })),
        ),
        AdminAction::Audit { limit, before } => {
            let mut r = agent.get(&format!("{base}/admin/audit")).query("limit", &limit.to_string());
            if let Some(b) = before {
                r = r.query("before", &b.to_string());
            }
            (r, None)
        }
        AdminAction::Unban { hostname } => {
            (agent.post(&format!("{base}/admin/host/unban")), Some(serde_json::json!({ "hostname": hostname })))
        }
    };
    let req = req.set("authorization", &auth);
    let resp = match body {
        Some(b) => req.set("content-type", "application/json").send_string(&b.to_string()),
        None => req.call(),
    };
    match resp {
        Ok(r) => {
            println!("{}", r.into_string()?);
            Ok(())
        }
        Err(ureq::Error::Status(code, r)) => anyhow::bail!("{code}: {}", r.into_string().unwrap_or_default()),
        Err(e) => Err(e.into()),
    }
}

fn signals() -> anyhow::Result<Arc<AtomicBool>> {
    let term = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, term.clone())?;
    Ok(term)
}

/// SIGHUP: a flag the supervisor checks on reload (the db-writer too, when
/// the supervisor passes the signal on; shards take settings on their pipe).
fn hangup() -> anyhow::Result<Arc<AtomicBool>> {
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())?;
    Ok(hup)
}

fn load(config: Option<&Path>) -> anyhow::Result<Config> {
    let path = config.map(Path::to_path_buf).or_else(|| {
        let d = PathBuf::from(DEFAULT_CONFIG_PATH);
        d.exists().then_some(d)
    });
    Ok(Config::load(path.as_deref())?)
}

/// One warning per key of the config file that a newer one replaced (it
/// is still read, converted).
fn warn_replaced_keys(path: Option<&Path>) {
    let Ok(raw) = sluice_common::process::config::RawConfig::load(path) else { return };
    for (old, new) in raw.limits.map(|l| l.replaced_keys()).unwrap_or_default() {
        tracing::warn!(
            key = old,
            replaced_by = new,
            bytes_per_entry = sluice_common::process::config::BYTES_PER_REPLACED_ENTRY,
            "config key replaced: read as entries times bytes_per_entry; set the new key instead"
        );
    }
}

/// stderr for the logs, where a write that fails (the reader of a pipe
/// gone, a terminal closed) is dropped: the logging library would report
/// it with `eprintln!`, which panics on a broken stderr.
struct LogOut;

impl std::io::Write for LogOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// `sluice demo --drops`: every drop logged with its reason, in every
/// process (the children read the same variable).
const DROPS_LOG: &str =
    "info,refinery_core=warn,refinery=warn,sluice_dbwriter::sequencer=debug,sluice_shard::upstream=debug";

/// `SLUICE_LOG` (default `info`), with the migration library held to
/// warnings unless the setting names it: at `info` it prints every
/// migration's SQL at each start.
fn log_filter(spec: Option<&str>) -> tracing_subscriber::EnvFilter {
    let mut spec = spec.filter(|s| !s.trim().is_empty()).unwrap_or("info").to_owned();
    if !spec.contains("refinery") {
        spec += ",refinery_core=warn,refinery=warn";
    }
    tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,refinery_core=warn,refinery=warn"))
}

/// How this command logs: the `log_format` of the config it runs on (text
/// when it has none or it does not load: the command itself then says why),
/// and for the relay's own processes the file of recent errors
/// ([`recent`]) with the process's name.
fn log_setup(cmd: &Cmd) -> (LogFormat, Option<(PathBuf, String)>) {
    let (cfg, name) = match cmd {
        Cmd::Run { config } => (load(config.as_deref()).ok(), "supervisor".to_owned()),
        Cmd::DbWriter { config } => (Config::from_effective(config).ok(), "db-writer".to_owned()),
        Cmd::Shard { config, id } => (Config::from_effective(config).ok(), format!("shard-{id}")),
        _ => (None, String::new()),
    };
    match cfg {
        Some(c) => (c.log_format, Some((c.run_dir(), name))),
        None if std::env::var("SLUICE_LOG_FORMAT").is_ok_and(|v| v.trim() == "json") => (LogFormat::Json, None),
        None => (LogFormat::Text, None),
    }
}

/// Logs to stderr (journald under systemd): text, coloured only on a
/// terminal, or one JSON object per line; WARN and ERROR also to the
/// recent-errors file when given.
fn init_logs(format: LogFormat, recent: Option<(PathBuf, String)>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(|| LogOut)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(|| LogOut)
    });
    let recent = recent.and_then(|(dir, name)| recent::layer(dir, &name).ok());
    tracing_subscriber::registry()
        .with(log_filter(std::env::var("SLUICE_LOG").ok().as_deref()))
        .with(text)
        .with(json)
        .with(recent)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if matches!(cli.cmd, Cmd::Demo { drops: true, .. }) && std::env::var_os("SLUICE_LOG").is_none() {
        // Before any thread exists: nothing else reads the environment yet.
        std::env::set_var("SLUICE_LOG", DROPS_LOG);
    }
    let (format, recent) = log_setup(&cli.cmd);
    init_logs(format, recent);
    match cli.cmd {
        Cmd::Run { config } => {
            let source = config.clone().or_else(|| {
                let d = PathBuf::from(DEFAULT_CONFIG_PATH);
                d.exists().then_some(d)
            });
            let cfg = load(config.as_deref())?;
            warn_replaced_keys(source.as_deref());
            let term = signals()?;
            let hup = hangup()?;
            let mut s = supervise::Supervisor::start(cfg)?;
            s.set_source(source);
            s.run(term, hup, None)
        }
        Cmd::Demo { data_dir, port, hosts, rate, .. } => demo(&data_dir, port, hosts, rate),
        Cmd::Config { what: ConfigCmd::Check { config } } => {
            let cfg = load(config.as_deref())?;
            print!("{}", effective_for_humans(&cfg));
            Ok(())
        }
        Cmd::Admin { url, password_file, action } => admin(&url, password_file.as_deref(), action),
        Cmd::Tail { url, cursor, json, limit } => {
            match tail::run(&url, cursor, json, limit, &mut std::io::stdout().lock())? {
                tail::End::Done => Ok(()),
                tail::End::ServerError => std::process::exit(1),
            }
        }
        Cmd::DbWriter { config } => {
            let cfg = Config::from_effective(&config)?;
            let fds = ChildFds::from_env();
            // A held directory is refused first, even without descriptors.
            let _lock = child_lock(&cfg, fds.as_ref().ok())?;
            let fds = fds?;
            let url = cfg.database_url.clone().context("effective config lacks database_url")?;
            let term = signals()?;
            // SIGHUP: re-read the effective config, apply it in place.
            let hup = hangup()?;
            let reload = sluice_dbwriter::Reload { path: config.clone(), hup };
            // SAFETY: the supervisor passed these descriptors to us alone.
            unsafe { sluice_dbwriter::run(&cfg, &url, fds.control, &fds.rings, term, Some(reload)) }
        }
        Cmd::Shard { id, config } => {
            let cfg = Config::from_effective(&config)?;
            let fds = ChildFds::from_env();
            // A held directory is refused first, even without descriptors.
            let _lock = child_lock(&cfg, fds.as_ref().ok())?;
            let fds = fds?;
            let (ring, assign) = fds.shard()?;
            // SIGTERM: consumers get their close frame before the exit.
            let term = signals()?;
            // Reloaded settings come on the assignment pipe.
            let _ = hangup()?;
            let fds = sluice_shard::ShardFds { control: fds.control, ring, assign };
            // SAFETY: the supervisor passed these descriptors to us alone.
            unsafe { sluice_shard::run(&cfg, id, fds, term) }
        }
    }
}

/// The effective config as TOML, with a password in `database_url`
/// replaced by `***`.
fn effective_for_humans(cfg: &Config) -> String {
    let mut shown = cfg.clone();
    shown.database_url = cfg.database_url.as_deref().map(mask_password);
    shown.to_toml()
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`, and
/// `password=secret` in key=value form → `password=***`.
fn mask_password(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((creds, host)) = rest.split_once('@') {
            if let Some((user, _)) = creds.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(
            |kv| {
                if kv.to_ascii_lowercase().starts_with("password=") {
                    "password=***".to_owned()
                } else {
                    kv.to_owned()
                }
            },
        )
        .collect::<Vec<_>>()
        .join(" ")
}

/// A child runs under its supervisor's lock on `data_dir`, or (started by
/// hand) takes it itself; a directory another relay holds is refused
/// before anything is touched.
fn child_lock(cfg: &Config, fds: Option<&ChildFds>) -> anyhow::Result<sluice_common::process::instance::ChildLock> {
    Ok(sluice_common::process::instance::check_child(&cfg.data_dir, fds.map(|f| f.lock))?)
}

#[cfg(feature = "demo")]
fn demo(data_dir: &Path, port: u16, hosts: usize, rate: f64) -> anyhow::Result<()> {
    demo::run(data_dir, port, hosts, rate)
}

/// The packaged build: the synthetic network is not in it.
#[cfg(not(feature = "demo"))]
fn demo(_: &Path, _: u16, _: usize, _: f64) -> anyhow::Result<()> {
    anyhow::bail!(
        "this sluice was built without the demo (cargo feature \"demo\"); from a source tree, scripts/demo builds \
         and runs it"
    )
}

#[cfg(test)]
mod config_tests {
    #[test]
    fn passwords_are_masked() {
        assert_eq!(super::mask_password("postgres://u:s3cret@db/sluice"), "postgres://u:***@db/sluice");
        assert_eq!(super::mask_password("host=/run/pg dbname=x password=s3cret"), "host=/run/pg dbname=x password=***");
        assert_eq!(super::mask_password("host=/run/pg dbname=x"), "host=/run/pg dbname=x");
    }

    #[test]
    fn the_migration_library_is_quiet_unless_named() {
        for (spec, want) in [
            (None, "info,refinery_core=warn,refinery=warn"),
            (Some("info"), "info,refinery_core=warn,refinery=warn"),
            (Some("debug,refinery=info"), "debug,refinery=info"),
        ] {
            let got = super::log_filter(spec).to_string();
            let mut got: Vec<&str> = got.split(',').collect();
            let mut want: Vec<&str> = want.split(',').collect();
            got.sort_unstable();
            want.sort_unstable();
            assert_eq!(got, want, "{spec:?}");
        }
    }
}
