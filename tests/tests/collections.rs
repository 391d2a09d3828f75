//! listReposByCollection end to end: fakenet accounts create and delete
//! records across four collections (every account starts with posts, so
//! it holds that collection throughout; deletes empty the others now and
//! then), the relay keeps its index from the stream and asks the PDS
//! (describeRepo) about accounts first seen mid-history; the db-writer is
//! killed twice meanwhile. After the run, the endpoint's answer for every
//! collection equals what fakenet's repos hold. Paging while records
//! change never skips an account that held records throughout. Bad
//! parameters get the lexicon's errors. Then the index is emptied by hand
//! (as a relay from before it has none) and `sluice admin
//! collections-backfill` fills it again from the PDSes.

mod support;

use fakenet::runner::ServeConfig;
use fakenet::world::FaultRates;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use support::*;

const COLLECTIONS: [&str; 4] =
    ["app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.graph.follow", "app.bsky.feed.repost"];

/// Every page of `query` (at `limit` a page): the DIDs, in order.
fn all_pages(relay: &Relay, query: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    for _ in 0..10_000 {
        let path = format!("/xrpc/com.atproto.sync.listReposByCollection?{query}&limit={limit}{cursor}");
        let (st, body) = relay.http("GET", &path, "").unwrap();
        assert_eq!(st, 200, "{path}: {body}\n{}", relay.log_tail());
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let repos = v["repos"].as_array().unwrap();
        assert!(repos.len() <= limit);
        out.extend(repos.iter().map(|r| r["did"].as_str().unwrap().to_owned()));
        match v["cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return out,
        }
    }
    panic!("{query}: more than 10,000 pages");
}

/// What fakenet's repos hold now: collection -> active accounts with
/// records of it.
fn expected(net: &fakenet::runner::Running) -> BTreeMap<String, BTreeSet<String>> {
    let mut want: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (did, r) in net.shared.repos.read().unwrap().iter() {
        if r.active {
            for c in &r.collections {
                want.entry(c.clone()).or_default().insert(did.clone());
            }
        }
    }
    want
}

/// The collection index's metrics, for failure messages.
fn collection_metrics(relay: &Relay) -> String {
    metrics_page(relay).lines().filter(|l| l.starts_with("sluice_collections")).collect::<Vec<_>>().join("\n")
}

fn kill_db_writer(relay: &Relay) {
    let writers = children_matching(relay.pid(), "db-writer");
    assert_eq!(writers.len(), 1, "db-writer not found");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(writers[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    let t = Instant::now();
    while children_matching(relay.pid(), "db-writer").iter().all(|p| *p == writers[0]) {
        assert!(t.elapsed() < Duration::from_secs(30), "db-writer not restarted:\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Page every collection until the answer equals `want` (bounded).
fn wait_index(relay: &Relay, want: &BTreeMap<String, BTreeSet<String>>, what: &str) {
    let t = Instant::now();
    loop {
        let got: BTreeMap<String, BTreeSet<String>> = COLLECTIONS
            .iter()
            .map(|c| (c.to_string(), all_pages(relay, &format!("collection={c}"), 7).into_iter().collect()))
            .filter(|(_, v): &(String, BTreeSet<String>)| !v.is_empty())
            .collect();
        if got == *want {
            return;
        }
        if t.elapsed() > Duration::from_secs(90) {
            let empty = BTreeSet::new();
            for c in COLLECTIONS {
                let (g, w) = (got.get(c).unwrap_or(&empty), want.get(c).unwrap_or(&empty));
                eprintln!("{c}: listed but not held {:?}; held but not listed {:?}", g.difference(w), w.difference(g));
            }
            panic!("{what}: the index differs from the network\n{}\n{}", collection_metrics(relay), relay.log_tail());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn repos_by_collection_match_the_network_through_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("admin.pw");
    std::fs::write(&pw, "backfill-password").unwrap();
    let mut s = Setup::start_with(
        dir,
        ServeConfig {
            hosts: 2,
            accounts: 40,
            initial_records: 40,
            seed: 2301,
            rate: 250.0,
            max_events: Some(5_000),
            faults: FaultRates::none(),
            // did:web repos are listed too (collectiondir leaves them out).
            web_accounts: 3,
            ..ServeConfig::default()
        },
        2,
        // Chunks written whole every 40 changes: the test passes through
        // many compactions and crashes between them.
        &format!(
            "admin_password_file = {:?}\n[limits]\ncollection_checks_per_host_per_second = 50\n\
             collection_changes_max = 40",
            pw.to_string_lossy()
        ),
        |_| {},
    );
    let relay = &s.relay;
    bad_parameters(relay);
    wait_events(&s.net, 1_500);
    paging_while_records_change(relay);

    // Crashes of the db-writer mid-stream.
    kill_db_writer(relay);
    wait_events(&s.net, 3_500);
    kill_db_writer(relay);
    s.net.wait_generation().unwrap();

    // After the run (and the checks the crashes left): the index equals
    // the network's repos, for each collection and for all four at once.
    let want = expected(&s.net);
    wait_index(relay, &want, "after the run");
    let any: BTreeSet<String> =
        all_pages(relay, &COLLECTIONS.map(|c| format!("collection={c}")).join("&"), 11).into_iter().collect();
    assert_eq!(any, want.values().flatten().cloned().collect::<BTreeSet<String>>(), "several collections at once");
    assert!(any.iter().any(|d| d.starts_with("did:web:")), "no did:web repo listed: the test proves less than it says");
    assert!(
        metric(relay, "sluice_collections_changes_total{change=\"removed\"") > 0,
        "no account lost its last record of a collection: the test proves less than it says"
    );
    assert!(metric(relay, "sluice_collections_checks_total{outcome=\"ok\"") > 0, "no account was checked");

    backfill_refills(&mut s, &pw, &want);
    s.relay.stop();
}

/// Bad parameters: the lexicon's errors.
fn bad_parameters(relay: &Relay) {
    for q in [
        "",
        "collection=not%20an%20nsid",
        "collection=a.b.c&limit=0",
        "collection=a.b.c&limit=2001",
        "collection=a.b.c&limit=x",
        "collection=a.b.c&cursor=nope",
    ] {
        let (st, body) = relay.http("GET", &format!("/xrpc/com.atproto.sync.listReposByCollection?{q}"), "").unwrap();
        assert_eq!(st, 400, "{q}: {body}");
        assert!(body.contains("InvalidRequest"), "{q}: {body}");
    }
}

/// Paging while records change: accounts start with 40 posts each (a
/// run deletes a few), so an active account holds posts throughout; a
/// slow paging lists every account listed both before and after it.
fn paging_while_records_change(relay: &Relay) {
    let posts = "collection=app.bsky.feed.post";
    let before: BTreeSet<String> = all_pages(relay, posts, 500).into_iter().collect();
    assert!(before.len() >= 20, "few accounts placed ({}):\n{}", before.len(), collection_metrics(relay));
    let mut paged = Vec::new();
    let mut cursor = String::new();
    for _ in 0..1000 {
        let path = format!("/xrpc/com.atproto.sync.listReposByCollection?{posts}&limit=3{cursor}");
        let (_, body) = relay.http("GET", &path, "").unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        paged.extend(v["repos"].as_array().unwrap().iter().map(|r| r["did"].as_str().unwrap().to_owned()));
        std::thread::sleep(Duration::from_millis(40));
        match v["cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    let after: BTreeSet<String> = all_pages(relay, posts, 500).into_iter().collect();
    let unique: BTreeSet<String> = paged.iter().cloned().collect();
    assert_eq!(unique.len(), paged.len(), "an account twice while paging");
    let skipped: Vec<&String> = before.intersection(&after).filter(|d| !unique.contains(*d)).collect();
    assert!(skipped.is_empty(), "paging skipped accounts listed before and after it: {skipped:?}");
}

/// A relay whose accounts are not in the index (as one from before it):
/// the index emptied by hand while nothing flows (generation is over), a
/// restart (the db-writer reads it empty), then the backfill.
fn backfill_refills(s: &mut Setup, pw: &std::path::Path, want: &BTreeMap<String, BTreeSet<String>>) {
    let url = format!("host={} user=postgres dbname=postgres", s.dir.path().join("data/pgsock").display());
    let mut pg = postgres::Client::connect(&url, postgres::NoTls).expect("the relay's PostgreSQL");
    pg.batch_execute(
        "UPDATE accounts SET no = 0;
         TRUNCATE collections, collection_chunks, collection_changes, collection_checks",
    )
    .unwrap();
    drop(pg);
    s.relay.stop();
    s.relay.start();
    let relay = &s.relay;
    assert!(all_pages(relay, "collection=app.bsky.feed.post", 500).is_empty(), "the index was not emptied");
    let out = std::process::Command::new(sluice_bin())
        .args(["admin", "--url", &format!("http://127.0.0.1:{}", relay.port), "--password-file"])
        .arg(pw)
        .arg("collections-backfill")
        .output()
        .unwrap();
    assert!(out.status.success(), "collections-backfill: {}", String::from_utf8_lossy(&out.stderr));
    wait_index(relay, want, "after the backfill");
}
