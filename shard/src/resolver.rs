//! Blocking lookups kept off the executor: DID documents (PLC directory,
//! did:web) and hostname resolution run on a small pool of helper threads,
//! fed by a bounded channel; the executor side keeps a bounded TTL cache
//! with negative entries and de-duplicates lookups in flight.

use futures::channel::oneshot;
use lru::LruCache;
use sluice_common::atproto::identity::Identity;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Jobs waiting for a helper thread.
const QUEUE_MAX: usize = 1024;
const POSITIVE_TTL: Duration = Duration::from_secs(3600);
const NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// DID documents larger than this are refused.
const DOC_BYTES_MAX: u64 = 64 * 1024;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    /// `transient`: the directory or network failed (retry later), as
    /// opposed to a document that is missing or invalid.
    #[error("{did}: {why}")]
    Did { did: String, why: String, transient: bool },
    #[error("resolving {host}: {why}")]
    Host { host: String, why: String },
    #[error("identity helper threads are gone")]
    Gone,
}

/// A DID document as fetched, and when.
#[derive(Debug)]
pub struct Resolved {
    pub identity: Identity,
    /// When the request that fetched it was sent (unix micros): the
    /// document is at least this recent (`EventRecord::identity_micros`).
    pub fetched_micros: i64,
}

impl std::ops::Deref for Resolved {
    type Target = Identity;
    fn deref(&self) -> &Identity {
        &self.identity
    }
}

type Lookup = Result<Arc<Resolved>, ResolveError>;

enum Job {
    Did { did: String, reply: oneshot::Sender<Lookup> },
    Host { host: String, reply: oneshot::Sender<Result<Vec<SocketAddr>, ResolveError>> },
}

/// A cached lookup and when it was made.
type Cached = (Lookup, Instant);

type Waiters = Vec<oneshot::Sender<Lookup>>;

/// Executor-side handle (one per shard; `Rc`, not `Send`).
pub struct Resolver {
    tx: flume::Sender<Job>,
    cache: RefCell<LruCache<String, Cached>>,
    inflight: RefCell<HashMap<String, Waiters>>,
}

fn helper(rx: flume::Receiver<Job>, plc_url: String, insecure: bool) {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .redirects(2)
        .build();
    while let Ok(job) = rx.recv() {
        match job {
            Job::Did { did, reply } => {
                let fetched_micros = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as i64);
                let r = fetch_did(&agent, &plc_url, insecure, &did)
                    .map(|identity| Arc::new(Resolved { identity, fetched_micros }));
                let _ = reply.send(r);
            }
            Job::Host { host, reply } => {
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
                    .map_err(|why| ResolveError::Host { host: host.clone(), why });
                let _ = reply.send(r);
            }
        }
    }
}

/// Where a DID's document lives.
pub fn did_document_url(plc_url: &str, insecure: bool, did: &str) -> Option<String> {
    if did.starts_with("did:plc:") {
        return Some(format!("{}/{did}", plc_url.trim_end_matches('/')));
    }
    let host = did.strip_prefix("did:web:")?;
    if host.contains(':') || host.contains('/') {
        return None; // paths are not allowed for atproto did:web
    }
    let host = host.replace("%3A", ":").replace("%3a", ":");
    let local = host.starts_with("localhost") || host.starts_with("127.");
    let scheme = if insecure && local { "http" } else { "https" };
    Some(format!("{scheme}://{host}/.well-known/did.json"))
}

fn fetch_did(agent: &ureq::Agent, plc_url: &str, insecure: bool, did: &str) -> Result<Identity, ResolveError> {
    let err = |why: String| ResolveError::Did { did: did.to_owned(), why, transient: false };
    let url = did_document_url(plc_url, insecure, did).ok_or_else(|| err("unsupported DID method".into()))?;
    let resp = agent.get(&url).call().map_err(|e| {
        let transient = match &e {
            ureq::Error::Status(code, _) => *code >= 500 || *code == 429,
            ureq::Error::Transport(_) => true,
        };
        ResolveError::Did { did: did.to_owned(), why: format!("GET {url}: {e}"), transient }
    })?;
    let mut body = Vec::new();
    // A body cut short is the network's fault, not the document's: transient
    // (retried, not cached), or the account's events would be dropped.
    std::io::Read::read_to_end(&mut std::io::Read::take(resp.into_reader(), DOC_BYTES_MAX + 1), &mut body)
        .map_err(|e| ResolveError::Did { did: did.to_owned(), why: format!("reading {url}: {e}"), transient: true })?;
    if body.len() as u64 > DOC_BYTES_MAX {
        return Err(err("document too large".into()));
    }
    Identity::from_did_document(&body, Some(did)).map_err(|e| err(e.to_string()))
}

impl ResolveError {
    pub fn is_transient(&self) -> bool {
        match self {
            ResolveError::Did { transient, .. } => *transient,
            ResolveError::Host { .. } | ResolveError::Gone => true,
        }
    }
}

impl Resolver {
    pub fn new(plc_url: &str, insecure: bool, threads: usize, cache_entries: usize) -> std::io::Result<Rc<Resolver>> {
        let (tx, rx) = flume::bounded(QUEUE_MAX);
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let plc = plc_url.to_owned();
            std::thread::Builder::new().name(format!("resolver-{i}")).spawn(move || helper(rx, plc, insecure))?;
        }
        Ok(Rc::new(Resolver {
            tx,
            cache: RefCell::new(LruCache::new(NonZeroUsize::new(cache_entries.max(16)).expect("positive"))),
            inflight: RefCell::new(HashMap::new()),
        }))
    }

    /// The DID's identity; `fresh` bypasses the cache (after a failed check,
    /// or an `#identity` event).
    pub async fn did(&self, did: &str, fresh: bool) -> Lookup {
        if !fresh {
            if let Some((r, at)) = self.cache.borrow_mut().get(did) {
                let ttl = if r.is_ok() { POSITIVE_TTL } else { NEGATIVE_TTL };
                if at.elapsed() < ttl {
                    return r.clone();
                }
            }
        }
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut inflight = self.inflight.borrow_mut();
            match inflight.get_mut(did) {
                Some(w) => {
                    w.push(tx);
                    false
                }
                None => {
                    inflight.insert(did.to_owned(), vec![tx]);
                    true
                }
            }
        };
        if first {
            let (jtx, jrx) = oneshot::channel();
            let r = match self.tx.send_async(Job::Did { did: did.to_owned(), reply: jtx }).await {
                Ok(()) => jrx.await.unwrap_or(Err(ResolveError::Gone)),
                Err(_) => Err(ResolveError::Gone),
            };
            // Transient failures are not cached: the next event asks again.
            if !r.as_ref().err().is_some_and(ResolveError::is_transient) {
                self.cache.borrow_mut().put(did.to_owned(), (r.clone(), Instant::now()));
            }
            for w in self.inflight.borrow_mut().remove(did).unwrap_or_default() {
                let _ = w.send(r.clone());
            }
        }
        rx.await.unwrap_or(Err(ResolveError::Gone))
    }

    pub fn forget(&self, did: &str) {
        self.cache.borrow_mut().pop(did);
    }

    /// Resolve `host` (a name, no port) to its addresses with `port`,
    /// IPv4 first.
    pub async fn host(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let (tx, rx) = oneshot::channel();
        self.tx.send_async(Job::Host { host: host.to_owned(), reply: tx }).await.map_err(|_| ResolveError::Gone)?;
        let mut v = rx.await.unwrap_or(Err(ResolveError::Gone))?;
        for a in &mut v {
            a.set_port(port);
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot HTTP server answering `status` to every request.
    fn serve(status: u16) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().take(4) {
                let Ok(mut s) = s else { continue };
                let mut buf = [0u8; 1024];
                let _ = std::io::Read::read(&mut s, &mut buf);
                let resp = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}");
                let _ = std::io::Write::write_all(&mut s, resp.as_bytes());
            }
        });
        format!("http://{addr}")
    }

    #[test]
    fn failures_are_transient_or_permanent() {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
        let e = fetch_did(&agent, &serve(500), false, "did:plc:abc").unwrap_err();
        assert!(e.is_transient(), "{e}");
        let e = fetch_did(&agent, &serve(404), false, "did:plc:abc").unwrap_err();
        assert!(!e.is_transient(), "{e}");
        // A 200 with a document that is not one: permanent.
        let e = fetch_did(&agent, &serve(200), false, "did:plc:abc").unwrap_err();
        assert!(!e.is_transient(), "{e}");
        // The body cut short (content-length promises more): transient.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cut = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut buf = [0u8; 1024];
                let _ = std::io::Read::read(&mut s, &mut buf);
                let _ = std::io::Write::write_all(&mut s, b"HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n{\"id\"");
            }
        });
        let e = fetch_did(&agent, &cut, false, "did:plc:abc").unwrap_err();
        assert!(e.is_transient(), "{e}");
        // Nobody listening: transient.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let e = fetch_did(&agent, &format!("http://{dead}"), false, "did:plc:abc").unwrap_err();
        assert!(e.is_transient(), "{e}");
    }

    #[test]
    fn document_urls() {
        assert_eq!(
            did_document_url("http://127.0.0.1:9/", false, "did:plc:abc").as_deref(),
            Some("http://127.0.0.1:9/did:plc:abc")
        );
        assert_eq!(
            did_document_url("", true, "did:web:localhost%3A8080").as_deref(),
            Some("http://localhost:8080/.well-known/did.json")
        );
        assert_eq!(
            did_document_url("", false, "did:web:localhost%3A8080").as_deref(),
            Some("https://localhost:8080/.well-known/did.json")
        );
        assert_eq!(
            did_document_url("", true, "did:web:example.com").as_deref(),
            Some("https://example.com/.well-known/did.json")
        );
        assert_eq!(did_document_url("", true, "did:key:z6Mk"), None);
    }
}
