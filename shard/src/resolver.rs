//! What a shard knows of identities, and how it asks for more, without
//! ever blocking its executor.
//!
//! - The cache ([`crate::idcache`]) answers synchronously: a hit validates
//!   an event on the spot.
//! - A miss, or an event that needs a fresher document (an `#identity`, a
//!   commit whose signature fails, a document naming another PDS), asks
//!   the db-writer's identity service over the identity socket
//!   (`ipc::idwire`): one request per DID and kind in flight in this
//!   shard ([`Slot`]s are shared), answered in any order. The service
//!   dedupes across shards, stores, paces the directory.
//! - A helper thread keeps the socket: it reconnects when the db-writer
//!   restarts and sends every unanswered request again; another reads the
//!   answers and the service's pushed changes into a channel a task of
//!   the executor drains.
//! - Unresolved DIDs are remembered (bounded) until the service's retry
//!   time, so their events are dropped without asking again.
//! - Host names (for connecting upstream) are resolved by two helper
//!   threads behind a bounded queue.

use crate::idcache::{Entry, IdCache};
use futures::channel::oneshot;
use sluice_common::atproto::crypto::{CompactKey, PublicKey, SigError};
use sluice_common::atproto::did::DidKey;
use sluice_common::atproto::identity::PdsHost;
use sluice_common::ipc::idwire::{read_msg, write_msg, Answer, IdentityRecord, Reason, Request, ToShard};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Host name lookups waiting for a helper thread.
const DNS_QUEUE_MAX: usize = 1024;
/// Requests waiting to be written to the identity socket.
const REQUEST_QUEUE_MAX: usize = 16_384;
/// Answers and pushes read and not yet taken by the executor.
const ANSWER_QUEUE_MAX: usize = 65_536;
/// Unresolved DIDs remembered at once (past it, the service's own memory
/// answers them).
const NEGATIVES_MAX: usize = 16_384;
/// Parsed P-256 keys kept (a P-256 key is parsed for each verification
/// otherwise: 15 us more).
const P256_PARSED_MAX: usize = 4096;
const RECONNECT_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, thiserror::Error)]
#[error("resolving {host}: {why}")]
pub struct DnsError {
    pub host: String,
    pub why: String,
}

/// An identity as a lookup found it.
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(Entry),
    Unresolved { why: Rc<str> },
}

/// A lookup in flight; events wait on it ([`Slot::wait`]).
#[derive(Default)]
pub struct Slot {
    result: RefCell<Option<Lookup>>,
    wakers: RefCell<Vec<Waker>>,
}

impl Slot {
    pub fn result(&self) -> Option<Lookup> {
        self.result.borrow().clone()
    }

    fn complete(&self, l: Lookup) {
        *self.result.borrow_mut() = Some(l);
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Resolves once the answer is in.
    pub fn wait(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.result.borrow().is_some() {
                return Poll::Ready(());
            }
            let mut ws = self.wakers.borrow_mut();
            if !ws.iter().any(|w| w.will_wake(cx.waker())) {
                ws.push(cx.waker().clone());
            }
            Poll::Pending
        })
    }
}

/// What the cache says of a DID now.
#[derive(Debug, Clone)]
pub enum Cached {
    Hit(Entry),
    /// Unresolved until the service's retry time.
    Unresolved(Rc<str>),
    Miss,
}

/// A request the executor waits for: its slot, the DID's cache key, and
/// the asking host (its share of the cache; its PDS hash).
struct Asked {
    slot: Rc<Slot>,
    did: DidKey,
    owner: i64,
    host_pds: u64,
    reason: Reason,
}

/// Executor-side handle (one per shard; `Rc`, not `Send`).
pub struct Resolver {
    cache: RefCell<IdCache>,
    negatives: RefCell<HashMap<DidKey, (Instant, Rc<str>)>>,
    /// In flight, by DID and reason.
    inflight: RefCell<HashMap<(DidKey, Reason), Rc<Slot>>>,
    asked: RefCell<HashMap<u64, Asked>>,
    next_id: Cell<u64>,
    requests: flume::Sender<Request>,
    dns: flume::Sender<DnsJob>,
    p256: RefCell<lru::LruCache<[u8; 33], PublicKey>>,
}

impl Resolver {
    /// Start the helper threads; `answers` must then be drained by
    /// [`Resolver::serve_answers`] on the executor.
    pub fn new(socket: PathBuf, cache_bytes: u64) -> std::io::Result<(Rc<Resolver>, flume::Receiver<ToShard>)> {
        let (req_tx, req_rx) = flume::bounded::<Request>(REQUEST_QUEUE_MAX);
        let (ans_tx, ans_rx) = flume::bounded::<ToShard>(ANSWER_QUEUE_MAX);
        start_client(socket, req_rx, ans_tx)?;
        let (dns_tx, dns_rx) = flume::bounded(DNS_QUEUE_MAX);
        for i in 0..2 {
            let rx = dns_rx.clone();
            std::thread::Builder::new().name(format!("dns-{i}")).spawn(move || dns_helper(rx))?;
        }
        let r = Resolver {
            cache: RefCell::new(IdCache::new(cache_bytes)),
            negatives: RefCell::new(HashMap::new()),
            inflight: RefCell::new(HashMap::new()),
            asked: RefCell::new(HashMap::new()),
            next_id: Cell::new(1),
            requests: req_tx,
            dns: dns_tx,
            p256: RefCell::new(lru::LruCache::new(std::num::NonZeroUsize::new(P256_PARSED_MAX).expect("positive"))),
        };
        Ok((Rc::new(r), ans_rx))
    }

    pub fn key(&self, did: &str) -> DidKey {
        self.cache.borrow().key(did)
    }

    pub fn pds_hash(&self, host_name: &str) -> u64 {
        self.cache.borrow().pds_hash(host_name)
    }

    /// Resize the cache (`limits.identity_cache_bytes` reloaded).
    pub fn set_cache_bytes(&self, bytes: u64) {
        self.cache.borrow_mut().set_capacity_bytes(bytes);
    }

    /// (entries, bytes) of the cache.
    pub fn cache_size(&self) -> (usize, usize) {
        let c = self.cache.borrow();
        (c.len(), c.bytes())
    }

    pub fn cached(&self, k: &DidKey) -> Cached {
        if let Some(e) = self.cache.borrow_mut().get(k) {
            return Cached::Hit(e);
        }
        let mut neg = self.negatives.borrow_mut();
        match neg.get(k) {
            Some((until, why)) if *until > Instant::now() => Cached::Unresolved(why.clone()),
            Some(_) => {
                neg.remove(k);
                Cached::Miss
            }
            None => Cached::Miss,
        }
    }

    /// Ask the identity service about `did` (or join the request in
    /// flight). `host_pds`: [`Resolver::pds_hash`] of the asking host, whose
    /// id is `owner`.
    pub fn request(
        &self,
        did: &str,
        k: DidKey,
        owner: i64,
        host_pds: u64,
        reason: Reason,
        received_micros: i64,
    ) -> Rc<Slot> {
        if let Some(s) = self.inflight.borrow().get(&(k, reason)) {
            return s.clone();
        }
        let slot = Rc::new(Slot::default());
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let req = Request { id, did: did.to_owned(), host_id: owner, reason, received_micros };
        self.inflight.borrow_mut().insert((k, reason), slot.clone());
        self.asked.borrow_mut().insert(id, Asked { slot: slot.clone(), did: k, owner, host_pds, reason });
        if let Err(flume::TrySendError::Full(req)) = self.requests.try_send(req) {
            // The socket's queue is full (a db-writer that does not read):
            // the request waits in a task of its own, its event behind it.
            // As many as the hosts' windows hold, at most.
            let tx = self.requests.clone();
            glommio::spawn_local(async move {
                let _ = tx.send_async(req).await;
            })
            .detach();
        }
        slot
    }

    /// A background refresh nobody waits for (an `#identity` whose stored
    /// document names its host already).
    pub fn refresh(&self, did: &str, k: DidKey, owner: i64, host_pds: u64, received_micros: i64) {
        let _ = self.request(did, k, owner, host_pds, Reason::Identity, received_micros);
    }

    /// Take the service's messages as they come (a task of the executor).
    pub async fn serve_answers(self: Rc<Resolver>, answers: flume::Receiver<ToShard>) {
        while let Ok(m) = answers.recv_async().await {
            match m {
                ToShard::Answer { id, answer } => self.answered(id, answer),
                ToShard::Changed(rec) => {
                    let k = self.key(&rec.did);
                    let e = self.entry_of(&rec);
                    self.cache.borrow_mut().update(&k, e);
                }
            }
        }
    }

    fn entry_of(&self, rec: &IdentityRecord) -> Entry {
        let pds =
            rec.pds.as_deref().and_then(PdsHost::from_endpoint).map_or(0, |p| self.cache.borrow().pds_hash(&p.name));
        Entry { key: rec.compact_key(), pds, as_of_micros: rec.as_of_micros }
    }

    fn answered(&self, id: u64, answer: Answer) {
        let Some(a) = self.asked.borrow_mut().remove(&id) else { return };
        self.inflight.borrow_mut().remove(&(a.did, a.reason));
        let l = match answer {
            Answer::Found(rec) => {
                let e = self.entry_of(&rec);
                // Cached only for the host the document names: a host's
                // events about other hosts' accounts cannot fill the cache.
                if e.pds == a.host_pds {
                    self.cache.borrow_mut().insert(a.did, e, a.owner);
                } else {
                    self.cache.borrow_mut().update(&a.did, e);
                }
                Lookup::Found(e)
            }
            Answer::Unresolved { retry_after_ms, why, .. } => {
                let why: Rc<str> = Rc::from(why);
                let mut neg = self.negatives.borrow_mut();
                if neg.len() >= NEGATIVES_MAX {
                    let now = Instant::now();
                    neg.retain(|_, (until, _)| *until > now);
                }
                if neg.len() < NEGATIVES_MAX {
                    neg.insert(a.did, (Instant::now() + Duration::from_millis(retry_after_ms), why.clone()));
                }
                Lookup::Unresolved { why }
            }
        };
        a.slot.complete(l);
    }

    /// Verify a signature with a cached key (P-256 keys parsed once, kept).
    pub fn verify(&self, key: &CompactKey, digest: &[u8; 32], sig: &[u8]) -> Result<(), SigError> {
        match key {
            CompactKey::K256(_) => key.verify_digest(digest, sig),
            CompactKey::P256(point) => {
                let mut cache = self.p256.borrow_mut();
                let pk = cache.get_or_insert(*point, || key.to_public_key());
                pk.verify_digest(digest, sig)
            }
        }
    }

    /// Resolve `host` (a name, no port) to its addresses with `port`,
    /// IPv4 first.
    pub async fn host(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, DnsError> {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let gone = || DnsError { host: host.to_owned(), why: "DNS helper threads are gone".into() };
        let (tx, rx) = oneshot::channel();
        self.dns.send_async((host.to_owned(), tx)).await.map_err(|_| gone())?;
        let mut v = rx.await.unwrap_or_else(|_| Err(gone()))?;
        for a in &mut v {
            a.set_port(port);
        }
        Ok(v)
    }
}

type DnsJob = (String, oneshot::Sender<Result<Vec<SocketAddr>, DnsError>>);

fn dns_helper(rx: flume::Receiver<DnsJob>) {
    while let Ok((host, reply)) = rx.recv() {
        let r = (host.as_str(), 0)
            .to_socket_addrs()
            .map_err(|e| e.to_string())
            .and_then(|a| {
                let mut v: Vec<SocketAddr> = a.collect();
                // IPv4 first: loopback services often bind 127.0.0.1 only.
                v.sort_by_key(|a| a.is_ipv6());
                if v.is_empty() {
                    Err("no address".to_owned())
                } else {
                    Ok(v)
                }
            })
            .map_err(|why| DnsError { host: host.clone(), why });
        let _ = reply.send(r);
    }
}

/// The socket to the identity service and the requests not yet answered
/// (sent again on every new connection).
struct Client {
    socket: PathBuf,
    stream: Mutex<Option<std::os::unix::net::UnixStream>>,
    unanswered: Mutex<HashMap<u64, Request>>,
}

/// The writer thread (requests out) and the reader thread (connects,
/// reconnects, sends the unanswered again, reads answers in).
fn start_client(
    socket: PathBuf,
    requests: flume::Receiver<Request>,
    answers: flume::Sender<ToShard>,
) -> std::io::Result<()> {
    let c = Arc::new(Client { socket, stream: Mutex::new(None), unanswered: Mutex::new(HashMap::new()) });
    let w = c.clone();
    std::thread::Builder::new().name("identity-client-out".into()).spawn(move || {
        let mut scratch = Vec::new();
        for req in requests.iter() {
            w.unanswered.lock().unwrap_or_else(|p| p.into_inner()).insert(req.id, req.clone());
            let mut s = w.stream.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(st) = s.as_mut() {
                if write_msg(st, &req, &mut scratch).is_err() {
                    // The reader reconnects and sends it again.
                    *s = None;
                }
            }
        }
    })?;
    std::thread::Builder::new().name("identity-client-in".into()).spawn(move || {
        let mut logged = false;
        loop {
            let Some(mut rd) = c.connect(&mut logged) else { return };
            let mut buf = Vec::new();
            while let Ok(Some(m)) = read_msg::<ToShard>(&mut rd, &mut buf) {
                if let ToShard::Answer { id, .. } = &m {
                    c.unanswered.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
                }
                if answers.send(m).is_err() {
                    return;
                }
            }
            *c.stream.lock().unwrap_or_else(|p| p.into_inner()) = None;
            std::thread::sleep(RECONNECT_EVERY);
        }
    })?;
    Ok(())
}

impl Client {
    /// Connect (every [`RECONNECT_EVERY`] until it works), hand the writer
    /// its half, and send what was not answered. None: the process ends.
    fn connect(&self, logged: &mut bool) -> Option<std::os::unix::net::UnixStream> {
        loop {
            match std::os::unix::net::UnixStream::connect(&self.socket) {
                Ok(s) => {
                    let Ok(mut w) = s.try_clone() else { continue };
                    let mut g = self.stream.lock().unwrap_or_else(|p| p.into_inner());
                    let mut pending: Vec<Request> =
                        self.unanswered.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
                    pending.sort_by_key(|r| r.id);
                    let mut scratch = Vec::new();
                    if pending.iter().all(|r| write_msg(&mut w, r, &mut scratch).is_ok()) {
                        *g = Some(w);
                        if *logged {
                            tracing::info!(resent = pending.len(), "identity service reachable again");
                            *logged = false;
                        }
                        return Some(s);
                    }
                }
                Err(e) if !*logged => {
                    tracing::debug!(error = %e, socket = %self.socket.display(), "identity service not reachable yet");
                    *logged = true;
                }
                Err(_) => {}
            }
            std::thread::sleep(RECONNECT_EVERY);
        }
    }
}
