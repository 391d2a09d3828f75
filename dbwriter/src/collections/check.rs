//! Asking PDSes which collections an account holds
//! (`com.atproto.repo.describeRepo`), for the accounts in
//! `collection_checks`: a `#sync`, a repo first seen mid-history, a delete
//! its slice does not decide, the backfill. The answer is pinned to a rev:
//! the repo's latest commit (`sync.getLatestCommit`) is read before and
//! after describeRepo, and an answer whose two revs differ is asked again.
//! The sequencer applies an answer only if the account's rev there is not
//! newer (commits up to the answer's rev that arrive later each restate
//! the collections they touch, so the end state is the repo's); an older
//! answer is asked again.
//!
//! Threads: one scanner (its own Postgres connection: reads the table in
//! key order, round and round, and moves the backfill on while few checks
//! wait) and [`WORKERS`] askers. Bounded: [`JOBS_QUEUED`] jobs between
//! them, a rate per host (`collection_checks_per_host_per_second`), a job
//! sent is not sent again for [`RESEND_AFTER`], [`TIMEOUT`] a request.

use crate::db::{self, CheckJob};
use sluice_common::atproto::did::DidKey;
use sluice_common::ipc::shm::{CollectionStat, ControlBlock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const WORKERS: usize = 4;
pub const JOBS_QUEUED: usize = 64;
pub const RESEND_AFTER: Duration = Duration::from_secs(10);
pub const TIMEOUT: Duration = Duration::from_secs(15);
/// Rows read from `collection_checks` at a time.
pub const SCAN_ROWS: i64 = 500;
/// The backfill queues more only while fewer checks than this wait.
pub const BACKFILL_WAITING_MAX: i64 = 5_000;
/// Collections one answer may name (more: the answer is refused).
pub const ANSWER_COLLECTIONS_MAX: usize = 10_000;

/// What a PDS said of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Its collections.
    Collections(Vec<String>),
    /// The PDS does not have it (or it is not active there): nothing to
    /// place; the listing leaves it out by its status anyway.
    Gone,
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub key: DidKey,
    pub did: String,
    /// The repo's rev the answer is true at (`syntax::tid_value`; None
    /// for `Found::Gone`).
    pub rev: Option<u64>,
    pub found: Found,
}

/// Parse a describeRepo answer for `did`.
pub fn parse(did: &str, body: &str) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    if v["did"].as_str() != Some(did) {
        return None;
    }
    let list = v["collections"].as_array()?;
    if list.len() > ANSWER_COLLECTIONS_MAX {
        return None;
    }
    Some(
        list.iter()
            .filter_map(|c| c.as_str())
            .filter(|c| sluice_common::atproto::syntax::is_nsid(c))
            .map(str::to_owned)
            .collect(),
    )
}

/// A per-host token bucket.
struct Rate {
    per_second: f64,
    hosts: HashMap<i64, (f64, Instant)>,
}

impl Rate {
    fn take(&mut self, host: i64, now: Instant) -> bool {
        let cap = self.per_second.max(1.0);
        let (tokens, at) = self.hosts.entry(host).or_insert((cap, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(cap);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct Checker {
    pub answers: flume::Receiver<Answer>,
    pub threads: Vec<std::thread::JoinHandle<()>>,
}

/// Start the scanner and the askers.
pub fn start(
    database_url: String,
    tls: Arc<rustls::ClientConfig>,
    per_host_per_second: f64,
    control: Arc<ControlBlock>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<Checker> {
    let (job_tx, job_rx) = flume::bounded::<CheckJob>(JOBS_QUEUED);
    // Answers are few (rate-limited); the bound only keeps a stalled
    // sequencer from growing it.
    let (ans_tx, ans_rx) = flume::bounded::<Answer>(4096);
    let mut threads = Vec::new();
    for i in 0..WORKERS {
        let (rx, tx, tls, cb, stop) = (job_rx.clone(), ans_tx.clone(), tls.clone(), control.clone(), stop.clone());
        threads.push(std::thread::Builder::new().name(format!("collections-ask-{i}")).spawn(move || {
            let agent = ureq::AgentBuilder::new().timeout(TIMEOUT).redirects(0).tls_config(tls).build();
            while !stop.load(Ordering::Acquire) {
                let Ok(job) = rx.recv_timeout(Duration::from_millis(200)) else { continue };
                if let Some(a) = ask(&agent, &job, &cb) {
                    if tx.send(a).is_err() {
                        return;
                    }
                }
            }
        })?);
    }
    let cb = control;
    threads.push(std::thread::Builder::new().name("collections-scan".into()).spawn(move || {
        let mut rate = Rate { per_second: per_host_per_second, hosts: HashMap::new() };
        let mut sent: HashMap<DidKey, Instant> = HashMap::new();
        while !stop.load(Ordering::Acquire) {
            if let Err(e) = scan(&database_url, &job_tx, &mut rate, &mut sent, &cb, &stop) {
                tracing::warn!(error = %e, "collection checks: scan failed; again in 5 s");
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    })?);
    Ok(Checker { answers: ans_rx, threads })
}

/// What one request to the PDS gave.
enum Got<T> {
    Ok(T),
    /// 400/404: no such (active) repo there.
    Gone,
    Failed,
}

/// GET `method` of the job's PDS with `param`, its body parsed by `parse`.
fn get<T>(agent: &ureq::Agent, job: &CheckJob, method: &str, param: &str, parse: impl Fn(&str) -> Option<T>) -> Got<T> {
    let scheme = if job.insecure { "http" } else { "https" };
    let url = format!("{scheme}://{}/xrpc/{method}", job.hostname);
    match agent.get(&url).query(param, &job.did).call() {
        Ok(resp) => match resp.into_string().ok().and_then(|b| parse(&b)) {
            Some(v) => Got::Ok(v),
            None => {
                tracing::debug!(did = job.did, host = job.hostname, method, "unusable answer");
                Got::Failed
            }
        },
        Err(ureq::Error::Status(400 | 404, _)) => Got::Gone,
        Err(e) => {
            tracing::debug!(did = job.did, host = job.hostname, method, error = %e, "request failed");
            Got::Failed
        }
    }
}

/// A getLatestCommit answer's rev, as its number.
fn latest_rev(body: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    sluice_common::atproto::syntax::tid_value(v["rev"].as_str()?)
}

/// One asker's request: rev, collections, rev again.
fn ask(agent: &ureq::Agent, job: &CheckJob, cb: &ControlBlock) -> Option<Answer> {
    let count = |s| cb.collection_stat(s).fetch_add(1, Ordering::Relaxed);
    let answer = |rev, found| Some(Answer { key: job.key, did: job.did.clone(), rev, found });
    let before = get(agent, job, "com.atproto.sync.getLatestCommit", "did", latest_rev);
    let list = get(agent, job, "com.atproto.repo.describeRepo", "repo", |b| parse(&job.did, b));
    let after = get(agent, job, "com.atproto.sync.getLatestCommit", "did", latest_rev);
    match (before, list, after) {
        (Got::Ok(a), Got::Ok(list), Got::Ok(b)) if a == b => {
            count(CollectionStat::CheckOk);
            answer(Some(a), Found::Collections(list))
        }
        (_, Got::Gone, _) => {
            count(CollectionStat::CheckGone);
            answer(None, Found::Gone)
        }
        _ => {
            // Failed, or the repo moved on meanwhile: asked again later.
            count(CollectionStat::CheckFailed);
            None
        }
    }
}

/// One pass over `collection_checks`, and a backfill step.
fn scan(
    url: &str,
    jobs: &flume::Sender<CheckJob>,
    rate: &mut Rate,
    sent: &mut HashMap<DidKey, Instant>,
    cb: &ControlBlock,
    stop: &AtomicBool,
) -> Result<(), db::DbError> {
    let mut c = db::connect(url)?;
    let mut after = uuid::Uuid::nil();
    let mut dispatched = 0;
    while !stop.load(Ordering::Acquire) {
        let page = db::checks_after(&mut c, after, SCAN_ROWS)?;
        let now = Instant::now();
        sent.retain(|_, t| now.duration_since(*t) < RESEND_AFTER);
        for job in &page {
            if sent.contains_key(&job.key) || !rate.take(job.host_id, now) {
                continue;
            }
            sent.insert(job.key, now);
            dispatched += 1;
            if jobs.send(job.clone()).is_err() {
                return Ok(());
            }
        }
        match page.last() {
            Some(j) if page.len() as i64 == SCAN_ROWS => after = uuid::Uuid::from_bytes(j.key.0),
            _ => {
                // A pass ended: the backfill moves on while few wait.
                let waiting = db::checks_waiting(&mut c)?;
                cb.collection_stat(CollectionStat::ChecksWaiting).store(waiting as u64, Ordering::Relaxed);
                if waiting < BACKFILL_WAITING_MAX {
                    if let Some((_, true)) = db::backfill_step(&mut c, 1000)? {
                        tracing::info!("collection backfill: every account queued");
                    }
                }
                let (pos, _) = db::backfill_progress(&mut c)?;
                let permille = pos.map_or(0, |f| (f * 1000.0) as u64 + 1);
                cb.collection_stat(CollectionStat::BackfillPermille).store(permille, Ordering::Relaxed);
                if dispatched == 0 {
                    std::thread::sleep(Duration::from_millis(500));
                }
                after = uuid::Uuid::nil();
                dispatched = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_and_must_name_the_account() {
        let body = r#"{"did":"did:plc:a","handle":"a.test","collections":["app.bsky.feed.post","not an nsid"]}"#;
        assert_eq!(parse("did:plc:a", body), Some(vec!["app.bsky.feed.post".to_owned()]));
        assert_eq!(parse("did:plc:b", body), None);
        assert_eq!(parse("did:plc:a", r#"{"did":"did:plc:a"}"#), None);
        assert_eq!(parse("did:plc:a", "<html>"), None);
    }

    #[test]
    fn the_rate_is_per_host() {
        let mut r = Rate { per_second: 2.0, hosts: HashMap::new() };
        let t = Instant::now();
        assert!(r.take(1, t) && r.take(1, t));
        assert!(!r.take(1, t));
        assert!(r.take(2, t));
        assert!(r.take(1, t + Duration::from_millis(600)));
    }
}
