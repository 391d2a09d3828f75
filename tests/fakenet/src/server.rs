//! fakenet's network side (tokio): one listener per PDS host serving
//! `subscribeRepos` with cursor replay and a few sync endpoints, one per
//! did:web account serving its document, and a directory listener serving
//! the PLC directory (`GET /{did}`), a fake upstream relay's `listHosts`,
//! and the control endpoint (`POST /_fakenet/fault?kind=K&host=H`).
//!
//! Each host keeps a bounded log of items: frames (with their seq, replayed
//! to any cursor still in the log) and transients (connection faults, only
//! acted on by connections that were open when the fault was made, so a
//! relay that reconnects after a malformed frame does not meet it again).

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
}

/// A fault requested through the control endpoint.
#[derive(Debug)]
pub struct ControlRequest {
    pub fault: super::world::Fault,
    pub host: Option<String>,
}

pub struct Shared {
    pub hosts: Vec<Arc<HostState>>,
    pub docs: RwLock<HashMap<String, serde_json::Value>>,
    pub repos: RwLock<HashMap<String, RepoInfo>>,
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
    pub fn host(&self, name: &str) -> Option<&Arc<HostState>> {
        self.hosts.iter().find(|h| h.name == name)
    }
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
    let Some(req) = ws::read_request(&mut stream).await? else { return Ok(()) };
    let hs = shared.hosts[host].clone();
    match req.path.as_str() {
        "/xrpc/com.atproto.sync.subscribeRepos" if req.is_websocket() => {
            let n = hs.connections.fetch_add(1, Ordering::Relaxed);
            let split = {
                let mut r = ChaCha8Rng::seed_from_u64(shared.seed ^ (host as u64) << 32 ^ n);
                r.gen_bool(shared.split_connections.clamp(0.0, 1.0)).then_some(r)
            };
            hs.subscribed.store(true, Ordering::Release);
            subscriber(stream, req, hs, split).await
        }
        path => {
            let resp = host_endpoint(&shared, host, path, &req);
            stream.write_all(&resp).await
        }
    }
}

fn host_endpoint(shared: &Shared, host: usize, path: &str, req: &Request) -> Vec<u8> {
    use serde_json::json;
    let name = &shared.hosts[host].name;
    let repos = shared.repos.read().expect("repos");
    let not_found = |msg: &str| ws::json_response(400, &json!({"error": "RepoNotFound", "message": msg}));
    match path {
        "/xrpc/com.atproto.server.describeServer" => ws::json_response(
            200,
            &json!({"did": format!("did:web:{}", name.replace(':', "%3A")), "availableUserDomains": [".test"]}),
        ),
        "/xrpc/_health" => ws::json_response(200, &json!({"version": "fakenet"})),
        "/xrpc/com.atproto.sync.getRepoStatus" => match req.param("did").and_then(|d| repos.get(d).map(|r| (d, r))) {
            Some((did, r)) if &r.host == name => {
                ws::json_response(200, &json!({"did": did, "active": r.active, "status": r.status, "rev": r.rev}))
            }
            _ => not_found("no such repo on this host"),
        },
        "/xrpc/com.atproto.sync.getLatestCommit" => match req.param("did").and_then(|d| repos.get(d)) {
            Some(r) if &r.host == name && r.head.is_some() => {
                ws::json_response(200, &json!({"cid": r.head, "rev": r.rev}))
            }
            _ => not_found("no commit for this repo on this host"),
        },
        "/xrpc/com.atproto.sync.listRepos" => {
            let limit: usize = req.param("limit").and_then(|l| l.parse().ok()).unwrap_or(500).clamp(1, 1000);
            let cursor = req.param("cursor").unwrap_or("");
            let mut dids: Vec<&String> =
                repos.iter().filter(|(d, r)| &r.host == name && d.as_str() > cursor).map(|(d, _)| d).collect();
            dids.sort();
            dids.truncate(limit);
            let list: Vec<serde_json::Value> = dids
                .iter()
                .map(|d| {
                    let r = &repos[*d];
                    json!({"did": d, "head": r.head, "rev": r.rev, "active": r.active, "status": r.status})
                })
                .collect();
            let next = (dids.len() == limit).then(|| dids.last().map(|d| d.to_string())).flatten();
            ws::json_response(200, &json!({"repos": list, "cursor": next}))
        }
        _ => ws::json_response(404, &json!({"error": "NotFound", "message": path})),
    }
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

/// The directory: PLC documents, listHosts, control.
pub async fn serve_directory(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(Some(req)) = ws::read_request(&mut stream).await else { return };
            let resp = directory_endpoint(&shared, &req);
            let _ = stream.write_all(&resp).await;
        });
    }
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
            ws::json_response(200, &json!({"hosts": hosts}))
        }
        "/_fakenet/fault" if req.method == "POST" => {
            let Some(fault) = req.param("kind").and_then(super::world::Fault::from_name) else {
                return ws::json_response(400, &json!({"error": "BadFault"}));
            };
            let host = req.param("host").map(str::to_owned);
            let _ = shared.control.lock().expect("control").send(ControlRequest { fault, host });
            ws::json_response(200, &json!({"ok": true}))
        }
        "/_fakenet/status" => ws::json_response(
            200,
            &json!({
                "events": shared.events.load(Ordering::Relaxed),
                "done": shared.generation_done.load(Ordering::Relaxed),
                "hosts": shared.hosts.iter().map(|h| json!({
                    "name": h.name, "seq": h.last_seq(),
                    "connections": h.connections.load(Ordering::Relaxed),
                })).collect::<Vec<_>>(),
            }),
        ),
        path => {
            let did = path.trim_start_matches('/');
            match shared.docs.read().expect("docs").get(did) {
                Some(doc) if did.starts_with("did:plc:") => ws::json_response(200, doc),
                _ => ws::json_response(404, &json!({"message": "DID not registered"})),
            }
        }
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
            let resp = match (req.path.as_str(), shared.docs.read().expect("docs").get(&did)) {
                ("/.well-known/did.json", Some(doc)) => ws::json_response(200, doc),
                _ => ws::json_response(404, &serde_json::json!({"error": "NotFound"})),
            };
            let _ = stream.write_all(&resp).await;
        });
    }
}
