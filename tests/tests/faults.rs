//! Faults inside the relay that must lose nothing: a ring record that does
//! not decode (the db-writer discards the ring and reads nothing more from
//! it until the shard's successor runs, so no host cursor passes a
//! discarded event), and a full disk (intake pauses, resumes by itself).

mod support;

use fakenet::runner::{self, ServeConfig};
use std::time::{Duration, Instant};
use support::*;

/// A garbage record mid-stream (failpoint `shard-ring-garbage`, once):
/// the ring is discarded, the shard restarts, and the stream is exact.
#[test]
fn a_corrupt_ring_record_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = runner::start(ServeConfig {
        hosts: 4,
        accounts: 10,
        seed: 81,
        rate: 400.0,
        max_events: Some(3000),
        ledger: dir.path().join("ledger.jsonl"),
        ..ServeConfig::default()
    })
    .unwrap();
    let fired = dir.path().join("failpoints");
    std::fs::create_dir_all(&fired).unwrap();
    let mut relay = Relay::new(dir.path(), &net.info.plc_url, 1, "");
    relay.env = vec![
        ("SLUICE_FAILPOINTS".into(), "shard-ring-garbage=on@500".into()),
        ("SLUICE_FAILPOINT_DIR".into(), fired.to_string_lossy().into_owned()),
    ];
    relay.start();
    crawl_all(&relay, &net, "");
    net.wait_generation().unwrap();
    let report = check_exact(&relay, dir.path(), Duration::from_secs(90));
    eprintln!("{}", report.summary());
    assert!(fired.join("shard-ring-garbage.fired").exists(), "the failpoint never fired");
    assert_eq!(metric(&relay, "sluice_ring_corrupt_total"), 1);
    let t = Instant::now();
    while metric(&relay, "sluice_child_restarts_total") < 1 {
        assert!(t.elapsed() < Duration::from_secs(10), "the shard was not restarted");
        std::thread::sleep(Duration::from_millis(100));
    }
    relay.stop();
}

/// Disk full is a pause: while the event log cannot be written (failpoint
/// `eventlog-enospc`, switched on by a file), `_health` answers 503 "disk
/// full", the metrics say so, the db-writer does not restart, and once
/// the switch is off the relay resumes by itself with the stream exact.
#[test]
fn disk_full_pauses_intake_and_resumes_losing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = runner::start(ServeConfig {
        hosts: 3,
        accounts: 8,
        seed: 82,
        rate: 300.0,
        max_events: Some(3000),
        ledger: dir.path().join("ledger.jsonl"),
        ..ServeConfig::default()
    })
    .unwrap();
    let switches = dir.path().join("failpoints");
    std::fs::create_dir_all(&switches).unwrap();
    let mut relay = Relay::new(dir.path(), &net.info.plc_url, 2, "");
    relay.env = vec![
        ("SLUICE_FAILPOINTS".into(), "eventlog-enospc=switch".into()),
        ("SLUICE_FAILPOINT_DIR".into(), switches.to_string_lossy().into_owned()),
    ];
    relay.start();
    crawl_all(&relay, &net, "");
    wait_events(&net, 600);
    let on = switches.join("eventlog-enospc.on");
    std::fs::write(&on, "").unwrap();
    // Paused: 503 with the reason, the gauge set, the seq still.
    let t = Instant::now();
    loop {
        let (st, body) = relay.http("GET", "/xrpc/_health", "").unwrap();
        if st == 503 && body.contains("disk full") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no disk-full answer: {st} {body}\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    let page = metrics_page(&relay);
    assert!(page.lines().any(|l| l == "sluice_disk_full 1"), "{page}");
    let seq = metric(&relay, "sluice_committed_seq");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(metric(&relay, "sluice_committed_seq"), seq, "events committed while the disk was full");
    assert_eq!(metric(&relay, "sluice_child_restarts_total"), 0, "{}", relay.log_tail());
    // Space returns.
    std::fs::remove_file(&on).unwrap();
    let t = Instant::now();
    while relay.http("GET", "/xrpc/_health", "").is_none_or(|(st, _)| st != 200) {
        assert!(t.elapsed() < Duration::from_secs(10), "not resumed\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("resumed {:?} after space returned", t.elapsed());
    net.wait_generation().unwrap();
    let report = check_exact(&relay, dir.path(), Duration::from_secs(90));
    eprintln!("{}", report.summary());
    assert_eq!(metric(&relay, "sluice_disk_full_pauses_total"), 1);
    assert_eq!(metric(&relay, "sluice_disk_full"), 0);
    assert_eq!(metric(&relay, "sluice_child_restarts_total"), 0);
    let log = relay.log_all();
    assert_eq!(log.matches("disk full: intake paused").count(), 1, "one WARN per pause");
    relay.stop();
}
