//! The identity service: the relay's one place that asks identity
//! directories (the PLC directory, did:web hosts) anything, on behalf of
//! every shard. Shards ask over the identity socket (`ipc::idwire`) when
//! their own cache lacks a DID or an event needs a fresher document; the
//! service answers from the store (Postgres, `identities`) or the
//! directory, and pushes every change it learns to all shards.
//!
//! Behaviours:
//! - **One relay-wide lookup per DID.** Every request for a DID being
//!   resolved joins it, whichever shard asks.
//! - **Stored first.** A DID the store holds is answered from it without a
//!   directory request, however the relay or a shard restarted or
//!   resharded. A stored document past its TTL (`identity_plc_ttl_hours`,
//!   `identity_web_ttl_hours`) is answered at once and fetched again in
//!   the background.
//! - **Polite to the directory.** Requests to the PLC directory (documents
//!   and export pages together) keep to `plc_requests_per_second`
//!   relay-wide, paced (no bursts), at most `identity_fetch_concurrency`
//!   at once, over kept connections. A 429 or 503 pauses them all for its
//!   Retry-After, and at least a backoff that doubles from 1 s to 60 s
//!   while they repeat (plus up to a quarter at random); other failures
//!   pause them too. The requests already on their way when a pause began
//!   are one wave: their failures do not double it again. A DID is fetched
//!   at most once per [`REFETCH_MIN`] and never twice in a row for one
//!   event. DIDs waiting are served fairly by host ([`fair`]).
//! - **Following the directory instead of polling it** (`plc_export`): the
//!   service reads the PLC export from where it left off (its cursor in
//!   `relay_meta`; at the first start, from now) and applies each
//!   operation to the DIDs it stores, skipping the others. Once it has
//!   read to the end, every stored `did:plc` is known current as of that
//!   read, so an event that needs a fresh document (an `#identity`, a
//!   commit whose signature fails on the stored key, an event from a host
//!   the stored document does not name) waits for the next poll (about a
//!   second) instead of asking the directory about its DID. A failed read
//!   is tried again after the same jittered backoff as the pauses.
//! - **An unresolvable DID never holds a host back.** A permanent answer
//!   (not registered, tombstoned, an invalid document, a did:web name that
//!   does not exist or resolves to a refused address) is answered
//!   "unresolved" at once; a DID whose own document cannot be fetched (its
//!   did:web host fails; or the PLC directory fails for it while
//!   answering others) is answered so after `identity_wait_max_s`. Either
//!   way the shard drops the event (counted, `identity_unresolved`) and
//!   the DID is asked about again only after a backoff (1 minute,
//!   doubling to an hour). A PLC directory that fails for everyone (down,
//!   429s, 5xx bursts) is waited for: events wait behind it, the hosts
//!   are read more slowly, nothing is dropped for it.
//! - **Hostile identity traffic is bounded.** An `#identity` event whose
//!   stored document already names its host costs a directory request
//!   only if the DID was not fetched in the last [`IDENTITY_REFRESH_MIN`]
//!   and its host is within `identity_refreshes_per_host_per_second`;
//!   otherwise the stored document answers (counted as skipped).
//!
//! Threads: the service loop (all state, one closed set of [`Event`]s),
//! the store ([`store`]), the directory workers ([`fetch`]), the socket's
//! accept, reader and writer threads ([`socket`]).

pub mod fair;
pub mod fetch;
pub mod socket;
pub mod store;

mod service;

use sluice_common::ipc::idwire::{IdentityRecord, Request, ToShard};
use sluice_common::ipc::shm::ControlBlock;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

pub use service::{IDENTITY_REFRESH_MIN, REFETCH_MIN};
pub use socket::ConnId;

/// What the service runs with (from the config).
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub socket: PathBuf,
    pub database_url: String,
    pub plc_url: String,
    pub allow_insecure: bool,
    pub settings: sluice_common::process::config::IdentitySettings,
    pub refreshes_per_host_per_second: f64,
    pub tls: Arc<rustls::ClientConfig>,
}

/// What wakes the service loop.
#[derive(Debug)]
pub enum Event {
    Connected {
        conn: ConnId,
        out: flume::Sender<ToShard>,
    },
    Disconnected {
        conn: ConnId,
    },
    /// The store's export cursor, at start.
    Cursor(Option<String>),
    /// Stored identities of DIDs asked for (None: not stored).
    Loaded(Vec<(String, Option<IdentityRecord>)>),
    /// A directory answered (or failed) about a DID's document; the
    /// request was sent at `sent_micros`.
    Fetched {
        did: String,
        sent_micros: i64,
        result: Result<IdentityRecord, fetch::FetchError>,
    },
    /// An export page came (or failed).
    ExportPage {
        sent_micros: i64,
        result: Result<fetch::ExportPage, fetch::FetchError>,
    },
    /// The store applied a page: what changed.
    ExportApplied {
        changed: Vec<IdentityRecord>,
        cursor: String,
        full: bool,
        sent_micros: i64,
    },
    /// A reload: the new rate and waits.
    Settings {
        settings: sluice_common::process::config::IdentitySettings,
        refreshes_per_host_per_second: f64,
    },
}

/// The running service: its threads, and where a reload goes.
pub struct Handle {
    pub threads: Vec<std::thread::JoinHandle<()>>,
    pub events: flume::Sender<Event>,
}

/// Requests from the shards waiting for the service loop, at most.
pub const REQUEST_QUEUE_MAX: usize = 16_384;
/// DIDs being resolved at once, at most: past it the service takes no new
/// requests (they wait in the socket) until some are answered.
pub const PENDING_MAX: usize = 200_000;
/// The service loop's longest sleep (gauges are published at least this
/// often).
const TICK: Duration = Duration::from_millis(200);

/// Start the service: socket, store, workers, loop. They run until `stop`.
pub fn start(cfg: ServiceConfig, control: Arc<ControlBlock>, stop: Arc<AtomicBool>) -> anyhow::Result<Handle> {
    let (events_tx, events_rx) = flume::unbounded::<Event>();
    let (req_tx, req_rx) = flume::bounded::<(ConnId, Request)>(REQUEST_QUEUE_MAX);
    let (store_tx, store_rx) = flume::unbounded::<store::StoreJob>();
    let concurrency = cfg.settings.fetch_concurrency as usize;
    let (fetch_tx, fetch_rx) = flume::bounded::<service::FetchJob>(concurrency);
    let mut threads = vec![
        socket::listen(&cfg.socket, req_tx, events_tx.clone(), stop.clone())?,
        store::start(cfg.database_url.clone(), store_rx, events_tx.clone(), stop.clone())?,
    ];
    let dir = Arc::new(fetch::Directory::new(&cfg.plc_url, cfg.allow_insecure, cfg.tls.clone(), concurrency));
    for i in 0..concurrency {
        threads.push(service::start_worker(i, dir.clone(), fetch_rx.clone(), events_tx.clone(), control.clone())?);
    }
    let svc = service::Service::new(cfg, control, store_tx, fetch_tx);
    let s = stop.clone();
    threads.push(std::thread::Builder::new().name("identity".into()).spawn(move || svc.run(events_rx, req_rx, &s))?);
    Ok(Handle { threads, events: events_tx })
}
