//! Putting fakenet together: bind every listener, build the world, write
//! the info file, and drive generation on its own thread at the requested
//! rate while tokio serves the network.

use super::ledger::{LedgerWriter, Line};
use super::server::{self, ControlRequest, DirectoryConfig, HostState, RepoInfo, Shared};
use super::world::{BrokenWeb, FaultRates, Output, Status, World, WorldConfig};
use anyhow::Context;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub hosts: usize,
    pub accounts: usize,
    pub skew: f64,
    /// did:web accounts (each gets its own port).
    pub web_accounts: usize,
    /// did:web accounts whose documents cannot be had, in turn: a name
    /// that does not exist, a host answering 500, a host never answering
    /// (the last two on ports of their own). Their events are
    /// undeliverable (the ledger says so).
    pub broken_web: usize,
    /// did:plc accounts the directory does not know (undeliverable too).
    pub unregistered: usize,
    /// Zipf exponent over a host's accounts for who acts (0 = evenly).
    pub account_skew: f64,
    /// The share of accounts whose signing key is P-256 (the rest K-256).
    pub p256_share: f64,
    /// Of a thousand ordinary steps, how many create an account.
    pub new_accounts_per_mille: f64,
    /// The share of each host's accounts that act at all (1.0: all).
    pub active_share: f64,
    /// How the PLC directory misbehaves.
    pub directory: DirectoryConfig,
    pub seed: u64,
    /// Events per second (0 = as fast as generation goes).
    pub rate: f64,
    pub duration: Option<Duration>,
    pub max_events: Option<u64>,
    pub faults: FaultRates,
    pub migrations: bool,
    pub ledger: PathBuf,
    pub info: Option<PathBuf>,
    /// Wait (at most this long) for every host to have a subscriber before
    /// generating, so a relay sees every event from the first.
    pub wait_subscribers: Option<Duration>,
    /// After that wait, stay silent this long before generating (a scale
    /// bench's idle phase).
    pub start_delay: Option<Duration>,
    pub backlog_items: usize,
    /// First port for hosts (0 = ephemeral).
    pub base_port: u16,
    /// Every 10 s, one second at 5x the rate.
    pub bursts: bool,
    pub initial_records: usize,
    /// Record the emission instant of up to this many commits (0 = off).
    pub emit_times_max: usize,
    /// Generate and record every step (ledger, documents, repo states)
    /// before the start delay ends; only the hand-over of frames to the
    /// hosts is paced at `rate`. For benches whose relay must not share
    /// the cores with the generator's signing. Needs `duration` or
    /// `max_events` (and `rate`), and takes no faults on command.
    pub pregenerate: bool,
    /// Serve hosts over TLS (`wss://`, PDS endpoints `https://`), with a CA
    /// generated for this run whose certificate is written here.
    pub tls_ca_out: Option<PathBuf>,
}

impl Default for ServeConfig {
    fn default() -> ServeConfig {
        ServeConfig {
            hosts: 3,
            accounts: 10,
            skew: 1.0,
            web_accounts: 0,
            broken_web: 0,
            unregistered: 0,
            account_skew: 0.0,
            p256_share: 0.3,
            new_accounts_per_mille: 10.0,
            active_share: 1.0,
            directory: DirectoryConfig::default(),
            seed: 1,
            rate: 100.0,
            duration: None,
            max_events: None,
            faults: FaultRates::none(),
            migrations: false,
            ledger: PathBuf::from("fakenet-ledger.jsonl"),
            info: None,
            wait_subscribers: None,
            start_delay: None,
            backlog_items: server::BACKLOG_ITEMS_DEFAULT,
            base_port: 0,
            bursts: false,
            initial_records: 5,
            emit_times_max: 0,
            pregenerate: false,
            tls_ca_out: None,
        }
    }
}

/// Where everything is (the `--info` file's content).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Info {
    pub plc_url: String,
    pub hosts: Vec<String>,
    pub relay_listhosts_url: String,
    pub ledger: String,
    pub control_url: String,
    pub web_hosts: Vec<String>,
    /// With TLS: the CA certificate (PEM) that signed the hosts' certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
}

pub struct Running {
    pub info: Info,
    pub shared: Arc<Shared>,
    generator: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Running {
    /// Block until generation has finished (duration or event count). The
    /// generator thread lives on, serving control requests.
    pub fn wait_generation(&mut self) -> anyhow::Result<()> {
        while !self.shared.generation_done.load(Ordering::Acquire) {
            if self.generator.as_ref().is_some_and(|g| g.is_finished()) {
                let g = self.generator.take().expect("checked");
                g.join().map_err(|_| anyhow::anyhow!("generator panicked"))??;
                anyhow::bail!("generator stopped early");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    pub fn events(&self) -> u64 {
        self.shared.events.load(Ordering::Relaxed)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn bind(rt: &tokio::runtime::Runtime, port: u16) -> anyhow::Result<(tokio::net::TcpListener, u16)> {
    // A fixed port may take a moment to be released by a previous run.
    let deadline = Instant::now() + Duration::from_secs(if port == 0 { 0 } else { 3 });
    let l = loop {
        match rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", port))) {
            Ok(l) => break l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).with_context(|| format!("binding 127.0.0.1:{port}")),
        }
    };
    let p = l.local_addr()?.port();
    Ok((l, p))
}

/// Start fakenet; returns once every listener is up and the info file is
/// written. Generation runs on its own thread.
pub fn start(cfg: ServeConfig) -> anyhow::Result<Running> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("fakenet-net")
        .enable_all()
        .build()?;
    let Listeners {
        hosts: host_listeners,
        host_names,
        webs: web_listeners,
        web_names,
        broken: broken_listeners,
        broken_web,
        dir: dir_listener,
        dir_port,
    } = Listeners::bind(&rt, &cfg)?;
    let world = World::new(WorldConfig {
        seed: cfg.seed,
        hosts: host_names.clone(),
        accounts_per_host: cfg.accounts,
        skew: cfg.skew,
        web_hosts: web_names.clone(),
        p256_share: cfg.p256_share,
        initial_records: cfg.initial_records,
        faults: cfg.faults.clone(),
        migrations: cfg.migrations,
        tls: cfg.tls_ca_out.is_some(),
        broken_web,
        unregistered: cfg.unregistered,
        account_skew: cfg.account_skew,
        new_accounts_per_mille: cfg.new_accounts_per_mille,
        active_share: cfg.active_share,
    });
    let (control_tx, control_rx) = std::sync::mpsc::channel();
    let shared = Arc::new(Shared::new(
        host_names.iter().map(|n| Arc::new(HostState::new(n.clone(), cfg.backlog_items))).collect(),
        Some(world.population.clone()),
        cfg.directory.clone(),
        control_tx,
        cfg.faults.split_connections,
        cfg.seed,
        cfg.emit_times_max,
    ));
    let mut ledger = LedgerWriter::create(&cfg.ledger).with_context(|| format!("{}", cfg.ledger.display()))?;
    ledger.write(&Line::Header { ledger: 1, seed: cfg.seed, accounts: world.initial_keys() })?;
    ledger.flush()?;
    let tls = match &cfg.tls_ca_out {
        Some(p) => Some(super::tls::server_config(p)?),
        None => None,
    };
    for (i, l) in host_listeners.into_iter().enumerate() {
        rt.spawn(server::serve_host(l, shared.clone(), i, tls.clone()));
    }
    for (l, name) in web_listeners.into_iter().zip(&web_names) {
        rt.spawn(server::serve_web_did(l, shared.clone(), super::world::web_did(name)));
    }
    for (l, hang) in broken_listeners {
        rt.spawn(server::serve_broken_web(l, hang));
    }
    rt.spawn(server::serve_directory(dir_listener, shared.clone()));
    let base = format!("http://127.0.0.1:{dir_port}");
    let info = Info {
        plc_url: base.clone(),
        hosts: host_names,
        relay_listhosts_url: base.clone(),
        ledger: cfg.ledger.display().to_string(),
        control_url: format!("{base}/_fakenet/fault"),
        web_hosts: web_names,
        ca_cert: cfg.tls_ca_out.as_ref().map(|p| p.display().to_string()),
    };
    if let Some(p) = &cfg.info {
        write_info(p, &info)?;
    }
    let gen_shared = shared.clone();
    let generator = std::thread::Builder::new()
        .name("fakenet-gen".into())
        .spawn(move || generate(world, gen_shared, ledger, cfg, control_rx))?;
    Ok(Running { info, shared, generator: Some(generator), runtime: Some(rt) })
}

/// Every listener a network needs, bound before anything starts: one per
/// host, one per did:web account (broken ones that answer badly too:
/// hanging or not), the directory's.
struct Listeners {
    hosts: Vec<tokio::net::TcpListener>,
    host_names: Vec<String>,
    webs: Vec<tokio::net::TcpListener>,
    web_names: Vec<String>,
    broken: Vec<(tokio::net::TcpListener, bool)>,
    broken_web: Vec<BrokenWeb>,
    dir: tokio::net::TcpListener,
    dir_port: u16,
}

impl Listeners {
    fn bind(rt: &tokio::runtime::Runtime, cfg: &ServeConfig) -> anyhow::Result<Listeners> {
        let next_port = |i: usize| if cfg.base_port == 0 { 0 } else { cfg.base_port + i as u16 };
        let (mut hosts, mut host_names, mut webs, mut web_names) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..cfg.hosts {
            let (l, p) = bind(rt, next_port(i))?;
            hosts.push(l);
            host_names.push(format!("localhost:{p}"));
        }
        for i in 0..cfg.web_accounts {
            let (l, p) = bind(rt, next_port(cfg.hosts + i))?;
            webs.push(l);
            web_names.push(format!("localhost:{p}"));
        }
        let (mut broken, mut broken_web) = (Vec::new(), Vec::new());
        for i in 0..cfg.broken_web {
            match i % 3 {
                0 => broken_web.push(BrokenWeb::NoSuchName(format!("nx-{}-{i}.invalid", cfg.seed))),
                kind => {
                    let (l, p) = bind(rt, 0)?;
                    broken.push((l, kind == 2));
                    let name = format!("localhost:{p}");
                    broken_web.push(if kind == 1 { BrokenWeb::Failing(name) } else { BrokenWeb::Hanging(name) });
                }
            }
        }
        let (dir, dir_port) = bind(rt, next_port(cfg.hosts + cfg.web_accounts))?;
        Ok(Listeners { hosts, host_names, webs, web_names, broken, broken_web, dir, dir_port })
    }
}

/// The network's addresses, written whole (temporary name, rename).
fn write_info(p: &std::path::Path, info: &Info) -> anyhow::Result<()> {
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(info)?)?;
    std::fs::rename(&tmp, p)?;
    Ok(())
}

fn repo_info(world: &World, a: &super::world::Account) -> RepoInfo {
    RepoInfo {
        host: world.cfg.hosts[a.host].clone(),
        active: a.status() == Status::Active,
        status: match a.status() {
            Status::Active => None,
            Status::Deactivated => Some("deactivated"),
            Status::TakenDown => Some("takendown"),
            Status::Deleted => Some("deleted"),
        }
        .map(str::to_owned),
        rev: a.repo.rev().map(|r| r.to_string()),
        head: a.repo.commit_block().map(|(c, _)| c.to_string()),
        collections: a.collections(),
    }
}

fn generate(
    mut world: World,
    shared: Arc<Shared>,
    mut ledger: LedgerWriter,
    cfg: ServeConfig,
    control: std::sync::mpsc::Receiver<ControlRequest>,
) -> anyhow::Result<()> {
    if let Some(wait) = cfg.wait_subscribers {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && !shared.hosts.iter().all(|h| h.subscribed.load(Ordering::Acquire)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if cfg.pregenerate {
        return pregenerated(world, &shared, ledger, &cfg);
    }
    if let Some(d) = cfg.start_delay {
        std::thread::sleep(d);
    }
    let started = Instant::now();
    let mut steps: u64 = 0;
    let mut outputs = Vec::new();
    loop {
        let elapsed = started.elapsed();
        if cfg.duration.is_some_and(|d| elapsed >= d) || cfg.max_events.is_some_and(|m| world.events() >= m) {
            break;
        }
        while let Ok(req) = control.try_recv() {
            let host = req.host.as_deref().and_then(|h| world.cfg.hosts.iter().position(|x| x == h));
            let out = world.inject_fault(req.fault, host);
            apply(&world, &shared, &mut ledger, out)?;
        }
        if cfg.rate > 0.0 {
            let secs = elapsed.as_secs_f64();
            let burst = cfg.bursts && (secs as u64) % 10 == 9;
            let target = (secs * cfg.rate) as u64 + if burst { (secs.fract() * cfg.rate * 4.0) as u64 } else { 0 };
            if steps >= target {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        }
        outputs.clear();
        outputs.extend(world.step());
        steps += 1;
        apply(&world, &shared, &mut ledger, std::mem::take(&mut outputs))?;
    }
    ledger.write(&Line::Done { done: true, events: world.events() })?;
    ledger.flush()?;
    shared.generation_done.store(true, Ordering::Release);
    // Faults on command still work after generation (they are written to
    // the ledger after its done line, which readers accept).
    while let Ok(req) = control.recv() {
        let host = req.host.as_deref().and_then(|h| world.cfg.hosts.iter().position(|x| x == h));
        let out = world.inject_fault(req.fault, host);
        apply(&world, &shared, &mut ledger, out)?;
        ledger.flush()?;
    }
    Ok(())
}

/// Apply one step's outputs. The ledger comes first: every line is
/// written and flushed to the file before any of the step's frames reaches
/// a host's stream, so whoever sees a frame (a relay, its consumers,
/// `check --no-wait`) can find it in the ledger already.
fn apply(world: &World, shared: &Shared, ledger: &mut LedgerWriter, outputs: Vec<Output>) -> anyhow::Result<()> {
    let sends = record_step(world, shared, ledger, outputs)?;
    deliver(shared, sends);
    Ok(())
}

/// A step's outputs into the ledger (flushed) and the shared state; what
/// its hosts are to send, returned.
fn record_step(
    world: &World,
    shared: &Shared,
    ledger: &mut LedgerWriter,
    outputs: Vec<Output>,
) -> anyhow::Result<Vec<(usize, Send)>> {
    let mut touched: Vec<String> = Vec::new();
    let mut sends: Vec<(usize, Send)> = Vec::new();
    for o in outputs {
        record(world, shared, ledger, o, &mut touched, &mut sends)?;
    }
    if !touched.is_empty() {
        let mut repos = shared.repos.write().expect("repos");
        for did in touched {
            if let Some(i) = world.index_of(&did).filter(|&i| world.accounts[i].is_live()) {
                repos.insert(did, repo_info(world, &world.accounts[i]));
            }
        }
    }
    if !sends.is_empty() {
        ledger.flush()?;
    }
    Ok(sends)
}

/// Hand a step's frames to its hosts (the emission instant of a commit is
/// taken here).
fn deliver(shared: &Shared, sends: Vec<(usize, Send)>) {
    for (host, send) in sends {
        match send {
            Send::Frame { seq, frame, commit } => {
                if let Some(id) = commit.filter(|_| shared.emit_times_max > 0) {
                    let mut t = shared.emit_times.lock().expect("emit times");
                    if t.len() < shared.emit_times_max {
                        t.insert(id, Instant::now());
                    }
                }
                shared.hosts[host].push_frame(seq, frame);
                shared.events.fetch_add(1, Ordering::Relaxed);
            }
            Send::Transient(what) => shared.hosts[host].push_transient(what),
        }
    }
}

/// [`ServeConfig::pregenerate`]: every step generated and recorded first,
/// then only delivered at the rate.
fn pregenerated(mut world: World, shared: &Shared, mut ledger: LedgerWriter, cfg: &ServeConfig) -> anyhow::Result<()> {
    let began = Instant::now();
    let steps = match (cfg.max_events, cfg.duration) {
        (Some(m), _) => m,
        (None, Some(d)) => (d.as_secs_f64() * cfg.rate) as u64,
        (None, None) => anyhow::bail!("pregenerate needs duration or max_events"),
    };
    let mut ahead = Vec::with_capacity(steps as usize);
    while world.events() < steps {
        let outputs = world.step();
        ahead.push(record_step(&world, shared, &mut ledger, outputs)?);
    }
    ledger.write(&Line::Done { done: true, events: world.events() })?;
    ledger.flush()?;
    if let Some(d) = cfg.start_delay {
        std::thread::sleep(d.saturating_sub(began.elapsed()));
    }
    let started = Instant::now();
    for (before, sends) in (0u64..).zip(ahead) {
        if cfg.rate > 0.0 {
            while before as f64 >= started.elapsed().as_secs_f64() * cfg.rate {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        deliver(shared, sends);
    }
    shared.generation_done.store(true, Ordering::Release);
    Ok(())
}

/// One step output into the ledger and the shared state; what hosts are
/// to send is collected in `sends`, the accounts it changed in `touched`.
fn record(
    world: &World,
    shared: &Shared,
    ledger: &mut LedgerWriter,
    o: Output,
    touched: &mut Vec<String>,
    sends: &mut Vec<(usize, Send)>,
) -> anyhow::Result<()> {
    match o {
        Output::Frame { host, seq, frame, entry } => {
            if let Some(d) = &entry.did {
                touched.push(d.clone());
            }
            let commit = (entry.t == "#commit").then(|| entry.id.clone());
            ledger.write(&Line::Event(entry))?;
            sends.push((host, Send::Frame { seq, frame, commit }));
        }
        Output::Transient { host, what, entry } => {
            ledger.write(&Line::Event(entry))?;
            sends.push((host, Send::Transient(what)));
        }
        Output::Document { did, doc } => shared.record_document(did, doc),
        Output::AmendWrongHost { did, host } => {
            ledger.write(&Line::AmendWrongHost {
                amend_wronghost: super::ledger::Expect::Either,
                did,
                host: world.cfg.hosts[host].clone(),
            })?;
        }
        Output::Amend { did, host } => {
            ledger.write(&Line::Amend {
                amend: super::ledger::Expect::Either,
                did,
                host: world.cfg.hosts[host].clone(),
            })?;
        }
        Output::AmendKey { did, before } => {
            ledger.write(&Line::AmendKey { amend_key: super::ledger::Expect::Either, did, before })?;
        }
        Output::AmendIds { ids, did } => {
            ledger.write(&Line::AmendIds { amend_ids: ids, did })?;
        }
        Output::RelayAccount { did, active } => {
            touched.push(did.clone());
            ledger.write(&Line::RelayAccount { relay_account: active, did })?;
        }
        Output::NewAccount(k) => {
            touched.push(k.did.clone());
            ledger.write(&Line::Key { key: k })?;
        }
    }
    Ok(())
}

/// What a step hands to a host once the ledger holds it.
enum Send {
    /// `commit`: the commit's id, when it is one (for its emission time).
    Frame {
        seq: i64,
        frame: Vec<u8>,
        commit: Option<String>,
    },
    Transient(super::world::Transient),
}

/// A corpus: a network's traffic generated ahead, on disk, so that serving
/// it costs no signing. Layout of the directory:
/// - `corpus.json`: [`CorpusMeta`] (host names with their fixed ports, the
///   directory's port, did:web hosts);
/// - `ledger.jsonl`: the ledger, as [`super::ledger`] documents;
/// - `docs.json`: DID → DID document (final state); `repos.json`: DID →
///   repo status (final state);
/// - `host-{i}.frames`: host i's frames in order, each `seq` (i64 LE),
///   length (u32 LE), frame bytes.
///
/// Connection faults (disconnects, stalls, malformed bytes) are wire
/// behaviours of a live connection and are not in a corpus; in-stream
/// faults (bad signatures, broken proofs, replays...) are.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CorpusMeta {
    pub version: u32,
    pub seed: u64,
    pub events: u64,
    pub hosts: Vec<String>,
    pub web_hosts: Vec<String>,
    pub directory_port: u16,
}

/// Generate with `cfg` (its rate is ignored: as fast as possible) and
/// write the corpus into `dir`. Ports are bound during generation (they
/// are part of the host names and DID documents): pass `base_port` to fix
/// them.
pub fn generate_corpus(mut cfg: ServeConfig, dir: &std::path::Path) -> anyhow::Result<CorpusMeta> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    cfg.rate = 0.0;
    cfg.ledger = dir.join("ledger.jsonl");
    cfg.info = None;
    cfg.wait_subscribers = None;
    anyhow::ensure!(cfg.max_events.is_some() || cfg.duration.is_some(), "a corpus needs an event count or a duration");
    let mut r = start(cfg.clone())?;
    r.wait_generation()?;
    let port_of = |u: &str| u.rsplit_once(':').and_then(|(_, p)| p.trim_end_matches('/').parse::<u16>().ok());
    let meta = CorpusMeta {
        version: 1,
        seed: cfg.seed,
        events: r.events(),
        hosts: r.info.hosts.clone(),
        web_hosts: r.info.web_hosts.clone(),
        directory_port: port_of(&r.info.plc_url).context("directory port")?,
    };
    for (i, h) in r.shared.hosts.iter().enumerate() {
        let mut w = std::io::BufWriter::new(std::fs::File::create(dir.join(format!("host-{i}.frames")))?);
        for (seq, f) in h.frames() {
            w.write_all(&seq.to_le_bytes())?;
            w.write_all(&(f.len() as u32).to_le_bytes())?;
            w.write_all(&f)?;
        }
        w.flush()?;
    }
    // Every account's document and repository status, derived ones too
    // (a corpus is served without its population).
    let mut docs = r.shared.docs.read().expect("docs").clone();
    let mut repos = r.shared.repos.read().expect("repos").clone();
    if let Some(p) = &r.shared.population {
        for i in 0..p.initial() {
            let did = p.did(i);
            if let Some(d) = r.shared.document(&did) {
                docs.entry(did.clone()).or_insert(d);
            }
            if let Some(info) = r.shared.repo(&did) {
                repos.entry(did).or_insert(info);
            }
        }
    }
    std::fs::write(dir.join("docs.json"), serde_json::to_vec(&docs)?)?;
    std::fs::write(dir.join("repos.json"), serde_json::to_vec(&repos)?)?;
    std::fs::write(dir.join("corpus.json"), serde_json::to_vec_pretty(&meta)?)?;
    Ok(meta)
}

fn read_frames(path: &std::path::Path) -> anyhow::Result<Vec<(i64, Vec<u8>)>> {
    let b = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        anyhow::ensure!(i + 12 <= b.len(), "{}: truncated record header at {i}", path.display());
        let seq = i64::from_le_bytes(b[i..i + 8].try_into().expect("8"));
        let len = u32::from_le_bytes(b[i + 8..i + 12].try_into().expect("4")) as usize;
        anyhow::ensure!(i + 12 + len <= b.len(), "{}: truncated frame at {i}", path.display());
        out.push((seq, b[i + 12..i + 12 + len].to_vec()));
        i += 12 + len;
    }
    Ok(out)
}

/// Serve a corpus written by [`generate_corpus`] on the ports it names:
/// every frame is in its host's backlog from the start, so a relay that
/// subscribes from cursor 0 gets it at full speed. Writes `info` if given.
pub fn serve_corpus(dir: &std::path::Path, info_out: Option<&std::path::Path>) -> anyhow::Result<Running> {
    let meta: CorpusMeta = serde_json::from_slice(&std::fs::read(dir.join("corpus.json")).context("corpus.json")?)?;
    anyhow::ensure!(meta.version == 1, "corpus version {} is not 1", meta.version);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("fakenet-net")
        .enable_all()
        .build()?;
    let port_of = |h: &str| h.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap_or(0);
    let mut frames = Vec::new();
    for i in 0..meta.hosts.len() {
        frames.push(read_frames(&dir.join(format!("host-{i}.frames")))?);
    }
    let backlog = frames.iter().map(Vec::len).max().unwrap_or(0).max(server::BACKLOG_ITEMS_DEFAULT);
    let (control_tx, _control_rx) = std::sync::mpsc::channel();
    let shared = Shared::new(
        meta.hosts.iter().map(|n| Arc::new(HostState::new(n.clone(), backlog))).collect(),
        None,
        DirectoryConfig::default(),
        control_tx,
        0.0,
        meta.seed,
        0,
    );
    *shared.docs.write().expect("docs") =
        serde_json::from_slice(&std::fs::read(dir.join("docs.json")).context("docs.json")?)?;
    *shared.repos.write().expect("repos") =
        serde_json::from_slice(&std::fs::read(dir.join("repos.json")).context("repos.json")?)?;
    let shared = Arc::new(shared);
    let mut n = 0;
    for (h, fs) in shared.hosts.iter().zip(frames) {
        for (seq, f) in fs {
            h.push_frame(seq, f);
            n += 1;
        }
    }
    shared.events.store(n, Ordering::Release);
    shared.generation_done.store(true, Ordering::Release);
    for (i, name) in meta.hosts.iter().enumerate() {
        let (l, _) = bind(&rt, port_of(name))?;
        rt.spawn(server::serve_host(l, shared.clone(), i, None));
    }
    for name in &meta.web_hosts {
        let (l, _) = bind(&rt, port_of(name))?;
        rt.spawn(server::serve_web_did(l, shared.clone(), super::world::web_did(name)));
    }
    let (dl, _) = bind(&rt, meta.directory_port)?;
    rt.spawn(server::serve_directory(dl, shared.clone()));
    let base = format!("http://127.0.0.1:{}", meta.directory_port);
    let info = Info {
        plc_url: base.clone(),
        hosts: meta.hosts.clone(),
        relay_listhosts_url: base.clone(),
        ledger: dir.join("ledger.jsonl").display().to_string(),
        control_url: format!("{base}/_fakenet/fault"),
        web_hosts: meta.web_hosts.clone(),
        ca_cert: None,
    };
    if let Some(p) = info_out {
        std::fs::write(p, serde_json::to_vec_pretty(&info)?)?;
    }
    Ok(Running { info, shared, generator: None, runtime: Some(rt) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Read one response with a content-length from `s` (bounded).
    fn response(s: &mut std::net::TcpStream) -> String {
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|n| n.trim().parse().ok())
                    .expect("a content-length");
                if got.len() >= end + 4 + len {
                    return text;
                }
            }
            let n = s.read(&mut chunk).expect("read within the timeout");
            assert!(n > 0 && got.len() < 1 << 20, "connection closed after {} bytes", got.len());
            got.extend_from_slice(&chunk[..n]);
        }
    }

    #[test]
    fn a_host_keeps_its_connection_for_the_next_request() {
        let dir = tempfile::tempdir().unwrap();
        let net = start(ServeConfig {
            hosts: 1,
            accounts: 3,
            rate: 1.0,
            max_events: Some(1),
            ledger: dir.path().join("ledger.jsonl"),
            ..ServeConfig::default()
        })
        .unwrap();
        let mut s = std::net::TcpStream::connect(&net.info.hosts[0]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for _ in 0..2 {
            s.write_all(b"GET /xrpc/_health HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
            let r = response(&mut s);
            assert!(r.starts_with("HTTP/1.1 200") && r.contains("fakenet"), "{r}");
        }
        // Asked to close, it closes after the answer.
        s.write_all(b"GET /xrpc/_health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
        assert!(response(&mut s).starts_with("HTTP/1.1 200"));
        assert_eq!(s.read(&mut [0u8; 16]).unwrap(), 0, "closed");
    }
}
