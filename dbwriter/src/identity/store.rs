//! The identity store's thread: its own Postgres connection, batching what
//! the service asks (loads of many DIDs in one query, saves in one
//! statement, the export's operations and cursor in one transaction).
//! When Postgres goes away it reconnects every second and does the batch
//! again; the service waits meanwhile (so do the events behind it).

use super::Event;
use crate::db;
use sluice_common::ipc::idwire::IdentityRecord;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Jobs taken in one batch at most.
const BATCH_MAX: usize = 4096;

#[derive(Debug)]
pub enum StoreJob {
    /// What is stored for this DID (answered with [`Event::Loaded`]).
    Load(String),
    Save(IdentityRecord),
    Delete(String),
    /// Apply a page of the PLC export (answered with
    /// [`Event::ExportApplied`]).
    ApplyExport(ExportBatch),
}

#[derive(Debug)]
pub struct ExportBatch {
    /// The latest operation per DID of the page, as records.
    pub ops: Vec<IdentityRecord>,
    pub tombstones: Vec<(String, i64)>,
    pub cursor: String,
    /// The page was full: more wait.
    pub full: bool,
    /// When the request for the page was sent (unix micros).
    pub sent_micros: i64,
}

/// Start the thread; it sends the stored export cursor first
/// ([`Event::Cursor`]), then serves `jobs` until they end or `stop`.
pub fn start(
    database_url: String,
    jobs: flume::Receiver<StoreJob>,
    events: flume::Sender<Event>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("identity-store".into()).spawn(move || {
        let mut store = Store { url: database_url, pg: None, stop };
        let Some(cursor) = store.retry(|pg, _| db::plc_cursor(pg)) else { return };
        if events.send(Event::Cursor(cursor)).is_err() {
            return;
        }
        while !store.stop.load(Ordering::Acquire) {
            let first = match jobs.recv_timeout(Duration::from_millis(200)) {
                Ok(j) => j,
                Err(flume::RecvTimeoutError::Timeout) => continue,
                Err(flume::RecvTimeoutError::Disconnected) => return,
            };
            let batch: Vec<StoreJob> = std::iter::once(first).chain(jobs.try_iter().take(BATCH_MAX - 1)).collect();
            if !store.run(batch, &events) {
                return;
            }
        }
    })
}

struct Store {
    url: String,
    /// The connection and its prepared statements.
    pg: Option<(postgres::Client, db::IdentityStatements)>,
    stop: Arc<AtomicBool>,
}

impl Store {
    /// Run `f` until it succeeds (reconnecting every second), or the
    /// service stops (None).
    fn retry<T>(
        &mut self,
        mut f: impl FnMut(&mut postgres::Client, &db::IdentityStatements) -> Result<T, db::DbError>,
    ) -> Option<T> {
        let mut logged = false;
        while !self.stop.load(Ordering::Acquire) {
            let result = match self.pg.as_mut().filter(|(c, _)| !c.is_closed()) {
                Some((pg, s)) => f(pg, s),
                None => db::connect(&self.url).and_then(|mut c| {
                    let s = db::IdentityStatements::prepare(&mut c)?;
                    let (c, s) = self.pg.insert((c, s));
                    f(c, s)
                }),
            };
            match result {
                Ok(v) => return Some(v),
                // A failed connect or prepare is reported as a failed query is.
                Err(e) if !logged => {
                    tracing::warn!(error = %e, "identity store: Postgres failed; retrying every second");
                    logged = true;
                }
                Err(_) => {}
            }
            self.pg = None;
            std::thread::sleep(Duration::from_secs(1));
        }
        None
    }

    /// One batch in order of kind: saves and deletes, then loads, then
    /// export pages. False when the service is gone.
    fn run(&mut self, batch: Vec<StoreJob>, events: &flume::Sender<Event>) -> bool {
        let (mut loads, mut saves, mut deletes, mut exports) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for j in batch {
            match j {
                StoreJob::Load(d) => loads.push(d),
                StoreJob::Save(r) => saves.push(r),
                StoreJob::Delete(d) => deletes.push(d),
                StoreJob::ApplyExport(e) => exports.push(e),
            }
        }
        if !saves.is_empty() && self.retry(|pg, s| db::save_identities(pg, s, &saves)).is_none() {
            return false;
        }
        for d in &deletes {
            if self.retry(|pg, _| db::delete_identity(pg, d)).is_none() {
                return false;
            }
        }
        if !loads.is_empty() {
            loads.sort_unstable();
            loads.dedup();
            let refs: Vec<&str> = loads.iter().map(String::as_str).collect();
            let Some(mut found) = self.retry(|pg, s| db::load_identities(pg, s, &refs)) else { return false };
            let results = loads.into_iter().map(|d| (found.remove(&d), d)).map(|(r, d)| (d, r)).collect();
            if events.send(Event::Loaded(results)).is_err() {
                return false;
            }
        }
        for e in exports {
            let Some(changed) = self.retry(|pg, _| db::apply_plc_ops(pg, &e.ops, &e.tombstones, &e.cursor)) else {
                return false;
            };
            let applied = Event::ExportApplied { changed, cursor: e.cursor, full: e.full, sent_micros: e.sent_micros };
            if events.send(applied).is_err() {
                return false;
            }
        }
        true
    }
}
