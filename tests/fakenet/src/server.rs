//! fakenet's network side (tokio): one listener per PDS host serving
//! `subscribeRepos` with cursor replay and a few sync endpoints, one per
//! did:web account serving its document (or failing to: a broken one), and
//! a directory listener serving the PLC directory (`GET /{did}`, its
//! operation log `GET /export?after=&count=`), a fake upstream relay's
//! `listHosts`, and the control endpoint (`POST
//! /_fakenet/fault?kind=K&host=H`).
//!
//! The directory misbehaves as asked ([`DirectoryConfig`]): latency on
//! every answer, 429 with Retry-After past a rate, 502 bursts; it keeps
//! connections open, and counts what it was asked and how it answered
//! ([`DirStats`]), so a test can hold a relay to the directory's rules.
//! Documents of accounts that never changed are derived on demand from
//! the [`Population`], not stored.
//!
//! Each host keeps a bounded log of items: frames (with their seq, replayed
//! to any cursor still in the log) and transients (connection faults, only
//! acted on by connections that were open when the fault was made, so a
//! relay that reconnects after a malformed frame does not meet it again).

use super::population::Population;
use super::world::Transient;
use super::ws::{self, Request};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// Items a host keeps for replay, by default.
pub const BACKLOG_ITEMS_DEFAULT: usize = 200_000;
/// Bytes of frames written to one subscriber per batch.
const BATCH_BYTES_MAX: usize = 1 << 20;

enum Item {
    Frame(i64, Arc<[u8]>),
    Transient(u64, Transient),
}

struct HostLog {
    items: VecDeque<Item>,
    /// Absolute index of `items[0]`.
    first: u64,
    /// Transients made so far (a connection acts on those made after it
    /// opened).
    epoch: u64,
    last_seq: i64,
    max_items: usize,
}

pub struct HostState {
    pub name: String,
    log: Mutex<HostLog>,
    notify: Notify,
    /// Has anyone subscribed yet (generation may wait for it)?
    pub subscribed: AtomicBool,
    pub connections: AtomicU64,
}

impl HostState {
    pub fn new(name: String, max_items: usize) -> HostState {
        HostState {
            name,
            log: Mutex::new(HostLog { items: VecDeque::new(), first: 0, epoch: 0, last_seq: 0, max_items }),
            notify: Notify::new(),
            subscribed: AtomicBool::new(false),
            connections: AtomicU64::new(0),
        }
    }

    fn push(&self, item: Item) {
        let mut log = self.log.lock().expect("host log");
        if let Item::Frame(seq, _) = &item {
            log.last_seq = log.last_seq.max(*seq);
        }
        log.items.push_back(item);
        while log.items.len() > log.max_items {
            log.items.pop_front();
            log.first += 1;
        }
        drop(log);
        self.notify.notify_waiters();
    }

    pub fn push_frame(&self, seq: i64, frame: Vec<u8>) {
        self.push(Item::Frame(seq, frame.into()));
    }

    pub fn push_transient(&self, t: Transient) {
        let epoch = {
            let mut log = self.log.lock().expect("host log");
            log.epoch += 1;
            log.epoch
        };
        self.push(Item::Transient(epoch, t));
    }

    /// Every frame still in the backlog, in order (for corpus files).
    pub fn frames(&self) -> Vec<(i64, Arc<[u8]>)> {
        let log = self.log.lock().expect("host log");
        log.items
            .iter()
            .filter_map(|i| match i {
                Item::Frame(s, f) => Some((*s, f.clone())),
                Item::Transient(..) => None,
            })
            .collect()
    }

    pub fn last_seq(&self) -> i64 {
        self.log.lock().expect("host log").last_seq
    }
}

/// The per-account facts the sync endpoints answer with.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RepoInfo {
    pub host: String,
    pub active: bool,
    pub status: Option<String>,
    pub rev: Option<String>,
    pub head: Option<String>,
    /// The collections its repo holds records of (describeRepo).
    pub collections: Vec<String>,
}

/// A fault requested through the control endpoint.
#[derive(Debug)]
pub struct ControlRequest {
    pub fault: super::world::Fault,
    pub host: Option<String>,
}

/// How the PLC directory misbehaves.
#[derive(Debug, Clone, Default)]
pub struct DirectoryConfig {
    /// Added to every answer.
    pub latency: Duration,
    /// Requests per second (documents and export pages together) before
    /// it answers 429 (0: no limit); the Retry-After it gives.
    pub rate: f64,
    pub retry_after_s: u64,
    /// Every `burst_every` (from the start), for `burst_len`, everything
    /// is answered 502.
    pub burst_every: Option<Duration>,
    pub burst_len: Duration,
    /// Serve `/export` (else 404, as a directory without it).
    pub no_export: bool,
}

/// What the directory was asked, and how it answered.
#[derive(Debug, Default)]
pub struct DirStats {
    pub doc_requests: AtomicU64,
    pub export_requests: AtomicU64,
    pub answered_429: AtomicU64,
    pub answered_5xx: AtomicU64,
    pub answered_404: AtomicU64,
    pub connections: AtomicU64,
    /// Requests being answered now, and at most at once.
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
    /// Requests that came while a Retry-After it gave was running (50 ms
    /// after the 429 went out, for requests already on their way).
    pub during_retry_after: AtomicU64,
    /// Most requests that came within one second.
    pub max_per_second: AtomicU64,
    inner: Mutex<DirInner>,
}

#[derive(Debug, Default)]
struct DirInner {
    /// Arrivals in the last second.
    recent: VecDeque<std::time::Instant>,
    /// A Retry-After is running: (from, until).
    retry: Option<(std::time::Instant, std::time::Instant)>,
    /// Document requests per DID (with at most how many at once).
    per_did: HashMap<String, (u32, u32, u32)>,
    bucket: Option<sluice_common::process::rate::TokenBucket>,
}

impl DirStats {
    /// Document requests for `did` so far, and at most at once.
    pub fn for_did(&self, did: &str) -> (u32, u32) {
        let inner = self.inner.lock().expect("dir stats");
        inner.per_did.get(did).map_or((0, 0), |(n, _, max)| (*n, *max))
    }

    /// Document requests for DIDs that `pred` picks, summed.
    pub fn requests_where(&self, pred: impl Fn(&str) -> bool) -> u64 {
        let inner = self.inner.lock().expect("dir stats");
        inner.per_did.iter().filter(|(d, _)| pred(d)).map(|(_, (n, _, _))| *n as u64).sum()
    }

    /// The most document requests any one DID had.
    pub fn max_requests_per_did(&self) -> u32 {
        self.inner.lock().expect("dir stats").per_did.values().map(|(n, _, _)| *n).max().unwrap_or(0)
    }

    /// DIDs asked for more than once at the same time (none, for a relay
    /// that asks once per DID).
    pub fn dids_asked_concurrently(&self) -> usize {
        self.inner.lock().expect("dir stats").per_did.values().filter(|(_, _, max)| *max > 1).count()
    }
}

/// The PLC operation log `/export` serves, oldest first.
#[derive(Debug, Default)]
pub struct ExportLog {
    /// (createdAt, line)
    pub ops: Vec<(String, String)>,
    last_micros: i64,
}

pub struct Shared {
    pub hosts: Vec<Arc<HostState>>,
    /// Documents that changed since the start (others are derived from
    /// `population`).
    pub docs: RwLock<HashMap<String, serde_json::Value>>,
    pub repos: RwLock<HashMap<String, RepoInfo>>,
    pub population: Option<Arc<Population>>,
    pub directory: DirectoryConfig,
    pub dir_stats: DirStats,
    pub export: Mutex<ExportLog>,
    pub started: std::time::Instant,
    pub control: Mutex<std::sync::mpsc::Sender<ControlRequest>>,
    pub split_connections: f64,
    pub seed: u64,
    pub events: AtomicU64,
    pub generation_done: AtomicBool,
    /// When each `#commit` (by commit CID) was handed to its host, if
    /// [`super::runner::ServeConfig::emit_times_max`] asks for it (latency
    /// benchmarks); bounded by that count.
    pub emit_times: Mutex<HashMap<String, std::time::Instant>>,
    pub emit_times_max: usize,
}

impl Shared {
    /// The shared state of a network of `hosts` (nothing else yet).
    pub fn new(
        hosts: Vec<Arc<HostState>>,
        population: Option<Arc<Population>>,
        directory: DirectoryConfig,
        control: std::sync::mpsc::Sender<ControlRequest>,
        split_connections: f64,
        seed: u64,
        emit_times_max: usize,
    ) -> Shared {
        Shared {
            hosts,
            docs: RwLock::new(HashMap::new()),
            repos: RwLock::new(HashMap::new()),
            population,
            directory,
            dir_stats: DirStats::default(),
            export: Mutex::new(ExportLog::default()),
            started: std::time::Instant::now(),
            control: Mutex::new(control),
            split_connections,
            seed,
            events: Default::default(),
            generation_done: Default::default(),
            emit_times: Default::default(),
            emit_times_max,
        }
    }

    pub fn host(&self, name: &str) -> Option<&Arc<HostState>> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// `did`'s document as the network serves it now (None: unknown, or
    /// an account whose identity is not to be had).
    pub fn document(&self, did: &str) -> Option<serde_json::Value> {
        let idx = self.population.as_ref().and_then(|p| p.index_of(did));
        if let (Some(p), Some(i)) = (&self.population, idx) {
            if p.unresolvable(i) {
                return None;
            }
        }
        if let Some(d) = self.docs.read().expect("docs").get(did) {
            return Some(d.clone());
        }
        self.population.as_ref().zip(idx).and_then(|(p, i)| p.initial_document(i))
    }

    /// `did`'s repository as its host's sync endpoints report it.
    pub fn repo(&self, did: &str) -> Option<RepoInfo> {
        if let Some(r) = self.repos.read().expect("repos").get(did) {
            return Some(r.clone());
        }
        let p = self.population.as_ref()?;
        let i = p.index_of(did).filter(|i| *i < p.initial())?;
        Some(RepoInfo {
            host: p.hosts[p.initial_host(i)].clone(),
            active: true,
            status: None,
            rev: None,
            head: None,
            collections: Vec::new(),
        })
    }

    /// A document changed: serve it from now on, and (a did:plc's) add its
    /// operation to the export, with a createdAt of now (strictly after
    /// the previous one).
    pub fn record_document(&self, did: String, doc: serde_json::Value) {
        if did.starts_with("did:plc:") {
            export_line_of(&did, &doc, &mut self.export.lock().expect("export"));
        }
        self.docs.write().expect("docs").insert(did, doc);
    }
}

/// Append `doc` as a `plc_operation` to `log`.
fn export_line_of(did: &str, doc: &serde_json::Value, log: &mut ExportLog) -> Option<()> {
    let multikey = doc["verificationMethod"][0]["publicKeyMultibase"].as_str()?;
    let key = sluice_common::atproto::crypto::PublicKey::from_multikey(multikey).ok()?;
    let handle = doc["alsoKnownAs"][0].as_str()?.strip_prefix("at://")?;
    let pds = doc["service"][0]["serviceEndpoint"].as_str()?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
    // Milliseconds, as the directory writes them, strictly increasing.
    let micros = (now / 1000 * 1000).max(log.last_micros + 1000);
    log.last_micros = micros;
    let created = sluice_common::atproto::syntax::format_datetime_micros(micros);
    let cid = format!("fakenet-op-{}", log.ops.len());
    let line = sluice_common::atproto::plc::export_line(did, &key, handle, pds, &cid, &created);
    log.ops.push((created, line));
    Some(())
}

/// Accept loop of one PDS host (TLS when `tls` is given).
pub async fn serve_host(
    listener: TcpListener,
    shared: Arc<Shared>,
    host: usize,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                None => {
                    let _ = handle_host_conn(stream, shared, host).await;
                }
                Some(a) => {
                    if let Ok(s) = a.accept(stream).await {
                        let _ = handle_host_conn(s, shared, host).await;
                    }
                }
            }
        });
    }
}

async fn handle_host_conn<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut stream: S,
    shared: Arc<Shared>,
    host: usize,
) -> std::io::Result<()> {
    // A connection is kept for the client's next request, as a PDS behind
    // its proxy keeps it: a relay's checks reuse their connections.
    while let Some(req) = ws::read_request(&mut stream).await? {
        let hs = shared.hosts[host].clone();
        match req.path.as_str() {
            "/xrpc/com.atproto.sync.subscribeRepos" if req.is_websocket() => {
                let n = hs.connections.fetch_add(1, Ordering::Relaxed);
                let split = {
                    let mut r = ChaCha8Rng::seed_from_u64(shared.seed ^ (host as u64) << 32 ^ n);
                    r.gen_bool(shared.split_connections.clamp(0.0, 1.0)).then_some(r)
                };
                hs.subscribed.store(true, Ordering::Release);
                return subscriber(stream, req, hs, split).await;
            }
            path => {
                let close = req.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
                let (status, body) = host_endpoint(&shared, host, path, &req);
                let body = serde_json::to_vec(&body).expect("json");
                stream.write_all(&keep_alive(status, &body, "application/json", "")).await?;
                if close {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

fn host_endpoint(shared: &Shared, host: usize, path: &str, req: &Request) -> (u16, serde_json::Value) {
    use serde_json::json;
    let name = &shared.hosts[host].name;
    let not_found = |msg: &str| (400, json!({"error": "RepoNotFound", "message": msg}));
    match path {
        "/xrpc/com.atproto.server.describeServer" => {
            (200, json!({"did": format!("did:web:{}", name.replace(':', "%3A")), "availableUserDomains": [".test"]}))
        }
        "/xrpc/_health" => (200, json!({"version": "fakenet"})),
        "/xrpc/com.atproto.sync.getRepoStatus" => match req.param("did").and_then(|d| shared.repo(d).map(|r| (d, r))) {
            Some((did, r)) if &r.host == name => {
                (200, json!({"did": did, "active": r.active, "status": r.status, "rev": r.rev}))
            }
            _ => not_found("no such repo on this host"),
        },
        "/xrpc/com.atproto.sync.getLatestCommit" => match req.param("did").and_then(|d| shared.repo(d)) {
            Some(r) if &r.host == name && r.head.is_some() => (200, json!({"cid": r.head, "rev": r.rev})),
            _ => not_found("no commit for this repo on this host"),
        },
        "/xrpc/com.atproto.sync.listRepos" => list_repos(shared, host, req),
        "/xrpc/com.atproto.repo.describeRepo" => match req.param("repo").and_then(|d| shared.repo(d).map(|r| (d, r))) {
            Some((did, r)) if &r.host == name && r.active => (
                200,
                json!({"did": did, "handle": "handle.invalid", "didDoc": {}, "collections": r.collections,
                        "handleIsCorrect": false}),
            ),
            Some((_, r)) if &r.host == name => {
                (400, json!({"error": "RepoDeactivated", "message": r.status.unwrap_or_else(|| "inactive".into())}))
            }
            _ => not_found("no such repo on this host"),
        },
        _ => (404, json!({"error": "NotFound", "message": path})),
    }
}

/// `listRepos` of `host`: every account on it, in DID order, paged.
fn list_repos(shared: &Shared, host: usize, req: &Request) -> (u16, serde_json::Value) {
    use serde_json::json;
    let name = &shared.hosts[host].name;
    let limit: usize = req.param("limit").and_then(|l| l.parse().ok()).unwrap_or(500).clamp(1, 1000);
    let cursor = req.param("cursor").unwrap_or("");
    let mut dids: Vec<String> = shared.repos.read().expect("repos").keys().cloned().collect();
    if let Some(p) = &shared.population {
        dids.extend(p.initial_range(host).map(|i| p.did(i)));
    }
    dids.retain(|d| d.as_str() > cursor);
    dids.sort();
    dids.dedup();
    let mut list = Vec::new();
    let mut last = None;
    for d in dids {
        if list.len() == limit {
            break;
        }
        if let Some(r) = shared.repo(&d).filter(|r| &r.host == name) {
            list.push(json!({"did": d, "head": r.head, "rev": r.rev, "active": r.active, "status": r.status}));
            last = Some(d);
        }
    }
    let next = (list.len() == limit).then_some(last).flatten();
    (200, json!({"repos": list, "cursor": next}))
}

/// Where a subscription starts.
enum Start {
    Future,
    At { pos: u64, epoch: u64, outdated: bool },
}

/// The start for `cursor`, decided under the host's log lock.
fn start_of(host: &HostState, cursor: Option<i64>) -> Start {
    let log = host.log.lock().expect("host log");
    let end = log.first + log.items.len() as u64;
    match cursor {
        None => Start::At { pos: end, epoch: log.epoch, outdated: false },
        Some(c) if c > log.last_seq => Start::Future,
        Some(c) => {
            let first_seq = log.items.iter().find_map(|i| match i {
                Item::Frame(s, _) => Some(*s),
                _ => None,
            });
            let outdated = c > 0 && first_seq.is_some_and(|f| c < f - 1);
            let skip = log.items.iter().position(|i| matches!(i, Item::Frame(s, _) if *s > c));
            Start::At { pos: skip.map_or(end, |k| log.first + k as u64), epoch: log.epoch, outdated }
        }
    }
}

/// The subscriber's reader task: pings to answer (on the channel), close
/// or EOF to stop.
fn spawn_reader<R: AsyncRead + Unpin + Send + 'static>(
    mut rd: R,
) -> (tokio::task::JoinHandle<()>, tokio::sync::mpsc::Receiver<Vec<u8>>) {
    let (ping_tx, ping_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            match ws::parse_incoming(&mut buf) {
                Ok(msgs) => {
                    for m in msgs {
                        match m {
                            ws::Incoming::Ping(p) => {
                                if ping_tx.try_send(p).is_err() {
                                    // Writer stalled or gone: drop the ping.
                                }
                            }
                            ws::Incoming::Close => return,
                            ws::Incoming::Other => {}
                        }
                    }
                }
                Err(_) => return,
            }
        }
    });
    (reader, ping_rx)
}

/// Frame the log from `pos` into `out` (up to a batch, stopping at a
/// transient action of a later connection epoch, which goes to `acts`);
/// true if `pos` fell out of the backlog.
fn next_batch(
    host: &HostState,
    pos: &mut u64,
    connect_epoch: u64,
    out: &mut Vec<u8>,
    acts: &mut Vec<Transient>,
) -> bool {
    let log = host.log.lock().expect("host log");
    let behind = *pos < log.first;
    let end = log.first + log.items.len() as u64;
    while !behind && *pos < end && out.len() < BATCH_BYTES_MAX && acts.is_empty() {
        match &log.items[(*pos - log.first) as usize] {
            Item::Frame(_, f) => ws::binary(out, f),
            Item::Transient(e, t) if *e > connect_epoch => acts.push(t.clone()),
            Item::Transient(..) => {}
        }
        *pos += 1;
    }
    behind
}

/// The first frames for `start` into `out`: `#info OutdatedCursor`
/// where due; for a cursor from the future the error frame and the close,
/// and None.
fn start_frames(start: Start, out: &mut Vec<u8>) -> Option<(u64, u64)> {
    match start {
        Start::Future => {
            let mut f = Vec::new();
            sluice_common::atproto::frame::encode_error("FutureCursor", Some("cursor is ahead of this host"), &mut f);
            ws::binary(out, &f);
            ws::close(out);
            None
        }
        Start::At { pos, epoch, outdated } => {
            if outdated {
                let mut f = Vec::new();
                sluice_common::atproto::frame::InfoEvent { name: "OutdatedCursor", message: None }.encode(&mut f);
                ws::binary(out, &f);
            }
            Some((pos, epoch))
        }
    }
}

/// Act out transient faults in order; true: the connection is to end.
async fn play<W: AsyncWrite + Unpin>(
    acts: Vec<Transient>,
    wr: &mut W,
    out: &mut Vec<u8>,
    split: &mut Option<ChaCha8Rng>,
) -> std::io::Result<bool> {
    for t in acts {
        match t {
            Transient::Raw(bytes) => {
                ws::binary(out, &bytes);
                ws::write_maybe_split(wr, out, split.as_mut()).await?;
                out.clear();
            }
            Transient::Disconnect => return Ok(true),
            Transient::Stall(d) => tokio::time::sleep(d).await,
        }
    }
    Ok(false)
}

/// One `subscribeRepos` connection: replay from the cursor, then live.
async fn subscriber<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    req: Request,
    host: Arc<HostState>,
    mut split: Option<ChaCha8Rng>,
) -> std::io::Result<()> {
    let Some(upgrade) = ws::upgrade_response(&req) else { return Ok(()) };
    let (rd, mut wr) = tokio::io::split(stream);
    ws::write_maybe_split(&mut wr, &upgrade, split.as_mut()).await?;
    let cursor: Option<i64> = req.param("cursor").and_then(|c| c.parse().ok());
    let mut out = Vec::new();
    // Decide the start under the lock, act after it.
    let start = start_of(&host, cursor);
    let Some((mut pos, connect_epoch)) = start_frames(start, &mut out) else {
        // A cursor from the future: the error and the close.
        ws::write_maybe_split(&mut wr, &out, split.as_mut()).await?;
        return Ok(());
    };
    // Reader: pings to answer, close/EOF to stop.
    let (reader, mut ping_rx) = spawn_reader(rd);
    let result = async {
        loop {
            let notified = host.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut acts: Vec<Transient> = Vec::new();
            let fell_behind = next_batch(&host, &mut pos, connect_epoch, &mut out, &mut acts);
            if fell_behind {
                // Fell out of the backlog: a PDS would say so and close.
                let mut f = Vec::new();
                sluice_common::atproto::frame::encode_error("ConsumerTooSlow", None, &mut f);
                ws::binary(&mut out, &f);
                ws::close(&mut out);
                ws::write_maybe_split(&mut wr, &out, split.as_mut()).await?;
                return Ok(());
            }
            while let Ok(p) = ping_rx.try_recv() {
                ws::pong(&mut out, &p);
            }
            if !out.is_empty() {
                ws::write_maybe_split(&mut wr, &out, split.as_mut()).await?;
                out.clear();
            }
            if play(acts, &mut wr, &mut out, &mut split).await? {
                return Ok(());
            }
            let caught_up = {
                let log = host.log.lock().expect("host log");
                pos >= log.first + log.items.len() as u64
            };
            if caught_up {
                tokio::select! {
                    _ = &mut notified => {}
                    p = ping_rx.recv() => match p {
                        Some(p) => ws::pong(&mut out, &p),
                        None => return Ok(()),
                    },
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    .await;
    reader.abort();
    result
}

/// The directory: PLC documents and export, listHosts, control. Keeps
/// connections open (a client's connection pool is part of what is
/// measured).
pub async fn serve_directory(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        shared.dir_stats.connections.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = ws::read_request(&mut stream).await {
                let close = req.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
                let resp = directory_answer(&shared, &req).await;
                if stream.write_all(&resp).await.is_err() || close {
                    return;
                }
            }
        });
    }
}

/// A kept-alive JSON answer, with extra header lines.
fn keep_alive(status: u16, body: &[u8], content_type: &str, extra: &str) -> Vec<u8> {
    let mut out =
        format!("HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{extra}\r\n", body.len())
            .into_bytes();
    out.extend_from_slice(body);
    out
}

fn keep_alive_json(status: u16, v: &serde_json::Value) -> Vec<u8> {
    keep_alive(status, &serde_json::to_vec(v).expect("json"), "application/json", "")
}

/// Count a directory request's arrival; the answer a misbehaving
/// directory gives instead of the real one (429, 502), if any.
fn admit(shared: &Shared, did: Option<&str>) -> Option<Vec<u8>> {
    use serde_json::json;
    let st = &shared.dir_stats;
    let now = std::time::Instant::now();
    let cfg = &shared.directory;
    let mut inner = st.inner.lock().expect("dir stats");
    inner.recent.push_back(now);
    while inner.recent.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1)) {
        inner.recent.pop_front();
    }
    st.max_per_second.fetch_max(inner.recent.len() as u64, Ordering::Relaxed);
    if inner.retry.is_some_and(|(from, until)| now > from + Duration::from_millis(50) && now < until) {
        st.during_retry_after.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(d) = did {
        let e = inner.per_did.entry(d.to_owned()).or_default();
        e.0 += 1;
        e.1 += 1;
        e.2 = e.2.max(e.1);
    }
    if let Some(every) = cfg.burst_every {
        let t = shared.started.elapsed().as_secs_f64() % every.as_secs_f64();
        if t < cfg.burst_len.as_secs_f64() {
            st.answered_5xx.fetch_add(1, Ordering::Relaxed);
            return Some(keep_alive_json(502, &json!({"error": "BadGateway", "message": "a 5xx burst"})));
        }
    }
    if cfg.rate > 0.0 {
        let b =
            inner.bucket.get_or_insert_with(|| sluice_common::process::rate::TokenBucket::new(cfg.rate, cfg.rate, now));
        if b.take(now).is_some() {
            st.answered_429.fetch_add(1, Ordering::Relaxed);
            let wait = Duration::from_secs(cfg.retry_after_s.max(1));
            inner.retry = Some((now, now + wait));
            let body = serde_json::to_vec(&json!({"error": "RateLimited", "message": "slow down"})).expect("json");
            return Some(keep_alive(429, &body, "application/json", &format!("retry-after: {}\r\n", wait.as_secs())));
        }
    }
    None
}

fn finished(shared: &Shared, did: Option<&str>) {
    if let Some(d) = did {
        if let Some(e) = shared.dir_stats.inner.lock().expect("dir stats").per_did.get_mut(d) {
            e.1 -= 1;
        }
    }
}

async fn directory_answer(shared: &Shared, req: &Request) -> Vec<u8> {
    use serde_json::json;
    let path = req.path.as_str();
    let doc_did = path.strip_prefix('/').filter(|d| d.starts_with("did:"));
    let is_export = path == "/export";
    if doc_did.is_none() && !is_export {
        return directory_endpoint(shared, req);
    }
    let st = &shared.dir_stats;
    if is_export {
        st.export_requests.fetch_add(1, Ordering::Relaxed);
    } else {
        st.doc_requests.fetch_add(1, Ordering::Relaxed);
    }
    let n = st.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    st.max_in_flight.fetch_max(n, Ordering::Relaxed);
    let refused = admit(shared, doc_did);
    if !shared.directory.latency.is_zero() {
        tokio::time::sleep(shared.directory.latency).await;
    }
    let resp = match (refused, doc_did) {
        (Some(r), _) => r,
        (None, Some(did)) => match shared.document(did).filter(|_| did.starts_with("did:plc:")) {
            Some(doc) => keep_alive_json(200, &doc),
            None => {
                st.answered_404.fetch_add(1, Ordering::Relaxed);
                keep_alive_json(404, &json!({"message": "DID not registered"}))
            }
        },
        (None, None) if shared.directory.no_export => keep_alive_json(404, &json!({"message": "no export here"})),
        (None, None) => export_page(shared, req),
    };
    finished(shared, doc_did);
    st.in_flight.fetch_sub(1, Ordering::Relaxed);
    resp
}

/// `/export?after=&count=`: operations created after `after`, oldest
/// first, at most `count` (1,000).
fn export_page(shared: &Shared, req: &Request) -> Vec<u8> {
    let count: usize = req.param("count").and_then(|c| c.parse().ok()).unwrap_or(1000).clamp(1, 1000);
    let after = req.param("after").unwrap_or("");
    let log = shared.export.lock().expect("export");
    let from = log.ops.partition_point(|(c, _)| c.as_str() <= after);
    let lines: Vec<&str> = log.ops[from..].iter().take(count).map(|(_, l)| l.as_str()).collect();
    keep_alive(200, lines.join("\n").as_bytes(), "application/jsonlines", "")
}

fn directory_endpoint(shared: &Shared, req: &Request) -> Vec<u8> {
    use serde_json::json;
    match req.path.as_str() {
        "/xrpc/com.atproto.sync.listHosts" => {
            let hosts: Vec<serde_json::Value> = shared
                .hosts
                .iter()
                .map(|h| json!({"hostname": h.name, "seq": h.last_seq(), "status": "active"}))
                .collect();
            keep_alive_json(200, &json!({"hosts": hosts}))
        }
        "/_fakenet/fault" if req.method == "POST" => {
            let Some(fault) = req.param("kind").and_then(super::world::Fault::from_name) else {
                return keep_alive_json(400, &json!({"error": "BadFault"}));
            };
            let host = req.param("host").map(str::to_owned);
            let _ = shared.control.lock().expect("control").send(ControlRequest { fault, host });
            keep_alive_json(200, &json!({"ok": true}))
        }
        "/_fakenet/status" => keep_alive_json(
            200,
            &json!({
                "events": shared.events.load(Ordering::Relaxed),
                "done": shared.generation_done.load(Ordering::Relaxed),
                "hosts": shared.hosts.iter().map(|h| json!({
                    "name": h.name, "seq": h.last_seq(),
                    "connections": h.connections.load(Ordering::Relaxed),
                })).collect::<Vec<_>>(),
                "directory": {
                    "doc_requests": shared.dir_stats.doc_requests.load(Ordering::Relaxed),
                    "export_requests": shared.dir_stats.export_requests.load(Ordering::Relaxed),
                    "answered_429": shared.dir_stats.answered_429.load(Ordering::Relaxed),
                    "answered_5xx": shared.dir_stats.answered_5xx.load(Ordering::Relaxed),
                    "answered_404": shared.dir_stats.answered_404.load(Ordering::Relaxed),
                    "connections": shared.dir_stats.connections.load(Ordering::Relaxed),
                    "max_in_flight": shared.dir_stats.max_in_flight.load(Ordering::Relaxed),
                    "max_per_second": shared.dir_stats.max_per_second.load(Ordering::Relaxed),
                    "during_retry_after": shared.dir_stats.during_retry_after.load(Ordering::Relaxed),
                },
            }),
        ),
        _ => keep_alive_json(404, &json!({"message": "DID not registered"})),
    }
}

/// The did:web document listener of one account.
pub async fn serve_web_did(listener: TcpListener, shared: Arc<Shared>, did: String) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let shared = shared.clone();
        let did = did.clone();
        tokio::spawn(async move {
            let Ok(Some(req)) = ws::read_request(&mut stream).await else { return };
            let resp = match (req.path.as_str(), shared.document(&did)) {
                ("/.well-known/did.json", Some(doc)) => ws::json_response(200, &doc),
                _ => ws::json_response(404, &serde_json::json!({"error": "NotFound"})),
            };
            let _ = stream.write_all(&resp).await;
        });
    }
}

/// The listener of a broken did:web account: 500 to everything, or never
/// an answer (connections held open until the client gives up).
pub async fn serve_broken_web(listener: TcpListener, hang: bool) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let Ok(Some(_)) = ws::read_request(&mut stream).await else { return };
            if hang {
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
            let _ = stream.write_all(&ws::json_response(500, &serde_json::json!({"error": "Broken"}))).await;
        });
    }
}
